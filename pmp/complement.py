"""The complement: the entries of the masked tensors outside the private mask, and what it is held at.

`pmp.complement` chooses it for the masked phase:
- frozen (default): the complement stays bit-exactly at its initial values (the paper's text).
- project: what the authors' code does in stage II (papers.md section 1.3): `project_complement_l2_ball_` rescales
  *all complement entries of the model together* (one global L2 norm, not one per tensor) so that their norm is at
  most R. Here this happens once, right after the rewind at identification; the complement is then frozen at
  those scaled values. Their code projects after ticket step `t` whenever t > 0 and t % tau == 0 (tau 400 of
  20,000 steps by its CLI defaults) and nothing else moves its complement but AdamW weight decay (which only
  shrinks it further, by ~2 % over the whole run at lr 2e-5), so every projection after the first is a no-op; the
  only difference is that their first tau + 1 ticket steps (2 % of the run) still see the unscaled complement.
  Projecting at the switch keeps the masked phase's invariant (the complement is a constant) and so keeps
  compact optimizer state, exact resume and the release checks unchanged.

Either way the complement is a fixed function of the initial weights: init x scale, with scale = 1 (frozen) or
min(1, R / ||complement of init||) rounded to fp32 (project). The run records the scale in
RUN/private/complement.json (absent = 1: runs of earlier versions, all frozen), and everything that checks a
complement (`pmp.run_dir.check_complement`: export, attack, audit) compares with init x that scale, in the dtype
the release stores. A resume in the masked phase recomputes the plan and refuses a record that disagrees (or
rewrites a lost one).

The radius: R = 2 in the authors' code at 1.1 B parameters (TinyLlama shape, 1,100,048,384 entries, all masked,
rho 0.5 in their dataclass: 550,024,192 complement entries). R alone would shrink a small model's complement far
less (x 0.052 at 7.4 M instead of x 0.0043), so the automatic radius keeps the authors' per-entry size after the
projection, R / sqrt(n) = 2 / sqrt(550,024,192) = 8.53e-5:

    R(n) = 2 * sqrt(n / 550,024,192),   n = complement entries of this run

= 0.164 at the `small` preset with rho 0.5 (3,702,784 complement entries of the matrices), about 1.41 at
tinyllama1b with rho 0.75. With the same N(0, 0.02^2) init this is also the authors' shrink factor (0.0043).
(Their CLI default rho 0.9 would give 1.9e-4 per entry; we anchor on the dataclass's 0.5, as
research/protection.md does.) `pmp.complement_radius` > 0 overrides it.

The radius and the scale depend on the mask's size: they live in RUN/private only, never in a release.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from pmp.atomic import write_json
from pmp.config import COMPLEMENT_MODES
from pmp.mask import PrivateMask

AUTHORS_RADIUS = 2.0  # R of `project_complement_l2_ball_` in the authors' non-fine-tuable.py
AUTHORS_COMPLEMENT_ENTRIES = 550_024_192  # 0.5 x 1,100,048,384: their 1.1 B model at their dataclass's rho 0.5
RECORD_FILE = "complement.json"
_CHUNK = 32_768  # torch's CPU GRAIN_SIZE: a row sum this long runs on one thread, so the norm ignores thread count


def auto_radius(complement_entries: int) -> float:
    """The radius that leaves the authors' per-entry size, 2 / sqrt(550,024,192), after the projection."""
    return AUTHORS_RADIUS * math.sqrt(complement_entries / AUTHORS_COMPLEMENT_ENTRIES)


def complement_entries(mask: PrivateMask) -> int:
    return mask.total - mask.nnz


def complement_norm(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all complement entries of `weights` together (`masks`: name -> bool mask, True = trained).

    Deterministic whatever the thread count or device: float64 squares summed in fixed 32 k-entry rows (one thread
    each), then exactly (math.fsum) over rows and tensors. A resume that identifies the mask again must get the
    very same scale."""
    sums = []
    for name in sorted(masks):
        comp = weights[name].detach().cpu()[~masks[name].cpu()].double()
        pad = (-comp.numel()) % _CHUNK
        rows = torch.cat([comp, comp.new_zeros(pad)]).reshape(-1, _CHUNK)
        sums.extend((rows * rows).sum(dim=1).tolist())
    return math.sqrt(math.fsum(sums))


def projection_scale(norm: float, radius: float) -> float:
    """The factor onto the ball of `radius` (1 inside it), rounded to fp32 so fp32 weights times it round once."""
    return 1.0 if norm <= radius or norm == 0 else float(np.float32(radius / norm))


def scaled(w: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """`w` with its complement multiplied by `scale` (one fp32 rounding per entry; masked entries untouched)."""
    if scale == 1.0:
        return w
    return torch.where(mask.to(w.device), w, w * torch.tensor(scale, dtype=w.dtype, device=w.device))


class ComplementPlan:
    """What the masked phase holds the complement at, for one run: its mode, radius and scale."""

    def __init__(self, mode: str, radius: float = 0.0, entries: int = 0, norm_at_init: float = 0.0,
                 scale: float = 1.0):
        self.mode, self.radius, self.entries, self.norm_at_init, self.scale = mode, radius, entries, norm_at_init, scale

    @classmethod
    def plan(cls, mode: str, radius: float, init: Mapping[str, torch.Tensor], mask: PrivateMask) -> ComplementPlan:
        """The plan for `mode` (`radius` 0 = auto) given the whole initial weights and the mask."""
        if mode == "frozen":
            return cls("frozen")
        masks = mask.to_bool()
        n = complement_entries(mask)
        r = radius if radius > 0 else auto_radius(n)
        norm = complement_norm(init, masks)
        return cls(mode, r, n, norm, projection_scale(norm, r))

    def apply(self, state: Mapping[str, torch.Tensor], mask: PrivateMask) -> dict[str, torch.Tensor]:
        """A copy of `state` (whole tensors) with the complement of every masked tensor scaled: the reference the
        checks compare with. (A tied alias the mask does not name, e.g. GPT-2's lm_head.weight, is left as it is:
        the trainer scales the model's parameters in place instead.)"""
        if self.scale == 1.0:
            return dict(state)
        masks = mask.to_bool()
        return {n: scaled(v, masks[n], self.scale) if n in masks else v for n, v in state.items()}

    def summary(self) -> str:
        if self.mode == "frozen":
            return "complement frozen at its initial values"
        return (f"complement projected: L2 norm {self.norm_at_init:.4g} -> {self.norm_at_init * self.scale:.4g} "
                f"(radius {self.radius:.4g} over {self.entries:,} entries; each entry x {self.scale:.4g}), then frozen")

    def record(self) -> dict:
        return {"mode": self.mode, "radius": self.radius, "entries": self.entries, "norm_at_init": self.norm_at_init,
                "scale": self.scale, "scale_fp32_hex": np.float32(self.scale).tobytes().hex()}

    def save(self, private: Path) -> None:
        write_json(Path(private) / RECORD_FILE, self.record())

    @classmethod
    def load(cls, private: Path) -> ComplementPlan:
        """The run's recorded plan; a run without the record (frozen, or written before pmp recorded it) is
        frozen."""
        f = Path(private) / RECORD_FILE
        if not f.is_file():
            return cls("frozen")
        try:
            r = json.loads(f.read_text())
            scale = float(np.frombuffer(bytes.fromhex(r["scale_fp32_hex"]), dtype=np.float32)[0])
            plan = cls(r["mode"], float(r["radius"]), int(r["entries"]), float(r["norm_at_init"]), scale)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{f} cannot be read ({e}): corrupt complement record") from None
        if plan.mode not in COMPLEMENT_MODES or not 0 < scale <= 1 or (plan.mode == "frozen" and scale != 1.0):
            raise ValueError(f"{f} records mode {plan.mode!r} with scale {scale}: corrupt complement record")
        return plan
