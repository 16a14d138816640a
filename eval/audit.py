"""`pmp audit`: score the mask-recovery attacks of `pmp.eval.mask_recovery` against the TRUE private mask.

AUROC (rank-based, ties averaged: 0.5 = chance, 1 = the mask is read off exactly) and precision@rho (the share of
truly masked entries among the top rho*N scores, rho = the true density, so chance = rho), globally and per tensor
type. Only this module reads the private run; the attacks never do.

Output (a results dir, default RUN/audit -- it describes the private mask, so it stays private):
  audit.json       every number, per attack / tensor type, seed-guessing details, timings
  audit.md         the same as Markdown tables, the best attack, and the what-if of a proposed fix
  recovered_mask/  the best attack's global top-rho mask as a PrivateMask bundle (for a sparse fine-tuning attack)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pmp.atomic import write_json, write_text
from pmp.eval import mask_recovery as R

GROUPS = ("embeddings", "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp", "norms", "lm_head", "biases",
          "other")
MAX_ENTRIES = 2_000_000  # AUROC / precision on a uniform fixed-seed subsample above this many entries
WEIGHT_ATTACKS = ("magnitude", "zscore", "init_nll", "init_mixture", "structural")


def tensor_type(name: str) -> str:
    n = name.lower()
    if "lm_head" in n:
        return "lm_head"
    if "embed" in n or n.endswith(("wte.weight", "wpe.weight")):
        return "embeddings"
    if "norm" in n or ".ln_" in n or "ln_f" in n:
        return "norms"
    if n.endswith(".bias"):
        return "biases"
    for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if k in n:
            return f"attn_{k[0]}"
    if "c_attn" in n:
        return "attn_qkv"
    if "attn.c_proj" in n:
        return "attn_o"
    if "mlp" in n:
        return "mlp"
    return "other"


# ---------------------------------------------------------------------------------------------- metrics
def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney U from
    average ranks). NaN when one class is empty."""
    s, y = scores.flatten().double(), labels.flatten().bool()
    if s.numel() != y.numel():
        raise ValueError(f"auroc: {s.numel()} scores but {y.numel()} labels")
    if torch.isnan(s).any():
        raise ValueError("auroc: scores contain NaN")
    n1 = int(y.sum())
    n0 = y.numel() - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = torch.argsort(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based average ranks in sorted order
    r_pos = float(ranks[y[order]].sum())
    return (r_pos - n1 * (n1 + 1) / 2) / (n1 * n0)


def precision_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of positives among the k highest scores; entries tied at the threshold count by their expected
    share (so a constant score gives the base rate, whatever the order)."""
    s, y = scores.flatten().double(), labels.flatten().bool()
    if not 0 < k <= s.numel():
        raise ValueError(f"precision_at_k: k must be in [1, {s.numel()}], got {k}")
    thr = torch.topk(s, k, sorted=False).values.min()
    above, tied = s > thr, s == thr
    n_above = int(above.sum())
    take = k - n_above
    pos = float(y[above].sum()) + take * float(y[tied].sum()) / int(tied.sum())
    return pos / k


# ---------------------------------------------------------------------------------------------- inputs
def load_private(private: str | Path, release: R.Release):
    """The private run's mask, checked against the release; clear errors for every wrong input."""
    from pmp.mask import PrivateMask

    p = Path(private)
    if not p.exists():
        raise FileNotFoundError(f"--private {p} does not exist: pass the private run directory (the --out of "
                                "`pmp pretrain`)")
    if (p / "config.json").is_file() and not (p / "run.json").is_file():
        raise ValueError(f"--private {p} is a release (a model directory), not a private run directory: the audit "
                         "needs the owner's run dir with private/mask.* (the parent of final/) as ground truth")
    if not (p / "private").is_dir():
        raise FileNotFoundError(f"--private {p} has no private/ directory: pass the private run directory (the "
                                "--out of `pmp pretrain`)")
    if not (p / "private" / "mask.json").is_file():
        raise ValueError(f"--private {p} has no mask (private/mask.json): only method=pmp runs have one; a dense run "
                         "has nothing to audit")
    mask = PrivateMask.load(p / "private")
    try:
        mask.check_matches(release.model)
    except ValueError as e:
        raise ValueError(f"the release {release.path} does not match the private run {p}: {e}") from None
    init = p / "private" / "init.safetensors"
    if init.is_file():
        from safetensors import safe_open

        same = total = 0
        with safe_open(str(init), "pt") as f:
            for n, lay in mask.layouts.items():
                if n not in f.keys():
                    continue
                keep = ~lay.to_bool()
                w0 = R._rounded(f.get_tensor(n).float(), release.storage_dtype)
                same += int((release.weights[n][keep] == w0[keep]).sum())
                total += int(keep.sum())
        if total and same / total < 0.999:
            raise ValueError(f"the release {release.path} does not belong to the private run {p}: only "
                             f"{same / total:.1%} of the mask's complement equals the run's initial weights (a PMP "
                             "release keeps 100%)")
    return mask


def load_shadow(shadow: str | Path, release: R.Release):
    """The attacker's own PMP run (trained with the public code and data): its mask is public to the attacker."""
    from pmp.mask import PrivateMask

    p = Path(shadow)
    d = p / "private" if (p / "private" / "mask.json").is_file() else p
    if not (d / "mask.json").is_file():
        raise FileNotFoundError(f"--shadow {p} holds no mask (private/mask.json): pass a PMP run dir the attacker "
                                "trained with `pmp pretrain` (same architecture and tokenizer as the release)")
    mask = PrivateMask.load(d)
    try:
        mask.check_matches(release.model)
    except ValueError as e:
        raise ValueError(f"--shadow {p}: the shadow run has another architecture than the release: {e}") from None
    return mask


@dataclass
class Sample:
    """Entries scored: per tensor all of them, or a uniform fixed-seed subsample when the model is large."""
    idx: dict[str, torch.Tensor | None]
    labels: dict[str, torch.Tensor]
    total: int

    @classmethod
    def build(cls, masks: dict[str, torch.Tensor], max_entries: int = MAX_ENTRIES, seed: int = 0) -> Sample:
        total = sum(m.numel() for m in masks.values())
        frac = min(1.0, max_entries / max(total, 1))
        g = torch.Generator().manual_seed(seed)
        idx, labels = {}, {}
        for n, m in masks.items():
            flat = m.flatten()
            if frac >= 1.0:
                idx[n], labels[n] = None, flat
            else:
                i = torch.randperm(flat.numel(), generator=g)[: max(1, round(flat.numel() * frac))]
                idx[n], labels[n] = i, flat[i]
        return cls(idx, labels, total)

    def take(self, name: str, t: torch.Tensor) -> torch.Tensor:
        f = t.flatten()
        return f if self.idx[name] is None else f[self.idx[name]]

    @property
    def size(self) -> int:
        return sum(v.numel() for v in self.labels.values())


def evaluate(scores: R.Scores, sample: Sample) -> dict:
    """AUROC and precision@rho of one attack, globally and per tensor type, on the covered entries."""
    by_group: dict[str, tuple[list, list]] = {}
    for n, y in sample.labels.items():
        if n not in scores:
            continue
        s = sample.take(n, scores[n].detach().float())
        ok = ~torch.isnan(s)  # NaN = the attack has no opinion on this entry
        if not bool(ok.all()):
            s, y = s[ok], y[ok]
        if not s.numel():
            continue
        for g in ("global", tensor_type(n)):
            by_group.setdefault(g, ([], []))[0].append(s)
            by_group[g][1].append(y)
    out = {}
    for g, (ss, ys) in by_group.items():
        s, y = torch.cat(ss), torch.cat(ys)
        rho = float(y.float().mean())
        k = round(rho * y.numel())
        out[g] = {"auroc": auroc(s, y), "precision_at_rho": precision_at_k(s, y, k) if k else float("nan"),
                  "rho": rho, "entries": y.numel(), "coverage": y.numel() / sample.size if g == "global" else None}
    return out


# ---------------------------------------------------------------------------------------------- the audit
def _norm_jitter_release(release: R.Release, dist: dict[str, R.InitDist], sigma: float,
                         seed: int = 12345) -> R.Release:
    """What-if of the proposed fix: every all-constant-init tensor (norm weights) starts at const + N(0, sigma^2)
    from a secret generator; trained entries keep their learned offset (an approximation: a real run with the
    jittered init would follow a slightly different trajectory)."""
    g = torch.Generator().manual_seed(seed)
    w2 = {}
    for n, w in release.weights.items():
        if dist[n].all_const:
            w = w + sigma * torch.randn(w.shape, generator=g)
        w2[n] = w
    return R.Release(release.path, release.config, release.model, w2, release.storage_dtype)


def run_audit(release_dir: str | Path, private_dir: str | Path, out: str | Path | None = None, text_file: str = "",
              task: str = "", cache_dir: str = "", max_seconds: float = 600.0, max_seed: int = 1000,
              grad_batches: int = 8, max_entries: int = MAX_ENTRIES, simulate_norm_jitter: float = 0.0,
              shadow_dir: str | Path | None = None, log=print) -> dict:
    t_start = time.perf_counter()

    def left() -> float:
        return max_seconds - (time.perf_counter() - t_start)

    release = R.load_release(release_dir)
    mask = load_private(private_dir, release)
    out = Path(out) if out else Path(private_dir) / "audit"
    truth = mask.to_bool()
    rho = mask.density()
    sample = Sample.build(truth, max_entries)
    log(f"[audit] {release.path}: {sample.total:,} masked-scope entries, rho {rho:.4f}, scoring {sample.size:,}")
    dist = R.init_distribution(release)
    attacks: dict[str, tuple[R.Scores, dict]] = {}

    def timed(name: str, family: str, fn) -> None:
        t0 = time.perf_counter()
        attacks[name] = (fn(), {"family": family, "seconds": time.perf_counter() - t0})

    g = torch.Generator().manual_seed(0)
    timed("random (control)", "control", lambda: {n: torch.rand(w.shape, generator=g)
                                                  for n, w in release.weights.items()})
    timed("magnitude", "weights", lambda: R.magnitude(release))
    timed("zscore", "weights", lambda: R.zscore(release))
    timed("init_nll", "init distribution", lambda: R.init_nll(release, dist))
    fits: dict = {}
    timed("init_mixture", "init distribution", lambda: R.init_mixture(release, dist, fits=fits))
    timed("structural", "structural tells", lambda: R.structural(release, dist))
    shadow_info = None
    if shadow_dir:
        shadow = load_shadow(shadow_dir, release)
        shadow_info = {"run": str(shadow_dir), "density": shadow.density(), "sha256": shadow.fingerprint()}
        t0 = time.perf_counter()
        for k, sc in R.shadow_scores(release, shadow.to_bool(), attacks["init_mixture"][0], fits).items():
            attacks[k] = (sc, {"family": "shadow run", "seconds": time.perf_counter() - t0})
    grad_info: dict = {"skipped": None}
    texts, source = R.load_attacker_texts(text_file, task, cache_dir)
    grad_info["text"] = source
    if not texts:
        grad_info["skipped"] = "no attacker text"
    elif grad_batches > 0:
        batches = R.text_batches(release, texts, grad_batches)
        t0 = time.perf_counter()
        gs, info = R.gradient_scores(release, batches, max_seconds=max(1.0, 0.3 * left()))
        grad_info.update(info)
        for k, s in gs.items():
            attacks[k] = (s, {"family": "gradient", "seconds": time.perf_counter() - t0})
    log(f"[audit] weight and gradient attacks done ({time.perf_counter() - t_start:.0f}s); seed guessing")
    seed_budget = max(1.0, left() - max(20.0, 0.1 * max_seconds))
    t0 = time.perf_counter()
    seed_scores, seed_info = R.seed_guess(release, max_seed=max_seed, max_seconds=seed_budget)
    if seed_scores is not None:
        attacks["seed_guess"] = (seed_scores, {"family": "seed guessing", "seconds": time.perf_counter() - t0})
    log(f"[audit] seed guessing: {seed_info['tried']} seeds in {seed_info['seconds']:.1f}s, matched "
        f"{seed_info['matched_seed']}")

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
    rec = R.recovered_mask(release, {n: s for n, s in attacks[best][0].items() if n in truth}, rho,
                           {"attack": best, "release": str(release.path)})
    rec_dir = out / "recovered_mask"
    rec.save(rec_dir)
    tp = sum(int((rec.layouts[n].to_bool() & truth[n]).sum()) for n in truth)
    recovered = {"attack": best, "path": str(rec_dir), "density": rec.density(), "precision": tp / max(rec.nnz, 1),
                 "recall": tp / max(mask.nnz, 1), "sha256": rec.fingerprint()}

    what_if = None
    if simulate_norm_jitter > 0:
        sim = _norm_jitter_release(release, dist, simulate_norm_jitter)
        sim_dist = R.init_distribution(release, norm_jitter=simulate_norm_jitter)
        fns = {"magnitude": lambda: R.magnitude(sim), "zscore": lambda: R.zscore(sim),
               "init_nll": lambda: R.init_nll(sim, sim_dist), "init_mixture": lambda: R.init_mixture(sim, sim_dist),
               "structural": lambda: R.structural(sim, sim_dist)}
        what_if = {"change": f"norm weights initialised at 1 + N(0, {simulate_norm_jitter}^2) from the secret seed",
                   "sigma": simulate_norm_jitter, "attacks": {}}
        for name, fn in fns.items():
            s = fn()
            if s:
                what_if["attacks"][name] = evaluate(s, sample)

    report = {
        "format": 1, "release": str(release.path), "private_run": str(Path(private_dir)),
        "release_dtype": str(release.storage_dtype).replace("torch.", ""), "rho": rho, "mask_nnz": mask.nnz,
        "mask_total": mask.total, "mask_scope": mask.meta.get("scope"), "entries_scored": sample.size,
        "subsampled": sample.size < sample.total, "max_seconds": max_seconds,
        "init_distribution": _dist_summary(dist), "gradient": grad_info, "seed_guess": seed_info,
        "shadow": shadow_info,
        "attacks": results, "not_applicable": not_applicable, "best_attack": best,
        "best_global": results[best]["metrics"]["global"],
        "recovered_mask": recovered, "what_if": what_if, "wall_seconds": time.perf_counter() - t_start,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "audit.json", _finite(report))
    write_text(out / "audit.md", to_markdown(report))
    log(f"[audit] best attack {best}: AUROC {report['best_global']['auroc']:.4f}, precision@rho "
        f"{report['best_global']['precision_at_rho']:.4f} (chance {rho:.4f}); report in {out}/audit.md "
        f"({report['wall_seconds']:.0f}s)")
    return report


def _dist_summary(dist: dict[str, R.InitDist]) -> dict:
    out = {}
    for n, d in dist.items():
        g = tensor_type(n)
        c = int(d.const_mask.sum())
        kind = "constant" if d.all_const else ("normal" if not c else "normal + constant entries")
        e = out.setdefault(g, {"kind": set(), "std": set(), "constants": set(), "constant_entries": 0})
        e["kind"].add(kind)
        if d.std and not d.all_const:
            e["std"].add(round(d.std, 4))
        if c:
            e["constants"].update(float(v) for v in d.const_value[d.const_mask].unique()[:4])
            e["constant_entries"] += c
    return {g: {k: sorted(v) if isinstance(v, set) else v for k, v in e.items()} for g, e in out.items()}


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- report
def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def to_markdown(r: dict) -> str:
    rho = r["rho"]
    b = r["best_global"]
    lines = [
        "# Mask secrecy audit", "",
        f"- release: `{r['release']}` ({r['release_dtype']}); private run: `{r['private_run']}`",
        f"- mask: {r['mask_nnz']:,} of {r['mask_total']:,} entries (rho {rho:.4f}, scope {r['mask_scope']}); "
        f"scored {r['entries_scored']:,} entries{' (uniform subsample)' if r['subsampled'] else ''}",
        f"- chance: AUROC 0.5, precision@rho = rho = {rho:.3f}; wall time {r['wall_seconds']:.0f}s "
        f"(budget {r['max_seconds']:.0f}s)", "",
        f"**Best attack: `{r['best_attack']}`: AUROC {_f(b['auroc'], 4)}, precision@rho {_f(b['precision_at_rho'], 4)}"
        f"** (a perfect attacker: 1.0 / 1.0).", "",
        "## Global", "",
        "| attack | family | coverage | AUROC | precision@rho | lift (precision / rho) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in r["attacks"].items():
        m = a["metrics"]["global"]
        lift = m["precision_at_rho"] / m["rho"] if m["rho"] else float("nan")
        lines.append(f"| {name} | {a['family']} | {m['coverage']:.3f} | {_f(m['auroc'], 4)} | "
                     f"{_f(m['precision_at_rho'], 4)} | {_f(lift, 2)} | {a['seconds']:.1f} |")
    for name, why in r.get("not_applicable", {}).items():
        lines.append(f"| {name} | not applicable | 0 | - | - | - | - |  <!-- {why} -->")
    groups = [g for g in GROUPS if any(g in a["metrics"] for a in r["attacks"].values())]
    lines += ["", "## Per tensor type: AUROC / precision@rho (rho of the type in brackets)", "",
              "| attack | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    rhos = {}
    for a in r["attacks"].values():
        for g in groups:
            if g in a["metrics"]:
                rhos[g] = a["metrics"][g]["rho"]
    lines.append("| (rho) | " + " | ".join(f"({_f(rhos.get(g), 3)})" for g in groups) + " |")
    for name, a in r["attacks"].items():
        cells = []
        for g in groups:
            m = a["metrics"].get(g)
            cells.append("-" if m is None else f"{_f(m['auroc'])} / {_f(m['precision_at_rho'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    best_cells = []
    for g in groups:
        cand = [(a["metrics"][g]["auroc"], n) for n, a in r["attacks"].items() if a["family"] != "control"
                and g in a["metrics"] and a["metrics"][g]["auroc"] is not None
                and not math.isnan(a["metrics"][g]["auroc"])]
        best_cells.append(f"{max(cand)[1]} ({_f(max(cand)[0])})" if cand else "-")
    lines.append("| **best** | " + " | ".join(best_cells) + " |")
    lines += ["", "An attacker can pick the attack per tensor type on a shadow PMP run of its own (where it knows the "
              "mask), so the **best** row is within reach, not only an oracle."]
    s = r["seed_guess"]
    lines += ["", "## Seed guessing", "",
              f"- fingerprint: first {s['fingerprint_entries']} entries of `{s['fingerprint_tensor']}` "
              f"({s['method']}); tried {s['tried']} of {s['candidates']} candidate seeds in {s['seconds']:.1f}s "
              f"({_f(s.get('seeds_per_second'), 1)} seeds/s); public seeds in the release: "
              f"{s['public_seeds'] or 'none'}",
              f"- matched seed: **{s['matched_seed']}**" + (f" ({s.get('entries_equal_to_init', 0):,} entries equal "
                                                            "the regenerated init)" if s["matched_seed"] is not None
                                                            else ""),
              f"- {s['note']}; at this rate the whole seed space (2^{s['effective_seed_bits']}) takes "
              f"{_f(s.get('cpu_days_for_whole_seed_space_at_this_rate'), 0)} CPU-days on this machine's fingerprint "
              "code (one process, no GPU; a dedicated mt19937 implementation would be far faster)"]
    if s.get("stopped"):
        lines.append(f"- stopped early: {s['stopped']}")
    if r.get("shadow"):
        sh = r["shadow"]
        lines += ["", "## Shadow run", "", f"- the attacker's own PMP run `{sh['run']}` (its mask density "
                  f"{sh['density']:.4f}) gives the `shadow run` attacks"]
    gi = r["gradient"]
    lines += ["", "## Gradient attacks", "",
              f"- text: {gi.get('text')}; " + (f"skipped: {gi['skipped']}" if gi.get("skipped") else
                                               f"{gi.get('batches')} batches, {gi.get('tokens'):,} tokens, "
                                               f"{gi.get('seconds', 0):.1f}s")]
    lines += ["", "## Init distribution (measured from builds at seeds 0, 1 and 2)", "",
              "| tensor type | kind | std of random entries | constants | constant entries |", "|---|---|---|---|---|"]
    for g, d in r["init_distribution"].items():
        lines.append(f"| {g} | {', '.join(d['kind'])} | {d['std'] or '-'} | {d['constants'] or '-'} | "
                     f"{d['constant_entries']:,} |")
    rec = r["recovered_mask"]
    lines += ["", "## Recovered mask", "",
              f"`{rec['path']}`: global top-rho of `{rec['attack']}` (density {rec['density']:.4f}): precision "
              f"{rec['precision']:.4f}, recall {rec['recall']:.4f}. Fine-tune exactly these entries to test whether "
              "the recovery defeats the protection (see the README, `pmp audit`)."]
    w = r.get("what_if")
    if w:
        lines += ["", f"## What-if: {w['change']}", "",
                  "Simulated on a copy of the release (the learned offsets of trained entries are kept). "
                  "Before -> after:",
                  "", "| attack | global AUROC | norms AUROC | norms precision@rho |", "|---|---|---|---|"]
        for name, m in w["attacks"].items():
            before = r["attacks"].get(name, {}).get("metrics", {})
            bg, bn, an = before.get("global", {}), before.get("norms", {}), m.get("norms", {})
            lines.append(f"| {name} | {_f(bg.get('auroc'))} -> {_f(m['global']['auroc'])} | "
                         f"{_f(bn.get('auroc'))} -> {_f(an.get('auroc'))} | "
                         f"{_f(bn.get('precision_at_rho'))} -> {_f(an.get('precision_at_rho'))} |")
    return "\n".join(lines) + "\n"


def load_report(out: str | Path) -> dict:
    return json.loads((Path(out) / "audit.json").read_text())
