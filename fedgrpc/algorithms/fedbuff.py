"""Asynchronous rounds (FedBuff): which learners train now, on which model version, and how much a late update counts.

A learner's training job is numbered by the learner's own count of jobs; the number travels as the round of the
model pushed to it (ModelState.round) and of the update it sends back (GradientData.round), so a learner runs the
same loop in both modes. The leader keeps what each number stands for: the model version the job trains on.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from fedgrpc.leader.roster import LearnerRecord
from fedgrpc.transport import rpc

HOLD_FRACTION = 0.25  # of a learner's own job time: the longest it waits in line for a buffer about to fill
DURATION_WEIGHT = 0.5  # weight of a learner's latest job time in its running estimate


class StaleUpdate(rpc.RequestRefused):
    """An update trained on a model more than --max-staleness aggregations old (FAILED_PRECONDITION)."""


def staleness_weight(staleness: int) -> float:
    """FedBuff's discount of an update whose model is `staleness` aggregations old: 1 / sqrt(1 + staleness)."""
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass
class Job:
    """One learner's turn to train: its number (the learner's count of jobs) and the model version it trains on."""

    number: int
    version: int | None = None  # set when its model is framed for it (pushed, or fetched with GetModel)


@dataclass
class LearnerJobs:
    """One learner's jobs: how many it was given, the one it holds, and the last one it finished (to answer a retry)."""

    record: LearnerRecord
    given: int = 0
    current: Job | None = None
    finished: tuple[int, object] | None = None  # (job number, its update's digest)
    started: float = 0.0  # when its current job was given
    duration: float | None = None  # its jobs' running time, from give to update taken; None before the first
    waiting_since: float = 0.0  # when it last joined the line


class Jobs:
    """Who trains now: at most `slots` learners hold a job, the rest wait their turn in the order they finished.

    A learner whose update leaves the buffer short waits in line while the jobs in flight are due to fill it
    within HOLD_FRACTION of its own job time: it then trains on the model that buffer makes rather than on one
    that is a version old by the time it reports. Learners of one pace so train as in synchronous rounds; a
    straggler's job, once its time is known, is due too late to hold anyone. A learner waits no longer than that
    allowance however late the jobs it waits for turn out to be.

    Guarded by the leader's lock, like the intake it belongs to; it makes no calls itself.
    """

    def __init__(self, slots: int, max_staleness: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.max_staleness = max_staleness
        self._clock = clock
        self._learners: dict[int, LearnerJobs] = {}
        self._waiting: deque[int] = deque()  # learner ids, first in line first
        self.most_training = 0  # the most jobs held at once so far

    def training(self) -> list[LearnerRecord]:
        """The learners holding a job."""
        return [state.record for state in self._learners.values() if state.current is not None]

    def job_of(self, learner_id: int) -> Job | None:
        """The job a learner holds, if any."""
        state = self._learners.get(learner_id)
        return state.current if state is not None else None

    def assign(self, alive: list[LearnerRecord], needed: int = 0) -> list[tuple[LearnerRecord, Job]]:
        """Give jobs to learners waiting their turn while slots are free; a learner not seen before joins the line's end.

        `needed` is how many updates the open buffer still lacks: while the jobs in flight are due to bring them
        soon enough, the line waits (see the class).
        """
        now = self._clock()
        for record in alive:
            state = self._learners.get(record.learner_id)
            if state is None or state.record is not record:  # new, or a newcomer in a freed slot: its own count
                self._learners[record.learner_id] = LearnerJobs(record, waiting_since=now)
                self._waiting.append(record.learner_id)
        given = []
        busy = sum(state.current is not None for state in self._learners.values())
        while self._waiting and busy < self.slots:
            state = self._learners.get(self._waiting[0])
            if state is not None and state.current is None and state.record.alive and self._fill_is_due(state, needed, now):
                break  # the head of the line waits for the model the buffer makes; those behind it after it
            self._waiting.popleft()
            if state is None or state.current is not None or not state.record.alive:
                continue
            state.given += 1
            state.current = Job(state.given)
            state.started = now
            given.append((state.record, state.current))
            busy += 1
        self.most_training = max(self.most_training, busy)
        return given

    def _fill_is_due(self, waiting: LearnerJobs, needed: int, now: float) -> bool:
        """Whether the jobs in flight are due to bring the buffer's `needed` updates within `waiting`'s allowance.

        A job whose time is not known yet (a learner's first) is expected to take as long as `waiting`'s own, and
        counts until it runs over that by the allowance: learners of one pace so train in step from their second
        jobs on, as in synchronous rounds, and a straggler's first job holds the others once, by the allowance.
        """
        if needed <= 0 or waiting.duration is None:
            return False
        allowance = HOLD_FRACTION * waiting.duration
        due = []
        for state in self._learners.values():
            if state.current is None or not state.record.alive:
                continue
            if state.duration is not None:
                due.append(state.started + state.duration)
            elif now <= state.started + waiting.duration + allowance:  # a first job, not yet overdue at waiting's pace
                due.append(state.started + waiting.duration)
        due.sort()
        return len(due) >= needed and max(due[needed - 1], now) <= waiting.waiting_since + allowance

    def drop(self, learner_id: int) -> None:
        """Forget a learner that is gone: its job, if any, frees its slot."""
        self._learners.pop(learner_id, None)

    def check(self, learner_id: int, number: int, version_now: int) -> int | None:
        """Refuse an update that is not for the learner's job, or too stale (ending the job); its staleness, or None for the
        job it already finished (a retry, which the digest tells from a second update)."""
        state = self._learners.get(learner_id)
        if state is not None and state.finished is not None and state.finished[0] == number:
            return None
        job = state.current if state is not None else None
        if job is None or job.number != number or job.version is None:
            held = f"its job is {job.number}" if job is not None and job.version is not None else "it holds none"
            raise rpc.RequestRefused(grpc.StatusCode.FAILED_PRECONDITION, f"update for job {number} of learner {learner_id}; {held}")
        staleness = version_now - job.version
        if staleness > self.max_staleness:
            self._end(state, learner_id, None)
            raise StaleUpdate(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale update: trained on model version {job.version}, {staleness} aggregations before the one it would "
                f"join (--max-staleness {self.max_staleness}); a newer model follows",
            )
        return staleness

    def finish(self, learner_id: int, number: int, digest: object, version_now: int) -> tuple[str | None, int]:
        """Take an update for a job: (None, its staleness), or (the answer to an identical retry, 0); refuses a different second one."""
        staleness = self.check(learner_id, number, version_now)
        state = self._learners[learner_id]
        if staleness is None:
            if state.finished[1] == digest:
                return f"duplicate of the accepted update for job {number}; counted once", 0
            raise rpc.RequestRefused(
                grpc.StatusCode.ALREADY_EXISTS, f"learner {learner_id} already sent a different update for job {number}"
            )
        self._end(state, learner_id, digest)
        return None, staleness

    def bind(self, learner_id: int, version: int) -> Job:
        """The job whose model (version `version`) is about to be sent to a learner; refuses a learner that holds none."""
        state = self._learners.get(learner_id)
        if state is None or state.current is None:
            raise rpc.RequestRefused(
                grpc.StatusCode.FAILED_PRECONDITION, f"learner {learner_id} holds no training job now; one will be pushed"
            )
        if state.current.version is None:
            state.current.version = version
        return state.current

    def _end(self, state: LearnerJobs, learner_id: int, digest: object) -> None:
        """The job is over (its update taken, or refused as stale): the learner joins the end of the line."""
        now = self._clock()
        if digest is not None:
            state.finished = (state.current.number, digest)
            took = now - state.started
            state.duration = took if state.duration is None else DURATION_WEIGHT * took + (1 - DURATION_WEIGHT) * state.duration
        state.current = None
        state.waiting_since = now
        self._waiting.append(learner_id)
