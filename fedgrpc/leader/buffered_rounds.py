"""fedbuff's loop on the leader: open a buffer, give learners their jobs as slots free up, wait for the buffer to fill.

The arithmetic of jobs and staleness lives in fedbuff.py; this class drives it with the coordinator's calls and lock.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from fedgrpc.algorithms import fedbuff
from fedgrpc.leader.intake import RoundState
from fedgrpc.leader.roster import LearnerRecord, MemberChecks
from fedgrpc.protos import learner_pb2
from fedgrpc.transport import rpc

if TYPE_CHECKING:
    from fedgrpc.leader.coordinator import Leader


class BufferedRounds:
    """The coordinator's rounds under --aggregation fedbuff: one round is one filled buffer of updates."""

    def __init__(self, leader: Leader) -> None:
        self.leader = leader

    def open(self, round_number: int) -> None:
        """fedbuff: start taking updates into the buffer that makes round `round_number`, and give the learners their jobs."""
        with self.leader._cond:
            claims = [self.leader.intake.max_examples(record.num_examples) for record in self.leader.roster.alive()]
            self.leader.intake.open(
                round_number,
                [],
                self.leader.config.buffered_updates(),
                self.leader.strategy.norm_bound(),
                self.leader.strategy.max_weight(claims),
            )
        self.dispatch()

    def dispatch(self) -> None:
        """fedbuff: give training jobs to learners waiting their turn while --concurrency allows, on the current model.

        Held while a filled buffer waits to be applied: the learners it frees train on the model it makes.
        """
        jobs = self.leader.intake.jobs
        if jobs is None:
            return
        with self.leader._cond:
            published = self.leader._published
            current = self.leader.intake.round
            waiting = current.round_number != published.round_number  # a filled buffer is being applied
            if not self.leader.started or waiting or published.round_number > self.leader.config.rounds or self.leader.stop_event.is_set():
                return
            given = jobs.assign(self.leader.roster.alive(), needed=current.quorum - current.reported)
            starts = []
            for record, job in given:
                # a newcomer is started, and a pooled learner told its job: each fetches its model (GetModel), which binds
                # the job; a pool serves thousands of learners, so it fetches each job's model only as it comes to train it
                pushed = record.started and not record.pooled
                record.started = True
                if pushed:
                    job.version = published.round_number
                starts.append((record, job, pushed))

        def begin(record: LearnerRecord, job: fedbuff.Job, pushed: bool) -> Any:
            if record.pooled:
                return start_pooled(record, job.number)
            states = published.for_job(job.number) if pushed else None
            return self.leader._start(record, states, published.nbytes)

        for record, job, pushed in starts:
            self.leader._call_in_background(record, functools.partial(begin, job=job, pushed=pushed), "a training job's start")

    def collect(self, round_number: int, run_start: float) -> RoundState:
        """fedbuff: wait until round `round_number`'s buffer has its updates, checking on the learners that train meanwhile.

        The run ends (RunError) when no learner has been able to train for --join-timeout.
        """
        from fedgrpc.leader.coordinator import WAIT_SLICE_S, RunError  # here: the coordinator imports this module

        config = self.leader.config
        jobs = self.leader.intake.jobs
        last = self.leader._last_accuracy()
        checks = MemberChecks(self.leader.roster, self.leader._cond, config.learner_lost_after, round_number)
        idle_since: float | None = None
        with self.leader._cond:
            while round_number not in self.leader.intake.filled:
                checks.run_if_due(lambda: [record for record in jobs.training() if record.alive])
                self.leader._check_stop()
                self.dispatch()
                training = len(jobs.training())
                current = self.leader.intake.round
                self.leader.status.show(
                    f"round {round_number}/{config.rounds}: {current.reported}/{current.quorum} updates buffered, "
                    f"{training} learners training, {time.monotonic() - run_start:.0f}s elapsed{last}"
                )
                now = time.monotonic()
                idle_since = None if training else (idle_since or now)
                if idle_since is not None and now - idle_since >= config.join_timeout:
                    raise RunError(
                        f"round {round_number}: no learner trained for {config.join_timeout:.0f}s (--join-timeout); "
                        f"start more with: python learner.py --leader HOST:{config.port}"
                    )
                self.leader._cond.wait(min(WAIT_SLICE_S, checks.seconds_to_next()))
            return self.leader.intake.filled.pop(round_number)


def start_pooled(record: LearnerRecord, number: int) -> Any:
    """Tell a pooled learner its round, or under fedbuff its job, `number` without the model (ModelState.fetch): its pool
    fetches it (a round's once for all its learners, a job's when the job's turn comes)."""
    start = learner_pb2.ModelState(round=number, fetch=True)
    return record.stub.SyncModelState(iter([start]), timeout=rpc.CONTROL_TIMEOUT_S, metadata=rpc.token_metadata(record.callback_token))
