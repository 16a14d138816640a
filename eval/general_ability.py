"""General ability after an attack: SDD's evaluation (ACL 2025) translated to our tasks.

SDD claims that an attacker who fine-tunes a self-degraded model towards the restricted domain pays for it with the
model's general ability. So after each attacker arm's best (tuned) attack on an LM task, the durable suite
(eval/durable.py, stage `general`) measures the attacked model's perplexity on general held-out text -- a file of
the user's (`--general-file`), or the held-out split of the public default corpus, which is the retain domain of
`pmp protect` and the pre-training validation split of the default recipe -- beside the same release before the
attack. A protection of this kind shows as a general-perplexity rise under attack that the dense model's attack does
not cause.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pmp.config import DataConfig
from pmp.data.cache import is_prepared
from pmp.data.corpus import load_documents, split_documents
from pmp.data.files import chunk_text
from pmp.data.text_blocks import text_blocks
from pmp.eval.evaluate import evaluate_lm_blocks

GENERAL_PREFIX = "general_"  # attack names of the stage's cells: general_<arm kind>
GENERAL_BLOCKS = 64  # blocks of the task budget's max_len that the perplexity is taken on
GENERAL_KINDS = ("lm", "lm_classification")  # task kinds whose fine-tuned model is still a causal LM


class GeneralText:
    """Held-out general text: a file, or the held-out split of the public default corpus (loaded lazily)."""

    def __init__(self, path: str = "", cache_dir: str = ""):
        self.path, self.cache_dir = path, cache_dir
        self._texts: list[str] | None = None

    @property
    def source(self) -> str:
        return f"file {self.path}" if self.path else "the held-out split of the public default corpus"

    def check(self) -> None:
        """A given file must exist and hold text (at input time: nothing is written before)."""
        if self.path:
            p = Path(self.path)
            if not p.is_file():
                raise FileNotFoundError(f"--general-file {p} does not exist")
            if not p.read_text("utf-8", errors="replace").strip():
                raise ValueError(f"--general-file {p} holds no text")

    def missing(self) -> str:
        """Why no general text is available ('' = it is)."""
        if self.path or is_prepared(self.cache_dir):
            return ""
        return "no general text: pass --general-file FILE or prepare the data cache (`pmp data prepare`)"

    def digest(self) -> str:
        """Identifies the text in a cell's inputs: the file's sha256, or 'public-corpus-heldout'."""
        if not self.path:
            return "public-corpus-heldout"
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]

    def texts(self) -> list[str]:
        if self._texts is None:
            if self.path:
                self._texts = chunk_text(Path(self.path).read_text("utf-8", errors="replace"), 2_000)
            else:
                cfg = DataConfig(corpus="default", cache_dir=self.cache_dir)
                _, held_out = split_documents(load_documents(cfg), cfg.val_fraction)
                self._texts = [c for d in held_out for c in chunk_text(str(d), 2_000)]
        return self._texts

    def blocks(self, tokenizer, max_len: int, pad: int) -> torch.Tensor:
        """The first GENERAL_BLOCKS blocks of the text in the model's tokenizer (the same for every model that
        shares it)."""
        b = text_blocks(tokenizer, self.texts(), max_len, GENERAL_BLOCKS, pad)
        if len(b) == 0:
            raise ValueError(f"the general text ({self.source}) is shorter than one block of {max_len} tokens")
        return b


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks_NT: torch.Tensor) -> float:
    """Token-weighted perplexity of a causal LM on the blocks."""
    was_training = model.training
    model.eval()
    out = evaluate_lm_blocks(model, blocks_NT)["perplexity"]
    model.train(was_training)
    return out
