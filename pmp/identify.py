"""Early-bird mask identification during the dense warm-up.

Every step: score each entry of each masked tensor (|grad| by default), smooth the scores with an EMA (raw
per-step scores are noisy: consecutive raw |grad| masks of a 4-layer Llama overlapped with IoU ~0.64 at rho 0.5,
so a 0.99 rule never fired), select the top rho fraction (globally or per tensor, ties broken by the lower
flat index so the mask is deterministic), and every `iou_lag_steps` steps compare it with the mask of the
previous check. Identification stops when that IoU stays >= `iou_threshold` for `patience` consecutive checks
(after `min_warmup_steps`), or at `max_warmup_steps`.

Why a lag: the EMA moves each score by only (1 - beta) of a step's signal, so masks of CONSECUTIVE steps agree
by construction (IoU > 0.99 from the first steps on a small Llama, so a step-to-step rule stopped at
`min_warmup_steps` whatever the scores were doing). Comparing masks ~1/(1 - beta) steps apart measures whether
the smoothed ranking has actually settled.
"""

from __future__ import annotations

import secrets

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from pmp.config import PMPConfig


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly k entries of a flat `scores`: the largest, ties to the lowest index."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    kth = torch.kthvalue(scores.float().cpu(), n - k + 1).values.to(scores.device)  # the k-th largest value
    sel = scores > kth
    eq = scores == kth
    short = k - int(sel.sum())
    sel |= eq & (torch.cumsum(eq, 0) <= short)
    return sel


def select_units(scores: torch.Tensor, sizes: torch.Tensor | None, k: int) -> torch.Tensor:
    """Choose units (entries, or blocks of `sizes` entries) by descending score, ties to the lower index,
    until about k entries are chosen: the last unit is taken when that lands closer to k than stopping."""
    if sizes is None:
        return select_top(scores, k)
    order = torch.sort(scores, descending=True, stable=True).indices
    cum = torch.cumsum(sizes.flatten()[order], 0)
    n = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device), right=True))  # units fully within k
    if n < len(cum) and (cum[n] - k) < (k - (cum[n - 1] if n else 0)):
        n += 1
    sel = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    sel[order[:n]] = True
    return sel


def block_scores(score: torch.Tensor, bs: int) -> torch.Tensor:
    """Mean score of each bs x bs block of a 2-D tensor (edge blocks averaged over their real entries)."""
    rows, cols = score.shape
    rb, cb = -(-rows // bs), -(-cols // bs)
    padded = torch.zeros(rb * bs, cb * bs, dtype=score.dtype, device=score.device)
    padded[:rows, :cols] = score
    return padded.view(rb, bs, cb, bs).sum((1, 3)) / block_sizes(score.shape, bs).to(score.device)


def block_sizes(shape: torch.Size, bs: int) -> torch.Tensor:
    """Number of real entries in each block (edge blocks are smaller)."""
    rows, cols = shape
    r = torch.full((-(-rows // bs),), bs, dtype=torch.int64)
    c = torch.full((-(-cols // bs),), bs, dtype=torch.int64)
    r[-1], c[-1] = rows - bs * (len(r) - 1), cols - bs * (len(c) - 1)
    return r[:, None] * c[None, :]


def expand_blocks(block_mask: torch.Tensor, bs: int, shape: torch.Size) -> torch.Tensor:
    return block_mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[: shape[0], : shape[1]].contiguous()


def mask_iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


class MaskIdentifier:
    """Accumulates smoothed scores over warm-up steps and decides when the mask is stable."""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: PMPConfig, block_names: set[str] = frozenset(),
                 random_seed: int | None = None):
        """`block_names`: 2-D tensors that get whole-block masks when cfg.block_size > 0 (linear weights).
        `random_seed`: the seed of the random scorer (default: drawn here; data-parallel ranks share rank 0's)."""
        self.params = params
        self.cfg = cfg
        self.block_names = set(block_names) if cfg.block_size else set()
        self.ema: dict[str, torch.Tensor] = {}
        self.prev: dict[str, torch.Tensor] | None = None  # the mask at the previous check
        self.stable_steps = 0  # consecutive checks with IoU >= threshold
        self.steps_seen = 0
        self.last_iou = 0.0
        self.history: list[dict] = []
        # The random control draws its scores once: it is a fixed random mask, not a moving target.
        self.random_seed = secrets.randbits(63) if random_seed is None else random_seed

    def _score(self, name: str, p: torch.nn.Parameter) -> torch.Tensor:
        s = self.cfg.scorer
        if s == "random":
            g = torch.Generator(device="cpu").manual_seed((self.random_seed + hash_name(name)) % 2**63)
            return shaped_like(torch.rand(p.shape, generator=g), p)
        if s == "weight":
            return p.detach().abs().float()
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if s == "grad":
            return grad.detach().abs().float()
        return (p.detach() * grad.detach()).abs().float()  # weight_grad

    def observe(self, step: int) -> dict:
        """Score the current gradients/weights; return this step's record (with 'done' when identified)."""
        beta = self.cfg.ema_beta
        for name, p in self.params.items():
            score = self._score(name, p)
            if name not in self.ema or beta == 0:
                self.ema[name] = score
            else:
                self.ema[name].mul_(beta).add_(score, alpha=1 - beta)
        self.steps_seen += 1
        checked = self.steps_seen % self.cfg.iou_lag_steps == 0
        if checked:  # selecting top-rho is the costly part: only at checks (and once more when done)
            mask = self.current_mask()
            self.last_iou = mask_iou(self.prev, mask) if self.prev is not None else 0.0
            self.stable_steps = self.stable_steps + 1 if self.last_iou >= self.cfg.iou_threshold else 0
            self.prev = mask
        stable = self.stable_steps >= self.cfg.patience and self.steps_seen >= self.cfg.min_warmup_steps
        at_max = self.steps_seen >= self.cfg.max_warmup_steps
        reason = "stable" if stable else ("max_warmup_steps" if at_max else None)
        rec = {"step": step, "iou": self.last_iou, "checked": checked, "stable_steps": self.stable_steps,
               "done": reason is not None, "reason": reason}
        if checked or reason:
            self.history.append({k: v for k, v in rec.items() if k != "done"})
        return rec

    def current_mask(self) -> dict[str, torch.Tensor]:
        """Top-rho of the smoothed scores; whole blocks for the tensors in `block_names`. Scores sharded over
        data-parallel ranks (FSDP DTensors) are gathered first -- one tensor at a time for per_tensor selection,
        all of them for global -- so every rank selects the same full mask."""
        if self.cfg.selection == "per_tensor":
            return {n: self._select({n: full_tensor(s)})[n] for n, s in self.ema.items()}
        return self._select({n: full_tensor(s) for n, s in self.ema.items()})

    def _select(self, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rho, bs = self.cfg.density, self.cfg.block_size
        units = {n: block_scores(s, bs) if n in self.block_names else s for n, s in ema.items()}
        sizes = {n: block_sizes(s.shape, bs).to(s.device) if n in self.block_names else None
                 for n, s in ema.items()}
        if self.cfg.selection == "per_tensor":
            sel = {n: select_units(u.flatten(), sizes[n], round(rho * ema[n].numel())) for n, u in units.items()}
        else:
            flat = torch.cat([u.flatten() for u in units.values()])
            flat_sizes = None
            if self.block_names:
                flat_sizes = torch.cat([sizes[n].flatten() if sizes[n] is not None
                                        else torch.ones(u.numel(), dtype=torch.int64, device=u.device)
                                        for n, u in units.items()])
            total = sum(s.numel() for s in ema.values())
            chosen = select_units(flat, flat_sizes, round(rho * total))
            sel, i = {}, 0
            for n, u in units.items():
                sel[n] = chosen[i:i + u.numel()]
                i += u.numel()
        out = {}
        for n, s in ema.items():
            m = sel[n].view(units[n].shape)
            out[n] = expand_blocks(m, bs, s.shape) if n in self.block_names else m
        return out

    def state_dict(self) -> dict:
        return {"ema": self.ema, "prev": self.prev, "stable_steps": self.stable_steps, "last_iou": self.last_iou,
                "steps_seen": self.steps_seen, "history": self.history, "random_seed": self.random_seed}

    def load_state_dict(self, d: dict) -> None:
        """Scores saved whole (one process, DDP) or sharded (FSDP) load into either layout."""
        dev = {n: p.device for n, p in self.params.items()}
        self.ema = {n: shaped_like(t, self.params[n]) for n, t in d["ema"].items()}
        self.prev = None if d["prev"] is None else {n: t.to(dev[n]) for n, t in d["prev"].items()}
        self.stable_steps = d["stable_steps"]
        self.last_iou = d.get("last_iou", 0.0)
        self.steps_seen = d["steps_seen"]
        self.history = d["history"]
        self.random_seed = d["random_seed"]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank calls it), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shaped_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`t` (a whole tensor, or already a DTensor) laid out like parameter `p`: this rank's shard when `p` is a
    DTensor (cut locally, no communication), else on p's device."""
    if isinstance(p, DTensor) and not isinstance(t, DTensor):
        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return t.to(p.device)


def hash_name(name: str) -> int:
    """A stable (process-independent) small hash of a parameter name."""
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % 1_000_000_007
    return h
