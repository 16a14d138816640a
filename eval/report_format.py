"""Number and table formatting shared by the report's sections (eval/report.py, eval/report_durable.py)."""

from __future__ import annotations

import math


def fmt(x: float | None, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{nd}f}" if abs(x) < 1000 else f"{x:.0f}"


def mean_std(s: dict, nd: int = 3) -> str:
    """'mean ± std' of a `metrics.spread`, or the mean alone for one value."""
    return fmt(s["mean"], nd) if s["n"] < 2 else f"{fmt(s['mean'], nd)} ± {fmt(s['std'], nd)}"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table_head(header: list[str]) -> list[str]:
    return [row(header), "|" + "---|" * len(header)]


def ratio_ci(b: dict) -> str:
    """A bootstrapped ratio ({ratio, lo, hi, n, undefined}, eval/metrics.py) as 'r [lo, hi] (n=N)'."""
    if b["ratio"] is None:
        return "n/a"
    if b["lo"] is None:
        return f"{fmt(b['ratio'], 2)} (n={b['n']})"
    und = f", {b['undefined']:.0%} undefined" if b["undefined"] else ""
    return f"{fmt(b['ratio'], 2)} [{fmt(b['lo'], 2)}, {fmt(b['hi'], 2)}] (n={b['n']}{und})"
