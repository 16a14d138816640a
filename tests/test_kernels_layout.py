"""MaskLayout: bit packing, compact indexing, block layouts, storage round trips (pure torch, exact)."""

import pytest
import torch

from pmp.kernels import MaskLayout, pack_mask, row_popcount, unpack_mask
from pmp.kernels.mask_layout import view_2d

SHAPES = [(1,), (37,), (3, 37), (67, 131), (2, 3, 5, 7), (64, 64), (5, 32), (4, 33)]


def _random_mask(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def _compact_index_from_words(layout):
    """Compact index of every masked entry via word_prefix + popcount of lower bits (the kernels' formula)."""
    rows, cols = layout.rows, layout.cols
    r, c = layout.to_bool().reshape(rows, cols).nonzero(as_tuple=True)
    w = layout.words[r, c // 32].to(torch.int64) & 0xFFFFFFFF
    lower = w & ((1 << (c % 32)) - 1)
    pc = torch.zeros_like(lower)
    for j in range(32):
        pc += (lower >> j) & 1
    return layout.word_prefix[r, c // 32].to(torch.int64) + pc


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_round_trip_and_compact_index(shape, density):
    mask = _random_mask(shape, density, seed=hash((shape, density)) % 2**31)
    layout = MaskLayout.from_bool(mask)
    rows, cols = view_2d(shape)
    assert (layout.rows, layout.cols) == (rows, cols)
    assert layout.words.dtype == torch.int32 and layout.words.shape == (rows, (cols + 31) // 32)
    assert layout.word_prefix.dtype == torch.int32 and layout.word_prefix.shape == layout.words.shape
    assert layout.nnz == int(mask.sum())
    assert torch.equal(layout.to_bool(), mask)
    assert torch.equal(layout.flat_index(), mask.flatten().nonzero().squeeze(1))
    idx = _compact_index_from_words(layout)
    assert torch.equal(idx, torch.arange(layout.nnz))
    assert torch.equal(unpack_mask(pack_mask(mask), rows, cols), mask.reshape(rows, cols))
    assert torch.equal(row_popcount(layout.words), mask.reshape(rows, cols).sum(1).to(torch.int32))


def test_sign_bit_words():
    """Bit 31 set makes the int32 word negative; packing and popcount must not care."""
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 31] = True
    mask[1, :] = True
    layout = MaskLayout.from_bool(mask)
    assert int(layout.words[0, 0]) == -(2**31)
    assert int(layout.words[1, 0]) == -1 and int(layout.words[1, 1]) == -1
    assert layout.word_prefix.tolist() == [[0, 1], [1, 33]]
    assert layout.nnz == 65
    assert torch.equal(layout.to_bool(), mask)


def test_word_bit_order():
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, [0, 3, 33]] = True
    words = MaskLayout.from_bool(mask).words
    assert words.tolist() == [[0b1001, 0b10]]


@pytest.mark.parametrize("shape", [(67, 131), (37,), (2, 3, 5, 7)])
def test_packed_bytes_round_trip(shape):
    mask = _random_mask(shape, 0.3, seed=1)
    layout = MaskLayout.from_bool(mask)
    data = layout.packed_bytes()
    assert data.dtype == torch.uint8 and data.numel() == layout.rows * ((layout.cols + 31) // 32) * 4
    back = MaskLayout.from_packed(data, shape)
    assert torch.equal(back.to_bool(), mask)
    assert torch.equal(back.word_prefix, layout.word_prefix) and back.nnz == layout.nnz
    back2 = MaskLayout.from_packed(layout.words.clone(), shape)
    assert torch.equal(back2.to_bool(), mask)


def test_from_packed_rejects_mismatch():
    layout = MaskLayout.from_bool(_random_mask((67, 131), 0.3, seed=2))
    with pytest.raises(ValueError, match="do not match"):
        MaskLayout.from_packed(layout.words, (67, 200))
    with pytest.raises(ValueError, match="do not match"):
        MaskLayout.from_packed(layout.packed_bytes(), (66, 131))
    bad = layout.words.clone()
    bad[0, -1] = -1  # bits past column 131 set
    with pytest.raises(ValueError, match="past the last column"):
        MaskLayout.from_packed(bad, (67, 131))
    with pytest.raises(ValueError, match="bool"):
        MaskLayout.from_bool(torch.zeros(3, 3))


@pytest.mark.parametrize("bs", [64, 128])
def test_block_layout(bs):
    g = torch.Generator().manual_seed(bs)
    rows, cols = 3 * bs - 5, 2 * bs + 17  # partial edge blocks
    rb, cb = -(-rows // bs), -(-cols // bs)
    blocks = torch.rand(rb, cb, generator=g) < 0.5
    blocks[0, 0] = True
    blocks[-1, -1] = True
    mask = blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:rows, :cols].contiguous()
    layout = MaskLayout.from_bool(mask, block_size=bs)
    assert layout.block_size == bs
    assert layout.active_blocks.dtype == torch.int32
    assert torch.equal(layout.active_blocks.long(), blocks.nonzero())
    assert torch.equal(layout.to_bool(), mask)
    back = MaskLayout.from_packed(layout.packed_bytes(), mask.shape, block_size=bs)
    assert torch.equal(back.active_blocks, layout.active_blocks)
    mixed = mask.clone()
    mixed[0, 0] = False
    with pytest.raises(ValueError, match="not constant"):
        MaskLayout.from_bool(mixed, block_size=bs)
    with pytest.raises(ValueError, match="block_size"):
        MaskLayout.from_bool(mask, block_size=48)


def test_block_layout_empty_and_full():
    empty = MaskLayout.from_bool(torch.zeros(100, 70, dtype=torch.bool), block_size=64)
    assert empty.active_blocks.shape == (0, 2) and empty.nnz == 0
    full = MaskLayout.from_bool(torch.ones(100, 70, dtype=torch.bool), block_size=64)
    assert full.active_blocks.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_state_bytes_and_to():
    layout = MaskLayout.from_bool(_random_mask((64, 128), 0.2, seed=3))
    assert layout.state_bytes() == 2 * 64 * 4 * 4  # words + word_prefix, 1/8 B each per entry
    layout.flat_index()
    assert layout.state_bytes() == 2 * 64 * 4 * 4 + 8 * layout.nnz
    assert layout.to("cpu") is layout
