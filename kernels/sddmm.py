"""Masked weight gradient (SDDMM): dW = dY^T X sampled at the masked entries, written compactly.

Legend: T = tokens, O = output features (weight rows), I = input features (weight cols), N = nnz.

Two kernels, one output: fp32 [N] in canonical (row-major) order.
- Unstructured bit masks (``_sddmm_kernel``): nearly every tile holds a masked entry at 5-50 % density, so every
  (O, I) tile is computed densely in fp32 registers; the epilogue then stores only the masked entries at their
  compact index (word_prefix + popcount of the lower bits). The win is memory: no dense fp32 dW (64 MiB for a
  4096^2 layer) ever exists, and the write traffic is 4 B per masked entry instead of 4 B per entry + a gather.
  The launch config is tuned per (dtype, shape bucket) on the GPU (``dw_configs``); the candidates include a
  fallback that runs cuBLAS with fp32 output over 16 MiB row panels and gathers each panel (``_dw_panels``),
  so the dispatch uses it exactly where it measures faster.
- Block masks (``_block_sddmm_kernel``): the grid is the list of active tiles (row-panel order so dY panels
  stay in L2); empty tiles cost nothing. Inside an active tile every entry is masked, so a tile row is one
  contiguous compact run starting at ``word_prefix[r, c0 // 32]``: one prefix load per row, no word loads.
  A block's entries are not contiguous in the compact vector (canonical order is row-major over the whole
  weight), hence the per-row prefix.

Split-K (both kernels): a grid below 2 x SMs leaves SMs idle (base125m's 768-wide layers: 36-144 tiles on 132
SMs), so the token dimension can be cut into S slices; program (slice, tile) writes its fp32 partial tile into row
s of a workspace [S, N] and a second pass sums the rows in slice order. That is deterministic (bit-reproducible
gradients), unlike fp32 atomics into the output, at the price of S x 4 B per masked entry written and read once.
The slice is a runtime argument, so the no-split launch is the same binary. The tuner times ``auto_split_k``
slices against no split per shape bucket; ``split_k=`` forces a value (tests, benchmarks).

Nothing here has been timed on a GPU yet: configs are chosen to compile within shared memory and without
spills for sm_90a and sm_80 (``compile_check.py``), and the tuner picks among them by measurement.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mask_layout import MaskLayout
from .reference import check_compact, flatten_tokens
from .routing import _gather_kernel
from .triton_utils import (
    Tuner,
    check_device,
    elementwise_config,
    is_interpreting,
    shape_bucket,
    tile_compact_index,
    tile_grid,
    upcast_flag,
)


@triton.jit
def _dw_tile(
    dy_ptr, x_ptr,
    k_lo, k_hi,
    offs_m, offs_n, O, I,
    stride_dy_t, stride_dy_o, stride_x_t, stride_x_i,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] tile of dY^T X for weight rows offs_m and cols offs_n, over tokens [k_lo, k_hi)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = offs_k < k_hi
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
def _token_slice(pid, n_tiles, T, N, K_SLICE):
    """(tile, first token, end token, output offset) of a program of a split-K grid: slice-major (pid = slice *
    n_tiles + tile), so the programs of one slice keep the no-split tile order (and its L2 reuse). Slice s covers
    tokens [s * K_SLICE, min(T, (s + 1) * K_SLICE)) and writes row s of the fp32 workspace [S, N]. Without a split
    (grid = n_tiles, K_SLICE >= T) this is (pid, 0, T, 0): one binary for both, so the compile check covers both."""
    pid_k = pid // n_tiles
    k_lo = pid_k * K_SLICE
    return pid % n_tiles, k_lo, min(T, k_lo + K_SLICE), pid_k.to(tl.int64) * N


@triton.jit
def _sddmm_kernel(
    dy_ptr, x_ptr, words_ptr, prefix_ptr, out_ptr,
    T, O, I, W, N, K_SLICE,
    stride_dy_t, stride_dy_o, stride_x_t, stride_x_i, stride_w,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    CONTIGUOUS_STORES: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    num_m = tl.cdiv(O, BLOCK_M)
    num_n = tl.cdiv(I, BLOCK_N)
    pid, k_lo, k_hi, out_off = _token_slice(tl.program_id(0), num_m * num_n, T, N, K_SLICE)
    out_ptr += out_off
    # grouped ordering: GROUP_M row tiles share X column panels in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _dw_tile(
        dy_ptr, x_ptr, k_lo, k_hi, offs_m, offs_n, O, I,
        stride_dy_t, stride_dy_o, stride_x_t, stride_x_i,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION,
    )
    # epilogue: each (row, word) of the mask and its prefix loaded once and broadcast to its 32 entries.
    # CONTIGUOUS_STORES: a warp stores 32 consecutive columns of a row (consecutive compact indices) instead of
    # one column of 32 rows; it costs registers (200 vs 124 at 128x128, AOT sm_90a: 1 CTA per SM instead of 2),
    # so both variants are tuning candidates and the GPU timing decides.
    is_set, idx = tile_compact_index(words_ptr, prefix_ptr, offs_m, pid_n, O, W, stride_w, BLOCK_N,
                                     CONTIGUOUS_STORES)
    if CONTIGUOUS_STORES:
        tl.store(out_ptr + idx, tl.trans(acc), mask=is_set)
    else:
        tl.store(out_ptr + idx, acc, mask=is_set)


@triton.jit
def _block_sddmm_kernel(
    dy_ptr, x_ptr, blocks_ptr, prefix_ptr, out_ptr,
    T, O, I, N, K_SLICE, n_active,
    stride_dy_t, stride_dy_o, stride_x_t, stride_x_i, stride_w,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid, k_lo, k_hi, out_off = _token_slice(tl.program_id(0), n_active, T, N, K_SLICE)
    out_ptr += out_off
    pid = pid.to(tl.int64)
    block_r = tl.load(blocks_ptr + 2 * pid)
    block_c = tl.load(blocks_ptr + 2 * pid + 1)
    offs_m = block_r * BLOCK + tl.arange(0, BLOCK)
    offs_n = block_c * BLOCK + tl.arange(0, BLOCK)
    acc = _dw_tile(
        dy_ptr, x_ptr, k_lo, k_hi, offs_m, offs_n, O, I,
        stride_dy_t, stride_dy_o, stride_x_t, stride_x_i,
        BLOCK, BLOCK, BLOCK_K, UPCAST, INPUT_PRECISION,
    )
    # every entry of an active tile is masked, so a tile row is one contiguous compact run starting at the
    # prefix of its first word: one prefix load per row
    row_ok = offs_m < O
    start = tl.load(prefix_ptr + offs_m.to(tl.int64) * stride_w + block_c * (BLOCK // 32), mask=row_ok, other=0)
    idx = start[:, None] + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + idx, acc, mask=row_ok[:, None] & (offs_n < I)[None, :])


@triton.jit
def _split_reduce_kernel(ws_ptr, out_ptr, N, S, BLOCK: tl.constexpr):
    """out = sum over s of ws[s] (fp32 [S, N] -> [N]), always in slice order 0..S-1: deterministic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    ptrs = ws_ptr + offs
    acc = tl.load(ptrs, mask=ok, other=0.0)
    for _ in range(1, S):
        ptrs += N  # pointer steps rather than s * N: S * N may pass 2**31
        acc += tl.load(ptrs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use tf32 tensor cores exactly when torch's own fp32 matmuls may (``allow_tf32``, which
    ``torch.set_float32_matmul_precision("high")`` also sets); otherwise IEEE fp32 (FMA, ~10x slower, exact
    like the reference). fp16/bf16 ignore it (tensor cores either way), so they keep triton's default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dw_configs(dtype: torch.dtype, input_precision: str = "tf32", interpreter: bool | None = None) -> list[dict]:
    """Launch configs the unstructured dW dispatch tunes over (timed once per shape bucket on the GPU).

    Interpreter (``interpreter=None``: as the environment says): one large tile (per-program overhead
    dominates). GPU, 16-bit inputs: the standard Hopper/Ampere GEMM tiles; each compiles for sm_90a and sm_80
    within shared memory and without spills (``compile_check``). fp32 halves BLOCK_K to keep the stages in
    shared memory. None has been timed on a GPU yet.
    """
    def cfg(m, n, k, group, warps, stages, contiguous=False):
        return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=group, CONTIGUOUS_STORES=contiguous,
                    num_warps=warps, num_stages=stages)

    if is_interpreting() if interpreter is None else interpreter:
        return [cfg(64, 128, 128, 8, 4, 1)]
    if dtype == torch.float32:
        if input_precision == "ieee":  # FMA path: smaller tiles keep the fp32 operands in registers
            return [cfg(64, 64, 32, 8, 4, 3)]
        return [cfg(128, 128, 32, 8, 8, 3), cfg(128, 128, 32, 8, 8, 3, True), cfg(128, 64, 32, 8, 4, 4)]
    # 128x256 with contiguous stores spills (255 registers, AOT sm_90a): only the row-lane variant is offered
    return [
        cfg(128, 128, 64, 8, 8, 3),
        cfg(128, 128, 64, 8, 8, 3, True),
        cfg(128, 128, 64, 16, 8, 4),
        cfg(128, 256, 64, 8, 8, 3),
        cfg(64, 128, 64, 8, 4, 4),
        cfg(64, 128, 64, 8, 4, 4, True),
    ]


# block sizes the block dW kernel compiles for; 256 needs 256 KiB of shared memory (sm_90a limit 227 KiB)
BLOCK_SIZES = (32, 64, 128)


def block_config(block_size: int, dtype: torch.dtype, interpreter: bool | None = None) -> dict:
    """Launch config of the block dW kernel for a block size (the tile is the block)."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"the block dW kernel supports block sizes {BLOCK_SIZES}, got {block_size}: a 256 tile "
                         f"needs 256 KiB of shared memory (sm_90a allows 227 KiB); use block_size 64 or 128")
    if is_interpreting() if interpreter is None else interpreter:
        return dict(BLOCK_K=128, num_warps=4, num_stages=1)
    return dict(BLOCK_K=32 if dtype == torch.float32 else 64, num_warps=8 if block_size >= 128 else 4, num_stages=3)


_TUNER = Tuner()
# fp32 rows of dW per panel of the torch.mm fallback: 16 MiB stays in H100/H200 L2 (50 MiB) until it is gathered
_PANEL_BYTES = 16 << 20
_PANELS = dict(PANELS=True)  # the tuner's candidate for the fallback below
_MM_OUT_DTYPE: dict[torch.device, bool] = {}


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output from 16-bit inputs (cuBLAS accumulates in fp32 and writes fp32)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _panels_available(dy: torch.Tensor) -> bool:
    """torch.mm(..., out_dtype=float32) exists for 16-bit CUDA inputs (torch >= 2.8); probed once per device."""
    if not dy.is_cuda or dy.dtype not in (torch.float16, torch.bfloat16):
        return False
    if dy.device not in _MM_OUT_DTYPE:
        try:
            one = torch.ones(1, 1, dtype=dy.dtype, device=dy.device)
            _MM_OUT_DTYPE[dy.device] = _mm_fp32(one, one).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[dy.device] = False
    return _MM_OUT_DTYPE[dy.device]


def _dw_panels(dy_TO: torch.Tensor, x_TI: torch.Tensor, layout: MaskLayout, out: torch.Tensor) -> None:
    """Fallback: dense fp32 dW over row panels (cuBLAS), each gathered at its masked entries while in L2.
    Peak extra memory is one panel (16 MiB), not the dense fp32 dW; the word prefixes are global compact
    indices, so each panel's gather writes straight into ``out``."""
    O, I = layout.shape
    rows = max(1, _PANEL_BYTES // (4 * max(I, 1)))
    W = layout.words.shape[1]
    cfg = elementwise_config(min(rows, O), I)
    for r0 in range(0, O, rows):
        r1 = min(O, r0 + rows)
        dw = _mm_fp32(dy_TO[:, r0:r1].T, x_TI)
        words, prefix = layout.words[r0:r1], layout.word_prefix[r0:r1]
        _gather_kernel[tile_grid(r1 - r0, I, cfg["BLOCK_R"], cfg["BLOCK_C"])](
            dw, words, prefix, out, r1 - r0, I, W, dw.stride(0), words.stride(0), **cfg,
        )


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


def split_reduce_config() -> dict:
    """Entries per program of the split-K reduction (a streaming sum, like AdamW's compact pass)."""
    return dict(BLOCK=16384 if is_interpreting() else 1024, num_warps=4)


# split-K: slices of the token dimension, each computing partial tiles into an fp32 workspace [S, nnz]
SPLIT_K_MAX = 8
# tokens per slice at least: 16 BLOCK_K=64 steps keep the pipeline's prologue/epilogue a small part of a slice
SPLIT_K_MIN_TOKENS = 1024
# cost of one tile's epilogue (mask words, compact indices, scattered stores) relative to its main loop at 16k
# tokens: the Hopper kernel review's estimate for 128x128 bf16 tiles (15-20 us against ~100 us), not
# measured. The main loop scales with the tokens, the epilogue does not.
_EPILOGUE_AT_16K = 0.2
_SM_COUNT: dict[torch.device, int] = {}


def auto_split_k(n_tiles: int, T: int, sms: int | None) -> int:
    """Token slices for a dW grid of ``n_tiles`` output tiles on ``sms`` SMs (None: CPU/interpreter -> 1).

    Only grids below 2 x SMs are split (base125m's 768-wide layers give 36-144 128x128 tiles on 132 SMs; cuBLAS
    uses split-K there). Model: an SM's time is the sum of its CTAs' times, and each CTA costs 1/S of a tile's
    main loop plus a whole epilogue, so a split costs ceil(S x tiles / SMs) x (1/S + epilogue). S minimises it
    (ties: the smaller S) among 1..``SPLIT_K_MAX`` with at least ``SPLIT_K_MIN_TOKENS`` tokens per slice; e.g.
    at 16k tokens 36 tiles -> 3, 48 -> 2, 96 -> 1, 144 -> 2. The reduction pass is left out (S x 4 B per masked
    entry, small next to the GEMM here). Only a candidate: the tuner times it against no split.
    """
    if not sms or n_tiles <= 0 or n_tiles >= 2 * sms:
        return 1
    s_max = max(1, min(SPLIT_K_MAX, T // SPLIT_K_MIN_TOKENS))
    epilogue = _EPILOGUE_AT_16K * 16384 / max(T, 1)
    return min(range(1, s_max + 1), key=lambda s: (-(-s * n_tiles // sms) * (1 / s + epilogue), s))


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _check_split_k(split_k: int | None) -> None:
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be a positive int (1 = no split) or None (the dispatch decides), "
                         f"got {split_k!r}")


def _token_slices(T: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(S, tokens per slice): slices are whole BLOCK_K steps; S shrinks so that no slice is empty (e.g. split_k=3
    over 200 tokens at BLOCK_K=128 gives 2 slices)."""
    k_slice = triton.cdiv(triton.cdiv(T, split_k), block_k) * block_k
    return triton.cdiv(T, k_slice), k_slice


def _launch_split(launch_slices, S: int, k_slice: int, n: int, out: torch.Tensor) -> None:
    """Run ``launch_slices(target, n, k_slice)`` over S slices: S = 1 writes ``out`` directly; otherwise each
    slice writes its partial sums into row s of an fp32 workspace [S, n], then one pass sums the rows in a fixed
    order. Chosen over fp32 atomics into ``out``: the result is bit-reproducible run to run (atomics add in
    arrival order), needs no zeroing pass, and its stores stay plain vector stores; the price is S x 4 B per
    masked entry of workspace, written once and read once by the reduction."""
    if S == 1:
        launch_slices(out, n, k_slice)
        return
    ws = torch.empty(S * n, dtype=torch.float32, device=out.device)
    launch_slices(ws, n, k_slice)
    cfg = split_reduce_config()
    _split_reduce_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](ws, out, n, S, **cfg)


def masked_weight_grad_unstructured(
    dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout, out: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Dense tiles + masked compact epilogue; works for any layout (block layouts included).

    ``split_k``: token slices (1 = none). None: on a GPU the tuner times each tile config without a split and,
    where the grid is below 2 x SMs, with ``auto_split_k`` slices, and keeps the fastest; under the interpreter
    no split. An explicit value is used for every tile config (tests, benchmarks).
    """
    _check_split_k(split_k)
    dy_TO, x_TI = _validate(dy, x, layout)
    (T, O), I = dy_TO.shape, x_TI.shape[1]
    out = _output(out, layout, dy.device)
    if layout.nnz == 0:
        return out
    if T == 0:
        return out.zero_()
    precision = _input_precision(dy.dtype)
    upcast = upcast_flag(dy)
    W = layout.words.shape[1]
    sms = _sm_count(dy.device)

    def launch(cfg):
        if cfg is _PANELS:
            _dw_panels(dy_TO, x_TI, layout, out)
            return
        kcfg = {k: v for k, v in cfg.items() if k != "SPLIT"}
        n_tiles = triton.cdiv(O, kcfg["BLOCK_M"]) * triton.cdiv(I, kcfg["BLOCK_N"])
        want = split_k if split_k is not None else auto_split_k(n_tiles, T, sms) if cfg.get("SPLIT") else 1
        S, k_slice = _token_slices(T, want, kcfg["BLOCK_K"])

        def launch_slices(target, n, k_slice):
            _sddmm_kernel[(S * n_tiles,)](
                dy_TO, x_TI, layout.words, layout.word_prefix, target,
                T, O, I, W, n, k_slice,
                dy_TO.stride(0), dy_TO.stride(1), x_TI.stride(0), x_TI.stride(1), layout.words.stride(0),
                UPCAST=upcast, INPUT_PRECISION=precision, **kcfg,
            )

        _launch_split(launch_slices, S, k_slice, layout.nnz, out)

    # the tuner times every kernel config (with and without split-K where the grid is small) and, where cuBLAS
    # can write fp32, the panel fallback, once per (dtype, shape bucket), and keeps the fastest: the dispatch
    # picks split-K or the fallback exactly where they win
    configs = dw_configs(dy.dtype, precision)
    if split_k is None:
        configs = configs + [dict(c, SPLIT=True) for c in configs if c is not _PANELS and auto_split_k(
            triton.cdiv(O, c["BLOCK_M"]) * triton.cdiv(I, c["BLOCK_N"]), T, sms) > 1]
        configs += [_PANELS] if _panels_available(dy) else []
    key = (dy.dtype, precision, shape_bucket(T, 1024, 1 << 17), shape_bucket(O), shape_bucket(I), split_k)
    launch(_TUNER.pick(key, configs, launch))
    return out


def masked_weight_grad_blocks(
    dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout, out: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Grid over ``layout.active_blocks`` only (block layouts); empty tiles are skipped.

    ``split_k`` as in :func:`masked_weight_grad_unstructured`: None lets the tuner time no split against
    ``auto_split_k`` slices of the active tiles on a GPU (no split under the interpreter).
    """
    _check_split_k(split_k)
    if not layout.block_size or layout.active_blocks is None:
        raise ValueError("masked_weight_grad_blocks needs a block layout (MaskLayout.from_bool(mask, block_size=64))")
    block_config(layout.block_size, dy.dtype)  # refuses block sizes that cannot compile before any work
    dy_TO, x_TI = _validate(dy, x, layout)
    (T, O), I = dy_TO.shape, x_TI.shape[1]
    out = _output(out, layout, dy.device)
    n_active = layout.active_blocks.shape[0]
    if layout.nnz == 0 or n_active == 0:
        return out
    if T == 0:
        return out.zero_()
    cfg = block_config(layout.block_size, dy.dtype)
    precision = _input_precision(dy.dtype)
    auto = auto_split_k(n_active, T, _sm_count(dy.device))

    def launch(want):
        S, k_slice = _token_slices(T, want, cfg["BLOCK_K"])

        def launch_slices(target, n, k_slice):
            _block_sddmm_kernel[(S * n_active,)](
                dy_TO, x_TI, layout.active_blocks, layout.word_prefix, target,
                T, O, I, n, k_slice, n_active,
                dy_TO.stride(0), dy_TO.stride(1), x_TI.stride(0), x_TI.stride(1), layout.word_prefix.stride(0),
                BLOCK=layout.block_size, UPCAST=upcast_flag(dy), INPUT_PRECISION=precision, **cfg,
            )

        _launch_split(launch_slices, S, k_slice, layout.nnz, out)

    if split_k is not None:
        launch(split_k)
        return out
    # the active-tile count varies by layer: bucket it with the token count for the tuner's key
    key = ("block", dy.dtype, precision, layout.block_size, shape_bucket(T, 1024, 1 << 17),
           shape_bucket(n_active, 1, 1 << 12))
    launch(_TUNER.pick(key, [1, auto] if auto > 1 else [1], launch))
    return out


def masked_weight_grad(
    dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout, out: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """(dy^T x) at the masked entries of a weight (O, I): fp32 [nnz], canonical order. Block layouts skip tiles.

    ``out``: optional preallocated contiguous fp32 [nnz] (e.g. the compact .grad); every entry is overwritten.
    ``split_k``: token slices (None: the dispatch decides; see :func:`masked_weight_grad_unstructured`).
    """
    if layout.block_size:
        return masked_weight_grad_blocks(dy, x, layout, out, split_k)
    return masked_weight_grad_unstructured(dy, x, layout, out, split_k)
