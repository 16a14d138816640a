"""The fine-tuning loops: one attack on one model, task and seed -> learning curve and selected metrics.

`finetune(model, task, attack, budget, seed, mask_layouts=...)` trains what the attack's kind allows (see
eval/attacks.py), evaluates val + test every `budget.eval_every` steps and at the last step, and returns the
curve plus the two headline numbers: the test metric at the step that is best on the attacker's OWN validation
split (a realistic attacker early-stops) and the final-step test metric. The head-only probe trains on cached
frozen-base features (identical maths, ~100x cheaper); the LM "probe" and that of classification as language
modelling (`TASK:lm`: zero-shot likelihood scoring of the label words) train nothing.

Dense kinds (full, and the fine-tuning phase of the adaptive kinds heal_then_ft and reinit_complement, whose
preparation eval/adaptive.py does first) train every parameter. The optimizers are torch's AdamW, Adam, SGD with
momentum and Adagrad, and SOAP (Shampoo-preconditioned Adam) from `pytorch-optimizer`.

Sparse kinds (random_mask, authorized, recovered_mask) train through `pmp.masked_state.MaskedModel`: only masked
entries have gradients and optimizer state, the complement of every masked tensor stays bit-exact (verified after
training and recorded as `complement_unchanged`), and every other base parameter is frozen; only the new head
trains densely.
"""

from __future__ import annotations

import math
import time

import torch

from pmp.eval.attacks import DENSE_KINDS, Attack, Budget
from pmp.eval.evaluate import evaluate, features
from pmp.eval.metrics import better
from pmp.eval.models import head_names
from pmp.eval.task_batches import TrainBatches
from pmp.eval.task_data import CAUSAL_LM_KINDS, DIRECTION, METRIC, PreparedTask
from pmp.kernels import MaskLayout
from pmp.masked_state import MaskedModel
from pmp.schedule import lr_at
from pmp.weight_decay import decay_groups, decays, param_groups


def select_by_validation(curve: list[dict], metric: str, direction: str) -> dict:
    """The curve point whose VAL metric is best (earliest on ties): what an early-stopping attacker keeps."""
    best = curve[0]
    for pt in curve[1:]:
        if better(pt["val"][metric], best["val"][metric], direction):
            best = pt
    return best


# SOAP's preconditioners are d x d per side of a matrix; sides above this are left unpreconditioned (Adam-like), so
# that the 8192-token embedding of `small` does not cost an 8192^2 eigendecomposition every 10 steps on CPU.
SOAP_MAX_PRECONDITION_DIM = 1024


def make_optimizer(attack: Attack, groups: list[dict]) -> torch.optim.Optimizer:
    if attack.optimizer == "soap":
        try:
            from pytorch_optimizer import SOAP  # noqa: PLC0415 - 2 s import; only SOAP attacks need it
        except ImportError:
            raise ValueError(f"attack {attack.name}: the soap optimizer needs the `pytorch-optimizer` package "
                             "(pip install pytorch-optimizer)") from None
        # 1-D tensors (norms, biases, the compact state of sparse attacks) get Adam-like updates (precondition_1d
        # off): SOAP whitens matrices only
        return SOAP(groups, lr=attack.lr, betas=(0.95, 0.95), precondition_frequency=10,
                    max_precondition_dim=SOAP_MAX_PRECONDITION_DIM)
    if attack.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=attack.lr)
    if attack.optimizer == "adam":
        return torch.optim.Adam([{"params": g["params"]} for g in groups], lr=attack.lr)  # plain Adam: no decay
    if attack.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=attack.lr, momentum=attack.momentum)
    return torch.optim.Adagrad(groups, lr=attack.lr)


def lr_for(attack: Attack, step: int, steps: int) -> float:
    if attack.schedule == "constant":
        return attack.lr
    return lr_at(step, 0, steps, attack.lr, round(attack.warmup_fraction * steps), attack.min_lr_ratio)


def random_layouts(model: torch.nn.Module, density: float, seed: int, exclude: set[str]) -> dict:
    """A random mask of the given density over every base parameter (not the new head): the attacker's guess."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    return {n: MaskLayout.from_bool(torch.rand(p.shape, generator=g) < density)
            for n, p in model.named_parameters() if n not in exclude}


class Trainables:
    """What an attack trains: optimizer param groups + a hook after each optimizer step + a final clean-up."""

    def __init__(self, model, attack: Attack, task_kind: str, mask_layouts: dict | None):
        self.model, self.masked, self.snapshot = model, None, None
        heads = head_names(model, task_kind)
        kind = attack.kind
        # the owner's authorized fine-tuning of a secret that is no mask (a rescale key: the sweep un-scaled the
        # model first) trains every parameter, as the full attack does
        owner_dense = kind == "authorized" and mask_layouts is None
        if kind == "lora":
            from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - heavy; only LoRA attacks need it

            cfg = LoraConfig(r=attack.lora_r, lora_alpha=attack.lora_alpha, target_modules="all-linear",
                             lora_dropout=0.0, modules_to_save=sorted({h.split(".")[0] for h in heads}) or None,
                             task_type="CAUSAL_LM" if task_kind in CAUSAL_LM_KINDS else "SEQ_CLS")
            self.model = get_peft_model(model, cfg)
        elif kind in ("random_mask", "authorized", "recovered_mask") and not owner_dense:
            if not mask_layouts:
                raise ValueError(f"attack {attack.name} ({kind}) needs a mask")
            named = dict(model.named_parameters())
            layouts = {n: lay for n, lay in mask_layouts.items() if n in named and n not in heads}
            for n, p in named.items():
                p.requires_grad_(n in heads)
            self.snapshot = {n: named[n].detach().clone() for n in layouts}
            self.masked = MaskedModel(model, layouts)
            # Parameters the mask does not cover (e.g. norms under scope=matrices) trained densely in pre-training,
            # so mask-aware fine-tuning trains them densely too; with a mask over every parameter none are left.
            self.uncovered = [n for n in named if n not in layouts and n not in heads]
            for n, p in named.items():
                if n not in layouts:
                    p.requires_grad_(True)
        else:
            every = kind in DENSE_KINDS or owner_dense
            for n, p in model.named_parameters():
                p.requires_grad_(every or n in heads or (kind == "norm_bias" and p.dim() < 2))
        if self.masked is not None:
            extra = [p for n, p in model.named_parameters() if n in heads or n in self.uncovered]
            decay = [t.compact for t in self.masked.tensors if decays(t.dense)] + [p for p in extra if decays(p)]
            no_decay = [t.compact for t in self.masked.tensors if not decays(t.dense)]
            no_decay += [p for p in extra if not decays(p)]
            self.groups = decay_groups(decay, no_decay, attack.weight_decay)
            self.n_trainable = self.masked.masked_count() + sum(p.numel() for p in extra)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.groups = param_groups(params, attack.weight_decay)
            self.n_trainable = sum(p.numel() for p in params)
        self.params = self.groups[0]["params"] + self.groups[1]["params"]
        if not self.params:
            raise ValueError(f"attack {attack.name}: nothing to train on this model")

    def after_step(self) -> None:
        if self.masked is not None:
            self.masked.sync_()

    def finish(self) -> bool | None:
        """Detach the masked state; True iff every masked tensor's complement is bit-exactly unchanged."""
        if self.masked is None:
            return None
        ok = True
        for t in self.masked.tensors:
            keep = ~t.layout.to_bool().to(t.dense.device)
            ok &= bool(torch.equal(t.dense.detach()[keep], self.snapshot[t.name][keep]))
        self.masked.detach()
        return ok


def eval_steps(steps: int, every: int) -> list[int]:
    return sorted({s for s in range(every, steps + 1, every)} | {steps})


def finetune(model, task: PreparedTask, attack: Attack, budget: Budget, seed: int,
             mask_layouts: dict | None = None, log=None) -> dict:
    """Train `model` (already adapted to the task, head seeded) with `attack`; return curve + selected metrics."""
    torch.manual_seed(seed)
    steps = attack.steps or budget.steps
    metric, direction = METRIC[task.kind], DIRECTION[task.kind]
    t0 = time.perf_counter()
    if attack.kind == "probe":
        out = _probe(model, task, attack, budget, seed, steps)
    else:
        tr = Trainables(model, attack, task.kind, mask_layouts)
        opt = make_optimizer(attack, tr.groups)
        batches = TrainBatches(task, budget.batch_size, seed)
        points = set(eval_steps(steps, budget.eval_every))
        curve, losses = [], []
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_for(attack, step, steps)
            loss = tr.model(**batches.next()).loss
            if not torch.isfinite(loss):
                losses.append(float("nan"))
                curve.append(_diverged(step + 1, metric, direction))
                break  # a diverged attack: its metrics are the worst possible, recorded as such
            loss.backward()
            if attack.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(tr.params, attack.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tr.after_step()
            losses.append(float(loss.detach()))
            if step + 1 in points:
                window = losses[-budget.eval_every:]
                pt = {"step": step + 1, "train_loss": sum(window) / len(window),
                      "val": evaluate(tr.model, task, "val"), "test": evaluate(tr.model, task, "test")}
                curve.append(pt)
                if log:
                    log(f"    step {pt['step']:5d} loss {pt['train_loss']:.4f} val {metric} {pt['val'][metric]:.4f} "
                        f"test {pt['test'][metric]:.4f}")
        out = {"curve": curve, "train_losses": losses, "trainable_parameters": tr.n_trainable,
               "complement_unchanged": tr.finish()}
    sel = select_by_validation(out["curve"], metric, direction)
    out.update({"metric": metric, "direction": direction, "steps": steps,
                "selected": {"step": sel["step"], "val": sel["val"][metric], "test": sel["test"][metric]},
                "final": {"step": out["curve"][-1]["step"], "test": out["curve"][-1]["test"][metric]},
                "train_seconds": time.perf_counter() - t0})
    return out


def _diverged(step: int, metric: str, direction: str) -> dict:
    worst = {"accuracy": 0.0, "perplexity": math.inf}[metric]
    return {"step": step, "diverged": True, "val": {metric: worst, "loss": math.inf},
            "test": {metric: worst, "loss": math.inf}}


def _probe(model, task: PreparedTask, attack: Attack, budget: Budget, seed: int, steps: int) -> dict:
    """Frozen base. Classification: train only the head on cached features. LM and classification as language
    modelling: no training at all (perplexity / zero-shot likelihood scoring of the label words)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if task.kind in CAUSAL_LM_KINDS:
        pt = {"step": 0, "val": evaluate(model, task, "val"), "test": evaluate(model, task, "test")}
        return {"curve": [pt], "train_losses": [], "trainable_parameters": 0, "complement_unchanged": None}
    feats = {s: features(model, task, s) for s in ("train", "val", "test")}
    head = model.score
    for p in head.parameters():
        p.requires_grad_(True)
    params = list(head.parameters())
    opt = make_optimizer(attack, [{"params": params, "weight_decay": attack.weight_decay}])
    x_NH, y_N = feats["train"]
    g = torch.Generator().manual_seed(seed * 7919 + 3)
    points, curve, losses = set(eval_steps(steps, budget.eval_every)), [], []
    perm, pos = torch.randperm(len(y_N), generator=g), 0

    def ev(split: str) -> dict:
        xs, ys = feats[split]
        logits = head(xs)
        return {"accuracy": float((logits.argmax(-1) == ys).float().mean()),
                "loss": float(torch.nn.functional.cross_entropy(logits, ys))}

    for step in range(steps):
        if pos >= len(y_N):
            perm, pos = torch.randperm(len(y_N), generator=g), 0
        idx = perm[pos:pos + budget.batch_size]
        pos += budget.batch_size
        for grp in opt.param_groups:
            grp["lr"] = lr_for(attack, step, steps)
        loss = torch.nn.functional.cross_entropy(head(x_NH[idx]), y_N[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step + 1 in points:
            with torch.no_grad():
                curve.append({"step": step + 1, "train_loss": sum(losses[-budget.eval_every:]) /
                              len(losses[-budget.eval_every:]), "val": ev("val"), "test": ev("test")})
    return {"curve": curve, "train_losses": losses, "trainable_parameters": sum(p.numel() for p in params),
            "complement_unchanged": None}
