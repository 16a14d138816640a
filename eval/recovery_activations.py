"""Mask-recovery attacks from activation statistics: run the released model on the attacker's text, measure the
activation energy of every input and output channel of each linear layer, and score each weight entry from them.

Shapes: x_TI = a layer's input (T tokens, I input channels), y_TO = its output, W[o, i] the entry that connects
input channel i to output channel o (nn.Linear stores W_OI; GPT-2's Conv1D and nn.Embedding store W_IO).

What is computed, per weight tensor of an nn.Linear, a transformers Conv1D or an nn.Embedding (forward hooks on the
released model in eval mode, no gradients, over every token of the batches):
  in_rms[i]  = sqrt(mean_t x_ti^2)   the root-mean-square of input channel i; an embedding is a linear map of a
                                     one-hot token vector, so for it in_rms[v] = sqrt(frequency of token v);
  out_rms[o] = sqrt(mean_t y_to^2)   the same for output channel o (the bias included, as the next layer sees it).
Attacks (higher = "trained"), each W[o, i] scored from its two channels:
  `act_wanda`    |W[o, i]| * in_rms[i]: the Wanda pruning importance (Sun et al. 2023), the loss change to first
                 order in the layer output when the entry is removed;
  `act_in_rms`   in_rms[i] alone (constant along o): a column prior;
  `act_out_rms`  out_rms[o] alone (constant along i): a row prior.
Other parameters (norm weights, biases) get no opinion. A weight used by several modules (tied embeddings) is
scored from the first of them in the model's module order.

Why this could reveal the mask: the identification rule ranks entries by their |gradient| during warm-up, and the
gradient of W[o, i] is sum_t dL/dy_to * x_ti, which by Cauchy-Schwarz is at most ||dL/dy_o|| * ||x_i|| (T * in_rms
[i] * rms of the output gradient): entries of high-energy input channels (activation outliers, rows of frequent
tokens) can get large gradients and enter the mask, and the released model's channel statistics still show
which channels those are. Masked training then moves the masked entries off their init values, which the |W|
factor of `act_wanda` picks up (the `magnitude` tell), weighted by how much the entry's channel carries; and
trained rows and columns change the energy of the channels they write to (`act_out_rms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from pmp.eval.release_weights import Release, Scores

ACTIVATION_ATTACKS = ("act_wanda", "act_in_rms", "act_out_rms")


@dataclass
class ChannelStats:
    """Sums over tokens of one weight's layer: x^2 per input channel and y^2 per output channel (float64)."""
    in_dim: int  # the weight's dimension that indexes input channels (1 for nn.Linear's W_OI, 0 for W_IO)
    in_sq: torch.Tensor
    out_sq: torch.Tensor
    tokens: int = 0

    def in_rms(self) -> torch.Tensor:
        return (self.in_sq / max(self.tokens, 1)).sqrt()

    def out_rms(self) -> torch.Tensor:
        return (self.out_sq / max(self.tokens, 1)).sqrt()


def _layers(model: torch.nn.Module, names: set[str]) -> dict[str, tuple[torch.nn.Module, int]]:
    """{weight name: (the first module using it, the weight's input-channel dim)} for the layers scored."""
    by_id = {id(p): n for n, p in model.named_parameters() if n in names}
    out: dict[str, tuple[torch.nn.Module, int]] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, torch.nn.Linear | Conv1D | torch.nn.Embedding) or id(w) not in by_id:
            continue
        out.setdefault(by_id[id(w)], (m, 1 if isinstance(m, torch.nn.Linear) else 0))
    return out


def channel_stats(model: torch.nn.Module, batches: list[torch.Tensor], names: set[str]) -> dict[str, ChannelStats]:
    """Input- and output-channel sums of squares of every linear / Conv1D / embedding layer whose weight is in
    `names`, over every token of `batches` (a forward pass each, no gradients)."""
    stats: dict[str, ChannelStats] = {}
    hooks = []

    def hook(st: ChannelStats, embedding: bool):
        def f(module, args, output):
            x, y = args[0], output
            n_tok = x.numel() if embedding else x.numel() // x.shape[-1]
            if embedding:  # one-hot inputs: x_v^2 summed over tokens = the count of token v
                st.in_sq += torch.bincount(x.flatten(), minlength=st.in_sq.numel()).double()
            else:
                st.in_sq += x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0, dtype=torch.float64)
            st.out_sq += y.detach().reshape(-1, y.shape[-1]).float().pow(2).sum(0, dtype=torch.float64)
            st.tokens += n_tok
        return f

    for name, (m, in_dim) in _layers(model, names).items():
        w = m.weight
        st = ChannelStats(in_dim, torch.zeros(w.shape[in_dim], dtype=torch.float64),
                          torch.zeros(w.shape[1 - in_dim], dtype=torch.float64))
        stats[name] = st
        hooks.append(m.register_forward_hook(hook(st, isinstance(m, torch.nn.Embedding))))
    try:
        with torch.no_grad():
            for x in batches:
                model(input_ids=x)
    finally:
        for h in hooks:
            h.remove()
    return stats


def activation_scores(release: Release, batches: list[torch.Tensor]) -> tuple[dict[str, Scores], dict]:
    """The activation-statistics attacks (ACTIVATION_ATTACKS, see the module doc) on the attacker's token
    `batches`, at the released weights."""
    if not batches:
        raise ValueError("the activation attacks need at least one batch of attacker text")
    stats = channel_stats(release.model, batches, set(release.weights))
    out: dict[str, Scores] = {k: {} for k in ACTIVATION_ATTACKS}
    for n, st in stats.items():
        w = release.weights[n]
        col = st.in_rms().float().to(w.device)
        row = st.out_rms().float().to(w.device)
        in_b = col[None, :] if st.in_dim == 1 else col[:, None]  # broadcast along the weight's input dim
        out_b = row[:, None] if st.in_dim == 1 else row[None, :]
        out["act_wanda"][n] = w.abs() * in_b
        out["act_in_rms"][n] = in_b.expand_as(w).clone()
        out["act_out_rms"][n] = out_b.expand_as(w).clone()
    return out, {"batches": len(batches), "tokens": int(sum(b.numel() for b in batches)), "layers": len(stats)}
