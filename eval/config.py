"""The recipes of the evaluation verbs: `pmp attack` (AttackConfig), `pmp audit` (AuditConfig), `pmp report`
(ReportConfig), in the same typed style as `pmp.config.RunConfig`.

`AttackSettings` and `AuditSettings` hold what a user tunes; the verb configs add the inputs and outputs. The
pipeline's `attack:` and `audit:` sections are the settings alone (it supplies the inputs itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pmp.typed_config import check, doc


@dataclass
class AttackSettings:
    suite: str = doc("attack suite: quick | full | a suite YAML file (see `load_suite_file`)", "quick")
    tasks: str = doc("default (the LM probe + default classification tasks) | none | comma list of task names; "
                     "TASK:lm = a classification task as language modelling (label words scored by likelihood), "
                     "TASK:text = its texts as a held-out LM domain", "default")
    verbalisers: dict[str, str] = doc("TASK=word1,word2,...: the label words of TASK:lm, one per label in label "
                                      "order (default: the registry's, else the label names)", default_factory=dict)
    task_file: str = doc("your labelled csv/jsonl/parquet classification task ('' = none)", "")
    text_column: str = doc("text column of task_file", "text")
    label_column: str = doc("label column of task_file", "label")
    lm_file: str = doc("your held-out text file for an extra LM (perplexity) probe ('' = none)", "")
    seeds: int = doc("fine-tuning seeds per cell (0 = the suite's own)", 0)
    mask_density: float = doc("random-mask density when no private run gives the real one (0 = the suite default)",
                              0.0)
    scratch: bool = doc("also attack the same architecture trained from scratch (the validity reference)", True)
    cache_dir: str = doc("data cache directory ('' = $PMP_CACHE or ~/.cache/pmp)", "")
    trials: int | None = doc("configurations per arm of a suite's tuning search, the same for every arm (durable: "
                             "24; null = the suite's own)", None)
    budget_factors: list[float] = doc("step multipliers of a durable suite's budget curves, e.g. 1,3,10 (empty = "
                                      "the suite's own)", default_factory=list)
    data_sizes: list[int] = doc("attacker train-set sizes of a durable suite's data curves, in examples (LM tasks: "
                                "blocks); each must fit every task (empty = the suite's own)", default_factory=list)
    heal_file: str = doc("generic text for heal-then-fine-tune attacks ('' = the public default corpus of the data "
                         "cache)", "")
    general_file: str = doc("held-out general text on which a durable suite measures general ability after each "
                            "attacker arm's best attack ('' = the held-out split of the public default corpus)", "")

    def validate(self) -> AttackSettings:
        check(self.seeds >= 0, "seeds must be >= 1 (or 0 for the suite's own), got {}", self.seeds)
        check(0 <= self.mask_density <= 1, "mask_density must be in [0, 1] (0 = the suite default), got {}",
              self.mask_density)
        check(self.trials is None or self.trials >= 1, "trials must be >= 1 (configurations per arm; a tuning "
              "budget of 0 measures nothing), got {}", self.trials)
        check(all(f > 0 for f in self.budget_factors), "budget_factors must be > 0 (step multipliers; a budget of 0 "
              "trains nothing), got {}", self.budget_factors)
        check(all(n >= 1 for n in self.data_sizes), "data_sizes must be >= 1 (train examples or blocks; a data "
              "budget of 0 trains on nothing), got {}", self.data_sizes)
        return self


@dataclass
class AttackConfig(AttackSettings):
    models: dict[str, str] = doc("NAME=DIR: releases to attack (HF model dirs with a tokenizer); names pmp*/dense* "
                                 "set the protected/baseline roles", default_factory=dict)
    private: dict[str, str] = doc("NAME=RUN: the owner's private run of a PMP model (enables authorized "
                                  "fine-tuning, gives the random-mask density)", default_factory=dict)
    recovered: dict[str, str] = doc("NAME=DIR: a mask an attacker recovered from the release (`pmp audit` writes "
                                    "AUDIT/recovered_mask): enables recovered_mask attacks", default_factory=dict)
    references: dict[str, str] = doc("NAME=RELEASE: the unprotected release a protection without an owner secret "
                                     "(pmp protect sophon, mlac, sdd) started from; the durable suite's D0 compares "
                                     "NAME's updates with the same updates of it", default_factory=dict)
    baseline: str = doc("the dense baseline model's name ('' = the one named dense*)", "")
    matched: str = doc("a second dense baseline whose pre-training quality matches the protected model's (an "
                       "earlier dense state, `pmp export --step`) ('' = none)", "")
    out: str = doc("results directory (finished cells are skipped when re-run)", "")

    def validate(self) -> AttackConfig:
        super().validate()
        check(bool(self.models), "attack needs --models NAME=DIR ... (the releases to attack)")
        check(bool(self.out), "attack needs --out RESULTS (the results directory)")
        return self


@dataclass
class AuditSettings:
    text: str = doc("attacker text file for the gradient, curvature and activation attacks ('' = task or the LM "
                    "probe)", "")
    task: str = doc("a task whose train texts feed the gradient, curvature and activation attacks ('' = the LM probe, "
                    "if the data cache is prepared)", "")
    cache_dir: str = doc("data cache directory ('' = $PMP_CACHE or ~/.cache/pmp)", "")
    max_seconds: float = doc("time budget of the audit (s); seed guessing gets what is left", 600.0)
    max_seed: int = doc("seed guessing tries seeds 0..N (+ public and common seeds)", 1000)
    grad_batches: int = doc("batches (8 x 128 tokens) for the gradient attacks", 8)
    curvature_batches: int = doc("batches (8 x 128 tokens) for the Hutchinson Hessian-diagonal attacks (0 = off; "
                                 "small: about 50 s a batch at 4 probes on 2 shared CPU cores)", 2)
    curvature_probes: int = doc("Rademacher probe vectors per curvature batch (each one Hessian-vector product "
                                "by double backprop; the estimate's noise falls as 1/sqrt(batches x probes))", 4)
    curvature_fd_eps: float = doc("also the finite-difference curvature attack, H z from gradients at w +- EPS z "
                                  "(two more backward passes a probe); 0 = off", 0.0)
    activation_batches: int = doc("batches (8 x 128 tokens) for the activation-statistics attacks (forward passes "
                                  "only; 0 = off)", 8)
    shadow: str = doc("the attacker's own PMP run (same architecture and tokenizer, public data): enables the "
                      "shadow-run attacks ('' = none)", "")
    simulate_norm_jitter: float = doc("also audit a what-if copy whose norm weights start at 1 + N(0, SIGMA^2) "
                                      "(a proposed fix); 0 = off", 0.0)

    def validate(self) -> AuditSettings:
        check(not (self.text and self.task), "give the audit either text or task, not both")
        check(self.max_seconds > 0, "max_seconds must be > 0, got {}", self.max_seconds)
        check(self.max_seed >= 0, "max_seed must be >= 0, got {}", self.max_seed)
        check(self.grad_batches >= 0, "grad_batches must be >= 0, got {}", self.grad_batches)
        check(self.curvature_batches >= 0, "curvature_batches must be >= 0 (0 = no curvature attacks), got {}",
              self.curvature_batches)
        check(self.curvature_probes >= 1, "curvature_probes must be >= 1 (Hutchinson averages z * Hz over the probe "
              "vectors; to turn the curvature attacks off set curvature_batches=0), got {}", self.curvature_probes)
        check(self.curvature_fd_eps >= 0 and math.isfinite(self.curvature_fd_eps), "curvature_fd_eps must be a "
              "finite step >= 0 (e.g. 1e-3; 0 = no finite-difference attack), got {}", self.curvature_fd_eps)
        check(self.activation_batches >= 0, "activation_batches must be >= 0 (0 = no activation attacks), got {}",
              self.activation_batches)
        check(self.simulate_norm_jitter >= 0, "simulate_norm_jitter must be >= 0, got {}", self.simulate_norm_jitter)
        return self


@dataclass
class AuditConfig(AuditSettings):
    release: str = doc("the release directory (`pmp export` output; RUN/final works too)", "")
    private: str = doc("the private run dir: ground truth for scoring only (the attacks never read it)", "")
    out: str = doc("results directory ('' = RUN/audit: it describes the mask, keep it private)", "")

    def validate(self) -> AuditConfig:
        super().validate()
        check(bool(self.release), "audit needs the release directory (pmp audit RELEASE --private RUN)")
        check(bool(self.private), "audit needs --private RUN (the ground truth for scoring)")
        return self


@dataclass
class ReportConfig:
    results: str = doc("the --out directory of `pmp attack`", "")
    more_results: list[str] = doc("further `pmp attack` directories of the same models and suite, one per further "
                                  "pre-training seed (`pmp report RES1 RES2 ...`): the report pools them with RESULTS "
                                  "(means over pre-training x fine-tuning seeds, two-stage bootstrap intervals, each "
                                  "seed's own ratios beside)", default_factory=list)
    names: list[str] = doc("a short name for each results directory of a pooled report, in order (e.g. the "
                           "pre-training seeds s0 s1; empty = r1, r2, ...)", default_factory=list)
    out: str = doc("report directory ('' = RESULTS/report)", "")
    baseline: str = doc("override the baseline model's name ('' = from the results)", "")
    protected: list[str] = doc("override which models are protected (PMP); empty = from the results",
                               default_factory=list)
    protections: dict[str, str] = doc("NAME=RUN2: a model's restricted-domain protection run (`pmp protect sophon|"
                                      "mlac --out RUN2`): adds the restricted-domain view and marks it protected",
                                      default_factory=dict)

    def validate(self) -> ReportConfig:
        check(bool(self.results), "report needs the results directory (pmp report RESULTS)")
        dirs = self.result_dirs()
        check(all(dirs), "more_results lists an empty directory name: {}", self.more_results)
        check(len({Path(x).resolve() for x in dirs}) == len(dirs), "a results directory is given twice ({}): pool "
              "each pre-training seed's attack directory once", ", ".join(dirs))
        check(not self.names or len(self.names) == len(dirs), "names must name every results directory ({} given for "
              "{} directories: {})", len(self.names), len(dirs), ", ".join(dirs))
        check(all(self.names) and len(set(self.names)) == len(self.names), "names must be distinct and non-empty, "
              "got {}", self.names)
        return self

    def result_dirs(self) -> list[str]:
        """RESULTS, then MORE_RESULTS: one directory (a plain report) or several (pooled)."""
        return [self.results, *self.more_results]

    def pool_names(self) -> list[str]:
        return list(self.names) or [f"r{i + 1}" for i in range(len(self.result_dirs()))]

