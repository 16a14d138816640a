"""FSDP2 (`fully_shard`) for models too large to replicate on every rank: weights, gradients and optimizer state
sharded over the ranks (dim 0, torch.chunk boundaries), each decoder block computing on all-gathered weights.

Dense warm-up: the stock model under FSDP2 and torch AdamW on its DTensor parameters. Gradients are
reduce-scattered (averaged over ranks), so identification scores the global gradient: each rank keeps the score
EMA of its shard, mask checks gather the scores (pmp/identify.py) and every rank selects the same full mask.

Masked phase: the model stays stock (dense parameters, ordinary reduce-scatter of the dense gradient) and the
compaction happens inside the optimizer, on each rank's local shard (`ShardedMaskedAdamW`): for a masked weight a
rank keeps the masked entries of its own shard -- the mask cut exactly like the weight --, their fp32 moments and
nothing else, reads its local gradient shard at those entries and writes new values into its local weight shard
there. Nothing ever writes the complement. Across ranks the compact state of a weight is the global compact
vector in the mask's canonical (row-major) order, rank r holding one contiguous slice, which is how checkpoints
store it: independent of the number of ranks (train/checkpoint.py).

Cost vs DDP: FSDP moves dense bytes in both phases (weight all-gathers + a dense gradient reduce-scatter)
whatever rho is, while DDP's masked phase all-reduces ~rho of them (benchmarks/bench_comm.py). Choose FSDP only
when a replica does not fit.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from pmp.identify import shaped_like
from pmp.kernels import MaskLayout, gather_compact, masked_adamw_
from pmp.kernels.reference import adamw_update_
from pmp.mask import PrivateMask
from pmp.weight_decay import decay_groups, decays


def shard_model(model: nn.Module, device: torch.device) -> DeviceMesh:
    """fully_shard every repeated block (the decoder layers), then the root (embeddings, final norm, lm_head)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blocks in _block_lists(model):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The outermost nn.ModuleLists (Llama model.layers, GPT-2 transformer.h)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    inner = {id(c) for m in lists for c in m.modules() if c is not m}
    return [m for m in lists if id(m) not in inner]


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def own_part(t: torch.Tensor, p: DTensor) -> DTensor:
    """This rank's part of the whole tensor `t`, laid out like parameter `p`, in its own storage (so the whole
    tensor can be freed)."""
    mine = local(shaped_like(t, p)).clone()
    return DTensor.from_local(mine, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


@torch.no_grad()
def copy_full_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write whole tensors (a checkpoint, the initial weights) into the model's shards in place: every rank cuts its
    own part, no communication, and the parameters stay the objects the optimizer holds."""
    for name, p in model.named_parameters():
        local(p).copy_(local(shaped_like(state[name], p)))
    for name, b in model.named_buffers():
        if name in state:
            local(b).copy_(local(shaped_like(state[name], b)))


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state_dict on rank 0 (CPU), {} on the other ranks. A collective: every rank calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The dim-0 range rank `rank` holds (torch.chunk boundaries, as FSDP2 and DTensor Shard(0) cut)."""
    chunk = -(-rows // world) if rows else 0
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


class MaskShard:
    """The part of one masked weight a rank owns: the layout of its local shard's mask, and where its compact
    entries sit in the global compact vector of the whole weight."""

    def __init__(self, name: str, layout: MaskLayout, p: DTensor):
        self.name, self.nnz = name, layout.nnz
        full = layout.to_bool()
        mine = local(shaped_like(full, p))
        if tuple(mine.shape) != tuple(local(p).shape):
            raise AssertionError(f"{name}: local mask {tuple(mine.shape)} vs shard {tuple(local(p).shape)}")
        r0, _ = shard_rows(full.shape[0], dist.get_world_size(), dist.get_rank())
        self.offset = int(full.flatten()[:r0 * math.prod(full.shape[1:])].sum())  # entries of the ranks before
        self.layout = MaskLayout.from_bool(mine.cpu()).to(local(p).device)
        self.mesh = p.device_mesh

    def compact_dtensor(self, values: torch.Tensor) -> DTensor:
        """This rank's compact slice as part of the global compact vector [nnz] (uneven contiguous slices)."""
        from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper  # noqa: PLC0415 - private torch API, only for sharded checkpoints

        return DTensor.from_local(LocalShardsWrapper([values], [(self.offset,)]), self.mesh, [Shard(0)],
                                  run_check=False, shape=(self.nnz,), stride=(1,))


class ShardedMaskedAdamW(torch.optim.Optimizer):
    """AdamW on the masked entries of each rank's local weight shards (and on the whole local shard of parameters
    outside the mask, e.g. norms). The op sequence is pmp.kernels' masked AdamW, so a step equals
    pmp.masked_optim.MaskedAdamW on one process given the same gradient."""

    def __init__(self, model: nn.Module, mask: PrivateMask, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        named = dict(model.named_parameters())
        missing = sorted(set(mask.layouts) - set(named))
        if missing:
            raise ValueError(f"mask names parameters the model does not have: {missing[:5]}")
        self.names = {id(p): n for n, p in named.items()}
        self.shards = {id(named[n]): MaskShard(n, lay, named[n]) for n, lay in mask.layouts.items()}
        params = list(named.values())
        super().__init__(decay_groups([p for p in params if decays(p)], [p for p in params if not decays(p)],
                                      weight_decay), {"lr": lr, "betas": betas, "eps": eps,
                                                      "weight_decay": weight_decay})

    def _compact_grad(self, p: torch.Tensor) -> torch.Tensor:
        sh = self.shards.get(id(p))
        g = local(p.grad)
        return gather_compact(g, sh.layout, dtype=torch.float32) if sh is not None else g

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            sh = self.shards.get(id(p))
            shape = (sh.layout.nnz,) if sh is not None else local(p).shape
            state["step"] = 0
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=local(p).device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=local(p).device)
        return state

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the norm of the gradient that trains: masked entries and densely trained parameters, summed over
        ranks (not the dense gradient of frozen entries, which nothing applies). Returns the norm before."""
        grads = [self._compact_grad(p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        dev = grads[0].device if grads else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for g in grads:
            sq += g.double().square().sum()
        dist.all_reduce(sq)
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        local(p.grad).mul_(coef)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                     "weight_decay": group["weight_decay"]}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                state["step"] += 1
                sh = self.shards.get(id(p))
                if sh is None:
                    adamw_update_(local(p), local(p.grad), state["exp_avg"], state["exp_avg_sq"],
                                  step=state["step"], **hyper)
                else:
                    masked_adamw_(local(p), None, self._compact_grad(p).contiguous(), state["exp_avg"],
                                  state["exp_avg_sq"], sh.layout, step=state["step"], **hyper)
        return loss

    # ---------------------------------------------------------------------------- checkpoints
    def named_state(self, zeros: bool = False) -> tuple[dict[str, int], dict[str, DTensor]]:
        """(steps by name, moments by '<name>.exp_avg' / '<name>.exp_avg_sq') in the world-size-independent form:
        a masked weight's moments as its global compact vector, any other parameter's like the parameter.
        `zeros`: fresh zero moments (targets to load a checkpoint into)."""
        steps, tensors = {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                name, state = self.names[id(p)], self._init_state(p)
                steps[name] = state["step"]
                for key in ("exp_avg", "exp_avg_sq"):
                    v = torch.zeros_like(state[key]) if zeros else state[key]
                    sh = self.shards.get(id(p))
                    tensors[f"{name}.{key}"] = sh.compact_dtensor(v) if sh is not None else DTensor.from_local(
                        v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        return steps, tensors

    def load_named_state(self, steps: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `named_state`; `tensors` hold either the DTensors `named_state(zeros=True)` made (loaded from
        a sharded checkpoint) or whole tensors (a one-process checkpoint), of which each rank takes its part."""
        for group in self.param_groups:
            for p in group["params"]:
                name, state = self.names[id(p)], self._init_state(p)
                state["step"] = int(steps[name])
                sh = self.shards.get(id(p))
                for key in ("exp_avg", "exp_avg_sq"):
                    t = tensors[f"{name}.{key}"]
                    if isinstance(t, DTensor):
                        t = t.to_local()
                        t = t.local_shards()[0] if sh is not None else t  # a LocalShardsWrapper of one slice
                    elif sh is not None:
                        t = t[sh.offset:sh.offset + sh.layout.nnz]
                    else:
                        t = local(shaped_like(t, p))
                    state[key].copy_(t)
