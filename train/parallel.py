"""PyTorch DistributedDataParallel around the trainer's model, for both phases of a PMP run.

Dense warm-up: the stock model under DDP; every gradient is all-reduced (averaged), so the identification scores
the global gradient and every rank selects the same mask.

Masked phase: DDP reduces only registered parameters with requires_grad=True. `pmp.masked_state.MaskedModel`
freezes every masked dense weight and routes its gradient into a compact values tensor (nnz entries) through
autograd, so wrapping the stock model together with those compact tensors (`CompactUnit`) makes DDP all-reduce
exactly the compact gradients plus the densely trained norms: ~rho of the dense bytes
(benchmarks/bench_comm.py). The trainable set changes at the switch, so a new wrapper is built then (reusing the
warm-up's would train with un-reduced gradients).

Two DDP settings matter:
- per-forward buffer sync off (`forward_sync_buffers=False` in torch >= 2.13, `broadcast_buffers=False` before):
  the model's only buffers are rotary tables identical on every rank, and syncing them every forward costs a
  broadcast per step for nothing;
- no initial parameter broadcast for the masked wrapper (`init_sync=False`): without a master copy the compact
  tensors are zero-stride gradient sinks that cannot be written, and the ranks already hold identical weights
  (same init, same reduced updates) and a mask whose fingerprint they checked to agree.
"""

from __future__ import annotations

import gc
import inspect

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pmp.masked_state import MaskedModel

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


class CompactUnit(nn.Module):
    """What DDP wraps in the masked phase: the stock model plus the compact values as registered parameters. Lives
    only during training: checkpoints and final/ hold the stock model's own state_dict, never these."""

    def __init__(self, model: nn.Module, masked: MaskedModel):
        super().__init__()
        self.model = model
        self.compact = nn.ParameterList(masked.compact_parameters())

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def ddp(module: nn.Module, init_sync: bool = True) -> DistributedDataParallel:
    kwargs = {"gradient_as_bucket_view": True}
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"] = False
    if not init_sync:
        if "init_sync" not in _DDP_ARGS:
            raise RuntimeError("this torch's DistributedDataParallel has no init_sync argument; pmp needs torch >= "
                               "2.4 for masked training under DDP")
        kwargs["init_sync"] = False
    return DistributedDataParallel(module, **kwargs)


def wrap_dense(model: nn.Module) -> DistributedDataParallel:
    return ddp(model)


def wrap_masked(model: nn.Module, masked: MaskedModel) -> DistributedDataParallel:
    return ddp(CompactUnit(model, masked), init_sync=False)


def release(wrapper: nn.Module | None) -> None:
    """Remove a DDP wrapper's gradient hooks from the parameters before the next wrapper is built (the caller drops
    its reference): a stale reducer would try to reduce the densely trained norms a second time."""
    if isinstance(wrapper, DistributedDataParallel):
        wrapper._remove_autograd_hooks()
    gc.collect()
