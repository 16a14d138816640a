"""The tuning search of one arm: configurations drawn by an optuna sampler, and the choice of the best one on the
arm's own validation split.

A trial's configuration is a pure function of (the search seed, its index, the results of the trials before it):
each suggestion builds a fresh study from the finished trials and a sampler seeded with (search_seed, index). So a
search interrupted after any trial and resumed from its cell JSONs suggests exactly the configurations it would
have suggested uninterrupted, and arms given the same seed start from the same random configurations (TPE's
startup trials; with the random sampler every configuration is shared) -- their comparison is paired.
"""

from __future__ import annotations

import dataclasses
import math

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial

from pmp.eval.attacks import Attack
from pmp.eval.durable_spec import DurableSpec
from pmp.eval.metrics import better

WORST = {"lower": 1e30, "higher": -1e30}  # what a diverged trial (inf / nan metric) counts as in the sampler


def distributions(spec: DurableSpec, step_cap: int) -> dict:
    return {"optimizer": CategoricalDistribution(spec.optimizers),
            "lr": FloatDistribution(spec.lr_min, spec.lr_max, log=True),
            "schedule": CategoricalDistribution(spec.schedules),
            "steps": CategoricalDistribution(spec.step_choices(step_cap))}


def _sampler(spec: DurableSpec, index: int) -> optuna.samplers.BaseSampler:
    seed = spec.search_seed * 1_000_003 + index
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)


def suggest(spec: DurableSpec, step_cap: int, index: int, history: list[tuple[dict, float]], direction: str) -> dict:
    """The configuration of trial `index` given the (params, validation metric) of the trials before it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = distributions(spec, step_cap)
    study = optuna.create_study(direction="minimize" if direction == "lower" else "maximize",
                                sampler=_sampler(spec, index))
    for params, value in history:
        ok = value is not None and math.isfinite(value)
        study.add_trial(create_trial(params=params, distributions=dists, value=value if ok else WORST[direction]))
    return dict(study.ask(dists).params)


def trial_attack(name: str, kind: str, params: dict) -> Attack:
    """The attack a trial's configuration defines. SGD uses momentum 0.9; AdamW and SOAP decay >= 2-D tensors by
    0.01 (the registry's AdamW), SGD and Adagrad do not; gradients are clipped at 1.0 like every attack."""
    wd = 0.01 if params["optimizer"] in ("adamw", "soap") else 0.0
    return Attack(name, kind, optimizer=params["optimizer"], lr=float(params["lr"]), schedule=params["schedule"],
                  steps=int(params["steps"]), weight_decay=wd).validate()


def rename(attack: Attack, name: str, **changes) -> Attack:
    return dataclasses.replace(attack, name=name, **changes).validate()


def best_trial(trials: list[dict], direction: str) -> dict:
    """The trial whose validation metric (`selected_val`, at its validation-selected step) is best; the earliest
    on ties. Test metrics are never looked at: the attacker cannot see them."""
    best = None
    for t in trials:
        v = t["selected_val"]
        if v is None or not math.isfinite(v):
            continue
        if best is None or better(v, best["selected_val"], direction):
            best = t
    return best if best is not None else trials[0]


def ranked_trials(trials: list[dict], direction: str) -> list[dict]:
    """Trials from best to worst validation metric (stable: earlier first on ties; non-finite last)."""
    sign = 1.0 if direction == "lower" else -1.0

    def key(t):
        v = t["selected_val"]
        return (0, sign * v) if v is not None and math.isfinite(v) else (1, 0.0)

    return sorted(trials, key=key)
