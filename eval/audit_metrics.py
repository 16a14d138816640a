"""How well an attack's scores rank the TRUE private mask: AUROC and precision@rho, globally and per tensor kind.

AUROC (rank-based, ties averaged: 0.5 = chance, 1 = the mask is read off exactly) and precision@rho (the share of
truly masked entries among the top rho*N scores, rho = the true density, so chance = rho), globally and per tensor
type (`pmp.mask.tensor_kind`). Large models are scored on a uniform fixed-seed subsample of their entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pmp.eval.release_weights import Scores
from pmp.mask import tensor_kind

MAX_ENTRIES = 2_000_000  # AUROC / precision on a uniform fixed-seed subsample above this many entries


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney U from
    average ranks). NaN when one class is empty."""
    s, y = scores.flatten().double(), labels.flatten().bool()
    if s.numel() != y.numel():
        raise ValueError(f"auroc: {s.numel()} scores but {y.numel()} labels")
    if torch.isnan(s).any():
        raise ValueError("auroc: scores contain NaN")
    n1 = int(y.sum())
    n0 = y.numel() - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = torch.argsort(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based average ranks in sorted order
    r_pos = float(ranks[y[order]].sum())
    return (r_pos - n1 * (n1 + 1) / 2) / (n1 * n0)


def precision_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of positives among the k highest scores; entries tied at the threshold count by their expected
    share (so a constant score gives the base rate, whatever the order)."""
    s, y = scores.flatten().double(), labels.flatten().bool()
    if not 0 < k <= s.numel():
        raise ValueError(f"precision_at_k: k must be in [1, {s.numel()}], got {k}")
    thr = torch.topk(s, k, sorted=False).values.min()
    above, tied = s > thr, s == thr
    n_above = int(above.sum())
    take = k - n_above
    pos = float(y[above].sum()) + take * float(y[tied].sum()) / int(tied.sum())
    return pos / k


@dataclass
class Sample:
    """Entries scored: per tensor all of them, or a uniform fixed-seed subsample when the model is large."""
    idx: dict[str, torch.Tensor | None]
    labels: dict[str, torch.Tensor]
    total: int

    @classmethod
    def build(cls, masks: dict[str, torch.Tensor], max_entries: int = MAX_ENTRIES, seed: int = 0) -> Sample:
        total = sum(m.numel() for m in masks.values())
        frac = min(1.0, max_entries / max(total, 1))
        g = torch.Generator().manual_seed(seed)
        idx, labels = {}, {}
        for n, m in masks.items():
            flat = m.flatten()
            if frac >= 1.0:
                idx[n], labels[n] = None, flat
            else:
                i = torch.randperm(flat.numel(), generator=g)[: max(1, round(flat.numel() * frac))]
                idx[n], labels[n] = i, flat[i]
        return cls(idx, labels, total)

    def take(self, name: str, t: torch.Tensor) -> torch.Tensor:
        f = t.flatten()
        return f if self.idx[name] is None else f[self.idx[name]]

    @property
    def size(self) -> int:
        return sum(v.numel() for v in self.labels.values())


def evaluate(scores: Scores, sample: Sample) -> dict:
    """AUROC and precision@rho of one attack, globally and per tensor type, on the covered entries."""
    by_group: dict[str, tuple[list, list]] = {}
    for n, y in sample.labels.items():
        if n not in scores:
            continue
        s = sample.take(n, scores[n].detach().float())
        ok = ~torch.isnan(s)  # NaN = the attack has no opinion on this entry
        if not bool(ok.all()):
            s, y = s[ok], y[ok]
        if not s.numel():
            continue
        for g in ("global", tensor_kind(n)):
            by_group.setdefault(g, ([], []))[0].append(s)
            by_group[g][1].append(y)
    out = {}
    for g, (ss, ys) in by_group.items():
        s, y = torch.cat(ss), torch.cat(ys)
        rho = float(y.float().mean())
        k = round(rho * y.numel())
        out[g] = {"auroc": auroc(s, y), "precision_at_rho": precision_at_k(s, y, k) if k else float("nan"),
                  "rho": rho, "entries": y.numel(), "coverage": y.numel() / sample.size if g == "global" else None}
    return out
