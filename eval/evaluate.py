"""What an attack is measured by: the metric of each task kind and its evaluation on a prepared split.

Classification: accuracy, HIGHER is better; the sequence-classification head reads the last real token.
Classification as language modelling: accuracy of likelihood scoring of the label words (eval/verbalised.py).
LM probe: perplexity (exp of the token-weighted mean loss), LOWER is better -- every consumer goes through
`DIRECTION`. Shapes: B batch, T tokens, H hidden, N examples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pmp.data.text_blocks import pad_batch
from pmp.eval.task_data import PreparedTask
from pmp.eval.verbalised import evaluate_verbalised

EVAL_BATCH = 64


def loss_of(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def evaluate(model, task: PreparedTask, split: str) -> dict:
    """{metric, loss} on a split ('val' | 'test')."""
    was_training = model.training
    model.eval()
    data = getattr(task, split)
    if task.kind == "lm":
        out = evaluate_lm_blocks(model, data["blocks"])
    elif task.kind == "lm_classification":
        out = evaluate_verbalised(model, data, task.targets, task.pad_id)
    else:
        out = _evaluate_classification(model, data, task.pad_id)
    model.train(was_training)
    return out


def evaluate_lm_blocks(model, blocks_NT) -> dict:
    """{perplexity, loss} of a causal LM on token blocks (token-weighted; the model's mode is the caller's)."""
    total, tokens = 0.0, 0
    for i in range(0, len(blocks_NT), EVAL_BATCH // 4):
        b = blocks_NT[i:i + EVAL_BATCH // 4]
        n_tok = b[:, 1:].numel()
        total += float(model(input_ids=b, labels=b).loss) * n_tok
        tokens += n_tok
    loss = total / tokens
    return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}


def _evaluate_classification(model, data: dict, pad_id: int) -> dict:
    order = sorted(range(len(data["labels"])), key=lambda i: len(data["ids"][i]))  # less padding
    correct, total = 0, 0.0
    for i in range(0, len(order), EVAL_BATCH):
        idx = order[i:i + EVAL_BATCH]
        ids, mask = pad_batch([data["ids"][j] for j in idx], pad_id)
        y = torch.tensor([data["labels"][j] for j in idx])
        logits = model(input_ids=ids, attention_mask=mask).logits
        total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    n = max(len(order), 1)
    return {"accuracy": correct / n, "loss": total / n}


@torch.no_grad()
def features(model, task: PreparedTask, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-base features for the head-only probe: the final hidden state at the last real token (exactly what
    the sequence-classification head reads) -> (feats_NH, labels_N)."""
    model.eval()
    data, base = getattr(task, split), model.base_model
    feats = []
    for i in range(0, len(data["labels"]), EVAL_BATCH):
        ids, mask = pad_batch(data["ids"][i:i + EVAL_BATCH], task.pad_id)
        h_BTH = base(input_ids=ids, attention_mask=mask).last_hidden_state
        last_B = mask.sum(1) - 1
        feats.append(h_BTH[torch.arange(len(ids)), last_B].float())
    model.train()
    return torch.cat(feats), torch.tensor(data["labels"])
