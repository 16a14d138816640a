"""Shared Triton helpers: interpreter detection, popcount, the compact index of a tile of a bit-packed mask,
1-D tile grids and a small per-shape-bucket tuner.

Importing this module imports triton; ``pmp.kernels`` only does so when the dispatch picks Triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# CUDA caps grid axis 0 at 2**31 - 1 programs and axes 1 and 2 at 65,535: every launch here uses axis 0 only.
MAX_GRID_X = 2**31 - 1


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
def _popc_hw(x):
    """Hardware popcount (one POPC instruction instead of ~12 SWAR ops)."""
    return libdevice.popc(x.to(tl.int32, bitcast=True))


# The interpreter cannot run libdevice.popc; the choice is made at import, like triton's own jit/interpret switch.
popc = popcount32 if is_interpreting() else _popc_hw


@triton.jit
def tile_compact_index(words_ptr, prefix_ptr, offs_r, pid_c, R, W, stride_w, BLOCK_C: tl.constexpr,
                       TRANSPOSED: tl.constexpr):
    """(is_masked, int32 compact index) of the entries (offs_r[:, None], pid_c * BLOCK_C + [0, BLOCK_C)).

    Each (row, word) and its prefix is loaded once as a [BLOCK_R, BLOCK_C // 32] tile and broadcast to its 32
    entries (the per-entry version issued one word and one prefix load per entry: 128 scalar loads per thread
    in the dW epilogue, now 2 vector loads; AOT sm_90a). index = prefix[r, w] + popc(word[r, w] & ((1 << bit) -
    1)); int32 is enough because MaskLayout refuses nnz >= 2**31. Bits past the last column are zero (a
    MaskLayout invariant) and rows past R load word 0, so no column mask is needed. ``BLOCK_C`` must be a
    multiple of 32 and the tile must start on a word (pid_c * BLOCK_C % 32 == 0).

    ``TRANSPOSED``: return [BLOCK_C, BLOCK_R] tensors (column-major tile). Triton lays a store whose addresses it
    cannot analyse with lanes along dim 0, so a transposed store puts a warp's lanes on 32 consecutive columns of
    one row: consecutive compact indices, i.e. contiguous stores.
    """
    NW: tl.constexpr = BLOCK_C // 32
    BLOCK_R: tl.constexpr = offs_r.shape[0]
    offs_w = pid_c * NW + tl.arange(0, NW)
    if TRANSPOSED:
        w_ok = (offs_w < W)[:, None] & (offs_r < R)[None, :]
        w_off = offs_w[:, None] + offs_r.to(tl.int64)[None, :] * stride_w
    else:
        w_ok = (offs_r < R)[:, None] & (offs_w < W)[None, :]
        w_off = offs_r.to(tl.int64)[:, None] * stride_w + offs_w[None, :]
    word = tl.load(words_ptr + w_off, mask=w_ok, other=0).to(tl.uint32, bitcast=True)
    prefix = tl.load(prefix_ptr + w_off, mask=w_ok, other=0)
    if TRANSPOSED:  # [NW, 32, BLOCK_R] -> [BLOCK_C, BLOCK_R]
        bit = tl.arange(0, 32).to(tl.uint32)[None, :, None]
        word3 = word[:, None, :]
        prefix3 = prefix[:, None, :]
        shape: tl.constexpr = (BLOCK_C, BLOCK_R)
    else:  # [BLOCK_R, NW, 32] -> [BLOCK_R, BLOCK_C]
        bit = tl.arange(0, 32).to(tl.uint32)[None, None, :]
        word3 = word[:, :, None]
        prefix3 = prefix[:, :, None]
        shape: tl.constexpr = (BLOCK_R, BLOCK_C)
    is_set = ((word3 >> bit) & 1) != 0
    below = word3 & ((tl.full(bit.shape, 1, tl.uint32) << bit) - 1)
    idx = prefix3 + popc(below)
    return tl.reshape(is_set, shape), tl.reshape(idx, shape)


@triton.jit
def tile_coords(C, BLOCK_C: tl.constexpr):
    """(row tile, column tile) of this program in a 1-D grid over row-major [BLOCK_R, BLOCK_C] tiles."""
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    return pid // n_c, pid % n_c


def elementwise_config(rows: int, cols: int) -> dict:
    """[BLOCK_R, BLOCK_C] tile and warps for the kernels that walk a dense tensor through its bit mask.

    GPU: 4096 entries per program (16 per thread). Row segments of 1024 entries (32 words) keep each
    row's compact slice contiguous (about 100 masked entries at density 0.1) so compact loads/stores coalesce;
    narrow tensors take 128-wide tiles, 1-D tensors ((1, n) views) one row. The menu is small on purpose: the
    compile check (``compile_check.py``) compiles each entry (:func:`elementwise_menu`). The interpreter gets
    bigger tiles because its cost is per program.
    """
    if is_interpreting():
        block_c = min(1024, max(32, triton.next_power_of_2(cols)))
        block_r = max(1, min(triton.next_power_of_2(rows), 16384 // block_c))
        return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    block_c = 1024 if cols > 256 else 128
    if rows == 1:
        return dict(BLOCK_R=1, BLOCK_C=block_c, num_warps=4)
    # 4096 entries on 8 warps: at 4 warps the bf16 gather spilled 20 B (AOT sm_90a); 8 warps need <= 64 registers
    return dict(BLOCK_R=4096 // block_c, BLOCK_C=block_c, num_warps=8)


def elementwise_menu() -> list[dict]:
    """Every tile :func:`elementwise_config` can return on a GPU."""
    return [dict(BLOCK_R=r, BLOCK_C=c, num_warps=w) for r, c, w in ((1, 1024, 4), (4, 1024, 8), (1, 128, 4),
                                                                     (32, 128, 8))]


def tile_grid(rows: int, cols: int, block_r: int, block_c: int) -> tuple[int]:
    """1-D grid over row-major [block_r, block_c] tiles (decoded by :func:`tile_coords`).

    A 2-D grid would put cdiv(cols, block_c) on axis 1, which CUDA caps at 65,535: a 1-D tensor over ~67 M
    entries could not launch with 1024-wide tiles.
    """
    if cols >= 2**31:
        raise ValueError(f"{cols} columns in the 2-D view: kernels index columns in int32 (at most 2**31 - 1)")
    n = triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c)
    if n > MAX_GRID_X:
        raise ValueError(f"{n} tiles exceed CUDA's grid limit of {MAX_GRID_X} programs")
    return (n,)


def shape_bucket(n: int, lo: int = 256, hi: int = 1 << 16) -> int:
    """Power-of-two bucket of a size, clamped to [lo, hi]: the tuner's key, so nearby shapes share a choice."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


class Tuner:
    """Fastest of several launch configs per key, timed once per key on the GPU (``triton.testing.do_bench``).

    Keys are bucketed shapes plus dtypes, so a training run tunes each layer shape once. A single config is
    returned without timing (always the case under the interpreter, whose do_bench has no device). Every config
    must overwrite the whole output: the timing launches write it several times.
    """

    def __init__(self) -> None:
        self.best: dict[tuple, dict] = {}
        self.timings: dict[tuple, list[tuple[dict, float]]] = {}  # (config, median ms) per key, for reports

    def pick(self, key: tuple, configs: Sequence[dict], launch: Callable[[dict], object]) -> dict:
        if len(configs) == 1:
            return configs[0]
        if key not in self.best:
            ms = [triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=25) for c in configs]
            self.timings[key] = list(zip(configs, ms))
            self.best[key] = configs[min(range(len(configs)), key=ms.__getitem__)]
        return self.best[key]
