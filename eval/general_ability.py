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

import torch

from pmp.config import DataConfig
from pmp.data.corpus import load_documents, split_documents
from pmp.data.text_blocks import text_blocks
from pmp.eval.evaluate import evaluate_lm_blocks
from pmp.eval.text_source import TextSource

GENERAL_PREFIX = "general_"  # attack names of the stage's cells: general_<arm kind>
GENERAL_BLOCKS = 64  # blocks of the task budget's max_len that the perplexity is taken on
GENERAL_KINDS = ("lm", "lm_classification")  # task kinds whose fine-tuned model is still a causal LM


def _held_out_docs(cache_dir: str) -> list[str]:
    cfg = DataConfig(corpus="default", cache_dir=cache_dir)
    return split_documents(load_documents(cfg), cfg.val_fraction)[1]


class GeneralText(TextSource):
    """Held-out general text: a file, or the held-out split of the public default corpus (loaded lazily)."""

    def __init__(self, path: str = "", cache_dir: str = ""):
        super().__init__(path, cache_dir, "--general-file", "the held-out split of the public default corpus",
                         "public-corpus-heldout", _held_out_docs)

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
