"""Token blocks: documents -> one eos-separated token stream -> [n_blocks, seq_len] (cached), and batch order.

Shapes: N = number of blocks, T = seq_len, B = batch size. ``blocks_NT`` is uint16 when the vocabulary fits
(half the memory and disk of int32), else int32; batches are int64 (what embedding lookups take). The blocks are
memory-mapped from the cached .npy (read-only): a multi-GB tokenized corpus is not loaded into RAM, and the ranks
of a data-parallel job on one machine share the page cache instead of holding one copy each.

The batch order is a pure function of (seed, epoch): epoch e visits every block once in the order of
``numpy.random.default_rng((seed, e)).permutation(N)``; a batch never spans two epochs (the < B leftover blocks
of an epoch are skipped in that epoch, a different few each time). ``state_dict`` is two integers, so a resumed
run sees exactly the batches an uninterrupted one would.

Data parallelism (`RankBatches`): the global batch of a step is the `grad_accum` consecutive draws of
`batch_size` blocks a single process would train on; rank r of W takes the r-th contiguous 1/W of it and cuts
that into equal micro-batches. So 1, 2 or 4 ranks train on the same tokens in the same order, and every rank
advances the same stream (no communication).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pmp.atomic import atomic_file
from pmp.data.cache import cache_root, text_fingerprint

TOKENIZE_BATCH = 64  # documents per fast-tokenizer call (~1.3 M chars); one call for all was not faster on 2 cores


@contextmanager
def _untruncated(backend) -> Iterator[None]:
    """The backend tokenizer with truncation and padding off for the block, then as it was. A call such as
    `tokenizer(texts, truncation=True, max_length=n)` leaves truncation ON in the backend, and the backend's
    `encode_batch` would then silently cut every document to n tokens."""
    trunc, pad = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        yield
    finally:
        if trunc is not None:
            backend.enable_truncation(**trunc)
        if pad is not None:
            backend.enable_padding(**pad)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids: the full tokenizer definition (vocab, merges, normalizer...) and eos --
    not a truncation or padding setting left over from an earlier call (blocks are encoded without them)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        with _untruncated(backend):
            spec = backend.to_str()
    else:
        spec = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{spec}\n{tokenizer.eos_token_id}".encode()).hexdigest()


def token_blocks(tokenizer, docs: list[str], seq_len: int, cache_dir: str = "", tag: str = "",
                 log: Callable[[str], None] = print) -> np.ndarray:
    """Tokenize each document, append eos after each, concatenate, cut into full blocks of `seq_len` (the last
    partial block is dropped) -> blocks_NT. Cached under ``cache_root/blocks/``: a second call only maps the file
    (read-only); the call that builds it returns the array it built."""
    path = _cache_path(tokenizer, docs, seq_len, cache_dir, tag)
    cached = _load_cached(path, seq_len, tag, log)
    return cached if cached is not None else _build(tokenizer, docs, seq_len, path, tag, log)


def mapped_token_blocks(tokenizer, docs: list[str], seq_len: int, cache_dir: str = "", tag: str = "",
                        log: Callable[[str], None] = print) -> np.ndarray:
    """`token_blocks`, always memory-mapped from the cache file (built first if missing): what training uses, so
    a corpus larger than memory never sits in RAM after tokenization."""
    path = _cache_path(tokenizer, docs, seq_len, cache_dir, tag)
    cached = _load_cached(path, seq_len, tag, log)
    if cached is not None:
        return cached
    _build(tokenizer, docs, seq_len, path, tag, log)  # the in-memory copy is dropped here
    return load_blocks(path, seq_len)


def _cache_path(tokenizer, docs: list[str], seq_len: int, cache_dir: str, tag: str) -> Path:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; documents are separated by eos")
    key_src = f"{tokenizer_fingerprint(tokenizer)}|{text_fingerprint(docs)}|{seq_len}"
    key = hashlib.sha256(key_src.encode()).hexdigest()
    return cache_root(cache_dir) / "blocks" / f"{tag + '-' if tag else ''}{key[:32]}.npy"


def _load_cached(path: Path, seq_len: int, tag: str, log: Callable[[str], None]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        blocks_NT = load_blocks(path, seq_len)
    except (OSError, ValueError):
        return None  # corrupt cache file: the caller rebuilds it
    log(f"blocks{' ' + tag if tag else ''}: {blocks_NT.shape[0]:,} x {seq_len} tokens (cached {path})")
    return blocks_NT


def _build(tokenizer, docs: list[str], seq_len: int, path: Path, tag: str, log: Callable[[str], None]) -> np.ndarray:
    eos = tokenizer.eos_token_id
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


def load_blocks(path: Path, seq_len: int) -> np.ndarray:
    """The cached blocks_NT at `path`, memory-mapped read-only (the file is only ever replaced by a rename, never
    rewritten in place, so a mapping stays valid); ValueError unless it is [N, seq_len] of token ids."""
    try:
        blocks_NT = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # numpy cannot map a zero-length data section: an empty corpus is read instead
        blocks_NT = np.load(path, allow_pickle=False)
    if blocks_NT.ndim != 2 or blocks_NT.shape[1] != seq_len or blocks_NT.dtype.kind not in "iu":
        raise ValueError(f"{path} holds {blocks_NT.dtype} {blocks_NT.shape}, not [n_blocks, {seq_len}] token ids")
    return blocks_NT


def blocks_path(blocks_NT: np.ndarray) -> Path | None:
    """The file a memory-mapped blocks_NT comes from (None for an in-memory array)."""
    name = getattr(blocks_NT, "filename", None)
    return Path(name) if name else None


def blocks_digest(blocks_NT: np.ndarray, samples: int = 64) -> str:
    """A cheap fingerprint of blocks_NT (shape, dtype and `samples` rows spread over it): the ranks of a job compare
    it to make sure they read the same token stream, without hashing gigabytes."""
    h = hashlib.sha256(f"{blocks_NT.shape}|{blocks_NT.dtype.str}".encode())
    n = len(blocks_NT)
    for i in sorted({i * n // samples for i in range(samples)} if n else ()):
        h.update(np.ascontiguousarray(blocks_NT[i]).tobytes())
    return h.hexdigest()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # same ids as tokenizer(texts), without BatchEncoding
        with _untruncated(backend):
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

    def next_indices(self) -> np.ndarray:
        """The block indices of the next batch ([batch_size] int64), advancing the stream."""
        if self.position + self.batch_size > len(self.blocks_NT):
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._permutation()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def take(self, idx: np.ndarray) -> torch.Tensor:
        """The blocks at `idx` as [len(idx), seq_len] int64 (only these rows are read from the mapped file)."""
        return torch.from_numpy(self.blocks_NT[idx].astype(np.int64))

    def next_batch(self) -> torch.Tensor:
        """[batch_size, seq_len] int64."""
        return self.take(self.next_indices())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "n_blocks": len(self.blocks_NT)}

    def load_state_dict(self, state: dict) -> None:
        for k, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("n_blocks", len(self.blocks_NT))):
            if k in state and state[k] != mine:
                raise ValueError(f"batch stream state is for {k}={state[k]}, this stream has {k}={mine}: the data, "
                                 f"seed or batch size changed since the checkpoint")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass(frozen=True)
class RankBatches:
    """How one rank of `world` trains on its share of the global batch (`batch_size` x `grad_accum` sequences):
    `per_rank` sequences in `accum` micro-batches of `micro` (the fewest micro-batches no larger than
    `batch_size`, which bounds activation memory as in a single process)."""

    rank: int
    world: int
    global_batch: int
    per_rank: int
    micro: int
    accum: int

    @classmethod
    def plan(cls, batch_size: int, grad_accum: int, rank: int = 0, world: int = 1) -> RankBatches:
        global_batch = batch_size * grad_accum
        if global_batch % world:
            raise ValueError(f"the global batch (train.batch_size {batch_size} x train.grad_accum {grad_accum} = "
                             f"{global_batch} sequences per step) does not split evenly over {world} ranks; choose "
                             f"a batch that is a multiple of {world} or another number of ranks")
        per_rank = global_batch // world
        accum = -(-per_rank // batch_size)
        while per_rank % accum:
            accum += 1
        return cls(rank, world, global_batch, per_rank, per_rank // accum, accum)

    def offset(self, i: int) -> int:
        """Where this rank's micro-batch `i` starts in the global batch."""
        return self.rank * self.per_rank + i * self.micro

    def step_indices(self, stream: BatchStream, grad_accum: int) -> list[np.ndarray]:
        """Draw the next global batch from `stream` (every rank draws it whole, so all streams stay in step) and
        return this rank's micro-batches of block indices."""
        global_idx = np.concatenate([stream.next_indices() for _ in range(grad_accum)])
        mine = global_idx[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return [mine[i * self.micro:(i + 1) * self.micro] for i in range(self.accum)]


def eval_slices(n_blocks: int, batch_size: int, max_batches: int = 0) -> list[slice]:
    """The fixed held-out batches as slices of the blocks, in block order; the last may be smaller.
    max_batches > 0 keeps only the first that many."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = [slice(i, min(i + batch_size, n_blocks)) for i in range(0, n_blocks, batch_size)]
    return out[:max_batches] if max_batches > 0 else out


def eval_batches(blocks: np.ndarray, batch_size: int, max_batches: int = 0) -> list[torch.Tensor]:
    """Fixed held-out batches in block order, int64; the last one may be smaller (weight losses by tokens).
    max_batches > 0 keeps only the first that many."""
    return [torch.from_numpy(blocks[s].astype(np.int64)) for s in eval_slices(len(blocks), batch_size, max_batches)]
