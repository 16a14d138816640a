"""The release as a mask-recovery attacker sees it: the public weights in fp32, and the dtype they are stored in.

Mask-recovery attacks read the private mask off a public release, using public information only. Every attack maps
the release (+ the public architecture, this code, and data anyone can have) to a score per entry, higher =
"probably masked (trained)". Scores are dicts {parameter name: tensor of the parameter's shape}; an attack that does
not apply to a tensor leaves it out. Nothing that computes scores ever reads a private run directory: the ground
truth enters only in `pmp.eval.audit_truth`, and `pmp.eval.audit` scores these rankings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pmp.eval.models import check_release

Scores = dict[str, torch.Tensor]  # {parameter name: score per entry, the parameter's shape}; higher = "trained"


@dataclass
class Release:
    path: Path
    config: object  # transformers PretrainedConfig
    model: torch.nn.Module  # fp32, eval mode
    weights: dict[str, torch.Tensor]  # named_parameters (fp32 views of the model's parameters)
    storage_dtype: torch.dtype  # dtype of the tensors on disk (bf16 releases compare after rounding)


def load_release(path: str | Path) -> Release:
    """A release directory (stock HF model dir with a tokenizer), loaded in fp32 on CPU."""
    p = check_release(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure means the release cannot be audited
        raise ValueError(f"release {p}: the model cannot be loaded ({type(e).__name__}: {e})") from None
    model.eval()
    dtype = torch.float32
    shards = sorted(p.glob("*.safetensors"))
    if shards:
        with safe_open(str(shards[0]), "pt") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
    weights = {n: prm.detach() for n, prm in model.named_parameters()}
    return Release(p, model.config, model, weights, dtype)


def as_stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as a release stored in `dtype` holds it (rounded, back in fp32): exact comparisons with bf16 weights."""
    return t if dtype == torch.float32 else t.to(dtype).float()
