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
from pmp.eval.adaptive import HealText, heal, heal_blocks, reinit_complement, transfer_base
from pmp.eval.attack_inputs import ModelSpec
from pmp.eval.attacks import Attack, Budget, Suite, config_digest
from pmp.eval.finetune import finetune, random_layouts
from pmp.eval.metrics import cell_problem
from pmp.eval.models import head_names, load_model, load_tokenizer
from pmp.eval.task_data import CAUSAL_LM_KINDS, PreparedTask, formulation_record, prepare_task
from pmp.eval.verbalised import verbaliser_ids
from pmp.mask import PrivateMask
from pmp.provenance import git_commit, versions
from pmp.rescale import SUPPORTED as RESCALABLE
from pmp.rescale import canonicalise, unscale
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


def model_sha(spec: ModelSpec) -> str:
    """The digest of a model's weights and config (from scratch: its config): what cells and D0 records are keyed by."""
    if spec.path is None:
        return "scratch:" + sha256_file(spec.config_from / "config.json")
    return release_digest(spec.path)


def release_digest(path: Path) -> str:
    """The digest of a release's weight files and config."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return config_digest([sha256_file(f) for f in files] + [sha256_file(path / "config.json")])


def applicable(spec: ModelSpec, attack: Attack) -> bool:
    if spec.role == "scratch":
        return attack.kind == "probe" or attack.scratch
    if attack.kind == "authorized":
        return spec.private is not None
    if attack.kind in ("recovered_mask", "reinit_complement"):
        return spec.recovered is not None
    return True


class Sweep:
    def __init__(self, models: list[ModelSpec], tasks: list, suite: Suite, out: str | Path, seeds: int = 0,
                 mask_density: float = 0.0, progress: bool = True, log=print, heal_file: str = "",
                 cache_dir: str = ""):
        self.models, self.tasks, self.suite = models, tasks, suite
        self.out, self.cells_dir = Path(out), Path(out) / "cells"
        self.seeds = list(range(seeds or suite.seeds))
        self.progress, self.log = progress, log
        # model name -> the owner's private mask / a mask recovered by an attacker
        self.masks = {m.name: RunDir(m.private).load_mask() for m in models
                      if m.private is not None and RunDir(m.private).has_mask()}
        # model name -> the owner's secret scales (`pmp protect rescale`): its authorized arm un-scales first
        self.keys = {m.name: RunDir(m.private).load_rescale_key() for m in models
                     if m.private is not None and m.name not in self.masks}
        self.recovered = {m.name: PrivateMask.load(m.recovered) for m in models if m.recovered is not None}
        self.density, self.density_source = self._random_mask_density(mask_density)
        self.versions, self.commit = versions(), git_commit()
        self._model_sha = {m.name: model_sha(m) for m in models}
        self.heal_text = HealText(heal_file, cache_dir)
        if any(a.kind == "heal_then_ft" for a in suite.attacks):
            self.heal_text.check()  # at input time: nothing is written before every input is checked
        self._check_verbalisers()
        self._prepared: dict[tuple, PreparedTask] = {}
        self._probes: dict[tuple, dict] = {}

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

    def _check_verbalisers(self) -> None:
        """Every label word of every lm_classification task tokenizes to something distinct with every model's
        tokenizer: checked with the inputs, before anything is written."""
        verbalised = [t for t in self.tasks if t.kind == "lm_classification"]
        for tok_dir in dict.fromkeys(m.tokenizer_dir for m in self.models) if verbalised else ():
            tok = load_tokenizer(tok_dir)
            for t in verbalised:
                verbaliser_ids(tok, list(t.verbaliser), t.name)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self) -> list[tuple[ModelSpec, object, Attack, int]]:
        """Cells in run order: task -> seed -> model -> probe first, then the attacks. A partial sweep thus holds
        complete comparisons (every model) for the tasks it has reached."""
        attacks = sorted(self.suite.attacks, key=lambda a: a.kind != "probe")
        return [(m, t, a, s) for t in self.tasks for s in self.seeds for m in self.models for a in attacks
                if applicable(m, a)]

    def density_of(self, attack: Attack) -> float:
        """The density of a random_mask attack's mask: its own, else the sweep's."""
        return attack.mask_density or self.density

    def inputs_sha(self, m: ModelSpec, task, attack: Attack, seed: int, budget: Budget | None = None) -> str:
        budget = budget or self.suite.budget(task.kind)
        mask = (self._owner_secret_sha(m) if attack.kind == "authorized" else
                self.recovered[m.name].fingerprint() if attack.kind in ("recovered_mask", "reinit_complement") else
                "")
        dens = self.density_of(attack) if attack.kind == "random_mask" else None
        inputs = {"attack": attack.to_dict(), "budget": budget.to_dict(), "seed": seed,
                  "task": task.name, "task_sizes": [len(task.train), len(task.test)],
                  "model": self._model_sha[m.name], "mask": mask, "density": dens}
        if attack.kind == "heal_then_ft":  # only then: other cells keep the digests they were written with
            inputs["heal_text"] = self.heal_text.digest()
        inputs.update(self.extra_inputs(attack))
        if task.kind == "lm_classification":  # the template and verbaliser define the task as much as its data
            inputs["formulation"] = formulation_record(task)
        return config_digest(inputs)

    def extra_inputs(self, attack: Attack) -> dict:
        """More inputs a subclass's cells depend on (none here; only the cells that have them get them, so every
        other cell keeps the digest it was written with)."""
        return {}

    def after_finetune(self, m: ModelSpec, task, attack: Attack, model, budget: Budget) -> dict | None:
        """More measurements of the fine-tuned model, merged into the cell (none here)."""
        return None

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        self._start()
        plan = self.plan()
        t_start, done, skipped = time.perf_counter(), 0, 0
        bar = tqdm(plan, desc="attack cells", unit="cell", disable=not self.progress, dynamic_ncols=True)
        for m, task, attack, seed in bar:
            _, ran = self.ensure_cell(m, task, attack, seed)
            done, skipped = done + ran, skipped + (not ran)
        wall = time.perf_counter() - t_start
        self.log(f"[attack] {done} cells run, {skipped} already done, {wall:.0f}s; results in {self.cells_dir}")
        return {"run": done, "skipped": skipped, "wall_seconds": wall, "cells": len(plan)}

    def _start(self) -> None:
        transformers.utils.logging.disable_progress_bar()  # one bar over cells is enough
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "sweep.json", self.manifest())

    def ensure_cell(self, m: ModelSpec, task, attack: Attack, seed: int, budget: Budget | None = None,
                    extra: dict | None = None) -> tuple[dict, bool]:
        """The cell's record: read back when it exists and was computed from the same inputs, else computed now
        (its probe first, when missing) -> (record, whether it ran). `budget` overrides the suite's (budget
        curves); `extra` is merged into the record (the durable stages' bookkeeping)."""
        cid = cell_id(m.name, task.name, attack.name, seed)
        path = self.cells_dir / f"{cid}.json"
        old = read_cell(path)
        if old is not None and old.get("inputs_sha") == self.inputs_sha(m, task, attack, seed, budget):
            if attack.kind == "probe":
                self._probes[(m.name, task.name, seed)] = old
            return old, False
        if path.exists():
            why = "corrupt" if old is None else "computed from other inputs"
            tqdm.write(f"[attack] {cid}: existing result is {why}; recomputing")
        probe = None if attack.kind == "probe" else self.probe(m, task, seed)
        rec = self._run_cell(m, task, self.prepared(m, task, seed, budget), attack, seed, probe, path, budget, extra)
        if attack.kind == "probe":
            self._probes[(m.name, task.name, seed)] = rec
        tqdm.write(self._line(rec))
        return rec, True

    def prepared(self, m: ModelSpec, task, seed: int, budget: Budget | None = None) -> PreparedTask:
        """The task tokenized for the model's tokenizer, the seed and the budget's data caps. One (task, seed,
        data caps) at a time is kept, for every model: the plan is ordered that way."""
        budget = budget or self.suite.budget(task.kind)
        caps = (budget.max_len, budget.max_train, budget.max_val, budget.max_test)
        key = (str(m.tokenizer_dir), task.name, seed, caps)
        if key not in self._prepared:
            if any(k[1:] != key[1:] for k in self._prepared):
                self._prepared.clear()
            self._prepared[key] = prepare_task(task, load_tokenizer(m.tokenizer_dir), budget, seed)
        return self._prepared[key]

    def probe(self, m: ModelSpec, task, seed: int) -> dict:
        """The frozen-probe cell of (model, task, seed): the reference point (`before`) of every gain."""
        key = (m.name, task.name, seed)
        if key not in self._probes:
            probe_attack = next(a for a in self.suite.attacks if a.kind == "probe")
            self._probes[key] = self.ensure_cell(m, task, probe_attack, seed)[0]
        return self._probes[key]

    def _owner_secret_sha(self, m: ModelSpec) -> str:
        if m.name in self.masks:
            return self.masks[m.name].fingerprint()
        return sha256_file(RunDir(m.private).rescale_key)

    def _mask_of(self, m: ModelSpec, attack: Attack, model, task, seed: int) -> tuple[dict | None, dict]:
        """The layouts a sparse attack trains (None for dense kinds) and the cell's record of that mask."""
        if attack.kind == "authorized" and m.name in self.keys:  # un-scaled by _adapt, then every parameter
            return None, {"source": "private rescale key", "strength": self.keys[m.name].strength,
                          "sha256": self._owner_secret_sha(m)}
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
            dens = self.density_of(attack)
            layouts = random_layouts(model, dens, seed, head_names(model, task.kind))
            return layouts, {"source": "random", "density": dens,
                             "density_source": "attack" if attack.mask_density else self.density_source}
        return None, {}

    def _adapt(self, m: ModelSpec, attack: Attack, model, pt: PreparedTask, seed: int):
        """The preparation step of an adaptive attack (eval/adaptive.py) -> (the model to fine-tune, its record)."""
        if attack.kind == "heal_then_ft":
            lm_budget = self.suite.budget("lm")
            tok = load_tokenizer(m.tokenizer_dir)
            blocks = heal_blocks(self.heal_text.texts(), tok, lm_budget.max_len,
                                 attack.heal_steps * lm_budget.batch_size, seed)
            lm = model if pt.kind in CAUSAL_LM_KINDS else load_model(m.path, "lm", 0, seed,
                                                                     config_from=m.config_from, pad_id=pt.pad_id)
            info = {"heal_text": self.heal_text.source, **heal(lm, blocks, attack, lm_budget.batch_size, seed)}
            if lm is not model:
                info["transferred_tensors"] = transfer_base(lm, model)
            return model, info
        if attack.kind == "reinit_complement":
            rec = self.recovered[m.name]
            # a fresh init of the same architecture, from a seed of the attacker's (not the cell's: the head of
            # the task model was drawn from that one)
            fresh = load_model(None, pt.kind, pt.num_labels, seed + 1_000_003, config_from=m.path, pad_id=pt.pad_id)
            info = reinit_complement(model, rec.to_bool(), fresh, head_names(model, pt.kind))
            return model, {**info, "recovered_mask_sha256": rec.fingerprint(), "recovered_path": str(m.recovered)}
        if attack.kind == "authorized" and m.name in self.keys:  # the owner inverts its own secret scales
            unscale(model, self.keys[m.name])
            return model, {"unscaled": True, "strength": self.keys[m.name].strength}
        if attack.kind == "canonicalise_then_ft":
            if getattr(model.config, "model_type", "") not in RESCALABLE:
                return model, {"canonicalised": False, "reason": f"no rescaling symmetry known for "
                                                                 f"{model.config.model_type}: plain fine-tuning"}
            canonicalise(model)
            return model, {"canonicalised": True}
        return model, None

    def _run_cell(self, m: ModelSpec, task, pt, attack: Attack, seed: int, probe: dict | None, path: Path,
                  budget: Budget | None = None, extra: dict | None = None) -> dict:
        t0 = time.perf_counter()
        budget = budget or self.suite.budget(task.kind)
        model = load_model(m.path, task.kind, pt.num_labels, seed, config_from=m.config_from, pad_id=pt.pad_id)
        model, adaptive = self._adapt(m, attack, model, pt, seed)
        layouts, mask_info = self._mask_of(m, attack, model, task, seed)
        res = finetune(model, pt, attack, budget, seed, mask_layouts=layouts)
        after = self.after_finetune(m, task, attack, model, budget)
        metric = res["metric"]
        before = (probe or {}).get("after_val_selected") if attack.kind != "probe" else None
        rec = {
            "status": "done", "format": 1, "cell": path.stem,
            "inputs_sha": self.inputs_sha(m, task, attack, seed, budget),
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
        if pt.formulation:
            rec["formulation"] = pt.formulation
        if adaptive is not None:
            rec["adaptive"] = adaptive
        if after is not None:
            rec.update(after)
        if extra is not None:  # a durable stage: the budget is a cap the configuration's own steps stay within
            rec["budget"]["steps_cap"] = budget.steps
            rec.update(extra)
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
                          "classification": self.suite.classification.to_dict(), "lm": self.suite.lm.to_dict(),
                          **({"durable": self.suite.durable.to_dict()} if self.suite.durable else {})},
                "seeds": self.seeds, "random_mask_density": self.density, "density_source": self.density_source,
                "versions": self.versions, "git_commit": self.commit}

