"""Masked weight gradient, block masks (64 / 128): dense dW ("mm", ``dy.T @ x`` in the input dtype, cuBLAS bf16
on a GPU) and ``torch.mm(..., out_dtype=fp32)`` + gather ("mm32+gather") vs ours (active tiles only).

    python benchmarks/bench_block_dw.py                   # GPU: 4096x4096, 16k tokens, bf16
    python benchmarks/bench_block_dw.py --O 512 --I 512 --T 1024 --dtype fp32   # CPU default

Target: block 128 at density 0.25 takes <= 0.4x the "mm" time. "eff TFLOP/s" counts only the FLOPs of active
tiles (2*T*nnz): the useful work. Expect ours' time to fall with density until it reaches the floor of reading
dY and X once (KERNELS.md: around density 0.25 at 4096^2 x 16k). On the GPU the unstructured kernel is also
timed on the same block mask (no tile skipping). On CPU "ours" is the reference path (``ours=torch``).
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import add_shape_args, bench_ms, device, mm_fp32_out, parse_dtype, print_table, write_results

from pmp.kernels import MaskLayout, backend, gather_compact, masked_weight_grad


def block_mask(O: int, I: int, bs: int, density: float, dev: torch.device) -> torch.Tensor:
    rb, cb = -(-O // bs), -(-I // bs)
    n_active = max(1, round(density * rb * cb))
    blocks = torch.zeros(rb * cb, dtype=torch.bool, device=dev)
    blocks[torch.randperm(rb * cb, device=dev)[:n_active]] = True
    return blocks.view(rb, cb).repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:O, :I].contiguous()


def main() -> None:
    dev = device()
    gpu = dev.type == "cuda"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, gpu)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    args = ap.parse_args()
    dtype = parse_dtype(args.dtype)
    O, I, T = args.O, args.I, args.T

    torch.manual_seed(0)
    dy = torch.randn(T, O, device=dev, dtype=dtype)
    x = torch.randn(T, I, device=dev, dtype=dtype)
    impl = backend(dy, x)
    has_mm32 = mm_fp32_out(dy[:1].T, x[:1]) is not None
    t_dense = bench_ms(lambda: dy.T @ x, dev, args.reps)
    dense_flops = 2.0 * T * O * I

    rows = []
    for bs in args.block_sizes:
        for d in args.densities:
            layout = MaskLayout.from_bool(block_mask(O, I, bs, d, dev), block_size=bs)
            layout.flat_index()
            useful = 2.0 * T * layout.nnz
            ours = functools.partial(masked_weight_grad, dy, x, layout)

            def mm32_gather(layout=layout):
                return gather_compact(mm_fp32_out(dy.T, x), layout, dtype=torch.float32)

            if gpu:  # correctness guard before timing
                want = mm32_gather() if has_mm32 else gather_compact(dy.float().T @ x.float(), layout)
                torch.testing.assert_close(ours(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
            t_ours = bench_ms(ours, dev, args.reps)
            row = {
                "block": bs,
                "density": layout.density,
                "active tiles": layout.active_blocks.shape[0],
                "mm ms": t_dense,
                "mm TFLOP/s": dense_flops / t_dense / 1e9,
                "mm32+gather ms": bench_ms(mm32_gather, dev, args.reps) if has_mm32 else None,
                "ours ms": t_ours,
                "ours eff TFLOP/s": useful / t_ours / 1e9,
                "ours/mm": t_ours / t_dense,
            }
            if impl == "triton":
                from pmp.kernels.sddmm import masked_weight_grad_unstructured  # noqa: PLC0415 - lazy Triton

                row["unstructured kernel ms"] = bench_ms(
                    functools.partial(masked_weight_grad_unstructured, dy, x, layout), dev, args.reps)
            rows.append(row)
    print(f"block-mask dW  O={O} I={I} T={T} {args.dtype}  ours={impl}  device={dev}")
    cols = ["block", "density", "active tiles", "mm ms", "mm TFLOP/s", "mm32+gather ms", "ours ms",
            "ours eff TFLOP/s", "ours/mm"]
    if impl == "triton":
        cols += ["unstructured kernel ms"]
    print("target: block 128 at density 0.25 -> ours/mm <= 0.4")
    print_table(rows, cols)
    if not args.no_save:
        write_results("block_dw", {"O": O, "I": I, "T": T, "dtype": args.dtype, "ours": impl}, rows, dev)


if __name__ == "__main__":
    main()
