"""Resumable checkpoints of the trainer: weights + trainer state in one step directory (format: pmp/step_dir.py).

Layout of RUN/checkpoints/step_00000100/:
  model.safetensors   dense weights (the stock state dict)
  state.safetensors   every tensor of the trainer state (optimizer moments, RNG states, identification scores, ...)
  state.json          the rest of the trainer state (step, phase, data position, ...), tensors by reference:
                      data only, never a pickle (pmp/state_io.py), so resuming a copied run cannot execute code
  manifest.json       step and the sha256 of every file above -- written last, so its presence marks completeness

A checkpoint of a sharded (FSDP) run adds one thing, so that every reader of checkpoints works unchanged:
  dcp/                the sharded trainer state (optimizer moments, identification scores), written by every rank
                      through torch.distributed.checkpoint (DCP) in its safetensors storage: one file per rank, the
                      sharding offsets in each file's safetensors header -- no pickle anywhere (DCP's default
                      storage pickles its .metadata; loading that from a copied run could execute code). DCP re-cuts
                      the shards on load, so it resumes at any number of ranks, and in one process.
model.safetensors stays the whole model (gathered on rank 0) and the manifest hashes every file, dcp/* included.

Weight snapshots (`train.snapshot_every`) go to RUN/snapshots/ (weights only, never deleted): see
`pmp.run_dir.RunDir.weights_at_step`.
"""

from __future__ import annotations

import random
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from pmp.atomic import atomic_dir, sha256_file, write_json
from pmp.state_io import StateFormatError, load_state, save_state
from pmp.step_dir import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    prune_step_dirs,
    read_manifest,
    step_dir_name,
    verify_files,
    write_step_dir,
)
from pmp.train.distributed import DistContext

STATE = "state"  # state.safetensors + state.json
DCP_DIR = "dcp"  # the sharded part of an FSDP run's checkpoint


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


def is_sharded(path: Path) -> bool:
    return (path / DCP_DIR).is_dir()


def save_sharded_checkpoint(ctx: DistContext, ckpt_root: Path, step: int, model_state: dict[str, torch.Tensor],
                            state: dict, sharded: dict[str, torch.Tensor], keep_last: int) -> Path:
    """Every rank calls this. `model_state` (whole) and `state` matter on rank 0 only; `sharded` holds every rank's
    DTensors. Atomic like `write_step_dir`: rank 0 opens the temporary directory, every rank writes its file into
    dcp/, rank 0 adds the weights, the state and, last, the manifest, then renames. An error on any rank stops
    every rank and leaves no directory that looks complete."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter  # noqa: PLC0415 - FSDP only (torch >= 2.9)

    target = ckpt_root / step_dir_name(step)
    with ExitStack() as held:
        tmp = Path(ctx.main_first(lambda: str(held.enter_context(atomic_dir(target, overwrite=True)))))
        dcp.save(sharded, storage_writer=HuggingFaceStorageWriter(str(tmp / DCP_DIR), save_distributed=True))

        def finish() -> None:
            save_file({k: v.detach().contiguous().cpu().clone() for k, v in model_state.items()},
                      str(tmp / WEIGHTS_FILE))
            save_state(tmp, STATE, state)
            files = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            write_json(tmp / MANIFEST_FILE, {"step": step, "sha256": files, "format": 1, "layout": "dcp",
                                             "ranks": ctx.world})

        ctx.main_first(finish)  # the directory is renamed into place when `held` closes (rank 0)
    ctx.main_first(lambda: prune_step_dirs(ckpt_root, keep_last))
    return target


def load_sharded(path: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill `targets` from the dcp/ part of checkpoint `path` (already verified by `load_checkpoint`): DTensors get
    this rank's part whatever the number of ranks that wrote it; plain tensors get the whole tensor."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader  # noqa: PLC0415 - FSDP only (torch >= 2.9)

    distributed = any(isinstance(t, DTensor) for t in targets.values())
    try:
        with warnings.catch_warnings():  # "torch.distributed ... uninitialized, assuming ... a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path / DCP_DIR)), no_dist=not distributed)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: the sharded state in {DCP_DIR}/ cannot be loaded ({e}); delete "
                              "this checkpoint") from None
