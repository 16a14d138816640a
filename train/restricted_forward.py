"""Forward passes of a causal LM on the restricted domain, as an attacker would fine-tune it and as a suppression
loss reads it: next-token logits of an LM domain, or class logits of a linear head on the last real token's
hidden state (how `AutoModelForSequenceClassification` pools a causal LM, so the simulated attacker matches the
attack suite's). Shapes: B batch, T tokens, D hidden, C classes, V vocabulary, N predicted positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token(model: torch.nn.Module, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N]) of every next-token prediction in the batch."""
    logits = model(input_ids=ids_BT).logits[:, :-1]
    return logits.reshape(-1, logits.shape[-1]), ids_BT[:, 1:].reshape(-1)


def pooled_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Final hidden state at each sequence's last real token  [B, D]."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1
    return hidden[torch.arange(len(last)), last]


def new_head(model: torch.nn.Module, num_labels: int, gen: torch.Generator) -> torch.Tensor:
    """A fresh classification head [C, D], initialised like the model's own linear layers."""
    d, std = model.config.hidden_size, getattr(model.config, "initializer_range", 0.02)
    return (torch.randn(num_labels, d, generator=gen) * std).requires_grad_(True)


def task_logits(model: torch.nn.Module, head_CD: torch.Tensor | None, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C or V], targets [N]) of one restricted batch: class logits with a head, else next tokens."""
    if head_CD is None:
        return next_token(model, batch["input_ids"])
    return pooled_hidden(model, batch) @ head_CD.t(), batch["labels"]


def task_loss(model: torch.nn.Module, head_CD: torch.Tensor | None, batch: dict) -> torch.Tensor:
    """What a fine-tuning attacker minimises: cross-entropy on the restricted domain."""
    logits, target = task_logits(model, head_CD, batch)
    return F.cross_entropy(logits, target)


def lm_loss(model: torch.nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids_BT, labels=ids_BT).loss
