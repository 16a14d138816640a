"""The attacker's recovered mask: an attack's scores turned into a PrivateMask bundle, and read back for a sparse
fine-tuning attack that trains exactly the recovered entries (does the recovery defeat the protection?).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from pmp.eval.release_weights import Release, Scores
from pmp.mask import PrivateMask
from pmp.model import build_model


def recovered_mask(release: Release, scores: Scores, rho: float, meta: dict | None = None) -> PrivateMask:
    """The attacker's mask: global top-rho entries of `scores` (ties broken by position), as a PrivateMask."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    names = [n for n in release.weights if n in scores]
    if not names:
        raise ValueError("recovered_mask: the scores cover no release parameter")
    flat = torch.cat([scores[n].flatten().float() for n in names])
    k = max(1, round(rho * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    masks, i = {}, 0
    for n in names:
        m = release.weights[n].numel()
        masks[n] = keep[i: i + m].view(release.weights[n].shape)
        i += m
    return PrivateMask.from_bool(masks, {"source": "recovered", "density": rho, **(meta or {})})


def recovered_mask_sparse_attack_inputs(mask_dir: str | Path, release_dir: str | Path) -> dict:
    """What a sparse fine-tuning attack needs to train exactly the recovered entries: the loaded mask's
    layouts (for `pmp.masked_state.MaskedModel` / `pmp.eval.finetune.finetune(..., mask_layouts=...)`), checked
    against the release's parameter names and shapes, plus the record fields for a result cell."""
    mask = PrivateMask.load(mask_dir)
    cfg_file = Path(release_dir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{release_dir} is not a release directory (no config.json)")
    mask.check_matches(build_model(AutoConfig.from_pretrained(str(release_dir)), 0))
    return {"layouts": mask.layouts, "density": mask.density(), "sha256": mask.fingerprint(),
            "mask_info": {"source": "recovered", "path": str(mask_dir), "density": mask.density(),
                          "sha256": mask.fingerprint(), "attack": mask.meta.get("attack")}}
