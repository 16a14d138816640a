"""Masked AdamW in two passes: the math in compact order over masked entries only, then a masked scatter.

Legend: R, C = 2-D view of the dense weight, N = nnz (canonical row-major order).

1. ``_adamw_compact_kernel``: a 1-D grid over the N compact entries. Every lane is a masked entry, loads and
   stores are contiguous (16-B vectors), and the sqrt/div math runs N times, not R*C times. The previous single
   pass walked the dense weight and did the full math on every lane, masked or not (~140 instructions per dense
   entry, 255 registers with spills, AOT sm_90a).
2. The dense write: a walk over the dense weight that stores only masked lanes, finding each entry's compact
   index from the bit mask (``routing``'s scatter kernel; each mask word loaded once per (row, word)).
   Without a compact master (fp32 dense weight, ``master=None``) pass 1 writes the update
   ``-step_size * m / denom`` to a transient fp32 [N] buffer and pass 2 applies ``p * decay + update``.

Bytes per masked entry: pass 1 reads master, grad, exp_avg, exp_avg_sq (16) and writes master, exp_avg,
exp_avg_sq (12); pass 2 re-reads the master (4) and writes the dense weight, plus the mask at 1/4 B per dense
entry. That is 4 B per entry more than a single fused pass (32 vs 28 + dense), the price of doing the math on
masked entries only. Dense writes land in whole 32-B sectors: at density 0.1, 81 % of the bf16 sectors are
touched, so the dense write costs about as much as a full dense bf16 write whatever the density.

Arithmetic follows torch's single-tensor AdamW in fp32 (decay, lerp-form first moment, IEEE sqrt/div), so it
agrees with the reference to a few ulp; scalars (decay factor, step size, bias corrections) are computed on the
host in double precision like torch does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mask_layout import MaskLayout
from .reference import check_adamw_args
from .routing import launch_scatter
from .triton_utils import check_device, elementwise_config, is_interpreting, tile_compact_index, tile_coords, tile_grid


@triton.jit
def _adamw_compact_kernel(
    master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, update_ptr,
    N,
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size,
    BLOCK: tl.constexpr, HAS_MASTER: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(grad_ptr + offs, mask=ok, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=ok, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=ok, other=0.0)
    m = m + one_minus_beta1 * (g - m)  # torch's lerp_(grad, 1 - beta1) for weights < 0.5
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    update = neg_step_size * tl.div_rn(m, denom)
    tl.store(exp_avg_ptr + offs, m, mask=ok)
    tl.store(exp_avg_sq_ptr + offs, v, mask=ok)
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=ok, other=0.0)
        tl.store(master_ptr + offs, p * decay + update, mask=ok)
    else:
        tl.store(update_ptr + offs, update, mask=ok)


@triton.jit
def _apply_update_kernel(
    dense_ptr, words_ptr, prefix_ptr, update_ptr,
    R, C, W,
    stride_dr, stride_w,
    decay,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # fp32 dense weight as its own master: p = p * decay + update at masked entries (torch's mul_ then addcdiv_)
    pid_r, pid_c = tile_coords(C, BLOCK_C)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    is_set, idx = tile_compact_index(words_ptr, prefix_ptr, offs_r, pid_c, R, W, stride_w, BLOCK_C, False)
    d_off = offs_r.to(tl.int64)[:, None] * stride_dr + offs_c[None, :]
    p = tl.load(dense_ptr + d_off, mask=is_set, other=0.0)
    u = tl.load(update_ptr + idx, mask=is_set, other=0.0)
    tl.store(dense_ptr + d_off, p * decay + u, mask=is_set)


def compact_config() -> dict:
    """Entries per program of the compact pass: 1024 = 8 per thread at 4 warps (two 16-B vectors per tensor).
    The interpreter gets 16k (its cost is per program)."""
    return dict(BLOCK=16384 if is_interpreting() else 1024, num_warps=4)


def masked_adamw_(
    dense: torch.Tensor,
    master: torch.Tensor | None,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    layout: MaskLayout,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> torch.Tensor:
    """One AdamW step on compact fp32 state; writes ``master`` (cast) into ``dense`` at masked positions."""
    check_adamw_args(dense, master, grad, exp_avg, exp_avg_sq, layout, step)
    check_device(*(t for t in (dense, master, grad, exp_avg, exp_avg_sq) if t is not None))
    if layout.nnz == 0:
        return dense
    one_minus_beta1 = 1.0 - beta1
    if one_minus_beta1 >= 0.5:
        # torch's lerp switches formula for weights >= 0.5; beta1 <= 0.5 is unusual, keep exact semantics anyway
        raise ValueError(f"fused masked AdamW assumes beta1 > 0.5 (got {beta1}); use PMP_KERNELS=torch")
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    decay = 1 - lr * weight_decay
    n = layout.nnz
    update = torch.empty(n, dtype=torch.float32, device=dense.device) if master is None else None
    cfg = compact_config()
    _adamw_compact_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
        master if master is not None else grad, grad, exp_avg, exp_avg_sq, update if update is not None else grad,
        n,
        decay, one_minus_beta1, beta2, 1 - beta2, bias_correction2**0.5, eps, -(lr / bias_correction1),
        **cfg, HAS_MASTER=master is not None,
    )
    dense_RC = dense.view(layout.rows, layout.cols)
    if master is not None:
        launch_scatter(dense_RC, master, layout)
        return dense
    ecfg = elementwise_config(layout.rows, layout.cols)
    _apply_update_kernel[tile_grid(layout.rows, layout.cols, ecfg["BLOCK_R"], ecfg["BLOCK_C"])](
        dense_RC, layout.words, layout.word_prefix, update,
        layout.rows, layout.cols, layout.words.shape[1],
        dense_RC.stride(0), layout.words.stride(0),
        decay,
        **ecfg,
    )
    return dense
