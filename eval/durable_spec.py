"""The durable attacker's declared protocol: what a suite's `durable` section says (see eval/durable.py for what
runs it).

Every arm -- the protected release's attacker, the dense baseline, the quality-matched baseline, the from-scratch
reference and the owner's authorized (mask-aware) fine-tuning -- gets the SAME number `trials` of configurations,
drawn by an optuna sampler (seeded) over optimizer, learning rate (log-uniform), schedule and steps (fractions of
the suite budget's steps: the budget is a cap). Each arm's best configuration is the one best on its OWN
validation split; it is re-run at the suite's seeds (bootstrap intervals over those), and at `budget_factors`
times the steps (each arm's `curve_top` best configurations, plus its best at lr / factor: the "smaller learning
rate, more steps" attacker that undoes a curvature barrier) and at other attacker data sizes.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

SAMPLERS = ("tpe", "random")


@dataclass(frozen=True)
class DurableSpec:
    trials: int = 24  # configurations per arm (K): the same for every arm
    sampler: str = "tpe"  # tpe | random (optuna samplers, seeded)
    startup_trials: int = 8  # tpe: random configurations before the model-based ones
    search_seed: int = 0
    optimizers: tuple[str, ...] = ("adamw", "sgd", "adagrad", "soap")
    lr_min: float = 1e-6
    lr_max: float = 1e-2
    schedules: tuple[str, ...] = ("constant", "cosine")
    step_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)  # of the suite budget's steps (the cap)
    owner_arm: bool = True  # also tune the owner's authorized fine-tuning (models with --private)
    scratch_arm: bool = True  # also tune the from-scratch reference (the validity reference)
    budget_factors: tuple[float, ...] = (1.0, 3.0, 10.0)  # step multipliers of the budget curves (1 = the search)
    curve_top: int = 1  # best configurations per arm re-run at each larger budget
    curve_lr_scaled: bool = True  # ... plus the best configuration at lr / factor
    data_sizes_lm: tuple[int, ...] = (160, 640, 1600)  # attacker train blocks of the data curves (LM tasks)
    data_sizes_classification: tuple[int, ...] = (240, 960, 2400)  # attacker train examples (classification)
    d0: bool = True  # run the D0 diagnostic (eval/d0.py) on every model with a mask
    general: bool = True  # general ability after each attacker arm's best attack (LM tasks; eval/general_ability.py)
    d0_lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    d0_steps: tuple[int, ...] = (1, 20)
    hessian_iters: int = 20  # power-iteration steps per top-eigenvalue estimate
    hessian_batches: int = 2  # training batches the Hessian is taken on
    protect_ratio: float = 0.8  # a protection claim: best-attack gain ratio <= this (upper bootstrap bound at x1)
    bootstrap: int = 2000  # bootstrap resamples of the seeds for confidence intervals
    confidence: float = 0.95

    def validate(self, optimizers: tuple[str, ...], schedules: tuple[str, ...]) -> DurableSpec:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.trials >= 1, f"trials (configurations per arm) must be >= 1, got {self.trials}: a tuning budget of "
             "0 measures nothing")
        need(self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        need(self.startup_trials >= 1, f"startup_trials must be >= 1, got {self.startup_trials}")
        need(bool(self.optimizers), "optimizers is empty")
        bad = [o for o in self.optimizers if o not in optimizers]
        need(not bad, f"unknown optimizer {bad[0] if bad else ''!r}; valid: {', '.join(optimizers)}")
        need(bool(self.schedules) and all(s in schedules for s in self.schedules),
             f"schedules must be among {', '.join(schedules)}, got {list(self.schedules)}")
        need(0 < self.lr_min <= self.lr_max, f"need 0 < lr_min <= lr_max, got {self.lr_min}, {self.lr_max}")
        need(bool(self.step_fractions) and all(0 < f <= 1 for f in self.step_fractions),
             f"step_fractions must be in (0, 1] (the suite budget's steps are the cap), got "
             f"{list(self.step_fractions)}")
        check_factors(self.budget_factors)
        need(self.curve_top >= 1, f"curve_top must be >= 1, got {self.curve_top}")
        check_sizes(self.data_sizes_lm, "data_sizes_lm")
        check_sizes(self.data_sizes_classification, "data_sizes_classification")
        need(bool(self.d0_lrs) and all(x > 0 for x in self.d0_lrs), f"d0_lrs must be > 0, got {list(self.d0_lrs)}")
        need(bool(self.d0_steps) and all(x >= 1 for x in self.d0_steps), f"d0_steps must be >= 1, got "
             f"{list(self.d0_steps)}")
        need(self.hessian_iters >= 1 and self.hessian_batches >= 1, "hessian_iters and hessian_batches must be >= 1")
        need(self.protect_ratio > 0, f"protect_ratio must be > 0, got {self.protect_ratio}")
        need(self.bootstrap >= 1 and 0 < self.confidence < 1, "bootstrap must be >= 1 and confidence in (0, 1)")
        return self

    def data_sizes(self, task_kind: str) -> tuple[int, ...]:
        return self.data_sizes_lm if task_kind == "lm" else self.data_sizes_classification

    def step_choices(self, cap: int) -> tuple[int, ...]:
        """The searched step counts for a budget of `cap` steps (distinct, ascending, >= 1)."""
        return tuple(sorted({max(1, round(f * cap)) for f in self.step_fractions}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_factors(factors) -> None:
    if not factors or any(not math.isfinite(f) or f <= 0 for f in factors):
        raise ValueError(f"budget_factors must be > 0 (step multipliers of the base budget; 1 = the search's own), "
                         f"got {list(factors)}: a budget of 0 trains nothing")


def check_sizes(sizes, what: str) -> None:
    bad = [n for n in sizes if not isinstance(n, int) or isinstance(n, bool) or n < 1]
    if bad:
        raise ValueError(f"{what} must be whole numbers >= 1 (train examples, LM: blocks), got {bad[0]!r}: a data "
                         "budget of 0 trains on nothing")


def durable_from_mapping(raw: dict, base: DurableSpec | None, typed) -> DurableSpec:
    """A suite file's `durable:` mapping over `base` (the extended suite's spec, else the defaults). `typed(value,
    type, key)` converts scalars (attacks.py `_typed`); lists become tuples of their element type."""
    hints = typing.get_type_hints(DurableSpec)
    bad = sorted(set(raw) - set(hints))
    if bad:
        raise ValueError(f"durable has unknown fields {bad}; valid: {', '.join(hints)}")
    out = {}
    for k, v in raw.items():
        tp = hints[k]
        if typing.get_origin(tp) is tuple:
            elem = typing.get_args(tp)[0]
            items = typed(v, list, f"durable.{k}")
            out[k] = tuple(typed(x, elem, f"durable.{k}") for x in items)
        else:
            out[k] = typed(v, tp, f"durable.{k}")
    return dataclasses.replace(base or DurableSpec(), **out)
