"""`pmp study`: many PMP variants on the same data and budget, each attacked with the same suite and audited, and
the protection frontier they draw (eval/frontier.py: held-out perplexity cost against best-attack gain ratio).

For every pre-training seed s (`seeds`): a dense reference run and one run per variant (the base recipe with the
variant's overrides), all with train.data_seed = s -- identical batches -- then their releases, the mask secrecy
audit of each variant's release, and ONE attack sweep over the dense release, every variant's release and the
from-scratch reference (so dense and from-scratch cells are shared by all variants of the seed), then the D0
diagnostic (eval/d0.py, `d0: true`) of every variant's release with its own mask and of the dense release with the
first variant's mask (the control), on the attack's first LM task: it names the cause of any protection found.
With `confirm.suite` (e.g. `durable`), every variant that survives a seed's screen (eval/frontier.py CONFIRM_RULE:
no valid task kills it) is attacked again with that stronger suite next to dense and from scratch, on the tasks
valid at the screen, and its verdict at that seed is read from the confirmation: the cheap suite rules variants
out, the strong one has the last word on any that look protective.
Every stage reuses the pipeline's resumable pieces (pmp/pipeline.py) and is skipped when done; frontier.* is
rewritten after each seed's attack and D0, so an interrupted study has a partial frontier.

DIR/
  study.yaml                    the resolved study of the last call
  runs/s<seed>/<name>/          private run directories (never publish): dense and every variant
  releases/s<seed>/<name>/      public releases
  audit/s<seed>/<variant>/      audit.md / audit.json / recovered_mask/ (private: it describes the mask)
  attack/s<seed>/               one results JSON per (model, task, attack, fine-tuning seed) cell (the screen)
  confirm/s<seed>/              the confirmation suite's cells for the screen's survivors (`confirm.suite`)
  d0/s<seed>/d0__<name>__<task>.json   D0 of each variant's release and of the dense control (eval/d0_run.py)
  stages.json                   the wall time of the call that completed each stage
  frontier.md, frontier.png, frontier.json
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pmp.atomic import write_json, write_text
from pmp.config import RunConfig
from pmp.data.task_formulations import split_formulation
from pmp.eval import metrics as M
from pmp.eval.attack import run_attack
from pmp.eval.attack_inputs import SCRATCH, ModelSpec, resolve_tasks
from pmp.eval.attacks import get_suite
from pmp.eval.config import AttackSettings, AuditSettings
from pmp.eval.d0_run import D0Settings, d0_path, ensure_d0
from pmp.eval.durable_spec import DurableSpec
from pmp.eval.frontier import BASELINE, CONFIRM, d0_control, frontier, seed_points, survivors
from pmp.eval.frontier_report import write_frontier
from pmp.eval.models import load_tokenizer
from pmp.eval.sweep import model_sha
from pmp.eval.task_data import prepare_task
from pmp.pipeline import (
    attack_config,
    audit_if_needed,
    check_seeds,
    export_if_needed,
    prepare_data_if_needed,
    pretrain_if_needed,
    share_scratch_cells,
)
from pmp.run_dir import BOOKKEEPING, RunDir, config_difference
from pmp.typed_config import check, doc, dump_yaml, from_dict, set_dotted, to_dict

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# What a variant may not change: the comparison is at the same data, budget, seed and held-out measurement.
FIXED_SECTIONS = ("data", "tokenizer", "model")
FIXED_TRAIN = ("method", "steps", "batch_size", "grad_accum", "data_seed", "eval_batches")
D0_DEFAULTS = DurableSpec()  # the durable suite's D0 grid: one protocol for both
D0_SEED = 0  # the attack sweep's first fine-tuning seed, as the durable suite's D0


@dataclass
class ConfirmSettings:
    """The stronger attacker that confirms the screen's survivors (eval/frontier.py CONFIRM_RULE)."""
    suite: str = doc("suite that re-attacks every variant surviving a seed's screen, next to dense and from scratch, "
                     "on the tasks valid at the screen: durable, full or a suite file ('' = no confirmation: the "
                     "screen suite `attack.suite` decides every verdict)", "")
    trials: int | None = doc("configurations per arm of the confirmation suite's tuning search (null = its own)", None)
    budget_factors: list[float] = doc("step multipliers of its budget curves (empty = its own)", default_factory=list)
    data_sizes: list[int] = doc("attacker train-set sizes of its data curves, in examples (LM tasks: blocks); each "
                                "must fit every task (empty = its own)", default_factory=list)

    def validate(self) -> ConfirmSettings:
        AttackSettings(trials=self.trials, budget_factors=self.budget_factors, data_sizes=self.data_sizes).validate()
        tuned = self.trials is not None or self.budget_factors or self.data_sizes
        check(bool(self.suite) or not tuned, "confirm.trials / budget_factors / data_sizes are set but confirm.suite "
              "is empty: name the confirmation suite (e.g. confirm: {{suite: durable}})")
        if self.suite:
            check(get_suite(self.suite).durable is not None or not tuned, "confirm.trials / budget_factors / "
                  "data_sizes set a tuning search, and suite {!r} has none: use suite durable (or a suite file with a "
                  "durable section)", self.suite)
        return self


@dataclass
class StudyConfig(RunConfig):
    """A base pre-training recipe (the RunConfig sections), the pre-training seeds, the PMP variants and the
    evaluation every variant gets (attack suite and tasks, audit, kill criterion)."""
    seeds: list[int] = doc("pre-training seeds: seed s sets train.data_seed = s (equal batches for every run of the "
                           "seed) and, where the recipe pins model.init_seed, init seed + s; one dense reference and "
                           "one run per variant at each", default_factory=lambda: [0])
    variants: dict[str, dict[str, Any]] = doc(
        "NAME: {section.key: value, ...} -- one PMP run per variant and seed: the base recipe with these overrides "
        "(e.g. trap: {pmp.variant: trap}; {} = the base PMP recipe). Keys of the pmp and train sections only, never "
        f"data/tokenizer/model nor train.{'/'.join(FIXED_TRAIN)}: every variant has the dense run's data and budget",
        default_factory=dict)
    kill_above: float = doc("kill criterion: a variant is killed where the lower end of the bootstrap interval of its "
                            "best-attack gain ratio on a valid task is above this (eval/frontier.py KILL_RULE)", 0.8)
    audit_variants: bool = doc("audit every variant's release (the frontier's AUROC column; its recovered mask feeds "
                               "recovered_mask attacks)", True)
    d0: bool = doc("run the D0 diagnostic (eval/d0.py) after each seed's attack: every variant's release with its own "
                   "mask and the dense release with the first variant's mask (the control), on the attack's first LM "
                   "task at the suite's LM budget; the frontier's D0 columns name the cause of any protection", True)
    d0_lrs: list[float] = doc("D0's learning rates (AdamW, constant)", default_factory=lambda: list(D0_DEFAULTS.d0_lrs))
    d0_steps: list[int] = doc("D0's step counts (validation loss after each; Delta_c is read after the largest)",
                              default_factory=lambda: list(D0_DEFAULTS.d0_steps))
    d0_hessian_iters: int = doc("D0's power-iteration steps per top Hessian eigenvalue", D0_DEFAULTS.hessian_iters)
    d0_hessian_batches: int = doc("D0's training batches the Hessian is taken on", D0_DEFAULTS.hessian_batches)
    attack: AttackSettings = field(default_factory=AttackSettings)
    confirm: ConfirmSettings = field(default_factory=ConfirmSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)

    def validate(self) -> StudyConfig:
        """The base recipe, every run it implies (dense and each variant at each seed) and the evaluation settings;
        errors name the variant or seed."""
        super().validate()
        self.attack.validate()
        self.confirm.validate()
        self.audit.validate()
        check_seeds(self.seeds, "seeds", "they become train.data_seed")
        check(0 < self.kill_above, "kill_above must be > 0 (a gain ratio: 1 = the attacker gains as much as on the "
              "dense model), got {}", self.kill_above)
        check(bool(self.variants), "variants is empty: name at least one PMP variant, e.g. variants: {{frozen: {{}}, "
              "trap: {{pmp.variant: trap}}}}")
        seen: dict[str, str] = {}
        for name in self.variants:
            check(bool(NAME.match(name)) and "__" not in name and name not in (BASELINE, SCRATCH),
                  "variant name {!r} must be letters, digits, '_' or '-' (no '__'), and not {!r} or {!r} (it names "
                  "directories and result files)", name, BASELINE, SCRATCH)
            key = json.dumps(_compared(self.variant_config(name, self.seeds[0])), sort_keys=True)
            check(key not in seen, "variants {!r} and {!r} train the same model (same resolved recipe); drop one",
                  seen.get(key), name)
            seen[key] = name
        for s in self.seeds:
            self.dense_config(s).validate()
        if self.d0:
            self.d0_settings().validate("d0_")
        return self

    def d0_settings(self) -> D0Settings:
        return D0Settings(tuple(self.d0_lrs), tuple(self.d0_steps), self.d0_hessian_iters, self.d0_hessian_batches)

    def run_config(self) -> RunConfig:
        return RunConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)})

    def _seeded(self, cfg: RunConfig, seed: int, method: str) -> RunConfig:
        init = None if cfg.model.init_seed is None else cfg.model.init_seed + seed
        return replace(cfg, train=replace(cfg.train, method=method, data_seed=seed),
                       model=replace(cfg.model, init_seed=init))

    def dense_config(self, seed: int) -> RunConfig:
        """The dense reference of a seed: the base recipe, method dense."""
        return self._seeded(self.run_config(), seed, "dense")

    def variant_config(self, name: str, seed: int) -> RunConfig:
        """The base recipe with the variant's overrides, method pmp, at the seed; validated (errors name it)."""
        overrides = _flat(self.variants[name])
        data = to_dict(self.run_config())
        for key, value in overrides.items():
            section, _, rest = key.partition(".")
            check(section not in FIXED_SECTIONS, "variant {!r}: {} is not a variant setting -- every variant and the "
                  "dense reference share the data, tokenizer and model of the base recipe", name, key)
            check(not (section == "train" and rest in FIXED_TRAIN), "variant {!r}: {} is fixed by the study (the "
                  "method is pmp, the seed comes from `seeds`, and every run has the same budget and held-out "
                  "measurement)", name, key)
            check(section in ("pmp", "train") and bool(rest), "variant {!r}: {!r} is not a pmp.* or train.* key",
                  name, key)
            set_dotted(data, key.split("."), value, f"variant {name!r}: {key}")
        try:
            cfg = self._seeded(from_dict(RunConfig, data), seed, "pmp")
            return cfg.validate()
        except ValueError as e:
            raise ValueError(f"variant {name!r}: {e}") from None


def _flat(overrides: dict, prefix: str = "") -> dict[str, Any]:
    """{'pmp.density': 0.5} and {'pmp': {'density': 0.5}} alike -> dotted keys."""
    out = {}
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _compared(cfg: RunConfig) -> dict:
    """The recipe without bookkeeping settings (two variants equal in it train the same model)."""
    d = to_dict(cfg)
    for section, keys in BOOKKEEPING.items():
        for k in keys:
            d[section].pop(k, None)
    return d


# ---------------------------------------------------------------------------------------------- stage ledger
class Ledger:
    """DIR/stages.json: per stage, the wall time of the call that did its work. A stage found done keeps the
    record of the call that did it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.rows: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is not readable JSON: delete it (it only records wall times; finished stages "
                             "are found from their outputs) and run the study again") from None
        self.this_call: dict[str, str] = {}

    def run(self, stage: str, fn: Callable[..., tuple[Any, bool]], *args) -> Any:
        """`fn(*args)` -> (result, whether it did work); record its wall time when it did -> the result."""
        print(f"\n[study] ==== {stage} ====", flush=True)
        t0 = time.perf_counter()
        result, worked = fn(*args)
        if worked:
            self.rows[stage] = {"seconds": time.perf_counter() - t0,
                                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_json(self.path, self.rows)
        self.this_call[stage] = "ran" if worked else "skipped"
        return result

    def table(self) -> list[dict]:
        return [{"stage": s, **self.rows.get(s, {"seconds": None, "finished_at": None}), "this_call": how}
                for s, how in self.this_call.items()]


# ---------------------------------------------------------------------------------------------- stages
def _pretrain(cfg: RunConfig, run: Path) -> tuple[Path, bool]:
    r = RunDir(run)
    done = r.is_run() and r.read_status().get("status") == "finished"
    return pretrain_if_needed(cfg, run), not done


def _export(run: Path, release: Path) -> tuple[Path, bool]:
    done = (release / "config.json").is_file()
    return export_if_needed(run, release), not done


def _audit(cfg: StudyConfig, release: Path, run: Path, out: Path) -> tuple[Path, bool]:
    done = (out / "audit.md").is_file()
    return audit_if_needed(cfg.audit, cfg.attack, cfg.data.cache_dir, release, run, out), not done


def _attack(cfg: StudyConfig, releases: dict[str, Path], runs: dict[str, Path], recovered: dict[str, str],
            out: Path) -> tuple[dict, bool]:
    sweep = run_attack(attack_config(cfg.attack, cfg.data.cache_dir, models={n: str(p) for n, p in releases.items()},
                                     private={n: str(p) for n, p in runs.items() if n != BASELINE},
                                     recovered=recovered, baseline=BASELINE, out=str(out)))
    return sweep, sweep["run"] > 0


def confirm_attack(attack: AttackSettings, confirm: ConfirmSettings, tasks: list[str]) -> AttackSettings:
    """The screen's attack settings turned into the confirmation's: the confirmation suite and its search settings,
    on the named tasks only (registry names go to `tasks`; the user's files are kept only where one of their tasks
    is named, and verbalisers only for named TASK:lm tasks)."""
    lm_stem = Path(attack.lm_file).stem if attack.lm_file else None
    file_stem = Path(attack.task_file).stem if attack.task_file else None
    from_file = {n for n in tasks if n == lm_stem or split_formulation(n)[0] == file_stem}
    listed = [n for n in tasks if n not in from_file or (n != lm_stem and split_formulation(n)[1])]
    return replace(attack, suite=confirm.suite, tasks=",".join(listed) or "none",
                   lm_file=attack.lm_file if lm_stem in tasks else "",
                   task_file=attack.task_file if any(split_formulation(n)[0] == file_stem for n in from_file) else "",
                   verbalisers={k: w for k, w in attack.verbalisers.items() if f"{k}:lm" in tasks},
                   trials=confirm.trials, budget_factors=list(confirm.budget_factors),
                   data_sizes=list(confirm.data_sizes))


def _confirm(cfg: StudyConfig, plan: dict[str, list[str]], releases: dict[str, Path], runs: dict[str, Path],
             recovered: dict[str, str], out: Path) -> tuple[dict, bool]:
    """The confirmation sweep of one seed: dense, every survivor (with its private run and recovered mask) and from
    scratch, on the tasks valid for any survivor at the screen."""
    tasks = list(dict.fromkeys(t for ts in plan.values() for t in ts))
    names = [BASELINE, *plan]
    sweep = run_attack(attack_config(confirm_attack(cfg.attack, cfg.confirm, tasks), cfg.data.cache_dir,
                                     models={n: str(releases[n]) for n in names},
                                     private={n: str(runs[n]) for n in plan},
                                     recovered={n: p for n, p in recovered.items() if n in plan},
                                     baseline=BASELINE, out=str(out)))
    return sweep, sweep["run"] > 0


def _d0_task(cfg: StudyConfig):
    """The task D0 runs on: the first LM (perplexity) task of the attack, in the attack's own task order (its
    --lm-file first, then the registry's LM probe `movie_dialog` of `default`), or None when it has none."""
    tasks = resolve_tasks(cfg.attack.tasks, cfg.attack.cache_dir or cfg.data.cache_dir, cfg.attack.task_file,
                          cfg.attack.text_column, cfg.attack.label_column, cfg.attack.lm_file, cfg.attack.verbalisers)
    return next((t for t in tasks if t.kind == "lm"), None)


def _d0(cfg: StudyConfig, task, releases: dict[str, Path], runs: dict[str, Path], out: Path) -> tuple[dict, bool]:
    """D0 of every variant's release with its own mask and of the dense release with the first variant's mask (the
    control: is a variant's curvature any different from dense's?) -> ({name: record or {'model', 'skipped': why}},
    whether any ran). Each record is skipped when already computed from the same inputs (eval/d0_run.py)."""
    names = [BASELINE, *cfg.variants]
    if task is None:
        why = f"no LM task among the attack's tasks ({cfg.attack.tasks!r}, lm_file {cfg.attack.lm_file!r})"
        return {n: {"model": n, "skipped": why} for n in names}, False
    budget, settings = get_suite(cfg.attack.suite).budget(task.kind), cfg.d0_settings()
    masks = {v: RunDir(runs[v]).load_mask() for v in cfg.variants if RunDir(runs[v]).has_mask()}
    control = next(iter(masks), None)
    recs, ran = {}, False
    for n in names:
        mask_from = control if n == BASELINE else n
        if mask_from not in masks:
            recs[n] = {"model": n, "skipped": "no variant's run keeps a mask to take as the control" if n == BASELINE
                       else f"its run {runs[n]} keeps no mask (private/mask.json)"}
            continue
        m = ModelSpec(n, releases[n], "baseline" if n == BASELINE else "protected", private=runs[n])
        recs[n], did = ensure_d0(d0_path(out, n, task.name), m, task, masks[mask_from], mask_from, budget, D0_SEED,
                                 settings, model_sha(m),
                                 lambda m=m: prepare_task(task, load_tokenizer(m.tokenizer_dir), budget, D0_SEED))
        ran = ran or did
    return recs, ran


def _check_existing_runs(cfg: StudyConfig, out: Path) -> None:
    """Every run the study finds in `out` must have been started with the config the study gives it now (bookkeeping
    aside; the pipeline's rule): checked for all runs before anything is written, so that a changed study file is
    refused whole instead of after hours of the runs that still match."""
    for s in cfg.seeds:
        for name in (BASELINE, *cfg.variants):
            run = RunDir(out / "runs" / f"s{s}" / name)
            rc = cfg.dense_config(s) if name == BASELINE else cfg.variant_config(name, s)
            diff = config_difference(run, rc) if run.is_run() else ""
            check(not diff, "{} was trained with another config ({}); give the study a new --out directory (or move "
                  "that run away) to train with this one", run.root, diff)


def run_study(cfg: StudyConfig, out: str | Path) -> dict[str, Path]:
    """Library entry point of `pmp study`: run (or continue) every run, release, audit and attack of the study in
    `out`, then write the frontier -> the paths of frontier.md / .png / .json."""
    cfg.validate()
    get_suite(cfg.attack.suite)  # a bad suite or a missing task file fails before hours of training
    if cfg.confirm.suite:
        get_suite(cfg.confirm.suite)
    for what, f in (("attack.task_file", cfg.attack.task_file), ("attack.lm_file", cfg.attack.lm_file)):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"{what} {f} does not exist")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory: choose a directory for the study")
    _check_existing_runs(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "study.yaml", dump_yaml(cfg))
    ledger = Ledger(out / "stages.json")
    prepare_data_if_needed(cfg, cfg.attack)
    variants, points, controls, paths = list(cfg.variants), [], [], {}
    d0_task = _d0_task(cfg) if cfg.d0 else None
    for s in cfg.seeds:
        configs = {BASELINE: cfg.dense_config(s), **{v: cfg.variant_config(v, s) for v in variants}}
        runs, releases, audits, recovered = {}, {}, {}, {}
        for name, rc in configs.items():
            runs[name] = ledger.run(f"pretrain s{s}/{name}", _pretrain, rc, out / "runs" / f"s{s}" / name)
        for name in configs:
            releases[name] = ledger.run(f"export s{s}/{name}", _export, runs[name], out / "releases" / f"s{s}" / name)
        for v in variants if cfg.audit_variants else []:
            where = out / "audit" / f"s{s}" / v
            ledger.run(f"audit s{s}/{v}", _audit, cfg, releases[v], runs[v], where)
            audits[v] = json.loads((where / "audit.json").read_text())
            recovered[v] = str(where / "recovered_mask")
        attack_dir = out / "attack" / f"s{s}"
        first = cfg.seeds[0]
        if s != first and cfg.attack.scratch:  # the from-scratch reference does not depend on the seed
            share_scratch_cells(out / "attack" / f"s{first}", out / "releases" / f"s{first}" / BASELINE, attack_dir,
                                releases[BASELINE])
        ledger.run(f"attack s{s}", _attack, cfg, releases, runs, recovered, attack_dir)
        ppl = {n: RunDir(r).read_status()["final_val_ppl"] for n, r in runs.items()}
        cells, done, d0 = M.load_cells(attack_dir), cfg.seeds[:cfg.seeds.index(s) + 1], None
        if cfg.d0:  # the attack's frontier first: an interrupted D0 stage leaves it drawn (D0 "not run yet")
            pts = points + seed_points(cells, variants, ppl, audits, s, cfg.kill_above, {})
            write_frontier(out, frontier(pts, variants, done, cfg.kill_above, ledger.table(),
                                         controls + [d0_control({}, s)]), str(out))
            d0 = ledger.run(f"d0 s{s}", _d0, cfg, d0_task, releases, runs, out / "d0" / f"s{s}")
            controls.append(d0_control(d0, s))
        screen = seed_points(cells, variants, ppl, audits, s, cfg.kill_above, d0)
        points += screen
        plan = survivors(screen) if cfg.confirm.suite else {}
        if plan:  # the screen's frontier first: an interrupted confirmation leaves it drawn
            write_frontier(out, frontier(points, variants, done, cfg.kill_above, ledger.table(), controls,
                                         cfg.confirm.suite), str(out))
            where = out / "confirm" / f"s{s}"
            print(f"[study] seed {s}: {', '.join(plan)} survive the screen ({cfg.attack.suite}); confirming with "
                  f"{cfg.confirm.suite}", flush=True)
            ledger.run(f"confirm s{s}", _confirm, cfg, plan, releases, runs, recovered, where)
            points += seed_points(M.load_cells(where), list(plan), ppl, audits, s, cfg.kill_above, d0, CONFIRM)
        fr = frontier(points, variants, done, cfg.kill_above, ledger.table(), controls, cfg.confirm.suite)
        paths = write_frontier(out, fr, str(out))
    print(f"\n[study] done: read {paths['md']}")
    for v, d in fr["verdicts"].items():
        print(f"[study] {v}: {d['verdict']}")
    return paths
