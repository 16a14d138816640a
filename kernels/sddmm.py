"""Masked weight gradient (SDDMM): dW = dY^T X sampled at the masked entries, written compactly.

Legend: T = tokens, O = output features (weight rows), I = input features (weight cols), N = nnz.

Two kernels, one output: fp32 [N] in canonical (row-major) order.
- Unstructured bit masks (``_sddmm_kernel``): nearly every tile holds a masked entry at 5-50 % density, so every
  (O, I) tile is computed densely in fp32 registers; the epilogue then stores only the masked entries at their
  compact index (word_prefix + popcount of the lower bits). The win is memory: no dense fp32 dW (64 MiB for a
  4096^2 layer) ever exists, and the write traffic is 4 B per masked entry instead of 4 B per entry + a gather.
- Block masks (``_block_sddmm_kernel``): the grid is the list of active tiles (row-panel order so dY panels
  stay in L2); empty tiles cost nothing. Inside an active tile every entry is masked and word boundaries
  align with tile boundaries, so the compact index is just ``word_prefix[r, c // 32] + c % 32`` (no word loads).
  A block's entries are not contiguous in the compact vector (canonical order is row-major over the whole
  weight), hence the per-row prefix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mask_layout import MaskLayout
from .reference import check_compact, flatten_tokens
from .triton_utils import check_device, compact_index, is_interpreting, upcast_flag


@triton.jit
def _dw_tile(
    dy_ptr, x_ptr,
    T,
    offs_m, offs_n, O, I,
    stride_dy_t, stride_dy_o, stride_x_t, stride_x_i,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] tile of dY^T X for weight rows offs_m and cols offs_n."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    for k0 in range(0, T, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = offs_k < T
        # dY^T tile loaded directly as [BLOCK_M, BLOCK_K] (strided view, no host transpose)
        a = tl.load(
            dy_ptr + offs_m64[:, None] * stride_dy_o + offs_k[None, :] * stride_dy_t,
            mask=(offs_m < O)[:, None] & k_ok[None, :], other=0.0,
        )
        b = tl.load(
            x_ptr + offs_k[:, None] * stride_x_t + offs_n64[None, :] * stride_x_i,
            mask=k_ok[:, None] & (offs_n < I)[None, :], other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _sddmm_kernel(
    dy_ptr, x_ptr, words_ptr, prefix_ptr, out_ptr,
    T, O, I,
    stride_dy_t, stride_dy_o, stride_x_t, stride_x_i, stride_w,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # grouped ordering: GROUP_M row tiles share X column panels in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(O, BLOCK_M)
    num_n = tl.cdiv(I, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _dw_tile(
        dy_ptr, x_ptr, T, offs_m, offs_n, O, I,
        stride_dy_t, stride_dy_o, stride_x_t, stride_x_i,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION,
    )
    in_bounds = (offs_m < O)[:, None] & (offs_n < I)[None, :]
    is_set, idx = compact_index(words_ptr, prefix_ptr, offs_m, offs_n, stride_w, in_bounds)
    tl.store(out_ptr + idx, acc, mask=is_set)


@triton.jit
def _block_sddmm_kernel(
    dy_ptr, x_ptr, blocks_ptr, prefix_ptr, out_ptr,
    T, O, I,
    stride_dy_t, stride_dy_o, stride_x_t, stride_x_i, stride_w,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    block_r = tl.load(blocks_ptr + 2 * pid)
    block_c = tl.load(blocks_ptr + 2 * pid + 1)
    offs_m = block_r * BLOCK + tl.arange(0, BLOCK)
    offs_n = block_c * BLOCK + tl.arange(0, BLOCK)
    acc = _dw_tile(
        dy_ptr, x_ptr, T, offs_m, offs_n, O, I,
        stride_dy_t, stride_dy_o, stride_x_t, stride_x_i,
        BLOCK, BLOCK, BLOCK_K, UPCAST, INPUT_PRECISION,
    )
    in_bounds = (offs_m < O)[:, None] & (offs_n < I)[None, :]
    w_off = offs_m.to(tl.int64)[:, None] * stride_w + (offs_n // 32)[None, :]
    prefix = tl.load(prefix_ptr + w_off, mask=in_bounds, other=0)
    idx = prefix.to(tl.int64) + (offs_n % 32)[None, :].to(tl.int64)
    tl.store(out_ptr + idx, acc, mask=in_bounds)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting (tf32 only if the user allowed it, like the reference);
    fp16/bf16 ignore it (tensor cores either way), so they keep triton's default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _tile_config(dtype: torch.dtype) -> dict:
    """Tile sizes. Interpreter: large tiles (per-program overhead dominates). GPU: the standard Hopper/Ampere
    GEMM tile; fp32 halves BLOCK_K to keep 3 stages in shared memory. Not yet tuned on a GPU."""
    if is_interpreting():
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _validate(dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout) -> tuple[torch.Tensor, torch.Tensor]:
    dy_TO, x_TI = flatten_tokens(dy, x, layout)
    if dy.dtype != x.dtype or dy.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dy and x must share a dtype among fp32/fp16/bf16, got {dy.dtype} and {x.dtype}")
    check_device(dy_TO, x_TI, layout.words)
    return dy_TO, x_TI


def _output(out: torch.Tensor | None, layout: MaskLayout, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(layout.nnz, dtype=torch.float32, device=device)
    check_compact(out, layout, "out")
    return out


def masked_weight_grad_unstructured(
    dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense tiles + masked compact epilogue; works for any layout (block layouts included)."""
    dy_TO, x_TI = _validate(dy, x, layout)
    (T, O), I = dy_TO.shape, x_TI.shape[1]
    out = _output(out, layout, dy.device)
    if layout.nnz == 0:
        return out
    if T == 0:
        return out.zero_()
    cfg = _tile_config(dy.dtype)
    grid = (triton.cdiv(O, cfg["BLOCK_M"]) * triton.cdiv(I, cfg["BLOCK_N"]),)
    _sddmm_kernel[grid](
        dy_TO, x_TI, layout.words, layout.word_prefix, out,
        T, O, I,
        dy_TO.stride(0), dy_TO.stride(1), x_TI.stride(0), x_TI.stride(1), layout.words.stride(0),
        UPCAST=upcast_flag(dy), INPUT_PRECISION=_input_precision(dy.dtype), **cfg,
    )
    return out


def masked_weight_grad_blocks(
    dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Grid over ``layout.active_blocks`` only (block layouts); empty tiles are skipped."""
    if not layout.block_size or layout.active_blocks is None:
        raise ValueError("masked_weight_grad_blocks needs a block layout (MaskLayout.from_bool(mask, block_size=64))")
    dy_TO, x_TI = _validate(dy, x, layout)
    (T, O), I = dy_TO.shape, x_TI.shape[1]
    out = _output(out, layout, dy.device)
    n_active = layout.active_blocks.shape[0]
    if layout.nnz == 0 or n_active == 0:
        return out
    if T == 0:
        return out.zero_()
    cfg = _tile_config(dy.dtype)
    _block_sddmm_kernel[(n_active,)](
        dy_TO, x_TI, layout.active_blocks, layout.word_prefix, out,
        T, O, I,
        dy_TO.stride(0), dy_TO.stride(1), x_TI.stride(0), x_TI.stride(1), layout.word_prefix.stride(0),
        BLOCK=layout.block_size, BLOCK_K=cfg["BLOCK_K"],
        UPCAST=upcast_flag(dy), INPUT_PRECISION=_input_precision(dy.dtype),
        num_warps=cfg["num_warps"] if layout.block_size >= 128 else 4, num_stages=cfg["num_stages"],
    )
    return out


def masked_weight_grad(
    dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(dy^T x) at the masked entries of a weight (O, I): fp32 [nnz], canonical order. Block layouts skip tiles.

    ``out``: optional preallocated contiguous fp32 [nnz] (e.g. the compact .grad); every entry is overwritten.
    """
    if layout.block_size:
        return masked_weight_grad_blocks(dy, x, layout, out)
    return masked_weight_grad_unstructured(dy, x, layout, out)
