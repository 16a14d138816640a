"""Mask-recovery attacks from the curvature of the LM loss on the attacker's text: the Hessian diagonal by
Hutchinson's estimator.

Why curvature could betray the mask: PMP chose the masked entries for their large |gradient| during warm-up and
trained only them, so the released weights sit near a minimum of the training loss along the masked coordinates and
nowhere in particular along the frozen complement. The loss is curved most along coordinates that carry much signal
(a weight W[o, i] of a linear layer has d2L/dW[o,i]^2 ~ sum_t x_ti^2 * d2L/dy_to^2: large where its input channel is
active and its output matters), which is also where gradients were large when the mask was identified.

The estimator (Hutchinson 1990; AdaHessian, PyHessian): for a Rademacher vector z (independent entries +-1),
E[z * (H z)] = diag H because E[z_i z_j] = [i == j]. H z is a Hessian-vector product by double backprop: g = dL/dw
with a graph (create_graph), then H z = d(g . z)/dw. After K probes the error of entry i is
(1/K) sum_k sum_{j != i} H_ij z_ki z_kj: zero mean, standard deviation sqrt(sum_{j != i} H_ij^2 / K) (sub-Gaussian),
so an entry whose row of H is dominated by its diagonal is read with a few probes, while a small diagonal in a
strongly coupled row stays noise at any K an audit can afford. Attacks (higher = "trained"):
  `hessian_diag`     |mean over probes and batches of z * (H z)|: the Hessian-diagonal magnitude;
  `hessian_row`      mean of (H z)^2, an unbiased estimate of sum_j H_ij^2 = ||H[i, :]||^2 (E[z_j z_l] = [j == l]):
                     how strongly entry i's gradient moves when all weights are jiggled; always >= 0 and without
                     the sign noise of the diagonal estimate, from the same Hessian-vector products;
  `hessian_diag_fd`  (when fd_eps > 0) the same Hutchinson estimate with H z taken by central differences of
                     gradients, (g(w + eps z) - g(w - eps z)) / (2 eps) = H z + O(eps^2): no double backprop, the
                     same probes z, a check of the exact products (and usable where double backprop is not).

The fused attention kernels (CPU flash, CUDA flash / memory-efficient SDPA) have no double backward, so the loss is
evaluated with the math SDPA backend. Memory: the graph of the gradient is kept across the probes of a batch,
about 2-3x the activations of a training step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from pmp.eval.release_weights import Release, Scores

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # named weights -> scalar loss at those weights


@dataclass
class HutchinsonSums:
    """Sums over probes z (not yet divided by `probes`) for the Hessian H of one loss."""
    diag: dict[str, torch.Tensor]  # sum of z * (H z): E = diag H
    row: dict[str, torch.Tensor]  # sum of (H z)^2: E = sum_j H_ij^2
    diag_fd: dict[str, torch.Tensor] | None  # sum of z * (finite-difference H z), when fd_eps > 0
    probes: int  # probes used (fewer than asked when the deadline came first; at least 1)


def rademacher(params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One probe: independent +-1 entries of each parameter's shape, dtype and device (drawn on CPU by
    `generator`, so a seed gives the same probes on every device)."""
    return {n: (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype)
            for n, p in params.items()}


def hutchinson(loss_fn: LossFn, params: dict[str, torch.Tensor], probes: int, generator: torch.Generator,
               fd_eps: float = 0.0, t_end: float = math.inf) -> HutchinsonSums:
    """Hutchinson sums of `probes` Rademacher probes for the Hessian of `loss_fn` with respect to `params` (leaf
    tensors that require grad), at `params`. H z by double backprop; with `fd_eps` > 0 also by central differences
    of gradients at params +- fd_eps * z. Stops after the probe that ends past `t_end` (at least one probe)."""
    if probes < 1:
        raise ValueError(f"Hutchinson needs at least 1 probe vector, got {probes}")
    if not (fd_eps >= 0 and math.isfinite(fd_eps)):
        raise ValueError(f"the finite-difference step must be finite and >= 0 (0 = off), got {fd_eps}")
    names = list(params)
    grads = torch.autograd.grad(loss_fn(params), [params[n] for n in names], create_graph=True, allow_unused=True)
    linked = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # the rest have H z = 0 rows
    sums = HutchinsonSums({n: torch.zeros_like(p) for n, p in params.items()},
                          {n: torch.zeros_like(p) for n, p in params.items()},
                          {n: torch.zeros_like(p) for n, p in params.items()} if fd_eps > 0 else None, 0)
    for _ in range(probes):
        z = rademacher(params, generator)
        hz = dict.fromkeys(names)
        if linked:
            dot = sum((grads[i] * z[names[i]]).sum() for i in linked)
            hz = dict(zip(names, torch.autograd.grad(dot, [params[n] for n in names], retain_graph=True,
                                                     allow_unused=True), strict=True))
        for n in names:
            if hz[n] is not None:
                sums.diag[n] += z[n] * hz[n]
                sums.row[n] += hz[n] ** 2
        if sums.diag_fd is not None:
            for n, h in _fd_hvp(loss_fn, params, z, fd_eps).items():
                sums.diag_fd[n] += z[n] * h
        sums.probes += 1
        if time.perf_counter() > t_end:
            break
    return sums


def _fd_hvp(loss_fn: LossFn, params: dict[str, torch.Tensor], z: dict[str, torch.Tensor],
            eps: float) -> dict[str, torch.Tensor]:
    """H z ~ (g(w + eps z) - g(w - eps z)) / (2 eps), error O(eps^2): two gradients, no double backprop."""
    def grad_at(sign: float) -> dict[str, torch.Tensor]:
        w = {n: (p.detach() + sign * eps * z[n]).requires_grad_() for n, p in params.items()}
        g = torch.autograd.grad(loss_fn(w), list(w.values()), allow_unused=True)
        return {n: torch.zeros_like(w[n]) if gi is None else gi for n, gi in zip(w, g, strict=True)}
    plus, minus = grad_at(1.0), grad_at(-1.0)
    return {n: (plus[n] - minus[n]) / (2 * eps) for n in params}


def lm_loss_fn(model: torch.nn.Module, x: torch.Tensor) -> LossFn:
    """The model's LM loss on token block `x` as a function of its named weights (`torch.func.functional_call`:
    the model's own parameters are never written, so the release stays bit-exact)."""
    return lambda w: functional_call(model, w, args=(), kwargs={"input_ids": x, "labels": x}).loss


def curvature_scores(release: Release, batches: list[torch.Tensor], probes: int, fd_eps: float = 0.0,
                     max_seconds: float = 0.0, seed: int = 0) -> tuple[dict[str, Scores], dict]:
    """The curvature attacks (`hessian_diag`, `hessian_row`, and `hessian_diag_fd` when `fd_eps` > 0) on the
    attacker's token `batches` at the released weights: `probes` Rademacher probes per batch (the probes of every
    batch pooled, which estimates the Hessian of the mean loss over the batches). Stops at the probe that ends
    past `max_seconds` (0 = no limit), after at least one probe of the first batch."""
    if probes < 1:
        raise ValueError(f"the curvature attack needs at least 1 probe vector per batch, got {probes}")
    if not batches:
        raise ValueError("the curvature attack needs at least one batch of attacker text")
    t0 = time.perf_counter()
    t_end = t0 + max_seconds if max_seconds else math.inf
    model = release.model
    params = {n: p for n, p in model.named_parameters() if n in release.weights}
    g = torch.Generator().manual_seed(seed)
    total: HutchinsonSums | None = None
    used = 0
    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        for x in batches:
            s = hutchinson(lm_loss_fn(model, x), params, probes, g, fd_eps, t_end)
            total = s if total is None else _add(total, s)
            used += 1
            if time.perf_counter() > t_end:
                break
    assert total is not None
    k = total.probes
    out: dict[str, Scores] = {"hessian_diag": {n: (d / k).abs() for n, d in total.diag.items()},
                              "hessian_row": {n: r / k for n, r in total.row.items()}}
    if total.diag_fd is not None:
        out["hessian_diag_fd"] = {n: (d / k).abs() for n, d in total.diag_fd.items()}
    return out, {"batches": used, "probes": k, "probes_per_batch": probes, "fd_eps": fd_eps,
                 "tokens": int(sum(b.numel() for b in batches[:used])), "seconds": time.perf_counter() - t0,
                 "probe_seed": seed}


def _add(a: HutchinsonSums, b: HutchinsonSums) -> HutchinsonSums:
    for mine, theirs in ((a.diag, b.diag), (a.row, b.row), (a.diag_fd, b.diag_fd)):
        if mine is not None and theirs is not None:
            for n in mine:
                mine[n] += theirs[n]
    a.probes += b.probes
    return a
