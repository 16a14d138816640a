"""Resumable checkpoints of the trainer: weights + trainer state in one step directory (format: pmp/step_dir.py).

Layout of RUN/checkpoints/step_00000100/:
  model.safetensors   dense weights (the stock state dict)
  state.safetensors   every tensor of the trainer state (optimizer moments, RNG states, identification scores, ...)
  state.json          the rest of the trainer state (step, phase, data position, ...), tensors by reference:
                      data only, never a pickle (pmp/state_io.py), so resuming a copied run cannot execute code
  manifest.json       step and the sha256 of every file above -- written last, so its presence marks completeness

Weight snapshots (`train.snapshot_every`) go to RUN/snapshots/ (weights only, never deleted): see
`pmp.run_dir.RunDir.weights_at_step`.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pmp.state_io import StateFormatError, load_state, save_state
from pmp.step_dir import (
    WEIGHTS_FILE,
    CheckpointError,
    prune_step_dirs,
    read_manifest,
    step_dir_name,
    verify_files,
    write_step_dir,
)

STATE = "state"  # state.safetensors + state.json


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


def save_checkpoint(ckpt_root: Path, step: int, model_state: dict[str, torch.Tensor], state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`."""
    target = write_step_dir(ckpt_root / step_dir_name(step), step, model_state,
                            lambda tmp: save_state(tmp, STATE, state))
    prune_step_dirs(ckpt_root, keep_last)
    return target


def save_snapshot(snap_root: Path, step: int, model_state: dict[str, torch.Tensor]) -> Path:
    """Write the weights of `step` atomically (no optimizer state: not resumable, only exportable)."""
    return write_step_dir(snap_root / step_dir_name(step), step, model_state, kind="snapshot")


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Verify every file against the manifest, then load. Raises CheckpointError with what is wrong."""
    step, expected = read_manifest(path)
    verify_files(path, expected)
    if (path / "state.pt").is_file() and not (path / f"{STATE}.json").is_file():
        raise CheckpointError(f"checkpoint {path} holds a pickled state.pt (written by an earlier pmp): pmp no longer "
                              "loads pickles, which can execute code; restart the run in a new directory")
    model_state = load_file(str(path / WEIGHTS_FILE))
    try:
        state = load_state(path, STATE)
    except StateFormatError as e:
        raise CheckpointError(f"checkpoint {path}: {e}; delete this checkpoint") from None
    return step, model_state, state
