"""`pmp audit`: run the mask-recovery attacks on a release and score them against the TRUE private mask.

The attacks use public information only: the weights against the public init distribution (`recovery_weight_stats`),
the attacker's own shadow run (`recovery_shadow`), gradients on attacker text (`recovery_gradients`), the Hessian
diagonal on that text (`recovery_curvature`), activation statistics on it (`recovery_activations`) and seed
guessing (`recovery_seeds`). The ground truth (`audit_truth`) only scores them (`audit_metrics`); the best attack
becomes a recovered mask (`recovered_mask`), and a proposed fix can be simulated (`audit_what_if`).

Output (a results dir, default RUN/audit -- it describes the private mask, so it stays private):
  audit.json       every number, per attack / tensor type, seed-guessing details, timings
  audit.md         the same as Markdown tables, the best attack, and the what-if of a proposed fix
  recovered_mask/  the best attack's global top-rho mask as a PrivateMask bundle (for a sparse fine-tuning attack)
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from pmp.atomic import owner_only
from pmp.dir_lock import exclusive
from pmp.eval.attacker_text import load_attacker_texts
from pmp.eval.audit_metrics import MAX_ENTRIES, Sample, evaluate
from pmp.eval.audit_report import write_report
from pmp.eval.audit_truth import load_private
from pmp.eval.audit_what_if import norm_jitter_what_if
from pmp.eval.config import AuditConfig
from pmp.eval.init_knowledge import init_distribution, summary_by_kind
from pmp.eval.recovered_mask import recovered_mask
from pmp.eval.recovery_activations import activation_scores
from pmp.eval.recovery_curvature import curvature_scores
from pmp.eval.recovery_gradients import gradient_scores, text_batches
from pmp.eval.recovery_seeds import seed_guess
from pmp.eval.recovery_shadow import load_shadow, shadow_scores
from pmp.eval.recovery_weight_stats import WEIGHT_ATTACK_FAMILIES, weight_attacks
from pmp.eval.release_weights import Release, Scores, load_release
from pmp.mask import PrivateMask
from pmp.paths import refuse_output_over

Attacks = dict[str, tuple[Scores, dict]]  # attack name -> (scores, {"family": ..., "seconds": ...}), in run order


def run_audit(cfg: AuditConfig, log=print) -> dict:
    """Audit `cfg.release` against `cfg.private`; writes audit.json, audit.md and recovered_mask/ into `cfg.out`
    (default RUN/audit) and returns the report (audit.json's content, before non-finite numbers become null).

    Nothing is written before the inputs are checked, and `out` may not overlap the release or the shadow run, nor
    be or contain the private run (inside it is fine: it is private). The output is owner-only (directories 0700,
    files 0600) and written under its directory's write lock (`pmp.dir_lock`), held from before the attacks."""
    cfg.validate()
    t_start = time.perf_counter()
    deadline = t_start + cfg.max_seconds  # seed guessing gets what the other attacks leave
    inputs = _inputs(cfg, log)  # the inputs first: their errors say more than an overlap of paths
    out = Path(cfg.out) if cfg.out else Path(cfg.private) / "audit"
    refuse_output_over(out, releases={"the release": cfg.release, **({"the shadow run --shadow": cfg.shadow}
                                                                     if cfg.shadow else {})},
                       private_runs={"the private run --private": cfg.private})
    release, mask, sample = inputs.release, inputs.mask, inputs.sample
    with ExitStack() as held:
        with owner_only():
            held.enter_context(exclusive(out, "audit directory"))
        dist = init_distribution(release)
        attacks, fits = _weight_attacks(release, dist)
        shadow_info = _shadow_attacks(cfg.shadow, inputs.shadow, release, attacks, fits)
        grad_info = _gradient_attacks(cfg, inputs, attacks, deadline)
        curv_info = _curvature_attacks(cfg, inputs, attacks, deadline)
        act_info = _activation_attacks(cfg, inputs, attacks)
        log(f"[audit] weight, gradient, curvature and activation attacks done ({time.perf_counter() - t_start:.0f}s); "
            "seed guessing")
        seed_info = _seed_guessing(cfg, release, attacks, deadline)
        log(f"[audit] seed guessing: {seed_info['tried']} seeds in {seed_info['seconds']:.1f}s, matched "
            f"{seed_info['matched_seed']}")
        results, not_applicable, best = _score(attacks, sample)
        what_if = (norm_jitter_what_if(release, dist, sample, cfg.simulate_norm_jitter)
                   if cfg.simulate_norm_jitter > 0 else None)
        with owner_only():
            recovered = _recovered_mask(release, mask, best, attacks[best][0], out / "recovered_mask")
            report = {
                "format": 1, "release": str(release.path), "private_run": str(Path(cfg.private)),
                "release_dtype": str(release.storage_dtype).replace("torch.", ""), "rho": mask.density(),
                "mask_nnz": mask.nnz, "mask_total": mask.total, "mask_scope": mask.meta.get("scope"),
                "entries_scored": sample.size, "subsampled": sample.size < sample.total,
                "max_seconds": cfg.max_seconds, "init_distribution": summary_by_kind(dist), "gradient": grad_info,
                "curvature": curv_info, "activations": act_info,
                "seed_guess": seed_info, "shadow": shadow_info, "attacks": results, "not_applicable": not_applicable,
                "best_attack": best, "best_global": results[best]["metrics"]["global"], "recovered_mask": recovered,
                "what_if": what_if, "wall_seconds": time.perf_counter() - t_start,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_report(out, report)
    log(f"[audit] best attack {best}: AUROC {report['best_global']['auroc']:.4f}, precision@rho "
        f"{report['best_global']['precision_at_rho']:.4f} (chance {mask.density():.4f}); report in {out}/audit.md "
        f"({report['wall_seconds']:.0f}s)")
    return report


@dataclass
class _Inputs:
    release: Release
    mask: PrivateMask  # the truth, checked against the release
    sample: Sample  # the entries scored
    shadow: PrivateMask | None  # the attacker's shadow run's mask (--shadow), checked against the release
    texts: list[str]  # the attacker's text for the gradient, curvature and activation attacks
    text_info: str


def _inputs(cfg: AuditConfig, log) -> _Inputs:
    """Every input of the audit, loaded and checked before anything is written."""
    release = load_release(cfg.release)
    mask = load_private(cfg.private, release)
    shadow = load_shadow(cfg.shadow, release) if cfg.shadow else None
    texts, text_info = load_attacker_texts(cfg.text, cfg.task, cfg.cache_dir)
    sample = Sample.build(mask.to_bool(), MAX_ENTRIES)
    log(f"[audit] {release.path}: {sample.total:,} masked-scope entries, rho {mask.density():.4f}, "
        f"scoring {sample.size:,}")
    return _Inputs(release, mask, sample, shadow, texts, text_info)


def _timed(attacks: Attacks, name: str, family: str, fn) -> None:
    t0 = time.perf_counter()
    attacks[name] = (fn(), {"family": family, "seconds": time.perf_counter() - t0})


def _weight_attacks(release: Release, dist: dict) -> tuple[Attacks, dict]:
    """The random control and the weight-statistics attacks; also the `init_mixture` fits (the shadow prior)."""
    attacks: Attacks = {}
    g = torch.Generator().manual_seed(0)
    _timed(attacks, "random (control)", "control", lambda: {n: torch.rand(w.shape, generator=g)
                                                            for n, w in release.weights.items()})
    fits: dict = {}
    for name, fn in weight_attacks(release, dist, fits).items():
        _timed(attacks, name, WEIGHT_ATTACK_FAMILIES[name], fn)
    return attacks, fits


def _shadow_attacks(shadow_dir: str, shadow: PrivateMask | None, release: Release, attacks: Attacks,
                    fits: dict) -> dict | None:
    if shadow is None:
        return None
    t0 = time.perf_counter()
    for k, sc in shadow_scores(release, shadow.to_bool(), attacks["init_mixture"][0], fits).items():
        attacks[k] = (sc, {"family": "shadow run", "seconds": time.perf_counter() - t0})
    return {"run": str(shadow_dir), "density": shadow.density(), "sha256": shadow.fingerprint()}


def _gradient_attacks(cfg: AuditConfig, inputs: _Inputs, attacks: Attacks, deadline: float) -> dict:
    """The gradient attacks on the attacker's text, within 30 % of the time left."""
    info: dict = {"skipped": None, "text": inputs.text_info}
    release, texts = inputs.release, inputs.texts
    if not texts:
        info["skipped"] = "no attacker text"
    elif cfg.grad_batches > 0:
        batches = text_batches(release, texts, cfg.grad_batches)
        t0 = time.perf_counter()
        scores, more = gradient_scores(release, batches, max_seconds=max(1.0, 0.3 * (deadline - t0)))
        info.update(more)
        for k, s in scores.items():
            attacks[k] = (s, {"family": "gradient", "seconds": time.perf_counter() - t0})
    return info


def _text_scorer_family(inputs: _Inputs, attacks: Attacks, family: str, n_batches: int, setting: str,
                        score) -> dict:
    """Run one family of scorers that read the release on the attacker's text (`score(batches) -> (scores, info)`)
    on `n_batches` batches, adding its scores to `attacks`; skipped without text or with `setting` = 0."""
    info: dict = {"skipped": None, "text": inputs.text_info}
    if not inputs.texts:
        info["skipped"] = "no attacker text"
    elif n_batches > 0:
        batches = text_batches(inputs.release, inputs.texts, n_batches)
        t0 = time.perf_counter()
        scores, more = score(batches)
        info.update(more, seconds=time.perf_counter() - t0)
        for k, s in scores.items():
            attacks[k] = (s, {"family": family, "seconds": info["seconds"]})
    else:
        info["skipped"] = f"{setting} = 0"
    return info


def _curvature_attacks(cfg: AuditConfig, inputs: _Inputs, attacks: Attacks, deadline: float) -> dict:
    """The Hutchinson curvature attacks on the attacker's text, within 30 % of the time left (at least one probe)."""
    def score(batches):
        return curvature_scores(inputs.release, batches, cfg.curvature_probes, cfg.curvature_fd_eps,
                                max_seconds=max(1.0, 0.3 * (deadline - time.perf_counter())))

    return _text_scorer_family(inputs, attacks, "curvature", cfg.curvature_batches, "curvature_batches", score)


def _activation_attacks(cfg: AuditConfig, inputs: _Inputs, attacks: Attacks) -> dict:
    """The activation-statistics attacks on the attacker's text (forward passes only)."""
    return _text_scorer_family(inputs, attacks, "activations", cfg.activation_batches, "activation_batches",
                               lambda batches: activation_scores(inputs.release, batches))


def _seed_guessing(cfg: AuditConfig, release: Release, attacks: Attacks, deadline: float) -> dict:
    """Seed guessing in the time left, less a reserve for scoring and writing."""
    t0 = time.perf_counter()
    budget = max(1.0, deadline - t0 - max(20.0, 0.1 * cfg.max_seconds))
    scores, info = seed_guess(release, max_seed=cfg.max_seed, max_seconds=budget)
    if scores is not None:
        attacks["seed_guess"] = (scores, {"family": "seed guessing", "seconds": time.perf_counter() - t0})
    return info


def _score(attacks: Attacks, sample: Sample) -> tuple[dict, dict, str]:
    """Every attack's metrics; the best attack = the highest global AUROC among those covering every entry."""
    results, not_applicable = {}, {}
    for name, (scores, meta) in attacks.items():
        metrics = evaluate(scores, sample)
        if "global" not in metrics:  # e.g. the norm tell when norms are outside the mask's scope
            not_applicable[name] = "has no opinion on any entry of the masked scope"
            continue
        results[name] = {**meta, "metrics": metrics}
    full = [n for n, r in results.items() if r["family"] != "control"
            and abs(r["metrics"]["global"]["coverage"] - 1.0) < 1e-9]
    best = max(full, key=lambda n: results[n]["metrics"]["global"]["auroc"])
    return results, not_applicable, best


def _recovered_mask(release: Release, mask: PrivateMask, best: str, scores: Scores, where: Path) -> dict:
    """The best attack's global top-rho mask, saved to `where`; its precision and recall against the truth."""
    rec = recovered_mask(release, {n: s for n, s in scores.items() if n in mask.layouts}, mask.density(),
                         {"attack": best, "release": str(release.path)})
    rec.save(where)
    where.chmod(0o700)  # an earlier audit's directory may predate owner-only output
    hit = rec.overlap(mask)
    return {"attack": best, "path": str(where), "density": rec.density(), "precision": hit / max(rec.nnz, 1),
            "recall": hit / max(mask.nnz, 1), "sha256": rec.fingerprint()}
