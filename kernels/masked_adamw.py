"""Fused masked AdamW: one pass over compact fp32 state that also writes the new weights into the dense tensor.

Legend: R, C = 2-D view of the dense weight, N = nnz (canonical row-major order).

Finding dense positions: the kernel walks the dense weight in [BLOCK_R, BLOCK_C] tiles and derives each masked
entry's compact index from the bit mask (word_prefix + popcount of the lower bits), like ``routing.py``.
Bytes per masked entry: 16 read (master, grad, exp_avg, exp_avg_sq) + 12 written (master, exp_avg, exp_avg_sq)
+ 2 or 4 for the dense weight (bf16/fp32) = 30-32 B, plus the mask at 1/4 B per dense entry (words +
word_prefix), i.e. +2.5 B per masked entry at density 0.1. A precomputed int32 position per masked entry would
cost 4 B instead, so the bit mask is cheaper for any density above 1/16 and needs no extra state. (Random-mask
dense writes touch most 32 B sectors at density >= 0.1: the dense write is the same for any approach.)

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
from .triton_utils import check_device, compact_index, elementwise_tiles


@triton.jit
def _masked_adamw_kernel(
    dense_ptr, master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, words_ptr, prefix_ptr,
    R, C,
    stride_dr, stride_w,
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASTER: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_bounds = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    is_set, idx = compact_index(words_ptr, prefix_ptr, offs_r, offs_c, stride_w, in_bounds)

    d_off = offs_r.to(tl.int64)[:, None] * stride_dr + offs_c[None, :]
    if HAS_MASTER:
        p = tl.load(master_ptr + idx, mask=is_set, other=0.0)
    else:  # fp32 dense weight is its own master
        p = tl.load(dense_ptr + d_off, mask=is_set, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + idx, mask=is_set, other=0.0)
    m = tl.load(exp_avg_ptr + idx, mask=is_set, other=0.0)
    v = tl.load(exp_avg_sq_ptr + idx, mask=is_set, other=0.0)

    p = p * decay
    m = m + one_minus_beta1 * (g - m)  # torch's lerp_(grad, 1 - beta1) for weights < 0.5
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + neg_step_size * tl.div_rn(m, denom)

    if HAS_MASTER:
        tl.store(master_ptr + idx, p, mask=is_set)
    tl.store(exp_avg_ptr + idx, m, mask=is_set)
    tl.store(exp_avg_sq_ptr + idx, v, mask=is_set)
    tl.store(dense_ptr + d_off, p.to(dense_ptr.dtype.element_ty), mask=is_set)


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
    """One fused AdamW step on compact fp32 state; writes ``master`` (cast) into ``dense`` at masked positions."""
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
    dense_RC = dense.view(layout.rows, layout.cols)
    cfg = elementwise_tiles(layout.rows, layout.cols)
    grid = (triton.cdiv(layout.rows, cfg["BLOCK_R"]), triton.cdiv(layout.cols, cfg["BLOCK_C"]))
    _masked_adamw_kernel[grid](
        dense_RC, dense_RC if master is None else master, grad, exp_avg, exp_avg_sq, layout.words, layout.word_prefix,
        layout.rows, layout.cols,
        dense_RC.stride(0), layout.words.stride(0),
        1 - lr * weight_decay, one_minus_beta1, beta2, 1 - beta2, bias_correction2**0.5, eps,
        -(lr / bias_correction1),
        **cfg, HAS_MASTER=master is not None,
    )
    return dense
