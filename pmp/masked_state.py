"""Compact masked training state: only masked entries have gradients, optimizer state and master values.

For every masked tensor W (N entries, nnz masked) we keep one `compact` nn.Parameter of nnz entries in the
mask's canonical order (row-major order of masked entries); it is what the optimizer sees and where the compact
gradient accumulates. The dense W stays a plain tensor in the stock module layout and is what the forward pass
uses, so the model the release ships is exactly what training saw. Nothing ever writes the complement, so it
stays bit-exactly at its values. Two modes:
- master=True: `compact` holds fp32 copies of the masked values, any torch optimizer can step it, and
  `sync_()` writes them into W at masked positions ("gradient routing") after each step. Needed when W is bf16.
- master=False (the trainer's default for fp32 weights): `compact` is a zero-stride gradient sink (4 bytes of
  storage); `pmp.masked_optim.MaskedAdamW` updates W in place at masked positions (the fused Triton kernel on
  CUDA), so no second copy of the masked values exists: 12 B per masked entry (grad + 2 moments) + N/4 B of
  mask instead of 16 B per entry.

Two gradient paths; in both the dense weight has requires_grad=False and `compact` is the only leaf that gets a
gradient, through autograd (so PyTorch's DistributedDataParallel reduces exactly the compact gradients, ~rho of
the dense bytes, and nothing else: train/parallel.py):
- nn.Linear weights: the module's forward is swapped for `MaskedLinearFunction`, whose backward computes dX
  densely and the weight gradient only at masked entries (`pmp.kernels.masked_weight_grad`: the Triton SDDMM
  on CUDA, a torch reference elsewhere). No dense dW is ever kept.
- everything else (embeddings, norms, tied weights, GPT-2 Conv1D): for the duration of each owning module's
  forward the parameter is replaced by `GatherGradFunction(dense, compact)`, the identity on the values whose
  backward gathers the (transient) dense gradient at masked entries into the compact gradient. The callers call
  the model as usual; a tied weight owned by two modules gets both contributions summed by autograd.
Parameters outside the mask's scope (e.g. norms under scope=linear) train densely as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pmp.kernels import MaskLayout, gather_compact, masked_weight_grad, scatter_compact_
from pmp.weight_decay import decay_groups, decays


class MaskedLinearFunction(torch.autograd.Function):
    """y = x W^T + b with dW computed only at masked entries, returned as the gradient of `compact`."""

    @staticmethod
    def forward(ctx, x, weight, bias, compact, layout: MaskLayout):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # do autocast's cast ourselves so backward sees the same operands
            dt = torch.get_autocast_dtype(dev)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.layout = layout
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        dcompact = masked_weight_grad(dy, x, ctx.layout) if ctx.needs_input_grad[3] else None
        return dx, None, dbias, dcompact, None


class GatherGradFunction(torch.autograd.Function):
    """The dense weight's values in forward; in backward the gradient at masked entries, gathered in canonical
    order, becomes the gradient of `compact` (the dense weight itself gets none)."""

    @staticmethod
    def forward(ctx, dense, compact, layout: MaskLayout):
        ctx.layout = layout
        return dense.detach()  # an alias: no copy of the weight

    @staticmethod
    def backward(ctx, grad):
        return None, gather_compact(grad, ctx.layout, dtype=torch.float32), None


def _masked_linear_forward(module: nn.Linear, compact: nn.Parameter, layout: MaskLayout):
    def forward(x):
        return MaskedLinearFunction.apply(x, module.weight, module.bias, compact, layout)

    return forward


@dataclass
class MaskedTensor:
    name: str
    dense: nn.Parameter  # the module's own parameter, in the stock layout
    compact: nn.Parameter  # fp32 master values of the masked entries (or a zero-stride grad sink), canonical order
    layout: MaskLayout
    path: str  # "linear" (SDDMM backward) or "generic" (dense grad gathered by a hook)
    has_master: bool


class MaskedModel:
    """Attaches compact masked state to a stock model; `detach()` restores the plain model."""

    def __init__(self, model: nn.Module, layouts: dict[str, MaskLayout], master: bool = True):
        self.model = model
        self.master = master
        named = dict(model.named_parameters())  # tied weights appear once, under their first name
        missing = sorted(set(layouts) - set(named))
        if missing:
            raise ValueError(f"mask names parameters the model does not have: {missing[:5]}")
        linear_of = {f"{mn}.weight": m for mn, m in model.named_modules() if isinstance(m, nn.Linear)}
        shared = _shared_parameter_ids(model)
        owners: dict[int, list[tuple[nn.Module, str]]] = {}  # every (module, attribute) holding a parameter
        for m in model.modules():
            for attr, q in m.named_parameters(recurse=False):
                owners.setdefault(id(q), []).append((m, attr))
        self.tensors: list[MaskedTensor] = []
        self.dense_trained: dict[str, nn.Parameter] = {}
        self._patched: list[nn.Module] = []
        self._hooks = []
        for name, p in named.items():
            layout = layouts.get(name)
            if layout is None:
                self.dense_trained[name] = p
                continue
            if tuple(layout.shape) != tuple(p.shape):
                raise ValueError(f"mask for {name} has shape {tuple(layout.shape)} but the parameter is "
                                 f"{tuple(p.shape)}: the mask belongs to another model")
            layout = layout.to(p.device)
            if master:
                compact = nn.Parameter(gather_compact(p.detach(), layout, dtype=torch.float32))
            else:
                if p.dtype != torch.float32:
                    raise ValueError(f"{name} is {p.dtype}: without an fp32 master the dense weight must be fp32")
                compact = nn.Parameter(torch.zeros(1, device=p.device).expand(layout.nnz))
            p.requires_grad_(False)
            module = linear_of.get(name)
            if module is not None and id(p) not in shared:
                module.forward = _masked_linear_forward(module, compact, layout)
                self._patched.append(module)
                path = "linear"
            else:
                for owner, attr in owners[id(p)]:
                    self._hooks += _route_gradient(owner, attr, p, compact, layout)
                path = "generic"
            self.tensors.append(MaskedTensor(name, p, compact, layout, path, master))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: a compact tensor decays when its dense tensor does (pmp/weight_decay.py)."""
        dense = list(self.dense_trained.values())
        decay = [t.compact for t in self.tensors if decays(t.dense)] + [p for p in dense if decays(p)]
        no_decay = [t.compact for t in self.tensors if not decays(t.dense)] + [p for p in dense if not decays(p)]
        return decay_groups(decay, no_decay, weight_decay)

    def compact_parameters(self) -> list[nn.Parameter]:
        return [t.compact for t in self.tensors]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [t.compact for t in self.tensors] + list(self.dense_trained.values())

    @torch.no_grad()
    def sync_(self) -> None:
        """Write compact master values into the dense weights at masked positions (no-op without masters)."""
        for t in self.tensors:
            if t.has_master:
                scatter_compact_(t.dense.data, t.compact.data, t.layout)

    def masked_count(self) -> int:
        return sum(t.layout.nnz for t in self.tensors)

    def state_bytes(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Bytes of trainable state: compact master + gradients + optimizer moments + mask layouts."""
        master = sum(t.compact.numel() * 4 for t in self.tensors if t.has_master)
        dense = sum(p.numel() * p.element_size() for p in self.dense_trained.values())
        grads = sum(t.layout.nnz * 4 for t in self.tensors) + dense
        opt = 0
        if optimizer is not None:
            for st in optimizer.state.values():
                opt += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim())
        masks = sum(t.layout.words.numel() * 4 + t.layout.word_prefix.numel() * 4 for t in self.tensors)
        return {"master": master, "grads": grads, "optimizer": opt, "mask": masks}

    def detach(self) -> nn.Module:
        """Restore stock forwards, drop hooks; the model's weights keep their trained values."""
        for m in self._patched:
            del m.forward
        for h in self._hooks:
            h.remove()
        for t in self.tensors:
            t.dense.requires_grad_(True)
        self._patched, self._hooks = [], []
        return self.model


def _route_gradient(owner: nn.Module, attr: str, dense: nn.Parameter, compact: nn.Parameter, layout: MaskLayout):
    """Hooks that make `owner.<attr>` read GatherGradFunction(dense, compact) during owner's forward only."""

    def swap_in(module, args):
        module._parameters[attr] = GatherGradFunction.apply(dense, compact, layout)

    def swap_out(module, args, output):
        module._parameters[attr] = dense

    return [owner.register_forward_pre_hook(swap_in), owner.register_forward_hook(swap_out, always_call=True)]


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}
