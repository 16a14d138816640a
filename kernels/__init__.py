"""Masked-training kernels (Triton) with pure-torch references and one dispatch.

Every op runs the Triton kernel when its tensors are on CUDA and the pure-torch reference
(``pmp.kernels.reference``) otherwise. The environment variable ``PMP_KERNELS`` overrides this:

- ``PMP_KERNELS=torch``: always the reference.
- ``PMP_KERNELS=triton``: Triton also for CPU tensors, which needs ``TRITON_INTERPRET=1`` set before triton is
  imported (the CPU tests do this); raises if triton is missing.
- unset / ``auto``: the default above.

Triton modules are imported lazily, so ``import pmp.kernels`` works without triton and costs nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import torch

from . import reference
from .mask_layout import MaskLayout
from .reference import AdamWEntry

__all__ = [
    "AdamWEntry",
    "MaskLayout",
    "backend",
    "gather_compact",
    "masked_adamw_",
    "masked_adamw_multi_",
    "masked_weight_grad",
    "pack_mask",
    "row_popcount",
    "scatter_compact_",
    "unpack_mask",
]

_MODES = ("auto", "torch", "triton")


@functools.cache
def _has_triton() -> bool:
    """Whether triton is installed, looked up once per process: until triton is imported ``find_spec`` walks
    sys.path (66 us a call on the CPU VM), and every op asks on every call."""
    return importlib.util.find_spec("triton") is not None


def backend(*tensors: torch.Tensor) -> str:
    """Which implementation ("triton" or "torch") an op on ``tensors`` uses under the current environment."""
    mode = os.environ.get("PMP_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"PMP_KERNELS must be one of {_MODES}, got {mode!r}")
    if mode == "torch":
        return "torch"
    has_triton = _has_triton()
    if any(t.is_cuda for t in tensors):
        if mode == "triton" and not has_triton:
            raise RuntimeError("PMP_KERNELS=triton but triton is not installed")
        return "triton" if has_triton else "torch"
    if mode == "triton":
        if not has_triton:
            raise RuntimeError("PMP_KERNELS=triton but triton is not installed")
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "PMP_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1, set before triton is imported"
            )
        return "triton"
    return "torch"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool mask (any shape, 2-D view as in MaskLayout) -> int32 words [rows, ceil(cols / 32)]."""
    if backend(mask) == "triton":
        from .bitmask import pack_mask as impl  # noqa: PLC0415 - lazy Triton: the CPU path never imports the kernels
    else:
        impl = reference.pack_mask
    return impl(mask)


def unpack_mask(words: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """int32 words [rows, ceil(cols / 32)] -> bool [rows, cols]."""
    if backend(words) == "triton":
        from .bitmask import unpack_mask as impl  # noqa: PLC0415 - lazy Triton: the CPU path never imports the kernels
    else:
        impl = reference.unpack_mask
    return impl(words, rows, cols)


def row_popcount(words: torch.Tensor) -> torch.Tensor:
    """Masked entries per row of packed words: int32 [rows]."""
    if backend(words) == "triton":
        from .bitmask import row_popcount as impl  # noqa: PLC0415 - lazy Triton: the CPU path never imports the kernels
    else:
        impl = reference.row_popcount
    return impl(words)


def masked_weight_grad(dy: torch.Tensor, x: torch.Tensor, layout: MaskLayout) -> torch.Tensor:
    """Weight gradient (dy^T x) of a linear layer at the masked entries only: fp32 [nnz], canonical order.

    dy: [..., O], x: [..., I] (leading dims are tokens), layout: mask of the weight (O, I). Accumulates in fp32
    for fp32/fp16/bf16 inputs. The Triton path never allocates a dense dW; block layouts skip empty tiles.
    """
    if backend(dy, x) == "triton":
        from .sddmm import masked_weight_grad as impl  # noqa: PLC0415 - lazy Triton: the CPU path never imports the kernels
    else:
        impl = reference.masked_weight_grad
    return impl(dy, x, layout)


def gather_compact(dense: torch.Tensor, layout: MaskLayout, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Masked entries of ``dense`` in canonical order: [nnz], dtype ``dtype`` (default dense.dtype)."""
    if backend(dense) == "triton":
        from .routing import gather_compact as impl  # noqa: PLC0415 - lazy Triton: the CPU path never imports the kernels
    else:
        impl = reference.gather_compact
    return impl(dense, layout, dtype=dtype)


def scatter_compact_(dense: torch.Tensor, values: torch.Tensor, layout: MaskLayout) -> torch.Tensor:
    """Write ``values`` [nnz] (cast to dense.dtype) into ``dense`` at masked positions in place; returns dense.

    Entries outside the mask are not written (bit-identical before and after).
    """
    if backend(dense, values) == "triton":
        from .routing import scatter_compact_ as impl  # noqa: PLC0415 - lazy Triton: the CPU path never imports the kernels
    else:
        impl = reference.scatter_compact_
    return impl(dense, values, layout)


def masked_adamw_(
    dense: torch.Tensor,
    master: torch.Tensor | None,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    layout: MaskLayout,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> torch.Tensor:
    """One AdamW step (torch.optim.AdamW semantics, decoupled decay, 1-based ``step``) on compact fp32 state.

    ``master``, ``grad``, ``exp_avg``, ``exp_avg_sq``: contiguous fp32 [nnz], updated in place (grad is only
    read). ``dense`` (fp32/bf16/fp16, the weight the forward uses) receives ``master`` cast to its dtype at
    masked positions; entries outside the mask are not written. ``master=None`` (fp32 ``dense`` only): the
    dense weight holds the masked values itself, so no compact copy exists (saves 4 B per masked entry).
    Returns ``dense``.
    """
    if backend(dense, grad) == "triton":
        from .masked_adamw import masked_adamw_ as impl  # noqa: PLC0415 - lazy Triton: the CPU path never imports the kernels
    else:
        impl = reference.masked_adamw_
    return impl(
        dense, master, grad, exp_avg, exp_avg_sq, layout,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
    )


def masked_adamw_multi_(
    entries: Sequence[AdamWEntry],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    cache: dict | None = None,
) -> None:
    """One AdamW step for several tensors that share hyperparameters and step (e.g. one param group).

    Each entry is an :class:`AdamWEntry`: a masked weight (the :func:`masked_adamw_` arguments) or, with
    ``layout=None``, a densely trained parameter stepped on all its entries. The Triton path runs one compact
    launch for all of them plus one dense-write launch per (dense dtype, tile shape, with/without master);
    ``cache`` (a dict the caller keeps per param group) holds its launch plans between steps. The torch path
    steps the entries one by one exactly as :func:`masked_adamw_` / ``reference.adamw_update_`` do.
    """
    if entries and backend(entries[0].dense, entries[0].grad) == "triton":
        from .masked_adamw import masked_adamw_multi_ as impl  # noqa: PLC0415 - lazy Triton: the CPU path never imports the kernels
    else:
        impl = reference.masked_adamw_multi_
    impl(entries, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, cache=cache)
