"""Masked weight gradient, block masks (64 / 128): dense dW vs dense dW + gather vs ours (active tiles only).

    python benchmarks/bench_block_dw.py                   # GPU: 4096x4096, 16k tokens, bf16
    python benchmarks/bench_block_dw.py --O 512 --I 512 --T 1024 --dtype fp32   # CPU default

"eff TFLOP/s" counts only the FLOPs of active tiles (2*T*nnz): the useful work. Expect ours' time to fall
with density until it reaches the floor of reading dY and X once (KERNELS.md: around density 0.25 at
4096^2 x 16k). On the GPU the unstructured kernel is also timed on the same block mask (no tile skipping).
"""

from __future__ import annotations

import argparse

import torch
from common import add_shape_args, bench_ms, device, parse_dtype, print_table, write_results

from pmp.kernels import MaskLayout, backend, masked_weight_grad, reference


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
    t_dense = bench_ms(lambda: dy.T @ x, dev, args.reps)
    dense_flops = 2.0 * T * O * I

    rows = []
    for bs in args.block_sizes:
        for d in args.densities:
            layout = MaskLayout.from_bool(block_mask(O, I, bs, d, dev), block_size=bs)
            layout.flat_index()
            useful = 2.0 * T * layout.nnz
            t_ref = bench_ms(lambda layout=layout: reference.masked_weight_grad(dy, x, layout), dev, args.reps)
            row = {
                "block": bs,
                "density": layout.density,
                "active tiles": layout.active_blocks.shape[0],
                "dense ms": t_dense,
                "dense TFLOP/s": dense_flops / t_dense / 1e9,
                "dense+gather ms": t_ref,
            }
            if impl == "triton":
                from pmp.kernels.sddmm import masked_weight_grad_unstructured  # noqa: PLC0415 - lazy Triton

                ours = lambda layout=layout: masked_weight_grad(dy, x, layout)  # noqa: E731
                torch.testing.assert_close(ours(), reference.masked_weight_grad(dy, x, layout), rtol=2e-2,
                                           atol=2e-2 * float(dy.float().abs().max() * x.float().abs().max() * T**0.5))
                t_ours = bench_ms(ours, dev, args.reps)
                t_unstr = bench_ms(lambda layout=layout: masked_weight_grad_unstructured(dy, x, layout), dev,
                                   args.reps)
                row.update({
                    "ours ms": t_ours,
                    "ours eff TFLOP/s": useful / t_ours / 1e9,
                    "speedup vs dense": t_dense / t_ours,
                    "unstructured kernel ms": t_unstr,
                })
            rows.append(row)
    print(f"block-mask dW  O={O} I={I} T={T} {args.dtype}  ours={impl}  device={dev}")
    cols = ["block", "density", "active tiles", "dense ms", "dense TFLOP/s", "dense+gather ms"]
    if impl == "triton":
        cols += ["ours ms", "ours eff TFLOP/s", "speedup vs dense", "unstructured kernel ms"]
    else:
        print("(CPU: ours is the reference path; the Triton columns appear on a GPU)")
    print_table(rows, cols)
    if not args.no_save:
        write_results("block_dw", {"O": O, "I": I, "T": T, "dtype": args.dtype, "ours": impl}, rows, dev)


if __name__ == "__main__":
    main()
