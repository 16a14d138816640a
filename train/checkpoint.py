"""Resumable checkpoints: one directory per step, written atomically, verified on load, last K kept.

Layout of RUN/checkpoints/step_00000100/:
  model.safetensors   dense weights (the stock state dict)
  state.pt            optimizer, data position, RNG states, phase state (identification / mask / compact state)
  manifest.json       step and the sha256 of every file above -- written last, so its presence marks completeness

Weight snapshots (`train.snapshot_every`), RUN/snapshots/step_00000100/: model.safetensors + manifest.json only,
never deleted: the earlier states of a run, e.g. the dense state whose quality matches a PMP model's
(`pmp export --step`, the pipeline's `--matched-baseline`).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pmp.atomic import atomic_dir, sha256_file, write_json

CKPT_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_step_dir(target: Path, step: int, model_state: dict[str, torch.Tensor], state: dict | None = None,
                    **manifest_extra) -> Path:
    """model.safetensors (+ state.pt) and a manifest with their sha256, written last, all atomically."""
    with atomic_dir(target, overwrite=True) as tmp:
        # safetensors refuses shared storage (tied weights): clone to be safe.
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        if state is not None:
            torch.save(state, tmp / "state.pt")
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        write_json(tmp / "manifest.json", {"step": step, "sha256": files, "format": 1, **manifest_extra})
    return target


def save_checkpoint(ckpt_root: Path, step: int, model_state: dict[str, torch.Tensor], state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`."""
    target = _write_step_dir(ckpt_root / f"step_{step:08d}", step, model_state, state)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_snapshot(snap_root: Path, step: int, model_state: dict[str, torch.Tensor]) -> Path:
    """Write the weights of `step` atomically (no optimizer state: not resumable, only exportable)."""
    return _write_step_dir(snap_root / f"step_{step:08d}", step, model_state, kind="snapshot")


def kept_weight_steps(run_root: Path) -> list[int]:
    """Steps whose weights a run kept (RUN/snapshots and RUN/checkpoints), ascending."""
    return sorted({int(CKPT_RE.match(p.name).group(1)) for where in ("snapshots", "checkpoints")
                   for p in list_checkpoints(Path(run_root) / where)})


def weights_at_step(run_root: Path, step: int) -> Path:
    """The verified model.safetensors of `step`, from RUN/snapshots or RUN/checkpoints; a clear error otherwise."""
    for where in ("snapshots", "checkpoints"):
        d = Path(run_root) / where / f"step_{step:08d}"
        if (d / "manifest.json").is_file():
            _, expected = _read_manifest(d)
            _verify_files(d, {"model.safetensors": expected.get("model.safetensors")})
            return d / "model.safetensors"
    raise ValueError(f"{run_root} kept no weights of step {step}; steps with weights: "
                     f"{kept_weight_steps(run_root) or 'none'} "
                     "(train with train.snapshot_every to keep earlier states)")


def _read_manifest(path: Path) -> tuple[int, dict]:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest.json: it is incomplete; delete it and resume "
                              "from an earlier one")
    try:
        manifest = json.loads(manifest_path.read_text())
        return int(manifest["step"]), dict(manifest["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt ({e}); delete this checkpoint") from None


def _verify_files(path: Path, expected: dict[str, str | None]) -> None:
    for name, digest in expected.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; delete this checkpoint")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt or truncated (sha256 mismatch); delete "
                                  "this checkpoint to resume from an earlier one")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete-looking checkpoint directories (with a manifest), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if CKPT_RE.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Verify every file against the manifest, then load. Raises CheckpointError with what is wrong."""
    step, expected = _read_manifest(path)
    _verify_files(path, expected)
    model_state = load_file(str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return step, model_state, state
