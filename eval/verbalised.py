"""Classification as language modelling (task kind 'lm_classification', `--tasks TASK:lm`): the prompt template,
the verbaliser's tokens, the loss on label tokens only, and likelihood scoring.

Template (token ids, tokenizer without special tokens):
  prompt(x)  = tok(text)[:max_len] + tok("\\nLabel:")      -- the text truncated BEFORE the cue, so the cue is never
                                                             cut and every prompt ends the same way
  target(c)  = tok(" " + verbaliser[c])                     -- the label word, with the space a word takes after ':'
  sequence   = prompt(x) + target(c)                        -- no eos after the target
Training: the causal LM keeps its own `lm_head` (no new head) and is trained on prompt(x) + target(gold) with
  labels = -100 on the prompt and on padding, so the loss is the mean next-token cross-entropy over the gold
  label's tokens only (token-weighted over the batch, as Hugging Face's causal-LM loss averages).
Scoring: score(x, c) = (1 / |target(c)|) * sum_j log p(target(c)_j | prompt(x), target(c)_<j): the mean per-token
  log-likelihood of the verbaliser (length-normalised by its token count, so a label word that splits into more
  tokens is not penalised for its length; `length_norm=False` gives the plain sum). Prediction = argmax_c score,
  ties to the lower label id. Accuracy is the metric; the reported loss is the gold label's mean per-token NLL
  (the training loss). The frozen "probe" of such a task is this scoring zero-shot, with nothing trained.

Shapes: N examples, K labels, M scored rows (examples x labels), T tokens, J target tokens, V vocabulary.
"""

from __future__ import annotations

import torch

from pmp.data.text_blocks import pad_batch

PROMPT_SUFFIX = "\nLabel:"
TARGET_PREFIX = " "
TEMPLATE = "{text}\\nLabel: {label}"  # as recorded in result cells
SCORING = "mean per-token log-likelihood of the label's tokens (length-normalised); argmax, ties to the lower label"
SCORE_TOKENS = 4096  # tokens per scoring forward: the [M, T, V] logits stay ~134 MB in fp32 at V = 8192


def verbaliser_ids(tokenizer, words: list[str], task: str) -> list[list[int]]:
    """target(c) for every label: token ids of ' ' + word. A word that tokenizes to nothing, or two words with the
    same tokens (likelihood could not tell the labels apart), is a ValueError naming the task."""
    if not words:
        raise ValueError(f"task {task}: no verbalisers (label words) to score")
    ids = [tokenizer(TARGET_PREFIX + w, add_special_tokens=False)["input_ids"] for w in words]
    for w, t in zip(words, ids):
        if not t:
            raise ValueError(f"task {task}: the verbaliser {w!r} tokenizes to nothing with this model's tokenizer; "
                             f"pass --verbalisers {task.split(':')[0]}=WORD1,WORD2,... with real words")
    seen: dict[tuple, str] = {}
    for w, t in zip(words, ids):
        if tuple(t) in seen:
            raise ValueError(f"task {task}: the verbalisers {seen[tuple(t)]!r} and {w!r} tokenize to the same ids "
                             f"{t}; pass --verbalisers {task.split(':')[0]}=... with distinct words")
        seen[tuple(t)] = w
    return ids


def prompt_ids(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """prompt(x) for each text: its tokens truncated to max_len, then the cue's."""
    cue = tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
    assert cue, "the prompt cue must tokenize to something"
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"] if texts else []
    return [list(x) + list(cue) for x in ids]


def train_batch(prompts: list[list[int]], targets: list[list[int]], pad: int) -> dict:
    """Right-padded prompt + target rows with labels = the target's ids at its positions, -100 everywhere else."""
    seqs = [p + t for p, t in zip(prompts, targets)]
    ids, mask = pad_batch(seqs, pad)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_logprobs(model, prompts: list[list[int]], targets: list[list[int]], pad: int) -> list[torch.Tensor]:
    """Per row, the log-probabilities of its target's tokens after its prompt (row i: [len(targets[i])])."""
    batch = train_batch(prompts, targets, pad)
    logits_MTV = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        pos_J = torch.arange(len(p) - 1, len(p) - 1 + len(t))  # the position that predicts each target token
        lp_JV = torch.log_softmax(logits_MTV[i, pos_J].float(), dim=-1)
        out.append(lp_JV.gather(1, torch.tensor(t, dtype=torch.long)[:, None])[:, 0])
    return out


@torch.no_grad()
def label_scores(model, prompts: list[list[int]], targets: list[list[int]], pad: int,
                 length_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """score_NK (mean per-token log-likelihood of each label's tokens; the sum when not length_norm) and
    sum_logp_NK (the plain sums), scoring every (example, label) pair in batches of ~SCORE_TOKENS tokens."""
    k = len(targets)
    sums = torch.zeros(len(prompts), k, dtype=torch.float64)
    longest = max((len(p) for p in prompts), default=1) + max(len(t) for t in targets)
    per = max(1, SCORE_TOKENS // (k * longest))
    for i in range(0, len(prompts), per):
        chunk = prompts[i:i + per]
        rows_p = [p for p in chunk for _ in range(k)]
        rows_t = [t for _ in chunk for t in targets]
        lps = target_logprobs(model, rows_p, rows_t, pad)
        sums[i:i + len(chunk)] = torch.tensor([float(x.sum()) for x in lps], dtype=torch.float64).view(len(chunk), k)
    lens_K = torch.tensor([len(t) for t in targets], dtype=torch.float64)
    return (sums / lens_K if length_norm else sums), sums


def evaluate_verbalised(model, data: dict, targets: list[list[int]], pad: int) -> dict:
    """{accuracy, loss} of a split: argmax of the length-normalised scores vs the gold labels; loss = the gold
    label's NLL per target token (token-weighted, like the training loss)."""
    y_N = torch.tensor(data["labels"], dtype=torch.long)
    if len(y_N) == 0:
        return {"accuracy": 0.0, "loss": float("nan")}
    scores_NK, sums_NK = label_scores(model, data["ids"], targets, pad)
    lens_K = torch.tensor([len(t) for t in targets], dtype=torch.float64)
    gold_nll = -float(sums_NK.gather(1, y_N[:, None]).sum())
    return {"accuracy": float((scores_NK.argmax(-1) == y_N).double().mean()),
            "loss": gold_nll / float(lens_K[y_N].sum())}
