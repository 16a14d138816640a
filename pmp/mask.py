"""The private mask: bit-packed layouts keyed by parameter name, kept outside every state_dict.

On disk (in RUN/private/, never in a release):
  mask.safetensors  one uint8 tensor per parameter: the bit-packed words (1 bit per entry)
  mask.json         metadata (density, scope, scorer, identification step, per-tensor densities, shapes)
                    and the sha256 of the packed bits, checked on load
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from pmp.atomic import atomic_file, write_json
from pmp.kernels import MaskLayout

MASK_FILE = "mask.safetensors"
META_FILE = "mask.json"


@dataclass
class PrivateMask:
    layouts: dict[str, MaskLayout]
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_bool(cls, masks: dict[str, torch.Tensor], meta: dict | None = None,
                  block_sizes: dict[str, int] | None = None) -> PrivateMask:
        """`block_sizes`: per-name block size for block-structured tensors (others are unstructured)."""
        block_sizes = block_sizes or {}
        layouts = {n: MaskLayout.from_bool(m.detach().cpu(), block_size=block_sizes.get(n, 0))
                   for n, m in masks.items()}
        return cls(layouts, dict(meta or {}))

    # ------------------------------------------------------------------ stats
    @property
    def total(self) -> int:
        return sum(lay.rows * lay.cols for lay in self.layouts.values())

    @property
    def nnz(self) -> int:
        return sum(lay.nnz for lay in self.layouts.values())

    def density(self) -> float:
        return self.nnz / max(self.total, 1)

    def per_tensor_density(self) -> dict[str, float]:
        return {n: lay.nnz / max(lay.rows * lay.cols, 1) for n, lay in self.layouts.items()}

    def density_by_kind(self) -> dict[str, float]:
        """Realised density per tensor kind (embeddings, q/k/v/o, mlp, norms, lm_head): global |grad| selection
        can starve whole kinds (q/k projections got ~0 % on a debug run), so runs report this."""
        nnz: dict[str, int] = {}
        tot: dict[str, int] = {}
        for n, lay in self.layouts.items():
            k = tensor_kind(n)
            nnz[k] = nnz.get(k, 0) + lay.nnz
            tot[k] = tot.get(k, 0) + lay.rows * lay.cols
        return {k: nnz[k] / max(tot[k], 1) for k in sorted(nnz)}

    def fingerprint(self) -> str:
        """sha256 over names, shapes and packed bits: identifies the mask exactly."""
        h = hashlib.sha256()
        for n in sorted(self.layouts):
            lay = self.layouts[n]
            h.update(n.encode() + b"\0" + json.dumps(list(lay.shape)).encode() + b"\0")
            h.update(lay.packed_bytes().cpu().numpy().tobytes())
        return h.hexdigest()

    def to_bool(self) -> dict[str, torch.Tensor]:
        return {n: lay.to_bool() for n, lay in self.layouts.items()}

    def overlap(self, other: PrivateMask) -> int:
        """Entries masked in both (over the tensors both cover): precision = overlap / nnz of the guess."""
        return sum(int((lay.to_bool() & other.layouts[n].to_bool()).sum())
                   for n, lay in self.layouts.items() if n in other.layouts)

    # ------------------------------------------------------------------ checks
    def check_matches(self, model: torch.nn.Module) -> None:
        """Raise ValueError unless every mask name is a model parameter of the same shape."""
        params = dict(model.named_parameters())
        extra = sorted(set(self.layouts) - set(params))
        if extra:
            raise ValueError(f"the mask names {len(extra)} parameters this model does not have (e.g. {extra[0]}): "
                             "it belongs to another model")
        for n, lay in self.layouts.items():
            if tuple(lay.shape) != tuple(params[n].shape):
                raise ValueError(f"mask entry {n} has shape {tuple(lay.shape)} but the model's parameter is "
                                 f"{tuple(params[n].shape)}: the mask belongs to another model")
        expected = self.meta.get("names")
        if expected is not None and sorted(expected) != sorted(self.layouts):
            raise ValueError("mask metadata lists other parameters than the stored mask: corrupt mask")

    # ------------------------------------------------------------------ I/O
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {n: lay.packed_bytes().cpu().contiguous() for n, lay in self.layouts.items()}
        with atomic_file(d / MASK_FILE) as f:
            f.write(save(tensors))
        meta = dict(self.meta)
        meta.update({
            "format": 1,
            "names": sorted(self.layouts),
            "shapes": {n: list(lay.shape) for n, lay in self.layouts.items()},
            "block_sizes": {n: lay.block_size for n, lay in self.layouts.items()},
            "nnz": self.nnz,
            "total": self.total,
            "realised_density": self.density(),
            "per_tensor_density": self.per_tensor_density(),
            "sha256": self.fingerprint(),
        })
        write_json(d / META_FILE, meta)

    @classmethod
    def load(cls, directory: str | Path) -> PrivateMask:
        d = Path(directory)
        for f in (MASK_FILE, META_FILE):
            if not (d / f).is_file():
                raise FileNotFoundError(f"no private mask in {d}: {f} is missing")
        try:
            meta = json.loads((d / META_FILE).read_text())
            tensors = load_file(str(d / MASK_FILE))
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
            raise ValueError(f"private mask in {d} cannot be read ({e}): corrupt file") from None
        if sorted(tensors) != sorted(meta.get("names", [])):
            raise ValueError(f"private mask in {d}: {MASK_FILE} and {META_FILE} list different parameters: corrupt")
        layouts = {n: MaskLayout.from_packed(t, tuple(meta["shapes"][n]), meta["block_sizes"].get(n, 0))
                   for n, t in tensors.items()}
        mask = cls(layouts, meta)
        if mask.fingerprint() != meta.get("sha256"):
            raise ValueError(f"private mask in {d} fails its integrity hash: corrupt or edited")
        return mask


TENSOR_KINDS = ("embeddings", "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp", "norms", "lm_head", "biases",
                "other")


def tensor_kind(name: str) -> str:
    """The kind of a parameter of the stock Llama / GPT-2 layouts (one of TENSOR_KINDS), for reports and audits."""
    n = name.lower()
    if "lm_head" in n:
        return "lm_head"
    if "embed" in n or n.endswith(("wte.weight", "wpe.weight")):
        return "embeddings"
    if "norm" in n or ".ln_" in n or "ln_f" in n:
        return "norms"
    if n.endswith(".bias"):
        return "biases"
    for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if k in n:
            return f"attn_{k[0]}"
    if "c_attn" in n:
        return "attn_qkv"
    if "attn.c_proj" in n:
        return "attn_o"
    if "mlp" in n:
        return "mlp"
    return "other"
