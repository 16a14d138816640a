"""Masked AdamW step: dense torch AdamW vs compact torch implementation vs ours (fused kernel).

    python benchmarks/bench_masked_adamw.py               # GPU: 4096x4096 weight, bf16 dense weight
    python benchmarks/bench_masked_adamw.py --O 512 --I 512 --dtype fp32   # CPU default

- dense AdamW: ``torch.optim.AdamW(fused=True)`` on GPU (``foreach=True`` on CPU) stepping the full fp32 weight:
  what a dense run pays per step (16 B/param of state).
- compact torch: ``pmp.kernels.reference.masked_adamw_`` (torch ops on compact fp32 state + index scatter).
- ours: ``pmp.kernels.masked_adamw_`` (fused Triton kernel on GPU; the reference on CPU).
GB/s uses the minimum traffic of the masked step: nnz * (16 read + 12 written + dense element) + the bit mask
(1/4 B per weight entry), and is compared with a measured device copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import add_shape_args, bench_ms, copy_bandwidth_gbs, device, parse_dtype, print_table, write_results

from pmp.kernels import MaskLayout, backend, masked_adamw_, reference

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=10)


def main() -> None:
    dev = device()
    gpu = dev.type == "cuda"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, gpu, tokens=False, dtypes=("fp32", "bf16"))
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    args = ap.parse_args()
    dtype = parse_dtype(args.dtype)
    O, I = args.O, args.I
    N = O * I

    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(dev, nbytes=min(1 << 28, 64 * N))

    p = torch.nn.Parameter(torch.randn(O, I, device=dev))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if gpu else {"foreach": True}))
    opt.step()  # allocate state outside the timed region
    t_dense = bench_ms(opt.step, dev, args.reps)
    dense_bytes = N * (16 + 12)  # read p, g, m, v; write p, m, v (fp32)

    rows = []
    for d in args.densities:
        layout = MaskLayout.from_bool(torch.rand(O, I, device=dev) < d)
        layout.flat_index()
        n = layout.nnz
        dense = torch.randn(O, I, device=dev).to(dtype)
        master = torch.randn(n, device=dev)
        grad = torch.randn(n, device=dev)
        m = torch.zeros(n, device=dev)
        v = torch.zeros(n, device=dev)
        impl = backend(dense, master)
        moved = n * (28 + dense.element_size()) + N // 4
        state = (dense, master, grad, m, v, layout)
        t_ref = bench_ms(functools.partial(reference.masked_adamw_, *state, **HYPER), dev, args.reps)
        row = {
            "density": d,
            "nnz": n,
            "dense AdamW ms": t_dense,
            "dense GB/s": dense_bytes / (t_dense * 1e-3) / 1e9,
            "compact torch ms": t_ref,
            "compact torch GB/s": moved / (t_ref * 1e-3) / 1e9,
            "state MiB dense": 16 * N / 2**20,
            "state MiB compact": (16 * n + layout.state_bytes() - 8 * n) / 2**20,  # flat_index is reference-only
        }
        if impl == "triton":
            t_ours = bench_ms(functools.partial(masked_adamw_, *state, **HYPER), dev, args.reps)
            gbs = moved / (t_ours * 1e-3) / 1e9
            row.update({"ours ms": t_ours, "ours GB/s": gbs, "ours % copy BW": 100 * gbs / copy_gbs,
                        "speedup vs compact torch": t_ref / t_ours})
        rows.append(row)
    print(f"masked AdamW  weight {O}x{I}, dense {args.dtype}  ours={impl}  device={dev}  copy BW {copy_gbs:.1f} GB/s")
    cols = ["density", "nnz", "dense AdamW ms", "dense GB/s", "compact torch ms", "compact torch GB/s",
            "state MiB dense", "state MiB compact"]
    if impl == "triton":
        cols += ["ours ms", "ours GB/s", "ours % copy BW", "speedup vs compact torch"]
    else:
        print("(CPU: ours is the reference path; the fused-kernel columns appear on a GPU)")
    print_table(rows, cols)
    if not args.no_save:
        write_results("masked_adamw", {"O": O, "I": I, "dtype": args.dtype, "ours": impl,
                                       "copy_GBps": copy_gbs}, rows, dev)


if __name__ == "__main__":
    main()
