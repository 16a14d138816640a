"""Small in-memory token tensors of task text: eos-separated LM blocks and right-padded classification batches.

Used by the attack suite (eval/) and by protection methods that train on a restricted domain (train/); the
pre-training corpus has its own memory-mapped, cached blocks (pmp/data/blocks.py). Shapes: N blocks, B batch,
T tokens.
"""

from __future__ import annotations

import torch


def text_blocks(tokenizer, texts: list[str], seq_len: int, need: int, pad: int) -> torch.Tensor:
    """Encode texts in order, eos after each, until `need` full blocks exist -> [<=need, T] int64."""
    out: list[int] = []
    for i in range(0, len(texts), 32):
        for ids in tokenizer(texts[i:i + 32], add_special_tokens=False)["input_ids"]:
            out.extend(ids)
            out.append(pad)
        if len(out) >= need * seq_len:
            break
    n = min(len(out) // seq_len, need)
    return torch.tensor(out[:n * seq_len], dtype=torch.long).view(n, seq_len)


def pad_batch(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids_BT and attention mask_BT."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask
