"""MaskedAdamW: AdamW whose state exists only for masked entries, stepping the dense weight in place.

For each masked tensor the state is the compact fp32 first and second moments (and an fp32 master only when
the dense weight is not fp32); each step reads the compact gradient, updates the moments and writes the new
values into the dense weight at masked positions. Parameters trained densely (outside the mask's scope) get the
same AdamW arithmetic on their full tensors. Semantics match torch.optim.AdamW (decoupled weight decay,
bias-corrected moments), which the tests check step by step.

All tensors of a param group that take the same step go to one `pmp.kernels.masked_adamw_multi_` call: on CUDA
a constant number of Triton launches for the whole group (one compact pass, one dense write per dense dtype and
tile shape) with launch tables cached per group; elsewhere the torch reference, tensor by tensor, exactly as a
per-tensor `masked_adamw_` loop. The state format (per parameter: step, exp_avg, exp_avg_sq, master) is the
same either way.
"""

from __future__ import annotations

import torch

from pmp.kernels import AdamWEntry, gather_compact, masked_adamw_multi_
from pmp.masked_state import MaskedModel


class MaskedAdamW(torch.optim.Optimizer):
    def __init__(self, masked: MaskedModel, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(masked.param_groups(weight_decay), {"lr": lr, "betas": betas, "eps": eps,
                                                              "weight_decay": weight_decay})
        self._masked = {id(t.compact): t for t in masked.tensors}
        self._plans: dict[int, dict] = {}  # launch-plan cache of the Triton multi-tensor step, per param group

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                     "weight_decay": group["weight_decay"]}
            by_step: dict[int, list[AdamWEntry]] = {}  # the bias correction is per step: one call per step value
            for p in group["params"]:
                if p.grad is None:
                    continue
                t = self._masked.get(id(p))
                state = self.state[p]
                if not state:
                    n = t.layout.nnz if t is not None else None
                    shape = (n,) if t is not None else p.shape
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    if t is not None and not t.has_master and t.dense.dtype != torch.float32:
                        state["master"] = gather_compact(t.dense.detach(), t.layout, dtype=torch.float32)
                state["step"] += 1
                if t is None:
                    entry = AdamWEntry(p, None, p.grad, state["exp_avg"], state["exp_avg_sq"], None)
                else:
                    master = t.compact.data if t.has_master else state.get("master")
                    entry = AdamWEntry(t.dense.data, master, p.grad.contiguous(), state["exp_avg"],
                                       state["exp_avg_sq"], t.layout)
                by_step.setdefault(state["step"], []).append(entry)
            plans = self._plans.setdefault(gi, {})
            for step, entries in by_step.items():
                masked_adamw_multi_(entries, step=step, cache=plans, **hyper)
        return loss
