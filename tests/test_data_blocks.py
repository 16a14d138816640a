"""Token blocks (cache, layout, dtype) and the resumable batch order."""

import numpy as np
import pytest
import torch

from pmp.data.blocks import BatchStream, eval_batches, token_blocks
from pmp.tokenizer import train_bpe, wrap


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never read or write the user's real cache (tests pass cache_dir explicitly; this catches a forgotten one)."""
    monkeypatch.setenv("PMP_CACHE", str(tmp_path / "default-pmp-cache"))


class ByteTok:
    """Minimal tokenizer: id = byte + 1, eos = 0; counts calls to check the cache."""

    eos_token_id = 0

    def __init__(self, vocab=257):
        self.vocab, self.calls = vocab, 0

    def __len__(self):
        return self.vocab

    def get_vocab(self):
        return {f"b{i}": i for i in range(self.vocab)}

    def __call__(self, texts, **kw):
        self.calls += 1
        return {"input_ids": [[b + 1 for b in t.encode()] for t in texts]}


def test_token_blocks_layout_and_cache(tmp_path):
    tok = ByteTok()
    docs = ["hello world", "", "abc", "x" * 40]
    blocks = token_blocks(tok, docs, seq_len=8, cache_dir=str(tmp_path), tag="t", log=lambda s: None)
    stream = []
    for d in docs:
        if d:
            stream += [b + 1 for b in d.encode()] + [0]
    n = len(stream) // 8
    assert blocks.dtype == np.uint16 and blocks.shape == (n, 8)
    np.testing.assert_array_equal(blocks.reshape(-1), np.array(stream[:n * 8]))
    assert tok.calls == 1
    files = list((tmp_path / "blocks").glob("t-*.npy"))
    assert len(files) == 1
    again = token_blocks(tok, docs, seq_len=8, cache_dir=str(tmp_path), tag="t", log=lambda s: None)
    assert tok.calls == 1  # loaded, not re-tokenized
    np.testing.assert_array_equal(again, blocks)
    token_blocks(tok, docs, seq_len=4, cache_dir=str(tmp_path), tag="t", log=lambda s: None)
    token_blocks(tok, docs + ["more"], seq_len=8, cache_dir=str(tmp_path), tag="t", log=lambda s: None)
    assert tok.calls == 3  # seq_len and docs are part of the key
    files[0].write_bytes(b"garbage")  # a corrupt cache file is rebuilt
    rebuilt = token_blocks(tok, docs, seq_len=8, cache_dir=str(tmp_path), tag="t", log=lambda s: None)
    np.testing.assert_array_equal(rebuilt, blocks)


def test_token_blocks_int32_for_big_vocab_and_errors(tmp_path):
    blocks = token_blocks(ByteTok(vocab=70_000), ["abcdefgh" * 4], 8, str(tmp_path), log=lambda s: None)
    assert blocks.dtype == np.int32
    empty = token_blocks(ByteTok(), ["ab"], 8, str(tmp_path), log=lambda s: None)
    assert empty.shape == (0, 8)
    tok = ByteTok()
    tok.eos_token_id = None
    with pytest.raises(ValueError, match="eos"):
        token_blocks(tok, ["abc"], 8, str(tmp_path), log=lambda s: None)


def test_token_blocks_real_tokenizer(tmp_path):
    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * 5 for i in range(10)]
    tok = wrap(train_bpe(docs, 300))
    blocks = token_blocks(tok, docs, 16, str(tmp_path), log=lambda s: None)
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    np.testing.assert_array_equal(blocks.reshape(-1), ids[:blocks.size])
    assert tok.decode(blocks.reshape(-1)[: len(tok(docs[0])["input_ids"])].tolist()) == docs[0]


def test_token_blocks_ignore_truncation_left_on_by_an_earlier_call(tmp_path):
    """`tokenizer(..., truncation=True, max_length=n)` leaves truncation on in the fast backend: blocks built after
    it must still hold every token of every document (a real bug: protection runs on a classification task cut
    the retain corpus to 128 tokens per document), and the cache key must not change."""
    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * 5 for i in range(10)]
    tok = wrap(train_bpe(docs, 300))
    clean = token_blocks(tok, docs, 16, str(tmp_path / "a"), log=lambda s: None)
    tok(docs[:2], truncation=True, max_length=4)
    assert tok.backend_tokenizer.truncation is not None  # the leftover state this test is about
    after = token_blocks(tok, docs, 16, str(tmp_path / "b"), log=lambda s: None)
    np.testing.assert_array_equal(clean, after)
    assert sorted(p.name for p in (tmp_path / "a" / "blocks").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "blocks").iterdir())
    assert tok.backend_tokenizer.truncation["max_length"] == 4  # the caller's setting is given back


def _blocks(n=10, t=4):
    return np.arange(n * t, dtype=np.uint16).reshape(n, t)


def test_batch_stream_epochs_without_replacement():
    blocks = _blocks(10)
    s = BatchStream(blocks, batch_size=3, seed=7)
    seen = [s.next_batch() for _ in range(3)]
    assert all(b.dtype == torch.int64 and b.shape == (3, 4) for b in seen)
    rows = [int(r[0]) // 4 for b in seen for r in b]
    assert len(set(rows)) == 9  # epoch 0: 9 distinct blocks
    assert s.state_dict()["epoch"] == 0
    s.next_batch()  # 1 block left < batch: next epoch
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 3
    for b in seen:  # each row is a whole block
        for r in b:
            np.testing.assert_array_equal(r.numpy(), blocks[int(r[0]) // 4])


def test_batch_stream_same_seed_same_batches_and_resume():
    blocks = _blocks(17)
    a, b = BatchStream(blocks, 4, seed=3), BatchStream(blocks, 4, seed=3)
    for _ in range(9):
        assert torch.equal(a.next_batch(), b.next_batch())
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(10)]
    c = BatchStream(blocks, 4, seed=3)
    c.load_state_dict(dict(state))
    assert all(torch.equal(x, c.next_batch()) for x in expected)
    e, f = BatchStream(blocks, 4, seed=3), BatchStream(blocks, 4, seed=4)
    assert not all(torch.equal(e.next_batch(), f.next_batch()) for _ in range(4))


def test_batch_stream_errors():
    with pytest.raises(ValueError, match="too small"):
        BatchStream(_blocks(3), batch_size=4, seed=0)
    s = BatchStream(_blocks(8), 4, seed=0)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 1, "batch_size": 4, "n_blocks": 8})
    with pytest.raises(ValueError, match="n_blocks"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 0, "batch_size": 4, "n_blocks": 9})


def test_eval_batches():
    blocks = _blocks(10)
    batches = eval_batches(blocks, 4)
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(torch.cat(batches).numpy(), blocks)
    assert len(eval_batches(blocks, 4, max_batches=2)) == 2
    assert eval_batches(_blocks(0), 4) == []
