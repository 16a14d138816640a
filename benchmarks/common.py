"""Shared benchmark helpers: timing, copy bandwidth, the fp32-output GEMM baseline, the sector byte model,
tables, and the results file.

Timing: CUDA -> ``triton.testing.do_bench`` (CUDA events, L2 flushed between reps, median); CPU -> median of
``time.perf_counter`` over many reps after warm-up. Every script appends one JSON line per run to
``benchmarks/results.jsonl`` with device, commit and date, so a figure in the README can be traced to a run.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pmp.provenance import git_commit

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_ms(fn: Callable[[], object], dev: torch.device, reps: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()``."""
    if dev.type == "cuda":
        import triton.testing  # noqa: PLC0415 - lazy Triton: CPU runs never import it

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, reps), return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_bandwidth_gbs(dev: torch.device, nbytes: int = 1 << 28, reps: int = 20) -> float:
    """Measured device copy bandwidth (read + write bytes per second), the roofline for memory-bound ops."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), dev, reps=reps)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``torch.mm(a, b, out_dtype=torch.float32)`` (16-bit inputs, fp32 accumulate and output: what a user runs
    for an fp32 weight gradient), or None where torch has no such kernel (16-bit inputs on CPU or CUDA torch <
    2.8). fp32 inputs: the plain product, already fp32."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return None


def sector_bytes(mask: torch.Tensor, element_size: int, sector: int = 32) -> int:
    """DRAM bytes to write the masked entries of a contiguous dense tensor: GPUs write whole 32-B sectors, so
    every sector holding at least one masked entry costs 32 B (a random mask at density 0.1 touches 81 % of
    the bf16 sectors). Counted exactly from the mask, assuming a 32-B aligned base (CUDA allocations are)."""
    per = sector // element_size
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return int(flat.view(-1, per).any(1).sum()) * sector


def peak_mem_mb(fn: Callable[[], object], dev: torch.device) -> float | None:
    """Peak extra CUDA memory of one call of ``fn`` in MiB (None on CPU)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def add_shape_args(ap, gpu: bool, tokens: bool = True, dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")) -> None:
    """The weight shape / token count / dtype / reps flags every kernel benchmark shares (GPU: 4096^2, 16k tokens,
    bf16; CPU: 512^2, 1k tokens, fp32)."""
    ap.add_argument("--O", type=int, default=4096 if gpu else 512)
    ap.add_argument("--I", type=int, default=4096 if gpu else 512)
    if tokens:
        ap.add_argument("--T", type=int, default=16384 if gpu else 1024)
    ap.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=list(dtypes),
                    help="dtype of the dense weight / activations")
    ap.add_argument("--reps", type=int, default=100 if gpu else 30)
    ap.add_argument("--no-save", action="store_true")


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_results(bench: str, config: dict, rows: list[dict], dev: torch.device) -> None:
    record = {
        "bench": bench,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(dev),
        "torch": torch.__version__,
        "config": config,
        "rows": rows,
    }
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {RESULTS}")


def parse_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
