"""The data of a trained protection (SOPHON, MLAC): the restricted domain and the retain corpus as token tensors.

The restricted domain uses only its task's TRAIN split (the attack suite tests on the fixed test split, so the
protection never sees a test example); a seeded tenth of that split (at most 200 examples / blocks) is held out
to measure the restricted metric before and after protection. The retain corpus is the base run's pre-training
corpus (its own train / held-out split) or the user's text files.

Batches are drawn without replacement within an epoch from a permutation that depends only on (seed, epoch), so
the position (epoch, offset) is the whole sampler state and a resumed run draws the same batches.
Shapes: N examples / blocks, B batch, T tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pmp.config import RunConfig
from pmp.data.blocks import eval_batches, mapped_token_blocks
from pmp.data.corpus import load_documents, split_documents
from pmp.data.task_formulations import formulate, split_formulation
from pmp.data.tasks import TaskData, default_lm_probe, list_tasks, lm_task_from_text, load_task, load_task_file
from pmp.data.text_blocks import pad_batch, text_blocks

HELD_OUT_MAX = 200  # restricted examples / blocks kept aside to measure the restricted metric
LABELLED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class Restricted:
    """The restricted domain, tokenized: lm -> {"blocks": [N, T]}; classification -> {"ids": [...], "labels": [...]}."""

    name: str
    kind: str  # 'lm' | 'classification'
    num_labels: int
    pad_id: int
    train: dict
    held_out: dict

    def size(self, split: str = "train") -> int:
        d = getattr(self, split)
        return len(d["blocks"]) if self.kind == "lm" else len(d["labels"])

    def batch(self, idx: np.ndarray, split: str = "train") -> dict:
        d = getattr(self, split)
        if self.kind == "lm":
            return {"input_ids": d["blocks"][torch.from_numpy(idx)]}
        ids, mask = pad_batch([d["ids"][i] for i in idx], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([d["labels"][i] for i in idx])}


class Sampler:
    """Batches of `batch_size` indices out of n, an epoch's permutation fixed by (seed, epoch); state = position."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        if n < 1:
            raise ValueError("nothing to sample from (0 examples)")
        self.n, self.bs, self.seed, self.epoch, self.offset = n, min(batch_size, n), seed, epoch, offset

    def next(self) -> np.ndarray:
        if self.offset + self.bs > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        idx = perm[self.offset:self.offset + self.bs]
        self.offset += self.bs
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.offset = int(s["epoch"]), int(s["offset"])


def load_restricted_task(spec: str, cache_dir: str) -> TaskData:
    """A task name ('' = the held-out LM probe; TASK:text = a classification task's texts as an LM domain), a .txt
    file (LM domain) or a labelled file (classification)."""
    name = spec.strip() or default_lm_probe()
    p = Path(name).expanduser()
    if p.suffix.lower() in (".txt", *LABELLED_SUFFIXES) or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"--restricted {name}: no such file")
        return lm_task_from_text(p) if p.suffix.lower() == ".txt" else load_task_file(str(p))
    base, form = split_formulation(name)
    if base not in list_tasks():
        raise ValueError(f"--restricted {name!r} is neither a task ({', '.join(list_tasks())}; a classification "
                         "task's texts as an LM domain: TASK:text) nor a file")
    if form == "lm":  # the protections' losses are next-token or head losses: neither is the verbalised label
        raise ValueError(f"--restricted {name}: classification as language modelling (':lm') is an attack-suite "
                         f"formulation only; protect {base} (its classification head) or {base}:text (its texts "
                         "as an LM domain)")
    task = load_task(base, cache_dir)
    return formulate(task, form) if form else task


def tokenize_restricted(task: TaskData, tokenizer, seq_len: int, seed: int) -> Restricted:
    pad = tokenizer.eos_token_id
    rng = np.random.default_rng([seed, 23])
    texts = [str(t) for t in task.train["text"]]
    if len(texts) < 2:
        raise ValueError(f"restricted task {task.name}: its train split has {len(texts)} example(s); need >= 2")
    order = rng.permutation(len(texts))
    n_out = min(HELD_OUT_MAX, max(1, len(texts) // 10))
    out_idx, in_idx = order[:n_out], order[n_out:]
    if task.kind == "lm":
        held = text_blocks(tokenizer, [texts[i] for i in out_idx], seq_len, HELD_OUT_MAX, pad)
        train = text_blocks(tokenizer, [texts[i] for i in in_idx], seq_len, 1 << 30, pad)
        if len(held) == 0 or len(train) == 0:
            raise ValueError(f"restricted LM task {task.name} is shorter than two blocks of {seq_len} tokens; use "
                             "more text or a smaller train.seq_len")
        return Restricted(task.name, "lm", 0, pad, {"blocks": train}, {"blocks": held})

    def encode(idx) -> dict:
        idx = [int(i) for i in idx]
        ids = tokenizer([texts[i] for i in idx], add_special_tokens=False, truncation=True,
                        max_length=seq_len)["input_ids"]
        return {"ids": [x if x else [pad] for x in ids], "labels": [int(task.train[i]["label"]) for i in idx]}

    return Restricted(task.name, "classification", task.num_labels, pad, encode(in_idx), encode(out_idx))


@dataclass
class Retain:
    train: np.ndarray  # [N, T] token blocks (memory-mapped)
    held_out: list[torch.Tensor]  # evaluation batches [B, T]
    corpus: str


def load_retain(run_cfg: RunConfig, retain: str, tokenizer, seq_len: int, batch_size: int, eval_batches_n: int,
                cache_dir: str) -> Retain:
    """The base run's corpus (retain '') or the given files, split and blocked as pre-training splits them."""
    data = dataclasses.replace(run_cfg.data, corpus=retain or run_cfg.data.corpus, seq_len=seq_len,
                               cache_dir=cache_dir, max_chars=0 if retain else run_cfg.data.max_chars)
    train_docs, val_docs = split_documents(load_documents(data), data.val_fraction)
    quiet = lambda s: None  # noqa: E731
    train = mapped_token_blocks(tokenizer, train_docs, seq_len, cache_dir, tag="train", log=quiet)
    val = mapped_token_blocks(tokenizer, val_docs, seq_len, cache_dir, tag="val", log=quiet)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"retain corpus {data.corpus!r} is shorter than one block of {seq_len} tokens per split")
    return Retain(train, eval_batches(val, batch_size, eval_batches_n), data.corpus)
