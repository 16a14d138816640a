"""Learning-rate schedule: linear warm-up then cosine decay to min_lr_ratio * lr. A pure function of the step,
so resuming needs no scheduler object -- only the step."""

from __future__ import annotations

import math


def lr_at(step: int, start: int, end: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based) of a phase spanning steps [start, end)."""
    i, n = step - start, max(end - start, 1)
    warmup = min(warmup, max(n - 1, 0))
    if warmup and i < warmup:
        return peak * (i + 1) / warmup
    progress = min(max((i - warmup) / max(n - warmup, 1), 0.0), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
