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

Multi-tensor step (``masked_adamw_multi_``, what MaskedAdamW runs): the same two passes for every tensor of a
param group in a constant number of launches -- one compact launch over all tensors (densely trained fp32
parameters included, as tensors whose every entry is masked), then one dense-write launch per (dense dtype, tile
shape, with/without master) -- instead of two launches plus Python checks per tensor (~111 tensors in base125m).
Triton takes no list of pointers, so each tensor's addresses are int64 columns of a small device table that the
kernels cast back with ``tl.pointer_type``; an int32 work table maps each program to (tensor, chunk or tile). The
work tables depend only on the tensors' shapes and are built once per group; the address tables are rebuilt (one
small pinned copy) only when an address changes, e.g. when autograd hands over new gradient tensors. State stays
one tensor per parameter, so checkpoints are unchanged.

Arithmetic follows torch's single-tensor AdamW in fp32 (decay, lerp-form first moment, IEEE sqrt/div), so it
agrees with the reference to a few ulp; scalars (decay factor, step size, bias corrections) are computed on the
host in double precision like torch does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import reference
from .mask_layout import MaskLayout
from .reference import AdamWEntry, check_adamw_args
from .routing import launch_scatter
from .triton_utils import (
    MAX_GRID_X,
    check_device,
    elementwise_config,
    is_interpreting,
    tile_compact_index,
    tile_coords,
    tile_grid,
)


@triton.jit
def _adamw_lanes(
    master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, update_ptr,
    offs, ok,
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size,
    HAS_MASTER: tl.constexpr,
):
    """The AdamW math on compact lanes ``offs`` (``ok``: lane mask, or None for a full chunk: unmasked loads
    vectorise). Masked-off lanes load undefined values and are never stored."""
    g = tl.load(grad_ptr + offs, mask=ok)
    m = tl.load(exp_avg_ptr + offs, mask=ok)
    v = tl.load(exp_avg_sq_ptr + offs, mask=ok)
    m = m + one_minus_beta1 * (g - m)  # torch's lerp_(grad, 1 - beta1) for weights < 0.5
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    update = neg_step_size * tl.div_rn(m, denom)
    tl.store(exp_avg_ptr + offs, m, mask=ok)
    tl.store(exp_avg_sq_ptr + offs, v, mask=ok)
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=ok)
        tl.store(master_ptr + offs, p * decay + update, mask=ok)
    else:
        tl.store(update_ptr + offs, update, mask=ok)


@triton.jit
def _adamw_compact_kernel(
    master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, update_ptr,
    N,
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size,
    BLOCK: tl.constexpr, HAS_MASTER: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adamw_lanes(
        master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, update_ptr, offs, offs < N,
        decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, HAS_MASTER,
    )


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


# ---------------------------------------------------------------- multi-tensor step (one launch per pass)
# Triton takes no list of pointers: each entry's addresses are int64 columns of a device table, cast back with
# tl.pointer_type. A work table (int32 [programs, 2]) maps each program to (entry, chunk or tile of that entry).
@triton.jit
def _adamw_compact_multi_kernel(
    work_ptr, table_ptr, update_ptr,
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.load(work_ptr + 2 * pid).to(tl.int64)
    start = tl.load(work_ptr + 2 * pid + 1).to(tl.int64) * BLOCK
    # table row: [n, master (0: none), grad, exp_avg, exp_avg_sq, offset into update_ptr (-1: has a master)]
    row = table_ptr + 6 * e
    n = tl.load(row)
    master = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    grad = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    exp_avg = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    exp_avg_sq = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    upd = tl.load(row + 5)
    update = update_ptr + upd
    if ALIGNED:  # the host checked every address (and update offset) is 16-B aligned: loaded pointers carry no
        # alignment facts of their own, and without them every load would be a scalar 4-B load
        master = tl.multiple_of(master, 16)
        grad = tl.multiple_of(grad, 16)
        exp_avg = tl.multiple_of(exp_avg, 16)
        exp_avg_sq = tl.multiple_of(exp_avg_sq, 16)
        update = tl.multiple_of(update, 16)
    offs = start + tl.arange(0, BLOCK)
    # a full chunk runs without a lane mask (a mask from a loaded length would break vectorisation); one branch
    # per program, uniform across its lanes
    if start + BLOCK <= n:
        if upd < 0:
            _adamw_lanes(master, grad, exp_avg, exp_avg_sq, update, offs, None, decay, one_minus_beta1, beta2,
                         one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, True)
        else:
            _adamw_lanes(master, grad, exp_avg, exp_avg_sq, update, offs, None, decay, one_minus_beta1, beta2,
                         one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, False)
    else:
        ok = offs < n
        if upd < 0:
            _adamw_lanes(master, grad, exp_avg, exp_avg_sq, update, offs, ok, decay, one_minus_beta1, beta2,
                         one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, True)
        else:
            _adamw_lanes(master, grad, exp_avg, exp_avg_sq, update, offs, ok, decay, one_minus_beta1, beta2,
                         one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, False)


@triton.jit
def _dense_multi_kernel(
    work_ptr, table_ptr, dense_type_ptr, update_ptr,
    decay,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, APPLY_UPDATE: tl.constexpr,
):
    """The dense write of several weights of one dtype: APPLY_UPDATE=False writes the master (cast) at masked
    entries (routing's scatter); True applies ``p * decay + update`` to an fp32 weight (``_apply_update_kernel``).
    ``dense_type_ptr``: any tensor of the weights' dtype, only its pointer type is used."""
    pid = tl.program_id(0)
    e = tl.load(work_ptr + 2 * pid).to(tl.int64)
    tile = tl.load(work_ptr + 2 * pid + 1)
    # table row: [dense, words, word_prefix, master (or offset into update_ptr), R, C, W, stride_w]
    row = table_ptr + 8 * e
    dense = tl.load(row).to(dense_type_ptr.dtype)
    words = tl.load(row + 1).to(tl.pointer_type(tl.int32))
    prefix = tl.load(row + 2).to(tl.pointer_type(tl.int32))
    values = tl.load(row + 3)
    R = tl.load(row + 4).to(tl.int32)
    C = tl.load(row + 5).to(tl.int32)
    W = tl.load(row + 6).to(tl.int32)
    stride_w = tl.load(row + 7).to(tl.int32)
    n_c = tl.cdiv(C, BLOCK_C)
    pid_r = tile // n_c
    pid_c = tile % n_c
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    is_set, idx = tile_compact_index(words, prefix, offs_r, pid_c, R, W, stride_w, BLOCK_C, False)
    d_off = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]  # dense weights are contiguous (checked)
    if APPLY_UPDATE:
        p = tl.load(dense + d_off, mask=is_set)
        u = tl.load(update_ptr + values + idx, mask=is_set)
        tl.store(dense + d_off, p * decay + u, mask=is_set)
    else:
        v = tl.load(values.to(tl.pointer_type(tl.float32)) + idx, mask=is_set)
        tl.store(dense + d_off, v.to(dense_type_ptr.dtype.element_ty), mask=is_set)


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


# ---------------------------------------------------------------- multi-tensor host side
# Updates of weights without a master (fp32 dense) go through one transient fp32 buffer per batch; entries are
# batched so that it holds at most this many entries (or the largest single entry), which keeps the peak extra
# memory near the per-tensor path's (one tensor's update) instead of 4 B per masked entry of the whole group.
UPDATE_BUFFER_ENTRIES = 16 << 20  # 64 MiB
# launch plans kept per cache (one per distinct set of tensor shapes; a param group normally has one)
_PLANS_PER_CACHE = 4
_ALIGN = 16  # bytes; also the padding of each entry's slice of the update buffer (4 fp32)


def _dense_entry_fuses(e: AdamWEntry) -> bool:
    """A densely trained parameter goes through the compact kernel (its entries are all 'masked') when it is an
    fp32 contiguous tensor with fp32 contiguous gradient and moments of its size; otherwise torch ops."""
    d = e.dense
    return e.master is None and d.dtype == torch.float32 and d.is_contiguous() and all(
        t.dtype == torch.float32 and t.is_contiguous() and t.numel() == d.numel() and t.device == d.device
        for t in (e.grad, e.exp_avg, e.exp_avg_sq))


def _signature(e: AdamWEntry) -> tuple:
    if e.layout is None:
        return (e.dense.numel(),)
    lay = e.layout
    return (lay.rows, lay.cols, lay.nnz, e.dense.dtype, e.master is not None)


def _to_device(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """int64 table on ``device`` without stalling the host: a pageable host-to-device copy waits for the stream's
    earlier work (the backward pass), a pinned non-blocking one does not (torch's pinned-memory cache keeps the
    host buffer alive until the copy has run)."""
    t = torch.tensor(rows, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _work_table(counts: list[int], device: torch.device) -> torch.Tensor:
    """int32 [sum(counts), 2]: (entry, k) for k < counts[entry], entry by entry (one row per program)."""
    c = torch.tensor(counts, dtype=torch.int64)
    total = int(c.sum())
    if total > MAX_GRID_X:
        raise ValueError(f"{total} programs exceed CUDA's grid limit of {MAX_GRID_X}")
    entry = torch.repeat_interleave(torch.arange(len(counts)), c)
    k = torch.arange(total) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
    return torch.stack([entry, k], 1).to(torch.int32).to(device)


class _Batch:
    """Entries stepped by one compact launch, then one dense launch per (mode, dense dtype, tile)."""

    def __init__(self, idx: list[int], entries: list[AdamWEntry], block: int, device: torch.device):
        self.idx = idx
        self.upd_off: dict[int, int] = {}  # entry -> offset of its slice of the update buffer
        n_upd = 0
        counts = []
        for i in idx:
            e = entries[i]
            n = e.dense.numel() if e.layout is None else e.layout.nnz
            counts.append(triton.cdiv(n, block))
            if e.layout is not None and e.master is None:
                self.upd_off[i] = n_upd
                n_upd += triton.cdiv(n, _ALIGN // 4) * (_ALIGN // 4)
        self.update_entries = n_upd
        self.work = _work_table(counts, device)
        # dense walks: masked entries grouped by (apply update?, dense dtype, tile)
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            e = entries[i]
            if e.layout is None:
                continue
            cfg = elementwise_config(e.layout.rows, e.layout.cols)
            tile_grid(e.layout.rows, e.layout.cols, cfg["BLOCK_R"], cfg["BLOCK_C"])  # refuses cols >= 2**31
            key = (e.master is None, e.dense.dtype, tuple(sorted(cfg.items())))
            groups.setdefault(key, []).append(i)
        self.dense = []  # (apply update, cfg, entry indices, work table)
        for (apply, _, cfg_items), members in groups.items():
            cfg = dict(cfg_items)
            tiles = [triton.cdiv(entries[i].layout.rows, cfg["BLOCK_R"]) * triton.cdiv(entries[i].layout.cols,
                                                                                        cfg["BLOCK_C"])
                     for i in members]
            self.dense.append((apply, cfg, members, _work_table(tiles, device)))
        self.tables: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def build_tables(self, entries: list[AdamWEntry], device: torch.device) -> None:
        """The address tables (int64, on the device): rebuilt when any address changes."""
        rows = []
        for i in self.idx:
            e = entries[i]
            n = e.dense.numel() if e.layout is None else e.layout.nnz
            master = e.dense if e.layout is None else e.master
            rows.append([n, master.data_ptr() if master is not None else 0, e.grad.data_ptr(),
                         e.exp_avg.data_ptr(), e.exp_avg_sq.data_ptr(), self.upd_off.get(i, -1)])
        compact = _to_device(rows, device)
        dense = []
        for apply, _, members, _ in self.dense:
            drows = []
            for i in members:
                e, lay = entries[i], entries[i].layout
                values = self.upd_off[i] if apply else e.master.data_ptr()
                drows.append([e.dense.data_ptr(), lay.words.data_ptr(), lay.word_prefix.data_ptr(), values,
                              lay.rows, lay.cols, lay.words.shape[1], lay.words.stride(0)])
            dense.append(_to_device(drows, device))
        self.tables = (compact, dense)


class _Plan:
    """Launch plan for one list of entry shapes: batches, work tables, and the address tables of the last call."""

    def __init__(self, entries: list[AdamWEntry], device: torch.device):
        self.cfg = compact_config()
        self.device = device
        master_side = [i for i, e in enumerate(entries) if e.layout is None or e.master is not None]
        no_master = [i for i, e in enumerate(entries) if e.layout is not None and e.master is None]
        cap = max([UPDATE_BUFFER_ENTRIES] + [entries[i].layout.nnz + _ALIGN // 4 for i in no_master])
        batches, current, used = [], list(master_side), 0
        for i in no_master:
            size = entries[i].layout.nnz + _ALIGN // 4
            if used + size > cap and used:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += size
        batches.append(current)
        self.batches = [_Batch(b, entries, self.cfg["BLOCK"], device) for b in batches if b]
        self.static_ptrs: tuple | None = None
        self.grad_ptrs: tuple | None = None
        self.aligned = False

    def refresh(self, entries: list[AdamWEntry]) -> None:
        """Validate and rebuild the address tables when an address changed since the last call (typically the
        gradients, which autograd reallocates each step); else nothing."""
        static = tuple(p for e in entries for p in (
            e.dense.data_ptr(), e.master.data_ptr() if e.master is not None else 0, e.exp_avg.data_ptr(),
            e.exp_avg_sq.data_ptr(), *((e.layout.words.data_ptr(), e.layout.word_prefix.data_ptr())
                                       if e.layout is not None else ())))
        grads = tuple(e.grad.data_ptr() for e in entries)
        if static == self.static_ptrs and grads == self.grad_ptrs:
            return
        if static != self.static_ptrs:  # full checks only when the weights / state / masks moved
            for e in entries:
                if e.layout is not None:
                    check_adamw_args(e.dense, e.master, e.grad, e.exp_avg, e.exp_avg_sq, e.layout, 1)
                    check_device(*(t for t in (e.dense, e.master, e.grad, e.exp_avg, e.exp_avg_sq)
                                   if t is not None))
                    if e.layout.word_prefix.stride(0) != e.layout.words.stride(0):
                        raise ValueError("words and word_prefix of a mask layout must share a row stride")
                else:
                    check_device(e.dense)
                if e.dense.device != self.device:
                    raise ValueError(f"all tensors of a multi-tensor step must share a device: {e.dense.device} "
                                     f"and {self.device}")
        else:  # new gradients only: their size, dtype, layout and device
            for e in entries:
                n = e.dense.numel() if e.layout is None else e.layout.nnz
                g = e.grad
                if g.numel() != n or g.dtype != torch.float32 or not g.is_contiguous() or g.device != self.device:
                    raise ValueError(f"grad must be a contiguous fp32 tensor of {n} entries on {self.device}, got "
                                     f"{g.dtype} {tuple(g.shape)} on {g.device} (contiguous={g.is_contiguous()})")
        # the compact pass reads master (or the dense parameter itself), grad and moments: their alignment counts
        self.aligned = all(p % _ALIGN == 0 for e in entries for p in (
            (e.dense if e.layout is None else e.master if e.master is not None else e.grad).data_ptr(),
            e.grad.data_ptr(), e.exp_avg.data_ptr(), e.exp_avg_sq.data_ptr()))
        for b in self.batches:
            b.build_tables(entries, self.device)
        self.static_ptrs, self.grad_ptrs = static, grads


def masked_adamw_multi_(
    entries: Sequence[AdamWEntry],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    cache: dict | None = None,
) -> None:
    """One AdamW step for many tensors sharing hyperparameters and step: one compact launch over all of them,
    then one dense-write launch per (dense dtype, tile shape, with/without master) -- a constant number of
    launches instead of two per tensor. Numerics as :func:`masked_adamw_` per entry.

    ``cache``: a dict the caller keeps between steps (one per parameter group); the launch plan (work tables)
    is built once per list of entry shapes and the address tables are rebuilt only when an address changes.
    Dense entries that are not fp32 and contiguous are stepped with torch ops, as by the reference.
    """
    if step < 1:
        raise ValueError(f"step is 1-based (the step being taken), got {step}")
    if 1.0 - beta1 >= 0.5:
        raise ValueError(f"fused masked AdamW assumes beta1 > 0.5 (got {beta1}); use PMP_KERNELS=torch")
    fused, other = [], []
    for e in entries:
        if e.layout is None:
            if e.master is not None:
                raise ValueError("a dense AdamWEntry (layout=None) updates `dense` itself: master must be None")
            (fused if _dense_entry_fuses(e) and e.dense.numel() else other).append(e)
        elif e.layout.nnz:
            fused.append(e)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    if other:
        reference.masked_adamw_multi_(other, **hyper)
    if not fused:
        return
    plans = cache if cache is not None else {}
    sig = (fused[0].dense.device, tuple(_signature(e) for e in fused))
    plan = plans.get(sig)
    if plan is None:
        if len(plans) >= _PLANS_PER_CACHE:
            plans.pop(next(iter(plans)))
        plan = plans[sig] = _Plan(fused, fused[0].dense.device)
    plan.refresh(fused)

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    decay = 1 - lr * weight_decay
    scalars = (decay, 1.0 - beta1, beta2, 1 - beta2, bias_correction2**0.5, eps, -(lr / bias_correction1))
    placeholder = fused[0].exp_avg  # an fp32 tensor for pointer arguments a launch does not use
    for b in plan.batches:
        compact, dense_tables = b.tables
        update = torch.empty(b.update_entries, dtype=torch.float32, device=plan.device) if b.update_entries \
            else placeholder
        _adamw_compact_multi_kernel[(b.work.shape[0],)](
            b.work, compact, update, *scalars, **plan.cfg, ALIGNED=plan.aligned,
        )
        for (apply, cfg, members, work), table in zip(b.dense, dense_tables):
            _dense_multi_kernel[(work.shape[0],)](
                work, table, fused[members[0]].dense, update, decay, **cfg, APPLY_UPDATE=apply,
            )
