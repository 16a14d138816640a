"""What-if of a proposed fix against the structural tell: norm weights that start at 1 + N(0, sigma^2) from the
secret seed instead of exactly 1.0, so untrained norm entries no longer sit at a known constant.

Simulated on a copy of the release rather than by re-training: every all-constant-init tensor gets a secret jitter
added, trained entries keep their learned offset, and the weight-statistics attacks are scored again.
"""

from __future__ import annotations

import torch

from pmp.eval.audit_metrics import Sample, evaluate
from pmp.eval.init_knowledge import InitDist, init_distribution
from pmp.eval.recovery_weight_stats import weight_attacks
from pmp.eval.release_weights import Release


def norm_jitter_release(release: Release, dist: dict[str, InitDist], sigma: float, seed: int = 12345) -> Release:
    """What-if of the proposed fix: every all-constant-init tensor (norm weights) starts at const + N(0, sigma^2)
    from a secret generator; trained entries keep their learned offset (an approximation: a real run with the
    jittered init would follow a slightly different trajectory)."""
    g = torch.Generator().manual_seed(seed)
    w2 = {}
    for n, w in release.weights.items():
        if dist[n].all_const:
            w = w + sigma * torch.randn(w.shape, generator=g)
        w2[n] = w
    return Release(release.path, release.config, release.model, w2, release.storage_dtype)


def norm_jitter_what_if(release: Release, dist: dict[str, InitDist], sample: Sample, sigma: float) -> dict:
    """The weight-statistics attacks scored on the jittered copy (the report's "what_if" section)."""
    sim = norm_jitter_release(release, dist, sigma)
    sim_dist = init_distribution(release, norm_jitter=sigma)
    what_if = {"change": f"norm weights initialised at 1 + N(0, {sigma}^2) from the secret seed", "sigma": sigma,
               "attacks": {}}
    for name, fn in weight_attacks(sim, sim_dist).items():
        s = fn()
        if s:
            what_if["attacks"][name] = evaluate(s, sample)
    return what_if
