"""Learning-rate schedules: the peak lr scaled per optimizer step (the book's appendix D).

A schedule is a pure function of the step number, so a resumed run sets the very lr an uninterrupted
run would have set: nothing about it needs saving.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, total_steps: int, schedule: str = "constant", warmup: float = 0.0) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based) of `total_steps`.

    warmup: the leading fraction of the steps over which the lr rises linearly to its peak (a fresh
    head or random weights take large, noisy gradients at first). cosine: after warmup the lr follows
    half a cosine from the peak down to zero at the last step, which lets training settle instead of
    ending on whatever the last few noisy steps did. constant: the peak lr after warmup.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    warmup_steps = warmup * total_steps
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
