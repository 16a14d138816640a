"""SOPHON (Deng et al., IEEE S&P 2024): fine-tuning suppression (FTS) alternating with normal-training
reinforcement (NTR) on the retain data.

FTS, as the authors' code does it (learn2learn MAML with first_order=True): copy the model, let a simulated
attacker fine-tune the copy on the restricted domain for `inner_steps` steps (its optimizer and learning rate drawn
per outer step), evaluate the suppression loss of the copy on a fresh restricted batch before its first step and
after every step, and apply the mean of those gradients -- taken at the copy's weights, the first-order MAML
approximation -- to the real model. The real model is never touched by the simulation (only its .grad is set by
the caller). For classification (SOPHON-NLP) the simulated attacker also trains a fresh linear head on the last
token's hidden state, as the attack suite's classifier does; the head is thrown away.

Shapes: see train/restricted_forward.py.
"""

from __future__ import annotations

import copy
import math

import torch

from pmp.config import ProtectTrainConfig
from pmp.train.protect_data import Restricted, Sampler
from pmp.train.restricted_forward import new_head, task_logits, task_loss
from pmp.train.suppression import suppression_loss


def draw_lr(cfg: ProtectTrainConfig, gen: torch.Generator, kind: str) -> float:
    """Log-uniform in [inner_lr_min, inner_lr_max]; an SGD attacker's rate x sgd_lr_factor."""
    u = float(torch.rand((), generator=gen))
    lr = math.exp(math.log(cfg.inner_lr_min) + u * (math.log(cfg.inner_lr_max) - math.log(cfg.inner_lr_min)))
    return lr * (cfg.sgd_lr_factor if kind == "sgd" else 1.0)


def draw_attacker(cfg: ProtectTrainConfig, gen: torch.Generator) -> tuple[str, float]:
    """The simulated attacker's optimizer and learning rate."""
    kind = cfg.inner_optimizers[int(torch.randint(len(cfg.inner_optimizers), (1,), generator=gen))]
    return kind, draw_lr(cfg, gen, kind)


def attacker_optimizer(kind: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def suppression_gradient(model: torch.nn.Module, restricted: Restricted, support: Sampler, query: Sampler,
                         cfg: ProtectTrainConfig, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """First-order MAML gradient of the suppression loss along one simulated fine-tuning run -> ({name: grad},
    info). `model` is left exactly as it was."""
    kind, lr = draw_attacker(cfg, gen)
    head = new_head(model, restricted.num_labels, gen) if restricted.kind == "classification" else None
    fast = copy.deepcopy(model)
    named = [(n, p) for n, p in fast.named_parameters() if p.requires_grad]
    opt = attacker_optimizer(kind, [p for _, p in named] + ([head] if head is not None else []), lr)
    acc = {n: torch.zeros_like(p) for n, p in named}
    sup_values, attack_loss = [], float("nan")
    for k in range(cfg.inner_steps + 1):
        logits, target = task_logits(fast, head, restricted.batch(query.next()))
        sup = suppression_loss(cfg.loss, logits, target)
        grads = torch.autograd.grad(sup, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                acc[n] += g
        sup_values.append(float(sup.detach()))
        if k == cfg.inner_steps:
            break
        opt.zero_grad(set_to_none=True)
        loss = task_loss(fast, head, restricted.batch(support.next()))
        loss.backward()
        opt.step()
        attack_loss = float(loss.detach())
    points = cfg.inner_steps + 1
    info = {"suppression": sum(sup_values) / points, "suppression_after": sup_values[-1],
            "attacker_loss": attack_loss, "inner_optimizer": kind, "inner_lr": lr}
    return {n: g / points for n, g in acc.items()}, info
