"""The preparation steps of the adaptive attacks (kinds in eval/attacks.py), applied to a task model before its
fine-tuning phase:

- heal-then-fine-tune: train the causal LM on generic text (the public corpus, or the attacker's own text file)
  for `heal_steps` AdamW steps at a constant `heal_lr`, then carry every base weight into the task model (a
  classifier keeps its new, seeded head). Removal-style protections fall to exactly this (Lucki et al.: 10
  unrelated examples recover most of RMU).
- re-initialise the suspected complement: every entry a recovered mask (`pmp audit`) leaves out -- what the audit
  believes still sits at its initial value -- gets the value of a fresh init of the same architecture; tensors
  the mask does not name and the task head are left alone.

Shapes: N blocks, T tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from pmp.config import DataConfig
from pmp.data.corpus import load_documents
from pmp.data.text_blocks import text_blocks
from pmp.eval.attacks import Attack
from pmp.eval.text_source import TextSource

HEAL_CORPUS_CHARS = 4_000_000  # of the public corpus, interleaved over its books: > 1 M tokens, more than any heal


def _public_heal_docs(cache_dir: str) -> list[str]:
    return load_documents(DataConfig(corpus="default", cache_dir=cache_dir, max_chars=HEAL_CORPUS_CHARS))


class HealText(TextSource):
    """Generic text for healing: a file of the attacker's, or the public default corpus of the data cache."""

    def __init__(self, path: str = "", cache_dir: str = ""):
        super().__init__(path, cache_dir, "--heal-file", "the public default corpus (data cache)", "public-corpus",
                         _public_heal_docs)

    def check(self) -> None:
        """At input time: a given file must hold text, else the public corpus must be prepared."""
        self.check_file()
        if self.missing():
            raise ValueError("heal-then-fine-tune attacks need generic text: pass --heal-file FILE (the attacker's own "
                             "text) or prepare the data cache (`pmp data prepare`) for the public corpus")


def heal_blocks(texts: list[str], tokenizer, seq_len: int, n_blocks: int, seed: int) -> torch.Tensor:
    """Up to n_blocks [N, T] token blocks of the texts, taken in a seeded order of the texts."""
    order = np.random.default_rng([seed, 23]).permutation(len(texts))
    blocks = text_blocks(tokenizer, [texts[i] for i in order], seq_len, n_blocks, tokenizer.eos_token_id)
    if len(blocks) == 0:
        raise ValueError(f"the heal text is shorter than one block of {seq_len} tokens")
    return blocks


def heal(model_lm: torch.nn.Module, blocks_NT: torch.Tensor, attack: Attack, batch_size: int, seed: int) -> dict:
    """`attack.heal_steps` AdamW steps (constant `attack.heal_lr`, no weight decay, clip 1.0) of the causal LM on
    the blocks, in place -> a record (steps, lr, first/last loss, blocks)."""
    torch.manual_seed(seed)
    params = [p for p in model_lm.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=attack.heal_lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 29])
    perm, pos, losses = rng.permutation(len(blocks_NT)), 0, []
    model_lm.train()
    for _ in range(attack.heal_steps):
        if pos >= len(perm):
            perm, pos = rng.permutation(len(blocks_NT)), 0
        b = blocks_NT[torch.from_numpy(perm[pos:pos + batch_size])]
        pos += batch_size
        loss = model_lm(input_ids=b, labels=b).loss
        if not torch.isfinite(loss):
            raise ValueError(f"attack {attack.name}: the healing loss became non-finite at heal_lr {attack.heal_lr}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"heal_steps": attack.heal_steps, "heal_lr": attack.heal_lr, "heal_blocks": len(blocks_NT),
            "heal_block_len": int(blocks_NT.shape[1]), "heal_loss_first": losses[0], "heal_loss_last": losses[-1]}


@torch.no_grad()
def transfer_base(src: torch.nn.Module, dst: torch.nn.Module, heads: tuple[str, ...] = ("lm_head.", "score.")) -> int:
    """Copy every tensor `src` and `dst` share by name and shape, except the heads -> the number copied (a healed
    causal LM into its sequence classifier: the same `model.*` / `transformer.*` names)."""
    src_sd = src.state_dict()
    dst_params = dict(dst.named_parameters())
    n = 0
    for name, p in dst_params.items():
        if name.startswith(heads) or name not in src_sd or tuple(src_sd[name].shape) != tuple(p.shape):
            continue
        p.copy_(src_sd[name])
        n += 1
    if n == 0:
        raise ValueError("the healed model shares no weights with the task model (another architecture?)")
    return n


@torch.no_grad()
def reinit_complement(model: torch.nn.Module, mask_bool: dict[str, torch.Tensor], fresh: torch.nn.Module,
                      exclude: set[str]) -> dict:
    """Set every entry OUTSIDE the mask of each tensor the mask names to `fresh`'s value there (a new init of the
    same architecture) -> {entries, tensors}. Other tensors and `exclude` (the task head) are untouched."""
    params, fresh_params = dict(model.named_parameters()), dict(fresh.named_parameters())
    entries = tensors = 0
    for name, keep in mask_bool.items():
        if name in exclude or name not in params or name not in fresh_params:
            continue
        p = params[name]
        if tuple(keep.shape) != tuple(p.shape):
            raise ValueError(f"the recovered mask has {name} of shape {tuple(keep.shape)}, the model "
                             f"{tuple(p.shape)}: it belongs to another model")
        comp = ~keep.to(p.device)
        p[comp] = fresh_params[name].detach().to(p.dtype)[comp]
        entries += int(comp.sum())
        tensors += 1
    if tensors == 0:
        raise ValueError("the recovered mask names no parameter of this model")
    return {"reinit_entries": entries, "reinit_tensors": tensors}
