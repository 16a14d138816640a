"""Bit-packed mask layout: the one description of "which entries train" that every kernel reads.

A mask of any shape is viewed as 2-D ``(rows, cols)``: ``(shape[0], prod(shape[1:]))`` for ndim >= 2 and
``(1, numel)`` otherwise. The *canonical compact order* of the masked entries is their row-major order,
i.e. the order of ``mask.flatten().nonzero()``; every compact tensor (gradient, master, moments) uses it.

Legend: R = rows, C = cols, W = ceil(C / 32) words per row, N = nnz (number of masked entries).

Storage (1/8 B per entry for ``words`` + 1/8 B per entry for ``word_prefix``):
- ``words_RW`` int32: bit j of word w of row r is entry (r, 32*w + j). Bits past ``cols`` are zero.
  int32 bit 31 makes a word negative; host code only touches words through their bytes (little-endian),
  kernels through uint32 bitcasts, so the sign never matters.
- ``word_prefix_RW`` int32: number of masked entries in canonical order before that word, so the compact
  index of entry (r, c) is ``word_prefix[r, c // 32] + popcount(words[r, c // 32] & ((1 << c % 32) - 1))``.
- ``active_blocks`` int32 [n_active, 2]: for block masks (``block_size`` 32, 64 or 128) the (block_row,
  block_col) of every tile holding masked entries, ordered by row panel (row-major over tiles).
"""

from __future__ import annotations

import math
import sys

import torch

# 0 = unstructured. The block dW kernel's tile is the block: a 256 tile needs 256 KiB of shared memory and
# spills (AOT sm_90a, limit 227 KiB), so 256 is refused here rather than at the first launch.
_SUPPORTED_BLOCK_SIZES = (0, 32, 64, 128)
# popcount of every byte value: host popcounts go through the bytes of the words, so the sign bit never matters
_BYTE_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int32)
_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)

assert sys.byteorder == "little", "bit-packed masks assume a little-endian host (bytes of an int32 word)"


def view_2d(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view every layout uses for a tensor of ``shape``."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def n_words(cols: int) -> int:
    """int32 words per row for ``cols`` entries."""
    return (cols + 31) // 32


def pack_bits(mask_RC: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D bool mask into int32 words [R, W] (pure torch, ~1 B/entry of temporaries)."""
    rows, cols = mask_RC.shape
    w = n_words(cols)
    bits = torch.zeros(rows, w * 32, dtype=torch.uint8, device=mask_RC.device)
    bits[:, :cols] = mask_RC
    weights = _BIT_WEIGHTS.to(mask_RC.device)
    bytes_ = (bits.view(rows, w * 4, 8) * weights).sum(-1, dtype=torch.uint8)
    return bytes_.contiguous().view(torch.int32).view(rows, w)


def unpack_bits(words_RW: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words [R, W] -> bool [R, C]."""
    if words_RW.dtype != torch.int32 or words_RW.dim() != 2:
        raise ValueError(f"words must be a 2-D int32 tensor, got {words_RW.dtype} of shape {tuple(words_RW.shape)}")
    if words_RW.shape != (rows, n_words(cols)):
        raise ValueError(f"words of shape {tuple(words_RW.shape)} cannot hold a ({rows}, {cols}) mask; "
                         f"expected ({rows}, {n_words(cols)})")
    w = words_RW.shape[1]
    bytes_ = words_RW.contiguous().view(torch.uint8).view(rows, w * 4, 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=words_RW.device)
    bits = (bytes_ >> shifts) & 1
    return bits.view(rows, w * 32)[:, :cols].bool()


def word_popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits per int32 word (any shape), as int64."""
    bytes_ = words.contiguous().view(torch.uint8).view(*words.shape, 4)
    return _BYTE_POPCOUNT.to(words.device)[bytes_.long()].sum(-1)


def exclusive_prefix(counts_RW: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix of per-word counts over row-major order, as int32 (raises past 2**31 - 1 entries)."""
    flat = counts_RW.reshape(-1).to(torch.int64)
    incl = torch.cumsum(flat, 0)
    total = int(incl[-1]) if incl.numel() else 0
    if total >= 2**31:
        raise ValueError(f"mask has {total} masked entries; int32 compact indices hold at most 2**31 - 1")
    return (incl - flat).to(torch.int32).view(counts_RW.shape)


class MaskLayout:
    """A bit-packed mask plus the prefix sums that map each masked entry to its compact index."""

    def __init__(
        self,
        shape: tuple[int, ...],
        words: torch.Tensor,
        word_prefix: torch.Tensor,
        nnz: int,
        block_size: int = 0,
        active_blocks: torch.Tensor | None = None,
    ):
        self.shape = torch.Size(shape)
        self.rows, self.cols = view_2d(self.shape)
        self.words = words
        self.word_prefix = word_prefix
        self.nnz = int(nnz)
        self.block_size = int(block_size)
        self.active_blocks = active_blocks
        self._flat_index: torch.Tensor | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_bool(cls, mask: torch.Tensor, block_size: int = 0) -> MaskLayout:
        """Layout of a bool mask of any shape; ``block_size`` > 0 also checks the mask is block-constant."""
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        rows, cols = view_2d(mask.shape)
        mask_RC = mask.reshape(rows, cols)
        words = pack_bits(mask_RC)
        return cls._build(mask.shape, words, block_size, mask_RC)

    @classmethod
    def from_packed(cls, words: torch.Tensor, shape: tuple[int, ...], block_size: int = 0) -> MaskLayout:
        """Rebuild a layout from stored words (int32 [R, W], or the uint8 bytes of :meth:`packed_bytes`)."""
        rows, cols = view_2d(shape)
        w = n_words(cols)
        if words.dtype == torch.uint8:
            if words.numel() != rows * w * 4:
                raise ValueError(f"{words.numel()} packed bytes do not match mask shape {tuple(shape)}: "
                                 f"expected {rows * w * 4} ({rows} rows x {w} words x 4 bytes)")
            words = words.contiguous().view(-1).view(torch.int32).view(rows, w)
        if words.dtype != torch.int32:
            raise ValueError(f"packed words must be int32 or uint8, got {words.dtype}")
        if tuple(words.shape) != (rows, w):
            raise ValueError(f"packed words of shape {tuple(words.shape)} do not match mask shape {tuple(shape)}: "
                             f"expected ({rows}, {w})")
        words = words.contiguous()
        if cols % 32 and w:
            tail = unpack_bits(words[:, -1:].contiguous(), rows, 32)[:, cols % 32 :]
            if bool(tail.any()):
                raise ValueError("packed words have bits set past the last column: corrupt or wrong shape")
        mask_RC = unpack_bits(words, rows, cols) if block_size else None
        return cls._build(shape, words, block_size, mask_RC)

    @classmethod
    def _build(cls, shape, words, block_size, mask_RC) -> MaskLayout:
        if block_size not in _SUPPORTED_BLOCK_SIZES:
            hint = (f" (the block dW kernel's {block_size}x{block_size} tile does not fit in GPU shared memory: "
                    f"256 needs 256 KiB, sm_90a allows 227 KiB)" if block_size > max(_SUPPORTED_BLOCK_SIZES) else "")
            raise ValueError(f"block_size must be one of {_SUPPORTED_BLOCK_SIZES} (0 = unstructured), "
                             f"got {block_size}{hint}; use 64 or 128")
        counts = word_popcount(words)
        word_prefix = exclusive_prefix(counts)
        nnz = int(counts.sum())
        active = None
        if block_size:
            active = _active_blocks(mask_RC, block_size)
        return cls(tuple(shape), words, word_prefix, nnz, block_size, active)

    # ---------------------------------------------------------------- views
    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def density(self) -> float:
        n = self.rows * self.cols
        return self.nnz / n if n else 0.0

    def to_bool(self) -> torch.Tensor:
        """The mask as a bool tensor of the original shape (exact inverse of :meth:`from_bool`)."""
        return unpack_bits(self.words, self.rows, self.cols).reshape(self.shape)

    def flat_index(self) -> torch.Tensor:
        """int64 [nnz] canonical positions into the flattened tensor (cached; 8 B/entry, reference path only)."""
        if self._flat_index is None:
            self._flat_index = unpack_bits(self.words, self.rows, self.cols).reshape(-1).nonzero().squeeze(1)
        return self._flat_index

    def row_offsets(self) -> torch.Tensor:
        """int64 [rows + 1]: compact index of the first masked entry of each row, then nnz."""
        out = torch.full((self.rows + 1,), self.nnz, dtype=torch.int64, device=self.device)
        if self.words.shape[1]:
            out[: self.rows] = self.word_prefix[:, 0].to(torch.int64)
        return out

    def to(self, device: torch.device | str) -> MaskLayout:
        """A copy of this layout on ``device`` (no-op copy of references when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        out = MaskLayout(
            tuple(self.shape),
            self.words.to(device),
            self.word_prefix.to(device),
            self.nnz,
            self.block_size,
            None if self.active_blocks is None else self.active_blocks.to(device),
        )
        if self._flat_index is not None:
            out._flat_index = self._flat_index.to(device)
        return out

    def packed_bytes(self) -> torch.Tensor:
        """The words as a flat uint8 tensor for storage (1 bit per entry, rows padded to 32 bits)."""
        return self.words.contiguous().view(torch.uint8).reshape(-1).clone()

    def state_bytes(self) -> int:
        """Bytes held by this layout's tensors (including the cached flat index, if built)."""
        tensors = [self.words, self.word_prefix, self.active_blocks, self._flat_index]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __repr__(self) -> str:
        return (f"MaskLayout(shape={tuple(self.shape)}, nnz={self.nnz}, density={self.density:.4f}, "
                f"block_size={self.block_size}, device={self.device})")


def _active_blocks(mask_RC: torch.Tensor, bs: int) -> torch.Tensor:
    """int32 [n_active, 2] (block_row, block_col) in row-panel order; raises unless the mask is block-constant."""
    rows, cols = mask_RC.shape
    rb, cb = -(-rows // bs), -(-cols // bs)
    pad_false = torch.zeros(rb * bs, cb * bs, dtype=torch.bool, device=mask_RC.device)
    pad_false[:rows, :cols] = mask_RC
    pad_true = torch.ones_like(pad_false)
    pad_true[:rows, :cols] = mask_RC
    any_ = pad_false.view(rb, bs, cb, bs).any(3).any(1)
    all_ = pad_true.view(rb, bs, cb, bs).all(3).all(1)
    if not torch.equal(any_, all_):
        bad = (any_ != all_).nonzero()[0].tolist()
        raise ValueError(f"mask is not constant on {bs}x{bs} blocks (first mixed block at block row/col {bad}); "
                         f"use block_size=0 for unstructured masks")
    return any_.nonzero().to(torch.int32).contiguous()
