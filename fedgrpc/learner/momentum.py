"""A learner's kept SGD momentum (the plan's keep_momentum), as each of its last rounds left it, so that it outlives a
session: a learner that rejoins a leader restarted from round k's checkpoint starts round k+1 from the momentum round k
left, as an uninterrupted run does, even when it had trained further before the leader went away."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

# the last rounds a learner trained whose momentum is kept. A leader that checkpoints every round (as --deterministic
# makes it) and dies while writing round k's has its learners at most at round k+1 and resumes from round k-1's
# checkpoint: round k replayed needs what round k-1 left.
ROUNDS_KEPT = 3

Buffers = list[torch.Tensor | None]  # LocalSGD.momentum_buffers: one per parameter, None before its first step


class MomentumStore:
    """Momentum buffers by the round that left them, for one learner's data (kept across its sessions, not on disk)."""

    def __init__(self) -> None:
        self._kept: dict[int, Buffers] = {}
        # whose data made the momentum: the split of this learner id (data from the leader), or -1 for its own data
        self._owner: int | None = None

    def keep(self, round_number: int, owner: int, buffers: Sequence[torch.Tensor | None]) -> None:
        """Keep a copy of `buffers` as round `round_number` left them; the oldest beyond ROUNDS_KEPT are dropped."""
        if owner != self._owner:
            self._kept.clear()
            self._owner = owner
        self._kept.pop(round_number, None)
        # the oldest round's copy is written over rather than a new one made: a fresh 45 MB copy costs page faults
        spare = self._kept.pop(min(self._kept)) if len(self._kept) >= ROUNDS_KEPT else []
        self._kept[round_number] = [copied(buffer, spare[index] if index < len(spare) else None) for index, buffer in enumerate(buffers)]

    def before(self, round_number: int, owner: int, parameters: Sequence[torch.Tensor]) -> Buffers | None:
        """The momentum to start round `round_number` from: a copy of what the newest kept round before it left, or None
        (start from none) when no kept round precedes it, the data is another's, or the buffers do not fit `parameters`.

        Kept rounds from `round_number` on are dropped: they belong to a run the leader has gone back on.
        """
        for later in [kept for kept in self._kept if kept >= round_number]:
            del self._kept[later]
        earlier = [kept for kept in self._kept if kept < round_number]
        if owner != self._owner or not earlier:
            return None
        buffers = self._kept[max(earlier)]
        fits = len(buffers) == len(parameters) and all(
            buffer is None or (buffer.shape == parameter.shape and buffer.dtype == parameter.dtype and buffer.device == parameter.device)
            for buffer, parameter in zip(buffers, parameters, strict=True)
        )
        if not fits:  # the leader restarted with another model: nothing kept applies
            logger.warning("the kept momentum does not fit the plan's model; round %d starts from none", round_number)
            self._kept.clear()
            return None
        logger.info("round %d starts from the momentum round %d left", round_number, max(earlier))
        return [None if buffer is None else buffer.clone() for buffer in buffers]


def copied(buffer: torch.Tensor | None, into: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of `buffer`, written into `into` where that is a tensor of its shape, dtype and device."""
    if buffer is None:
        return None
    if into is not None and into.shape == buffer.shape and into.dtype == buffer.dtype and into.device == buffer.device:
        return into.copy_(buffer)
    return buffer.detach().clone()
