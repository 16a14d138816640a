"""The report pooled over pre-training seeds (`pmp report RES1 RES2 ...`: one `pmp attack` directory per
pre-training seed, e.g. a pipeline's DIR/attack and DIR/seeds/s<seed>/attack): which directories may be pooled,
and the sections that only a pooled report has -- its header, what its intervals are, and per task every attack's
pooled gain ratio with its two-stage bootstrap interval beside each pre-training seed's own ratio.

The rest of a pooled report is the plain report's sections read on the pooled cells (eval/report.py): means over
every (pre-training seed, fine-tuning seed) pair, best attacks and validity chosen on those means. The mask, the
init and the batch order all depend on the pre-training seed, so an interval over fine-tuning seeds alone
understates how much a ratio would move with another pre-training run; the pooled interval resamples both.
"""

from __future__ import annotations

import json
from pathlib import Path

from pmp.eval import metrics as M
from pmp.eval.report_format import fmt, mean_std, ratio_ci, row, table_head

N_BOOT, LEVEL = 2000, 0.95  # the pooled interval: resamples and confidence (seeded with 0)


# ---------------------------------------------------------------------------------------------- which can pool
def _sweep_suite(d) -> dict | None:
    """The suite as the directory's sweep.json records it (attacks, budgets, durable protocol), if readable."""
    try:
        suite = json.loads((Path(d.results_dir) / "sweep.json").read_text())["suite"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return suite if isinstance(suite, dict) else None


def _suite_difference(a, b) -> list[str]:
    """The suite names the cells record; then, where both directories' sweep.json record it, the whole suite."""
    names = [sorted({str(c.get("suite")) for c in x.all_cells}) for x in (a, b)]
    names = [n[0] if len(n) == 1 else n for n in names]
    if names[0] != names[1]:
        return _difference({"name": names[0]}, {"name": names[1]}, "suite.")
    sa, sb = _sweep_suite(a), _sweep_suite(b)
    return _difference(sa, sb, "suite.") if sa is not None and sb is not None else []


def _difference(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b), key=str) for x in _difference(a.get(k), b.get(k), f"{prefix}{k}.")]
    if a == b:
        return []
    show = [repr(x) if len(repr(x)) <= 60 else repr(x)[:57] + "..." for x in (a, b)]
    return [f"{prefix.rstrip('.')}: {show[0]} vs {show[1]}"]


def check_poolable(pools: tuple, names: list[str]) -> None:
    """Every directory must hold the same suite and the same models in the same roles; only the quality-matched
    baseline may be missing from some (the pipeline exports it only where the dense run ends better than PMP).
    `pools`: one eval/report.py `ReportData` per directory. Raises ValueError naming the first difference."""
    first, name0 = pools[0], names[0]
    for d, name in zip(pools[1:], names[1:]):
        where = f"cannot pool `{name0}` ({first.results_dir}) and `{name}` ({d.results_dir})"
        suite = _suite_difference(first, d)
        if suite:
            raise ValueError(f"{where}: their suites differ ({'; '.join(suite[:3])}); pool only attack directories "
                             "of one suite and settings, one per pre-training seed")
        core = [{m for m, r in x.role_of.items() if r != "matched"} for x in (first, d)]
        if core[0] != core[1]:
            raise ValueError(f"{where}: their models differ (only in `{name0}`: {sorted(core[0] - core[1]) or 'none'}"
                             f"; only in `{name}`: {sorted(core[1] - core[0]) or 'none'}); pool only attacks of the "
                             "same model names (the same pipeline or attack command at another pre-training seed)")
        roles = [m for m in sorted(set(first.role_of) & set(d.role_of)) if first.role_of[m] != d.role_of[m]]
        if roles:
            m = roles[0]
            raise ValueError(f"{where}: model `{m}` is {first.role_of[m]} in one and {d.role_of[m]} in the other; "
                             "give both the same roles (--baseline / --protected)")


# ---------------------------------------------------------------------------------------------- sections
def pooled_header(d) -> list[str]:
    """Title and inputs of a pooled report `d` (eval/report.py `ReportData` with `pools`)."""
    first = d.cells[0]
    dirs = ", ".join(f"`{n}` = `{p.results_dir}` ({len(p.cells)} cells)" for n, p in zip(d.pool_names, d.pools))
    ft = sorted({c["seed"] for c in d.cells})
    lines = ["# Unauthorized fine-tuning evaluation, pooled over pre-training seeds", "",
             f"- pooled results, one directory per pre-training seed: {dirs}",
             f"- suite `{first.get('suite')}`, fine-tuning seeds {ft} per pre-training seed",
             "- models: " + ", ".join(f"`{m}` ({d.role_of[m]})" for m in d.models)]
    for m in d.models:
        missing = [n for n, p in zip(d.pool_names, d.pools) if m not in p.role_of]
        if missing:
            lines.append(f"- `{m}` has no cells at {', '.join(f'`{n}`' for n in missing)}: its pooled numbers are "
                         "over the other pre-training seeds")
    return lines + [f"- versions: {first.get('versions')}, commit `{first.get('git_commit')}`", ""]


def pooled_vocabulary(n_pools: int) -> str:
    return (f"**Pooled over {n_pools} pre-training seeds.** Every mean is over all (pre-training seed, fine-tuning "
            "seed) cells and ± is their sample std; best attacks and validity are chosen on these pooled means. "
            "**pooled gain ratio** = mean gain(protected) / mean gain(baseline) over those cells; its "
            f"**[{LEVEL:.0%} CI]** is a two-stage (cluster) percentile bootstrap ({N_BOOT} resamples, seeded): each "
            "resample draws the pre-training seeds with replacement, then within each drawn seed its fine-tuning "
            "seeds with replacement (paired: the same fine-tuning seed of both models), so the interval carries the "
            "spread between pre-training runs (their masks, inits and batch orders differ), not only between "
            "fine-tuning runs; n = pre-training seeds x fine-tuning seeds. Beside it, each pre-training seed's own "
            f"ratio with its {LEVEL:.0%} percentile bootstrap over its fine-tuning seeds (as in a plain report).")


def pooled_ci(b: dict) -> str:
    """A pooled ratio (`metrics.cluster_bootstrap_ratio`) and its interval."""
    if b["ratio"] is not None and b["lo"] is None:  # fewer than 2 pre-training seeds: no interval
        return f"{fmt(b['ratio'], 2)} ({b['n_pools']} pre-training seed(s), n={b['n']})"
    return ratio_ci(b)


def seed_ci(b: dict) -> str:
    """One pre-training seed's ratio (`metrics.bootstrap_ratio`) and its interval over fine-tuning seeds."""
    if b["ratio"] is None:
        return "n/a"
    if b["lo"] is None:
        return f"{fmt(b['ratio'], 2)} (n={b['n']})"
    return f"{fmt(b['ratio'], 2)} [{fmt(b['lo'], 2)}, {fmt(b['hi'], 2)}]"


def pooled_ratio(num: dict | None, den: dict | None, n_boot: int = N_BOOT, level: float = LEVEL) -> dict:
    """The pooled ratio of two pooled aggregates (`metrics.aggregate` of tagged cells) with its interval."""
    if num is None or den is None:
        return {"ratio": None, "lo": None, "hi": None, "n": 0, "n_pools": 0, "undefined": 0.0}
    return M.cluster_bootstrap_ratio(M.by_pool(num["gain_by_seed"]), M.by_pool(den["gain_by_seed"]), n_boot, 0,
                                     level)


def seed_ratio(num: dict | None, den: dict | None, n_boot: int = N_BOOT, level: float = LEVEL) -> dict:
    if num is None or den is None:
        return {"ratio": None, "lo": None, "hi": None, "n": 0, "undefined": 0.0}
    return M.bootstrap_ratio(num["gain_by_seed"], den["gain_by_seed"], n_boot, 0, level)


def _validity(v: dict) -> str:
    if v["valid"] is None:
        return "unknown"
    return ("valid" if v["valid"] else "INVALID") + f" ({fmt(v['baseline_best'])} vs {fmt(v['scratch_best'])})"


def pooled_task_table(d, t: str) -> list[str]:
    """Task t of a pooled report: each pre-training seed's validity, then one row per attack (every model's pooled
    after and gain, each protected model's pooled ratio [CI] and its ratio at each pre-training seed), then the
    best attacks."""
    per_seed = "; ".join(f"`{n}` {_validity(p.validity(t))}" for n, p in zip(d.pool_names, d.pools))
    lines = [f"Validity by pre-training seed (baseline best vs from scratch best): {per_seed}.", ""]
    hdr = ["attack"] + [f"{m}: after [final]" for m in d.models] + [f"{m}: gain" for m in d.models]
    for p in d.prot:
        hdr += [f"ratio {p} pooled [{LEVEL:.0%} CI]"] + [f"ratio {p} at `{n}`" for n in d.pool_names]
    hdr += [f"ratio {p} vs {d.matched} pooled [{LEVEL:.0%} CI]" for p in d.prot if d.matched]
    lines += table_head(hdr)
    for a in d.attacks:
        if any((m, t, a) in d.agg for m in d.models):
            lines.append(_attack_row(d, t, a))
    return lines + [_best_row(d, t), ""]


def _attack_row(d, t: str, a: str) -> str:
    r = [f"`{a}`"]
    for m in d.models:
        x = d.agg.get((m, t, a))
        r.append(f"{mean_std(x['after'])} [{fmt(x['after_final']['mean'])}]" if x else "")
    r += [mean_std(d.agg[(m, t, a)]["gain"]) if (m, t, a) in d.agg else "" for m in d.models]
    probe = next(d.agg[(m, t, a)]["attack_kind"] for m in d.models if (m, t, a) in d.agg) == "probe"
    for p in d.prot:
        mine = (p, t, a) in d.agg and d.base and not probe
        r.append(pooled_ci(pooled_ratio(d.agg.get((p, t, a)), d.agg.get((d.base, t, a)))) if mine else "")
        r += [seed_ci(seed_ratio(x.agg.get((p, t, a)), x.agg.get((d.base, t, a)))) if mine else ""
              for x in d.pools]
    for p in d.prot if d.matched else []:
        mine = (p, t, a) in d.agg and not probe
        r.append(pooled_ci(pooled_ratio(d.agg.get((p, t, a)), d.agg.get((d.matched, t, a)))) if mine else "")
    return row(r)


def _best_row(d, t: str) -> str:
    """The attack each model's attacker picks on the pooled validation means; per pre-training seed, the one it
    picks on that seed's own."""
    bests = {m: M.best_attack(d.agg, m, t) for m in d.models}
    r = ["**best attack**"]
    r += [f"{mean_std(bests[m]['after'])} `{bests[m]['attack']}`" if bests[m] else "" for m in d.models]
    r += [mean_std(bests[m]["gain"]) if bests[m] else "" for m in d.models]
    for p in d.prot:
        r.append(pooled_ci(pooled_ratio(bests[p], bests.get(d.base))) if d.base else "n/a")
        for x in d.pools:
            bp, bb = M.best_attack(x.agg, p, t), (M.best_attack(x.agg, d.base, t) if d.base else None)
            r.append(f"{seed_ci(seed_ratio(bp, bb))} `{bp['attack']}`" if bp and bb else "n/a")
    r += [pooled_ci(pooled_ratio(bests[p], bests.get(d.matched))) for p in d.prot if d.matched]
    return row(r)
