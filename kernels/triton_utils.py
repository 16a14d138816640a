"""Shared Triton helpers: interpreter detection, popcount and the compact-index epilogue of bit-packed masks.

Importing this module imports triton; ``pmp.kernels`` only does so when the dispatch picks Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def is_interpreting() -> bool:
    """True when triton runs kernels in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_flag(*tensors: torch.Tensor) -> bool:
    """UPCAST constexpr: load bf16 as fp32 before any math; the interpreter's bf16 math/dot is wrong (KERNELS.md)."""
    return is_interpreting() and any(t.dtype == torch.bfloat16 for t in tensors)


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    for t in tensors:
        if not t.is_cuda and not is_interpreting():
            raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); got {t.device}")


@triton.jit
def popcount32(x):
    """Set bits of each 32-bit lane (SWAR, no multiply so nothing overflows; the interpreter has no popc)."""
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return (x & 0x3F).to(tl.int32)


@triton.jit
def compact_index(words_ptr, prefix_ptr, offs_r, offs_c, stride_w, in_bounds):
    """(is_masked, compact index as int64) of entries (offs_r[:, None], offs_c[None, :]) of a bit-packed mask.

    index = word_prefix[r, c // 32] + popcount(word[r, c // 32] & ((1 << c % 32) - 1)). ``stride_w`` is the row
    stride of both words and word_prefix (both are contiguous [rows, W]). Loads of the same word by 32 lanes
    hit L1; the alternative (int32 index per entry) reads 4 B per masked entry instead of 1/4 B per entry.
    """
    w_off = offs_r.to(tl.int64)[:, None] * stride_w + (offs_c // 32)[None, :]
    word = tl.load(words_ptr + w_off, mask=in_bounds, other=0).to(tl.uint32, bitcast=True)
    prefix = tl.load(prefix_ptr + w_off, mask=in_bounds, other=0)
    bit = (offs_c % 32).to(tl.uint32)[None, :]
    is_set = ((word >> bit) & 1) != 0
    below = word & ((tl.full(bit.shape, 1, tl.uint32) << bit) - 1)
    idx = prefix.to(tl.int64) + popcount32(below).to(tl.int64)
    return is_set & in_bounds, idx


def elementwise_tiles(rows: int, cols: int) -> dict:
    """[BLOCK_R, BLOCK_C] tiles for the kernels that walk a dense tensor through its bit mask.

    Long row segments (up to 1024 entries = 32 words) keep each row's compact slice contiguous (about
    100 masked entries per segment at density 0.1), so compact loads/stores coalesce. The interpreter gets
    bigger tiles because its cost is per program.
    """
    block_c = min(1024, max(32, triton.next_power_of_2(cols)))
    target = 16384 if is_interpreting() else 4096
    block_r = max(1, min(triton.next_power_of_2(rows), target // block_c))
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
