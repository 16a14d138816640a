"""Mask-recovery attacks from the released weights alone, against the public init distribution.

Why the weights betray the mask: PMP keeps the complement bit-exactly at its initial values, so
  - entries at an init CONSTANT (RMSNorm weights = 1.0, biases = 0.0) that were never trained are still exactly
    that constant: a "structural tell" (`structural`);
  - the complement of a random tensor is an exact sample of the init distribution (Llama: N(0, 0.02^2)) while
    trained entries drifted away from it (`magnitude`, `zscore`, `init_nll`, `init_mixture`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pmp.eval.init_knowledge import InitDist
from pmp.eval.release_weights import Release, Scores, as_stored

# name -> family (the audit report's grouping), in the order the audit runs and lists them
WEIGHT_ATTACK_FAMILIES = {"magnitude": "weights", "zscore": "weights", "init_nll": "init distribution",
                          "init_mixture": "init distribution", "structural": "structural tells"}
_CERTAIN = 1e6  # score of an entry whose value is impossible (or certain) under the init distribution


def weight_attacks(release: Release, dist: dict[str, InitDist],
                   fits: dict | None = None) -> dict[str, Callable[[], Scores]]:
    """Every attack of this module on `release`, by name (WEIGHT_ATTACK_FAMILIES order), not yet run.
    `fits` collects the `init_mixture` fits (see there)."""
    return {"magnitude": lambda: magnitude(release), "zscore": lambda: zscore(release),
            "init_nll": lambda: init_nll(release, dist), "init_mixture": lambda: init_mixture(release, dist, fits=fits),
            "structural": lambda: structural(release, dist)}


def magnitude(release: Release) -> Scores:
    return {n: w.abs() for n, w in release.weights.items()}


def zscore(release: Release) -> Scores:
    out = {}
    for n, w in release.weights.items():
        sd = float(w.std()) if w.numel() > 1 else 0.0
        out[n] = (w - w.mean()).abs() / (sd if sd > 0 else 1.0)
    return out


def init_nll(release: Release, dist: dict[str, InitDist]) -> Scores:
    """Negative log-likelihood under the init distribution: Gaussian for random entries; a point mass for
    constant-init entries (exactly at the constant = -_CERTAIN, anywhere else = +_CERTAIN + distance)."""
    out = {}
    for n, w in release.weights.items():
        d = dist[n]
        sd = d.std if d.std > 0 else 1.0
        s = 0.5 * ((w - d.mean) / sd) ** 2 + torch.log(torch.tensor(sd)) + 0.9189385
        off = w != as_stored(d.const_value, release.storage_dtype)
        s = torch.where(d.const_mask, torch.where(off, _CERTAIN + (w - d.const_value).abs(), -_CERTAIN), s)
        out[n] = s
    return out


def init_mixture(release: Release, dist: dict[str, InitDist], iters: int = 30, sample: int = 20_000,
                 seed: int = 0, fits: dict | None = None) -> Scores:
    """Posterior P(trained | w) under a per-tensor two-component mixture: the KNOWN init Gaussian (complement)
    and a free Gaussian (trained entries) fitted by EM. Calibrated across tensors, unlike raw |w|."""
    out, g = {}, torch.Generator().manual_seed(seed)
    for n, w in release.weights.items():
        d = dist[n]
        if d.std <= 0:  # an all-constant tensor: the point mass decides
            out[n] = (w != as_stored(d.const_value, release.storage_dtype)).float()
            continue
        x = w[~d.const_mask].double()
        if x.numel() > sample:
            x = x[torch.randint(x.numel(), (sample,), generator=g)]
        m0, s0 = d.mean, d.std
        pi, m1, s1 = 0.5, float(x.mean()), max(float(x.std()), 1.5 * s0)

        for _ in range(iters):
            r = posterior(x, m0, s0, pi, m1, s1)
            pi = float(r.mean().clamp(1e-4, 1 - 1e-4))
            m1 = float((r * x).sum() / r.sum().clamp_min(1e-12))
            s1 = max(float(((r * (x - m1) ** 2).sum() / r.sum().clamp_min(1e-12)).sqrt()), 1e-3 * s0)
        if fits is not None:
            fits[n] = {"pi": pi, "mean": m1, "std": s1}
        s = posterior(w.double(), m0, s0, pi, m1, s1).float()
        off = w != as_stored(d.const_value, release.storage_dtype)
        out[n] = torch.where(d.const_mask, off.float(), s)
    return out


def posterior(v: torch.Tensor, m0: float, s0: float, pi: float, m1: float, s1: float) -> torch.Tensor:
    """P(component 1 | v) for pi*N(m1, s1^2) + (1-pi)*N(m0, s0^2)."""
    l0 = -0.5 * ((v - m0) / s0) ** 2 - math.log(s0) + math.log(1 - pi)
    l1 = -0.5 * ((v - m1) / s1) ** 2 - math.log(s1) + math.log(pi)
    return torch.sigmoid(l1 - l0)


def structural(release: Release, dist: dict[str, InitDist]) -> Scores:
    """Structural tells: on entries that are a constant at init (norm weights 1.0, biases 0.0, the padding row),
    0 = exactly at the constant (probably untrained), 1 = moved. Random-init entries are NaN (no opinion);
    tensors without constant-init entries are left out."""
    out = {}
    for n, w in release.weights.items():
        d = dist[n]
        if not d.const_mask.any():
            continue
        off = (w != as_stored(d.const_value, release.storage_dtype)).float()
        out[n] = torch.where(d.const_mask, off, torch.full_like(w, float("nan")))
    return out
