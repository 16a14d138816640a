"""Token blocks: documents -> one eos-separated token stream -> [n_blocks, seq_len] (cached), and batch order.

Shapes: N = number of blocks, T = seq_len, B = batch size. ``blocks_NT`` is uint16 when the vocabulary fits
(half the memory and disk of int32), else int32; batches are int64 (what embedding lookups take).

The batch order is a pure function of (seed, epoch): epoch e visits every block once in the order of
``numpy.random.default_rng((seed, e)).permutation(N)``; a batch never spans two epochs (the < B leftover blocks
of an epoch are skipped in that epoch, a different few each time). ``state_dict`` is two integers, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pmp.atomic import atomic_file
from pmp.data.cache import cache_root, text_fingerprint

TOKENIZE_BATCH = 64  # documents per fast-tokenizer call (~1.3 M chars); one call for all was not faster on 2 cores


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids: the full tokenizer definition (vocab, merges, normalizer...) and eos."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{spec}\n{tokenizer.eos_token_id}".encode()).hexdigest()


def token_blocks(tokenizer, docs: list[str], seq_len: int, cache_dir: str = "", tag: str = "",
                 log: Callable[[str], None] = print) -> np.ndarray:
    """Tokenize each document, append eos after each, concatenate, cut into full blocks of `seq_len` (the last
    partial block is dropped) -> blocks_NT. Cached under ``cache_root/blocks/``: a second call only loads."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; documents are separated by eos")
    key_src = f"{tokenizer_fingerprint(tokenizer)}|{text_fingerprint(docs)}|{seq_len}"
    key = hashlib.sha256(key_src.encode()).hexdigest()
    path = cache_root(cache_dir) / "blocks" / f"{tag + '-' if tag else ''}{key[:32]}.npy"
    if path.is_file():
        try:
            blocks_NT = np.load(path, allow_pickle=False)
            if blocks_NT.ndim == 2 and blocks_NT.shape[1] == seq_len:
                log(f"blocks{' ' + tag if tag else ''}: {blocks_NT.shape[0]:,} x {seq_len} tokens (cached {path})")
                return blocks_NT
        except (OSError, ValueError):
            pass  # corrupt cache file: rebuild it below
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.int32
    t0 = time.time()
    pieces = []
    for i in tqdm(range(0, len(docs), TOKENIZE_BATCH), desc=f"tokenize {tag}".strip(), unit="batch", leave=False,
                  disable=len(docs) <= 4 * TOKENIZE_BATCH):
        batch = [str(d) for d in docs[i:i + TOKENIZE_BATCH] if d]
        if not batch:
            continue
        ids = _encode(tokenizer, batch)
        for seq in ids:
            pieces.append(np.asarray(seq, dtype=dtype))
            pieces.append(np.asarray([eos], dtype=dtype))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    n_blocks = len(stream) // seq_len
    blocks_NT = np.ascontiguousarray(stream[:n_blocks * seq_len].reshape(n_blocks, seq_len))
    with atomic_file(path) as f:
        np.save(f, blocks_NT, allow_pickle=False)
    n_chars = sum(len(d) for d in docs)
    log(f"blocks{' ' + tag if tag else ''}: {len(docs):,} docs, {n_chars:,} chars -> {len(stream):,} tokens "
        f"({len(stream) / max(n_chars, 1):.3f}/char) -> {n_blocks:,} x {seq_len} blocks in {time.time() - t0:.1f}s"
        + ("" if n_blocks else " -- WARNING: fewer tokens than one block"))
    return blocks_NT


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # same ids as tokenizer(texts), without BatchEncoding
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


class BatchStream:
    """Shuffled batches of blocks, without replacement within an epoch; resumable via state_dict."""

    def __init__(self, blocks: np.ndarray, batch_size: int, seed: int):
        if blocks.ndim != 2:
            raise ValueError(f"blocks must be [n_blocks, seq_len], got shape {blocks.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n, t = blocks.shape
        if n < batch_size:
            raise ValueError(f"the corpus is too small: {n} blocks of {t} tokens, but a batch needs {batch_size}; "
                             f"it needs >= seq_len * batch_size = {t * batch_size:,} tokens (use more text, a "
                             f"smaller data.seq_len or a smaller train.batch_size)")
        self.blocks_NT, self.batch_size, self.seed = blocks, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            # (seed, epoch) through SeedSequence, not seed + epoch: seeds 0 and 1 must not share epochs shifted by 1.
            self._perm = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.blocks_NT))
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> torch.Tensor:
        """[batch_size, seq_len] int64."""
        if self.position + self.batch_size > len(self.blocks_NT):
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._permutation()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return torch.from_numpy(self.blocks_NT[idx].astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "n_blocks": len(self.blocks_NT)}

    def load_state_dict(self, state: dict) -> None:
        for k, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("n_blocks", len(self.blocks_NT))):
            if k in state and state[k] != mine:
                raise ValueError(f"batch stream state is for {k}={state[k]}, this stream has {k}={mine}: the data, "
                                 f"seed or batch size changed since the checkpoint")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(blocks: np.ndarray, batch_size: int, max_batches: int = 0) -> list[torch.Tensor]:
    """Fixed held-out batches in block order, int64; the last one may be smaller (weight losses by tokens).
    max_batches > 0 keeps only the first that many."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = [torch.from_numpy(blocks[i:i + batch_size].astype(np.int64)) for i in range(0, len(blocks), batch_size)]
    return out[:max_batches] if max_batches > 0 else out
