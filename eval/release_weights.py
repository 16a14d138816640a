"""The release as a mask-recovery attacker sees it: the public weights in fp32, and the dtype they are stored in.

Mask-recovery attacks read the private mask off a public release, using public information only. Every attack maps
the release (+ the public architecture, this code, and data anyone can have) to a score per entry, higher =
"probably masked (trained)". Scores are dicts {parameter name: tensor of the parameter's shape}; an attack that does
not apply to a tensor leaves it out. Nothing that computes scores ever reads a private run directory: the ground
truth enters only in `pmp.eval.audit_truth`, and `pmp.eval.audit` scores these rankings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pmp.eval.models import check_release, load_pretrained

Scores = dict[str, torch.Tensor]  # {parameter name: score per entry, the parameter's shape}; higher = "trained"


@dataclass
class Release:
    path: Path
    config: object  # transformers PretrainedConfig
    model: torch.nn.Module  # fp32, eval mode
    weights: dict[str, torch.Tensor]  # named_parameters (fp32 views of the model's parameters)
    storage_dtype: torch.dtype  # dtype of the tensors on disk (bf16 releases compare after rounding)


def load_release(path: str | Path) -> Release:
    """A release directory (stock HF model dir with a tokenizer), loaded in fp32 on CPU; weights that are
    incomplete or do not fit the config are refused (`pmp.eval.models.check_release`, `load_pretrained`)."""
    p = check_release(path)
    model = load_pretrained(AutoModelForCausalLM, p, "causal LM").eval()
    weights = {n: prm.detach() for n, prm in model.named_parameters()}
    return Release(p, model.config, model, weights, StoredTensors(p).dtype)


class StoredTensors(Mapping):
    """The tensors of a release's weight files as stored (name -> fp32 tensor, read lazily), and the dtype they are
    stored in: what `pmp.run_dir.check_complement` compares without building the model."""

    def __init__(self, release: str | Path):
        self.path = Path(release)
        self._where: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] = {}
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)
        shards = sorted(self.path.glob("*.safetensors"))
        for f in shards:
            with safe_open(str(f), "pt") as s:
                self._where.update(dict.fromkeys(s.keys(), f))
        if not shards:  # a pickle-format release: memory-mapped, tensors only
            for f in sorted(self.path.glob("*.bin")):
                self._bin.update(_load_bin(f, self.path))
        self.dtype = torch.float32  # of the first tensor: a bf16 release compares after rounding to bf16
        if self._where:
            first = next(iter(self._where))
            with safe_open(str(self._where[first]), "pt") as s:
                self.dtype = _SAFETENSORS_DTYPES.get(s.get_slice(first).get_dtype(), torch.float32)
        elif self._bin:
            self.dtype = next(iter(self._bin.values())).dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._bin:
            return self._bin[name].float()
        if self._last[0] != name:  # readers often look at one tensor twice in a row (shape, then values)
            with safe_open(str(self._where[name]), "pt") as s:
                self._last = (name, s.get_tensor(name).float())
        return self._last[1]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._bin:
            return tuple(self._bin[name].shape)
        with safe_open(str(self._where[name]), "pt") as s:
            return tuple(s.get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._bin or self._where)

    def __len__(self) -> int:
        return len(self._bin or self._where)

    def __contains__(self, name) -> bool:
        return name in self._bin or name in self._where


def _load_bin(f: Path, release: Path) -> dict[str, torch.Tensor]:
    """A pickle-format weight file: memory-mapped where its format allows (zip), else read whole; tensors only."""
    try:
        try:
            return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            return torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not usable weights
        raise ValueError(f"release {release}: {f.name} is truncated, corrupt or not a PyTorch weight file "
                         f"({type(e).__name__}); copy or export the release again") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def as_stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as a release stored in `dtype` holds it (rounded, back in fp32): exact comparisons with bf16 weights."""
    return t if dtype == torch.float32 else t.to(dtype).float()
