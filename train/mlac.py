"""MLAC -- meta-learned adversarial censoring (Henderson, Mitchell et al., "Self-Destructing Models", AIES 2023).

One joint objective per outer step: keep the retain language-modelling loss low AND make a simulated adversary,
after K steps of adapting to the restricted ("harmful") domain, do badly there:

    L = LM_loss(retain) + w * mean_k suppression(adversary_k on a fresh restricted batch),  k = 1..K

`mlac_adversary: head` (the paper's setting: BERT-tiny with an adversary head) adapts only a head on the model's
features -- a fresh linear head for a classification domain, the model's own LM head for a language-modelling
domain -- by plain SGD, and the K steps are DIFFERENTIATED THROUGH (second order, as the authors do with
`higher`): a head's update is cheap to unroll and its dependence on the body's features is what MLAC trains
against. `full` adapts every parameter (SGD or Adam, drawn) first-order, exactly SOPHON's simulation (suppression
averaged over k = 0..K), because unrolling K full-model steps would hold K copies of the graph. The head
adversary's learning rate is drawn like SOPHON's SGD attacker's (log-uniform x sgd_lr_factor).
Differences from the paper, stated: the
adversary's learning rate is drawn per step (log-uniform) instead of meta-learned, the suppression loss is the
bounded one of SOPHON (inverse CE or KL from uniform) instead of the negated adapted loss, and there is no
cvxpylayers linear adversary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pmp.config import ProtectTrainConfig
from pmp.train.protect_data import Restricted, Sampler
from pmp.train.restricted_forward import lm_loss, new_head, pooled_hidden
from pmp.train.sophon import draw_lr, suppression_gradient
from pmp.train.suppression import suppression_loss


def _features(model: torch.nn.Module, restricted: Restricted, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], targets [N]) the adversary head reads: pooled hidden states, or per-position ones."""
    if restricted.kind == "classification":
        return pooled_hidden(model, batch), batch["labels"]
    ids = batch["input_ids"]
    hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]
    return hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)


def adapted_head_suppression(model: torch.nn.Module, restricted: Restricted, support: Sampler, query: Sampler,
                             cfg: ProtectTrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Mean suppression loss of the head adversary after each of K differentiable SGD steps (a graph back to the
    model's weights through the features and, for an LM domain, through the LM head it starts from)."""
    lr = draw_lr(cfg, gen, "sgd")
    if restricted.kind == "classification":
        w = new_head(model, restricted.num_labels, gen)
    else:
        w = model.get_output_embeddings().weight
    h_s, y_s = _features(model, restricted, restricted.batch(support.next()))
    h_q, y_q = _features(model, restricted, restricted.batch(query.next()))
    sups, adv_loss = [], float("nan")
    for _ in range(cfg.inner_steps):
        loss = F.cross_entropy(h_s @ w.t(), y_s)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        w = w - lr * g
        sups.append(suppression_loss(cfg.loss, h_q @ w.t(), y_q))
        adv_loss = float(loss.detach())
    sup = torch.stack(sups).mean()
    return sup, {"suppression": float(sup.detach()), "suppression_after": float(sups[-1].detach()),
                 "attacker_loss": adv_loss, "inner_optimizer": "sgd (unrolled)", "inner_lr": lr}


def mlac_step(model: torch.nn.Module, restricted: Restricted, support: Sampler, query: Sampler,
              retain_ids_BT: torch.Tensor, cfg: ProtectTrainConfig, gen: torch.Generator) -> dict:
    """Set model's .grad to the gradient of the MLAC objective; returns what to log."""
    if cfg.mlac_adversary == "head":
        sup, info = adapted_head_suppression(model, restricted, support, query, cfg, gen)
        retain = lm_loss(model, retain_ids_BT)
        (retain + cfg.mlac_weight * sup).backward()
    else:
        grads, info = suppression_gradient(model, restricted, support, query, cfg, gen)
        retain = lm_loss(model, retain_ids_BT)
        retain.backward()
        for n, p in model.named_parameters():
            if n in grads:
                p.grad = grads[n] * cfg.mlac_weight if p.grad is None else p.grad + cfg.mlac_weight * grads[n]
    return {**info, "retain_loss": float(retain.detach())}
