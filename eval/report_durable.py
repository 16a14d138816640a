"""The durable suite's part of `pmp report` (eval/durable.py wrote the cells and diagnostics): per task, the equal
tuning budgets (each arm's validation-best configuration, re-run over seeds, with bootstrap intervals on its gain
ratio and the from-scratch row), the fixed and adaptive attacks with intervals, budget and data curves, the
protection statement naming the budget at which it holds, and the D0 diagnostic. Results without durable cells
or diagnostics get no section (their report is unchanged). A report pooled over pre-training seeds gets, per task,
each seed's tuned arms beside the pooled ratio with its two-stage bootstrap interval, each seed's budget-curve
ratios and D0 summary, a pooled protection statement, then each seed's own durable sections in full.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pmp.eval import metrics as M
from pmp.eval.d0 import VARIANTS
from pmp.eval.d0 import verdict as d0_verdict
from pmp.eval.durable_spec import DurableSpec
from pmp.eval.report_format import fmt, mean_std, ratio_ci, row, table_head
from pmp.eval.report_plots import write_budget_plot
from pmp.eval.report_pooled import pooled_ci, pooled_ratio

ARM_LABEL = {("protected", "full"): "attacker on the protected release",
             ("protected", "authorized"): "owner's authorized fine-tuning",
             ("baseline", "full"): "dense baseline", ("matched", "full"): "quality-matched baseline",
             ("other", "full"): "attacker", ("scratch", "full"): "from scratch (validity reference)"}
ARM_ORDER = [("protected", "full"), ("protected", "authorized"), ("baseline", "full"), ("matched", "full"),
             ("other", "full"), ("scratch", "full")]


def durable_sections(d, out: Path, seed: str = "") -> list[str]:
    """Markdown lines of the durable sections of report data `d` (eval/report.py `ReportData`); writes the budget
    curve figures into `out`. `seed`: the pre-training seed's name when `d` is one directory of a pooled report
    (headings and figure names say it)."""
    diags = _diagnostics(d.results_dir)
    durable = [c for c in d.all_cells if c.get("stage")]
    if not durable and not diags:
        return []
    spec = _spec(d.results_dir)
    durable = [c for c in durable if _current(c, spec)]
    at = f" at pre-training seed `{seed}`" if seed else ""
    lines = [f"# Durable evaluation{at}", "", _protocol(spec), ""]
    for t in d.tasks:
        dt = [c for c in durable if c["task"] == t]
        lines += [f"## {t}: durable attacker{at}", ""]
        if dt:
            lines += _tuned_table(d, t, dt, spec) + _fixed_table(d, t, spec)
            lines += _curves(d, t, dt, spec, out, re.sub(r"[^A-Za-z0-9_.-]", "_", f"_{seed}") if seed else "")
            lines += _statement(d, t, dt, spec)
            lines += _general_table(d, t, dt)
        mine = [x for x in diags if x["task"] == t]
        lines += _d0_lines(mine) if mine else ["D0 diagnostic: not run for this task (it needs the owner's mask or "
                                               "rescale key: `pmp attack --private NAME=RUN`).", ""]
    return lines


def _current(c: dict, spec: DurableSpec) -> bool:
    """Whether a durable cell belongs to the recorded protocol: a run re-done with fewer trials, other budget
    factors or data sizes leaves the older cells on disk; they are not counted."""
    x, stage = c.get("durable", {}), c.get("stage")
    if stage == "search":
        return x.get("trial", 0) < spec.trials
    if stage == "curve":
        return float(x.get("factor", 0)) in spec.budget_factors
    if stage == "data":
        return x.get("data_size") in spec.data_sizes(c.get("task_kind", ""))
    return True


# ---------------------------------------------------------------------------------------------- inputs
def _spec(results_dir: Path) -> DurableSpec:
    """The protocol the sweep recorded in sweep.json (defaults where it is missing)."""
    try:
        raw = json.loads((Path(results_dir) / "sweep.json").read_text())["suite"]["durable"]
        fields = DurableSpec.__dataclass_fields__
        return DurableSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
    except (OSError, ValueError, KeyError, TypeError):
        return DurableSpec()


def _diagnostics(results_dir: Path) -> list[dict]:
    out = []
    for f in sorted((Path(results_dir) / "diagnostics").glob("d0__*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"diagnostic {f} is not readable JSON ({type(e).__name__}): delete it and re-run "
                             "`pmp attack`, which recomputes it") from None
        if isinstance(rec, dict) and rec.get("status") == "done" and "summary" in rec:
            out.append(rec)
    return sorted(out, key=lambda r: (r.get("mask_from") != r.get("model"), r.get("model", "")))  # own masks first


def _protocol(spec: DurableSpec) -> str:
    return (f"**Protocol.** Every arm gets the same tuning budget: K = {spec.trials} configurations drawn by optuna's "
            f"{spec.sampler} sampler (seed {spec.search_seed}) over optimizer {{{', '.join(spec.optimizers)}}}, "
            f"learning rate {spec.lr_min:g}..{spec.lr_max:g} (log), schedule {{{', '.join(spec.schedules)}}} and "
            f"steps ({', '.join(f'{f:g}' for f in spec.step_fractions)} of the step budget, the cap). Each arm's "
            "best configuration is the one best on its OWN validation split, re-run at every seed (`tuned_*`); "
            f"gain ratios carry {spec.confidence:.0%} percentile-bootstrap intervals over those seeds "
            f"({spec.bootstrap} resamples, paired by seed). Budget curves re-run each arm's best {spec.curve_top} "
            f"configuration(s){' and its best at lr / factor' if spec.curve_lr_scaled else ''} at "
            f"{', '.join(f'x{f:g}' for f in spec.budget_factors)} the steps (first seed, point estimates; x1 is the "
            f"search itself). A protection claim is a best-attack gain ratio <= {spec.protect_ratio:g} (at x1: its "
            "upper interval bound).")


def _arm_cells(cells: list[dict], stage: str) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        if c.get("stage") == stage:
            out.setdefault((c["model"], c["durable"]["arm"]), []).append(c)
    return out


def _arms(d, cells: list[dict]) -> list[tuple[str, str]]:
    """(model, kind) of every arm with a search, in ARM_ORDER (by role) then model name."""
    arms = {(c["model"], c["durable"]["arm"]) for c in cells if c.get("stage") in ("search", "tuned")}
    return sorted(arms, key=lambda a: (ARM_ORDER.index((d.role_of.get(a[0], "other"), a[1]))
                                      if (d.role_of.get(a[0], "other"), a[1]) in ARM_ORDER else 99, a[0]))


def _label(d, arm: tuple[str, str]) -> str:
    role = d.role_of.get(arm[0], "other")
    return f"{ARM_LABEL.get((role, arm[1]), arm[1])}: `{arm[0]}`"


def _config(p: dict) -> str:
    return f"{p['optimizer']} lr {p['lr']:.2g} {p['schedule']} {p['steps']} steps"




def _boot(spec: DurableSpec, num: dict | None, den: dict | None) -> dict:
    if num is None or den is None:
        return {"ratio": None, "lo": None, "hi": None, "n": 0, "undefined": 0.0}
    return M.bootstrap_ratio(num["gain_by_seed"], den["gain_by_seed"], spec.bootstrap, 0, spec.confidence)


def _validity(a: dict | None, b: dict | None) -> str:
    if a is None or b is None:
        return "unknown (needs the baseline's and the from-scratch arm's tuned cells)"
    ok = M.better(a["after"]["mean"], b["after"]["mean"], a["direction"])
    return ("valid" if ok else "**INVALID** (from scratch reaches the baseline)") + \
        f": baseline {fmt(a['after']['mean'])} vs from scratch {fmt(b['after']['mean'])}"


# ---------------------------------------------------------------------------------------------- sections
def _tuned_table(d, t: str, cells: list[dict], spec: DurableSpec) -> list[str]:
    search, arms = _arm_cells(cells, "search"), _arms(d, cells)
    tuned = {a: d.agg.get((a[0], t, f"tuned_{a[1]}")) for a in arms}
    base = tuned.get((d.base, "full")) if d.base else None
    scratch = next((x for a, x in tuned.items() if d.role_of.get(a[0]) == "scratch"), None)
    info = d.task_info[t]
    hdr = ["arm", "trials", "best configuration (validation)", "val", "after [final]", "gain",
           f"gain ratio vs `{d.base}` [{spec.confidence:.0%} CI]", "oracle trial (test)"]
    lines = [f"### Equal tuning budgets ({info['metric']}, {'higher' if info['direction'] == 'higher' else 'lower'} "
             "is better)", ""] + table_head(hdr)
    for a in arms:
        x, trials = tuned[a], search.get(a, [])
        if x is None:
            lines.append(row([_label(d, a), str(len(trials))] + ["not run yet"] + [""] * 5))
            continue
        chosen = next((c for c in trials if c["durable"]["trial"] == _from_trial(d, t, a)), None)
        oracle = max(trials, key=lambda c: c["after_val_selected"] * (1 if c["direction"] == "higher" else -1)) \
            if trials else None
        is_base, is_scratch = a == (d.base, "full"), d.role_of.get(a[0]) == "scratch"
        ratio = "reference" if is_base else "—" if is_scratch else ratio_ci(_boot(spec, x, base))
        lines.append(row([_label(d, a), str(len(trials)),
                          (_config(chosen["durable"]["params"]) + f" (trial {chosen['durable']['trial']})")
                          if chosen else "", fmt(x["val"]["mean"]),
                          f"{mean_std(x['after'])} [{fmt(x['after_final']['mean'])}]", mean_std(x["gain"]), ratio,
                          f"{fmt(oracle['after_val_selected'])} ({_config(oracle['durable']['params'])})"
                          if oracle else ""]))
    counts = sorted({len(v) for v in search.values()})
    lines += ["", f"Trials per arm: {', '.join(map(str, counts))}"
              + (" (equal)" if len(counts) == 1 else " (**unequal**: a run still in progress?)")
              + f". Validity at the declared budget: {_validity(base, scratch)}.", ""]
    return lines


def _from_trial(d, t: str, a: tuple[str, str]) -> int | None:
    c = next((c for c in d.all_cells if c.get("stage") == "tuned" and c["task"] == t and c["model"] == a[0]
              and c["durable"]["arm"] == a[1]), None)
    return c["durable"]["from_trial"] if c else None


def _fixed_table(d, t: str, spec: DurableSpec) -> list[str]:
    """The suite's fixed attacks (adaptive ones included) with bootstrap intervals and the from-scratch row."""
    attacks = [a for a in d.attacks if not a.startswith("tuned_") and any(
        d.agg.get((m, t, a), {}).get("attack_kind") not in (None, "probe") for m in d.models)]
    if not attacks or not d.base:
        return []
    scratch = next((d.agg.get((m, t, "tuned_full")) for m in d.models if d.role_of[m] == "scratch"), None)
    lines = []
    for p in d.prot:
        hdr = ["attack", f"`{p}` after", f"`{d.base}` after"] + ([f"`{d.matched}` after"] if d.matched else [])
        hdr += [f"`{p}` gain", f"`{d.base}` gain", f"ratio [{spec.confidence:.0%} CI]", "from scratch (tuned) after"]
        lines += ["### Fixed and adaptive attacks", ""] + table_head(hdr)
        for a in attacks:
            xp, xb = d.agg.get((p, t, a)), d.agg.get((d.base, t, a))
            xm = d.agg.get((d.matched, t, a)) if d.matched else None
            if xp is None and xb is None:
                continue
            r = [f"`{a}`", mean_std(xp["after"]) if xp else "", mean_std(xb["after"]) if xb else ""]
            r += [mean_std(xm["after"]) if xm else ""] if d.matched else []
            r += [mean_std(xp["gain"]) if xp else "", mean_std(xb["gain"]) if xb else "",
                  ratio_ci(_boot(spec, xp, xb)) if xp and xb else "n/a",
                  mean_std(scratch["after"]) if scratch else "n/a"]
            lines.append(row(r))
        lines.append("")
    return lines


def _best_by_val(cells: list[dict]) -> dict | None:
    best = None
    for c in cells:
        v = c["selected_val"]
        if not math.isfinite(v):
            continue
        if best is None or M.better(v, best["selected_val"], c["direction"]):
            best = c
    return best


def _gain(c: dict | None) -> float | None:
    return None if c is None else M.signed_gain(c["before"], c["after_val_selected"], c["direction"], c["metric"])


def budget_points(d, t: str, cells: list[dict]) -> dict[tuple[str, str], dict[float, dict]]:
    """(model, kind) -> factor -> the cell chosen on validation at that budget (x1: the search's best trial)."""
    out: dict[tuple[str, str], dict[float, dict]] = {}
    for a, recs in _arm_cells(cells, "search").items():
        out.setdefault(a, {})[1.0] = _best_by_val(recs)
    by: dict[tuple, list[dict]] = {}
    for c in cells:
        if c.get("stage") == "curve":
            by.setdefault((c["model"], c["durable"]["arm"], float(c["durable"]["factor"])), []).append(c)
    for (m, kind, f), recs in by.items():
        out.setdefault((m, kind), {})[f] = _best_by_val(recs)
    return out


def data_points(cells: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(model, kind) -> train-set size -> the cell (the search's best trial at the search's own size)."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for a, recs in _arm_cells(cells, "search").items():
        best = _best_by_val(recs)
        if best is not None:
            out.setdefault(a, {})[_train_size(best)] = best
    for c in cells:
        if c.get("stage") == "data":
            out.setdefault((c["model"], c["durable"]["arm"]), {})[_train_size(c)] = c
    return out


def _train_size(c: dict) -> int:
    data = c.get("budget", {}).get("data", {})
    return int(data.get("train_blocks", data.get("train", c["budget"].get("max_train", 0))))


def _curves(d, t: str, cells: list[dict], spec: DurableSpec, out: Path, suffix: str = "") -> list[str]:
    arms = _arms(d, cells)
    pts = budget_points(d, t, cells)
    factors = sorted({f for v in pts.values() for f in v})
    lines = ["### Budget curves: attacker steps", "",
             "Each entry: after (gain) of the configuration best on validation at that budget. x1 = the search's "
             "best trial (first seed); larger budgets re-run each arm's best configuration(s) and its best at "
             "lr / factor at factor x the steps, first seed: point estimates, no interval.", ""]
    lines += table_head(["arm"] + [f"x{f:g}" for f in factors])
    for a in arms:
        lines.append(row([_label(d, a)] + [_point(pts.get(a, {}).get(f)) for f in factors]))
    base = (d.base, "full")
    for a in arms:
        if d.role_of.get(a[0]) in ("protected", "matched") and base in pts:
            lines.append(row([f"gain ratio {_label(d, a)} / `{d.base}`"] +
                             [fmt(M.ratio(_gain(pts[a].get(f)), _gain(pts[base].get(f))), 2) for f in factors]))
    scratch = next((a for a in arms if d.role_of.get(a[0]) == "scratch"), None)
    if scratch and base in pts:
        lines.append(row(["validity (baseline beats from scratch)"] +
                          [_valid_at(pts[base].get(f), pts[scratch].get(f)) for f in factors]))
    lines.append("")
    series = {_label(d, a): [(f, _gain(pts[a].get(f))) for f in factors if pts[a].get(f) is not None]
              for a in arms if a in pts}
    if write_budget_plot(out / f"budget_{t}{suffix}.png", t, series):
        lines += [f"![budget curves](budget_{t}{suffix}.png)", ""]
    dpts = data_points(cells)
    sizes = sorted({n for v in dpts.values() for n in v})
    if len(sizes) > 1:
        unit = "blocks" if d.task_info[t]["task_kind"] == "lm" else "examples"
        lines += ["### Data curves: attacker train-set size", "",
                  f"Each arm's best configuration at other train-set sizes ({unit}), first seed; the search's own "
                  "size is its best trial.", ""]
        lines += table_head(["arm"] + [f"{n} {unit}" for n in sizes])
        for a in arms:
            lines.append(row([_label(d, a)] + [_point(dpts.get(a, {}).get(n)) for n in sizes]))
        for a in arms:
            if d.role_of.get(a[0]) == "protected" and base in dpts:
                lines.append(row([f"gain ratio {_label(d, a)} / `{d.base}`"] +
                                 [fmt(M.ratio(_gain(dpts[a].get(n)), _gain(dpts[base].get(n))), 2) for n in sizes]))
        lines.append("")
    return lines


def _point(c: dict | None) -> str:
    return "" if c is None else f"{fmt(c['after_val_selected'])} ({fmt(_gain(c))})"


def _valid_at(b: dict | None, s: dict | None) -> str:
    if b is None or s is None:
        return "n/a"
    return "valid" if M.better(b["after_val_selected"], s["after_val_selected"], b["direction"]) else "INVALID"


def _statement(d, t: str, cells: list[dict], spec: DurableSpec) -> list[str]:
    """Per protected model: does best-attack gain ratio <= protect_ratio hold, and up to which budget?"""
    if not d.base:
        return []
    info, lim = d.task_info[t], spec.protect_ratio
    b = info.get("budget", {})
    declared = (f"K = {spec.trials} configurations per arm of <= {b.get('steps_cap', b.get('steps'))} steps x batch "
                f"{b.get('batch_size')}, data {b.get('data')}, seeds {sorted(set(c['seed'] for c in d.cells))}")
    pts = budget_points(d, t, cells)
    valid = d.validity(t)["valid"]
    lines = ["### Protection statement", ""]
    for p in d.prot:
        bp, bb = M.best_attack(d.agg, p, t), M.best_attack(d.agg, d.base, t)
        if bp is None or bb is None:
            continue
        r1 = _boot(spec, bp, bb)
        at = {1.0: (r1["ratio"], r1["hi"] if r1["hi"] is not None else r1["ratio"])}
        for f in sorted(x for x in pts.get((p, "full"), {}) if x != 1.0):
            r = M.ratio(_gain(pts[(p, "full")].get(f)), _gain(pts.get((d.base, "full"), {}).get(f)))
            at[f] = (r, r)
        holds = {f: r is not None and hi is not None and hi <= lim for f, (r, hi) in at.items()}
        upto = None
        for f in sorted(at):
            if not holds[f]:
                break
            upto = f
        ratios = "; ".join(f"x{f:g} {fmt(r, 2)}" for f, (r, _) in sorted(at.items()))
        head = f"**`{p}` on `{t}`**"
        if valid is False:
            lines.append(f"- {head}: the task is INVALID (from scratch reaches the baseline): no protection "
                         f"statement. Ratios: {ratios}.")
            continue
        if upto is None:
            verdict = (f"protection (best-attack gain ratio <= {lim:g}) **does not hold** at the declared budget "
                       f"(x1: {declared})")
        elif upto == max(at):
            verdict = (f"protection (best-attack gain ratio <= {lim:g}) **holds up to x{upto:g}** the declared "
                       f"budget ({declared}), the largest budget tried")
        else:
            nxt = min(f for f in at if f > upto)
            verdict = (f"protection (best-attack gain ratio <= {lim:g}) **holds up to x{upto:g}** the declared "
                       f"budget ({declared}) and fails at x{nxt:g}")
        lines.append(f"- {head}: {verdict}. At x1 the best attacks (chosen on validation) are `{bp['attack']}` / "
                     f"`{bb['attack']}`: ratio {ratio_ci(r1)}; by budget: {ratios} (larger budgets: the tuned "
                     "full fine-tune only, first seed).")
        own = d.agg.get((p, t, "tuned_authorized"))
        if own is not None:
            lines.append(f"  Owner's authorized fine-tuning at the same budget: gain {mean_std(own['gain'])}, "
                         f"recovery vs `{bb['attack']}` of `{d.base}` {ratio_ci(_boot(spec, own, bb))}.")
    return lines + [""]


def _general_table(d, t: str, cells: list[dict]) -> list[str]:
    """General ability after each attacker arm's best attack (stage general): SDD's evaluation on our tasks."""
    gen = sorted((c for c in cells if c.get("stage") == "general" and "general" in c),
                 key=lambda c: (c["model"] != d.base, c["model"]))
    if not gen:
        return []
    g0 = gen[0]["general"]
    lines = ["### General ability after the attack", "",
             f"Each attacker arm's best configuration re-run at the first seed; perplexity on {g0['text']} "
             f"({g0['blocks']} blocks of {g0['block_len']} tokens) of the release and of the attacked model (its final "
             "step). **cost** = ln ppl(after) - ln ppl(release), nats/token; a protection of SDD's kind shows as a "
             "cost that the baseline's attack does not have.", ""]
    others = sorted({t for c in gen for t in c["general"].get("other_tasks", {})})
    lines += table_head(["model", "configuration", "task ppl after", "general ppl: release -> after attack", "cost",
                         "cost - baseline's", *(f"`{t}` ppl: release -> after (cost)" for t in others)])
    base = next((c["general"] for c in gen if c["model"] == d.base), None)
    for c in gen:
        g = c["general"]
        cost = _cost(g)
        rel = cost - _cost(base) if base is not None else None
        lines.append(row([f"`{c['model']}`", _config(c["durable"]["params"]), fmt(c["after_val_selected"]),
                          f"{fmt(g['ppl_release'], 2)} -> {fmt(g['ppl_after_attack'], 2)}", f"{cost:+.3f}",
                          "reference" if c["model"] == d.base else (f"{rel:+.3f}" if rel is not None else "n/a"),
                          *(_other(g.get("other_tasks", {}).get(t)) for t in others)]))
    return lines + [""]


def _cost(g: dict) -> float:
    return math.log(g["ppl_after_attack"]) - math.log(g["ppl_release"])


def _other(g: dict | None) -> str:
    return "" if g is None else f"{fmt(g['ppl_release'], 2)} -> {fmt(g['ppl_after_attack'], 2)} ({_cost(g):+.3f})"


def d0_mask_label(x: dict) -> str:
    """Whose secret a D0 record (or `d0.headline`) was taken with: the model's own, or another's as a control."""
    if x.get("secret") == "rescale key":
        return "its own private rescale key"
    if x.get("secret") == "reference":
        return "against its unprotected reference"
    return "its own private mask" if x["mask_from"] == x["model"] else f"the mask of `{x['mask_from']}` (control)"


def _d0_lines(diags: list[dict]) -> list[str]:
    lines = []
    for x in diags:
        steps = [str(s) for s in x["steps"]]
        own = d0_mask_label(x)
        variants = [v for v in VARIANTS if v in x["updates"][0]]
        owner = ("random mask of the owner's density " + fmt(x["owner_density"], 3) if "random" in variants else
                 "owner = the same updates of the unprotected reference (every parameter); dense = the release"
                 if x.get("secret") == "reference" else
                 "owner = the owner's un-scaled model, every parameter trained; dense = the released weights")
        lines += [f"### D0 diagnostic: `{x['model']}` ({own})", "",
                  f"Validation loss before any update {fmt(x['val_loss_before'], 4)}; AdamW, constant learning rate, "
                  f"batch {x.get('batch_size')}; {owner}.", ""]
        lines += table_head(["lr"] + [f"{v} @{s}" for s in steps for v in variants])
        for u in x["updates"]:
            lines.append(row([f"{u['lr']:g}"] + [fmt(u[v].get(s), 4) for s in steps for v in variants]))
        cur, s = x["curvature"], x["summary"]
        eig = ", ".join(f"{k} {fmt(v['eigenvalue'], 3)}" + ("" if v["converged"] else " (not converged)")
                        for k, v in cur.items() if isinstance(v, dict))
        lines += ["", f"Largest Hessian eigenvalue, the sharpness (Lanczos on Hessian-vector products; "
                  f"{cur.get('batches')} batch(es)): {eig}; dense / owner = {fmt(s['sharpness_ratio'], 2)}. Delta_c "
                  f"at the attacker's best lr = {fmt(s['delta_c_at_attacker_lr'], 4)}; between each variant's own "
                  f"best = {fmt(s['delta_c_each_best'], 4)}; owner - random = "
                  f"{fmt(s.get('owner_minus_random_each_best'), 4)}.", "", f"**Verdict:** {d0_verdict(s)}", ""]
    return lines


# ---------------------------------------------------------------------------------------------- pooled
def pooled_durable_sections(d, out: Path) -> list[str]:
    """The durable sections of a report pooled over pre-training seeds (`d.pools`: one `ReportData` per results
    directory, whose suites were checked equal): per task each seed's tuned arms and the pooled ratio with its
    two-stage bootstrap interval, each seed's budget-curve ratios, each seed's D0, the pooled protection statement;
    then each seed's own durable sections."""
    diags = {n: _diagnostics(p.results_dir) for n, p in zip(d.pool_names, d.pools)}
    if not any(c.get("stage") for c in d.all_cells) and not any(diags.values()):
        return []
    spec = _spec(d.pools[0].results_dir)
    seeds = list(zip(d.pool_names, d.pools))
    lines = ["# Durable evaluation, pooled over pre-training seeds", "", _protocol(spec), "",
             f"Pooled rows: means over every (pre-training seed, fine-tuning seed) cell; their intervals are "
             f"{spec.confidence:.0%} two-stage bootstrap intervals ({spec.bootstrap} resamples: the pre-training seeds "
             "with replacement, then the fine-tuning seeds within each). Each seed's rows are that seed's own tuning "
             "search and re-runs. Every seed's full durable sections follow the pooled ones.", ""]
    for t in d.tasks:
        cells = {n: [c for c in p.all_cells if c.get("stage") and c["task"] == t and _current(c, spec)]
                 for n, p in seeds}
        lines += [f"## {t}: durable attacker, pooled over pre-training seeds", ""]
        if any(cells.values()):
            lines += _pooled_tuned(d, t, spec) + _pooled_curves(d, t, cells) + _pooled_statement(d, t, cells, spec)
        lines += _pooled_d0(d, t, diags)
    for n, p in seeds:
        lines += durable_sections(p, out, seed=n)
    return lines


def _pooled_tuned(d, t: str, spec: DurableSpec) -> list[str]:
    arms = _arms(d, [c for c in d.all_cells if c["task"] == t])
    pooled_base = d.agg.get((d.base, t, "tuned_full")) if d.base else None
    hdr = ["arm", "pre-training seed", "best configuration (validation)", "val", "after [final]", "gain",
           f"gain ratio vs `{d.base}` [{spec.confidence:.0%} CI]"]
    lines = ["### Equal tuning budgets, by pre-training seed and pooled", ""] + table_head(hdr)
    for a in arms:
        ref = "reference" if a == (d.base, "full") else "—" if d.role_of.get(a[0]) == "scratch" else ""
        for n, p in zip(d.pool_names, d.pools):
            x = p.agg.get((a[0], t, f"tuned_{a[1]}"))
            if x is None:
                lines.append(row([_label(d, a), f"`{n}`", "not run yet", "", "", "", ""]))
                continue
            trial = _from_trial(p, t, a)
            chosen = next((c for c in p.all_cells if c.get("stage") == "search" and c["task"] == t
                           and (c["model"], c["durable"]["arm"]) == a and c["durable"]["trial"] == trial), None)
            base = p.agg.get((d.base, t, "tuned_full")) if d.base else None
            lines.append(row([_label(d, a), f"`{n}`", (_config(chosen["durable"]["params"]) + f" (trial {trial})")
                              if chosen else "", fmt(x["val"]["mean"]),
                              f"{mean_std(x['after'])} [{fmt(x['after_final']['mean'])}]", mean_std(x["gain"]),
                              ref or ratio_ci(_boot(spec, x, base))]))
        x = d.agg.get((a[0], t, f"tuned_{a[1]}"))
        if x is not None:
            lines.append(row([_label(d, a), "**pooled**", "", fmt(x["val"]["mean"]),
                              f"{mean_std(x['after'])} [{fmt(x['after_final']['mean'])}]", mean_std(x["gain"]),
                              ref or pooled_ci(pooled_ratio(x, pooled_base, spec.bootstrap, spec.confidence))]))
    scratch = next((m for m in d.models if d.role_of[m] == "scratch"), None)
    valid = [f"`{n}` {_validity(p.agg.get((d.base, t, 'tuned_full')), p.agg.get((scratch, t, 'tuned_full')))}"
             for n, p in zip(d.pool_names, d.pools)]
    pooled = _validity(pooled_base, d.agg.get((scratch, t, "tuned_full")))
    return lines + ["", f"Validity at the declared budget: pooled {pooled}; by pre-training seed: "
                    f"{'; '.join(valid)}.", ""]


def _pooled_curves(d, t: str, cells: dict[str, list[dict]]) -> list[str]:
    """Each seed's budget-curve gain ratios (first fine-tuning seed, point estimates) and their mean."""
    pts = {n: budget_points(p, t, cells[n]) for n, p in zip(d.pool_names, d.pools)}
    factors = sorted({f for by_arm in pts.values() for v in by_arm.values() for f in v})
    arms = [a for a in _arms(d, [c for cs in cells.values() for c in cs])
            if d.role_of.get(a[0]) in ("protected", "matched")]
    base = (d.base, "full")
    if not factors or not arms or not d.base:
        return []
    lines = ["### Budget curves by pre-training seed: gain ratio of each arm's validation-best configuration / "
             f"`{d.base}`'s at each budget", "", "First fine-tuning seed of each pre-training seed: point estimates; "
             "`mean` = their mean over the pre-training seeds that have both.", ""]
    lines += table_head(["arm", "pre-training seed"] + [f"x{f:g}" for f in factors])
    scratch = next((a for a in _arms(d, [c for cs in cells.values() for c in cs])
                    if d.role_of.get(a[0]) == "scratch"), None)
    for a in arms:
        ratios = {n: {f: M.ratio(_gain(pts[n].get(a, {}).get(f)), _gain(pts[n].get(base, {}).get(f)))
                      for f in factors} for n in pts}
        for n in pts:
            lines.append(row([_label(d, a), f"`{n}`"] + [fmt(ratios[n][f], 2) for f in factors]))
        means = [[r[f] for r in ratios.values() if r[f] is not None] for f in factors]
        lines.append(row([_label(d, a), "mean"] + [fmt(sum(v) / len(v), 2) if v else "n/a" for v in means]))
    if scratch:
        for n in pts:
            lines.append(row(["validity (baseline beats from scratch)", f"`{n}`"] +
                             [_valid_at(pts[n].get(base, {}).get(f), pts[n].get(scratch, {}).get(f))
                              for f in factors]))
    return lines + [""]


def _pooled_statement(d, t: str, cells: dict[str, list[dict]], spec: DurableSpec) -> list[str]:
    """Per protected model: at x1 the pooled best-attack ratio's upper interval bound; at a larger budget every
    pre-training seed's ratio must be <= protect_ratio (one fine-tuning seed each: no interval)."""
    if not d.base:
        return []
    lim, valid, lines = spec.protect_ratio, d.validity(t)["valid"], ["### Protection statement, pooled", ""]
    pts = {n: budget_points(p, t, cells[n]) for n, p in zip(d.pool_names, d.pools)}
    for p in d.prot:
        bp, bb = M.best_attack(d.agg, p, t), M.best_attack(d.agg, d.base, t)
        if bp is None or bb is None:
            continue
        r1 = pooled_ratio(bp, bb, spec.bootstrap, spec.confidence)
        holds = {1.0: r1["ratio"] is not None and (r1["hi"] if r1["hi"] is not None else r1["ratio"]) <= lim}
        by = {}
        for f in sorted({f for v in pts.values() for f in v.get((p, "full"), {}) if f != 1.0}):
            by[f] = [M.ratio(_gain(v.get((p, "full"), {}).get(f)), _gain(v.get((d.base, "full"), {}).get(f)))
                     for v in pts.values()]
            holds[f] = all(r is not None and r <= lim for r in by[f])
        upto = None
        for f in sorted(holds):
            if not holds[f]:
                break
            upto = f
        larger = "; ".join(f"x{f:g} " + ", ".join(fmt(r, 2) for r in rs) for f, rs in by.items())
        head = f"**`{p}` on `{t}`, {len(d.pools)} pre-training seeds**"
        if valid is False:
            lines.append(f"- {head}: the task is INVALID on the pooled means (from scratch reaches the baseline): no "
                         f"protection statement. x1 ratio {pooled_ci(r1)}.")
            continue
        claim = f"protection (best-attack gain ratio <= {lim:g}, every pre-training seed above x1)"
        verdict = (f"{claim} **does not hold** at the declared budget" if upto is None else
                   f"{claim} **holds up to x{upto:g}** the declared budget" +
                   (", the largest budget tried" if upto == max(holds) else
                    f" and fails at x{min(f for f in holds if f > upto):g}"))
        lines.append(f"- {head}: {verdict}. At x1 the best attacks on the pooled validation means are "
                     f"`{bp['attack']}` / `{bb['attack']}`: pooled ratio {pooled_ci(r1)}"
                     + (f"; larger budgets, each pre-training seed's ratio: {larger}" if larger else "") + ".")
    return lines + [""]


def _pooled_d0(d, t: str, diags: dict[str, list[dict]]) -> list[str]:
    rows = [(n, x) for n, xs in diags.items() for x in xs if x["task"] == t]
    if not rows:
        return ["D0 diagnostic: not run for this task at any pre-training seed (it needs the owner's mask or rescale "
                "key: `pmp attack --private NAME=RUN`).", ""]
    lines = ["### D0 diagnostic by pre-training seed", ""]
    lines += table_head(["model (mask)", "pre-training seed", "Delta_c at the attacker's best lr",
                         "top-eigenvalue ratio dense / owner", "verdict"])
    for n, x in sorted(rows, key=lambda r: (r[1].get("mask_from") != r[1].get("model"), r[1].get("model", ""))):
        s = x["summary"]
        lines.append(row([f"`{x['model']}` ({d0_mask_label(x)})", f"`{n}`", fmt(s.get("delta_c_at_attacker_lr"), 4),
                          fmt(s.get("sharpness_ratio"), 2), d0_verdict(s)]))
    return lines + [""]
