"""Which parameters get weight decay: matrices (embeddings, linear weights, lm_head) do, vectors (norm gains,
biases) do not -- the one rule shared by dense pre-training, the masked phase and every fine-tuning attack."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def decays(p: torch.Tensor) -> bool:
    return p.dim() >= 2


def decay_groups(decay: Iterable[torch.Tensor], no_decay: Iterable[torch.Tensor], weight_decay: float) -> list[dict]:
    return [{"params": list(decay), "weight_decay": weight_decay}, {"params": list(no_decay), "weight_decay": 0.0}]


def param_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict]:
    """AdamW groups of plain parameters under the rule above."""
    params = list(params)
    return decay_groups([p for p in params if decays(p)], [p for p in params if not decays(p)], weight_decay)
