"""One writer per directory: an exclusive, non-blocking `flock` on DIR/.pmp.lock, held for as long as a verb writes
into DIR (a run, an experiment, a results directory, the data cache).

Two `pmp pretrain --out X` started together used to both "succeed", each leaving half of the run (the final model of
one, the initial weights of the other). With the lock the second stops at once with an error that names the holder
(pid, host, command, start time). The kernel drops the lock when its holder exits, however it exits (SIGKILL
included), so a stale lock file never blocks anyone; the file itself is left in place on purpose (deleting it could
race with the next holder).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".pmp.lock"


class DirectoryLocked(ValueError):
    """Another process writes into this directory."""


@contextmanager
def exclusive(directory: str | Path, what: str) -> Iterator[Path]:
    """Hold the write lock of `directory` (created if missing) for the block, or raise DirectoryLocked."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryLocked(f"{what} {d} is in use by another pmp process ({_holder(path)}); wait for it to "
                                  "finish or stop it, then run again") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield d
    finally:
        os.close(fd)  # releases the flock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
