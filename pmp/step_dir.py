"""Step directories: the on-disk format shared by resumable checkpoints and weight snapshots.

RUN/checkpoints/step_00000100/ and RUN/snapshots/step_00000100/ each hold model.safetensors (the stock state dict),
optionally more files (a checkpoint's trainer state), and manifest.json with the step and the sha256 of every other
file. The manifest is written last inside an atomically renamed directory, so its presence marks completeness and
its hashes catch truncation or corruption on load.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from pmp.atomic import atomic_dir, sha256_file, write_json

STEP_RE = re.compile(r"^step_(\d{8})$")
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint (or snapshot) is missing, truncated or corrupt."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_step_dir(target: Path, step: int, model_state: dict[str, torch.Tensor],
                   write_extra: Callable[[Path], None] | None = None, **manifest_extra) -> Path:
    """model.safetensors (+ whatever `write_extra(tmp)` writes) and a manifest with their sha256, written last,
    all atomically (a crash leaves no directory that looks complete)."""
    with atomic_dir(target, overwrite=True) as tmp:
        # safetensors refuses shared storage (tied weights): clone to be safe.
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in model_state.items()}, str(tmp / WEIGHTS_FILE))
        if write_extra is not None:
            write_extra(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        write_json(tmp / MANIFEST_FILE, {"step": step, "sha256": files, "format": 1, **manifest_extra})
    return target


def list_step_dirs(root: Path) -> list[Path]:
    """Complete-looking step directories under `root` (with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


def prune_step_dirs(root: Path, keep_last: int) -> None:
    for old in list_step_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: Path) -> tuple[int, dict]:
    """(step, {file name: sha256}) of a step directory; CheckpointError when it is incomplete or corrupt."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest.json: it is incomplete; delete it and resume "
                              "from an earlier one")
    try:
        manifest = json.loads(manifest_path.read_text())
        return int(manifest["step"]), dict(manifest["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt ({e}); delete this checkpoint") from None


def verify_files(path: Path, expected: dict[str, str | None]) -> None:
    """Every named file exists and has the expected sha256, or CheckpointError saying which does not."""
    for name, digest in expected.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; delete this checkpoint")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt or truncated (sha256 mismatch); delete "
                                  "this checkpoint to resume from an earlier one")


def verified_weights(path: Path) -> Path:
    """The model.safetensors of a step directory, checked against its manifest."""
    _, expected = read_manifest(path)
    verify_files(path, {WEIGHTS_FILE: expected.get(WEIGHTS_FILE)})
    return path / WEIGHTS_FILE
