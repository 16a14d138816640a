"""A sweep: models x tasks x attacks x seeds -> one results JSON per cell, resumable.

RESULTS_DIR/
  sweep.json                                    what was asked (models, roles, suite, tasks, seeds), versions
  cells/<model>__<task>__<attack>__s<seed>.json  one finished cell (written atomically)

A cell whose JSON exists, parses, and was computed from the same inputs (`inputs_sha`: attack, budget, task
sizes, model weights, mask) is skipped; a corrupt one, or one computed from other inputs, is recomputed.
Every cell records the same model's frozen-probe metric as `before` (so a cell is self-contained), the learning
curve, the validation-selected and final-step test metrics, budgets, hyper-parameters, seed, versions, commit.

Models: `--models NAME=PATH` releases (any HF causal-LM directory with a tokenizer), `--private NAME=RUN` the
owner's run directory for the PMP model(s) (enables `authorized` attacks and gives the random-mask density), and
the `from_scratch` reference (the first release's config.json, random init) which runs the probe and every attack
marked `scratch`. Roles: `protected` (has --private, or is named pmp*), `baseline` (--baseline NAME, else the
model named dense*), `scratch`, `other`.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pmp.atomic import sha256_file, write_json
from pmp.eval.attacks import Attack, Suite, fingerprint
from pmp.eval.finetune import finetune, random_layouts
from pmp.eval.probes import check_private_run, check_release, head_names, load_model, load_tokenizer, prepare_task

SCRATCH = "from_scratch"


@dataclass
class ModelSpec:
    name: str
    path: Path | None  # None for from_scratch
    role: str  # protected | baseline | matched | scratch | other
    private: Path | None = None
    config_from: Path | None = None  # from_scratch: the release whose config.json gives the architecture
    recovered: Path | None = None  # a mask recovered from the release by an attacker (`pmp audit`)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path if self.path is not None else self.config_from


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what} takes NAME=PATH pairs, got {it!r}")
        if "__" in name or "/" in name or name == SCRATCH:
            raise ValueError(f"{what}: model name {name!r} may not contain '__' or '/' nor be {SCRATCH!r}")
        if name in out:
            raise ValueError(f"{what}: model name {name!r} given twice")
        out[name] = path
    return out


def resolve_models(models: dict[str, str], private: dict[str, str] | None = None, baseline: str = "",
                   scratch: bool = True, recovered: dict[str, str] | None = None,
                   matched: str = "") -> list[ModelSpec]:
    """Check every input (releases load, private runs are runs, recovered masks load) and assign roles.
    `matched`: a second dense baseline whose pre-training quality matches the protected model's (an earlier
    state of the dense run, `pmp export --step`): gains are also compared against it."""
    private, recovered = private or {}, recovered or {}
    if not models:
        raise ValueError("no models: pass --models NAME=PATH [NAME=PATH ...]")
    for flag, given in (("--private", private), ("--recovered", recovered)):
        unknown = sorted(set(given) - set(models))
        if unknown:
            raise ValueError(f"{flag} names {unknown} that are not in --models ({', '.join(models)})")
    if baseline and baseline not in models:
        raise ValueError(f"--baseline {baseline!r} is not one of the models: {', '.join(models)}")
    if matched and matched not in models:
        raise ValueError(f"--matched {matched!r} is not one of the models: {', '.join(models)}")
    if not baseline:
        baseline = next((n for n in models if n.startswith("dense") and n not in private and n != matched), "")
    if matched and matched == baseline:
        raise ValueError(f"--matched {matched!r} is also the baseline; the matched baseline is a second dense model")
    specs = []
    for name, path in models.items():
        rel = check_release(path)
        load_tokenizer(rel)
        priv = check_private_run(private[name]) if name in private else None
        role = ("baseline" if name == baseline else "matched" if name == matched else
                "protected" if priv is not None or name.startswith("pmp") else "other")
        rec = None
        if name in recovered:
            from pmp.eval.mask_recovery import recovered_mask_sparse_attack_inputs

            rec = Path(recovered[name])
            recovered_mask_sparse_attack_inputs(rec, rel)  # loads and checks it against the release
        specs.append(ModelSpec(name, rel, role, priv, recovered=rec))
    if scratch:
        ref = next((s for s in specs if s.role == "baseline"), specs[0])
        specs.append(ModelSpec(SCRATCH, None, "scratch", config_from=ref.path))
    return specs


def resolve_tasks(names: str = "default", cache_dir: str = "", task_file: str = "", text_column: str = "text",
                  label_column: str = "label", lm_file: str = "") -> list:
    """TaskData for: the default tasks ('default'), a comma list of registered tasks, plus user files."""
    from pmp.data.tasks import default_classification_tasks, default_lm_probe, list_tasks, load_task, load_task_file
    from pmp.eval.probes import lm_task_from_text

    wanted: list[str] = []
    for n in [x.strip() for x in (names or "").split(",") if x.strip()]:
        if n == "default":
            # the LM probe first: it is where pre-training clearly helps (DESIGN.md, validity), so a partial
            # sweep has the most informative comparison
            wanted += [default_lm_probe()] + default_classification_tasks()
        elif n in ("none", ""):
            continue
        elif n not in list_tasks():
            raise ValueError(f"unknown task {n!r}; valid tasks: default, none, {', '.join(list_tasks())} "
                             "(or --task-file / --lm-file for your own data)")
        else:
            wanted.append(n)
    # user files first: they fail fast (missing columns) before any slow loading
    tasks = []
    if task_file:
        tasks.append(load_task_file(task_file, text_column, label_column))
    if lm_file:
        tasks.append(lm_task_from_text(lm_file))
    tasks += [load_task(n, cache_dir) for n in dict.fromkeys(wanted)]
    if not tasks:
        raise ValueError("no tasks: pass --tasks default|t1,t2 and/or --task-file / --lm-file")
    names_seen = [t.name for t in tasks]
    if len(set(names_seen)) != len(names_seen):
        raise ValueError(f"two tasks share a name ({names_seen}); rename the task file")
    return tasks


def versions() -> dict:
    import peft
    import torch
    import transformers

    import pmp

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "pmp": pmp.__version__, "python": platform.python_version()}


def git_commit() -> str:
    """HEAD of the pmp source tree (read-only), or 'unknown'."""
    import pmp

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(pmp.__file__).resolve().parent, text=True,
                           capture_output=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cell_id(model: str, task: str, attack: str, seed: int) -> str:
    return f"{model}__{task}__{attack}__s{seed}"


def read_cell(path: Path) -> dict | None:
    """A finished cell's JSON, or None when missing or corrupt (it will be recomputed)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) and d.get("status") == "done" else None


def _model_sha(spec: ModelSpec) -> str:
    if spec.path is None:
        return "scratch:" + sha256_file(spec.config_from / "config.json")
    files = sorted(spec.path.glob("*.safetensors")) or sorted(spec.path.glob("*.bin"))
    return fingerprint([sha256_file(f) for f in files] + [sha256_file(spec.path / "config.json")])


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
        self.masks = {}  # model name -> PrivateMask
        for m in models:
            if m.private is not None:
                from pmp.mask import PrivateMask

                self.masks[m.name] = PrivateMask.load(m.private / "private")
        self.recovered = {}  # model name -> PrivateMask recovered by an attacker
        for m in models:
            if m.recovered is not None:
                from pmp.mask import PrivateMask

                self.recovered[m.name] = PrivateMask.load(m.recovered)
        dens = sorted({round(mk.density(), 6) for mk in self.masks.values()})
        if mask_density:
            if not 0 < mask_density <= 1:
                raise ValueError(f"--mask-density must be in (0, 1], got {mask_density}")
            self.density, self.density_source = mask_density, "flag"
        elif dens:
            self.density, self.density_source = dens[0], "private/mask.json"
            if len(dens) > 1:
                self.log(f"[attack] warning: private masks have densities {dens}; random masks use {dens[0]}")
        else:
            self.density, self.density_source = suite.mask_density, "suite default (no --private run)"
        self.versions, self.commit = versions(), git_commit()
        self._model_sha = {m.name: _model_sha(m) for m in models}

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
        return fingerprint({"attack": attack.to_dict(), "budget": budget.to_dict(), "seed": seed, "task": task.name,
                            "task_sizes": [len(task.train), len(task.test)], "model": self._model_sha[m.name],
                            "mask": mask, "density": dens})

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        import transformers
        from tqdm.auto import tqdm

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

    def _run_cell(self, m: ModelSpec, task, pt, attack: Attack, seed: int, probe: dict | None, path: Path) -> dict:
        t0 = time.perf_counter()
        budget = self.suite.budget(task.kind)
        model = load_model(m.path, task.kind, pt.num_labels, seed, config_from=m.config_from, pad_id=pt.pad_id)
        layouts, mask_info = None, {}
        if attack.kind == "authorized":
            mask = self.masks[m.name]
            layouts = mask.layouts
            mask_info = {"source": "private", "density": mask.density(), "sha256": mask.fingerprint()}
            _check_mask_belongs(model, mask, m)
        elif attack.kind == "recovered_mask":
            rec = self.recovered[m.name]
            layouts = rec.layouts
            mask_info = {"source": "recovered", "path": str(m.recovered), "density": rec.density(),
                         "sha256": rec.fingerprint(), "attack": rec.meta.get("attack")}
            if m.name in self.masks:  # the owner can say how much of the true mask the attacker found
                truth = self.masks[m.name]
                tp = sum(int((rec.layouts[n].to_bool() & truth.layouts[n].to_bool()).sum())
                         for n in rec.layouts if n in truth.layouts)
                mask_info["precision_vs_true_mask"] = tp / max(rec.nnz, 1)
        elif attack.kind == "random_mask":
            layouts = random_layouts(model, self.density, seed, head_names(model, task.kind))
            mask_info = {"source": "random", "density": self.density, "density_source": self.density_source}
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


def _check_mask_belongs(model, mask, spec: ModelSpec) -> None:
    """The release given for a PMP model must be the one its private run trained: where the run kept its initial
    weights, the complement of every masked tensor must still equal them (it is frozen at init)."""
    init = spec.private / "private" / "init.safetensors"
    named = dict(model.named_parameters())
    missing = [n for n in mask.layouts if n not in named and n != "lm_head.weight"]
    if missing:
        raise ValueError(f"the private mask of {spec.private} names parameters the release {spec.path} does not "
                         f"have (e.g. {missing[0]}): --private {spec.name}= points at another model's run")
    if not init.is_file():
        return
    from safetensors import safe_open

    same = total = 0
    with safe_open(str(init), "pt") as f:
        keys = set(f.keys())
        for n, lay in mask.layouts.items():
            if n not in named or n not in keys:
                continue
            keep = ~lay.to_bool()
            w0 = f.get_tensor(n)
            if w0.shape != named[n].shape:
                raise ValueError(f"{spec.private}: initial weight {n} has another shape than the release's: the run "
                                 f"does not belong to {spec.path}")
            same += int((named[n].detach()[keep] == w0[keep]).sum())
            total += int(keep.sum())
    if total and same / total < 0.999:
        raise ValueError(f"--private {spec.name}={spec.private} does not belong to the release {spec.path}: only "
                         f"{same / total:.1%} of the mask's complement equals the run's initial weights (a PMP "
                         "release keeps 100%)")
