"""Provenance of a result: the library versions and the source commit it was computed with.

The one home of this record for every part of pmp that writes results (attack cells, run.json of pre-training
and protection runs). A leaf module: it
imports only torch, transformers, peft, the standard library and the package's own `__version__` (pmp/__init__.py,
which imports nothing), so anything in pmp may import it.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch
import transformers

from pmp import __version__ as PMP_VERSION

_SOURCE = Path(__file__).resolve().parent  # the pmp source tree


def versions() -> dict:
    """Versions of the libraries a result depends on (and of Python)."""
    import peft  # noqa: PLC0415 - heavy import; only its version is read, and only when a result is recorded

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "pmp": PMP_VERSION, "python": platform.python_version()}


def git_commit() -> str:
    """HEAD of the pmp source tree (read-only), or 'unknown'."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_SOURCE, text=True, capture_output=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict:
    """What a run's status records when it starts and when it finishes: source commit, library versions, time."""
    import time  # noqa: PLC0415 - keeps the module's imports to the list above

    return {"git_commit": git_commit(), "versions": versions(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
