"""Ahead-of-time compile check: every kernel in every launch config the dispatch can pick, compiled for sm_90a and
sm_80 with triton's bundled ``ptxas`` -- no GPU needed.

    python -m pmp.kernels.compile_check                       # table; exit 1 on a problem
    python -m pmp.kernels.compile_check --json out.json --include-refused

A spec is one (kernel, launch config, dtypes, alignment) as the host functions launch it; the configs come from
the same functions the dispatch calls (``sddmm.dw_configs``, ``sddmm.block_config``, ``sddmm.split_reduce_config``,
``triton_utils.elementwise_menu``, ``masked_adamw.compact_config``, the bitmask blocks), so a new config is checked
without editing this file. Split-K needs no dW specs of its own: the dW kernels take the token slice as runtime
arguments, so one binary serves every split (only its reduction is a new kernel). A problem is a compile error,
shared memory above the target's limit (the first launch would raise OutOfResources), or register spills in a hot
kernel (the per-step kernels: dW and its split-K reduction, routing, AdamW single- and multi-tensor).
``--include-refused`` adds configs the dispatch refuses (block size 256) to show that the check catches them; they
do not affect the exit status.

Run it with TRITON_INTERPRET unset: under the interpreter ``triton.jit`` returns interpreted functions, which
cannot be compiled (the test suite runs this module in a subprocess for that reason).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget

from . import bitmask, masked_adamw, routing, sddmm
from .triton_utils import elementwise_menu, is_interpreting

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): H100/H200 227 KiB, A100 163 KiB.
TARGETS = {"sm_90a": (GPUTarget("cuda", 90, 32), 232448), "sm_80": (GPUTarget("cuda", 80, 32), 166912)}
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Spec:
    """One kernel launch as the dispatch issues it. ``args`` maps every kernel argument to a triton type string
    ('*bf16', 'i32', 'fp32') or, for constexpr arguments, to its value."""

    kernel: str
    config: str
    fn: object = field(repr=False, compare=False)
    args: dict = field(repr=False, compare=False)
    num_warps: int = 4
    num_stages: int = 3
    hot: bool = True
    aligned: bool = True  # sizes/strides divisible by 16 (the common case); False: no divisibility hints
    dispatch: bool = True  # False: a config the dispatch refuses, compiled to show why


@dataclass
class Result:
    kernel: str
    config: str
    target: str
    hot: bool
    dispatch: bool
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    shared_limit: int = 0
    seconds: float = 0.0
    error: str | None = None
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- specs: the dispatch's configs
def _dw_args(dt: str, cfg: dict, precision: str) -> dict:
    return dict(
        dy_ptr=f"*{dt}", x_ptr=f"*{dt}", words_ptr="*i32", prefix_ptr="*i32", out_ptr="*fp32",
        T="i32", O="i32", I="i32", W="i32", N="i32", K_SLICE="i32",
        stride_dy_t="i32", stride_dy_o=1, stride_x_t="i32", stride_x_i=1, stride_w="i32",
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        CONTIGUOUS_STORES=cfg["CONTIGUOUS_STORES"], UPCAST=False, INPUT_PRECISION=precision,
    )


def _block_args(dt: str, bs: int, cfg: dict, precision: str) -> dict:
    return dict(
        dy_ptr=f"*{dt}", x_ptr=f"*{dt}", blocks_ptr="*i32", prefix_ptr="*i32", out_ptr="*fp32",
        T="i32", O="i32", I="i32", N="i32", K_SLICE="i32", n_active="i32",
        stride_dy_t="i32", stride_dy_o=1, stride_x_t="i32", stride_x_i=1, stride_w="i32",
        BLOCK=bs, BLOCK_K=cfg["BLOCK_K"], UPCAST=False, INPUT_PRECISION=precision,
    )


def _walk_args(dense: str, values: tuple[str, str], tile: dict, **extra) -> dict:
    """Arguments of a dense-walk kernel (dense tensor, bit mask, compact vector ``values`` = (name, type))."""
    return {"dense_ptr": f"*{dense}", "words_ptr": "*i32", "prefix_ptr": "*i32", values[0]: f"*{values[1]}",
            "R": "i32", "C": "i32", "W": "i32", "stride_dr": "i32", "stride_w": "i32", **extra,
            "BLOCK_R": tile["BLOCK_R"], "BLOCK_C": tile["BLOCK_C"]}


def _label(cfg: dict) -> str:
    short = {"CONTIGUOUS_STORES": "CONTIG", "BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "GROUP_M": "G"}
    parts = [f"{short.get(k, k)}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.items() if k.isupper()]
    return " ".join(parts) + f" w{cfg.get('num_warps', 4)}s{cfg.get('num_stages', 3)}"


def dispatch_specs(include_refused: bool = False) -> list[Spec]:
    """Every (kernel, config) the GPU dispatch can launch, with the dtypes pmp uses."""
    specs: list[Spec] = []
    # unstructured dW: every tuned config for bf16 / fp16 and for fp32 with and without tf32
    for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                             (torch.float32, "ieee")):
        dt = _TL[dtype]
        for i, cfg in enumerate(sddmm.dw_configs(dtype, precision, interpreter=False)):
            for aligned in (True, False) if i == 0 else (True,):  # unaligned: e.g. a 50257-row vocab layer
                specs.append(Spec("sddmm", f"{dt} {precision} {_label(cfg)}", sddmm._sddmm_kernel,
                                  _dw_args(dt, cfg, precision), cfg["num_warps"], cfg["num_stages"], aligned=aligned))
    # block dW: every supported block size (the tile is the block)
    sizes = list(sddmm.BLOCK_SIZES) + ([256] if include_refused else [])
    for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float32, "tf32")):
        dt = _TL[dtype]
        for bs in sizes:
            refused = bs not in sddmm.BLOCK_SIZES
            cfg = dict(BLOCK_K=32 if dtype == torch.float32 else 64, num_warps=8, num_stages=3) if refused \
                else sddmm.block_config(bs, dtype, interpreter=False)
            specs.append(Spec("block_sddmm", f"{dt} {precision} BLOCK={bs} {_label(cfg)}", sddmm._block_sddmm_kernel,
                              _block_args(dt, bs, cfg, precision), cfg["num_warps"], cfg["num_stages"],
                              dispatch=not refused))
    # routing and the AdamW dense walk: every tile of the menu, the dense dtypes pmp trains
    for tile in elementwise_menu():
        for dt in ("fp32", "bf16", "fp16"):
            specs.append(Spec("gather", f"{dt}->fp32 {_label(tile)}", routing._gather_kernel,
                              _walk_args(dt, ("out_ptr", "fp32"), tile), tile["num_warps"]))
            specs.append(Spec("scatter", f"fp32->{dt} {_label(tile)}", routing._scatter_kernel,
                              _walk_args(dt, ("values_ptr", "fp32"), tile), tile["num_warps"]))
        specs.append(Spec("adamw_apply_update", f"fp32 {_label(tile)}", masked_adamw._apply_update_kernel,
                          _walk_args("fp32", ("update_ptr", "fp32"), tile, decay="fp32"), tile["num_warps"]))
    # masked AdamW, compact pass
    cfg = masked_adamw.compact_config()
    for has_master in (True, False):
        a = dict(master_ptr="*fp32", grad_ptr="*fp32", exp_avg_ptr="*fp32", exp_avg_sq_ptr="*fp32",
                 update_ptr="*fp32", N="i32", decay="fp32", one_minus_beta1="fp32", beta2="fp32",
                 one_minus_beta2="fp32", bias_correction2_sqrt="fp32", eps="fp32", neg_step_size="fp32",
                 BLOCK=cfg["BLOCK"], HAS_MASTER=has_master)
        for aligned in (True, False):
            specs.append(Spec("adamw_compact", f"HAS_MASTER={has_master} {_label(cfg)}",
                              masked_adamw._adamw_compact_kernel, a, cfg["num_warps"], aligned=aligned))
    # multi-tensor masked AdamW: one compact launch over all tensors of a group (ALIGNED: every address 16-B
    # aligned, as torch allocations are), then one dense write per (dense dtype, tile)
    scalars = dict(decay="fp32", one_minus_beta1="fp32", beta2="fp32", one_minus_beta2="fp32",
                   bias_correction2_sqrt="fp32", eps="fp32", neg_step_size="fp32")
    for aligned in (True, False):
        specs.append(Spec("adamw_compact_multi", f"ALIGNED={int(aligned)} {_label(cfg)}",
                          masked_adamw._adamw_compact_multi_kernel,
                          dict(work_ptr="*i32", table_ptr="*i64", update_ptr="*fp32", **scalars, BLOCK=cfg["BLOCK"],
                               ALIGNED=aligned), cfg["num_warps"]))
    for tile in elementwise_menu():
        for dt, apply in (("fp32", False), ("bf16", False), ("fp16", False), ("fp32", True)):
            a = dict(work_ptr="*i32", table_ptr="*i64", dense_type_ptr=f"*{dt}", update_ptr="*fp32", decay="fp32",
                     BLOCK_R=tile["BLOCK_R"], BLOCK_C=tile["BLOCK_C"], APPLY_UPDATE=apply)
            specs.append(Spec("adamw_dense_multi", f"{'apply update' if apply else 'scatter'} fp32->{dt} "
                                                   f"{_label(tile)}", masked_adamw._dense_multi_kernel, a,
                              tile["num_warps"]))
    # split-K dW: the reduction of the fp32 workspace [S, nnz] (the dW kernels take the split as runtime
    # arguments, so the specs above are the split launches too); slices start at s * nnz, often unaligned
    cfg = sddmm.split_reduce_config()
    for aligned in (True, False):
        specs.append(Spec("split_reduce", _label(cfg), sddmm._split_reduce_kernel,
                          dict(ws_ptr="*fp32", out_ptr="*fp32", N="i32", S="i32", BLOCK=cfg["BLOCK"]),
                          cfg["num_warps"], aligned=aligned))
    # bit masks (setup-time, not per step)
    specs.append(Spec("pack", f"BLOCK={bitmask.PACK_BLOCK}", bitmask._pack_kernel, dict(
        mask_ptr="*u8", words_ptr="*i32", C="i32", W="i32", n_words_total="i32", stride_mr="i32", stride_wr="i32",
        BLOCK=bitmask.PACK_BLOCK), hot=False))
    specs.append(Spec("unpack", f"BLOCK={bitmask.UNPACK_BLOCK}", bitmask._unpack_kernel, dict(
        words_ptr="*i32", mask_ptr="*u8", C="i32", n_total="i32", stride_wr="i32", stride_mr="i32",
        BLOCK=bitmask.UNPACK_BLOCK), hot=False))
    specs.append(Spec("row_popcount", f"BLOCK_R={bitmask.POPCOUNT_BLOCK_R} BLOCK_W={bitmask.POPCOUNT_BLOCK_W}",
                      bitmask._row_popcount_kernel, dict(
                          words_ptr="*i32", out_ptr="*i32", R="i32", W="i32", stride_wr="i32",
                          BLOCK_R=bitmask.POPCOUNT_BLOCK_R, BLOCK_W=bitmask.POPCOUNT_BLOCK_W), hot=False))
    return specs


# ---------------------------------------------------------------- compiling one spec
def _source(spec: Spec):
    names = list(spec.fn.arg_names)
    if set(names) != set(spec.args):
        raise ValueError(f"spec for {spec.kernel} names {sorted(spec.args)} but the kernel takes {names}")
    const_names = {p.name for p in spec.fn.params if p.is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        ty = spec.args[name]
        if name in const_names or not isinstance(ty, str):
            signature[name] = "constexpr"
            constexprs[name] = ty
            continue
        signature[name] = ty
        if ty.startswith("*") or (spec.aligned and ty.startswith("i")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = max(int(m) for m in re.findall(r"Used (\d+) registers", log))
    stores = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", log))
    return regs, stores, loads


def compile_spec(spec: Spec, target_name: str) -> Result:
    target, limit = TARGETS[target_name]
    res = Result(spec.kernel, spec.config + ("" if spec.aligned else " unaligned"), target_name, spec.hot,
                 spec.dispatch, shared_limit=limit)
    t0 = time.perf_counter()
    try:
        backend = triton.compiler.make_backend(target)
        opts = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        k = triton.compile(_source(spec), target=target, options=opts.__dict__)
        res.shared = int(k.metadata.shared)
        res.registers, res.spill_stores, res.spill_loads = _ptxas_usage(k.asm["ptx"], target.arch)
    except Exception as e:  # a compile error is a finding, reported with the others
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    res.seconds = time.perf_counter() - t0
    if res.error:
        res.problems.append(f"compile error: {res.error}")
    else:
        if res.shared > limit:
            res.problems.append(f"shared memory {res.shared} B > {limit} B limit of {target_name}")
        if spec.hot and (res.spill_stores or res.spill_loads):
            res.problems.append(f"{res.spill_stores} B spill stores / {res.spill_loads} B spill loads")
    return res


def run(specs: list[Spec], targets: list[str], jobs: int = 2) -> list[Result]:
    """Compile every spec for every target (threads: ptxas runs in subprocesses, so two overlap)."""
    if is_interpreting():
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    todo = [(s, t) for t in targets for s in specs]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda st: compile_spec(*st), todo))


def table(results: list[Result]) -> str:
    head = ("kernel", "config", "target", "regs", "spills st/ld B", "smem B", "status")
    rows = [head]
    for r in results:
        if r.dispatch:
            status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
        else:
            status = "refused by dispatch; " + ("; ".join(r.problems) if r.problems else "(no problem found)")
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        rows.append((r.kernel, r.config, r.target, str(r.registers if r.registers is not None else "-"), spills,
                     str(r.shared if r.shared is not None else "-"), status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--include-refused", action="store_true", help="also compile configs the dispatch refuses")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--kernels", nargs="*", help="only these kernels (default: all)")
    args = ap.parse_args(argv)
    specs = dispatch_specs(args.include_refused)
    if args.kernels:
        specs = [s for s in specs if s.kernel in args.kernels]
    t0 = time.perf_counter()
    results = run(specs, args.targets, args.jobs)
    elapsed = time.perf_counter() - t0
    print(table(results))
    bad = [r for r in results if r.dispatch and r.problems]
    print(f"{len(results)} compiles in {elapsed:.1f} s; {len(bad)} with problems")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": elapsed, "results": [asdict(r) for r in results]}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
