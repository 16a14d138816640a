"""Bit-packed masks on the device: pack bool -> int32 words, unpack, per-row popcount.

Legend: R = rows, C = cols, W = ceil(C / 32) words per row. Bit j of word w of row r = entry (r, 32*w + j).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mask_layout import n_words, view_2d
from .triton_utils import check_device, is_interpreting, popc


@triton.jit
def _pack_kernel(
    mask_ptr, words_ptr,
    C, W, n_words_total,
    stride_mr, stride_wr,
    BLOCK: tl.constexpr,
):
    # one lane per word over the flattened [R, W] words: few programs even for many short rows
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r = offs // W
    w = offs % W
    bit = tl.arange(0, 32)
    offs_c = w[:, None] * 32 + bit[None, :]
    in_bounds = (offs < n_words_total)[:, None] & (offs_c < C)
    m = tl.load(mask_ptr + r[:, None] * stride_mr + offs_c, mask=in_bounds, other=0)
    lanes = (m != 0).to(tl.uint32) << bit[None, :].to(tl.uint32)
    # distinct powers of two: their sum is their OR (tl.reduce with a custom combine is ~100x slower interpreted)
    word = tl.sum(lanes, 1).to(tl.uint32).to(tl.int32, bitcast=True)
    tl.store(words_ptr + r * stride_wr + w, word, mask=offs < n_words_total)


@triton.jit
def _unpack_kernel(
    words_ptr, mask_ptr,
    C, n_total,
    stride_wr, stride_mr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r = offs // C
    c = offs % C
    in_bounds = offs < n_total
    word = tl.load(words_ptr + r * stride_wr + c // 32, mask=in_bounds, other=0).to(tl.uint32, bitcast=True)
    bit = (word >> (c % 32).to(tl.uint32)) & 1
    tl.store(mask_ptr + r * stride_mr + c, bit.to(tl.uint8), mask=in_bounds)


@triton.jit
def _row_popcount_kernel(
    words_ptr, out_ptr,
    R, W,
    stride_wr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        in_bounds = (offs_r < R)[:, None] & (offs_w < W)[None, :]
        word = tl.load(words_ptr + offs_r[:, None] * stride_wr + offs_w[None, :], mask=in_bounds, other=0)
        acc += popc(word)
    tl.store(out_ptr + offs_r, tl.sum(acc, 1), mask=offs_r < R)


# GPU launch configs (fixed, so the compile check covers every one); the interpreter shrinks them to the input
PACK_BLOCK, UNPACK_BLOCK, POPCOUNT_BLOCK_R, POPCOUNT_BLOCK_W = 256, 8192, 64, 128


def _block(limit: int, n: int) -> int:
    return min(limit, triton.next_power_of_2(n)) if is_interpreting() else limit


def _check_words(words: torch.Tensor) -> None:
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"words must be a 2-D int32 tensor, got {words.dtype} of shape {tuple(words.shape)}")
    if words.stride(1) != 1:
        raise ValueError("words must be contiguous along the last dim")
    check_device(words)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool mask of any shape (2-D view as in MaskLayout) -> int32 words [R, W]."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    check_device(mask)
    rows, cols = view_2d(mask.shape)
    mask_RC = mask.reshape(rows, cols).contiguous().view(torch.uint8)
    w = n_words(cols)
    words = torch.empty(rows, w, dtype=torch.int32, device=mask.device)
    if rows and w:
        total = rows * w
        block = _block(PACK_BLOCK, total)
        _pack_kernel[(triton.cdiv(total, block),)](
            mask_RC, words, cols, w, total, mask_RC.stride(0), words.stride(0), BLOCK=block
        )
    return words


def unpack_mask(words: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """int32 words [R, W] -> bool [R, C]."""
    _check_words(words)
    if tuple(words.shape) != (rows, n_words(cols)):
        raise ValueError(f"words of shape {tuple(words.shape)} cannot hold a ({rows}, {cols}) mask")
    out = torch.empty(rows, cols, dtype=torch.bool, device=words.device)
    if rows and cols:
        out_u8 = out.view(torch.uint8)
        total = rows * cols
        block = _block(UNPACK_BLOCK, total)
        _unpack_kernel[(triton.cdiv(total, block),)](
            words, out_u8, cols, total, words.stride(0), out_u8.stride(0), BLOCK=block
        )
    return out


def row_popcount(words: torch.Tensor) -> torch.Tensor:
    """Masked entries per row: int32 [R]."""
    _check_words(words)
    rows, w = words.shape
    out = torch.zeros(rows, dtype=torch.int32, device=words.device)
    if rows and w:
        block_w = _block(POPCOUNT_BLOCK_W, w)
        block_r = _block(POPCOUNT_BLOCK_R, rows)
        _row_popcount_kernel[(triton.cdiv(rows, block_r),)](
            words, out, rows, w, words.stride(0), BLOCK_R=block_r, BLOCK_W=block_w
        )
    return out
