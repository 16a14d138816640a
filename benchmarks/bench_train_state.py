"""Training state and step time: dense AdamW vs PMP (compact masked state) on real model presets.

    python benchmarks/bench_train_state.py                       # small + base125m state, small step time
    python benchmarks/bench_train_state.py --presets small --densities 0.5 --steps 5

State bytes are measured on the objects a run holds after one optimizer step (gradients + optimizer moments +
masters + mask layouts), not computed from a formula:
- dense: fp32 gradients and AdamW moments for every parameter (12 B/param);
- PMP: compact fp32 gradient + 2 moments per masked entry (no master: the fp32 weight is its own master) +
  the bit-packed mask and its word prefixes (N/4 B). The transient dense gradient of the largest tensor on
  the generic path (embeddings, norms) lives during backward only; it is reported separately.
Masks are random with the global density rho (the state size depends only on the count). The base125m row is
built and stepped with synthetic gradients (no forward pass). Step time: median wall time of a full training
step (forward, backward, clip, optimizer step) on the same batches, dense and PMP in the same run; on CPU the
configurations run interleaved step by step, so load from other processes affects them alike.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import device, print_table, write_results

from pmp.config import ModelConfig
from pmp.kernels import MaskLayout
from pmp.masked_optim import MaskedAdamW
from pmp.masked_state import MaskedModel
from pmp.model import build_model, hf_config
from pmp.presets import PRESETS


def random_layouts(model, rho: float, seed: int = 0) -> dict[str, MaskLayout]:
    g = torch.Generator().manual_seed(seed)
    return {n: MaskLayout.from_bool(torch.rand(p.shape, generator=g) < rho) for n, p in model.named_parameters()}


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))


def optimizer_bytes(opt) -> int:
    return sum(tensor_bytes(v for v in st.values() if torch.is_tensor(v) and v.dim()) for st in opt.state.values())


def dense_state(model) -> dict:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    opt.step()
    out = {"grads": tensor_bytes(p.grad for p in model.parameters()), "optimizer": optimizer_bytes(opt)}
    for p in model.parameters():
        p.grad = None
    return out


def pmp_state(model, rho: float) -> dict:
    mm = MaskedModel(model, random_layouts(model, rho), master=False)
    for t in mm.tensors:
        t.compact.grad = torch.zeros(t.layout.nnz)
    opt = MaskedAdamW(mm, lr=1e-3)
    opt.step()
    out = {"grads": tensor_bytes(t.compact.grad for t in mm.tensors), "optimizer": optimizer_bytes(opt),
           "mask": sum(t.layout.words.numel() * 4 + t.layout.word_prefix.numel() * 4 for t in mm.tensors),
           "transient": max((t.dense.numel() * 4 for t in mm.tensors if t.path == "generic"), default=0)}
    mm.detach()
    return out


class Stepper:
    """One full training step (forward, backward, clip, optimizer step) of a dense or PMP model."""

    def __init__(self, model, pmp_rho: float | None, lr=1e-3):
        self.model = model
        if pmp_rho is None:
            self.mm, self.params = None, list(model.parameters())
            self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.1)
        else:
            self.mm = MaskedModel(model, random_layouts(model, pmp_rho), master=False)
            self.params = self.mm.trainable_parameters()
            self.opt = MaskedAdamW(self.mm, lr=lr, weight_decay=0.1)
        self.dev = next(model.parameters()).device
        self.times: list[float] = []

    def step(self, b, timed: bool) -> None:
        cuda = self.dev.type == "cuda"
        b = b.to(self.dev)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = self.model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - t0)

    def median(self) -> float:
        t = sorted(self.times)
        return t[len(t) // 2]


def time_interleaved(steppers: list[Stepper], batches) -> None:
    """Round-robin over configurations, step by step, so load from other processes hits all of them alike."""
    for i, b in enumerate(batches):
        for s in steppers:
            s.step(b, timed=i > 0)  # the first step allocates optimizer state


def peak_memory_mb(stepper: Stepper, b) -> float | None:
    if stepper.dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(stepper.dev)
    stepper.step(b, timed=False)
    return torch.cuda.max_memory_allocated(stepper.dev) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base125m"])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--time-preset", default="small", help="preset whose CPU step time is measured ('' = none)")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per configuration (+1 warm-up)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    dev = device()
    torch.manual_seed(0)

    rows = []
    for name in args.presets:
        p = PRESETS[name]
        model = build_model(hf_config(ModelConfig(preset=name), p.vocab_size, 0, 0, 256), 0)
        n = sum(q.numel() for q in model.parameters())
        d = dense_state(model)
        dense_total = d["grads"] + d["optimizer"]
        rows.append({"preset": name, "params": n, "rho": 1.0, "method": "dense", "grads_MB": d["grads"] / 1e6,
                     "optim_MB": d["optimizer"] / 1e6, "mask_MB": 0.0, "total_MB": dense_total / 1e6,
                     "x_dense": 1.0, "B_per_param": dense_total / n})
        for rho in args.densities:
            s = pmp_state(model, rho)
            total = s["grads"] + s["optimizer"] + s["mask"]
            rows.append({"preset": name, "params": n, "rho": rho, "method": "pmp", "grads_MB": s["grads"] / 1e6,
                         "optim_MB": s["optimizer"] / 1e6, "mask_MB": s["mask"] / 1e6, "total_MB": total / 1e6,
                         "x_dense": total / dense_total, "B_per_param": total / n,
                         "transient_MB": s["transient"] / 1e6})
        del model
    print("\nGradient + optimizer state (+ mask), bytes measured on live objects after one step:")
    print_table(rows, ["preset", "params", "method", "rho", "grads_MB", "optim_MB", "mask_MB", "total_MB",
                       "x_dense", "B_per_param", "transient_MB"])

    timing = []
    if args.time_preset:
        p = PRESETS[args.time_preset]
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, p.vocab_size, (args.batch, args.seq), generator=g) for _ in range(args.steps + 1)]
        tokens = args.batch * args.seq
        rhos = [None, *args.densities]

        def make(rho):
            m = build_model(hf_config(ModelConfig(preset=args.time_preset), p.vocab_size, 0, 0, args.seq), 0)
            return Stepper(m.to(dev), rho)

        if dev.type == "cuda":  # one model on the device at a time: peak memory must not mix configurations
            steppers = []
            for rho in rhos:
                st = make(rho)
                time_interleaved([st], batches)
                st.peak = peak_memory_mb(st, batches[0])
                st.model = st.opt = st.mm = st.params = None
                steppers.append(st)
        else:
            steppers = [make(rho) for rho in rhos]
            time_interleaved(steppers, batches)
        base = steppers[0].median()
        for rho, st in zip(rhos, steppers):
            t = st.median()
            timing.append({"preset": args.time_preset, "method": "dense" if rho is None else "pmp",
                           "rho": rho or 1.0, "step_s": t, "tokens_per_s": tokens / t, "x_dense": t / base,
                           "peak_MB": getattr(st, "peak", None)})
        amp = " bf16 autocast," if dev.type == "cuda" else ""
        print(f"\nTraining step on {dev} ({amp} batch {args.batch} x {args.seq} tokens, median of {args.steps}):")
        print_table(timing, ["preset", "method", "rho", "step_s", "tokens_per_s", "x_dense", "peak_MB"])
    if not args.no_save:
        write_results("train_state", vars(args), rows + timing, dev)


if __name__ == "__main__":
    main()
