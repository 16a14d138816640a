"""The durable attacker: a sweep (eval/sweep.py) that, beyond the suite's fixed attacks, gives every arm the same
declared tuning budget, re-runs each arm's best at more seeds, larger budgets and other data sizes, and runs the
D0 diagnostic. The protocol is the suite's `durable` section (eval/durable_spec.py); `pmp attack --suite durable`
runs it, `pmp report` reads it (eval/report_durable.py).

Arms: the attacker's full fine-tuning of every model (the protected release, the dense baseline, the
quality-matched baseline, the from-scratch reference) and, for models given with --private, the owner's
authorized (mask-aware) fine-tuning. Per task, in this order (so a partial run holds whole stages):

1. the suite's fixed attacks (probe first; adaptive attacks: heal-then-fine-tune, re-init of the suspected
   complement, sparse fine-tuning of random masks of 1 / 10 / 50 %), every seed -- as `Sweep.run` does;
2. D0 of every model with a mask, a rescale key or a --references release (`RES/diagnostics/
   d0__<model>__<task>.json`; eval/d0.py, cached by eval/d0_run.py);
3. search: K trials per arm at the first seed, cells `<model>__<task>__search_<kind>_tNN__s0` (stage search);
4. tuned: each arm's best trial on ITS OWN validation split, as `tuned_<kind>` at every seed (stage tuned; the
   first seed's cell is the trial's own result, copied). These are the rows the attack tables and the bootstrap
   intervals use;
5. budget curves: each arm's `curve_top` best trials, and its best at lr / factor, at `factor` x the steps (and
   x the evaluation interval), first seed (stage curve, `curve_<kind>_x<factor>_<c0|lr>`);
6. data curves: each arm's best trial at other attacker data sizes, first seed (stage data, `data_<kind>_n<N>`);
7. general ability (LM tasks, `durable.general`): each attacker arm's best trial re-run at the first seed, then the
   attacked model's perplexity on general held-out text beside the release's own (stage general,
   `general_<kind>`; eval/general_ability.py) -- SDD's evaluation: does the attack cost general ability?

Every trial and re-run is a cell JSON, skipped when re-run with the same inputs: the search resumes trial by
trial (a trial's configuration depends only on the trials before it; eval/search.py).

Cost (an estimate from the measured `quick` run -- 140 cells in 29.7 min on `small`, 2 CPU cores -- and a timed
5-step `small` fine-tune: ~0.12 s per AdamW step of 8 x 64 tokens, SOAP ~2.4x that; not a measurement of this
suite): one base-budget fine-tune T ~ 12 s (LM probe, 80 steps + evaluation) / ~9 s (classification). Per task
with 4 arms (protected, owner, dense, scratch): search ~80 T, tuned ~6 T, curves at x3 and x10 ~110 T, data ~8 T,
fixed attacks at 3 seeds ~55 T, D0 ~16 T: ~275 T, ~55 min for the LM probe; ~4.5 h for the five default tasks,
~5.5 h with a matched baseline (a fifth arm).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections import Counter

from tqdm.auto import tqdm

from pmp.atomic import write_json
from pmp.eval.attack_inputs import ModelSpec
from pmp.eval.attacks import OPTIMIZERS, SCHEDULES, Attack, Budget, Suite
from pmp.eval.d0_run import D0Settings, Reference, d0_path, ensure_d0
from pmp.eval.durable_spec import check_factors, check_sizes
from pmp.eval.general_ability import GENERAL_BLOCKS, GENERAL_KINDS, GENERAL_PREFIX, GeneralText, perplexity
from pmp.eval.models import load_model, load_tokenizer
from pmp.eval.search import best_trial, ranked_trials, rename, suggest, trial_attack
from pmp.eval.sweep import Sweep, cell_id, read_cell
from pmp.eval.task_data import DIRECTION, prepare_task, validation_size

D0_DIR = "diagnostics"  # RES/diagnostics/d0__<model>__<task>.json
GENERAL_FORMAT = 2  # what a general cell measures (2: also the other perplexity tasks); older cells are recomputed


def _factor_tag(f: float) -> str:
    return f"x{f:g}"


class DurableSweep(Sweep):
    def __init__(self, models: list[ModelSpec], tasks: list, suite: Suite, out, seeds: int = 0,
                 mask_density: float = 0.0, progress: bool = True, log=print, heal_file: str = "",
                 cache_dir: str = "", trials: int | None = None, budget_factors=(), data_sizes=(),
                 general_file: str = ""):
        if suite.durable is None:
            raise ValueError(f"suite {suite.name!r} has no durable section (a tuning search); use Sweep")
        over = {}
        if trials is not None:
            over["trials"] = trials
        if budget_factors:
            check_factors(list(budget_factors))
            over["budget_factors"] = tuple(float(f) for f in budget_factors)
        if data_sizes:
            check_sizes(list(data_sizes), "data_sizes")
            over["data_sizes_lm"] = over["data_sizes_classification"] = tuple(data_sizes)
        spec = dataclasses.replace(suite.durable, **over).validate(OPTIMIZERS, SCHEDULES)
        suite = dataclasses.replace(suite, durable=spec)
        super().__init__(models, tasks, suite, out, seeds=seeds, mask_density=mask_density, progress=progress,
                         log=log, heal_file=heal_file, cache_dir=cache_dir)
        self.spec, self.seed0 = spec, self.seeds[0]
        self.general_text = GeneralText(general_file, cache_dir)
        self._general_blocks: dict[str, object] = {}
        self._check_inputs()

    # ------------------------------------------------------------------------------------------ inputs
    def _check_inputs(self) -> None:
        """Everything that would fail later fails here, before anything is written."""
        if self.spec.general:
            self.general_text.check_file()
        if "soap" in self.spec.optimizers and importlib.util.find_spec("pytorch_optimizer") is None:
            raise ValueError("the durable search's soap optimizer needs the `pytorch-optimizer` package (pip install "
                             "pytorch-optimizer), or leave soap out of durable.optimizers")
        for task in self.tasks:
            if self._data_sizes(task):
                self._check_data_sizes(task, max(self._data_sizes(task)))

    def _check_data_sizes(self, task, largest: int) -> None:
        budget = self.suite.budget(task.kind)
        if task.kind != "lm":
            held = len(task.train) - validation_size(len(task.train), budget)
            where = f"{held} training examples after its validation split"
        else:  # blocks depend on the tokenizer: count them for each tokenizer the models use
            held, where = None, ""
            for m in {str(m.tokenizer_dir): m for m in self.models}.values():
                pt = prepare_task(task, load_tokenizer(m.tokenizer_dir),
                                  dataclasses.replace(budget, max_train=largest), self.seed0)
                n = pt.sizes["train_blocks"]
                if held is None or n < held:
                    held, where = n, f"{n} training blocks of {budget.max_len} tokens (tokenizer of {m.name})"
        if largest > held:
            raise ValueError(f"data size {largest} is larger than task {task.name} holds: {where}; pass --data-sizes "
                             f"with sizes up to {held}")

    # ------------------------------------------------------------------------------------------ arms
    def arms(self) -> list[tuple[ModelSpec, str]]:
        """(model, kind): every model's attacker arm, each --private model's owner arm right after its own."""
        out = []
        for m in self.models:
            if m.role == "scratch" and not self.spec.scratch_arm:
                continue
            out.append((m, "full"))
            if m.private is not None and self.spec.owner_arm:
                out.append((m, "authorized"))
        return out

    def _extra_factors(self) -> list[float]:
        return [f for f in self.spec.budget_factors if f != 1]

    def _data_sizes(self, task) -> list[int]:
        return [n for n in self.spec.data_sizes(task.kind) if n != self.suite.budget(task.kind).max_train]

    def total_cells(self) -> int:
        """Cells this sweep will hold (for the progress bar)."""
        cands = self.spec.curve_top + self.spec.curve_lr_scaled
        per_arm = self.spec.trials + len(self.seeds) + len(self._extra_factors()) * cands
        return len(self.plan()) + sum(len(self.arms()) * (per_arm + len(self._data_sizes(t))) +
                                      len(self._general_arms(t)) for t in self.tasks)

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        self._start()
        t_start = time.perf_counter()
        self._count = Counter()
        self._bar = tqdm(total=self.total_cells(), desc="durable cells", unit="cell", disable=not self.progress,
                         dynamic_ncols=True)
        plan = self.plan()
        d0 = 0
        for task in self.tasks:
            for m, t, a, s in plan:
                if t is task:
                    self._cell(m, t, a, s)
            if self.spec.d0:
                for m, mask, mask_from in self.d0_models():
                    d0 += self.ensure_d0(m, task, mask, mask_from)[1]
            trials = {(m.name, kind): self.search(m, task, kind) for m, kind in self.arms()}
            self.tuned(task, trials)
            self.curves(task, trials)
            self.data_curves(task, trials)
            self.general(task, trials)
        self._bar.close()
        wall = time.perf_counter() - t_start
        self.log(f"[attack] durable: {self._count[True]} cells run, {self._count[False]} already done, {d0} D0 "
                 f"diagnostics run, {wall:.0f}s; results in {self.cells_dir}")
        return {"run": self._count[True], "skipped": self._count[False], "wall_seconds": wall,
                "cells": sum(self._count.values()), "diagnostics_run": d0}

    def _cell(self, m: ModelSpec, task, attack: Attack, seed: int, budget: Budget | None = None,
              extra: dict | None = None) -> dict:
        rec, ran = self.ensure_cell(m, task, attack, seed, budget, extra)
        self._count[ran] += 1
        self._bar.update()
        return rec

    def search(self, m: ModelSpec, task, kind: str) -> list[dict]:
        """K trials of one arm, in order; each trial's configuration is suggested from the trials before it."""
        cap, direction = self.suite.budget(task.kind).steps, DIRECTION[task.kind]
        records: list[dict] = []
        for i in range(self.spec.trials):
            params = suggest(self.spec, cap, i, [(r["durable"]["params"], r["selected_val"]) for r in records],
                             direction)
            attack = trial_attack(f"search_{kind}_t{i:02d}", kind, params)
            extra = {"stage": "search", "durable": {"arm": kind, "trial": i, "params": params,
                                                    "trials": self.spec.trials, "sampler": self.spec.sampler,
                                                    "search_seed": self.spec.search_seed}}
            records.append(self._cell(m, task, attack, self.seed0, extra=extra))
        return records

    def _model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def tuned(self, task, trials: dict) -> None:
        """Each arm's validation-best trial as `tuned_<kind>` at every seed (the first seed's is the trial itself)."""
        direction = DIRECTION[task.kind]
        best = {key: best_trial(recs, direction) for key, recs in trials.items()}
        for s in self.seeds:
            for (name, kind), b in best.items():
                m = self._model(name)
                attack = trial_attack(f"tuned_{kind}", kind, b["durable"]["params"])
                extra = {"stage": "tuned", "durable": {"arm": kind, "from_trial": b["durable"]["trial"],
                                                       "params": b["durable"]["params"],
                                                       "trials": len(trials[name, kind]), "sampler": self.spec.sampler}}
                if s == self.seed0:
                    self._copy_trial(m, task, attack, b, extra)
                else:
                    self._cell(m, task, attack, s, extra=extra)

    def _copy_trial(self, m: ModelSpec, task, attack: Attack, trial: dict, extra: dict) -> dict:
        """The first seed's tuned cell: the best trial's own result (same configuration, budget, seed and data)."""
        path = self.cells_dir / f"{cell_id(m.name, task.name, attack.name, self.seed0)}.json"
        sha = self.inputs_sha(m, task, attack, self.seed0)
        old = read_cell(path)
        if old is not None and old.get("inputs_sha") == sha:
            self._count[False] += 1
        else:
            extra = {**extra, "durable": {**extra["durable"], "copied_from": trial["cell"]}}
            old = {**trial, "cell": path.stem, "attack": attack.name, "hyperparameters": attack.to_dict(),
                   "inputs_sha": sha, **extra}
            write_json(path, old)
            self._count[True] += 1
        self._bar.update()
        return old

    def curves(self, task, trials: dict) -> None:
        """Each arm's best `curve_top` trials, and its best at lr / factor, at every extra budget factor."""
        direction, base = DIRECTION[task.kind], self.suite.budget(task.kind)
        for f in self._extra_factors():
            budget = dataclasses.replace(base, steps=max(1, round(base.steps * f)),
                                         eval_every=max(1, round(base.eval_every * f)))
            for (name, kind), recs in trials.items():
                best = best_trial(recs, direction)
                cands = [(f"c{j}", t, 1.0) for j, t in enumerate(ranked_trials(recs, direction)[:self.spec.curve_top])]
                if self.spec.curve_lr_scaled:
                    cands.append(("lr", best, 1.0 / f))
                for tag, t, lr_scale in cands:
                    a = trial_attack("x", kind, t["durable"]["params"])
                    a = rename(a, f"curve_{kind}_{_factor_tag(f)}_{tag}", steps=max(1, round(a.steps * f)),
                               lr=a.lr * lr_scale)
                    extra = {"stage": "curve", "durable": {"arm": kind, "factor": f, "candidate": tag,
                                                           "from_trial": t["durable"]["trial"],
                                                           "params": t["durable"]["params"], "lr_scale": lr_scale}}
                    self._cell(self._model(name), task, a, self.seed0, budget=budget, extra=extra)

    def data_curves(self, task, trials: dict) -> None:
        """Each arm's best trial at every other attacker data size (the search's own size is its best trial)."""
        direction, base = DIRECTION[task.kind], self.suite.budget(task.kind)
        for n in self._data_sizes(task):
            budget = dataclasses.replace(base, max_train=n)
            for (name, kind), recs in trials.items():
                best = best_trial(recs, direction)
                a = trial_attack(f"data_{kind}_n{n}", kind, best["durable"]["params"])
                extra = {"stage": "data", "durable": {"arm": kind, "data_size": n,
                                                      "from_trial": best["durable"]["trial"],
                                                      "params": best["durable"]["params"]}}
                self._cell(self._model(name), task, a, self.seed0, budget=budget, extra=extra)

    def _general_arms(self, task) -> list[tuple[ModelSpec, str]]:
        """The arms whose attacked model's general ability is measured: every attacker arm but from scratch's, on
        tasks whose fine-tuned model is still a causal LM, when `durable.general` is on and text is available."""
        if not self.spec.general or task.kind not in GENERAL_KINDS or self.general_text.missing():
            return []
        return [(m, kind) for m, kind in self.arms() if kind == "full" and m.role != "scratch"]

    def general(self, task, trials: dict) -> None:
        """Each attacker arm's best trial again at the first seed, measuring general ability after it."""
        arms = self._general_arms(task)
        if not arms and self.spec.general and task.kind in GENERAL_KINDS:
            self.log(f"[attack] general ability after the attack on {task.name}: not measured "
                     f"({self.general_text.missing()})")
        direction = DIRECTION[task.kind]
        for m, kind in arms:
            best = best_trial(trials[m.name, kind], direction)
            a = trial_attack(f"{GENERAL_PREFIX}{kind}", kind, best["durable"]["params"])
            extra = {"stage": "general", "durable": {"arm": kind, "from_trial": best["durable"]["trial"],
                                                     "params": best["durable"]["params"]}}
            self._cell(m, task, a, self.seed0, extra=extra)

    def extra_inputs(self, attack: Attack) -> dict:
        if not attack.name.startswith(GENERAL_PREFIX):
            return {}
        return {"general_text": self.general_text.digest(), "general_format": GENERAL_FORMAT}

    def after_finetune(self, m: ModelSpec, task, attack: Attack, model, budget: Budget) -> dict | None:
        """A `general_*` cell: perplexity of the release and of the attacked model (its final step) on the general
        text and on the test blocks of the sweep's other perplexity tasks (collateral on the other domains)."""
        if not attack.name.startswith(GENERAL_PREFIX):
            return None
        tok = load_tokenizer(m.tokenizer_dir)
        key = f"{m.tokenizer_dir}|{budget.max_len}"
        if key not in self._general_blocks:
            self._general_blocks[key] = self.general_text.blocks(tok, budget.max_len, tok.eos_token_id)
        blocks = self._general_blocks[key]
        release = load_model(m.path, "lm", 0, self.seed0, config_from=m.config_from, pad_id=tok.eos_token_id)
        others = {}
        for t in self.tasks:  # collateral: the sweep's other perplexity tasks, on their own test blocks
            if t is task or t.kind != "lm":
                continue
            key = f"{m.tokenizer_dir}|{t.name}"
            if key not in self._general_blocks:
                lm_budget = self.suite.budget("lm")
                self._general_blocks[key] = prepare_task(t, tok, lm_budget, self.seed0).test["blocks"][:GENERAL_BLOCKS]
            b = self._general_blocks[key]
            others[t.name] = {"blocks": len(b), "ppl_release": perplexity(release, b),
                              "ppl_after_attack": perplexity(model, b)}
        return {"general": {"text": self.general_text.source, "blocks": len(blocks), "block_len": budget.max_len,
                            "ppl_release": perplexity(release, blocks), "ppl_after_attack": perplexity(model, blocks),
                            "other_tasks": others, "at": "the attack's final step"}}

    # ------------------------------------------------------------------------------------------ D0
    def d0_models(self) -> list[tuple[ModelSpec, object, str]]:
        """(model, owner secret, whose): every --private model with its own mask or rescale key, every model with a
        --references release (compared with it); the baselines with the first protected model's mask, as a control
        (is the protected model's curvature any different?). A rescale key has no control: it only fits the weights
        it scaled."""
        out, first = [], next(iter(self.masks.items()), None)
        for m in self.models:
            if m.name in self.masks:
                out.append((m, self.masks[m.name], m.name))
            elif m.name in self.keys:
                out.append((m, self.keys[m.name], m.name))
            elif m.reference is not None:  # no owner secret: compared with the model it started from
                out.append((m, Reference(m.reference), m.name))
            elif first is not None and m.role in ("baseline", "matched"):
                out.append((m, first[1], first[0]))
        return out

    def ensure_d0(self, m: ModelSpec, task, mask, mask_from: str) -> tuple[dict, bool]:
        """D0 of (model, task) with `mask`, first seed, the suite's budget: RES/diagnostics/d0__<model>__<task>.json,
        skipped when computed from the same inputs (eval/d0_run.py)."""
        return ensure_d0(d0_path(self.out / D0_DIR, m.name, task.name), m, task, mask, mask_from,
                         self.suite.budget(task.kind), self.seed0, D0Settings.of(self.spec),
                         self._model_sha[m.name], lambda: self.prepared(m, task, self.seed0))
