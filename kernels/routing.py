"""Gradient routing: compact [N] <-> dense (masked positions only), in canonical row-major order.

Legend: R, C = 2-D view of the dense tensor (see ``mask_layout.py``), N = nnz.

Both kernels walk the dense tensor in [BLOCK_R, BLOCK_C] tiles (a 1-D grid, so no CUDA axis limit applies) and
find each masked entry's compact index from the bit mask (word_prefix + popcount, each word loaded once and
broadcast), so no int64 index (8 B per masked entry) is ever read: the mask costs 1/4 B per dense entry (words +
word_prefix), i.e. 2.5 B per masked entry at density 0.1. Entries outside the mask are never loaded or stored
(masked lanes), so the complement stays bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mask_layout import MaskLayout
from .reference import check_compact, check_layout_for
from .triton_utils import check_device, elementwise_config, tile_compact_index, tile_coords, tile_grid


@triton.jit
def _gather_kernel(
    dense_ptr, words_ptr, prefix_ptr, out_ptr,
    R, C, W,
    stride_dr, stride_w,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, pid_c = tile_coords(C, BLOCK_C)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    is_set, idx = tile_compact_index(words_ptr, prefix_ptr, offs_r, pid_c, R, W, stride_w, BLOCK_C, False)
    d_off = offs_r.to(tl.int64)[:, None] * stride_dr + offs_c[None, :]
    v = tl.load(dense_ptr + d_off, mask=is_set)
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=is_set)


@triton.jit
def _scatter_kernel(
    dense_ptr, words_ptr, prefix_ptr, values_ptr,
    R, C, W,
    stride_dr, stride_w,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, pid_c = tile_coords(C, BLOCK_C)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    is_set, idx = tile_compact_index(words_ptr, prefix_ptr, offs_r, pid_c, R, W, stride_w, BLOCK_C, False)
    v = tl.load(values_ptr + idx, mask=is_set)
    d_off = offs_r.to(tl.int64)[:, None] * stride_dr + offs_c[None, :]
    tl.store(dense_ptr + d_off, v.to(dense_ptr.dtype.element_ty), mask=is_set)


def launch_scatter(dense_RC: torch.Tensor, values: torch.Tensor, layout: MaskLayout) -> None:
    """Launch the scatter kernel (no checks): dense_RC [R, C] with unit column stride, values [nnz]."""
    cfg = elementwise_config(layout.rows, layout.cols)
    _scatter_kernel[tile_grid(layout.rows, layout.cols, cfg["BLOCK_R"], cfg["BLOCK_C"])](
        dense_RC, layout.words, layout.word_prefix, values,
        layout.rows, layout.cols, layout.words.shape[1],
        dense_RC.stride(0), layout.words.stride(0),
        **cfg,
    )


def gather_compact(
    dense: torch.Tensor, layout: MaskLayout, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked entries of ``dense`` in canonical order: [nnz] of ``dtype`` (default dense.dtype, or out's)."""
    check_layout_for(dense, layout, "dense")
    check_device(dense)
    if out is None:
        out = torch.empty(layout.nnz, dtype=dtype or dense.dtype, device=dense.device)
    else:
        check_compact(out, layout, "out", dtype=dtype)
    if layout.nnz == 0:
        return out
    dense_RC = dense.reshape(layout.rows, layout.cols)
    if dense_RC.stride(1) != 1:
        dense_RC = dense_RC.contiguous()
    cfg = elementwise_config(layout.rows, layout.cols)
    _gather_kernel[tile_grid(layout.rows, layout.cols, cfg["BLOCK_R"], cfg["BLOCK_C"])](
        dense_RC, layout.words, layout.word_prefix, out,
        layout.rows, layout.cols, layout.words.shape[1],
        dense_RC.stride(0), layout.words.stride(0),
        **cfg,
    )
    return out


def scatter_compact_(dense: torch.Tensor, values: torch.Tensor, layout: MaskLayout) -> torch.Tensor:
    """Write ``values`` [nnz] (cast to dense.dtype) into ``dense`` at masked positions, in place; returns dense."""
    check_layout_for(dense, layout, "dense")
    check_compact(values, layout, "values", dtype=None)
    if not dense.is_contiguous():
        raise ValueError("dense must be contiguous to be updated in place")
    check_device(dense, values)
    if layout.nnz == 0:
        return dense
    launch_scatter(dense.view(layout.rows, layout.cols), values, layout)
    return dense
