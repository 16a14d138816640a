"""Other readings of a classification task, named `TASK:FORMULATION` (e.g. `--tasks trec:lm,sms_spam:text`).

  TASK:lm    classification as language modelling (kind 'lm_classification'): each label is named by a verbaliser
             word, the example is the prompt "<text>\\nLabel:" and the causal LM (its own head: no new one) is fine-
             tuned on the verbalised label's tokens only, then evaluated by likelihood -- the label whose verbaliser
             has the highest mean per-token log-likelihood after the prompt wins; accuracy is the metric. The frozen
             probe is that scoring zero-shot. Tokens, loss mask and scoring: eval/verbalised.py.
  TASK:text  the task's texts (labels dropped) as a held-out LM domain for a perplexity probe (kind 'lm'), one
             document per example, split by the task's own fixed (text-hash) split: no text is in both splits.

Both keep the task's fixed train/test split, so a formulated task is the same on every machine and for every model
-- the from-scratch reference gets the same formulation as every release. Verbalisers: the registry's
`TaskSpec.verbalisers` (TREC's codes ABBR ... NUM read as words), else the task's label names; a user's
`--verbalisers TASK=w1,w2,...` overrides both.
"""

from __future__ import annotations

import datasets

from pmp.data.task_registry import TASKS
from pmp.data.tasks import TaskData

FORMULATIONS = {"lm": "classification as language modelling: label words scored by likelihood",
                "text": "the task's texts as a held-out LM domain (perplexity)"}


def split_formulation(name: str) -> tuple[str, str]:
    """'trec:lm' -> ('trec', 'lm'); 'trec' -> ('trec', ''). An unknown formulation is a ValueError."""
    base, sep, form = name.partition(":")
    if not sep:
        return name, ""
    if not base or form not in FORMULATIONS:
        valid = ", ".join(f"{base or 'TASK'}:{f} ({d})" for f, d in FORMULATIONS.items())
        raise ValueError(f"task {name!r}: unknown formulation {form!r} after ':'; valid: {valid}")
    return base, form


def parse_verbaliser(words: str | list[str] | tuple[str, ...]) -> list[str]:
    """'w1,w2' (a command-line value) or a list -> the words, stripped."""
    items = words.split(",") if isinstance(words, str) else list(words)
    return [str(w).strip() for w in items]


def verbaliser_of(task: TaskData, override: str | list[str] | None = None) -> list[str]:
    """The word naming each label of `task` (index = label id): the override, else the registry's verbalisers,
    else the label names. Refuses a missing, empty, miscounted or ambiguous verbaliser with what to pass instead."""
    spec = TASKS.get(task.name)
    if override:
        words, src = parse_verbaliser(override), f"--verbalisers {task.name}="
    elif spec is not None and spec.verbalisers and tuple(task.label_names) == spec.label_names:
        words, src = list(spec.verbalisers), "the task registry"
    else:
        words, src = [str(n) for n in task.label_names], "its label names"
    hint = f"pass --verbalisers {task.name}=WORD1,WORD2,... (one word per label, in label order)"
    if not words:
        raise ValueError(f"task {task.name} has no label names to verbalise as language modelling; {hint}")
    if len(words) != task.num_labels:
        raise ValueError(f"task {task.name}: {len(words)} verbalisers from {src} ({words}) for {task.num_labels} "
                         f"labels; {hint}")
    empty = [i for i, w in enumerate(words) if not w]
    if empty:
        raise ValueError(f"task {task.name}: the verbaliser of label {empty[0]} (from {src}) is empty; {hint}")
    dup = sorted({w for w in words if words.count(w) > 1})
    if dup:
        raise ValueError(f"task {task.name}: labels share the verbaliser {dup[0]!r} (from {src}), so no likelihood "
                         f"can tell them apart; {hint}")
    return words


def formulate(task: TaskData, formulation: str, verbaliser: str | list[str] | None = None) -> TaskData:
    """`task` (a classification task) read as `formulation` ('lm' | 'text'), named 'TASK:FORMULATION'."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown task formulation {formulation!r}; valid: {', '.join(FORMULATIONS)}")
    name = f"{task.name}:{formulation}"
    if task.kind != "classification":
        raise ValueError(f"task {name}: {task.name} is a {task.kind} task; ':{formulation}' reads a classification "
                         "task (name an LM task without a suffix)")
    if verbaliser and formulation != "lm":
        raise ValueError(f"task {name}: verbalisers are for ':lm' tasks only")
    if formulation == "text":
        def texts(ds: datasets.Dataset) -> datasets.Dataset:
            return datasets.Dataset.from_dict({"text": [str(t) for t in ds["text"]]})

        return TaskData(name, "lm", texts(task.train), texts(task.test), 0, [])
    words = verbaliser_of(task, verbaliser)
    return TaskData(name, "lm_classification", task.train, task.test, task.num_labels, list(task.label_names), words)


__all__ = ["FORMULATIONS", "formulate", "parse_verbaliser", "split_formulation", "verbaliser_of"]
