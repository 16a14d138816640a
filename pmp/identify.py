"""Early-bird mask identification during the dense warm-up.

Every step: score each entry of each masked tensor (|grad| by default), smooth the scores with an EMA (raw
per-step scores are noisy: consecutive raw |grad| masks of a 4-layer Llama overlapped with IoU ~0.64 at rho 0.5,
so a 0.99 rule never fired), select the top rho fraction (globally or per tensor, ties broken by the lower
flat index so the mask is deterministic), and compare with the previous step's mask. Identification stops when
the IoU stays >= `iou_threshold` for `patience` consecutive steps (after `min_warmup_steps`), or at
`max_warmup_steps`.
"""

from __future__ import annotations

import secrets

import torch

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


def mask_iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


class MaskIdentifier:
    """Accumulates smoothed scores over warm-up steps and decides when the mask is stable."""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: PMPConfig):
        self.params = params
        self.cfg = cfg
        self.ema: dict[str, torch.Tensor] = {}
        self.prev: dict[str, torch.Tensor] | None = None
        self.stable_steps = 0
        self.steps_seen = 0
        self.history: list[dict] = []
        # The random control draws its scores once: it is a fixed random mask, not a moving target.
        self.random_seed = secrets.randbits(63)

    def _score(self, name: str, p: torch.nn.Parameter) -> torch.Tensor:
        s = self.cfg.scorer
        if s == "random":
            g = torch.Generator(device="cpu").manual_seed((self.random_seed + hash_name(name)) % 2**63)
            return torch.rand(p.shape, generator=g).to(p.device)
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
        mask = self.current_mask()
        iou = mask_iou(self.prev, mask) if self.prev is not None else 0.0
        self.stable_steps = self.stable_steps + 1 if iou >= self.cfg.iou_threshold else 0
        self.prev = mask
        self.steps_seen += 1
        stable = self.stable_steps >= self.cfg.patience and self.steps_seen >= self.cfg.min_warmup_steps
        at_max = self.steps_seen >= self.cfg.max_warmup_steps
        reason = "stable" if stable else ("max_warmup_steps" if at_max else None)
        rec = {"step": step, "iou": iou, "stable_steps": self.stable_steps, "done": reason is not None,
               "reason": reason}
        self.history.append({k: v for k, v in rec.items() if k != "done"})
        return rec

    def current_mask(self) -> dict[str, torch.Tensor]:
        rho = self.cfg.density
        if self.cfg.selection == "per_tensor":
            return {n: select_top(s.flatten(), round(rho * s.numel())).view(s.shape) for n, s in self.ema.items()}
        flat = torch.cat([s.flatten() for s in self.ema.values()])
        sel = select_top(flat, round(rho * flat.numel()))
        out, i = {}, 0
        for n, s in self.ema.items():
            out[n] = sel[i:i + s.numel()].view(s.shape)
            i += s.numel()
        return out

    def state_dict(self) -> dict:
        return {"ema": self.ema, "prev": self.prev, "stable_steps": self.stable_steps,
                "steps_seen": self.steps_seen, "history": self.history, "random_seed": self.random_seed}

    def load_state_dict(self, d: dict) -> None:
        dev = {n: p.device for n, p in self.params.items()}
        self.ema = {n: t.to(dev[n]) for n, t in d["ema"].items()}
        self.prev = None if d["prev"] is None else {n: t.to(dev[n]) for n, t in d["prev"].items()}
        self.stable_steps = d["stable_steps"]
        self.steps_seen = d["steps_seen"]
        self.history = d["history"]
        self.random_seed = d["random_seed"]


def hash_name(name: str) -> int:
    """A stable (process-independent) small hash of a parameter name."""
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % 1_000_000_007
    return h
