"""Downstream tasks: the registry of default tasks (prepared by `pmp.data.prepare`) and user task files.

Classification tasks have a FIXED train/test split: examples are ranked by sha256 of their normalized text and
the first 20% (at most 1000) form the test set. The split depends on nothing but the texts, so it is the same on
every machine and for every seed, and duplicates (case/whitespace-insensitive) are removed first, so no test text
also appears in train. LM tasks (``kind='lm'``) are held-out text domains for a perplexity probe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # 'classification' | 'lm'
    description: str
    label_names: tuple[str, ...] = ()
    default: bool = False  # part of default_classification_tasks() / default_lm_probe()

    @property
    def subdir(self) -> str:
        return "tasks" if self.kind == "classification" else "lm_probe"


TASKS: dict[str, TaskSpec] = {
    "movie_sentiment": TaskSpec("classification", "movie-review sentence sentiment (Hutto & Gilbert 2014), "
                                "negative/positive, neutral dropped", ("negative", "positive"), default=True),
    "trec": TaskSpec("classification", "TREC question type, 6 coarse classes",
                     ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), default=True),
    "sms_spam": TaskSpec("classification", "SMS spam vs ham (an easy sanity task)", ("ham", "spam"), default=True),
    "tweet_sentiment": TaskSpec("classification", "tweet sentiment (Hutto & Gilbert 2014), negative/positive",
                                ("negative", "positive"), default=True),
    "amazon_sentiment": TaskSpec("classification", "Amazon review sentence sentiment (Hutto & Gilbert 2014)",
                                 ("negative", "positive")),
    "movie_dialog": TaskSpec("lm", "Cornell movie dialogs: held-out LM domain for a perplexity probe", default=True),
}
LM_CHUNK_CHARS = 2_000  # rows of an LM task: ~2 k chars of consecutive exchanges (~500 tokens)


@dataclass
class TaskData:
    name: str
    kind: str  # 'classification' | 'lm'
    train: datasets.Dataset  # columns: text (+ label, a ClassLabel, for classification)
    test: datasets.Dataset
    num_labels: int  # 0 for 'lm'
    label_names: list[str] = field(default_factory=list)


def list_tasks() -> list[str]:
    return list(TASKS)


def default_classification_tasks() -> list[str]:
    return [n for n, s in TASKS.items() if s.default and s.kind == "classification"]


def default_lm_probe() -> str:
    return next(n for n, s in TASKS.items() if s.default and s.kind == "lm")


def fixed_split(keys: list[str], test_fraction: float = 0.2, test_cap: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, test indices), both ascending: the round(test_fraction * n) keys (at most test_cap when
    > 0, at least 1 when n >= 2) with the smallest sha256 go to test. Equal keys land on the same side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(keys)
    n_test = round(test_fraction * n)
    if test_cap > 0:
        n_test = min(n_test, test_cap)
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    digests = [hashlib.sha256(k.encode("utf-8")).hexdigest() for k in keys]
    order = sorted(range(n), key=lambda i: (digests[i], i))
    test = set(order[:n_test])
    return [i for i in range(n) if i not in test], sorted(test)


def load_task(name: str, cache_dir: str = "") -> TaskData:
    """A default task from the prepared cache (runs `prepare` first if the cache is not prepared)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} (or a csv/jsonl file through "
                         f"load_task_file)")
    from pmp.data.prepare import cache_root, is_prepared, prepare, read_manifest

    if not is_prepared(cache_dir):
        print(f"pmp data: tasks not prepared in {cache_root(cache_dir)}; running prepare (one-time download)")
        prepare(cache_dir)
    root, spec = cache_root(cache_dir), TASKS[name]
    rec = read_manifest(cache_dir)["tasks"][name]
    if spec.kind == "lm":
        from pmp.data.files import chunk_text

        split = {s: datasets.Dataset.from_dict({"text": chunk_text((root / rec[s]["path"]).read_text("utf-8"),
                                                                   LM_CHUNK_CHARS)}) for s in ("train", "test")}
        return TaskData(name, "lm", split["train"], split["test"], 0, [])
    names = list(rec["label_names"])
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    split = {}
    for s in ("train", "test"):
        rows = [json.loads(line) for line in (root / rec[s]["path"]).read_text("utf-8").splitlines() if line]
        split[s] = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]},
                                              features=features)
    return TaskData(name, "classification", split["train"], split["test"], len(names), names)


def load_task_file(path: str, text_column: str = "text", label_column: str = "label",
                   test_fraction: float = 0.2) -> TaskData:
    """A user's labelled csv/tsv/jsonl/json/parquet file -> TaskData with the same fixed (text-hash) split.

    Texts seen more than once keep their first row; texts seen with conflicting labels are dropped.
    """
    from pmp.data.files import load_labelled_file

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
    train_idx, test_idx = fixed_split([" ".join(t.lower().split()) for t in ds["text"]], test_fraction)
    names = ds.features["label"].names
    return TaskData(Path(path).stem, "classification", ds.select(train_idx), ds.select(test_idx), len(names), names)
