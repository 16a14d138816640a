"""Bytes each rank communicates per optimizer step under data parallelism: dense vs PMP (masked phase, rho 0.5 and
0.1), for DDP and FSDP2, on 2 CPU processes with gloo.

    python benchmarks/bench_comm.py                     # preset small, 2 ranks, 3 measured steps
    python benchmarks/bench_comm.py --preset tiny --densities 0.5 0.1 0.01

Counted, not computed: DDP through a communication hook that records every gradient bucket it all-reduces (then
runs the stock all-reduce hook), plus DDP's buffer broadcasts (should be 0: per-forward buffer sync is off); FSDP2
by wrapping the torch.distributed collectives it calls (all-gather of weights, reduce-scatter of gradients).
"payload" is the bytes a rank hands to its collectives per step; "sent" is what it puts on the wire with the ring
algorithms gloo and NCCL use (all-reduce 2(W-1)/W x payload, all-gather (W-1) x its shard, reduce-scatter
(W-1)/W x payload). The same trainer objects as `pmp pretrain` are used (pmp.train.parallel, pmp.train.fsdp,
pmp.masked_state): random masks of exactly rho per tensor over the default scope (every matrix; norms train
densely, which is why PMP's DDP ratio sits slightly above rho). One warm-up step, then the mean of --steps steps.

Expectation: DDP all-reduces only the trainable parameters, so PMP sends (rho x matrices + norms) / all of the
dense bytes. FSDP2 (the masked phase compacts inside the optimizer) moves dense bytes whatever rho is.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import print_table, write_results
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from pmp.config import ModelConfig
from pmp.identify import select_top
from pmp.kernels import MaskLayout
from pmp.mask import PrivateMask
from pmp.masked_optim import MaskedAdamW
from pmp.masked_state import MaskedModel
from pmp.model import build_model, hf_config
from pmp.train.fsdp import ShardedMaskedAdamW, shard_model
from pmp.train.parallel import wrap_dense, wrap_masked

VOCAB = 8192
SEQ, BATCH = 64, 2  # per rank
# what FSDP2 calls (torch >= 2.13 names, and the older ones)
COLLECTIVES = {"all_gather_into_tensor": "ag", "all_gather_single": "ag", "reduce_scatter_tensor": "rs",
               "reduce_scatter_single": "rs"}


def layouts_at(model: torch.nn.Module, rho: float, seed: int = 0) -> dict[str, MaskLayout]:
    """Exactly round(rho * n) random entries of every matrix (the default scope)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            out[n] = MaskLayout.from_bool(select_top(torch.rand(p.numel(), generator=g), round(rho * p.numel()))
                                          .view(p.shape))
    return out


class Counter:
    def __init__(self):
        self.bytes = {"ar": 0, "ag": 0, "rs": 0, "bcast": 0}

    def reset(self):
        self.bytes = dict.fromkeys(self.bytes, 0)


def count_ddp(ddp, counter: Counter) -> None:
    def hook(state, bucket):
        buf = bucket.buffer()
        counter.bytes["ar"] += buf.numel() * buf.element_size()
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    real = ddp._distributed_broadcast_coalesced  # buffer sync (probe only: a private DDP method)

    def bcast(tensors, buffer_size, authoritative_rank=0):
        counter.bytes["bcast"] += sum(t.numel() * t.element_size() for t in tensors)
        return real(tensors, buffer_size, authoritative_rank)

    ddp._distributed_broadcast_coalesced = bcast


def count_collectives(counter: Counter) -> None:
    for name, kind in COLLECTIVES.items():
        real = getattr(dist, name, None)
        if real is None:
            continue

        def wrapped(*args, _real=real, _kind=kind, **kwargs):
            t = kwargs.get("input_tensor", kwargs.get("input", kwargs.get("tensor")))
            if t is None:
                t = args[1] if _kind in ("ag", "rs") and len(args) > 1 else args[0]
            counter.bytes[_kind] += t.numel() * t.element_size()
            return _real(*args, **kwargs)

        setattr(dist, name, wrapped)


def run_config(mode: str, rho: float | None, args, rank: int, world: int, counter: Counter) -> dict:
    cfg = hf_config(ModelConfig(preset=args.preset), VOCAB, 0, 0, SEQ)
    model = build_model(cfg, 1)
    n_params = sum(p.numel() for p in model.parameters())
    layouts = layouts_at(model, rho) if rho is not None else None
    trainable = n_params if rho is None else (
        sum(lay.nnz for lay in layouts.values()) + sum(p.numel() for n, p in model.named_parameters()
                                                      if n not in layouts))
    if mode == "ddp":
        if rho is None:
            net, opt = wrap_dense(model), torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            masked = MaskedModel(model, layouts, master=False)
            net, opt = wrap_masked(model, masked), MaskedAdamW(masked, lr=1e-3)
        count_ddp(net, counter)
    else:
        shard_model(model, torch.device("cpu"))
        net = model
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if rho is None else
               ShardedMaskedAdamW(model, PrivateMask(layouts), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1))
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(args.steps + 1):
        if step == 1:
            counter.reset()  # the first step builds buckets / lazy state
        batch = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        net(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    per_step = {k: v / args.steps for k, v in counter.bytes.items()}
    payload = per_step["ar"] + per_step["ag"] + per_step["rs"] + per_step["bcast"]
    sent = (2 * (world - 1) / world * per_step["ar"] + (world - 1) * per_step["ag"]
            + (world - 1) / world * per_step["rs"] + (world - 1) * per_step["bcast"])
    return {"parallel": mode, "method": "dense" if rho is None else f"pmp rho={rho}",
            "trainable share": trainable / n_params, "all-reduce B": per_step["ar"], "all-gather B": per_step["ag"],
            "reduce-scatter B": per_step["rs"], "buffer bcast B": per_step["bcast"], "payload B/step": payload,
            "sent B/step": sent, "parameters": n_params}


def worker(rank: int, world: int, store: str, args, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counter = Counter()
    count_collectives(counter)  # FSDP2's collectives; DDP's bucket all-reduces are counted by its comm hook
    rows = []
    for mode in args.modes:
        for rho in [None, *args.densities]:
            counter.reset()
            rows.append(run_config(mode, rho, args, rank, world, counter))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "store"), args, out), nprocs=args.world)
        with open(out) as f:
            rows = json.load(f)
    dense = {r["parallel"]: r["sent B/step"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["vs dense"] = r["sent B/step"] / dense[r["parallel"]]
        r["expected"] = r["trainable share"] if r["parallel"] == "ddp" else 1.0
    print(f"preset {args.preset} ({rows[0]['parameters']:,} parameters), {args.world} ranks, gloo on CPU, "
          f"bytes per rank per optimizer step")
    print_table(rows, ["parallel", "method", "all-reduce B", "all-gather B", "reduce-scatter B", "buffer bcast B",
                       "payload B/step", "sent B/step", "vs dense", "expected"])
    if not args.no_save:
        write_results("comm", {"preset": args.preset, "world": args.world, "steps": args.steps, "seq": SEQ,
                               "batch_per_rank": BATCH, "backend": "gloo"}, rows, torch.device("cpu"))


if __name__ == "__main__":
    main()
