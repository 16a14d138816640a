"""Mask-recovery attacks from a shadow run: the attacker's OWN PMP run of the same architecture and tokenizer.

The attacker trains it with the public code and public data from its own random init, so its mask is known to the
attacker. Which tensors, rows and entries the public identification rule favours is largely a property of the
architecture and the data, so the shadow mask is a prior for the private one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pmp.eval.release_weights import Release, Scores
from pmp.mask import META_FILE, PrivateMask


def load_shadow(shadow: str | Path, release: Release) -> PrivateMask:
    """The attacker's own PMP run (trained with the public code and data): its mask is public to the attacker."""
    p = Path(shadow)
    d = p / "private" if (p / "private" / META_FILE).is_file() else p
    if not (d / META_FILE).is_file():
        raise FileNotFoundError(f"--shadow {p} holds no mask (private/mask.json): pass a PMP run dir the attacker "
                                "trained with `pmp pretrain` (same architecture and tokenizer as the release)")
    mask = PrivateMask.load(d)
    try:
        mask.check_matches(release.model)
    except ValueError as e:
        raise ValueError(f"--shadow {p}: the shadow run has another architecture than the release: {e}") from None
    return mask


def shadow_scores(release: Release, shadow_masks: dict[str, torch.Tensor], mixture: Scores,
                  fits: dict[str, dict]) -> dict[str, Scores]:
    """Attacks that use the attacker's OWN shadow PMP run (public code, public data, its own random init): its mask
    is known to the attacker. `shadow_mask`: the shadow mask itself (same data -> same frequent-token rows, same
    tensors favoured). `shadow_density`: the shadow mask's per-tensor density (which tensors the global top-rho
    |gradient| rule favours is a property of the architecture and data). `shadow_prior+mixture`: the per-tensor
    density as the prior of the `init_mixture` posterior: logit P = logit(shadow density) + log likelihood ratio."""
    out: dict[str, Scores] = {"shadow_mask": {}, "shadow_density": {}, "shadow_prior+mixture": {}}
    for n, w in release.weights.items():
        m = shadow_masks.get(n)
        if m is None or m.shape != w.shape:
            continue
        dens = float(m.float().mean())
        out["shadow_mask"][n] = m.float()
        out["shadow_density"][n] = torch.full_like(w, dens)
        prior = min(max(dens, 1e-4), 1 - 1e-4)
        post = mixture[n].double().clamp(1e-12, 1 - 1e-12)
        llr = torch.logit(post) - math.log(fits[n]["pi"] / (1 - fits[n]["pi"])) if n in fits else torch.logit(post)
        out["shadow_prior+mixture"][n] = torch.sigmoid(math.log(prior / (1 - prior)) + llr).float()
    return out
