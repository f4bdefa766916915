"""The learning-rate schedule across rounds: a linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def round_lr(base_lr: float, schedule: str, warmup_rounds: int, rounds: int, number: int) -> float:
    """The learning rate of round `number` (1-based) out of `rounds`.

    Warm-up ramps linearly to `base_lr` over the first `warmup_rounds` rounds (round r gets r/W of it), which
    keeps the first rounds of FedAvg, trained from one random start, from driving learners far apart.
    Cosine then decays over the remaining rounds without reaching zero in the last one.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if number <= warmup_rounds:
        return base_lr * number / warmup_rounds
    if schedule == "constant":
        return base_lr
    decay_rounds = max(1, rounds - warmup_rounds)
    progress = min(number - warmup_rounds - 1, decay_rounds - 1) / decay_rounds
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
