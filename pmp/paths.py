"""Where a verb may write: the one rule that keeps outputs out of the directories it reads.

A verb that reads a public release must never write into it (an audit's mask fingerprints, AUROCs and recovered
mask, or an attack's cells, would be published with the next upload), nor over a private run it reads (it would
mix its output into, or delete, the owner's secrets). Paths are compared after `resolve()`: symlinks, `..` and
relative paths cannot hide an overlap; a path that does not exist yet is resolved as far as it exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

Inputs = Iterable[str | Path] | Mapping[str, str | Path]


def inside(path: str | Path, parent: str | Path) -> bool:
    """`path` is `parent` or lies somewhere below it."""
    p, q = Path(path).resolve(), Path(parent).resolve()
    return p == q or q in p.parents


def overlaps(a: str | Path, b: str | Path) -> bool:
    """`a` and `b` are the same directory, or one lies inside the other."""
    return inside(a, b) or inside(b, a)


def refuse_output_over(out: str | Path, releases: Inputs = (), private_runs: Inputs = (), flag: str = "--out") -> None:
    """Raise ValueError, before anything is written, when the output directory `out` is, contains or lies inside
    one of the `releases` the verb reads (public, or shareable like a recovered mask: nothing may be added to
    them), or is or contains one of the `private_runs` it reads. An output inside a private run is allowed: it
    stays private (`pmp audit` writes RUN/audit by default). Inputs are paths, or {label: path} where the label
    names the input in the message (e.g. "the release --models pmp"). An `out` that exists as a file is refused
    too."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{flag} {out} exists and is not a directory: choose a directory for the output")
    for label, rel in _labelled(releases, "the release"):
        if overlaps(out, rel):
            raise ValueError(f"{flag} {out} {_relation(out, rel)} {rel} ({label}), which this command reads and "
                             "which may be published: choose an output directory outside it")
    for label, run in _labelled(private_runs, "the private run"):
        if inside(run, out):
            raise ValueError(f"{flag} {out} {_relation(out, run)} {run} ({label}): choose another output directory "
                             "(one inside the run, such as RUN/audit, is fine)")


def _labelled(inputs: Inputs, default: str) -> list[tuple[str, Path]]:
    if isinstance(inputs, Mapping):
        return [(label, Path(p)) for label, p in inputs.items()]
    return [(default, Path(p)) for p in inputs]


def _relation(out: Path | str, other: Path) -> str:
    if inside(out, other):
        return "is" if inside(other, out) else "lies inside"
    return "contains"
