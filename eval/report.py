"""`pmp report`: results JSONs -> REPORT_DIR/report.md + gains.png + curves_<task>.png (matplotlib, Agg).

Numbers are the validation-selected test metric (mean +- sample std over seeds) with the final-step metric
beside it; the arithmetic lives in eval/metrics.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from pmp.atomic import atomic_file, write_text
from pmp.eval import metrics as M


def _f(x: float | None, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{nd}f}" if abs(x) < 1000 else f"{x:.0f}"


def _ms(s: dict, nd: int = 3) -> str:
    return _f(s["mean"], nd) if s["n"] < 2 else f"{_f(s['mean'], nd)} ± {_f(s['std'], nd)}"


def _ratio_cell(r: float | None, valid: bool | None) -> str:
    """A ratio for the table, flagged where the task is not valid (such ratios are never averaged)."""
    return _f(r, 2) + ("" if valid or r is None else " (invalid)")


def _best_ratio(agg: dict, protected: str, reference: str, task: str, by: str) -> float | None:
    """Mean gain of the protected model's best attack / that of the reference model's (each chosen `by`)."""
    bp = M.best_attack(agg, protected, task, by=by)
    br = M.best_attack(agg, reference, task, by=by) if reference else None
    return M.ratio(bp["gain"]["mean"], br["gain"]["mean"]) if bp and br else None


def _valid_tag(v: dict) -> str:
    return {True: "valid", False: "**INVALID**", None: "unknown"}[v["valid"]]


def build_report(results_dir: str | Path, baseline: str = "", protected: list[str] | None = None) -> dict:
    cells = M.load_cells(results_dir)
    agg = M.aggregate(cells)
    role_of = M.roles(agg, baseline, protected)
    return {"cells": cells, "agg": agg, "roles": role_of}


def write_report(results_dir: str | Path, out: str | Path | None = None, baseline: str = "",
                 protected: list[str] | None = None) -> Path:
    rep = build_report(results_dir, baseline, protected)
    out = Path(out) if out else Path(results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    cells, agg, role_of = rep["cells"], rep["agg"], rep["roles"]
    models = sorted(role_of, key=lambda m: ("protected", "baseline", "matched", "other", "scratch").index(role_of[m]))
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    attacks = list(dict.fromkeys(c["attack"] for c in sorted(cells, key=lambda c: c.get("attack_kind") != "probe")))
    base = next((m for m in models if role_of[m] == "baseline"), "")
    matched = next((m for m in models if role_of[m] == "matched"), "")
    prot = [m for m in models if role_of[m] == "protected"]
    task_info = {t: next(c for c in cells if c["task"] == t) for t in tasks}

    L = ["# Unauthorized fine-tuning evaluation", ""]
    first = cells[0]
    L += [f"- results: `{Path(results_dir)}` ({len(cells)} cells), suite `{first.get('suite')}`, "
          f"seeds {sorted({c['seed'] for c in cells})}",
          "- models: " + ", ".join(f"`{m}` ({role_of[m]})" for m in models),
          f"- versions: {first.get('versions')}, commit `{first.get('git_commit')}`", ""]
    L += ["**Vocabulary.** Metrics are the *validation-selected* test metric (the attacker keeps the checkpoint best "
          "on its own validation split carved from the task's train split); the final-step metric is in brackets. "
          "**gain** = metric after fine-tuning - the same model's frozen-probe metric, sign-adjusted so that "
          "**positive = better** (for perplexity, the loss reduction in nats/token: gain = ln ppl(probe) - ln "
          "ppl(after); raw perplexity differences would scale with the starting perplexity). **gain ratio** = mean "
          "gain(protected) / mean gain(baseline), same task/attack/budget (n/a if the baseline gain <= 0); brackets: "
          "min-max of per-seed paired ratios. **authorized recovery** = mean gain of the protected model's best "
          "mask-aware (authorized) fine-tune / mean gain of the baseline's best attack at the same budget. A task is "
          "**valid** only where the baseline's best attack beats the from-scratch model's best attack; ratios on "
          "invalid tasks are shown but never averaged. **best attack** = the attack with the best mean validation "
          "metric (the choice an attacker can make on its own split); **oracle** = the attack best on test "
          "(generous to the attacker). **matched** (when present): a second dense baseline, an earlier state of the "
          "dense run whose held-out perplexity matches the protected model's, so that a lower PMP gain cannot be "
          "explained by a worse (or better) starting model. ± = sample std over seeds.", ""]

    # ----------------------------------------------------------------------------------------- main table
    L += ["## Main table", ""]
    hdr = ["task", "metric", "validity"] + [f"{m} probe" for m in models]
    hdr += [f"{m} best attack: after (gain)" for m in models]
    hdr += [f"gain ratio {p} (best)" for p in prot] + [f"gain ratio {p} (oracle)" for p in prot]
    hdr += [f"gain ratio {p} vs {matched} (best)" for p in prot if matched]
    hdr += [f"authorized recovery {p}" for p in prot]
    L += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    valid_ratios: dict[str, list[float]] = {p: [] for p in prot}
    for t in tasks:
        info = task_info[t]
        v = M.validity(agg, role_of, t)
        row = [t, f"{info['metric']} ({'↑' if info['direction'] == 'higher' else '↓'})", _valid_tag(v)]
        probe_name = next((a for a in attacks if agg.get((models[0], t, a), {}).get("attack_kind") == "probe"), "")
        for m in models:
            pa = agg.get((m, t, probe_name))
            row.append(_ms(pa["after"]) if pa else "n/a")
        for m in models:
            b = M.best_attack(agg, m, t)
            row.append(f"{_ms(b['after'])} ({_f(b['gain']['mean'])}) `{b['attack']}`" if b else "n/a")
        for p in prot:
            r = _best_ratio(agg, p, base, t, "val")
            if r is not None and v["valid"]:
                valid_ratios[p].append(r)
            row.append(_ratio_cell(r, v["valid"]))
        row += [_ratio_cell(_best_ratio(agg, p, base, t, "test"), v["valid"]) for p in prot]
        row += [_ratio_cell(_best_ratio(agg, p, matched, t, "val"), v["valid"]) for p in prot if matched]
        for p in prot:
            ar = M.authorized_recovery(agg, p, base, t) if base else {"recovery": None}
            row.append(_ratio_cell(ar["recovery"], v["valid"]))
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    for p in prot:
        vr = valid_ratios[p]
        L.append(f"- best-attack gain ratio of `{p}` over valid tasks: " +
                 (f"mean {_f(sum(vr) / len(vr), 2)} over {len(vr)} task(s)" if vr else "no valid task"))
    L.append("")

    # ----------------------------------------------------------------------------------------- per task
    for t in tasks:
        info = task_info[t]
        v = M.validity(agg, role_of, t)
        L += [f"## {t} ({info['task_kind']}, {info['metric']}, {'higher' if info['direction'] == 'higher' else 'lower'}"
              f" is better) -- {_valid_tag(v)}", ""]
        if v["valid"] is not None:
            L.append(f"Validity: baseline best {_f(v['baseline_best'])} (`{v['baseline_attack']}`) vs from scratch "
                     f"best {_f(v['scratch_best'])} (`{v['scratch_attack']}`). {v['why']}")
        else:
            L.append(f"Validity unknown: {v['why']}.")
        b = info.get("budget", {})
        L += [f"Budget: {b.get('steps')} steps x batch {b.get('batch_size')}, max_len {b.get('max_len')}, "
              f"data {b.get('data')}", ""]
        hdr = ["attack"] + [f"{m}: after [final]" for m in models] + [f"{m}: gain" for m in models]
        hdr += [f"ratio {p}" for p in prot] + [f"ratio {p} vs {matched}" for p in prot if matched]
        L += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for a in attacks:
            if not any((m, t, a) in agg for m in models):
                continue
            row = [f"`{a}`"]
            for m in models:
                x = agg.get((m, t, a))
                row.append(f"{_ms(x['after'])} [{_f(x['after_final']['mean'])}]" if x else "")
            for m in models:
                x = agg.get((m, t, a))
                row.append(_ms(x["gain"]) if x else "")
            for p in prot:
                gr = M.gain_ratio(agg, p, base, t, a) if base else {"ratio": None}
                s = _f(gr["ratio"], 2)
                if gr["ratio"] is not None and gr.get("paired_min") is not None:
                    s += f" [{_f(gr['paired_min'], 2)}, {_f(gr['paired_max'], 2)}]"
                if gr["ratio"] is not None and not v["valid"]:
                    s += " (invalid)"
                row.append(s if (p, t, a) in agg else "")
            for p in prot if matched else []:
                gr = M.gain_ratio(agg, p, matched, t, a)
                row.append(_f(gr["ratio"], 2) if (p, t, a) in agg else "")
            L.append("| " + " | ".join(row) + " |")
        row = ["**best attack**"]
        bests = {m: M.best_attack(agg, m, t) for m in models}
        row += [f"{_ms(bests[m]['after'])} `{bests[m]['attack']}`" if bests[m] else "" for m in models]
        row += [_ms(bests[m]["gain"]) if bests[m] else "" for m in models]
        for p in prot:
            r = M.ratio(bests[p]["gain"]["mean"], bests[base]["gain"]["mean"]) if base and bests[p] and bests[base] \
                else None
            row.append(_f(r, 2))
        for p in prot if matched else []:
            r = M.ratio(bests[p]["gain"]["mean"], bests[matched]["gain"]["mean"]) if bests[p] and bests[matched] \
                else None
            row.append(_f(r, 2))
        L += ["| " + " | ".join(row) + " |", ""]
        for p in prot:
            ar = M.authorized_recovery(agg, p, base, t) if base else {"recovery": None, "why": "no baseline"}
            if ar["recovery"] is not None or ar.get("authorized_attack"):
                L.append(f"Authorized recovery `{p}`: {_f(ar['recovery'], 2)} = gain {_f(ar.get('authorized_gain'))} "
                         f"(`{ar.get('authorized_attack')}`) / baseline gain {_f(ar.get('baseline_gain'))} "
                         f"(`{ar.get('baseline_attack')}`) {ar['why']}")
        L += ["", f"![curves](curves_{t}.png)", ""]
    L += ["![gains](gains.png)", ""]
    write_text(out / "report.md", "\n".join(L) + "\n")
    _plots(out, agg, cells, models, tasks, attacks)
    return out / "report.md"


def _plots(out: Path, agg: dict, cells: list[dict], models: list[str], tasks: list[str], attacks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(8, 1.1 * len(attacks)), 3.2 * len(tasks)), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, t in zip(axes[:, 0], tasks):
        for i, m in enumerate(models):
            xs, ys, es = [], [], []
            for j, a in enumerate(attacks):
                x = agg.get((m, t, a))
                if x is None or x["attack_kind"] == "probe":
                    continue
                xs.append(j + i * width)
                ys.append(x["gain"]["mean"] if math.isfinite(x["gain"]["mean"]) else 0.0)
                es.append(x["gain"]["std"] if math.isfinite(x["gain"]["std"]) else 0.0)
            ax.bar(xs, ys, width, yerr=es, label=m, capsize=2)
        ax.axhline(0, color="k", lw=0.5)
        metric = next(c["metric"] for c in cells if c["task"] == t)
        ax.set_title(f"{t}: gain over the frozen probe ({metric}; positive = better)")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(attacks))])
        ax.set_xticklabels(attacks, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "gains.png")
    for t in tasks:
        shown = [a for a in attacks if any(agg.get((m, t, a), {}).get("attack_kind", "probe") != "probe"
                                           for m in models)]
        if not shown:
            continue
        ncol = min(4, len(shown))
        nrow = math.ceil(len(shown) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow), squeeze=False)
        for ax, a in zip(axes.flat, shown):
            for m in models:
                cs = [c for c in cells if c["model"] == m and c["task"] == t and c["attack"] == a]
                if not cs:
                    continue
                steps = [p["step"] for p in cs[0]["curve"]]
                metric = cs[0]["metric"]
                mean = [sum(c["curve"][k]["test"][metric] for c in cs if k < len(c["curve"])) /
                        sum(1 for c in cs if k < len(c["curve"])) for k in range(len(steps))]
                line, = ax.plot(steps, mean, marker="o", ms=3, label=m)
                vmean = [sum(c["curve"][k]["val"][metric] for c in cs if k < len(c["curve"])) /
                         sum(1 for c in cs if k < len(c["curve"])) for k in range(len(steps))]
                ax.plot(steps, vmean, ls="--", color=line.get_color(), lw=0.8)
            ax.set_title(a, fontsize=8)
            ax.set_xlabel("step", fontsize=7)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle(f"{t}: test (solid) and attacker's validation (dashed), mean over seeds", fontsize=9)
        fig.tight_layout()
        _save(fig, out / f"curves_{t}.png")
    plt.close("all")


def _save(fig, path: Path) -> None:
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
