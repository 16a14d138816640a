"""`pmp attack` from its typed config: check the inputs (eval/attack_inputs.py), then run or resume the sweep
of fine-tuning cells (eval/sweep.py; a suite with a durable section: eval/durable.py) on them, holding the
results directory's write lock."""

from __future__ import annotations

from pmp.dir_lock import exclusive
from pmp.eval.attack_inputs import resolve_models, resolve_tasks
from pmp.eval.attacks import get_suite
from pmp.eval.config import AttackConfig
from pmp.eval.durable import DurableSweep
from pmp.eval.sweep import Sweep
from pmp.paths import refuse_output_over


def run_attack(cfg: AttackConfig) -> dict:
    """`pmp attack`: check the releases and tasks of `cfg`, then run (or resume) the sweep into `cfg.out`.
    -> the sweep's summary {run, skipped, wall_seconds, cells}.

    Nothing is written before every input is checked (the inputs themselves first: their errors say more), and
    `cfg.out` may not overlap a release or a recovered mask (cells name the private run and describe the owner's
    fine-tuning; they must not be published with a release) nor be or contain a private run; then one writer at
    a time (`pmp.dir_lock`)."""
    cfg.validate()
    suite = get_suite(cfg.suite)
    if suite.durable is None and (cfg.trials is not None or cfg.budget_factors or cfg.data_sizes or
                                  cfg.general_file):
        raise ValueError(f"trials, budget_factors, data_sizes and general_file set up a tuning search, and suite "
                         f"{suite.name!r} has none: use --suite durable (or a suite file with a durable section)")
    models = resolve_models(cfg.models, cfg.private, cfg.baseline, scratch=cfg.scratch, recovered=cfg.recovered,
                            matched=cfg.matched, references=cfg.references)
    tasks = resolve_tasks(cfg.tasks, cfg.cache_dir, cfg.task_file, cfg.text_column, cfg.label_column, cfg.lm_file,
                          cfg.verbalisers)
    refuse_output_over(cfg.out,
                       releases={**{f"the release --models {n}": p for n, p in cfg.models.items()},
                                 **{f"the recovered mask --recovered {n}": p for n, p in cfg.recovered.items()},
                                 **{f"the reference --references {n}": p for n, p in cfg.references.items()}},
                       private_runs={f"the private run --private {n}": p for n, p in cfg.private.items()})
    kw = dict(seeds=cfg.seeds, mask_density=cfg.mask_density, heal_file=cfg.heal_file, cache_dir=cfg.cache_dir)
    if suite.durable is not None:  # checks its own inputs (data sizes, optimizers, heal text) before writing
        sweep = DurableSweep(models, tasks, suite, cfg.out, trials=cfg.trials, budget_factors=cfg.budget_factors,
                             data_sizes=cfg.data_sizes, general_file=cfg.general_file, **kw)
    else:
        sweep = Sweep(models, tasks, suite, cfg.out, **kw)
    with exclusive(cfg.out, "results directory"):
        return sweep.run()
