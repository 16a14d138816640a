"""frontier.md, frontier.png and frontier.json of a study from `eval.frontier.frontier`'s result: the verdict per
variant, one table row per (variant, seed, task), the frontier per valid task, the D0 diagnostic per variant and
seed (with the dense control), the attack budgets and the wall time of every stage."""

from __future__ import annotations

import math
from pathlib import Path

from pmp.atomic import atomic_file, write_json, write_text
from pmp.eval.frontier import BASELINE, SCREEN, counted
from pmp.eval.report_durable import d0_mask_label
from pmp.eval.report_format import fmt, row, table_head

DEFINITIONS = (
    "**x** = held-out perplexity cost of the variant against the dense run of the same pre-training seed (same "
    "batches and budget): ppl(variant) / ppl(dense) - 1. **y** = best-attack gain ratio on a task: mean gain of the "
    "variant's best unauthorized attack / mean gain of the dense model's best attack, each chosen on the attacker's "
    "own validation metric; gains are sign-adjusted (positive = better; perplexity tasks in nats/token). "
    "Brackets: percentile bootstrap interval over the fine-tuning seeds (paired by seed). A task is **valid** for a "
    "seed only where the dense model's best attack beats the from-scratch model's; invalid tasks are listed, never "
    "plotted solid, never used by the kill rule. **authorized recovery** = the owner's best mask-aware fine-tune's "
    "mean gain / the dense model's best attack's. **audit AUROC** = how well the best mask-recovery attack on the "
    "release ranks masked above unmasked entries (0.5 = chance, 1 = the mask is read off the release).")

D0_DEFINITIONS = (
    "**D0** (eval/d0.py, on one LM task at the suite's LM budget, first fine-tuning seed): a few AdamW steps at each "
    "learning rate of a grid that train every weight (**unmasked**, what an attacker does) or only the owner's mask "
    "(**owner**); **Delta_c** = unmasked - owner validation loss after the most steps at the learning rate where "
    "the unmasked update is best. Protection is only possible where Delta_c > 0: where the unmasked update is worse "
    "than the masked one at the attacker's best rate. **curvature ratio** = largest Hessian eigenvalue "
    "(the sharpness) over every weight "
    "/ restricted to the owner's trainable set: near 1 means no curvature barrier (below ~3 an attacker offsets it "
    "with a few times the steps at a lower rate). The dense release with the first variant's mask is the control: "
    "a variant's numbers mean something only where they differ from it.")


def _budget_line(task: str, b: dict) -> str:
    return (f"- `{task}` ({b.get('task_kind')}, {b.get('metric')}): suite `{b.get('suite')}`, {b.get('steps')} steps x "
            f"batch {b.get('batch_size')}, max_len {b.get('max_len')}, attacker data {b.get('data')}")


def _ratio(pt: dict) -> str:
    s = fmt(pt["ratio"], 2)
    if pt["lo"] is not None:
        s += f" [{fmt(pt['lo'], 2)}, {fmt(pt['hi'], 2)}]"
    return s + f" (n={pt['n_ft_seeds']})"


def _validity(pt: dict) -> str:
    return {True: "valid", False: "**INVALID**", None: "unknown"}[pt["valid"]]


def _kill(pt: dict) -> str:
    if pt["valid"] is not True:
        return "not counted"
    if pt["killed"] is None:
        return f"n/a ({pt['kill_basis']})"
    return f"{'**killed**' if pt['killed'] else 'no'} ({pt['kill_basis']})"


def _audit(p: dict) -> str:
    a = p["audit"]
    if a is None:
        return "not audited"
    return f"{fmt(a['auroc'], 3)} (`{a['best_attack']}`)"


def _d0_cells(d: dict | None) -> list[str]:
    """The points table's D0 columns: Delta_c at the attacker's best lr, curvature ratio."""
    if d is None:
        return ["off", "off"]
    if "skipped" in d:
        return ["not run", "not run"]
    return [fmt(d["delta_c"], 4), fmt(d["sharpness_ratio"], 2)]


def _d0_section(fr: dict) -> list[str]:
    rows = [(p["seed"], p["d0"]) for p in fr["points"] if p.get("d0") is not None]
    rows += [(c["seed"], c) for c in fr.get("d0_controls", [])]
    if not rows:
        return ["## D0 diagnostic", "", "Not run (`d0: false` in the study file).", ""]
    lines = ["## D0 diagnostic (the cause of any protection)", "", D0_DEFINITIONS, ""]
    lines += table_head(["seed", "release (mask)", "task", "attacker lr", "unmasked loss", "owner loss", "Delta_c",
                         "curvature ratio (dense / owner)", "verdict"])
    for seed, d in sorted(rows, key=lambda r: (r[0], r[1].get("model") == BASELINE)):
        if "skipped" in d:
            lines.append(row([str(seed), f"`{d['model']}`", "", "", "", "", "", "",
                              f"not run: {d['skipped']}"]))
            continue
        lines.append(row([str(seed), f"`{d['model']}` ({d0_mask_label(d)})", d["task"], f"{d['attacker_lr']:g}",
                          fmt(d["unmasked_loss"], 4), fmt(d["owner_loss"], 4), fmt(d["delta_c"], 4),
                          fmt(d["sharpness_ratio"], 2), d["verdict"]]))
    return lines + [""]


def markdown(fr: dict, study_dir: str = "") -> str:
    lines = ["# Protection frontier", "",
             f"- study: `{study_dir}`; pre-training seeds {fr['seeds']}; variants "
             + ", ".join(f"`{v}`" for v in fr["variants"]) + f"; reference: `{BASELINE}` of the same seed",
             "- attack budget per task (the screen suite's):",
             *(_budget_line(t, b) for t, b in fr["budgets"].items())]
    if fr.get("confirm_budgets"):
        lines += ["- confirmation budget per task (the stronger suite run on the screen's survivors):",
                  *(_budget_line(t, b) for t, b in fr["confirm_budgets"].items())]
    lines += [f"- kill criterion: kill_above = {fr['kill_above']}: {fr['kill_rule']}",
              (f"- confirmation by suite `{fr['confirm_suite']}`: {fr['confirm_rule']}" if fr.get("confirm_suite") else
               "- no confirmation suite (`confirm.suite` in the study file): every verdict is the screen suite's"),
              "", DEFINITIONS, "", "## Verdicts", ""]
    lines += table_head(["variant", "verdict", "decided by (suite)", "killed on", "mixed on", "valid tasks",
                         "highest lower end"])
    for v, d in fr["verdicts"].items():
        lines.append(row([f"`{v}`", f"**{d['verdict']}**", ", ".join(d.get("decided_by", [])) or "-",
                          ", ".join(d["killed_on"]) or "-", ", ".join(d["mixed_on"]) or "-",
                          ", ".join(d["valid_tasks"]) or "-", fmt(d["highest_lower_end"], 2)]))
    lines += ["", "## Points (one per variant, seed and task)", ""]
    lines += ["Every stage's points; where a variant was confirmed at a seed, its screen row is kept for reference and "
              "only the confirmation counts.", ""]
    lines += table_head(["variant", "seed", "stage (suite)", "held-out ppl (dense)", "x: ppl cost", "task", "validity",
                         "best attack (dense's)", "y: gain ratio [CI] (n ft seeds)", "authorized recovery",
                         "audit best AUROC", "kill", "D0 Delta_c", "D0 curvature ratio"])
    for p in fr["points"]:
        for t, pt in p["tasks"].items():
            stage = f"{p.get('stage', SCREEN)} ({pt['budget'].get('suite')})"
            lines.append(row([f"`{p['variant']}`", str(p["seed"]), stage,
                              f"{fmt(p['ppl'], 2)} ({fmt(p['dense_ppl'], 2)})",
                              f"{p['x']:+.3f}", t, _validity(pt),
                              f"`{pt['best_attack']}` (`{pt['dense_best_attack']}`)", _ratio(pt),
                              fmt(pt["authorized_recovery"], 2), _audit(p), _kill(pt), *_d0_cells(p["d0"])]))
    lines += ["", "## Frontier per valid task", "",
              "Mean (x, y) of each variant over the seeds where the task is valid; dense is (0, 1). On the frontier: "
              "no other point has both a lower cost and a lower ratio.", ""]
    if not fr["frontiers"]:
        lines.append("No task is valid for any variant and seed: there is no frontier to draw.")
    else:
        lines += table_head(["task", "variant", "mean x", "mean y", "seeds", "on the frontier"])
        for t, f in fr["frontiers"].items():
            for m in f["means"]:
                lines.append(row([t, f"`{m['name']}`", f"{m['x']:+.3f}", fmt(m["y"], 2),
                                  str(m["seeds"]) if m["name"] != BASELINE else "-",
                                  "yes" if m["name"] in f["frontier"] else ""]))
    lines += ["", "![frontier](frontier.png)", ""] + _d0_section(fr) + ["## Wall time per stage", "",
              "Seconds of the call that completed each stage (a stage done by an interrupted and resumed call counts "
              "only its last call; `skipped` stages were already done before this call).", ""]
    lines += table_head(["stage", "wall time (s)", "finished at", "this call"])
    for s in fr["stages"]:
        secs = s.get("seconds")
        lines.append(row([s["stage"], fmt(secs, 1) if secs is not None else "n/a (done before the stage ledger)",
                          s.get("finished_at") or "", s.get("this_call", "")]))
    return "\n".join(lines) + "\n"


def write_frontier(out: Path, fr: dict, study_dir: str = "") -> dict[str, Path]:
    """frontier.json, frontier.md and frontier.png in `out` -> their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "frontier.json", "md": out / "frontier.md", "png": out / "frontier.png"}
    write_json(paths["json"], _finite(fr))
    write_text(paths["md"], markdown(fr, study_dir))
    _plot(paths["png"], fr)
    return paths


def _finite(x):
    """JSON has no NaN/inf: such numbers become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _plot(path: Path, fr: dict) -> None:
    import matplotlib  # noqa: PLC0415 - heavy; only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after matplotlib.use("Agg")

    tasks = list(fr["budgets"]) or ["(no task)"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    colors = {v: f"C{i % 10}" for i, v in enumerate(fr["variants"])}
    for ax, t in zip(axes[0], tasks):
        for p in counted(fr["points"]):
            pt = p["tasks"].get(t)
            if pt is None or pt["ratio"] is None:
                continue
            solid = pt["valid"] is True
            yerr = None if pt["lo"] is None else [[pt["ratio"] - pt["lo"]], [pt["hi"] - pt["ratio"]]]
            ax.errorbar([p["x"]], [pt["ratio"]], yerr=yerr, fmt="o", color=colors[p["variant"]], capsize=3,
                        mfc=colors[p["variant"]] if solid else "none", alpha=1.0 if solid else 0.5)
        for v in fr["variants"]:
            ax.plot([], [], "o", color=colors[v], label=v)
        ax.plot([0.0], [1.0], "k*", ms=11, label=f"{BASELINE} (reference)")
        f = fr["frontiers"].get(t)
        if f:
            front = [m for m in f["means"] if m["name"] in f["frontier"]]
            ax.step([m["x"] for m in front], [m["y"] for m in front], where="post", color="k", ls="--", lw=0.9,
                    marker="s", ms=8, mfc="none", label="frontier (means over seeds)")
        ax.axhline(fr["kill_above"], color="r", ls=":", lw=1, label=f"kill_above {fr['kill_above']}")
        ax.axvline(0.0, color="0.6", lw=0.5)
        b = fr["budgets"].get(t, {})
        ax.set_title(f"{t}: suite {b.get('suite')}, {b.get('steps')} steps x {b.get('batch_size')}", fontsize=9)
        ax.set_xlabel("held-out ppl cost vs dense: ppl / ppl_dense - 1", fontsize=8)
        ax.set_ylabel("best-attack gain ratio (validation-chosen)", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("protection frontier: lower-left is better; hollow = task invalid for that seed", fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
