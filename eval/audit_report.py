"""The audit's report files in its results directory:
  audit.json       every number, per attack / tensor type, seed-guessing details, timings
  audit.md         the same as Markdown tables, the best attack, and the what-if of a proposed fix
They describe the private mask, so they stay private (the default directory is RUN/audit).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pmp.atomic import write_json, write_text
from pmp.mask import TENSOR_KINDS


def write_report(out: Path, report: dict) -> None:
    """audit.json (non-finite numbers as null) and audit.md into `out`, atomically each."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "audit.json", _finite(report))
    write_text(out / "audit.md", to_markdown(report))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def to_markdown(r: dict) -> str:
    """audit.md: the report `r` (the content of audit.json) as Markdown, one section after another."""
    sections = (_summary, _global_table, _kind_table, _seed_guessing, _shadow_run, _gradient_attacks,
                _curvature_attacks, _activation_attacks, _init_distribution, _recovered_mask, _what_if)
    return "\n".join(line for section in sections for line in section(r)) + "\n"


def _summary(r: dict) -> list[str]:
    rho, b = r["rho"], r["best_global"]
    return [
        "# Mask secrecy audit", "",
        f"- release: `{r['release']}` ({r['release_dtype']}); private run: `{r['private_run']}`",
        f"- mask: {r['mask_nnz']:,} of {r['mask_total']:,} entries (rho {rho:.4f}, scope {r['mask_scope']}); "
        f"scored {r['entries_scored']:,} entries{' (uniform subsample)' if r['subsampled'] else ''}",
        f"- chance: AUROC 0.5, precision@rho = rho = {rho:.3f}; wall time {r['wall_seconds']:.0f}s "
        f"(budget {r['max_seconds']:.0f}s)", "",
        f"**Best attack: `{r['best_attack']}`: AUROC {_f(b['auroc'], 4)}, precision@rho {_f(b['precision_at_rho'], 4)}"
        f"** (a perfect attacker: 1.0 / 1.0).", "",
    ]


def _global_table(r: dict) -> list[str]:
    lines = ["## Global", "",
             "| attack | family | coverage | AUROC | precision@rho | lift (precision / rho) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, a in r["attacks"].items():
        m = a["metrics"]["global"]
        lift = m["precision_at_rho"] / m["rho"] if m["rho"] else float("nan")
        lines.append(f"| {name} | {a['family']} | {m['coverage']:.3f} | {_f(m['auroc'], 4)} | "
                     f"{_f(m['precision_at_rho'], 4)} | {_f(lift, 2)} | {a['seconds']:.1f} |")
    for name, why in r.get("not_applicable", {}).items():
        lines.append(f"| {name} | not applicable | 0 | - | - | - | - |  <!-- {why} -->")
    return lines


def _kind_table(r: dict) -> list[str]:
    groups = [g for g in TENSOR_KINDS if any(g in a["metrics"] for a in r["attacks"].values())]
    lines = ["", "## Per tensor type: AUROC / precision@rho (rho of the type in brackets)", "",
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
    return lines + ["", "An attacker can pick the attack per tensor type on a shadow PMP run of its own (where it "
                    "knows the mask), so the **best** row is within reach, not only an oracle."]


def _seed_guessing(r: dict) -> list[str]:
    s = r["seed_guess"]
    lines = ["", "## Seed guessing", "",
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
    return lines


def _shadow_run(r: dict) -> list[str]:
    sh = r.get("shadow")
    if not sh:
        return []
    return ["", "## Shadow run", "", f"- the attacker's own PMP run `{sh['run']}` (its mask density "
            f"{sh['density']:.4f}) gives the `shadow run` attacks"]


def _gradient_attacks(r: dict) -> list[str]:
    gi = r["gradient"]
    return ["", "## Gradient attacks", "",
            f"- text: {gi.get('text')}; " + (f"skipped: {gi['skipped']}" if gi.get("skipped") else
                                             f"{gi.get('batches')} batches, {gi.get('tokens'):,} tokens, "
                                             f"{gi.get('seconds', 0):.1f}s")]


def _curvature_attacks(r: dict) -> list[str]:
    ci = r.get("curvature")  # absent from reports written before the curvature attacks existed
    if not ci:
        return []
    if ci.get("skipped"):
        return ["", "## Curvature attacks (Hutchinson Hessian diagonal)", "", f"- skipped: {ci['skipped']}"]
    fd = f", finite differences at eps {ci['fd_eps']:g}" if ci.get("fd_eps") else ""
    return ["", "## Curvature attacks (Hutchinson Hessian diagonal)", "",
            f"- text: {ci.get('text')}; {ci['batches']} batches, {ci['tokens']:,} tokens, {ci['probes']} Rademacher "
            f"probes in all ({ci['probes_per_batch']} a batch asked){fd}, {ci['seconds']:.1f}s; a Hutchinson "
            "entry's noise is sqrt(sum_j!=i H_ij^2 / probes), so few probes read only diagonal-dominant entries"]


def _activation_attacks(r: dict) -> list[str]:
    ai = r.get("activations")
    if not ai:
        return []
    return ["", "## Activation-statistics attacks", "",
            f"- text: {ai.get('text')}; " + (f"skipped: {ai['skipped']}" if ai.get("skipped") else
                                             f"{ai['batches']} batches, {ai['tokens']:,} tokens, {ai['layers']} "
                                             f"layers hooked, {ai['seconds']:.1f}s")]


def _init_distribution(r: dict) -> list[str]:
    lines = ["", "## Init distribution (measured from builds at seeds 0, 1 and 2)", "",
             "| tensor type | kind | std of random entries | constants | constant entries |", "|---|---|---|---|---|"]
    for g, d in r["init_distribution"].items():
        lines.append(f"| {g} | {', '.join(d['kind'])} | {d['std'] or '-'} | {d['constants'] or '-'} | "
                     f"{d['constant_entries']:,} |")
    return lines


def _recovered_mask(r: dict) -> list[str]:
    rec = r["recovered_mask"]
    return ["", "## Recovered mask", "",
            f"`{rec['path']}`: global top-rho of `{rec['attack']}` (density {rec['density']:.4f}): precision "
            f"{rec['precision']:.4f}, recall {rec['recall']:.4f}. Fine-tune exactly these entries to test whether "
            "the recovery defeats the protection (see the README, `pmp audit`)."]


def _what_if(r: dict) -> list[str]:
    w = r.get("what_if")
    if not w:
        return []
    lines = ["", f"## What-if: {w['change']}", "",
             "Simulated on a copy of the release (the learned offsets of trained entries are kept). Before -> after:",
             "", "| attack | global AUROC | norms AUROC | norms precision@rho |", "|---|---|---|---|"]
    for name, m in w["attacks"].items():
        before = r["attacks"].get(name, {}).get("metrics", {})
        bg, bn, an = before.get("global", {}), before.get("norms", {}), m.get("norms", {})
        lines.append(f"| {name} | {_f(bg.get('auroc'))} -> {_f(m['global']['auroc'])} | "
                     f"{_f(bn.get('auroc'))} -> {_f(an.get('auroc'))} | "
                     f"{_f(bn.get('precision_at_rho'))} -> {_f(an.get('precision_at_rho'))} |")
    return lines


def load_report(out: str | Path) -> dict:
    """The audit.json an audit wrote into `out`."""
    return json.loads((Path(out) / "audit.json").read_text())
