"""Masked weight gradient, unstructured bit masks: the baselines a user would run vs ours.

    python benchmarks/bench_masked_dw.py                  # GPU: 4096x4096, 16k tokens, bf16
    python benchmarks/bench_masked_dw.py --O 512 --I 512 --T 1024 --dtype fp32   # CPU default

Baselines (all in the input dtype's fast path, as a user would write them):
- "mm": ``dy.T @ x`` in the input dtype (cuBLAS bf16 on a GPU): what autograd does for a dense weight. The
  target is ours <= 1.1x this time.
- "mm32+gather": ``torch.mm(dy.T, x, out_dtype=torch.float32)`` (cuBLAS, fp32 output; torch >= 2.8 on CUDA)
  followed by a gather of the masked entries: the simplest way to get the same fp32 compact output.
  Where torch has no fp32-output GEMM (CPU), this column is empty.
(The previous "dense + gather" baseline ran the reference's fp32 GEMM, ~15x slower than bf16 cuBLAS on a GPU;
it is pmp's CPU path, not a baseline.)
TFLOP/s counts the dense product 2*T*O*I. "out MiB" is what each path materialises. On CPU the dispatch runs the
pure-torch reference (the Triton interpreter is far too slow to time), so "ours" times the reference there
(``ours=torch`` in the header): CPU figures only show that the script works.
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import (
    add_shape_args,
    bench_ms,
    device,
    mm_fp32_out,
    parse_dtype,
    peak_mem_mb,
    print_table,
    write_results,
)

from pmp.kernels import MaskLayout, backend, gather_compact, masked_weight_grad


def main() -> None:
    dev = device()
    gpu = dev.type == "cuda"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, gpu)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--split-k", type=int, default=None,
                    help="token slices of the Triton dW kernel (default: the dispatch decides; needs the Triton path)")
    args = ap.parse_args()
    dtype = parse_dtype(args.dtype)
    O, I, T = args.O, args.I, args.T

    torch.manual_seed(0)
    dy = torch.randn(T, O, device=dev, dtype=dtype)
    x = torch.randn(T, I, device=dev, dtype=dtype)
    flops = 2.0 * T * O * I
    impl = backend(dy, x)
    grad_fn = masked_weight_grad
    if args.split_k is not None:
        if impl != "triton":
            ap.error("--split-k needs the Triton path (a GPU, or PMP_KERNELS=triton with TRITON_INTERPRET=1)")
        from pmp.kernels import sddmm  # noqa: PLC0415 - lazy Triton: CPU runs never import it

        grad_fn = functools.partial(sddmm.masked_weight_grad, split_k=args.split_k)
    has_mm32 = mm_fp32_out(dy[:1].T, x[:1]) is not None

    t_mm = bench_ms(lambda: dy.T @ x, dev, args.reps)
    t_mm32 = bench_ms(lambda: mm_fp32_out(dy.T, x), dev, args.reps) if has_mm32 else None
    rows = []
    for d in args.densities:
        layout = MaskLayout.from_bool(torch.rand(O, I, device=dev) < d)
        layout.flat_index()  # cached outside the timed region (the reference path needs it)
        ours = functools.partial(grad_fn, dy, x, layout)

        def mm32_gather(layout=layout):
            return gather_compact(mm_fp32_out(dy.T, x), layout, dtype=torch.float32)

        if gpu:  # correctness guard before timing (bf16 inputs, fp32 accumulate on both sides)
            want = mm32_gather() if has_mm32 else gather_compact(dy.float().T @ x.float(), layout)
            torch.testing.assert_close(ours(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
        t_ours = bench_ms(ours, dev, args.reps)  # what the dispatch runs here (the header says which)
        t_g = bench_ms(mm32_gather, dev, args.reps) if has_mm32 else None
        rows.append({
            "density": d,
            "nnz": layout.nnz,
            "mm ms": t_mm,
            "mm TFLOP/s": flops / t_mm / 1e9,
            "mm32 ms": t_mm32,
            "mm32+gather ms": t_g,
            "ours ms": t_ours,
            "ours TFLOP/s": flops / t_ours / 1e9 if t_ours else None,
            "ours/mm (target <= 1.1)": t_ours / t_mm if t_ours else None,
            "ours/mm32+gather": t_ours / t_g if t_ours and t_g else None,
            "out MiB mm32+gather": (O * I + layout.nnz) * 4 / 2**20,
            "out MiB ours": layout.nnz * 4 / 2**20,
            "peak MiB mm32+gather": peak_mem_mb(mm32_gather, dev) if has_mm32 else None,
            "peak MiB ours": peak_mem_mb(ours, dev),
        })
    print(f"masked dW  O={O} I={I} T={T} {args.dtype}  ours={impl}  split_k={args.split_k}  device={dev}"
          + ("" if has_mm32 else "  (no fp32-output torch.mm here: mm32 columns empty)"))
    cols = ["density", "nnz", "mm ms", "mm TFLOP/s", "mm32 ms", "mm32+gather ms", "ours ms", "ours TFLOP/s",
            "ours/mm (target <= 1.1)", "ours/mm32+gather", "out MiB mm32+gather", "out MiB ours"]
    if gpu:
        cols += ["peak MiB mm32+gather", "peak MiB ours"]
    print_table(rows, cols)
    if not args.no_save:
        write_results("masked_dw", {"O": O, "I": I, "T": T, "dtype": args.dtype, "ours": impl,
                                    "split_k": args.split_k}, rows, dev)


if __name__ == "__main__":
    main()
