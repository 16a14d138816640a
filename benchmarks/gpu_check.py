"""One-command GPU check of pmp.kernels (one H100/H200; sized to finish well under 8 minutes, not yet run on a
GPU): compile, correctness at realistic shapes, and each kernel's ratio to its target. Writes a JSON record
(``--json``, default ``$OUT/gpu_check.json`` when OUT is set).

    pip install -q --no-deps --no-build-isolation -e . && python benchmarks/gpu_check.py   # on the GPU machine
    python benchmarks/gpu_check.py --smoke       # CPU: tiny shapes through the Triton interpreter; checks the script

Sections
- compile: ``python -m pmp.kernels.compile_check`` for sm_90a (registers / spills / shared memory of every
  kernel and config the dispatch can pick).
- dW unstructured (bf16, T = 16384; 4096x4096, 11008x4096, 4096x11008; density 0.1 and 0.5): error against
  ``torch.mm(out_dtype=fp32)``; time against ``dy.T @ x`` (cuBLAS bf16, target ours <= 1.1x) and against
  fp32-output mm + gather; the tuner's timing of every candidate config (and of the cuBLAS-panel fallback).
- dW block (64, 128 at density 0.25): target block 128 <= 0.4x ``dy.T @ x``.
- masked AdamW (bf16 weight with fp32 master; density 0.05 / 0.1 / 0.5): state against the reference, dense
  write exact, complement bit-identical; bandwidth under the 32-B sector byte model against a copy measured in
  the same run (target >= 80 %), beside ``torch.optim.AdamW(fused=True)`` on the dense weight.
- dW split-K (bf16, T = 16384; 768x768, 2048x768, 3072x768 -- base125m-like layers whose 128x128 grids of
  36-144 tiles leave 132 SMs part idle; density 0.5): error of each split against the fp32-output GEMM; time of
  no split, of S = 2 / 4 / ``auto_split_k``, and of the tuned dispatch (which times split against no split)
  against ``dy.T @ x``.
- multi-tensor masked AdamW (all 111 tensors of base125m: bf16 weights with fp32 masters at density 0.1 and 0.5,
  fp32 weights without master at 0.5): one ``masked_adamw_multi_`` call (address tables cached, and rebuilt every
  call as when autograd reallocates the gradients) against a ``masked_adamw_`` call per tensor and against
  ``torch.optim.AdamW(fused=True)`` over dense fp32 tensors of the same shapes; state checked against the
  per-tensor reference.
- probes: a 1-D tensor past the old grid-y limit (68.2 M entries), a weight over 2**31 entries, block size 256.
Exit status 1 on a compile problem, a wrong result or a crash; a missed speed target is reported, not fatal.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

SMOKE = "--smoke" in sys.argv
GPU = torch.cuda.is_available() and not SMOKE
if not GPU:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["PMP_KERNELS"] = "triton"

import triton  # noqa: E402
from common import sector_bytes  # noqa: E402

from pmp import kernels  # noqa: E402
from pmp.kernels import AdamWEntry, MaskLayout, reference, sddmm  # noqa: E402

DEV = "cuda" if GPU else "cpu"
DT = torch.bfloat16
# model: (hidden, layers, intermediate, vocab) of the multi-tensor AdamW section (base125m; a toy for the smoke run)
if GPU:
    S = dict(T=16384, shapes=[(4096, 4096), (11008, 4096), (4096, 11008)], oned=(1 << 26) + (1 << 20), big=46341,
             split_T=16384, split_shapes=[(768, 768), (2048, 768), (3072, 768)], model=(768, 12, 2048, 32000))
else:  # 301 tokens: 3 interpreter BLOCK_K steps, so S = 2 and 3 really split
    S = dict(T=64, shapes=[(96, 160)], oned=5000, big=None, split_T=301, split_shapes=[(96, 160)],
             model=(32, 2, 64, 100))
REPORT: dict = {"device": torch.cuda.get_device_name() if GPU else "cpu (smoke: interpreter, timings meaningless)",
                "torch": torch.__version__, "triton": triton.__version__, "rows": [], "failures": []}
TARGETS: list[dict] = []


def row(**kw) -> None:
    REPORT["rows"].append(kw)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in kw.items()}, default=str), flush=True)


def fail(what: str) -> None:
    REPORT["failures"].append(what)
    print(f"FAIL {what}", flush=True)


def target(name: str, value: float, limit: float, higher_is_better: bool = False) -> None:
    ok = value >= limit if higher_is_better else value <= limit
    status = ("PASS" if ok else "MISS") if GPU else "n/a"  # interpreter timings say nothing about a GPU
    TARGETS.append(dict(name=name, value=value, target=(">=" if higher_is_better else "<=") + f" {limit}",
                        status=status))


def ms(fn) -> float:
    if not GPU:
        fn()
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32-output GEMM of 16-bit inputs (cuBLAS, torch >= 2.8); an fp32 GEMM where torch has none (CPU)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return a.float() @ b.float()


def mm32_gather(dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout) -> torch.Tensor:
    """The fair baseline for the unstructured dW: fp32-output GEMM, then a gather of the masked entries."""
    return kernels.gather_compact(mm32(dy.T, x), layout, dtype=torch.float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def section(name: str, fn) -> None:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # keep going: one failure must not cost the rest of the run
        traceback.print_exc()
        fail(f"{name} crashed: {type(e).__name__}: {str(e)[:300]}")
    print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)


# ---------------------------------------------------------------- sections
def compile_section() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "compile.json")
        cmd = [sys.executable, "-m", "pmp.kernels.compile_check", "--targets", "sm_90a", "--json", out]
        if not GPU:
            cmd += ["--kernels", "adamw_compact", "split_reduce"]  # smoke: the code path, not every kernel
        proc = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True)
        print(proc.stdout[-20000:])
        if not os.path.exists(out):
            fail(f"compile check crashed: {proc.stderr[-2000:]}")
            return
        results = json.load(open(out))["results"]
    REPORT["compile"] = results
    for r in results:
        if r["dispatch"] and r["problems"]:
            fail(f"compile {r['kernel']} [{r['config']}]: {'; '.join(r['problems'])}")


def dw_section() -> None:
    T = S["T"]
    for O, I in S["shapes"]:
        dy = torch.randn(T, O, device=DEV, dtype=DT)
        x = torch.randn(T, I, device=DEV, dtype=DT)
        dense32 = mm32(dy.T, x)
        t_mm = ms(functools.partial(torch.mm, dy.T, x))
        t_mm32 = ms(functools.partial(mm32, dy.T, x))
        for d in (0.1, 0.5):
            mask = torch.rand(O, I, device=DEV) < d
            lay = MaskLayout.from_bool(mask)
            out = kernels.masked_weight_grad(dy, x, lay)  # first call per shape bucket also tunes
            err = rel_err(out, dense32[mask])
            if not err < 1e-3 or out.isnan().any():
                fail(f"dW unstructured {O}x{I} d={d}: rel err {err:.2e}")
            t = ms(functools.partial(kernels.masked_weight_grad, dy, x, lay))
            t_g = ms(functools.partial(mm32_gather, dy, x, lay))
            row(section="dW unstructured", O=O, I=I, T=T, density=d, rel_err=err, ours_ms=t, mm_bf16_ms=t_mm,
                mm_fp32out_ms=t_mm32, mm_fp32out_gather_ms=t_g, ratio_vs_mm=t / t_mm)
            target(f"dW unstructured {O}x{I} d={d} (ours / cuBLAS bf16)", t / t_mm, 1.1)
        for bs in (64, 128):
            rb, cb = -(-O // bs), -(-I // bs)
            blocks = torch.rand(rb, cb, device=DEV) < 0.25
            blocks[0, 0] = True
            mask = blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:O, :I].contiguous()
            lay = MaskLayout.from_bool(mask, block_size=bs)
            out = kernels.masked_weight_grad(dy, x, lay)
            err = rel_err(out, dense32[mask])
            if not err < 1e-3:
                fail(f"dW block {bs} {O}x{I}: rel err {err:.2e}")
            t = ms(functools.partial(kernels.masked_weight_grad, dy, x, lay))
            row(section="dW block", O=O, I=I, T=T, block=bs, density=lay.density, rel_err=err, ours_ms=t,
                mm_bf16_ms=t_mm, ratio_vs_mm=t / t_mm)
            if bs == 128:
                target(f"dW block 128 {O}x{I} d=0.25 (ours / cuBLAS bf16)", t / t_mm, 0.4)
        del dy, x, dense32
    for key, timings in sddmm._TUNER.timings.items():
        row(section="dW tuner", key=[str(k) for k in key],
            timings_ms={json.dumps(c, sort_keys=True): round(t, 4) for c, t in timings})


def adamw_section() -> None:
    src = torch.empty((1 << 28) if GPU else (1 << 16), device=DEV).uniform_()
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (ms(functools.partial(dst.copy_, src)) * 1e-3) / 1e9
    del src, dst
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    for O, I in S["shapes"][:2]:
        N = O * I
        p = torch.nn.Parameter(torch.randn(O, I, device=DEV))
        p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, **({"fused": True} if GPU else {}))
        opt.step()
        t_fused = ms(opt.step)
        del p, opt
        for d in (0.05, 0.1, 0.5):
            mask = torch.rand(O, I, device=DEV) < d
            lay = MaskLayout.from_bool(mask)
            nnz = lay.nnz
            dense = torch.randn(O, I, device=DEV).to(DT)
            st = [torch.randn(nnz, device=DEV), torch.randn(nnz, device=DEV), torch.randn(nnz, device=DEV),
                  torch.rand(nnz, device=DEV)]
            before = dense.clone()
            ref = [t.clone() for t in st]
            kernels.masked_adamw_(dense, st[0], st[1], st[2], st[3], lay, **hyper)
            reference.masked_adamw_(before.clone(), ref[0], ref[1], ref[2], ref[3], lay, **hyper)
            state_ok = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(st, ref))
            if GPU:
                write_ok = torch.equal(dense[mask], st[0].to(DT))
            else:  # the interpreter truncates fp32 -> bf16 stores (KERNELS.md): one bf16 ulp
                write_ok = torch.allclose(dense[mask].float(), st[0].to(DT).float(), rtol=1e-2, atol=0)
            frozen_ok = torch.equal(dense[~mask].view(torch.int16), before[~mask].view(torch.int16))
            if not (state_ok and write_ok and frozen_ok):
                fail(f"masked AdamW {O}x{I} d={d}: state ok {state_ok}, dense write ok {write_ok}, "
                     f"complement ok {frozen_ok}")
            t = ms(functools.partial(kernels.masked_adamw_, dense, *st, lay, **hyper))
            written = sector_bytes(mask, dense.element_size())
            sector = nnz * 28 + N // 4 + written
            minimal = nnz * (28 + dense.element_size()) + N // 4
            pct = 100 * sector / (t * 1e-3) / 1e9 / copy_gbs
            row(section="masked AdamW", O=O, I=I, density=d, nnz=nnz, ours_ms=t, fused_dense_adamw_ms=t_fused,
                copy_gbs=copy_gbs, pct_copy_bw_sector=pct,
                pct_copy_bw_min=100 * minimal / (t * 1e-3) / 1e9 / copy_gbs,
                sectors_touched=written / (N * dense.element_size()))
            target(f"masked AdamW {O}x{I} d={d} (% copy BW, sector model)", pct, 80, higher_is_better=True)
            del dense, st, ref, before


def splitk_section() -> None:
    T = S["split_T"]
    sms = sddmm._sm_count(torch.device(DEV))
    keys_before = set(sddmm._TUNER.timings)
    for O, I in S["split_shapes"]:
        dy = torch.randn(T, O, device=DEV, dtype=DT)
        x = torch.randn(T, I, device=DEV, dtype=DT)
        mask = torch.rand(O, I, device=DEV) < 0.5
        lay = MaskLayout.from_bool(mask)
        want = mm32(dy.T, x)[mask]
        t_mm = ms(functools.partial(torch.mm, dy.T, x))
        cfg = sddmm.dw_configs(DT)[0]
        tiles = triton.cdiv(O, cfg["BLOCK_M"]) * triton.cdiv(I, cfg["BLOCK_N"])
        auto = sddmm.auto_split_k(tiles, T, sms)
        times = {}
        for split in sorted({1, 2, 3 if not GPU else 4, auto}) + [None]:  # None: the tuned dispatch
            out = sddmm.masked_weight_grad(dy, x, lay, split_k=split)  # first call per split also tunes
            err = rel_err(out, want)
            if not err < 1e-3 or out.isnan().any():
                fail(f"dW split-K {O}x{I} split_k={split}: rel err {err:.2e}")
            times[split] = ms(functools.partial(sddmm.masked_weight_grad, dy, x, lay, split_k=split))
            row(section="dW split-K", O=O, I=I, T=T, density=0.5, tiles_128x128=tiles, sms=sms, auto_split=auto,
                split_k="tuned" if split is None else split, rel_err=err, ours_ms=times[split], mm_bf16_ms=t_mm,
                ratio_vs_mm=times[split] / t_mm, speedup_vs_no_split=times[1] / times[split])
        if auto > 1:
            target(f"dW split-K {O}x{I} auto S={auto} (time / no split)", times[auto] / times[1], 1.0)
        target(f"dW split-K {O}x{I} tuned (time / no split)", times[None] / times[1], 1.0)
        del dy, x, want
    for key, timings in sddmm._TUNER.timings.items():
        if key not in keys_before:
            row(section="dW split-K tuner", key=[str(k) for k in key],
                timings_ms={json.dumps(c, sort_keys=True): round(t, 4) for c, t in timings})


def _model_shapes(hidden: int, layers: int, inter: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama-style model (base125m: 111 tensors, 134 M entries)."""
    block = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    return [(vocab, hidden)] + block * layers + [(hidden,), (vocab, hidden)]


def _adamw_multi_case(shapes, dense_dtype: torch.dtype, d: float, with_master: bool, t_fused: float) -> None:
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    entries, refs = [], []
    for sh in shapes:
        mask = torch.rand(sh, device=DEV) < d
        lay = MaskLayout.from_bool(mask)
        dense = torch.randn(sh, device=DEV).to(dense_dtype)
        master = dense[mask].float() if with_master else None
        st = [torch.randn(lay.nnz, device=DEV), torch.randn(lay.nnz, device=DEV), torch.rand(lay.nnz, device=DEV)]
        entries.append(AdamWEntry(dense, master, *st, lay))
        refs.append(AdamWEntry(dense.clone(), master.clone() if with_master else None, *(t.clone() for t in st), lay))
    cache: dict = {}
    kernels.masked_adamw_multi_(entries, cache=cache, **hyper)
    for r in refs:
        reference.masked_adamw_(*r, **hyper)
    pairs = [(e.exp_avg, r.exp_avg) for e, r in zip(entries, refs)] + [(e.exp_avg_sq, r.exp_avg_sq)
                                                                        for e, r in zip(entries, refs)]
    pairs += [(e.master, r.master) for e, r in zip(entries, refs) if with_master]
    ok = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in pairs)
    if dense_dtype == torch.float32 or not GPU:  # the interpreter truncates bf16 stores: one bf16 ulp
        rtol = 1e-5 if dense_dtype == torch.float32 else 1e-2
        ok = ok and all(torch.allclose(e.dense.float(), r.dense.float(), rtol=rtol, atol=1e-6)
                        for e, r in zip(entries, refs))
    else:
        ok = ok and all(torch.equal(e.dense, r.dense) for e, r in zip(entries, refs))
    if not ok:
        fail(f"multi-tensor AdamW {dense_dtype} d={d}: differs from the per-tensor reference")
    del refs, pairs

    def multi():
        kernels.masked_adamw_multi_(entries, cache=cache, **hyper)

    def multi_rebuilt():  # as when autograd hands over new gradient tensors every step
        for plan in cache.values():
            plan.grad_ptrs = None
        multi()

    def per_tensor():
        for e in entries:
            kernels.masked_adamw_(*e, **hyper)

    t_multi, t_rebuilt, t_per = ms(multi), ms(multi_rebuilt), ms(per_tensor)
    (plan,) = cache.values()
    row(section="masked AdamW multi-tensor", dense=str(dense_dtype), master=with_master, density=d,
        tensors=len(entries), numel=sum(math.prod(sh) for sh in shapes), nnz=sum(e.layout.nnz for e in entries),
        launches_multi=sum(1 + len(b.dense) for b in plan.batches), launches_per_tensor=2 * len(entries),
        multi_ms=t_multi, multi_tables_rebuilt_ms=t_rebuilt, per_tensor_ms=t_per, fused_dense_adamw_ms=t_fused,
        speedup_vs_per_tensor=t_per / t_multi, ratio_vs_fused_dense=t_multi / t_fused)
    target(f"multi-tensor AdamW {str(dense_dtype)[6:]} d={d} (multi / per-tensor launches)", t_multi / t_per, 1.0)


def adamw_multi_section() -> None:
    shapes = _model_shapes(*S["model"])
    params = [torch.nn.Parameter(torch.randn(sh, device=DEV)) for sh in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, **({"fused": True} if GPU else {}))
    opt.step()
    t_fused = ms(opt.step)
    del params, opt
    for dense_dtype, d, with_master in ((DT, 0.1, True), (DT, 0.5, True), (torch.float32, 0.5, False)):
        _adamw_multi_case(shapes, dense_dtype, d, with_master, t_fused)


def probes() -> None:
    n = S["oned"]  # 1-D tensor: the old 2-D grid put cdiv(n, 1024) > 65,535 programs on axis 1
    mask = torch.rand(n, device=DEV) < 0.1
    lay = MaskLayout.from_bool(mask)
    v = torch.randn(n, device=DEV)
    ok = torch.equal(kernels.gather_compact(v, lay), v[mask])
    m, s = torch.zeros(lay.nnz, device=DEV), torch.zeros(lay.nnz, device=DEV)
    kernels.masked_adamw_(v, None, torch.ones(lay.nnz, device=DEV), m, s, lay, lr=1e-3, beta1=0.9, beta2=0.95,
                          eps=1e-8, weight_decay=0.0, step=1)
    ok = ok and bool((m != 0).all())
    row(section="probe 1-D past grid-y", numel=n, ok=ok)
    if not ok:
        fail("probe 1-D past grid-y")
    try:
        MaskLayout.from_bool(torch.ones(512, 512, dtype=torch.bool, device=DEV), block_size=256)
        fail("block_size 256 was accepted")
    except ValueError as e:
        row(section="probe block_size 256", refused=str(e)[:200])
    big = S["big"]
    if big:  # > 2**31 entries: int64 offsets everywhere
        O = I = big
        T = 256
        mask = torch.rand(O, I, device=DEV) < 0.01
        lay = MaskLayout.from_bool(mask)
        del mask
        dy = torch.randn(T, O, device=DEV, dtype=DT)
        x = torch.randn(T, I, device=DEV, dtype=DT)
        out = kernels.masked_weight_grad(dy, x, lay)
        flat = lay.flat_index()
        pick = torch.randint(0, lay.nnz, (100_000,), device=DEV)
        r, c = flat[pick] // I, flat[pick] % I
        err = rel_err(out[pick], (dy[:, r].float() * x[:, c].float()).sum(0))
        dense = torch.randn(O, I, device=DEV, dtype=DT)
        g = kernels.gather_compact(dense, lay, dtype=torch.float32)
        ok = err < 1e-3 and torch.equal(g[pick], dense.view(-1)[flat[pick]].float())
        kernels.scatter_compact_(dense, torch.zeros(lay.nnz, device=DEV), lay)
        ok = ok and bool((dense.view(-1)[flat[pick]] == 0).all())
        row(section="probe > 2**31 entries", numel=O * I, rel_err=err, ok=ok)
        if not ok:
            fail("probe > 2**31 entries")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes through the interpreter")
    ap.add_argument("--json", default=os.path.join(os.environ["OUT"], "gpu_check.json") if "OUT" in os.environ
                    else None)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for name, fn in (("compile", compile_section), ("dW", dw_section), ("dW split-K", splitk_section),
                     ("masked AdamW", adamw_section), ("masked AdamW multi-tensor", adamw_multi_section),
                     ("probes", probes)):
        section(name, fn)
    print("\n== targets" + ("" if GPU else " (smoke: interpreter timings, the ratios mean nothing)"))
    for t in TARGETS:
        print(f"{t['status']:4}  {t['name']}: {t['value']:.3g} (target {t['target']})")
    REPORT["targets"] = TARGETS
    REPORT["seconds"] = time.perf_counter() - t0
    print(f"{len(REPORT['failures'])} failures; {REPORT['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(REPORT, f, indent=1, default=str)
    return 1 if REPORT["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
