"""Downstream tasks: the default tasks (registry in `pmp.data.task_registry`, files from `pmp.data.prepare`) and
user task files.

Classification tasks have a FIXED train/test split: examples are ranked by sha256 of their normalized text and
the first 20% (at most 1000) form the test set. The split depends on nothing but the texts, so it is the same on
every machine and for every seed, and duplicates (case/whitespace-insensitive) are removed first, so no test text
also appears in train. LM tasks (``kind='lm'``) are held-out text domains for a perplexity probe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from pmp.data.cache import cache_root, is_prepared, prepared_manifest, reading
from pmp.data.files import chunk_text, load_labelled_file
from pmp.data.hash_split import fixed_split
from pmp.data.prepare import prepare
from pmp.data.task_registry import TASKS, TaskSpec

__all__ = ["LM_CHUNK_CHARS", "TASKS", "TaskData", "TaskSpec", "default_classification_tasks", "default_lm_probe",
           "fixed_split", "list_tasks", "lm_task_from_text", "load_task", "load_task_file"]

LM_CHUNK_CHARS = 2_000  # rows of an LM task: ~2 k chars of consecutive exchanges (~500 tokens)


@dataclass
class TaskData:
    name: str
    kind: str  # 'classification' | 'lm' | 'lm_classification' (a classification task read as language modelling)
    train: datasets.Dataset  # columns: text (+ label, a ClassLabel, for classification)
    test: datasets.Dataset
    num_labels: int  # 0 for 'lm'
    label_names: list[str] = field(default_factory=list)
    verbaliser: list[str] = field(default_factory=list)  # lm_classification: the word(s) naming each label


def list_tasks() -> list[str]:
    return list(TASKS)


def default_classification_tasks() -> list[str]:
    return [n for n, s in TASKS.items() if s.default and s.kind == "classification"]


def default_lm_probe() -> str:
    return next(n for n, s in TASKS.items() if s.default and s.kind == "lm")


def load_task(name: str, cache_dir: str = "") -> TaskData:
    """A default task from the prepared cache (runs `prepare` first if the cache is not prepared)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} (or a csv/jsonl file through "
                         f"load_task_file)")
    if not is_prepared(cache_dir):
        print(f"pmp data: tasks not prepared in {cache_root(cache_dir)}; running prepare (one-time download)")
        prepare(cache_dir)
    root, spec = cache_root(cache_dir), TASKS[name]
    with reading(cache_dir):
        rec = prepared_manifest(cache_dir)["tasks"][name]
        raw = {s: (root / rec[s]["path"]).read_text("utf-8") for s in ("train", "test")}
    if spec.kind == "lm":
        split = {s: datasets.Dataset.from_dict({"text": chunk_text(raw[s], LM_CHUNK_CHARS)}) for s in raw}
        return TaskData(name, "lm", split["train"], split["test"], 0, [])
    names = list(rec["label_names"])
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    split = {}
    for s in ("train", "test"):
        rows = [json.loads(line) for line in raw[s].splitlines() if line]
        split[s] = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]},
                                              features=features)
    return TaskData(name, "classification", split["train"], split["test"], len(names), names)


def load_task_file(path: str, text_column: str = "text", label_column: str = "label",
                   test_fraction: float = 0.2) -> TaskData:
    """A user's labelled csv/tsv/jsonl/json/parquet file -> TaskData with the same fixed (text-hash) split.

    Texts seen more than once keep their first row; texts seen with conflicting labels are dropped.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ds = load_labelled_file(path, text_column, label_column)
    keys = [" ".join(t.lower().split()) for t in ds["text"]]
    labels_of: dict[str, set[int]] = {}
    first: dict[str, int] = {}
    for i, (k, y) in enumerate(zip(keys, ds["label"])):
        labels_of.setdefault(k, set()).add(y)
        first.setdefault(k, i)
    keep = [i for k, i in first.items() if len(labels_of[k]) == 1]
    if len(keep) < 2:
        raise ValueError(f"{path}: need at least 2 distinct labelled texts for a train/test split, got {len(keep)}")
    ds = ds.select(sorted(keep))
    names = ds.features["label"].names
    present = sorted(set(ds["label"]))
    if len(present) < 2:
        raise ValueError(f"a task needs at least 2 classes; {path} has only label {names[present[0]]!r} once texts "
                         f"seen with conflicting labels are dropped")
    train_idx, test_idx = fixed_split([" ".join(t.lower().split()) for t in ds["text"]], test_fraction)
    return TaskData(Path(path).stem, "classification", ds.select(train_idx), ds.select(test_idx), len(names), names)


def lm_task_from_text(path: str | Path, test_fraction: float = 0.2) -> TaskData:
    """A user's held-out text file as an LM-probe task (chunks of ~2k chars, fixed text-hash split)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LM probe text {p} does not exist")
    chunks = chunk_text(p.read_text("utf-8", errors="replace"), LM_CHUNK_CHARS)
    if len(chunks) < 2:
        raise ValueError(f"LM probe text {p} is too short: need at least 2 chunks of ~{LM_CHUNK_CHARS} chars")
    tr, te = fixed_split(chunks, test_fraction)
    mk = lambda idx: datasets.Dataset.from_dict({"text": [chunks[i] for i in idx]})  # noqa: E731
    return TaskData(p.stem, "lm", mk(tr), mk(te), 0, [])
