"""Training batches of a prepared task: right-padded classification batches (lm_classification: prompt + gold label
tokens, labels -100 off the label, eval/verbalised.py) and seeded epoch shuffling.

Shapes: B batch, T tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from pmp.data.text_blocks import pad_batch
from pmp.eval.task_data import PreparedTask
from pmp.eval.verbalised import train_batch


class TrainBatches:
    """Shuffled batches without replacement within an epoch; the order depends on the seed only (not the model),
    so every model sees the same examples in the same order for a given seed."""

    def __init__(self, task: PreparedTask, batch_size: int, seed: int):
        self.task, self.bs = task, batch_size
        self.n = len(task.train["blocks"]) if task.kind == "lm" else len(task.train["labels"])
        if self.n < 1:
            raise ValueError(f"task {task.name} has no training examples after the validation split")
        self.rng = np.random.default_rng([seed, 11])
        self.perm, self.pos = self.rng.permutation(self.n), 0

    def next(self) -> dict:
        if self.pos >= self.n:
            self.perm, self.pos = self.rng.permutation(self.n), 0
        idx = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        if self.task.kind == "lm":
            b = self.task.train["blocks"][torch.from_numpy(idx)]
            return {"input_ids": b, "labels": b}
        if self.task.kind == "lm_classification":
            t = self.task.train
            return train_batch([t["ids"][i] for i in idx], [self.task.targets[t["labels"][i]] for i in idx],
                               self.task.pad_id)
        ids, mask = pad_batch([self.task.train["ids"][i] for i in idx], self.task.pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([self.task.train["labels"][i] for i in idx])}
