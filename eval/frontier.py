"""The protection frontier of a study (`pmp study`): what each PMP variant costs in base quality against what it
buys in resistance to fine-tuning, as arithmetic on run statuses, attack cells and audit reports (no I/O here;
eval/frontier_report.py writes frontier.md / .png / .json).

One point per (variant, pre-training seed), compared with the dense run of the SAME seed (same batches, same
budget):
- x = held-out perplexity cost = ppl(variant) / ppl(dense) - 1 (0 = no cost; 0.10 = 10 % worse perplexity).
- y, per task = best-attack gain ratio: the mean gain of the variant's best unauthorized attack / the mean gain of
  the dense model's best attack, each best chosen on the attacker's own VALIDATION metric (eval/metrics.py
  `best_attack`), at the suite's budget; with a percentile bootstrap interval over the fine-tuning seeds
  (`bootstrap_ratio`, paired by seed). A task counts only where it is VALID for that seed (the dense model's best
  attack beats the from-scratch model's); other tasks are shown and flagged, never plotted as frontier points,
  never used by the kill rule.
- beside it: the owner's authorized recovery (`authorized_recovery`), the audit's best AUROC (mask recovery
  from the release; 0.5 = chance) and the D0 diagnostic of the release (eval/d0.py `headline`: unmasked vs the
  owner's masked update at the attacker's best learning rate, dense / owner sharpness ratio, verdict), which names
  the cause of any protection; the dense release's D0 with the first variant's mask is the control.
Kill criterion (`kill_above`, from the study file), see KILL_RULE.
Frontier, per valid task: the variants' mean (x, y) over the seeds where the task is valid, with dense at (0, 1);
the frontier is the points no other point beats on both axes (lower cost and lower ratio).

Screen and confirmation (CONFIRM_RULE): every point has a `stage`. `screen` points come from the study's attack
suite; a variant that survives the screen at a seed (`survivors`) is attacked again with a stronger suite, and its
`confirm` point of that seed then replaces the screen point in the verdicts and frontiers (`counted`): a protection
claim rests on the strongest attacker run, a kill under the screen stands (a stronger attacker is not needed to
show that protection is absent, though its dense baseline could gain more -- the note says so).
"""

from __future__ import annotations

import math

from pmp.eval import metrics as M
from pmp.eval.d0 import headline

BASELINE = "dense"  # the reference model's name in a study's attack results
SCREEN, CONFIRM = "screen", "confirm"  # the stages a point comes from (the study's attack suite; the stronger one)

KILL_RULE = (
    "a point (variant, seed, valid task) is *killed* when the lower end of its bootstrap interval of the best-attack "
    "gain ratio is above kill_above (with fewer than 2 fine-tuning seeds there is no interval: the ratio itself is "
    "compared, and the row says so). A task kills a variant when every seed where the task is valid kills it; a "
    "variant is **killed** when any valid task kills it (an attacker picks the task), **mixed** when some seed kills "
    "it on a task and another does not, **alive** when no point is killed, and **no valid task** when no point "
    "counts.")

CONFIRM_RULE = (
    "a variant *survives the screen* at a seed when at least one task is valid for it there and no valid task kills "
    "it; a survivor is attacked again with the confirmation suite (next to dense and from scratch, on the tasks "
    "valid at the screen) and that seed's verdict is read from the confirmation alone. A variant killed by the "
    "screen is not confirmed: its verdict names the screen suite.")


def ppl_cost(ppl: float, dense_ppl: float) -> float:
    """Held-out perplexity cost of a variant against the dense run of the same seed: ppl / dense_ppl - 1."""
    if not (ppl > 0 and dense_ppl > 0 and math.isfinite(ppl) and math.isfinite(dense_ppl)):
        raise ValueError(f"held-out perplexities must be finite and > 0, got {ppl} and dense {dense_ppl}")
    return ppl / dense_ppl - 1.0


def point_kill(ratio: float | None, lo: float | None, kill_above: float) -> tuple[bool | None, str]:
    """(killed?, basis) of one point: the CI's lower end against kill_above, else the ratio (no interval)."""
    if ratio is None:
        return None, "no ratio (the dense gain is <= 0)"
    if lo is not None:
        return lo > kill_above, "CI lower end"
    return ratio > kill_above, "ratio (no CI: < 2 fine-tuning seeds)"


def task_point(agg: dict, role_of: dict[str, str], variant: str, task: str, kill_above: float,
               n_boot: int = 2000, boot_seed: int = 0) -> dict:
    """The y of one (variant, task) in one seed's attack results: validity, best attacks, gain ratio + bootstrap
    interval, authorized recovery and the point's kill test."""
    v = M.validity(agg, role_of, task)
    bv, bd = M.best_attack(agg, variant, task), M.best_attack(agg, BASELINE, task)
    out = {"valid": v["valid"], "validity_why": v["why"], "best_attack": bv["attack"] if bv else None,
           "dense_best_attack": bd["attack"] if bd else None, "gain": bv["gain"]["mean"] if bv else None,
           "dense_gain": bd["gain"]["mean"] if bd else None, "ratio": None, "lo": None, "hi": None,
           "level": None, "n_ft_seeds": 0, "undefined_share": None}
    if bv and bd:
        b = M.bootstrap_ratio(bv["gain_by_seed"], bd["gain_by_seed"], n_boot=n_boot, seed=boot_seed)
        out.update(ratio=b["ratio"], lo=b["lo"], hi=b["hi"], level=b["level"], n_ft_seeds=b["n"],
                   undefined_share=b["undefined"])
    ar = M.authorized_recovery(agg, variant, BASELINE, task)
    out["authorized_recovery"], out["authorized_why"] = ar["recovery"], ar["why"]
    out["killed"], out["kill_basis"] = point_kill(out["ratio"], out["lo"], kill_above)
    return out


def d0_summary(rec: dict | None) -> dict | None:
    """One release's D0 as the frontier shows it: None (D0 off), {'model', 'skipped': why}, or `d0.headline`."""
    if rec is None:
        return None
    return {"model": rec["model"], "skipped": rec["skipped"]} if "skipped" in rec else headline(rec)


def d0_control(d0: dict[str, dict] | None, seed: int) -> dict | None:
    """The dense release's D0 of a seed (with the first variant's mask: the control), or None when D0 is off."""
    if d0 is None:
        return None
    return {"seed": seed, **d0_summary(d0.get(BASELINE, {"model": BASELINE, "skipped": "not run yet"}))}


def seed_points(cells: list[dict], variants: list[str], ppl: dict[str, float], audits: dict[str, dict | None],
                seed: int, kill_above: float, d0: dict[str, dict] | None = None, stage: str = SCREEN) -> list[dict]:
    """The points of one pre-training seed: its attack cells (every variant, `dense` and the from-scratch
    reference), the held-out perplexity of each run ({name: ppl}, `dense` included), each variant's audit
    report (audit.json content, or None when not audited) and D0 records ({name: eval/d0_run.py record or
    {'model': name, 'skipped': why}}; None = D0 off). `stage`: SCREEN (the study's suite) or CONFIRM."""
    cells = M.classic_cells(cells)
    agg = M.aggregate(cells)
    present = {c["model"] for c in cells}
    missing = [m for m in (BASELINE, *variants) if m not in present]
    if missing:
        raise ValueError(f"the attack results of seed {seed} lack the models {missing}: run the attack stage")
    role_of = M.roles(agg, BASELINE, list(variants))
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    budgets = {t: _budget(next(c for c in cells if c["task"] == t)) for t in tasks}
    points = []
    for v in variants:
        audit = audits.get(v)
        best = (audit or {}).get("best_global") or {}
        points.append({
            "variant": v, "seed": seed, "stage": stage, "ppl": ppl[v], "dense_ppl": ppl[BASELINE],
            "x": ppl_cost(ppl[v], ppl[BASELINE]),
            "audit": None if audit is None else {"best_attack": audit.get("best_attack"), "auroc": best.get("auroc"),
                                                 "precision_at_rho": best.get("precision_at_rho")},
            "tasks": {t: {**task_point(agg, role_of, v, t, kill_above, boot_seed=seed), "budget": budgets[t]}
                      for t in tasks},
            "d0": None if d0 is None else d0_summary(d0.get(v, {"model": v, "skipped": "not run yet"})),
        })
    return points


def _budget(cell: dict) -> dict:
    b = cell.get("budget", {})
    return {"suite": cell.get("suite"), "task_kind": cell.get("task_kind"), "metric": cell.get("metric"),
            **{k: b.get(k) for k in ("steps", "batch_size", "max_len", "max_train", "max_val", "max_test")},
            "data": b.get("data")}


def _counts(point_task: dict) -> bool:
    return point_task["valid"] is True and point_task["ratio"] is not None


def survivors(points: list[dict]) -> dict[str, list[str]]:
    """The variants of one seed's screen points that survive it (CONFIRM_RULE) -> {variant: its valid tasks}."""
    out = {}
    for p in points:
        valid = [t for t, pt in p["tasks"].items() if _counts(pt)]
        if valid and not any(p["tasks"][t]["killed"] for t in valid):
            out[p["variant"]] = valid
    return out


def counted(points: list[dict]) -> list[dict]:
    """The points the verdicts and frontiers read: per (variant, seed) its confirmation point where there is one,
    else its screen point."""
    confirmed = {(p["variant"], p["seed"]) for p in points if p.get("stage") == CONFIRM}
    return [p for p in points if p.get("stage") == CONFIRM or (p["variant"], p["seed"]) not in confirmed]


def verdicts(points: list[dict], variants: list[str]) -> dict[str, dict]:
    """Per variant: killed | mixed | alive | no valid task (KILL_RULE), the tasks behind it, the highest interval
    lower end (or ratio) seen on a valid task and the suites (and stages) of the points it rests on."""
    out = {}
    for v in variants:
        by_task: dict[str, list[bool]] = {}
        worst, suites = None, set()
        for p in (p for p in points if p["variant"] == v):
            for t, pt in p["tasks"].items():
                if _counts(pt):
                    suites.add(f"{pt['budget'].get('suite')} ({p.get('stage', SCREEN)})")
                    by_task.setdefault(t, []).append(bool(pt["killed"]))
                    low = pt["lo"] if pt["lo"] is not None else pt["ratio"]
                    worst = low if worst is None else max(worst, low)
        killed = sorted(t for t, ks in by_task.items() if all(ks))
        mixed = sorted(t for t, ks in by_task.items() if any(ks) and not all(ks))
        verdict = ("no valid task" if not by_task else "killed" if killed else "mixed" if mixed else "alive")
        out[v] = {"verdict": verdict, "killed_on": killed, "mixed_on": mixed, "valid_tasks": sorted(by_task),
                  "highest_lower_end": worst, "decided_by": sorted(suites)}
    return out


def pareto(items: list[dict]) -> list[dict]:
    """The items ({'x', 'y', ...}) that no other item beats on both axes (<= on both, < on one), sorted by x."""
    front = [a for a in items
             if not any(b["x"] <= a["x"] and b["y"] <= a["y"] and (b["x"] < a["x"] or b["y"] < a["y"]) for b in items)]
    return sorted(front, key=lambda a: (a["x"], a["y"]))


def frontiers(points: list[dict], variants: list[str]) -> dict[str, dict]:
    """Per task with at least one counting point: each variant's mean (x, y) over the seeds where the task is valid,
    dense at (0, 1), and the non-dominated ones."""
    tasks = list(dict.fromkeys(t for p in points for t in p["tasks"]))
    out = {}
    for t in tasks:
        means = [{"name": "dense", "x": 0.0, "y": 1.0, "seeds": []}]
        for v in variants:
            ps = [p for p in points if p["variant"] == v and _counts(p["tasks"][t])]
            if ps:
                means.append({"name": v, "x": sum(p["x"] for p in ps) / len(ps),
                              "y": sum(p["tasks"][t]["ratio"] for p in ps) / len(ps), "seeds": [p["seed"] for p in ps]})
        if len(means) > 1:
            out[t] = {"means": means, "frontier": [m["name"] for m in pareto(means)]}
    return out


def frontier(points: list[dict], variants: list[str], seeds: list[int], kill_above: float,
             stages: list[dict] | None = None, d0_controls: list[dict] | None = None, confirm_suite: str = "") -> dict:
    """Everything frontier.json holds (`d0_controls`: `d0_control` of each seed where D0 ran; `confirm_suite`: the
    study's confirmation suite, '' = none). `points` holds every stage's points; the verdicts and frontiers read the
    `counted` ones."""
    budgets: dict[str, dict] = {SCREEN: {}, CONFIRM: {}}
    for p in points:
        for t, pt in p["tasks"].items():
            budgets[p.get("stage", SCREEN)].setdefault(t, pt["budget"])
    use = counted(points)
    return {"format": 2, "seeds": seeds, "variants": variants, "reference": BASELINE, "kill_above": kill_above,
            "kill_rule": KILL_RULE, "confirm_suite": confirm_suite, "confirm_rule": CONFIRM_RULE,
            "budgets": budgets[SCREEN],
            "confirm_budgets": budgets[CONFIRM], "points": points, "verdicts": verdicts(use, variants),
            "frontiers": frontiers(use, variants), "d0_controls": d0_controls or [], "stages": stages or []}
