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

from tqdm.auto import tqdm

from pmp.atomic import write_json
from pmp.eval.attack_inputs import ModelSpec
from pmp.eval.attacks import Budget, config_digest
from pmp.eval.d0 import CURVATURE_ESTIMATOR, d0_diagnostic, verdict
from pmp.eval.durable_spec import DurableSpec
from pmp.eval.models import load_model
from pmp.eval.task_data import PreparedTask
from pmp.mask import PrivateMask
from pmp.provenance import git_commit, versions
from pmp.rescale import RescaleKey, unscale


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


def ensure_d0(path: Path, m: ModelSpec, task, mask: PrivateMask | RescaleKey, mask_from: str, budget: Budget,
              seed: int, settings: D0Settings, model_sha: str,
              prepared: Callable[[], PreparedTask]) -> tuple[dict, bool]:
    """The D0 record of model `m` (a release; `m.path`) with the owner's secret `mask` -- a mask (its owner's, or
    -- a control -- another model's, named by `mask_from`) or a rescale key (the owner un-scales, then trains every
    parameter; eval/d0.py) -- on `task` at `budget` and `seed`: read back from `path` when computed from the same
    inputs, else computed and written -> (record, whether it ran). `prepared()` gives the task tokenized for `m` at
    `budget` and `seed` (called only when D0 runs: tokenizing is skipped on a resume)."""
    sha = d0_inputs_sha(model_sha, mask.fingerprint(), task, budget, seed, settings)
    old = read_d0(path)
    if old is not None and old.get("inputs_sha") == sha:
        return old, False
    pt = prepared()

    def load():
        return load_model(m.path, task.kind, pt.num_labels, seed, config_from=m.config_from, pad_id=pt.pad_id)

    key = mask if isinstance(mask, RescaleKey) else None
    res = d0_diagnostic(load, pt, {} if key else mask.layouts, lrs=settings.lrs, steps=settings.steps,
                        batch_size=budget.batch_size, seed=seed, hessian_iters=settings.hessian_iters,
                        hessian_batches=settings.hessian_batches,
                        owner_prepare=(lambda model: unscale(model, key)) if key else None)
    rec = {"status": "done", "kind": "d0", "model": m.name, "model_role": m.role, "task": task.name,
           "task_kind": task.kind, "mask_from": mask_from, "secret": "rescale key" if key else "mask",
           "inputs_sha": sha, **res,
           "verdict": verdict(res["summary"]), "data": pt.sizes, "batch_size": budget.batch_size,
           "versions": versions(), "git_commit": git_commit(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(path, rec)
    tqdm.write(f"[d0] {m.name} / {task.name}: {rec['verdict']}")
    return rec, True
