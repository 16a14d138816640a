"""Trainer state as data, never as a pickle: a nested structure of dicts, lists, tuples, numbers, strings, None,
torch tensors and numpy arrays is written as `NAME.safetensors` (every tensor / array) + `NAME.json` (the structure,
with each tensor replaced by a reference to its safetensors key).

Run directories are copied between machines and people; loading one must never execute code. `torch.load` of a
pickle can (with `weights_only=False`, and with `weights_only=True` on torch < 2.6), so checkpoints use this format.
Anything else in the structure (an arbitrary object) is refused when saving.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSOR, ARRAY, TUPLE, DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"


class StateFormatError(ValueError):
    """The stored state is not in the expected format (edited, truncated or not written by pmp)."""


def save_state(directory: Path, name: str, state) -> list[Path]:
    """Write `state` as directory/name.safetensors + directory/name.json; returns the two paths."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj, path: str):
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().contiguous().cpu().clone()
            return {TENSOR: path}
        if isinstance(obj, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).astype(_storable(obj.dtype)))
            return {ARRAY: path, "dtype": obj.dtype.str}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and not {TENSOR, ARRAY, TUPLE, DICT} & set(obj):
                return {k: encode(v, f"{path}.{k}") for k, v in obj.items()}
            items = enumerate(obj.items())
            return {DICT: [[encode(k, f"{path}.k{i}"), encode(v, f"{path}.{i}")] for i, (k, v) in items]}
        if isinstance(obj, tuple):
            return {TUPLE: [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return obj.item()
        raise TypeError(f"state entry {path} of type {type(obj).__name__} cannot be stored as data")

    structure = encode(state, "s")
    directory.mkdir(parents=True, exist_ok=True)
    weights, meta = directory / f"{name}.safetensors", directory / f"{name}.json"
    save_file(tensors, str(weights))
    meta.write_text(json.dumps({"format": 1, "state": structure}, allow_nan=True))
    return [weights, meta]


def load_state(directory: Path, name: str):
    """The structure saved by `save_state`; StateFormatError when the files are not that format."""
    weights, meta = directory / f"{name}.safetensors", directory / f"{name}.json"
    try:
        tensors = load_file(str(weights))
        doc = json.loads(meta.read_text())
    except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFormatError(f"{directory}: {name}.safetensors / {name}.json cannot be read ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != 1 or "state" not in doc:
        raise StateFormatError(f"{meta}: not a pmp state file (format 1)")

    def decode(obj):
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if TENSOR in obj:
            return _tensor(tensors, obj[TENSOR], meta)
        if ARRAY in obj:
            return _tensor(tensors, obj[ARRAY], meta).numpy().astype(np.dtype(str(obj["dtype"])))
        if TUPLE in obj:
            return tuple(decode(v) for v in obj[TUPLE])
        if DICT in obj:
            return {_hashable(decode(k)): decode(v) for k, v in obj[DICT]}
        return {k: decode(v) for k, v in obj.items()}

    return decode(doc["state"])


def _storable(dtype: np.dtype) -> np.dtype:
    """numpy dtypes torch/safetensors cannot hold go through int64 (numpy's RNG key is uint32)."""
    return np.dtype(np.int64) if dtype.kind == "u" and dtype.itemsize >= 4 else dtype


def _tensor(tensors: dict, key, meta: Path) -> torch.Tensor:
    if key not in tensors:
        raise StateFormatError(f"{meta} refers to tensor {key!r}, which the .safetensors file does not hold")
    return tensors[key]


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k
