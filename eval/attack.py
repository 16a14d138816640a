"""`pmp attack` from its typed config: check the inputs (eval/attack_inputs.py), then run or resume the sweep
of fine-tuning cells (eval/sweep.py) on them, holding the results directory's write lock."""

from __future__ import annotations

from pmp.dir_lock import exclusive
from pmp.eval.attack_inputs import resolve_models, resolve_tasks
from pmp.eval.attacks import get_suite
from pmp.eval.config import AttackConfig
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
    models = resolve_models(cfg.models, cfg.private, cfg.baseline, scratch=cfg.scratch, recovered=cfg.recovered,
                            matched=cfg.matched)
    tasks = resolve_tasks(cfg.tasks, cfg.cache_dir, cfg.task_file, cfg.text_column, cfg.label_column, cfg.lm_file)
    refuse_output_over(cfg.out,
                       releases={**{f"the release --models {n}": p for n, p in cfg.models.items()},
                                 **{f"the recovered mask --recovered {n}": p for n, p in cfg.recovered.items()}},
                       private_runs={f"the private run --private {n}": p for n, p in cfg.private.items()})
    sweep = Sweep(models, tasks, suite, cfg.out, seeds=cfg.seeds, mask_density=cfg.mask_density)
    with exclusive(cfg.out, "results directory"):
        return sweep.run()
