"""`pmp attack` from its typed config: check the inputs (eval/attack_inputs.py), then run or resume the sweep
of fine-tuning cells (eval/sweep.py) on them."""

from __future__ import annotations

from pmp.eval.attack_inputs import resolve_models, resolve_tasks
from pmp.eval.attacks import get_suite
from pmp.eval.config import AttackConfig
from pmp.eval.sweep import Sweep


def run_attack(cfg: AttackConfig) -> dict:
    """`pmp attack`: check the releases and tasks of `cfg`, then run (or resume) the sweep into `cfg.out`.
    -> the sweep's summary {run, skipped, wall_seconds, cells}."""
    cfg.validate()
    suite = get_suite(cfg.suite)
    models = resolve_models(cfg.models, cfg.private, cfg.baseline, scratch=cfg.scratch, recovered=cfg.recovered,
                            matched=cfg.matched)
    tasks = resolve_tasks(cfg.tasks, cfg.cache_dir, cfg.task_file, cfg.text_column, cfg.label_column, cfg.lm_file)
    return Sweep(models, tasks, suite, cfg.out, seeds=cfg.seeds, mask_density=cfg.mask_density).run()
