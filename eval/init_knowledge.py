"""What an attacker knows about the initial weights without the secret seed: the init distribution per tensor.

The architecture and its init code are public, so building the model at a few public seeds shows, per tensor, which
entries are the same CONSTANT at every seed (RMSNorm weights = 1.0, biases = 0.0, a padding row) and the mean/std of
the random rest (Llama: N(0, 0.02^2)). The weight-statistics attacks score the release against this knowledge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pmp.eval.release_weights import Release
from pmp.mask import tensor_kind
from pmp.model import build_model


@dataclass
class InitDist:
    """What the attacker knows about one tensor's initial distribution, measured from builds at public seeds."""
    const_mask: torch.Tensor  # bool, entries that are the same constant at every seed (norm weights, pad row...)
    const_value: torch.Tensor  # the constant at those entries (0 elsewhere)
    mean: float  # of the random entries
    std: float  # of the random entries (0 when the whole tensor is constant)

    @property
    def all_const(self) -> bool:
        return bool(self.const_mask.all())


def init_distribution(release: Release, seeds: tuple[int, ...] = (0, 1, 2),
                      norm_jitter: float = 0.0) -> dict[str, InitDist]:
    """Per tensor: the entries that are constant at init, and mean/std of the rest (the empirical init check).

    `norm_jitter` > 0 is a what-if of a proposed fix: constant init entries get N(const, jitter^2) instead."""
    builds = [dict(build_model(release.config, s).named_parameters()) for s in seeds]
    out = {}
    for n, w in release.weights.items():
        if n not in builds[0] or builds[0][n].shape != w.shape:
            raise ValueError(f"release parameter {n} is not in the architecture built from {release.path}/config.json")
        x = builds[0][n].detach()
        const = torch.ones_like(x, dtype=torch.bool)  # equal at every seed (two seeds: ~1 chance tie per 10^7)
        for b in builds[1:]:
            const &= b[n].detach() == x
        rand = x[~const]
        mean, std = (float(rand.mean()), float(rand.std())) if rand.numel() > 1 else (0.0, 0.0)
        if norm_jitter > 0 and rand.numel() <= 1:  # the fix applies to all-constant tensors (norms, biases)
            const, mean, std = torch.zeros_like(const), float(x.flatten()[0]), norm_jitter
        out[n] = InitDist(const, torch.where(const, x, torch.zeros_like(x)), mean, std)
    return out


def summary_by_kind(dist: dict[str, InitDist]) -> dict:
    """Per tensor kind (`pmp.mask.tensor_kind`): init kinds, stds of the random entries, constants, constant
    entries -- the audit report's "init distribution" table."""
    out = {}
    for n, d in dist.items():
        g = tensor_kind(n)
        c = int(d.const_mask.sum())
        kind = "constant" if d.all_const else ("normal" if not c else "normal + constant entries")
        e = out.setdefault(g, {"kind": set(), "std": set(), "constants": set(), "constant_entries": 0})
        e["kind"].add(kind)
        if d.std and not d.all_const:
            e["std"].add(round(d.std, 4))
        if c:
            e["constants"].update(float(v) for v in d.const_value[d.const_mask].unique()[:4])
            e["constant_entries"] += c
    return {g: {k: sorted(v) if isinstance(v, set) else v for k, v in e.items()} for g, e in out.items()}
