"""The learning-rate schedule of every model the build trains."""

from __future__ import annotations

import math


def _cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    # Not diffusers' cosine: it floors at 5% of the rate, which none of get_scheduler's schedules does, and the
    # shipped world was built with it (apl-train, which has no such recipe to keep, uses get_scheduler).
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05
