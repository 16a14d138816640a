"""The evaluation vocabulary as arithmetic on results JSONs (see DESIGN.md, "Evaluation vocabulary").

- gain = metric after fine-tuning - the same model's frozen-probe metric, SIGN-ADJUSTED so that positive is
  better for every metric. Accuracy: points of accuracy. Perplexity: the loss reduction in nats per token,
  ln ppl(probe) - ln ppl(after) -- raw perplexity differences scale with the starting perplexity (a model that
  starts worse "gains" more for the same improvement in loss), which would bias every PMP/dense ratio.
- gain ratio = mean gain(protected) / mean gain(baseline), same task, attack and budget; undefined (None) when the
  baseline's mean gain is <= 0. Spread: min-max of the per-seed paired ratios (seed i with seed i).
- authorized recovery = mean gain of the owner's mask-aware fine-tuning of the protected model (its best
  `authorized` attack) / mean gain of the baseline's BEST attack at the same budget (the strongest thing the
  dense model reaches). 1.0 = the owner recovers everything dense fine-tuning offers.
- validity (per task and budget): the baseline's best attack beats the from-scratch model's best attack (means
  over seeds, raw metric, direction-aware). Gain ratios on invalid tasks are shown but flagged and never averaged.
- best attack: per model and task, the UNAUTHORIZED attack (not probe, not authorized) whose mean VALIDATION
  metric (at its validation-selected step) is best: the choice a real attacker can make, on its own split. The
  report also gives the oracle choice (best on test), which is generous to the attacker.
- bootstrap interval of a gain ratio: resample the fine-tuning seeds (paired: seed i of both models) with
  replacement, seeded, and take percentiles of the ratio of mean gains (`bootstrap_ratio`).
- pooled over pre-training seeds (`pmp report RES1 RES2 ...`, one results directory per pre-training seed): each
  cell carries its directory's name (`POOL`), a "seed" is the pair (pre-training seed, fine-tuning seed), means
  are over all such pairs, and a pooled ratio's interval is a two-stage cluster bootstrap that resamples the
  pre-training seeds, then the fine-tuning seeds within each (`cluster_bootstrap_ratio`).
Every headline uses the validation-selected test metric; the final-step metric is reported beside it.
Cells of the durable suite's exploration stages (`stage` search / curve / data: single-seed tuning trials and
larger-budget re-runs) are summarized by the durable report (eval/report_durable.py), not the attack tables.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np


def signed_gain(before: float, after: float, direction: str, metric: str = "") -> float:
    """after - before, sign-adjusted so that positive = better (direction 'higher' or 'lower'); for perplexity
    the difference of logs (nats per token of loss reduction)."""
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', got {direction!r}")
    if metric == "perplexity":
        if before <= 0 or after <= 0:
            raise ValueError(f"perplexity must be > 0, got before={before}, after={after}")
        before, after = math.log(before), math.log(after)
    return after - before if direction == "higher" else before - after


def better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "higher" else a < b


def spread(values: list[float]) -> dict:
    """mean, sample std (0 for one value), min, max, n."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 and all(map(math.isfinite, values)) else 0.0
    return {"mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values), "n": n}


def ratio(num: float, den: float) -> float | None:
    """num / den, or None where the denominator is not a positive gain (the ratio would mean nothing)."""
    if den is None or num is None or not math.isfinite(den) or den <= 0 or not math.isfinite(num):
        return None
    return num / den


CELL_NAME = re.compile(r"^[^.].*__.+__.+__s\d+$")  # <model>__<task>__<attack>__s<seed> (eval/sweep.py cell_id)
_NUMBER_FIELDS = ("before", "after_val_selected", "after_final", "selected_val")
_TEXT_FIELDS = ("model", "task", "attack", "metric")


def cell_problem(rec) -> str:
    """'' when `rec` is a finished result cell with every field the report reads, else what is wrong with it."""
    if not isinstance(rec, dict):
        return f"it holds a {type(rec).__name__}, not a JSON object"
    if rec.get("status") != "done":
        return f"status is {rec.get('status')!r}, not 'done'"
    missing = [k for k in (*_TEXT_FIELDS, "direction", "seed", *_NUMBER_FIELDS, "curve") if k not in rec]
    if missing:
        return f"it lacks {', '.join(missing)}"
    bad = [k for k in _TEXT_FIELDS if not isinstance(rec[k], str) or not rec[k]]
    bad += [k for k in _NUMBER_FIELDS if not _is_number(rec[k])]
    if rec["direction"] not in ("higher", "lower"):
        bad.append("direction")
    if not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool):
        bad.append("seed")
    if not isinstance(rec["curve"], list) or not rec["curve"] or not all(_curve_point(p, rec["metric"])
                                                                         for p in rec["curve"]):
        bad.append("curve")
    return f"bad value of {', '.join(bad)}" if bad else ""


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _curve_point(p, metric) -> bool:
    return (isinstance(p, dict) and _is_number(p.get("step"))
            and all(isinstance(p.get(s), dict) and _is_number(p[s].get(metric)) for s in ("val", "test")))


def load_cells(results_dir: str | Path) -> list[dict]:
    """Every result cell under RESULTS_DIR/cells (or RESULTS_DIR itself, where files named like cells count).

    A corrupt cell (torn JSON, a missing or mistyped field) is an error that names the file, never silently
    skipped: dropping one seed's cell would change means and ratios without a trace. `pmp attack` recomputes
    corrupt cells, so the fix is to delete the file or re-run the attack."""
    d = Path(results_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"results directory {d} does not exist")
    nested = (d / "cells").is_dir()
    cells_dir = d / "cells" if nested else d
    out = []
    for f in sorted(cells_dir.glob("*.json")):
        if f.name.startswith(".") or (not nested and not CELL_NAME.match(f.stem)):
            continue  # hidden files; beside flat cells also sweep.json and other JSON files
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = f"it is not readable JSON ({type(e).__name__})"
        else:
            problem = cell_problem(rec)
        if problem:
            raise ValueError(f"result cell {f} is corrupt ({problem}): delete it, or re-run `pmp attack --out "
                             f"{d}`, which recomputes corrupt cells, then report again")
        out.append(rec)
    if not out:
        raise ValueError(f"{d} holds no finished result cells (cells/*.json); run `pmp attack --out {d}` first")
    return out


DURABLE_STAGES = ("search", "curve", "data", "general")  # exploration cells of the durable suite (see the module doc)


def classic_cells(cells: list[dict]) -> list[dict]:
    """The cells the attack tables read: all but the durable exploration stages."""
    return [c for c in cells if c.get("stage") not in DURABLE_STAGES]


def budget_key(cell: dict) -> tuple:
    """(steps, batch, train examples, length). Durable cells record the budget's step cap (`steps_cap`): a tuned
    configuration may train fewer steps within the same declared budget."""
    b = cell.get("budget", {})
    return (b.get("steps_cap", b.get("steps")), b.get("batch_size"), b.get("max_train"), b.get("max_len"))


POOL = "pool"  # the results directory (pre-training seed) a pooled cell was read from (eval/report_pooled.py)


def seed_key(cell: dict):
    """What pairs cells across models: the fine-tuning seed, or (pre-training seed, fine-tuning seed) when pooled."""
    return (cell[POOL], cell["seed"]) if POOL in cell else cell["seed"]


def by_pool(gain_by_seed: dict) -> dict:
    """{(pool, seed): gain} of a pooled aggregate -> {pool: {seed: gain}} (the clusters of the bootstrap)."""
    out: dict = {}
    for (pool, seed), g in gain_by_seed.items():
        out.setdefault(pool, {})[seed] = g
    return out


def aggregate(cells: list[dict]) -> dict:
    """(model, task, attack) -> seed statistics of before / after (val-selected, final) / gains (keyed by
    `seed_key`: pooled cells by (pre-training seed, fine-tuning seed))."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["model"], c["task"], c["attack"])].append(c)
    out = {}
    for key, cs in groups.items():
        cs = sorted(cs, key=seed_key)
        d, metric = cs[0]["direction"], cs[0]["metric"]
        kinds = {c["direction"] for c in cs}
        if len(kinds) > 1:
            raise ValueError(f"cells of {key} disagree on the metric direction: {kinds}")
        out[key] = {
            "model": key[0], "task": key[1], "attack": key[2], "role": cs[0].get("model_role", "other"),
            "attack_kind": cs[0].get("attack_kind", ""), "metric": cs[0]["metric"], "direction": d,
            "task_kind": cs[0].get("task_kind", ""), "budget": budget_key(cs[0]),
            "seeds": [seed_key(c) for c in cs],
            "before": spread([c["before"] for c in cs]),
            "after": spread([c["after_val_selected"] for c in cs]),
            "after_final": spread([c["after_final"] for c in cs]),
            "val": spread([c["selected_val"] for c in cs]),  # the attacker's own validation metric
            "gain": spread([signed_gain(c["before"], c["after_val_selected"], d, metric) for c in cs]),
            "gain_final": spread([signed_gain(c["before"], c["after_final"], d, metric) for c in cs]),
            "gain_by_seed": {seed_key(c): signed_gain(c["before"], c["after_val_selected"], d, metric) for c in cs},
        }
    return out


def roles(agg: dict, baseline: str = "", protected: list[str] | None = None) -> dict[str, str]:
    """model -> role, from the cells (recorded at attack time) unless overridden here."""
    r = {a["model"]: a["role"] for a in agg.values()}
    if baseline:
        if baseline not in r:
            raise ValueError(f"--baseline {baseline!r} is not a model in these results: {', '.join(sorted(r))}")
        r = {m: ("other" if role == "baseline" else role) for m, role in r.items()}
        r[baseline] = "baseline"
    for m in protected or []:
        if m not in r:
            raise ValueError(f"--protected {m!r} is not a model in these results: {', '.join(sorted(r))}")
        r[m] = "protected"
    if sum(role == "baseline" for role in r.values()) > 1:
        raise ValueError(f"more than one baseline model ({[m for m, x in r.items() if x == 'baseline']}); pick one "
                         "with --baseline")
    return r


def best_attack(agg: dict, model: str, task: str, kinds: tuple[str, ...] | None = None,
                budget: tuple | None = None, by: str = "val") -> dict | None:
    """The attack whose mean validation metric is best (`by="test"`: the oracle choice on the test metric),
    optionally among kinds / one budget. By default among the UNAUTHORIZED attacks: `authorized` needs the
    private mask, which an attacker lacks."""
    key = {"val": "val", "test": "after"}[by]
    best = None
    for a in agg.values():
        if a["model"] != model or a["task"] != task or a["attack_kind"] == "probe":
            continue
        if kinds is None and a["attack_kind"] == "authorized":
            continue
        if kinds is not None and a["attack_kind"] not in kinds:
            continue
        if budget is not None and a["budget"] != budget:
            continue
        if best is None or better(a[key]["mean"], best[key]["mean"], a["direction"]):
            best = a
    return best


def validity(agg: dict, role_of: dict[str, str], task: str, budget: tuple | None = None) -> dict:
    """Does fine-tuning the baseline beat training from scratch on this task (and budget)?"""
    base = [m for m, r in role_of.items() if r == "baseline"]
    scratch = [m for m, r in role_of.items() if r == "scratch"]
    if not base or not scratch:
        return {"valid": None, "why": "needs a baseline and a from-scratch model"}
    b, s = best_attack(agg, base[0], task, budget=budget), best_attack(agg, scratch[0], task, budget=budget)
    if b is None or s is None:
        return {"valid": None, "why": "no fine-tuning results for the baseline or from scratch"}
    ok = better(b["after"]["mean"], s["after"]["mean"], b["direction"])
    return {"valid": ok, "baseline_best": b["after"]["mean"], "baseline_attack": b["attack"],
            "scratch_best": s["after"]["mean"], "scratch_attack": s["attack"],
            "why": "" if ok else "from scratch reaches the baseline's best: pre-training does not help here"}


def gain_ratio(agg: dict, protected: str, baseline: str, task: str, attack: str) -> dict:
    """Ratio of mean gains, and the min-max of per-seed paired ratios."""
    p, b = agg.get((protected, task, attack)), agg.get((baseline, task, attack))
    if p is None or b is None:
        return {"ratio": None, "why": "missing cells"}
    r = ratio(p["gain"]["mean"], b["gain"]["mean"])
    paired = [ratio(p["gain_by_seed"][s], b["gain_by_seed"][s]) for s in p["gain_by_seed"] if s in b["gain_by_seed"]]
    paired = [x for x in paired if x is not None]
    return {"ratio": r, "paired_min": min(paired) if paired else None, "paired_max": max(paired) if paired else None,
            "why": "" if r is not None else "baseline gain <= 0"}


def authorized_recovery(agg: dict, protected: str, baseline: str, task: str) -> dict:
    a = best_attack(agg, protected, task, kinds=("authorized",))
    if a is None:
        return {"recovery": None, "why": "no authorized cells (needs --private)"}
    b = best_attack(agg, baseline, task, budget=a["budget"])
    if b is None:
        return {"recovery": None, "why": "no baseline cells at the same budget"}
    r = ratio(a["gain"]["mean"], b["gain"]["mean"])
    return {"recovery": r, "authorized_attack": a["attack"], "authorized_gain": a["gain"]["mean"],
            "baseline_attack": b["attack"], "baseline_gain": b["gain"]["mean"],
            "why": "" if r is not None else "baseline gain <= 0"}


def bootstrap_ratio(num_by_seed: dict, den_by_seed: dict, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Ratio of mean gains over the seeds both have, with a percentile bootstrap interval: the seeds are resampled
    with replacement (paired), `n_boot` times from a generator seeded with `seed`. Resamples whose denominator mean
    is <= 0 have no ratio; their share is `undefined` (the interval is over the others). One seed: no interval."""
    seeds = sorted(set(num_by_seed) & set(den_by_seed))
    num = np.array([num_by_seed[s] for s in seeds], dtype=float)
    den = np.array([den_by_seed[s] for s in seeds], dtype=float)
    out = {"ratio": ratio(float(num.mean()), float(den.mean())) if seeds else None, "lo": None, "hi": None,
           "n": len(seeds), "n_boot": n_boot, "level": level, "undefined": 0.0}
    if len(seeds) < 2 or not (np.isfinite(num).all() and np.isfinite(den).all()):
        return out
    idx = np.random.default_rng(seed).integers(0, len(seeds), size=(n_boot, len(seeds)))
    nm, dm = num[idx].mean(1), den[idx].mean(1)
    ok = dm > 0
    out["undefined"] = float(1 - ok.mean())
    if ok.any():
        r = nm[ok] / dm[ok]
        out["lo"], out["hi"] = (float(x) for x in np.quantile(r, [(1 - level) / 2, (1 + level) / 2]))
    return out


def cluster_bootstrap_ratio(num_by_pool: dict, den_by_pool: dict, n_boot: int = 2000, seed: int = 0,
                            level: float = 0.95) -> dict:
    """The pooled ratio of mean gains over every (pre-training seed, fine-tuning seed) pair both sides have, with
    a two-stage (cluster) percentile bootstrap interval. `num_by_pool` / `den_by_pool`: pre-training seed ->
    {fine-tuning seed: gain}. Each of the `n_boot` resamples draws as many pre-training seeds as there are, with
    replacement, then within each drawn one its fine-tuning seeds with replacement (paired: seed i of both
    models; a seed drawn twice is resampled afresh each time), and takes sum(num) / sum(den) = the ratio of the
    resample's mean gains. The interval so carries the spread between pre-training seeds (the mask depends on
    them), which a bootstrap over fine-tuning seeds alone would miss. Resamples whose denominator mean is <= 0
    have no ratio (`undefined`: their share). Fewer than 2 pre-training seeds: no interval. `n`: pairs in all;
    `n_pools`: pre-training seeds."""
    pools = [p for p in sorted(set(num_by_pool) & set(den_by_pool), key=str)
             if set(num_by_pool[p]) & set(den_by_pool[p])]
    units = {p: sorted(set(num_by_pool[p]) & set(den_by_pool[p])) for p in pools}
    num = [np.array([num_by_pool[p][u] for u in units[p]], dtype=float) for p in pools]
    den = [np.array([den_by_pool[p][u] for u in units[p]], dtype=float) for p in pools]
    n = sum(len(x) for x in num)
    out = {"ratio": ratio(float(np.concatenate(num).mean()), float(np.concatenate(den).mean())) if n else None,
           "lo": None, "hi": None, "n": n, "n_pools": len(pools), "n_boot": n_boot, "level": level,
           "undefined": 0.0}
    if len(pools) < 2 or not all(np.isfinite(x).all() for x in num + den):
        return out
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(pools), size=(n_boot, len(pools)))  # stage 1: which pre-training seed in each slot
    sum_num, sum_den = np.zeros(n_boot), np.zeros(n_boot)
    for slot in range(len(pools)):
        for k in range(len(pools)):  # stage 2: the fine-tuning seeds of the seed drawn into this slot
            rows = np.flatnonzero(pick[:, slot] == k)
            idx = rng.integers(0, len(num[k]), size=(len(rows), len(num[k])))
            sum_num[rows] += num[k][idx].sum(1)
            sum_den[rows] += den[k][idx].sum(1)
    ok = sum_den > 0
    out["undefined"] = float(1 - ok.mean())
    if ok.any():
        r = sum_num[ok] / sum_den[ok]
        out["lo"], out["hi"] = (float(x) for x in np.quantile(r, [(1 - level) / 2, (1 + level) / 2]))
    return out
