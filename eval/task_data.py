"""Tasks as token tensors: one task tokenized for one release's tokenizer and one seed, split three ways.

Classification: texts truncated to `Budget.max_len` tokens (padding happens per batch, eval/task_batches.py).
Classification as language modelling (kind 'lm_classification', `TASK:lm`): the same examples and splits, each text
as the prompt "<text>\nLabel:" (text truncated to `Budget.max_len` tokens first) and each label as the tokens of its
verbaliser (eval/verbalised.py).
LM probe: eos-separated text cut into blocks of `Budget.max_len` tokens.

Splits, per (task, seed): the attacker's validation split (max_val) is carved from the task's TRAIN split with a
seeded permutation, the training examples (max_train) come after it, and the test split is the task's fixed one
(first max_test of a fixed permutation): the same for every seed and model, never seen in training or selection.
Shapes: N examples (blocks), T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pmp.data.text_blocks import text_blocks
from pmp.eval.verbalised import PROMPT_SUFFIX, SCORING, TEMPLATE, prompt_ids, verbaliser_ids

DIRECTION = {"classification": "higher", "lm": "lower", "lm_classification": "higher"}  # is a larger metric better?
METRIC = {"classification": "accuracy", "lm": "perplexity", "lm_classification": "accuracy"}
CAUSAL_LM_KINDS = ("lm", "lm_classification")  # the causal LM itself is the task model (its own head, no new one)


@dataclass
class PreparedTask:
    """One task tokenized for one tokenizer and seed: lists of ids (classification; lm_classification: the prompts)
    or [N, T] blocks (lm)."""

    name: str
    kind: str
    num_labels: int
    pad_id: int
    train: dict  # classification: {"ids": list[list[int]], "labels": list[int]}; lm: {"blocks": LongTensor}
    val: dict
    test: dict
    sizes: dict = field(default_factory=dict)
    targets: list[list[int]] = field(default_factory=list)  # lm_classification: each label's verbaliser tokens
    formulation: dict = field(default_factory=dict)  # lm_classification: template, verbaliser, scoring (recorded)

    @property
    def direction(self) -> str:
        return DIRECTION[self.kind]

    @property
    def metric(self) -> str:
        return METRIC[self.kind]


def validation_size(n_train: int, budget) -> int:
    """Examples of a classification task's train split carved off as the attacker's validation split."""
    return min(budget.max_val, max(1, n_train // 5))


def prepare_task(task, tokenizer, budget, seed: int) -> PreparedTask:
    pad = tokenizer.eos_token_id
    rng = np.random.default_rng([seed, 7])
    if task.kind == "lm":
        return _prepare_lm(task, tokenizer, budget, rng, pad)
    if task.kind not in ("classification", "lm_classification"):
        raise ValueError(f"task {task.name}: unknown task kind {task.kind!r}; valid: {', '.join(DIRECTION)}")
    n = len(task.train)
    if n < 2:
        raise ValueError(f"task {task.name}: needs at least 2 training examples to carve a validation split")
    # the same examples in every formulation of a task (TASK and TASK:lm): one permutation, drawn the same way
    n_val = validation_size(n, budget)
    perm = rng.permutation(n)
    val_idx, train_idx = perm[:n_val], perm[n_val:n_val + budget.max_train]
    test_idx = np.sort(np.random.default_rng(0).permutation(len(task.test))[:budget.max_test])
    verbalised = task.kind == "lm_classification"
    targets = verbaliser_ids(tokenizer, list(task.verbaliser), task.name) if verbalised else []

    def encode(ds, idx) -> dict:
        idx = [int(i) for i in idx]
        texts = [str(ds[i]["text"]) for i in idx] if idx else []
        labels = [int(ds[i]["label"]) for i in idx]
        if verbalised:
            return {"ids": prompt_ids(tokenizer, texts, budget.max_len), "labels": labels}
        ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=budget.max_len)["input_ids"]
        return {"ids": [x if x else [pad] for x in ids], "labels": labels}

    tr, va, te = encode(task.train, train_idx), encode(task.train, val_idx), encode(task.test, test_idx)
    sizes = {"train": len(tr["labels"]), "val": len(va["labels"]), "test": len(te["labels"]),
             "task_train": n, "task_test": len(task.test), "max_len": budget.max_len}
    formulation = formulation_record(task, targets) if verbalised else {}
    return PreparedTask(task.name, task.kind, task.num_labels, pad, tr, va, te, sizes, targets, formulation)


def formulation_record(task, targets: list[list[int]] | None = None) -> dict:
    """What defines an lm_classification task beyond its data: recorded in every cell and hashed into its inputs."""
    rec = {"template": TEMPLATE, "prompt_suffix": PROMPT_SUFFIX, "verbaliser": list(task.verbaliser),
           "scoring": SCORING}
    if targets is not None:
        rec["verbaliser_tokens"] = [len(t) for t in targets]
    return rec


def _prepare_lm(task, tokenizer, budget, rng, pad) -> PreparedTask:
    texts = [str(t) for t in task.train["text"]]
    order = rng.permutation(len(texts))
    n_val_docs = max(1, len(texts) // 10)
    val_texts = [texts[i] for i in order[:n_val_docs]]  # whole documents: no text spans val and train
    train_texts = [texts[i] for i in order[n_val_docs:]]
    val = text_blocks(tokenizer, val_texts, budget.max_len, budget.max_val, pad)
    train = text_blocks(tokenizer, train_texts, budget.max_len, budget.max_train, pad)
    test = text_blocks(tokenizer, [str(t) for t in task.test["text"]], budget.max_len, budget.max_test, pad)
    for split, b in (("train", train), ("val", val), ("test", test)):
        if len(b) == 0:
            raise ValueError(f"LM task {task.name}: its {split} text is shorter than one block of {budget.max_len} "
                             "tokens; use more text or a smaller lm max_len")
    sizes = {"train_blocks": len(train), "val_blocks": len(val), "test_blocks": len(test), "block_len": budget.max_len,
             "train_tokens": train.numel()}
    return PreparedTask(task.name, "lm", 0, pad, {"blocks": train}, {"blocks": val}, {"blocks": test}, sizes)
