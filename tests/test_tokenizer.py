"""Trained byte-level BPE: special tokens, round trip, determinism, cache; local tokenizer directories."""

import pytest
from transformers import AutoTokenizer

import pmp.tokenizer as tk
from pmp.config import TokenizerConfig

DOCS = [f"Chapter {i}. It was a bright cold day in April, and the clocks were striking {i}. " * 3 for i in range(20)]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never read or write the user's real cache (tests pass cache_dir explicitly; this catches a forgotten one)."""
    monkeypatch.setenv("PMP_CACHE", str(tmp_path / "default-pmp-cache"))


def test_trained_bpe_specials_and_round_trip(tmp_path):
    tok = tk.get_tokenizer(TokenizerConfig(vocab_size=320), DOCS, cache_dir=str(tmp_path))
    assert len(tok) == 320
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id is not None and tok.pad_token_id == tok.eos_token_id
    assert tok.model_max_length == tk.MODEL_MAX_LENGTH
    for text in (DOCS[0], "naïve café — ünïcödé 日本語 \t\n  spaces", ""):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("a<|endoftext|>b")["input_ids"][1] == tok.eos_token_id
    assert tok(DOCS[0])["input_ids"][0] != tok.eos_token_id  # no bos/eos added by default


def test_cached_and_deterministic(tmp_path, monkeypatch):
    calls = []
    real = tk.train_bpe
    monkeypatch.setattr(tk, "train_bpe", lambda docs, v: calls.append(1) or real(docs, v))
    cfg = TokenizerConfig(vocab_size=300)
    a = tk.get_tokenizer(cfg, DOCS, cache_dir=str(tmp_path / "a"))
    b = tk.get_tokenizer(cfg, DOCS, cache_dir=str(tmp_path / "a"))
    assert len(calls) == 1  # second call loads from the cache
    assert len(list((tmp_path / "a" / "tokenizers").iterdir())) == 1
    c = tk.get_tokenizer(cfg, DOCS, cache_dir=str(tmp_path / "c"))  # fresh cache: retrained, same result
    assert len(calls) == 2
    assert a.get_vocab() == b.get_vocab() == c.get_vocab()
    assert a.backend_tokenizer.to_str() == c.backend_tokenizer.to_str()
    tk.get_tokenizer(cfg, DOCS[:-1], cache_dir=str(tmp_path / "a"))
    tk.get_tokenizer(TokenizerConfig(vocab_size=310), DOCS, cache_dir=str(tmp_path / "a"))
    assert len(calls) == 4  # docs and vocab size are part of the key
    assert not [p for p in (tmp_path / "a" / "tokenizers").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_local_path(tmp_path):
    tok = tk.wrap(tk.train_bpe(DOCS, 300))
    tok.save_pretrained(str(tmp_path / "tok"))
    loaded = tk.get_tokenizer(TokenizerConfig(path=str(tmp_path / "tok")), [], cache_dir=str(tmp_path))
    assert loaded.get_vocab() == tok.get_vocab() and loaded.eos_token_id == tok.eos_token_id
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))  # a release needs no pmp code
    assert auto(DOCS[0])["input_ids"] == tok(DOCS[0])["input_ids"]
    with pytest.raises(FileNotFoundError, match="nope"):
        tk.get_tokenizer(TokenizerConfig(path=str(tmp_path / "nope")), DOCS)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no documents"):
        tk.get_tokenizer(TokenizerConfig(), [], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size"):
        tk.train_bpe(DOCS, 100)
