"""The tokenizer: a local Hugging Face tokenizer directory, or a byte-level BPE trained on the corpus (cached).

The trained BPE is GPT-2 style (byte-level pre-tokenizer with GPT-2's split regex, so any text round-trips
without an unknown token) with one special token, ``<|endoftext|>``, serving as bos/eos/pad/unk. It is wrapped in
`PreTrainedTokenizerFast`, so a release saves it with ``save_pretrained`` and anyone loads it with
``AutoTokenizer.from_pretrained`` -- no custom code.

Cache: ``cache_root/tokenizers/<key>/`` where key = sha256(docs fingerprint, vocab_size, FORMAT, tokenizers
version); a second call with the same documents loads it instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pmp.atomic import atomic_dir
from pmp.config import TokenizerConfig
from pmp.data.cache import cache_root, text_fingerprint

EOT = "<|endoftext|>"
FORMAT = 1  # bump when the training recipe changes: cached tokenizers are then retrained
# Only a default for truncation=True / warnings; the model's context is set by data.seq_len and the preset.
# 2048 covers every preset's context (tinyllama1b: 2048).
MODEL_MAX_LENGTH = 2048


def get_tokenizer(tcfg: TokenizerConfig, train_docs: list[str], cache_dir: str = "") -> PreTrainedTokenizerFast:
    """``tcfg.path`` set: load that local directory. Else: the BPE trained on `train_docs` (from cache if there)."""
    if tcfg.path:
        return _load_local(tcfg.path)
    if not train_docs:
        raise ValueError("no documents to train the tokenizer on")
    key_src = {"docs": text_fingerprint(train_docs), "vocab_size": tcfg.vocab_size, "format": FORMAT,
               "tokenizers": tokenizers.__version__}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_root(cache_dir) / "tokenizers" / key
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    t0 = time.time()
    tok = wrap(train_bpe(train_docs, tcfg.vocab_size))
    print(f"tokenizer: trained byte-level BPE, vocab {len(tok):,}, on {sum(map(len, train_docs)):,} chars in "
          f"{time.time() - t0:.1f}s -> {path}")
    try:
        with atomic_dir(path) as tmp:
            tok.save_pretrained(str(tmp))
            (tmp / "pmp_tokenizer.json").write_text(json.dumps(key_src, indent=2, sort_keys=True) + "\n")
    except FileExistsError:  # another process cached the same tokenizer meanwhile: identical, use theirs
        pass
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def train_bpe(docs: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (256 bytes + <|endoftext|> + merges)."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + <|endoftext|> + 1 merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return tok


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT,
                                   model_max_length=MODEL_MAX_LENGTH)


def _load_local(path: str) -> PreTrainedTokenizerFast:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {p} (tokenizer.path must be a local directory "
                                f"saved with save_pretrained; '' trains a BPE on the corpus)")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {p} has no eos_token; set one (documents are separated by eos)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
