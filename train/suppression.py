"""Suppression losses of SOPHON (and MLAC here): make a (simulated fine-tuned) model do badly on the restricted
domain with losses whose gradients SHRINK as the error grows, so that minimising them cannot diverge the way
gradient ascent on cross-entropy does.

  inverse cross-entropy  ice(z, y) = -log(1 - p_y),  p = softmax(z)    -> 0 as p_y -> 0; gradient p_y-weighted
  KL from uniform        klu(z)    = KL(u || p) = -log C - mean_c log p_c  -> 0 as p -> uniform; d/dz = p - u

Both work on the last dimension: C = the number of classes, or the vocabulary for next-token prediction.
log(1 - p_y) is computed as logsumexp over the other classes minus logsumexp over all, which is finite for any
finite logits (1 - p_y never underflows to 0 the way it does when formed from p_y).
"""

from __future__ import annotations

import math

import torch


def inverse_cross_entropy(logits_NC: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """Per-example -log(1 - p_target)  [N]."""
    others = logits_NC.scatter(-1, target_N.unsqueeze(-1), float("-inf"))
    return -(torch.logsumexp(others, -1) - torch.logsumexp(logits_NC, -1))


def kl_from_uniform(logits_NC: torch.Tensor) -> torch.Tensor:
    """Per-example KL(uniform || softmax(logits))  [N]."""
    logp = torch.log_softmax(logits_NC, -1)
    return -math.log(logits_NC.shape[-1]) - logp.mean(-1)


def suppression_loss(kind: str, logits_NC: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """Mean suppression loss of one batch (`kind`: ice | klu)."""
    if kind == "ice":
        return inverse_cross_entropy(logits_NC, target_N).mean()
    if kind == "klu":
        return kl_from_uniform(logits_NC).mean()
    raise ValueError(f"unknown suppression loss {kind!r} (ice | klu)")
