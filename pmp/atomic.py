"""Atomic file and directory writes: write under a temporary name, fsync, rename.

A crash at any point leaves either the old complete artifact or the new complete one, never a half-written
file that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temp file beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success fsync it and rename it to `path`.

    With overwrite, an existing `path` is replaced only after the new directory is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} appeared while writing; nothing was replaced")
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def owner_only() -> Iterator[None]:
    """Files and directories created in the block are owner-only (0600 / 0700): private artifacts (a run directory,
    an audit) must not be readable by other users of the machine. umask is process-wide, hence restored after."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_leftovers(directory: Path, name: str = "") -> list[Path]:
    """Delete the temporaries an interrupted atomic write leaves (`.NAME.*.tmp`, `.NAME.old`) directly in
    `directory` -- of every NAME, or only of `name`; returns what was removed. Call only where no other process
    writes the same names (under the directory's write lock, or for a target only this verb writes)."""
    removed = []
    if not directory.is_dir():
        return removed
    prefix = f".{name}." if name else "."
    for p in directory.iterdir():
        if p.name.startswith(prefix) and (p.name.endswith(".tmp") or p.name == f".{name}.old" or
                                          (not name and p.name.endswith(".old"))):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
