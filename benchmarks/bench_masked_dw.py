"""Masked weight gradient, unstructured bit masks: dense dW vs dense dW + gather (reference) vs ours.

    python benchmarks/bench_masked_dw.py                  # GPU: 4096x4096, 16k tokens, bf16
    python benchmarks/bench_masked_dw.py --O 512 --I 512 --T 1024 --dtype fp32   # CPU default

TFLOP/s counts the dense product 2*T*O*I for every column (all of them compute every tile). "out MiB" is what
each path materialises: the dense fp32 dW, or dense dW + compact vector, or the compact vector only.
On CPU the dispatch runs the pure-torch reference (the Triton interpreter is far too slow to time), so the
"ours" columns stay empty there: the CPU run proves the script works, the GPU run gives the figures.
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import add_shape_args, bench_ms, device, parse_dtype, peak_mem_mb, print_table, write_results

from pmp.kernels import MaskLayout, backend, masked_weight_grad, reference


def main() -> None:
    dev = device()
    gpu = dev.type == "cuda"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, gpu)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    args = ap.parse_args()
    dtype = parse_dtype(args.dtype)
    O, I, T = args.O, args.I, args.T

    torch.manual_seed(0)
    dy = torch.randn(T, O, device=dev, dtype=dtype)
    x = torch.randn(T, I, device=dev, dtype=dtype)
    flops = 2.0 * T * O * I
    impl = backend(dy, x)

    def dense():
        return dy.T @ x  # what autograd does for a dense weight (output in the input dtype)

    rows = []
    for d in args.densities:
        mask = torch.rand(O, I, device=dev) < d
        layout = MaskLayout.from_bool(mask)
        layout.flat_index()  # cached outside the timed region (the reference needs it)

        ref = functools.partial(reference.masked_weight_grad, dy, x, layout)
        ours = functools.partial(masked_weight_grad, dy, x, layout)

        if gpu:  # correctness guard before timing
            torch.testing.assert_close(ours(), ref(), rtol=2e-2, atol=2e-2 * float(ref().abs().max()))
        t_dense = bench_ms(dense, dev, args.reps)
        t_ref = bench_ms(ref, dev, args.reps)
        # on CPU the dispatch runs the reference itself: timing it twice would only show noise
        t_ours = bench_ms(ours, dev, args.reps) if impl == "triton" else None
        rows.append({
            "density": d,
            "nnz": layout.nnz,
            "dense ms": t_dense,
            "dense TFLOP/s": flops / t_dense / 1e9,
            "dense+gather ms": t_ref,
            "ours ms": t_ours,
            "ours TFLOP/s": flops / t_ours / 1e9 if t_ours else None,
            "speedup vs dense+gather": t_ref / t_ours if t_ours else None,
            "out MiB dense+gather": (O * I + layout.nnz) * 4 / 2**20,
            "out MiB ours": layout.nnz * 4 / 2**20,
            "peak MiB dense+gather": peak_mem_mb(ref, dev),
            "peak MiB ours": peak_mem_mb(ours, dev),
            "out MiB dense": O * I * dy.element_size() / 2**20,
        })
    print(f"masked dW  O={O} I={I} T={T} {args.dtype}  ours={impl}  device={dev}")
    cols = ["density", "nnz", "dense ms", "dense TFLOP/s", "dense+gather ms", "ours ms", "ours TFLOP/s",
            "speedup vs dense+gather", "out MiB dense+gather", "out MiB ours"]
    if gpu:
        cols += ["peak MiB dense+gather", "peak MiB ours"]
    print_table(rows, cols)
    if not args.no_save:
        write_results("masked_dw", {"O": O, "I": I, "T": T, "dtype": args.dtype, "ours": impl}, rows, dev)


if __name__ == "__main__":
    main()
