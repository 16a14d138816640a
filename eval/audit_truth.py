"""The audit's ground truth: the owner's private mask, read from the private run and checked against the release.

This is the only part of the audit that reads the private run; the attacks never do. A wrong input (a missing dir,
a release passed as the run, a dense run, a run that did not train this release) fails with one clear error.
"""

from __future__ import annotations

from pathlib import Path

from pmp.eval.release_weights import Release
from pmp.mask import PrivateMask
from pmp.run_dir import check_complement, open_private_run


def load_private(private: str | Path, release: Release) -> PrivateMask:
    """The private run's mask, checked against the release: same parameters and shapes, and the mask's complement
    still at the run's initial weights (`pmp.run_dir.check_complement`)."""
    run = open_private_run(private, flag="--private")
    mask = run.load_mask()
    try:
        mask.check_matches(release.model)
    except ValueError as e:
        raise ValueError(f"the release {release.path} does not match the private run {run.root}: {e}") from None
    check_complement(release.weights, mask, run, release.path, release.storage_dtype)
    return mask
