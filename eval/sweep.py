"""A sweep: models x tasks x attacks x seeds -> one results JSON per cell, resumable. The engine of `pmp attack`
(whose entry point, `run_attack` in eval/attack.py, checks the inputs with eval/attack_inputs.py -- including that
each release is the one its --private run trained -- and builds the sweep).

RESULTS_DIR/
  sweep.json                                    what was asked (models, roles, suite, tasks, seeds), versions
  cells/<model>__<task>__<attack>__s<seed>.json  one finished cell (written atomically)

A cell whose JSON exists, parses, and was computed from the same inputs (`inputs_sha`: attack, budget, task
sizes, model weights, mask) is skipped; a corrupt one, or one computed from other inputs, is recomputed.
Every cell records the same model's frozen-probe metric as `before` (so a cell is self-contained), the learning
curve, the validation-selected and final-step test metrics, budgets, hyper-parameters, seed, versions, commit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import transformers
from tqdm.auto import tqdm

from pmp.atomic import sha256_file, write_json
from pmp.eval.attack_inputs import ModelSpec
from pmp.eval.attacks import Attack, Suite, config_digest
from pmp.eval.finetune import finetune, random_layouts
from pmp.eval.metrics import cell_problem
from pmp.eval.models import head_names, load_model, load_tokenizer
from pmp.eval.task_data import prepare_task
from pmp.mask import PrivateMask
from pmp.provenance import git_commit, versions
from pmp.run_dir import RunDir


def cell_id(model: str, task: str, attack: str, seed: int) -> str:
    return f"{model}__{task}__{attack}__s{seed}"


def read_cell(path: Path) -> dict | None:
    """A finished cell's JSON, or None when missing or corrupt -- unreadable, or lacking a field the report reads
    (`pmp.eval.metrics.cell_problem`) -- so that it is recomputed."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None if cell_problem(d) else d


def _model_sha(spec: ModelSpec) -> str:
    if spec.path is None:
        return "scratch:" + sha256_file(spec.config_from / "config.json")
    files = sorted(spec.path.glob("*.safetensors")) or sorted(spec.path.glob("*.bin"))
    return config_digest([sha256_file(f) for f in files] + [sha256_file(spec.path / "config.json")])


def applicable(spec: ModelSpec, attack: Attack) -> bool:
    if spec.role == "scratch":
        return attack.kind == "probe" or attack.scratch
    if attack.kind == "authorized":
        return spec.private is not None
    if attack.kind == "recovered_mask":
        return spec.recovered is not None
    return True


class Sweep:
    def __init__(self, models: list[ModelSpec], tasks: list, suite: Suite, out: str | Path, seeds: int = 0,
                 mask_density: float = 0.0, progress: bool = True, log=print):
        self.models, self.tasks, self.suite = models, tasks, suite
        self.out, self.cells_dir = Path(out), Path(out) / "cells"
        self.seeds = list(range(seeds or suite.seeds))
        self.progress, self.log = progress, log
        # model name -> the owner's private mask / a mask recovered by an attacker
        self.masks = {m.name: RunDir(m.private).load_mask() for m in models if m.private is not None}
        self.recovered = {m.name: PrivateMask.load(m.recovered) for m in models if m.recovered is not None}
        self.density, self.density_source = self._random_mask_density(mask_density)
        self.versions, self.commit = versions(), git_commit()
        self._model_sha = {m.name: _model_sha(m) for m in models}

    def _random_mask_density(self, flag: float) -> tuple[float, str]:
        """The density of the random masks (the flag, else the private masks', else the suite's) and its source."""
        dens = sorted({round(mk.density(), 6) for mk in self.masks.values()})
        if flag:
            if not 0 < flag <= 1:
                raise ValueError(f"--mask-density must be in (0, 1], got {flag}")
            return flag, "flag"
        if dens:
            if len(dens) > 1:
                self.log(f"[attack] warning: private masks have densities {dens}; random masks use {dens[0]}")
            return dens[0], "private/mask.json"
        return self.suite.mask_density, "suite default (no --private run)"

    # ------------------------------------------------------------------------------------------ plan
    def plan(self) -> list[tuple[ModelSpec, object, Attack, int]]:
        """Cells in run order: task -> seed -> model -> probe first, then the attacks. A partial sweep thus holds
        complete comparisons (every model) for the tasks it has reached."""
        attacks = sorted(self.suite.attacks, key=lambda a: a.kind != "probe")
        return [(m, t, a, s) for t in self.tasks for s in self.seeds for m in self.models for a in attacks
                if applicable(m, a)]

    def inputs_sha(self, m: ModelSpec, task, attack: Attack, seed: int, prepared_sizes: dict | None = None) -> str:
        budget = self.suite.budget(task.kind)
        mask = (self.masks[m.name].fingerprint() if attack.kind == "authorized" else
                self.recovered[m.name].fingerprint() if attack.kind == "recovered_mask" else "")
        dens = self.density if attack.kind == "random_mask" else None
        return config_digest({"attack": attack.to_dict(), "budget": budget.to_dict(), "seed": seed,
                              "task": task.name, "task_sizes": [len(task.train), len(task.test)],
                              "model": self._model_sha[m.name], "mask": mask, "density": dens})

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        transformers.utils.logging.disable_progress_bar()  # one bar over cells is enough
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "sweep.json", self.manifest())
        plan = self.plan()
        t_start, done, skipped = time.perf_counter(), 0, 0
        prepared, probes = {}, {}
        bar = tqdm(plan, desc="attack cells", unit="cell", disable=not self.progress, dynamic_ncols=True)
        for m, task, attack, seed in bar:
            cid = cell_id(m.name, task.name, attack.name, seed)
            path = self.cells_dir / f"{cid}.json"
            sha = self.inputs_sha(m, task, attack, seed)
            old = read_cell(path)
            if old is not None and old.get("inputs_sha") == sha:
                if attack.kind == "probe":
                    probes[(m.name, task.name, seed)] = old
                skipped += 1
                continue
            if path.exists():
                why = "corrupt" if old is None else "computed from other inputs"
                tqdm.write(f"[attack] {cid}: existing result is {why}; recomputing")
            key = (str(m.tokenizer_dir), task.name, seed)
            if key not in prepared:
                if any(k[1:] != key[1:] for k in prepared):
                    prepared.clear()  # one (task, seed) at a time, for every model: the plan is ordered that way
                prepared[key] = prepare_task(task, load_tokenizer(m.tokenizer_dir), self.suite.budget(task.kind), seed)
            pt = prepared[key]
            probe_key = (m.name, task.name, seed)
            if attack.kind != "probe" and probe_key not in probes:
                probe_attack = next(a for a in self.suite.attacks if a.kind == "probe")
                probe_path = self.cells_dir / f"{cell_id(m.name, task.name, probe_attack.name, seed)}.json"
                probes[probe_key] = read_cell(probe_path) or self._run_cell(m, task, pt, probe_attack, seed, None,
                                                                            probe_path)
            rec = self._run_cell(m, task, pt, attack, seed, probes.get(probe_key), path)
            if attack.kind == "probe":
                probes[probe_key] = rec
            done += 1
            tqdm.write(self._line(rec))
        wall = time.perf_counter() - t_start
        self.log(f"[attack] {done} cells run, {skipped} already done, {wall:.0f}s; results in {self.cells_dir}")
        return {"run": done, "skipped": skipped, "wall_seconds": wall, "cells": len(plan)}

    def _mask_of(self, m: ModelSpec, attack: Attack, model, task, seed: int) -> tuple[dict | None, dict]:
        """The layouts a sparse attack trains (None for dense kinds) and the cell's record of that mask."""
        if attack.kind == "authorized":  # resolve_models checked that the release is the one the run trained
            mask = self.masks[m.name]
            return mask.layouts, {"source": "private", "density": mask.density(), "sha256": mask.fingerprint()}
        if attack.kind == "recovered_mask":
            rec = self.recovered[m.name]
            info = {"source": "recovered", "path": str(m.recovered), "density": rec.density(),
                    "sha256": rec.fingerprint(), "attack": rec.meta.get("attack")}
            if m.name in self.masks:  # the owner can say how much of the true mask the attacker found
                info["precision_vs_true_mask"] = rec.overlap(self.masks[m.name]) / max(rec.nnz, 1)
            return rec.layouts, info
        if attack.kind == "random_mask":
            layouts = random_layouts(model, self.density, seed, head_names(model, task.kind))
            return layouts, {"source": "random", "density": self.density, "density_source": self.density_source}
        return None, {}

    def _run_cell(self, m: ModelSpec, task, pt, attack: Attack, seed: int, probe: dict | None, path: Path) -> dict:
        t0 = time.perf_counter()
        budget = self.suite.budget(task.kind)
        model = load_model(m.path, task.kind, pt.num_labels, seed, config_from=m.config_from, pad_id=pt.pad_id)
        layouts, mask_info = self._mask_of(m, attack, model, task, seed)
        res = finetune(model, pt, attack, budget, seed, mask_layouts=layouts)
        metric = res["metric"]
        before = (probe or {}).get("after_val_selected") if attack.kind != "probe" else None
        rec = {
            "status": "done", "format": 1, "cell": path.stem, "inputs_sha": self.inputs_sha(m, task, attack, seed),
            "model": m.name, "model_role": m.role, "model_path": str(m.path) if m.path else None,
            "private_run": str(m.private) if m.private else None,
            "from_scratch_config": str(m.config_from) if m.config_from else None,
            "task": task.name, "task_kind": task.kind, "metric": metric, "direction": res["direction"],
            "attack": attack.name, "attack_kind": attack.kind, "hyperparameters": attack.to_dict(), "seed": seed,
            "budget": {**budget.to_dict(), "steps": res["steps"], "data": pt.sizes},
            "suite": self.suite.name,
            "before": before if attack.kind != "probe" else res["selected"]["test"],
            "before_source": "frozen probe of the same model, task and seed (validation-selected test metric)",
            "after_val_selected": res["selected"]["test"], "selected_step": res["selected"]["step"],
            "selected_val": res["selected"]["val"], "after_final": res["final"]["test"],
            "final_step": res["final"]["step"], "curve": res["curve"], "train_losses": res["train_losses"],
            "trainable_parameters": res["trainable_parameters"], "complement_unchanged": res["complement_unchanged"],
            "mask": mask_info, "versions": self.versions, "git_commit": self.commit,
            "train_seconds": res["train_seconds"], "wall_seconds": time.perf_counter() - t0,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if rec["complement_unchanged"] is False:
            raise RuntimeError(f"{path.stem}: the complement of the mask changed during sparse fine-tuning (bug)")
        write_json(path, rec)
        return rec

    @staticmethod
    def _line(r: dict) -> str:
        return (f"[attack] {r['cell']}: {r['metric']} before {r['before']:.4f} -> val-selected "
                f"{r['after_val_selected']:.4f} (step {r['selected_step']}), final {r['after_final']:.4f} | "
                f"{r['wall_seconds']:.1f}s")

    def manifest(self) -> dict:
        return {"models": [{"name": m.name, "path": str(m.path) if m.path else None, "role": m.role,
                            "private": str(m.private) if m.private else None} for m in self.models],
                "tasks": [{"name": t.name, "kind": t.kind} for t in self.tasks],
                "suite": {"name": self.suite.name, "attacks": [a.to_dict() for a in self.suite.attacks],
                          "classification": self.suite.classification.to_dict(), "lm": self.suite.lm.to_dict()},
                "seeds": self.seeds, "random_mask_density": self.density, "density_source": self.density_source,
                "versions": self.versions, "git_commit": self.commit}

