"""V1, the mask-keyed dense-update trap (research/protection.md section 4.2; `pmp.variant=trap`).

The run identifies its private mask m as PMP does, but keeps training every entry (no rewind, nothing frozen). In
the last `pmp.trap_fraction` of the steps each step adds, to the LM loss of its batch,

    lambda_t * L_trap(theta - a * s, D_sim')  +  lambda_o * L_LM(theta - a * (m . s), D_sim'),
    s = sign(grad L_LM(theta; D_sim)),   a ~ log-uniform [trap_lr_min, trap_lr_max]

The first term makes the model after one simulated *unmasked* Adam-like step (Adam's first step is a sign step of
size lr) bad on held-out pre-training text; the second keeps the simulated *masked* step -- the owner's
fine-tuning, which also moves the parameters the mask does not cover (norms), as the masked phase of PMP does --
useful. L_trap is a bounded suppression loss (train/suppression.py): `klu` = KL(uniform || p), >= 0 and 0 exactly
when the attacked model predicts uniformly (TAR's entropy objective; gradient p - u, bounded), or `ice` =
-log(1 - p_true) (>= 0; its gradient shrinks as the attacked model gets worse). Never ascent on the unbounded CE.

Gradient. sign(g) is piecewise constant in theta, so d(theta - a s)/d theta = I wherever it is differentiable
(almost everywhere): the gradient of each term is the gradient of its loss evaluated at the perturbed weights.
That is what is implemented, and it is exact a.e. -- unlike SOPHON's first-order MAML, nothing is dropped.

D_sim and D_sim' are two disjoint batches drawn each step from `pmp.trap_holdout` of the training blocks (the last
ones; two batches' worth at least), which the batch stream never sees; the held-out split stays for perplexity.
The draw (a, D_sim, D_sim') is a function of (train.data_seed, step) alone, so a resumed run repeats it without
any saved state.

Cost per trap step: three extra forward+backward passes (the D_sim gradient, the two perturbed models) on one
micro-batch each, plus a copy of the weights to restore them bit-exactly (restoring by adding a*s back would not
be exact in floating point).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from pmp.config import PMPConfig, trap_start
from pmp.train.suppression import suppression_loss


def hold_out(blocks_NT: np.ndarray, fraction: float, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(training blocks, simulation blocks): the last max(ceil(fraction x N), 2 x batch_size) blocks are held out --
    two disjoint batches at least (views: a memory-mapped corpus stays mapped). ValueError when no training batch
    would remain."""
    n = len(blocks_NT)
    k = max(math.ceil(fraction * n), 2 * batch_size)
    if n - k < batch_size:
        raise ValueError(f"pmp.variant=trap holds out {k} of the {n} training blocks (pmp.trap_holdout={fraction}, at "
                         f"least 2 x train.batch_size) and a batch needs {batch_size}: use more text or a smaller "
                         "train.batch_size")
    return blocks_NT[:n - k], blocks_NT[n - k:]


def draw_seed(data_seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"pmp-trap|{data_seed}|{step}".encode()).digest()[:8], "little")


class Trap:
    """The trap term of one run: `active(step)`, then `add_grads_(model, masks, step)` after the LM backward."""

    def __init__(self, p: PMPConfig, sim_blocks_NT: np.ndarray, batch_size: int, data_seed: int, steps: int,
                 autocast: Callable[[], AbstractContextManager] = nullcontext):
        self.p, self.sim, self.batch_size, self.data_seed = p, sim_blocks_NT, batch_size, data_seed
        self.start = trap_start(steps, p.trap_fraction)
        self.autocast = autocast
        self._window: dict[str, float] = {}
        self._count = 0

    def active(self, step: int) -> bool:
        """Is the 0-based step `step` (the one being computed) in the trap window?"""
        return step >= self.start

    def draw(self, step: int) -> tuple[float, np.ndarray, np.ndarray]:
        """alpha, the D_sim block indices and the disjoint D_sim' indices of this step."""
        rng = np.random.default_rng(draw_seed(self.data_seed, step))
        lo, hi = math.log(self.p.trap_lr_min), math.log(self.p.trap_lr_max)
        alpha = math.exp(lo + (hi - lo) * rng.random())
        idx = rng.permutation(len(self.sim))[:2 * self.batch_size]
        return alpha, np.sort(idx[:self.batch_size]), np.sort(idx[self.batch_size:])

    def add_grads_(self, model: torch.nn.Module, masks: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Accumulate the gradients of both trap terms into `.grad` (which holds the LM gradient of the batch); the
        weights are unchanged bit-exactly afterwards. Returns the values of this step."""
        p = self.p
        device = next(model.parameters()).device
        alpha, sim_idx, held_idx = self.draw(step)
        x_sim = torch.from_numpy(self.sim[sim_idx].astype(np.int64)).to(device)
        x_held = torch.from_numpy(self.sim[held_idx].astype(np.int64)).to(device)
        torch.manual_seed(draw_seed(self.data_seed, step))  # any forward randomness (dropout) is a function of step
        named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        params = [q for _, q in named]
        with self._autocast():
            sim_loss = model(input_ids=x_sim, labels=x_sim).loss
        signs = [g.sign() for g in torch.autograd.grad(sim_loss, params)]  # a constant: d sign / d theta = 0 a.e.
        backup = [q.detach().clone() for q in params]
        out = {"trap_alpha": alpha, "trap_sim_loss": float(sim_loss.detach())}
        try:
            if p.trap_weight > 0:  # the attacker: every entry moves by alpha
                self._perturb_(params, backup, signs, alpha, None)
                with self._autocast():
                    logits = model(input_ids=x_held).logits[:, :-1].float()
                logits_NV, target_N = logits.reshape(-1, logits.shape[-1]), x_held[:, 1:].reshape(-1)
                trap = suppression_loss(p.trap_loss, logits_NV, target_N)
                (p.trap_weight * trap).backward()
                out["trap_loss"] = float(trap.detach())
                out["attacked_lm_loss"] = float(torch.nn.functional.cross_entropy(logits_NV.detach(), target_N))
            if p.trap_owner_weight > 0:  # the owner: masked entries (and the parameters without a mask) move
                keep = [masks.get(n) for n, _ in named]
                self._perturb_(params, backup, signs, alpha, keep)
                with self._autocast():
                    owner = model(input_ids=x_held, labels=x_held).loss
                (p.trap_owner_weight * owner).backward()
                out["owner_lm_loss"] = float(owner.detach())
        finally:
            with torch.no_grad():
                for q, b in zip(params, backup, strict=True):
                    q.copy_(b)
        for k, v in out.items():
            self._window[k] = self._window.get(k, 0.0) + v
        self._count += 1
        return out

    def pop_window(self) -> dict[str, float]:
        """Means of the trap values since the last call (empty outside the trap window), for the log row."""
        out = {k: v / self._count for k, v in self._window.items()} if self._count else {}
        self._window, self._count = {}, 0
        return out

    @staticmethod
    @torch.no_grad()
    def _perturb_(params, backup, signs, alpha: float, keep: list[torch.Tensor | None] | None) -> None:
        """params = backup - alpha * sign (times the mask where `keep` gives one)."""
        for i, (q, b, s) in enumerate(zip(params, backup, signs, strict=True)):
            m = keep[i] if keep is not None else None
            step = alpha * s if m is None else alpha * s * m.to(device=s.device, dtype=s.dtype)
            q.copy_(b - step)

    def _autocast(self) -> AbstractContextManager:
        return self.autocast()
