"""The report's figures (matplotlib, Agg): gains.png (every model's gain per attack, one panel per task),
curves_<task>.png (test and validation learning curves per attack, mean over seeds) and, for the durable suite,
budget_<task>.png (each arm's gain against the attacker's step budget)."""

from __future__ import annotations

import math
from pathlib import Path

from pmp.atomic import atomic_file


def write_plots(out: Path, agg: dict, cells: list[dict], models: list[str], tasks: list[str],
                attacks: list[str]) -> None:
    import matplotlib  # noqa: PLC0415 - heavy; only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after matplotlib.use("Agg")

    _save(_gains_figure(plt, agg, cells, models, tasks, attacks), out / "gains.png")
    for t in tasks:
        shown = [a for a in attacks if any(agg.get((m, t, a), {}).get("attack_kind", "probe") != "probe"
                                           for m in models)]
        if shown:
            _save(_curves_figure(plt, cells, models, t, shown), out / f"curves_{t}.png")
    plt.close("all")


def _gains_figure(plt, agg: dict, cells: list[dict], models: list[str], tasks: list[str], attacks: list[str]):
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
    return fig


def _curves_figure(plt, cells: list[dict], models: list[str], t: str, shown: list[str]):
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
            line, = ax.plot(steps, _mean_curve(cs, "test", metric, len(steps)), marker="o", ms=3, label=m)
            ax.plot(steps, _mean_curve(cs, "val", metric, len(steps)), ls="--", color=line.get_color(), lw=0.8)
        ax.set_title(a, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{t}: test (solid) and attacker's validation (dashed), mean over seeds", fontsize=9)
    fig.tight_layout()
    return fig


def _mean_curve(cs: list[dict], split: str, metric: str, n: int) -> list[float]:
    """The split's metric at each of the first n curve points, averaged over the seeds whose curve reaches it."""
    return [sum(c["curve"][k][split][metric] for c in cs if k < len(c["curve"])) /
            sum(1 for c in cs if k < len(c["curve"])) for k in range(n)]


def write_budget_plot(path: Path, task: str, series: dict[str, list[tuple[float, float | None]]]) -> bool:
    """Gain against the budget factor, one line per arm -> whether a figure was written (needs two budgets)."""
    series = {k: [(f, g) for f, g in v if g is not None and math.isfinite(g)] for k, v in series.items()}
    if not any(len(v) > 1 for v in series.values()):
        return False
    import matplotlib  # noqa: PLC0415 - heavy; only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, pts in series.items():
        if pts:
            ax.plot([f for f, _ in pts], [g for _, g in pts], marker="o", label=label.replace("`", ""))
    ax.set_xscale("log")
    ax.set_xlabel("attacker steps (x the declared budget)")
    ax.set_ylabel("gain (positive = better)")
    ax.set_title(f"{task}: gain against the attacker's budget (first seed)", fontsize=9)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _save(fig, path: Path) -> None:
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
