"""D0 (eval/d0.py) of one (release, owner mask, task) as one cached JSON record: computed once, skipped when the
file exists, is finished and was computed from the same inputs (`d0_inputs_sha`: model weights, mask, task and its
sizes, budget, seed, learning rates, steps, Hessian settings). Both the durable suite (eval/durable.py,
RES/diagnostics/) and `pmp study` (pmp/study.py, DIR/d0/s<seed>/) run D0 through `ensure_d0`, so a record written
by either has one format: `d0__<model>__<task>.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pmp.atomic import write_json
from pmp.eval.attack_inputs import ModelSpec
from pmp.eval.attacks import Budget, config_digest
from pmp.eval.d0 import CURVATURE_ESTIMATOR, d0_diagnostic, verdict
from pmp.eval.durable_spec import DurableSpec
from pmp.eval.models import load_model
from pmp.eval.sweep import release_digest
from pmp.eval.task_data import PreparedTask
from pmp.mask import PrivateMask
from pmp.provenance import git_commit, versions
from pmp.rescale import RescaleKey, unscale


@dataclass(frozen=True)
class Reference:
    """The unprotected release a protection without an owner secret started from: D0's "owner" arm is the same
    updates of it (`--references NAME=RELEASE`)."""
    path: Path

    def fingerprint(self) -> str:
        return release_digest(self.path)


@dataclass(frozen=True)
class D0Settings:
    """The grid D0 runs: learning rates, step counts (validation loss after each) and the power iteration."""
    lrs: tuple[float, ...]
    steps: tuple[int, ...]
    hessian_iters: int
    hessian_batches: int

    @classmethod
    def of(cls, spec: DurableSpec) -> D0Settings:
        return cls(tuple(spec.d0_lrs), tuple(spec.d0_steps), spec.hessian_iters, spec.hessian_batches)

    def validate(self, prefix: str = "d0_") -> D0Settings:
        """ValueError naming the field (`prefix` + name, as the caller's config spells it)."""
        if not self.lrs or not all(x > 0 for x in self.lrs):
            raise ValueError(f"{prefix}lrs must be learning rates > 0, got {list(self.lrs)}")
        if not self.steps or not all(x >= 1 for x in self.steps):
            raise ValueError(f"{prefix}steps must be step counts >= 1, got {list(self.steps)}")
        if self.hessian_iters < 1 or self.hessian_batches < 1:
            raise ValueError(f"{prefix}hessian_iters and {prefix}hessian_batches must be >= 1, got "
                             f"{self.hessian_iters} and {self.hessian_batches}")
        return self


def d0_path(directory: str | Path, model: str, task: str) -> Path:
    return Path(directory) / f"d0__{model}__{task}.json"


def d0_inputs_sha(model_sha: str, mask_fingerprint: str, task, budget: Budget, seed: int, s: D0Settings) -> str:
    """The digest a D0 record is valid for: changing it (key order does not matter, types do) makes every finished
    D0 recompute -- as it must when the curvature estimator changes (records before the largest-algebraic
    estimator carried the largest-magnitude eigenvalue)."""
    return config_digest({"model": model_sha, "mask": mask_fingerprint, "task": task.name,
                          "task_sizes": [len(task.train), len(task.test)], "budget": budget.to_dict(),
                          "seed": seed, "lrs": list(s.lrs), "steps": list(s.steps),
                          "hessian": [s.hessian_iters, s.hessian_batches], "curvature": CURVATURE_ESTIMATOR})


def read_d0(path: Path) -> dict | None:
    """A finished D0 record, or None when missing or unreadable (it is then recomputed)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("status") == "done" else None


def _owner_of(secret, load_release: Callable[[Path], torch.nn.Module]):
    """(kind, owner_prepare) of an owner secret: a mask needs no preparation; a rescale key un-scales the loaded
    model; a reference replaces its parameters by the reference's (loaded the same way: the same seeded head)."""
    if isinstance(secret, RescaleKey):
        return "rescale key", lambda model: unscale(model, secret)
    if isinstance(secret, Reference):
        def take_reference(model: torch.nn.Module) -> None:
            ref = dict(load_release(secret.path).named_parameters())
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(ref[n])
        return "reference", take_reference
    return "mask", None


def ensure_d0(path: Path, m: ModelSpec, task, mask: PrivateMask | RescaleKey | Reference, mask_from: str,
              budget: Budget, seed: int, settings: D0Settings, model_sha: str,
              prepared: Callable[[], PreparedTask]) -> tuple[dict, bool]:
    """The D0 record of model `m` (a release; `m.path`) with the owner's secret `mask` -- a mask (its owner's, or
    -- a control -- another model's, named by `mask_from`), a rescale key (the owner un-scales, then trains every
    parameter) or the unprotected `Reference` (the same updates of it; eval/d0.py) -- on `task` at `budget` and
    `seed`: read back from `path` when computed from the same inputs, else computed and written -> (record,
    whether it ran). `prepared()` gives the task tokenized for `m` at `budget` and `seed` (called only when D0
    runs: tokenizing is skipped on a resume)."""
    sha = d0_inputs_sha(model_sha, mask.fingerprint(), task, budget, seed, settings)
    old = read_d0(path)
    if old is not None and old.get("inputs_sha") == sha:
        return old, False
    pt = prepared()

    def load():
        return load_model(m.path, task.kind, pt.num_labels, seed, config_from=m.config_from, pad_id=pt.pad_id)

    kind, prepare = _owner_of(mask, lambda p: load_model(p, task.kind, pt.num_labels, seed, pad_id=pt.pad_id))
    res = d0_diagnostic(load, pt, mask.layouts if kind == "mask" else {}, lrs=settings.lrs, steps=settings.steps,
                        batch_size=budget.batch_size, seed=seed, hessian_iters=settings.hessian_iters,
                        hessian_batches=settings.hessian_batches, owner_prepare=prepare, owner_label=kind)
    rec = {"status": "done", "kind": "d0", "model": m.name, "model_role": m.role, "task": task.name,
           "task_kind": task.kind, "mask_from": mask_from, "secret": kind,
           "inputs_sha": sha, **res,
           "verdict": verdict(res["summary"]), "data": pt.sizes, "batch_size": budget.batch_size,
           "versions": versions(), "git_commit": git_commit(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(path, rec)
    tqdm.write(f"[d0] {m.name} / {task.name}: {rec['verdict']}")
    return rec, True
