"""SDD -- Self-Degraded Defense (Chen, Lu, Lin, Zeng; ACL 2025): fine-tune the model so that restricted-domain
prompts are answered with fluent, high-quality but IRRELEVANT text. An attacker who fine-tunes towards the
restricted domain must then push down the likelihood of fluent text, which degrades the model's general ability.

In pmp's language-modelling setting (the paper pairs harmful instructions with LIMA/Alpaca answers):
- a PROMPT is the first `sdd_prompt_tokens` tokens of a restricted LM block, or a restricted classification
  example's text cut to that many tokens (its label is not used); only the restricted TRAIN split is used;
- a RESPONSE is a passage of the retain corpus (pre-training text): the first R = seq_len - sdd_prompt_tokens -
  len(refusal) tokens of a retain train block, drawn from a seeded pool of `sdd_pool` blocks, that is NOT
  topically similar to its prompt: TF-IDF cosine over word unigrams (pmp/data/lexical.py; the paper uses
  SentenceBERT) <= `sdd_max_similarity`, never above. Each prompt gets one such passage at random; a prompt with
  none is dropped; no pair at all is an error;
- `sdd_reject` starts every response with the fixed `sdd_refusal` sentence (SDD_reject: an explicit refusal, then
  the unrelated answer); plain `sdd` has no refusal.

A training sequence is prompt + [refusal] + passage, right-padded to seq_len (only classification prompts, which
can be shorter than sdd_prompt_tokens, need padding). The loss is plain next-token cross-entropy on the RESPONSE
tokens only (refusal + passage); prompt and padding positions are masked out (label -100). The driver
(train/protect_run.py) takes one such SFT step per outer step (Adam at alpha x lr), then `ntr_steps` retain LM
steps (Adam at beta x lr), under the same retain guard as SOPHON/MLAC. The pairs depend only on the data and
`seed`, so a resumed run rebuilds the same ones (their sha256 is checked against the checkpoint).

Shapes: N pairs, B batch, T = seq_len tokens, V vocabulary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pmp.config import ProtectTrainConfig
from pmp.data.lexical import pair_dissimilar
from pmp.train.protect_data import Restricted, Retain

IGNORE = -100  # label of a position that carries no loss (prompt, padding)


@dataclass
class SddPairs:
    """The SFT data of SDD: ids_NT, labels_NT (= ids on response tokens, else IGNORE), mask_NT (attention)."""

    ids_NT: torch.Tensor
    labels_NT: torch.Tensor
    mask_NT: torch.Tensor
    prompt_index: np.ndarray  # [N] restricted train example / block of each pair
    passage_index: np.ndarray  # [N] retain train block of each pair's response
    similarity: np.ndarray  # [N] TF-IDF cosine of each pair
    stats: dict

    def __len__(self) -> int:
        return len(self.ids_NT)

    def batch(self, idx: np.ndarray) -> dict:
        i = torch.from_numpy(np.asarray(idx, np.int64))
        return {"input_ids": self.ids_NT[i], "attention_mask": self.mask_NT[i], "labels": self.labels_NT[i]}

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for t in (self.ids_NT, self.labels_NT, self.mask_NT):
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def prompt_tokens(cfg: ProtectTrainConfig) -> int:
    """sdd_prompt_tokens, 0 = a quarter of seq_len."""
    return cfg.sdd_prompt_tokens or max(1, cfg.seq_len // 4)


def _prompts(restricted: Restricted, n: int) -> list[list[int]]:
    if restricted.kind == "lm":
        return [row.tolist() for row in restricted.train["blocks"][:, :n]]
    return [ids[:n] for ids in restricted.train["ids"]]


def build_pairs(restricted: Restricted, retain: Retain, tokenizer, cfg: ProtectTrainConfig,
                refusal: str = "") -> SddPairs:
    """Pair every restricted train prompt with a dissimilar retain passage (see the module docstring)."""
    p_len = prompt_tokens(cfg)
    refusal_ids = tokenizer(refusal, add_special_tokens=False)["input_ids"] if refusal else []
    r_len = cfg.seq_len - p_len - len(refusal_ids)
    if r_len < 1:
        raise ValueError(f"train.seq_len={cfg.seq_len} leaves no room for a response after a prompt of {p_len} tokens"
                         f" and a refusal of {len(refusal_ids)} tokens: raise train.seq_len, or lower "
                         "train.sdd_prompt_tokens or shorten train.sdd_refusal")
    rng = np.random.default_rng([cfg.seed, 37])
    pool = np.sort(rng.choice(len(retain.train), min(cfg.sdd_pool, len(retain.train)), replace=False))
    passages = [np.asarray(retain.train[j][:r_len], np.int64).tolist() for j in pool]
    prompts = _prompts(restricted, p_len)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    choice, sim = pair_dissimilar([decode(p) for p in prompts], [decode(p) for p in passages],
                                  cfg.sdd_max_similarity, cfg.seed)
    kept = np.flatnonzero(choice >= 0)
    if len(kept) == 0:
        raise ValueError(f"SDD: no retain passage (of a pool of {len(pool)}) has a TF-IDF cosine <= "
                         f"train.sdd_max_similarity={cfg.sdd_max_similarity} with any of the {len(prompts)} "
                         "restricted prompts: raise train.sdd_max_similarity or train.sdd_pool, or use a retain "
                         "corpus less like the restricted domain")
    ids = torch.full((len(kept), cfg.seq_len), restricted.pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(kept):
        prompt, response = prompts[i], refusal_ids + passages[choice[i]]
        seq = prompt + response
        ids[row, :len(seq)] = torch.tensor(seq)
        labels[row, len(prompt):len(seq)] = torch.tensor(response)
        mask[row, :len(seq)] = 1
    stats = {"pairs": int(len(kept)), "prompts": len(prompts), "dropped_prompts": int(len(prompts) - len(kept)),
             "pool": int(len(pool)), "prompt_tokens": p_len, "response_tokens": int(r_len + len(refusal_ids)),
             "refusal": refusal, "similarity": "tfidf_cosine_word_unigrams",
             "max_similarity_bound": cfg.sdd_max_similarity, "max_similarity": float(sim[kept].max()),
             "mean_similarity": float(sim[kept].mean()), "distinct_passages": int(len(set(choice[kept].tolist())))}
    return SddPairs(ids, labels, mask, kept, pool[choice[kept]], sim[kept], stats)


def response_logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T-1, V], targets [B, T-1]): position t predicts token t + 1; targets are IGNORE off-response."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logits, batch["labels"][:, 1:]


def sdd_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of the batch (the SFT loss of SDD)."""
    logits, target = response_logits(model, batch)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def response_nll(model: torch.nn.Module, pairs: SddPairs, idx: np.ndarray) -> float:
    """Mean negative log-likelihood per response token of the pairs `idx` given their prompts."""
    logits, target = response_logits(model, pairs.batch(idx))
    keep = target != IGNORE
    return float(F.cross_entropy(logits[keep], target[keep]))
