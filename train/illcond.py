"""V3, keyed ill-conditioning (research/protection.md section 4.2, after Zheng et al., ICML 2025;
`pmp.variant=illcond`).

The private mask is a secret set of input channels: for every group of nn.Linear layers that read the same input
(q/k/v; gate/up; o; down; lm_head) a random `pmp.density` share of the channels, drawn at step 0 from a hash of the
run's secret init seed (OS entropy unless pinned).
The mask of each weight is that set's columns (mask_OI = key_I for every row O), stored as any private mask
(RUN/private/mask.*). The model trains densely; each step adds, per group, with K = X^T X / N the (uncentered)
second moment of the layer's input X [N tokens, I channels] -- the input-side Kronecker factor of the layer's
Gauss-Newton curvature, which sets how fast a fine-tuning step on those columns can go --

    w_ill * R_ill(norm(K_c)) + w_well * R_well(norm(K_m)),   averaged over the groups,

K_c / K_m the principal sub-matrices of the complement / masked channels, norm(S) = S / (tr S / k) (mean
eigenvalue 1). The hypothesis: an ill-conditioned K_c caps the stable learning rate of dense fine-tuning, while
the owner's fine-tuning of the masked columns sees the well-conditioned K_m.

R_ill(S) = 1 / (||S||_F^2 / (2k) - sigma_min^2 / 2), k x k symmetric PSD S with eigenvalues l_1 >= ... >= l_k:
  ||S||_F^2 = sum l_i^2 and sigma_min = l_k, so the denominator is (mean_i l_i^2 - l_k^2) / 2 >= 0, zero exactly
  when all eigenvalues are equal (kappa = 1) and at most (l_1^2 - l_k^2) / 2. Minimising R_ill therefore spreads
  the spectrum away from its smallest eigenvalue. On raw S it is also minimised by just making S large (R_ill
  falls as 1 / scale^2): the model could win it by inflating the complement activations without changing their
  conditioning. Hence it is applied to norm(S): with mean eigenvalue 1 the denominator is
  (1 + var(l) - l_min^2) / 2, a function of the spectrum's shape only, in (0, k/2]; so R_ill(norm(S)) >= 2 / k.
R_well(S) = (||S||_F^2 - tr(S)^2 / k) / (2k) = var(l) / 2 (the population variance of the eigenvalues; Nenov et
  al.'s condition-number regulariser 1/2 ||S||_F^2 - ||S||_*^2 / (2k), divided by k), zero exactly at kappa = 1.
  No eigendecomposition; on norm(S) it is scale-free too.

At evaluation the trainer reports kappa(K_c), kappa(K_m) (geometric means over the groups) and the geometric mean
of kappa(K_c) / kappa(K_m), from the held-out batches.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from contextlib import contextmanager

import torch

from pmp.mask import PrivateMask

TINY = 1e-12  # R_ill's denominator floor: 0 only for a perfectly conditioned matrix


# ---------------------------------------------------------------------------------------------- the regularisers
def r_ill(S_kk: torch.Tensor) -> torch.Tensor:
    """1 / (||S||_F^2 / (2k) - sigma_min^2 / 2) of a symmetric PSD matrix (larger when better conditioned)."""
    k = S_kk.shape[-1]
    smallest = torch.linalg.eigvalsh(S_kk)[0]
    return 1.0 / ((S_kk.square().sum() / (2 * k) - smallest.square() / 2).clamp_min(TINY))


def r_well(S_kk: torch.Tensor) -> torch.Tensor:
    """(||S||_F^2 - tr(S)^2 / k) / (2k): half the variance of the eigenvalues of a symmetric S."""
    k = S_kk.shape[-1]
    return (S_kk.square().sum() - torch.trace(S_kk).square() / k) / (2 * k)


def normalised(S_kk: torch.Tensor) -> torch.Tensor:
    """S scaled to mean eigenvalue 1."""
    return S_kk * (S_kk.shape[-1] / torch.trace(S_kk).clamp_min(TINY))


def condition_number(S_kk: torch.Tensor) -> float:
    """lambda_max / lambda_min of a symmetric PSD matrix (inf when singular)."""
    lam = torch.linalg.eigvalsh(S_kk.double())
    return float(lam[-1] / lam[0]) if lam[0] > 0 else math.inf


# ---------------------------------------------------------------------------------------------- the channel key
def linear_input_groups(model: torch.nn.Module, names: list[str]) -> list[list[str]]:
    """The weights of `names` (nn.Linear weights) grouped by the input tensor their layers read, found by one tiny
    forward (no randomness, no gradient); groups in the order their layers run."""
    modules = {f"{mn}.weight": m for mn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook(name):
        def fn(_module, args):
            x = args[0]
            for t, group in seen:
                if t is x:
                    group.append(name)
                    return
            seen.append((x, [name]))
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [g for _, g in seen]


def key_seed(init_seed: int | None) -> int:
    """The key's seed: a hash of the run's init seed (fresh OS entropy when the run has none on record)."""
    if init_seed is None:
        return secrets.randbits(63)
    return int.from_bytes(hashlib.sha256(f"pmp-illcond-key|{init_seed}".encode()).digest()[:8], "little") >> 1


def draw_key(model: torch.nn.Module, names: list[str], density: float, seed: int) -> dict[str, torch.Tensor]:
    """A secret channel set per input group: {weight name: bool [in_features]}, equal within a group."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(model.named_parameters())
    key = {}
    for group in linear_input_groups(model, names):
        d = shapes[group[0]].shape[1]
        keep = torch.zeros(d, dtype=torch.bool)
        keep[torch.randperm(d, generator=g)[:max(1, min(d - 1, round(density * d)))]] = True
        key.update({n: keep for n in group})
    return key


def channel_mask(model: torch.nn.Module, key: dict[str, torch.Tensor], meta: dict) -> PrivateMask:
    """The private mask of a channel key: every row of a weight masks the key's columns."""
    shapes = dict(model.named_parameters())
    return PrivateMask.from_bool({n: k.expand(shapes[n].shape).clone() for n, k in key.items()}, meta)


def key_of(mask: PrivateMask) -> dict[str, torch.Tensor]:
    """The channel key of a stored channel mask; ValueError when the mask is not one."""
    key = {}
    for n, m in mask.to_bool().items():
        if m.dim() != 2 or not torch.equal(m, m[:1].expand_as(m)):
            raise ValueError(f"the private mask of {n} is not a set of input channels (its rows differ): this is "
                             "not a pmp.variant=illcond mask")
        key[n] = m[0].clone()
    return key


# ---------------------------------------------------------------------------------------------- the regulariser
class IllCond:
    """Hooks on the first layer of every input group: in training they keep the input of the last forward (with
    its graph) for `penalty()`; inside `measure()` they accumulate X^T X for `kappa_metrics()`."""

    def __init__(self, model: torch.nn.Module, key: dict[str, torch.Tensor], ill_weight: float, well_weight: float):
        self.ill_weight, self.well_weight = ill_weight, well_weight
        groups = linear_input_groups(model, sorted(key))
        for group in groups:
            if any(not torch.equal(key[n], key[group[0]]) for n in group):
                raise ValueError(f"the channel key differs between {group}, which read the same input: this mask "
                                 "does not belong to this model")
        modules = {f"{mn}.weight": m for mn, m in model.named_modules()}
        device = next(model.parameters()).device
        self.groups = [g[0] for g in groups]
        self.masked = {n: key[n].nonzero().squeeze(1).to(device) for n in self.groups}
        self.complement = {n: (~key[n]).nonzero().squeeze(1).to(device) for n in self.groups}
        self.inputs: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] | None = None
        self.counts: dict[str, int] = {}
        self.stats: tuple[dict, dict] = ({}, {})
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.groups]
        self._window: dict[str, float] = {}
        self._count = 0

    def _hook(self, name: str):
        def fn(module, args):
            x_I = args[0].reshape(-1, args[0].shape[-1])
            if self.sums is not None:  # measuring
                X = x_I.detach().double()
                self.sums[name] = self.sums.get(name, 0) + X.T @ X
                self.counts[name] = self.counts.get(name, 0) + X.shape[0]
            elif module.training and torch.is_grad_enabled():
                self.inputs[name] = x_I
        return fn

    def penalty(self) -> torch.Tensor:
        """The regulariser of the inputs captured by the last training forward (then forgotten)."""
        assert len(self.inputs) == len(self.groups), "penalty() needs one training forward first"
        ill = well = 0.0
        with torch.autocast(self.inputs[self.groups[0]].device.type, enabled=False):
            for n in self.groups:
                X = self.inputs[n].float()
                K = X.T @ X / X.shape[0]
                c, m = self.complement[n], self.masked[n]
                ill = ill + r_ill(normalised(K.index_select(0, c).index_select(1, c)))
                well = well + r_well(normalised(K.index_select(0, m).index_select(1, m)))
        self.inputs = {}
        ill, well = ill / len(self.groups), well / len(self.groups)
        self._window["ill_penalty"] = self._window.get("ill_penalty", 0.0) + float(ill.detach())
        self._window["well_penalty"] = self._window.get("well_penalty", 0.0) + float(well.detach())
        self._count += 1
        return self.ill_weight * ill + self.well_weight * well

    def pop_window(self) -> dict[str, float]:
        """Means of the two penalties since the last call, for the log row."""
        out = {k: v / self._count for k, v in self._window.items()} if self._count else {}
        self._window, self._count = {}, 0
        return out

    @contextmanager
    def measure(self):
        """Accumulate X^T X of every group over the forwards inside (no graph kept)."""
        self.sums, self.counts = {}, {}
        try:
            yield
        finally:
            self.stats, self.sums = (self.sums, self.counts), None

    def kappa_metrics(self) -> dict[str, float]:
        """kappa(K_c), kappa(K_m) and kappa(K_c) / kappa(K_m) from the last `measure()`, geometric means over the
        groups."""
        sums, counts = self.stats
        logs = {"kappa_c": [], "kappa_m": [], "kappa_ratio": []}
        for n in self.groups:
            if n not in sums:
                continue
            K = sums[n] / counts[n]
            c, m = self.complement[n], self.masked[n]
            kc = condition_number(K.index_select(0, c).index_select(1, c))
            km = condition_number(K.index_select(0, m).index_select(1, m))
            for k, v in (("kappa_c", kc), ("kappa_m", km), ("kappa_ratio", kc / km)):
                logs[k].append(math.log(v) if 0 < v < math.inf else math.inf)
        return {k: math.exp(sum(v) / len(v)) if v else math.nan for k, v in logs.items()}
