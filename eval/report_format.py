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
