"""Lexical similarity of short texts and SDD's pairing of prompts with passages that are NOT about the same thing.

The measure is the TF-IDF cosine over lower-cased word unigrams (`\\w+`): term frequency = raw count, inverse
document frequency idf(w) = ln((1 + D) / (1 + df(w))) over the D texts being compared (prompts and passages
together), so a word found in every text weighs 0 and cannot make two texts look alike; vectors are L2-normalised,
and a text without any weighted word has similarity 0 with everything. Values lie in [0, 1].

`pair_dissimilar` gives each prompt one passage drawn uniformly at random among those whose similarity with it is
<= the bound (never one above it); a prompt with no such passage gets none. The draw depends only on the texts and
the seed. Shapes: P prompts, M passages, V words, Z non-zeros.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

WORD = re.compile(r"\w+")
CHUNK = 32  # prompts per block of the P x M similarity matrix: the [CHUNK, Z] product is ~30 MB at M = 2048


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@dataclass
class SparseRows:
    """L2-normalised TF-IDF rows in CSR form: row i holds cols[ptr[i]:ptr[i+1]] with vals[...]."""

    ptr: np.ndarray  # [n + 1] int64
    cols: np.ndarray  # [Z] int64
    vals: np.ndarray  # [Z] float64

    def dense(self, rows: range, width: int) -> np.ndarray:
        out = np.zeros((len(rows), width))
        for k, i in enumerate(rows):
            out[k, self.cols[self.ptr[i]:self.ptr[i + 1]]] = self.vals[self.ptr[i]:self.ptr[i + 1]]
        return out


def tfidf_rows(texts: list[str]) -> tuple[SparseRows, int]:
    """TF-IDF vectors of `texts` with the idf fitted on them -> (rows, vocabulary size V)."""
    counts = [Counter(words(t)) for t in texts]
    df: Counter = Counter()
    for c in counts:
        df.update(c.keys())
    vocab = {w: i for i, w in enumerate(sorted(df))}
    idf = {w: math.log((1 + len(texts)) / (1 + n)) for w, n in df.items()}
    ptr, cols, vals = [0], [], []
    for c in counts:
        row = sorted((vocab[w], n * idf[w]) for w, n in c.items() if idf[w] > 0)
        norm = math.sqrt(sum(v * v for _, v in row))
        if norm > 0:
            cols.extend(j for j, _ in row)
            vals.extend(v / norm for _, v in row)
        ptr.append(len(cols))
    return SparseRows(np.array(ptr, np.int64), np.array(cols, np.int64), np.array(vals, np.float64)), len(vocab)


def _similarity_blocks(prompts: list[str], passages: list[str]):
    """Yield (rows, sim [len(rows), M]) for consecutive blocks of prompts."""
    rows, width = tfidf_rows(prompts + passages)
    n = len(prompts)
    ptr = rows.ptr[n:] - rows.ptr[n]
    cols, vals = rows.cols[rows.ptr[n]:], rows.vals[rows.ptr[n]:]
    filled = np.diff(ptr) > 0
    starts = ptr[:-1][filled]  # non-zeros are grouped by passage: a passage's dot product is one segment's sum
    for start in range(0, n, CHUNK):
        block = range(start, min(start + CHUNK, n))
        sim = np.zeros((len(block), len(passages)))
        if len(cols):
            prod = rows.dense(block, width)[:, cols] * vals  # [c, Z]
            sim[:, filled] = np.add.reduceat(prod, starts, axis=1)
        yield block, np.clip(sim, 0.0, 1.0)


def similarity(prompts: list[str], passages: list[str]) -> np.ndarray:
    """TF-IDF cosine of every prompt with every passage  [P, M] (idf fitted on both lists together)."""
    out = np.zeros((len(prompts), len(passages)))
    for block, sim in _similarity_blocks(prompts, passages):
        out[block.start:block.stop] = sim
    return out


def pair_dissimilar(prompts: list[str], passages: list[str], bound: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(choice [P] int64: the passage given to each prompt, -1 = none within the bound; similarity [P] of each
    chosen pair, NaN where none)."""
    if not 0.0 <= bound <= 1.0:
        raise ValueError(f"the similarity bound must be in [0, 1], got {bound}")
    rng = np.random.default_rng([seed, 41])
    choice = np.full(len(prompts), -1, np.int64)
    chosen_sim = np.full(len(prompts), np.nan)
    for block, sim in _similarity_blocks(prompts, passages):
        keys = rng.random(sim.shape)
        keys[sim > bound] = np.inf
        j = keys.argmin(1)
        ok = np.isfinite(keys[np.arange(len(block)), j])
        idx = np.arange(block.start, block.stop)[ok]
        choice[idx] = j[ok]
        chosen_sim[idx] = sim[ok, j[ok]]
    return choice, chosen_sim
