"""The fixed train/test split of a task: a function of the texts alone, so every machine and seed sees the same.

Examples are ranked by sha256 of their (normalized) text and the first ones form the test set; duplicates of a
text always land on the same side, so deduplicating first leaves no test text in train.
"""

from __future__ import annotations

import hashlib


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
