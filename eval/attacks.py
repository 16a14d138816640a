"""Attacks on a release: named, typed configurations in a registry, and the named suites built from them.

An `Attack` says *what* is trained (its `kind`) and *how* (optimizer, learning rate, schedule); a `Budget` says
how much (steps, batch size, examples, sequence length, evaluation points). Budgets belong to the suite and are
per task kind (classification / lm; classification as language modelling, `TASK:lm`, spends the classification
budget), so every attack in a suite spends the same budget unless it overrides `steps` -- gain ratios compare like
with like.

Kinds (the new classification head is always trainable; it is random at the start of every cell):
  probe        frozen base, head only (classification). For the LM probe nothing is trained: the "probe" is the
               release's own perplexity on the held-out domain (training only lm_head would change the model's
               output vocabulary map and mix a tiny fine-tune into the reference point). For classification as
               language modelling (`TASK:lm`, eval/verbalised.py) neither: zero-shot likelihood scoring of the
               label words. (The causal-LM task kinds have no new head: "+ head" below is then nothing.)
  full         every parameter
  lora         peft LoRA adapters on all linear layers (`target_modules="all-linear"`) + the head
  norm_bias    only 1-D parameters (norm weights, biases) + the head
  random_mask  only the entries of a RANDOM mask with the density of the PMP mask (an attacker's guess) + head
  authorized   only the entries of the REAL private mask (the owner's mask-aware fine-tuning) + head; PMP models
               given with --private only
  recovered_mask  only the entries of a mask an attacker RECOVERED from the release (`pmp audit` writes the best
               one to AUDIT/recovered_mask) + head; models given with --recovered only. Recover-then-fine-tune:
               does a recovered mask buy the attacker the owner's (authorized) gains?
Adaptive kinds (the `durable` suite; see eval/adaptive.py):
  heal_then_ft   fine-tune the causal LM on generic text first (`heal_steps` AdamW steps at `heal_lr` on the public
               corpus or the attacker's own `--heal-file`), then every parameter on the task
  reinit_complement  re-initialise the entries a recovered mask (`pmp audit`) leaves out -- the suspected frozen
               complement -- with a fresh init of the architecture, then fine-tune every parameter; --recovered only
  canonicalise_then_ft  re-balance every function-preserving scale pair of a Llama model to equal norms
               (pmp/rescale.py: up/down, value/output, rotary q/k) -- undoes a secret rescaling whatever its key,
               and leaves any model's function unchanged -- then fine-tune every parameter
  random_mask with `mask_density` > 0 trains a random mask of that density instead of the PMP density (sparse
               fine-tuning at 1 % / 10 % / 50 %)
The `from_scratch` reference is not an attack but a model (same architecture, random init) that runs every
attack with `scratch: true` at the same budget. A suite with a `durable` section (eval/durable_spec.py) also runs
an equal-budget tuning search per arm, budget curves and the D0 diagnostic (eval/durable.py).

Add an attack in code with `register(Attack(...))`, or in YAML (see `load_suite_file` and configs/attack_*.yaml).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from pmp.eval.durable_spec import DurableSpec, durable_from_mapping
from pmp.typed_config import load_yaml_mapping

KINDS = ("probe", "full", "lora", "norm_bias", "random_mask", "authorized", "recovered_mask")
ADAPTIVE_KINDS = ("heal_then_ft", "reinit_complement", "canonicalise_then_ft")  # every parameter, after a
# preparation step
ALL_KINDS = KINDS + ADAPTIVE_KINDS
DENSE_KINDS = ("full", *ADAPTIVE_KINDS)  # kinds whose fine-tuning phase trains every parameter
# soap: SOAP (Shampoo-preconditioned Adam) from the maintained `pytorch-optimizer` package, the whitening /
# second-order attacker of the durable suite
OPTIMIZERS = ("adamw", "adam", "sgd", "adagrad", "soap")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Attack:
    name: str
    kind: str
    optimizer: str = "adamw"
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine = linear warm-up (warmup_fraction of the steps) then cosine to min_lr_ratio
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # AdamW/SGD/Adagrad decay on >= 2-D tensors; Adam ignores it (plain Adam)
    momentum: float = 0.9  # SGD only
    grad_clip: float = 1.0  # 0 = no clipping
    lora_r: int = 8
    lora_alpha: int = 16
    steps: int = 0  # 0 = the suite budget's steps
    scratch: bool = False  # also run on the from-scratch reference model
    note: str = ""
    mask_density: float = 0.0  # random_mask only: the density of the random mask (0 = the PMP density)
    heal_steps: int = 0  # heal_then_ft only: AdamW steps on generic text before the task
    heal_lr: float = 1e-4  # heal_then_ft only: constant learning rate of the healing phase

    def validate(self) -> Attack:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"attack {self.name!r}: {msg}")

        need(bool(self.name) and "__" not in self.name and "/" not in self.name,
             "a name must be non-empty without '__' or '/' (it names result files)")
        need(self.kind in ALL_KINDS, f"kind must be one of {', '.join(ALL_KINDS)}, got {self.kind!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        need(self.lora_r >= 1 and self.lora_alpha >= 1, "lora_r and lora_alpha must be >= 1")
        need(self.steps >= 0, f"steps must be >= 0 (0 = the suite budget), got {self.steps}")
        need(0 <= self.mask_density <= 1, f"mask_density must be in [0, 1] (0 = the PMP density), got "
             f"{self.mask_density}")
        need(self.mask_density == 0 or self.kind == "random_mask", "mask_density is for random_mask attacks only")
        need(self.heal_steps >= 0 and self.heal_lr > 0, "heal_steps must be >= 0 and heal_lr > 0")
        need(self.kind != "heal_then_ft" or self.heal_steps >= 1, "a heal_then_ft attack needs heal_steps >= 1")
        return self

    def to_dict(self) -> dict:
        """The definition as recorded in cells and hashed into their `inputs_sha`. Fields added after the first
        results were written are left out while at their defaults, so those results keep their digests (and are
        not recomputed)."""
        d = dataclasses.asdict(self)
        for k, default in _LATER_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d


_LATER_FIELDS = {"mask_density": 0.0, "heal_steps": 0, "heal_lr": 1e-4}


@dataclass(frozen=True)
class Budget:
    """How much an attacker spends on one task kind. Examples are capped; the caps are recorded in every result."""

    steps: int = 150
    batch_size: int = 16
    max_len: int = 64  # classification: truncate texts to this many tokens; lm: block length
    max_train: int = 1500  # classification: train examples; lm: train blocks (carved AFTER the validation split)
    max_val: int = 200  # the attacker's own validation split, carved from the task's train split
    max_test: int = 500  # test examples (lm: test blocks); fixed, the same for every seed and model
    eval_every: int = 50  # evaluate val + test every this many steps (and at the last step)

    def validate(self, what: str = "budget") -> Budget:
        for k in ("steps", "batch_size", "max_len", "max_train", "max_val", "max_test", "eval_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{what}.{k} must be >= 1, got {getattr(self, k)}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    attacks: tuple[Attack, ...]
    classification: Budget = Budget()
    lm: Budget = Budget(steps=150, batch_size=8, max_len=128, max_train=1200, max_val=32, max_test=64, eval_every=50)
    seeds: int = 2
    mask_density: float = 0.5  # random-mask density when no --private run gives the real one
    description: str = ""
    durable: DurableSpec | None = None  # the equal-budget search, budget curves, D0 (eval/durable.py); None = off

    def budget(self, task_kind: str) -> Budget:
        return self.lm if task_kind == "lm" else self.classification

    def attack(self, name: str) -> Attack:
        for a in self.attacks:
            if a.name == name:
                return a
        raise ValueError(f"unknown attack {name!r} in suite {self.name!r}; valid: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [a.name for a in self.attacks]

    def validate(self) -> Suite:
        if not self.attacks:
            raise ValueError(f"suite {self.name!r} has no attacks")
        names = self.names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"suite {self.name!r} lists attacks more than once: {dup}")
        if not any(a.kind == "probe" for a in self.attacks):
            raise ValueError(f"suite {self.name!r} needs a 'probe' attack: it is the reference point of every gain")
        for a in self.attacks:
            a.validate()
        self.classification.validate("classification")
        self.lm.validate("lm")
        if self.seeds < 1:
            raise ValueError(f"suite {self.name!r}: seeds must be >= 1")
        if not 0 < self.mask_density <= 1:
            raise ValueError(f"suite {self.name!r}: mask_density must be in (0, 1]")
        if self.durable is not None:
            try:
                self.durable.validate(OPTIMIZERS, SCHEDULES)
            except ValueError as e:
                raise ValueError(f"suite {self.name!r}: durable: {e}") from None
        return self


def config_digest(obj) -> str:
    """Short sha256 of a JSON-able object (an attack, a budget, a cell's inputs): a result whose recorded digest
    differs was computed under another definition and is recomputed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- registry
ATTACKS: dict[str, Attack] = {}


def register(attack: Attack, overwrite: bool = False) -> Attack:
    attack.validate()
    if attack.name in ATTACKS and ATTACKS[attack.name] != attack and not overwrite:
        raise ValueError(f"an attack named {attack.name!r} is already registered with another definition")
    ATTACKS[attack.name] = attack
    return attack


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _schedule_tag(s: str) -> str:
    return "cos" if s == "cosine" else "const"


# Learning rates span 1e-5..1e-3 for every optimizer, plus the larger steps SGD and Adagrad need to move at all.
FULL_LRS = {"adamw": (1e-5, 1e-4, 3e-4, 1e-3), "adam": (1e-5, 1e-4, 3e-4, 1e-3),
            "sgd": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "adagrad": (1e-5, 1e-4, 1e-3, 1e-2)}
register(Attack("probe", "probe", lr=1e-2, schedule="constant", note="frozen base, head only: reference"))
for _opt, _lrs in FULL_LRS.items():
    for _lr in _lrs:
        for _sch in SCHEDULES:
            register(Attack(f"full_{_opt}_{_lr_tag(_lr)}_{_schedule_tag(_sch)}", "full", optimizer=_opt, lr=_lr,
                            schedule=_sch, weight_decay=0.01 if _opt == "adamw" else 0.0, scratch=True))
for _lr in (1e-4, 1e-3, 3e-3):
    register(Attack(f"lora_r8_{_lr_tag(_lr)}_cos", "lora", lr=_lr, lora_r=8, lora_alpha=16))
register(Attack("lora_r32_1e-3_cos", "lora", lr=1e-3, lora_r=32, lora_alpha=32))
for _lr in (1e-4, 1e-3, 1e-2):
    register(Attack(f"norm_bias_{_lr_tag(_lr)}_cos", "norm_bias", lr=_lr))
for _kind in ("random_mask", "authorized", "recovered_mask"):
    for _lr in (1e-4, 3e-4, 1e-3):
        register(Attack(f"{_kind}_{_lr_tag(_lr)}_cos", _kind, lr=_lr, weight_decay=0.01))

# The quick suite: one attack of every kind, 2 seeds, every default task, on budgets cut so that `small` releases
# finish on 2 CPU cores in under 30 minutes (measured: see README). The cuts against the full suite's budgets:
# one full fine-tune (AdamW + cosine; SGD, Adam, Adagrad and the lr grid are in `full`), 60 classification steps
# on texts truncated to 48 tokens with 400 test examples, 80 LM steps on 64-token blocks (64 test blocks). A first
# cut (80 / 100 steps, 500 test examples) measured ~34 min on small releases.
QUICK = ("probe", "full_adamw_3e-4_cos", "lora_r8_1e-3_cos", "norm_bias_1e-3_cos", "random_mask_1e-3_cos",
         "authorized_1e-3_cos", "recovered_mask_1e-3_cos")
SUITES: dict[str, Suite] = {
    "quick": Suite("quick", tuple(get_attack(n) for n in QUICK),
                   classification=Budget(steps=60, max_len=48, max_train=960, max_test=400, eval_every=30),
                   lm=Budget(steps=80, batch_size=8, max_len=64, max_train=640, max_val=32, max_test=64,
                             eval_every=40),
                   description="one attack of every kind, 2 seeds, every default task; budgets cut for CPU"),
    "full": Suite("full", tuple(ATTACKS.values()), seeds=3, description="the whole registered grid, 3 seeds"),
}


# ------------------------------------------------------------------------------------- adaptive attacks
# Registered after SUITES so that `full` (every attack registered above) keeps its definition.
# Heal-then-fine-tune: 200 steps of generic text at 1e-4 (research/protection.md 4.2, V1 test), then the quick
# suite's full fine-tune. Re-init of the suspected complement, then the same fine-tune. Sparse fine-tuning of
# random masks of 1 %, 10 % and 50 % at the quick suite's sparse learning rate.
register(Attack("heal_then_ft_3e-4_cos", "heal_then_ft", lr=3e-4, weight_decay=0.01, heal_steps=200, heal_lr=1e-4,
                note="generic-text healing, then full fine-tuning"))
register(Attack("reinit_complement_3e-4_cos", "reinit_complement", lr=3e-4, weight_decay=0.01,
                note="re-initialise what a recovered mask leaves out, then full fine-tuning"))
# Canonicalise-then-fine-tune: re-balance every function-preserving scale pair of a Llama model to equal norms
# (pmp/rescale.py) -- undoes a secret rescaling whatever its key -- then the quick suite's full fine-tune.
register(Attack("canonicalise_then_ft_3e-4_cos", "canonicalise_then_ft", lr=3e-4, weight_decay=0.01,
                note="re-balance scaled weight pairs (undoes a secret rescaling), then full fine-tuning"))
for _pct in (1, 10, 50):
    register(Attack(f"random_mask_{_pct}pct_1e-3_cos", "random_mask", lr=1e-3, weight_decay=0.01,
                    mask_density=_pct / 100))

# The durable suite: the fixed attacks below for every model, plus (its `durable` section) an equal tuning budget
# per arm -- K = 24 configurations of optimizer (AdamW, SGD+momentum, Adagrad, SOAP), learning rate 1e-6..1e-2,
# schedule and steps, each arm's best chosen on its own validation split and re-run at 3 seeds -- budget curves
# at x1 / x3 / x10 steps and at three attacker data sizes, and the D0 diagnostic. Budgets are the quick suite's
# (evaluated more often, for early stopping). Estimated (not measured) on `small`, 2 CPU cores: ~1 h per task
# (the LM probe), ~4.5-5.5 h for the default tasks; see eval/durable.py.
DURABLE = ("probe", "lora_r8_1e-3_cos", "norm_bias_1e-3_cos", "recovered_mask_1e-3_cos", "heal_then_ft_3e-4_cos",
           "reinit_complement_3e-4_cos", "random_mask_1pct_1e-3_cos", "random_mask_10pct_1e-3_cos",
           "random_mask_50pct_1e-3_cos", "canonicalise_then_ft_3e-4_cos")
SUITES["durable"] = Suite(
    "durable", tuple(get_attack(n) for n in DURABLE),
    classification=Budget(steps=60, max_len=48, max_train=960, max_test=400, eval_every=15),
    lm=Budget(steps=80, batch_size=8, max_len=64, max_train=640, max_val=32, max_test=64, eval_every=20),
    seeds=3, durable=DurableSpec(),
    description="equal tuning budgets (K=24 per arm), adaptive attacks, budget curves, D0; 3 seeds")


def get_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a YAML suite file."""
    if name_or_path in SUITES:
        return SUITES[name_or_path].validate()
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_suite_file(p)
    raise ValueError(f"unknown suite {name_or_path!r}; valid suites: {', '.join(SUITES)} (or a YAML suite file)")


def load_suite_file(path: str | Path) -> Suite:
    """YAML suite:
      name: mysuite
      seeds: 2
      attacks: [probe, full_adamw_3e-4_cos, {name: my_sgd, kind: full, optimizer: sgd, lr: 0.05}]
      classification: {steps: 100}      # Budget fields; omitted ones keep their defaults
      lm: {steps: 100, batch_size: 8}
      durable: {trials: 20, budget_factors: [1, 3]}   # DurableSpec fields (eval/durable_spec.py); turns it on
    An attack given as a mapping is registered (so later suites can name it) and used. Any bad value (a wrong
    type, a negative budget, an unknown optimizer or attack) is a ValueError that names the file and the field."""
    p = Path(path)
    raw = load_yaml_mapping(p, "suite file", " (a YAML mapping with an 'attacks' list)")
    try:
        return _suite_from_mapping(raw, p)
    except ValueError as e:
        raise ValueError(f"suite file {p}: {e}") from None


SUITE_KEYS = {"name": str, "seeds": int, "attacks": list, "classification": dict, "lm": dict, "mask_density": float,
              "description": str, "extends": str, "durable": dict}


def _suite_from_mapping(raw: dict, p: Path) -> Suite:
    unknown = sorted(set(raw) - set(SUITE_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; valid: {', '.join(SUITE_KEYS)}")
    raw = {k: _typed(v, SUITE_KEYS[k], k) for k, v in raw.items() if v is not None}  # `key:` alone = default
    if raw.get("extends") and raw["extends"] not in SUITES:
        raise ValueError(f"extends {raw['extends']!r} is not a suite; valid: {', '.join(SUITES)}")
    base = SUITES[raw["extends"]] if raw.get("extends") else Suite("base", ())
    attacks = list(base.attacks)
    for i, item in enumerate(raw.get("attacks", [])):
        if isinstance(item, str):
            attacks.append(get_attack(item))
        elif isinstance(item, dict):
            attacks.append(register(_attack_from_mapping(item, i), overwrite=True))
        else:
            raise ValueError(f"attacks[{i}]: each attack is a registered name or a mapping, got {item!r}")
    durable = base.durable
    if "durable" in raw:
        durable = durable_from_mapping(raw["durable"], base.durable, _typed)
    suite = Suite(raw.get("name", p.stem), tuple(attacks), _budget(raw, "classification", base.classification),
                  _budget(raw, "lm", base.lm), raw.get("seeds", base.seeds), raw.get("mask_density", base.mask_density),
                  raw.get("description", ""), durable)
    return suite.validate()


def _attack_from_mapping(item: dict, i: int) -> Attack:
    fields = {f.name: f for f in dataclasses.fields(Attack)}
    name = item.get("name")
    where = f"attack {name!r}" if isinstance(name, str) else f"attacks[{i}]"
    bad = sorted(set(item) - set(fields))
    if bad:
        raise ValueError(f"{where} has unknown fields {bad}; valid: {', '.join(fields)}")
    missing = [k for k in ("name", "kind") if k not in item]
    if missing:
        raise ValueError(f"{where} lacks {' and '.join(missing)} (every new attack needs a name and a kind: "
                         f"{', '.join(KINDS)})")
    hints = typing.get_type_hints(Attack)
    return Attack(**{k: _typed(v, hints[k], f"{where}: {k}") for k, v in item.items()})


def _budget(raw: dict, key: str, default: Budget) -> Budget:
    over = raw.get(key) or {}
    hints = typing.get_type_hints(Budget)
    bad = sorted(set(over) - set(hints))
    if bad:
        raise ValueError(f"{key} has unknown budget fields {bad}; valid: {', '.join(hints)}")
    return dataclasses.replace(default, **{k: _typed(v, hints[k], f"{key}.{k}") for k, v in over.items()})


def _typed(value, tp: type, key: str):
    """`value` as the field type `tp` (str, int, float, bool, list, dict), or a ValueError naming `key`. Numbers
    may be given as strings: PyYAML reads `1e-3` (no dot) as the string '1e-3'."""
    ok = None
    if tp is bool:
        ok = value if isinstance(value, bool) else None
    elif isinstance(value, bool):
        ok = None
    elif tp is int:
        ok = _number(value)
        ok = int(ok) if ok is not None and ok.is_integer() else None
    elif tp is float:
        ok = _number(value)
    elif tp is str:
        ok = str(value) if isinstance(value, str | int | float) else None
    elif isinstance(value, tp):
        ok = value
    if ok is None:
        what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", list: "a list",
                dict: "a mapping"}[tp]
        raise ValueError(f"{key} must be {what}, got {value!r}")
    return ok


def _number(value) -> float | None:
    """A finite number from an int, a float or a numeric string; None otherwise."""
    try:
        x = float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


__all__ = ["ADAPTIVE_KINDS", "ALL_KINDS", "ATTACKS", "Attack", "Budget", "DENSE_KINDS", "KINDS", "OPTIMIZERS",
           "SCHEDULES", "SUITES", "Suite", "config_digest", "get_attack", "get_suite", "load_suite_file", "register"]
