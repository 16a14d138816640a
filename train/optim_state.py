"""Optimizer state by parameter name: the bridge between the two checkpoint layouts, so a run resumes in any
parallel mode at any number of ranks.

- One process and DDP checkpoint `optimizer.state_dict()` as is: keyed by parameter index, whole tensors (for a
  masked weight the compact moments [nnz], canonical mask order). DDP replicas hold identical state, so rank 0's
  is everyone's.
- FSDP checkpoints store `{name: step}` plus `'<name>.exp_avg'` / `'<name>.exp_avg_sq'` tensors in dcp/: a dense
  parameter's moments laid out like the parameter, a masked weight's as its global compact vector.

The index order is a pure function of the model and the mask (how the trainer builds its optimizers), so a
name-keyed state converts to an index-keyed one and back without the optimizer that wrote it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from pmp.identify import shaped_like
from pmp.weight_decay import decays

MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_param_names(model: nn.Module, masked: set[str] | None) -> list[str]:
    """Parameter names in the index order of the trainer's optimizer: torch AdamW over `param_groups` in the dense
    phase (masked=None), pmp.masked_optim.MaskedAdamW over `MaskedModel.param_groups` in the masked phase."""
    named = [(n, p) for n, p in model.named_parameters()]
    if masked is None:
        return [n for n, p in named if decays(p)] + [n for n, p in named if not decays(p)]
    inside = [(n, p) for n, p in named if n in masked]
    outside = [(n, p) for n, p in named if n not in masked]
    return ([n for n, p in inside if decays(p)] + [n for n, p in outside if decays(p)]
            + [n for n, p in inside if not decays(p)] + [n for n, p in outside if not decays(p)])


def named_from_indexed(state_dict: dict, names: list[str]) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """An index-keyed optimizer state_dict -> (steps by name, moments by '<name>.<moment>')."""
    steps, tensors = {}, {}
    for i, st in state_dict["state"].items():
        name = names[int(i)]
        steps[name] = int(st["step"])
        for key in MOMENTS:
            tensors[f"{name}.{key}"] = st[key]
    return steps, tensors


def load_named_into(optimizer: torch.optim.Optimizer, names: list[str], steps: dict[str, int],
                    tensors: dict[str, torch.Tensor]) -> None:
    """Load name-keyed state into a one-process / DDP optimizer (torch AdamW or MaskedAdamW) whose parameters are
    in `names` order; 'step' keeps the type that optimizer uses."""
    current = optimizer.state_dict()
    tensor_steps = isinstance(optimizer, torch.optim.AdamW)
    state = {}
    for i, name in enumerate(names):
        if name not in steps:
            continue
        st = {"step": torch.tensor(float(steps[name])) if tensor_steps else int(steps[name])}
        for key in MOMENTS:
            t = tensors[f"{name}.{key}"]
            st[key] = t.full_tensor() if isinstance(t, DTensor) else t
        state[i] = st
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def adamw_named_state(optimizer: torch.optim.AdamW, model: nn.Module,
                      zeros: bool = False) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Name-keyed state of torch AdamW over (FSDP DTensor) parameters; `zeros`: load targets of the same layout."""
    steps, tensors = {}, {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p, {})
        steps[name] = int(st["step"]) if "step" in st else 0
        for key in MOMENTS:
            tensors[f"{name}.{key}"] = torch.zeros_like(p) if zeros or key not in st else st[key]
    return steps, tensors


def load_adamw_named_state(optimizer: torch.optim.AdamW, model: nn.Module, steps: dict[str, int],
                           tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `adamw_named_state`; whole tensors (from a one-process checkpoint) are cut to this rank's part."""
    for name, p in model.named_parameters():
        if steps.get(name, 0) == 0:
            continue
        optimizer.state[p] = {"step": torch.tensor(float(steps[name])),
                              **{key: shaped_like(tensors[f"{name}.{key}"], p).to(p.dtype) for key in MOMENTS}}
