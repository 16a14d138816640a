"""D0: the diagnostic that names the cause of any protection a private coordinate mask seems to give.

First-order fact (research/protection.md section 2): for SGD, Adagrad and the first Adam step an unmasked update
is the masked update plus a complement update that also lowers the loss, so a mask can slow an attacker only
through curvature -- and a smaller learning rate with more steps undoes a curvature barrier. D0 measures both
halves, per release and task, on the attacker's own data:

1. Updates. For each learning rate of a grid, 1 and 20 steps (`d0_steps`) of AdamW (constant LR, no decay) that
   train (a) every parameter ("dense", what an attacker does), (b) the owner's mask ("owner", authorized
   fine-tuning: the mask's entries plus the parameters it does not cover) and (c) a random mask of the same
   density ("random"); the validation loss after each. Delta_c = L(dense) - L(owner) at the attacker's best
   learning rate must be > 0 for the mask to protect anything.
2. Curvature. The largest Hessian eigenvalue (the sharpness) of the training loss at the released weights by Lanczos
   iterations on
   Hessian-vector products (double backward), over every base parameter ("dense") and restricted to the owner's
   trainable set, its complement and the random mask (the restriction P H P, P the coordinate projection).
   dense / owner near 1 means no curvature barrier; below ~3 an attacker offsets it with <= 3x the steps at a
   lower learning rate (the budget curves grant that).

"owner" need not be a mask (pass `owner_prepare`, which turns a freshly loaded model into the owner's, and
`owner_label`): the owner's **rescale key** (`pmp protect rescale`, pmp/rescale.py) -- "owner" is then the owner's
fine-tuning of the UN-SCALED model -- or, for a protection without an owner secret (`pmp protect sophon|mlac|sdd`),
the **unprotected reference** it started from -- "owner" is then the same updates of that model. Every parameter
is trained, the sharpness is over every parameter, and there is no random-mask arm. The same two questions are
asked: do the attacker's updates of the released weights lose to the owner's (reference's) at the attacker's best
learning rate (Delta_c > 0), and is that a curvature effect (released / prepared sharpness)?
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from pmp.eval.attacks import Attack
from pmp.eval.evaluate import evaluate
from pmp.eval.finetune import Trainables, make_optimizer, random_layouts
from pmp.eval.models import head_names
from pmp.eval.task_batches import TrainBatches
from pmp.eval.task_data import PreparedTask

VARIANTS = ("dense", "owner", "random")
# How the verdict names, per kind of owner: the attacker's arm, the owner's arm, the sharpness ratio, where the
# barrier would sit.
OWNER_KINDS = {
    "mask": ("unmasked updates", "the owner's masked ones", "dense / owner", "off the mask"),
    "rescale key": ("the attacker's updates of the released weights", "the owner's updates after un-scaling",
                    "released / un-scaled", "in the released coordinates"),
    "reference": ("the attacker's updates of the protected release", "the same updates of the unprotected reference",
                  "protected / reference", "at the protected weights"),
    "prepared": ("the attacker's updates of the released weights", "the owner's updates of its prepared model",
                 "released / prepared", "at the released weights"),
}
CURVATURE_BARRIER = 3.0  # dense / owner sharpness ratio an attacker offsets with <= this many times the steps


# ---------------------------------------------------------------------------------------------- curvature
def loss_hvp(loss_fns: list[Callable[[], torch.Tensor]], params: list[torch.Tensor]):
    """v -> H v for the mean of the losses, by double backward (one graph per loss, freed after use)."""

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in params]
        for fn in loss_fns:
            grads = torch.autograd.grad(fn(), params, create_graph=True)
            dot = sum((g * x).sum() for g, x in zip(grads, v))
            for o, h in zip(out, torch.autograd.grad(dot, params)):
                o.add_(h, alpha=1.0 / len(loss_fns))
        return out

    return hvp


CURVATURE_ESTIMATOR = "lanczos-top"  # recorded in D0's inputs digest: records of another estimator recompute


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def _lanczos(apply, v: list[torch.Tensor], steps: int, tol: float) -> dict:
    """`steps` Lanczos iterations (full re-orthogonalisation) of the symmetric map `apply` from the unit vector
    `v` -> the extreme Ritz values and whether the largest has converged (residual <= tol x |value|). Unlike power
    iteration, which finds the largest MAGNITUDE (negative on some `small` releases) and needs a spectral gap,
    Lanczos gives the largest eigenvalue (the sharpness) and the most negative one from the same Krylov space."""
    basis, alphas, betas = [v], [], []
    for j in range(steps):
        w = apply(basis[j])
        alpha = _dot(w, basis[j])
        alphas.append(alpha)
        for q in basis:  # full re-orthogonalisation: float rounding would otherwise duplicate Ritz values
            c = _dot(w, q)
            w = [x - c * y for x, y in zip(w, q)]
        beta = math.sqrt(max(_dot(w, w), 0.0))
        if j == steps - 1 or beta <= 1e-12 * max(abs(alpha), 1e-30) or not math.isfinite(beta):
            betas.append(beta if math.isfinite(beta) else 0.0)
            break
        betas.append(beta)
        basis.append([x / beta for x in w])
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[:k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(T)
    top, bottom = float(vals[-1]), float(vals[0])
    residual = abs(betas[k - 1] * float(vecs[-1, -1]))  # |beta_k e_k^T y|: the Ritz pair's residual norm
    return {"top": top, "bottom": bottom, "iterations": k, "converged": residual <= tol * max(abs(top), 1e-30)}


def top_eigenvalue(hvp, like: list[torch.Tensor], restrict: list[torch.Tensor | None] | None = None,
                   iters: int = 20, tol: float = 1e-4, seed: int = 0) -> dict:
    """The LARGEST eigenvalue of P H P (the sharpness; P keeps the coordinates where `restrict` is True, None = all
    of that tensor) by `iters` Lanczos steps from a seeded random start -> {eigenvalue (largest), smallest,
    largest_magnitude, iterations, converged, dimension}."""
    g = torch.Generator().manual_seed(seed)
    keep = restrict or [None] * len(like)
    proj = [(lambda t, k=k: t if k is None else t * k.to(t.dtype)) for k in keep]
    dim = sum(int(p.numel()) if k is None else int(k.sum()) for p, k in zip(like, keep))
    v = [P(torch.randn(p.shape, generator=g, dtype=p.dtype)) for P, p in zip(proj, like)]
    norm = math.sqrt(_dot(v, v))
    if norm == 0:
        return {"eigenvalue": 0.0, "smallest": 0.0, "largest_magnitude": 0.0, "iterations": 0, "converged": True,
                "dimension": 0}
    r = _lanczos(lambda x: [P(h) for P, h in zip(proj, hvp(x))], [x / norm for x in v], min(iters, dim), tol)
    mag = r["top"] if abs(r["top"]) >= abs(r["bottom"]) else r["bottom"]
    return {"eigenvalue": r["top"], "smallest": r["bottom"], "largest_magnitude": mag, "iterations": r["iterations"],
            "converged": r["converged"], "dimension": dim}


# ---------------------------------------------------------------------------------------------- the diagnostic
def d0_diagnostic(load: Callable[[], torch.nn.Module], pt: PreparedTask, owner_layouts: dict, *, lrs, steps,
                  batch_size: int, seed: int, hessian_iters: int, hessian_batches: int, log=None,
                  owner_prepare: Callable[[nn.Module], None] | None = None, owner_label: str = "prepared") -> dict:
    """D0 of one model on one prepared task. `load()` returns a fresh task model (seeded head); `owner_layouts`
    the owner's mask (or, for a baseline, the protected model's, as a control); or, with `owner_prepare` (e.g.
    un-scaling by the owner's rescale key, in place; `owner_label` names it in the record: OWNER_KINDS), no mask:
    the owner prepares the model, then trains every parameter. -> a JSON-able record."""
    t0 = time.perf_counter()
    probe = load()
    heads = head_names(probe, pt.kind)
    owner = {n: lay for n, lay in owner_layouts.items() if n in dict(probe.named_parameters()) and n not in heads}
    density = (None if owner_prepare else
               sum(lay.nnz for lay in owner.values()) / max(sum(lay.rows * lay.cols for lay in owner.values()), 1))
    variants = ("dense", "owner") if owner_prepare else VARIANTS
    base_val = evaluate(probe, pt, "val")["loss"]
    del probe
    updates = []
    for lr in lrs:
        row = {"lr": lr}
        for variant in variants:
            row[variant] = _short_run(load, pt, variant, owner, density, lr, steps, batch_size, seed, owner_prepare)
        updates.append(row)
        if log:
            log(f"[d0] lr {lr:g}: " + ", ".join(f"{v} {row[v][str(max(steps))]:.4f}" for v in variants))
    curvature = (_curvature_prepared(load, owner_prepare, pt, batch_size, seed, hessian_iters, hessian_batches)
                 if owner_prepare else
                 _curvature(load, pt, owner, density, batch_size, seed, hessian_iters, hessian_batches))
    out = {"val_loss_before": base_val, "owner": owner_label if owner_prepare else "mask", "owner_density": density,
           "steps": list(steps), "updates": updates, "curvature": curvature}
    out["summary"] = summarize(out)
    out["seconds"] = time.perf_counter() - t0
    return out


def _short_run(load, pt: PreparedTask, variant: str, owner: dict, density: float | None, lr: float, steps,
               batch_size: int, seed: int, owner_prepare: Callable[[nn.Module], None] | None = None) -> dict:
    """Validation loss after each of `steps` AdamW steps of one variant (inf from a non-finite loss on)."""
    model = load()
    kind = {"dense": "full", "owner": "authorized", "random": "random_mask"}[variant]
    if variant == "owner" and owner_prepare is not None:  # e.g. un-scaled by the owner, then every parameter
        owner_prepare(model)
        kind = "full"
    layouts = (owner if variant == "owner" else
               random_layouts(model, density, seed, head_names(model, pt.kind) | (set(dict(model.named_parameters()))
                                                                                  - set(owner)))
               if variant == "random" else None)
    attack = Attack(f"d0_{variant}", kind, optimizer="adamw", lr=lr, schedule="constant", weight_decay=0.0)
    tr = Trainables(model, attack, pt.kind, layouts)
    opt = make_optimizer(attack, tr.groups)
    batches = TrainBatches(pt, batch_size, seed)
    out, points = {}, set(steps)
    for step in range(1, max(steps) + 1):
        loss = tr.model(**batches.next()).loss
        if not torch.isfinite(loss):
            out.update({str(s): math.inf for s in steps if s >= step})
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tr.after_step()
        if step in points:
            out[str(step)] = evaluate(tr.model, pt, "val")["loss"]
    tr.finish()
    return out


def _hvp_of(model: nn.Module, pt: PreparedTask, batch_size: int, seed: int, n_batches: int):
    """(base parameters by name, their Hessian-vector product) of the model's training loss on `n_batches` fixed
    batches of the task (the same batches for every model at the same seed)."""
    if hasattr(model, "set_attn_implementation"):  # fused CPU attention has no double backward
        model.set_attn_implementation("eager")
    model.eval()
    heads = head_names(model, pt.kind)
    named = [(n, p) for n, p in model.named_parameters() if n not in heads]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in heads)
    batches = TrainBatches(pt, batch_size, seed)
    fixed = [batches.next() for _ in range(n_batches)]
    return named, loss_hvp([lambda b=b: model(**b).loss for b in fixed], [p for _, p in named])


def _curvature_prepared(load, owner_prepare: Callable[[nn.Module], None], pt: PreparedTask, batch_size: int,
                        seed: int, iters: int, n_batches: int) -> dict:
    """Sharpness over every base parameter of the released model ("dense") and of the owner's prepared one
    ("owner"), on the same batches and from the same random start."""
    out = {}
    for name in ("dense", "owner"):
        model = load()
        if name == "owner":
            owner_prepare(model)
        named, hvp = _hvp_of(model, pt, batch_size, seed, n_batches)
        out[name] = top_eigenvalue(hvp, [p for _, p in named], iters=iters, seed=seed)
    out["batches"] = n_batches
    return out


def _curvature(load, pt: PreparedTask, owner: dict, density: float, batch_size: int, seed: int, iters: int,
               n_batches: int) -> dict:
    named, hvp = _hvp_of(load(), pt, batch_size, seed, n_batches)
    params = [p for _, p in named]
    owner_bool = {n: lay.to_bool() for n, lay in owner.items()}
    g = torch.Generator().manual_seed(seed * 1_000_003 + 31)
    rand_bool = {n: torch.rand(lay.shape, generator=g) < density for n, lay in owner.items()}
    sets = {"dense": None,
            "owner": [owner_bool.get(n) for n, _ in named],  # None = a parameter the mask does not cover: trained
            "complement": [~owner_bool[n] if n in owner_bool else torch.zeros(p.shape, dtype=torch.bool)
                           for n, p in named],
            "random": [rand_bool.get(n) for n, _ in named]}
    out = {name: top_eigenvalue(hvp, params, restrict, iters=iters, seed=seed)
           for name, restrict in sets.items()}
    out["batches"] = n_batches
    return out


def summarize(d0: dict) -> dict:
    """The numbers the verdict rests on: the attacker's best learning rate (lowest dense loss after the most
    steps), Delta_c there and between each variant's own best, and the dense / owner sharpness ratio."""
    last = str(max(d0["steps"]))
    ups = d0["updates"]
    present = [v for v in VARIANTS if v in ups[0]]  # no random arm when the owner's secret is not a mask

    def best(variant: str) -> dict:
        return min(ups, key=lambda r: r[variant].get(last, math.inf))

    b_dense = best("dense")
    lam = {k: v["eigenvalue"] for k, v in d0["curvature"].items() if isinstance(v, dict)}
    ratio = lam["dense"] / lam["owner"] if (lam.get("owner") or 0) > 0 else None  # sharpness: largest eigenvalues
    return {
        "steps": int(last), "attacker_lr": b_dense["lr"],
        "delta_c_at_attacker_lr": b_dense["dense"][last] - b_dense["owner"][last],
        "delta_c_each_best": best("dense")["dense"][last] - best("owner")["owner"][last],
        "owner_minus_random_each_best": (best("owner")["owner"][last] - best("random")["random"][last]
                                         if "random" in present else None),
        "best_loss": {v: best(v)[v][last] for v in present}, "best_lr": {v: best(v)["lr"] for v in present},
        "eigenvalues": lam, "sharpness_ratio": ratio, "owner": d0.get("owner", "mask"),
    }


def headline(rec: dict) -> dict:
    """What a one-row summary of a D0 record shows: at the attacker's best learning rate (lowest unmasked loss after
    the most steps), the unmasked ("dense") and the owner's masked validation loss, their difference Delta_c, the
    dense / owner sharpness ratio, and the verdict (today's rule on the recorded numbers)."""
    s = rec["summary"]
    last = str(s["steps"])
    at = next(u for u in rec["updates"] if u["lr"] == s["attacker_lr"])
    return {"model": rec["model"], "task": rec["task"], "mask_from": rec["mask_from"], "steps": s["steps"],
            "attacker_lr": s["attacker_lr"], "unmasked_loss": at["dense"][last], "owner_loss": at["owner"][last],
            "delta_c": s["delta_c_at_attacker_lr"], "sharpness_ratio": s["sharpness_ratio"],
            "verdict": verdict(s), "secret": rec.get("secret", "mask")}


def verdict(s: dict) -> str:
    """One sentence naming the cause, from `summarize` (every kind of owner in OWNER_KINDS; the wording says
    which)."""
    dc, r = s["delta_c_at_attacker_lr"], s["sharpness_ratio"]
    them, us, ratio_name, where = OWNER_KINDS.get(s.get("owner", "mask"), OWNER_KINDS["prepared"])
    first = (f"at the attacker's best learning rate ({s['attacker_lr']:g}) {them} reach a validation loss "
             f"{'higher' if dc > 0 else 'no higher'} than {us} after {s['steps']} steps (Delta_c = {dc:+.4f})")
    if r is None or not math.isfinite(r):
        curv = "the owner-restricted sharpness is zero or undefined (no curvature comparison)"
    else:
        curv = f"the {ratio_name} sharpness ratio is {r:.2f}"
    each = s.get("delta_c_each_best")
    lrs = s.get("best_lr") or {}
    barrier = r is not None and math.isfinite(r) and r >= CURVATURE_BARRIER
    if dc <= 0 and each is not None and each > 0:
        # as good at the same rate, but the owner's own best rate goes further: the attacker is held to a lower rate
        own, att = lrs.get("owner", float("nan")), lrs.get("dense", float("nan"))
        held = (f"level at the same rate, the owner's best learning rate ({own:g}) still ends {each:.4f} lower than "
                f"the attacker's best ({att:g}): the attacker is held to a lower rate")
        cause = (f"{held}, and the loss is {r:.0f}x sharper {where} -- a curvature barrier; more steps at the lower "
                 "rate are expected to undo it (see the budget curves)" if barrier else
                 f"{held} without a curvature cause -- a learning-rate effect, expected to vanish at a larger budget "
                 "(see the budget curves)")
    elif dc <= 0 and not barrier:
        cause = ("no mechanism: neither a first-order nor a curvature barrier -- any gap in the attack tables is "
                 "budget, not protection")
    elif dc <= 0:
        cause = (f"the loss is sharper {where}, but the attacker's updates already win at its best learning rate: "
                 "the curvature barrier does not bind")
    elif barrier:
        cause = (f"a curvature barrier: the attacker's updates are held back by sharpness {where}; an attacker with "
                 f"~{r:.0f}x the steps at ~1/{r:.0f} the learning rate is expected to undo it (see the budget "
                 "curves)")
    else:
        cause = ("the attacker's updates lose at this learning rate, but the sharpness ratio is small: a "
                 "learning-rate or step effect, expected to vanish at a larger budget (see the budget curves)")
    return f"{first}; {curv}. Cause: {cause}."
