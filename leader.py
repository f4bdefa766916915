"""The leader: serves the global model and data splits, and runs the blog's round flow over its learners.

Register, hand out the model and data, collect updates, aggregate, repeat. Who is in the federation lives
in roster.py, one round's updates in intake.py, how they become the next model in strategy.py, and the
command line in options.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2

import checkpoint
import fedbuff
import rpc
import secagg
import wire
from cli import StatusLine, setup_logging
from federated_eval import FederatedEvaluation
from federated_eval import describe as describe_evaluation
from intake import Intake, RoundState
from model import recompute_batchnorm
from options import STRAGGLER_GRACE_FACTOR, STRAGGLER_GRACE_MIN_S, LeaderConfig, parse_leader_config
from protos import leader_pb2, leader_pb2_grpc, learner_pb2
from recorder import Recorder, TensorBoardMissing
from roster import LearnerRecord, Roster, call_learner
from secure_rounds import SecureRound
from strategy import FIRST_ROUND_NORM_RATIO, Strategy
from task import Task, TaskError, builtin_task, evaluate, load_task
from utils import IMAGE_SHAPE, DataError, Examples, derive_seed, resolve_device, split_by

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1000
WAIT_SLICE_S = 0.5  # how often waits wake up to check for shutdown
HEALTH_PROBE_INTERVAL_S = 5.0  # how often the leader checks the members that have not reported yet
SERVER_STOP_GRACE_S = 2.0  # calls in flight at shutdown get this long; learners were told to stop first
MAX_PARALLEL_CALLS = 32  # calls to learners in flight at once (round starts, pushes, health checks)
MAX_SERVER_THREADS = 256  # the leader's server threads, whatever --learners: a simulation registers 100,000
AUTO_ROUND_LIMIT_S = 3600.0  # --round-timeout 0: a round whose quorum never reports while members answer ends here


class RunError(Exception):
    """The federation cannot go on; the message says why."""


@dataclass
class Published:
    """The global model learners train on in round `round_number`, encoded once and framed once for every call that sends it."""

    round_number: int
    nbytes: int  # the model's payload size; the payload itself is not kept, only its two framings
    model_chunks: list[bytes]  # GetModel's replies, serialized once (wire.frames)
    model_states: list[bytes]  # the round-start push, serialized once

    @classmethod
    def of(cls, round_number: int, model: torch.nn.Module, buffers: wire.BufferPool | None = None) -> Published:
        """Encode a model's state for round `round_number` (in a buffer from `buffers`, given back once framed)."""
        manifest, payload = wire.encode(model.state_dict(), allocate=buffers.take if buffers is not None else bytearray)
        published = cls(
            round_number,
            len(payload),
            list(wire.frames(leader_pb2.ModelChunk, manifest, payload, round=round_number)),
            list(wire.frames(learner_pb2.ModelState, manifest, payload, round=round_number)),
        )
        if buffers is not None:
            buffers.give(payload)  # the frames hold copies
        return published

    def for_job(self, frames: list[bytes], message_type: type, number: int) -> list[bytes]:
        """fedbuff: the model's frames (`model_chunks` or `model_states`) numbered for a learner's job instead of the round."""
        first = message_type.FromString(frames[0])  # one chunk parsed and written again; the rest are shared
        first.round = number
        return [first.SerializeToString(), *frames[1:]]

    def state(self, specs: list[wire.TensorSpec]) -> dict[str, torch.Tensor]:
        """The published model's tensors, decoded from its frames (to go back to it after a refused round)."""
        messages = [learner_pb2.ModelState.FromString(frame) for frame in self.model_states]
        return wire.receive(messages, max_bytes=self.nbytes, expected=specs).tensors


class MemberChecks:
    """The health checks a wait makes of the learners it depends on, every few seconds, with the leader's lock released."""

    def __init__(self, roster: Roster, cond: threading.Condition, learner_lost_after: float, round_number: int) -> None:
        self.roster = roster
        self._cond = cond
        self.round_number = round_number
        self.every = min(HEALTH_PROBE_INTERVAL_S, learner_lost_after / 3)
        self._next = time.monotonic() + self.every
        self._silent_since: dict[int, float] = {}
        self._refusals: dict[int, int] = {}

    def run_if_due(self, due: Callable[[], list[LearnerRecord]]) -> None:
        """Under the lock: once the interval has passed, check the learners `due()` names (roster.probe) outside it."""
        if time.monotonic() < self._next:
            return
        records = due()
        self._cond.release()  # a check waits on the network
        try:
            self.roster.probe(records, self._silent_since, self._refusals, self.every, self.round_number)
        finally:
            self._cond.acquire()
        self._next = time.monotonic() + self.every

    def seconds_to_next(self) -> float:
        """How long a wait may sleep before the next check is due."""
        return max(0.0, self._next - time.monotonic())


class Leader:
    """The federation's coordinator: holds the global model and runs rounds through its roster, intake and strategy."""

    def __init__(
        self,
        config: LeaderConfig,
        test_data: Examples | None,
        train_data: Examples | None,
        tls: rpc.Tls | None = None,
        stop_event: threading.Event | None = None,
        task: Task | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.test_data = test_data  # None: the leader has no test set of its own (the learners evaluate)
        self.train_data = train_data
        described = test_data if test_data is not None else train_data
        self.num_classes = described.num_classes if described is not None else 0
        self.task = task or builtin_task(config.model, config.dataset, self.num_classes, config.seed)
        torch.manual_seed(config.seed)
        self.model = self.task.model().to(self.device)
        self.specs = wire.specs_of(self.model.state_dict())
        self.model_bytes = wire.payload_bytes(self.specs)
        self.shards = (
            split_by(config.partition, train_data, config.learners, config.alpha, config.classes_per_learner, config.seed)
            if train_data is not None
            else None
        )
        self.stop_event = stop_event or threading.Event()  # set by a signal (or by a launcher) to wind the run down
        self.status = StatusLine(enabled=False if config.quiet else None)
        self.history: list[dict[str, Any]] = []
        self.started = False  # training has begun: a newcomer joins the round after the open one
        self.start_round = 1
        self.resumed_metrics: dict[str, Any] | None = None
        self.limits: rpc.CallLimits | None = None  # set by serve()
        self._cond = threading.Condition()  # guards the roster's records and the open round, shared by both
        self._calls = ThreadPoolExecutor(max_workers=MAX_PARALLEL_CALLS, thread_name_prefix="learner-call")
        self.roster = Roster(config, tls, self._cond, self._calls, self.split_examples, self._first_round)
        variance_names = [name for name, _ in self.model.named_buffers() if name.endswith("running_var")]
        self.strategy = Strategy(config, self.model, Path(config.checkpoint_dir) if config.checkpoint_dir else None)
        self.intake = Intake(config, self.specs, self.strategy.parameter_names, variance_names, self.roster, self._cond)
        self.roster.on_absent = self._note_lost
        self.learners_evaluate = config.eval_every > 0 and (
            config.evaluation in ("learners", "both") or (config.evaluation == "auto" and test_data is None)
        )
        self.federated_evaluation = FederatedEvaluation(self.roster, self._calls, config.evaluation_learners, config.seed)
        # secure aggregation: every entry of a learner's update lies within this bound (its parameters' L2 norm included)
        self.secagg_bound = config.clip_norm or FIRST_ROUND_NORM_RATIO * self.strategy.model_norm
        self._publish_buffers = wire.BufferPool(self.model_bytes, keep=1)  # each round's model is encoded here, then framed
        self._published = Published.of(1, self.model)
        self._saved_round = 0  # the last round on disk
        self._saved_at = time.monotonic()
        self.plan = training_plan(config, self.task, self.num_classes, self.specs, self.learners_evaluate)
        self.roster.expected_task = (self.plan.task, self.plan.model_fingerprint)
        # what GetData streams: each tensor of the training set with the example count left off
        self.split_layout = (
            []
            if train_data is None
            else wire.specs_of(dict(zip(train_data.tensor_names(), (t[0] for t in train_data.tensors), strict=True)))
        )

    def restore(self, json_path: Path) -> int:
        """Continue from a checkpoint: global model, server optimizer state and round. Returns its round."""
        record, weights = checkpoint.load(json_path)
        saved = record["config"].get("task") or record["config"]["model"]
        if saved != (self.config.task or self.config.model) or record["num_classes"] != self.num_classes:
            raise ValueError(
                f"{json_path} holds a {saved} with {record['num_classes']} classes, not this run's {self.config.task or self.config.model}"
            )
        self.model.load_state_dict(weights)
        # every noised model made before the stop spent privacy, the rounds after this checkpoint included
        spent = max(record["round"], checkpoint.privacy_spent(json_path.parent))
        self.strategy.restore(checkpoint.load_optimizer(json_path, record), spent)
        if self.strategy.accountant is not None and spent > record["round"]:
            logger.info("counting %d noised rounds as spent, %d of them after the checkpoint resumed from", spent, spent - record["round"])
        self.start_round = record["round"] + 1
        self.resumed_metrics = record["metrics"]
        self._published = Published.of(self.start_round, self.model)
        self._saved_round = record["round"]
        logger.info("resuming after round %d from %s", record["round"], json_path)
        return record["round"]

    # ---- what learners ask for ----------------------------------------------------------------------------------

    def _first_round(self) -> int:
        """The round a learner admitted now takes part from (under the lock): the first, or the one after the open round."""
        return max(self.intake.round.round_number + 1, self.start_round) if self.started else self.start_round

    def membership(self, learner_id: int) -> tuple[bool, str]:
        """Whether a learner is still a member, and what it should know (for Heartbeat)."""
        record = self.roster.record(learner_id)
        if not record.alive:  # its session ends as it is marked absent; a call racing that is told the same
            return False, f"learner {learner_id} was marked absent; register again to take part"
        if not record.started:
            return True, f"waiting to start with round {record.joins_round}"
        return True, f"round {self.intake.round.round_number} in progress"

    def split_examples(self, learner_id: int) -> int:
        """Examples in a learner's data split (0 when learners hold their own data)."""
        return 0 if self.shards is None else len(self.shards[learner_id])

    def largest_split_bytes(self) -> int:
        """Bytes of the largest data split GetData streams (0 when learners hold their own data)."""
        if self.train_data is None or self.shards is None:
            return 0
        return max(len(shard) for shard in self.shards) * wire.payload_bytes(self.split_layout)

    def data_for(self, learner_id: int) -> Examples:
        """A learner's split of the training set."""
        if self.train_data is None or self.shards is None:
            raise rpc.RequestRefused(grpc.StatusCode.FAILED_PRECONDITION, "this leader holds no training data (--data-mode local)")
        return self.train_data.subset(self.shards[learner_id])

    def published(self) -> Published:
        """The current global model, encoded."""
        return self._published

    def model_chunks_for(self, learner_id: int) -> tuple[list[bytes], int]:
        """GetModel's replies for a learner and the model's size: in fedbuff numbered for its job, which trains on this version."""
        with self._cond:
            published = self._published
            if self.intake.jobs is None:
                return published.model_chunks, published.nbytes
            job = self.intake.jobs.bind(learner_id, published.round_number)
        return published.for_job(published.model_chunks, leader_pb2.ModelChunk, job.number), published.nbytes

    # ---- the round loop -----------------------------------------------------------------------------------------

    def run(self, recorder: Recorder | None = None) -> list[dict[str, Any]]:
        """Wait for the learners, run every round, tell learners to stop; returns per-round metrics.

        On shutdown (stop_event) the last completed round is written to disk before RunError says so.
        """
        config = self.config
        try:
            self.wait_for_learners()
            start = time.monotonic()
            if self.intake.jobs is not None:
                self.open_buffer(self.start_round)
            else:
                self.begin_round(self.open_round(self.start_round))
            for round_number in range(self.start_round, config.rounds + 1):
                finished = self.collect_buffer(round_number, start) if self.intake.jobs is not None else self.collect(round_number, start)
                metrics = self.close_round(finished, start)
                self.history.append(metrics)
                if self._checkpoint_due(round_number):
                    self.save(metrics)
                if recorder is not None:
                    recorder.record(metrics)
                self.status.clear()
                evaluation = describe_evaluation(metrics)
                reporters = (
                    f"{metrics['updates_buffered']} updates from {metrics['learners_reported']} learners "
                    f"(staleness up to {metrics['staleness_max']})"
                    if "updates_buffered" in metrics
                    else f"{metrics['learners_reported']} learners"
                )
                logger.info(
                    "round %d/%d: %s, train loss %.4f, %s, %.1fs",
                    round_number,
                    config.rounds,
                    reporters,
                    metrics["train_loss"],
                    evaluation,
                    metrics["round_seconds"],
                )
                self._check_stop()
        except RunError:
            if self.stop_event.is_set() and self.history and self.history[-1]["round"] > self._saved_round:
                self.save(self.history[-1])  # the model has not moved since: the next round was still collecting
            raise
        self.stop_learners("training complete")
        return self.history

    def wait_for_learners(self) -> None:
        """Block until --learners live learners have registered (each checked once the slots are full), the join timeout, or shutdown."""
        config = self.config
        if not self.roster.fill(time.monotonic() + config.join_timeout, self.stop_event.is_set):
            self._check_stop()
            raise RunError(
                f"only {len(self.roster.alive())} of {config.learners} learners registered within {config.join_timeout:.0f}s "
                f"(--join-timeout); start more with: python learner.py --leader HOST:{config.port}"
            )
        with self._cond:
            self.started = True
        logger.info("all %d learners registered; starting training", config.learners)

    def open_round(self, round_number: int) -> RoundState:
        """Start collecting round `round_number` from the live learners due to take part in it (a seeded sample of --fraction)."""
        config = self.config
        with self._cond:
            available = [record.learner_id for record in self.roster.alive() if record.joins_round <= round_number]
            count = config.sampled(len(available))
            if count < len(available):
                generator = torch.Generator().manual_seed(derive_seed(config.seed, "sample", round_number))
                chosen = torch.randperm(len(available), generator=generator)[:count].tolist()
                members = frozenset(available[index] for index in chosen)
            else:
                members = frozenset(available)
            records = [self.roster.record(learner_id) for learner_id in sorted(members)]
            claims = [self.intake.max_examples(record.num_examples) for record in records]
            max_weight = self.strategy.max_weight(claims)
            quorum = config.round_quorum(count)
            secure = None
            if config.secure_aggregation:
                neighbours, threshold = secagg.round_parameters(len(records), config.secagg_neighbours, config.secagg_threshold)
                quorum = max(quorum, threshold)
                # an update's weight is its examples over this cap, so that the leader learns only the round's total weight
                weight_cap = 0.0 if self.strategy.unweighted else min(float(max(claims)), max_weight)
                secure = SecureRound(
                    round_number,
                    records,
                    neighbours,
                    threshold,
                    self.secagg_bound,
                    weight_cap,
                    derive_seed(config.seed, "secagg", round_number),
                    self.intake.update_specs[0].shape[0],
                    self.roster,
                    self._calls,
                )
            return self.intake.open(round_number, records, quorum, self.strategy.norm_bound(), max_weight, secure)

    def open_buffer(self, round_number: int) -> None:
        """fedbuff: start taking updates into the buffer that makes round `round_number`, and give the learners their jobs."""
        with self._cond:
            claims = [self.intake.max_examples(record.num_examples) for record in self.roster.alive()]
            self.intake.open(round_number, [], self.config.buffered_updates(), self.strategy.norm_bound(), self.strategy.max_weight(claims))
        self.dispatch()

    def dispatch(self) -> None:
        """fedbuff: give training jobs to learners waiting their turn while --concurrency allows, on the current model.

        Held while a filled buffer waits to be applied: the learners it frees train on the model it makes.
        """
        jobs = self.intake.jobs
        if jobs is None:
            return
        with self._cond:
            published = self._published
            waiting = self.intake.round.round_number != published.round_number  # a filled buffer is being applied
            if not self.started or waiting or published.round_number > self.config.rounds or self.stop_event.is_set():
                return
            given = jobs.assign(self.roster.alive())
            starts = []
            for record, job in given:
                fetches = not record.started  # a newcomer is started and fetches its model (GetModel), which binds the job
                record.started = True
                if not fetches:
                    job.version = published.round_number
                starts.append((record, job, fetches))

        def begin(record: LearnerRecord, job: fedbuff.Job, fetches: bool) -> Any:
            states = None if fetches else published.for_job(published.model_states, learner_pb2.ModelState, job.number)
            return self._start(record, states, published.nbytes)

        for record, job, fetches in starts:
            self._call_in_background(record, functools.partial(begin, job=job, fetches=fetches), "a training job's start")

    def _start(self, record: LearnerRecord, states: list[bytes] | None, nbytes: int) -> Any:
        """Start a learner on its work: StartTraining for a newcomer (it fetches the model), else the model pushed to it."""
        metadata = rpc.token_metadata(record.callback_token)
        if states is None:
            return record.stub.StartTraining(learner_pb2.Empty(), timeout=rpc.CONTROL_TIMEOUT_S, metadata=metadata)
        reply = record.stub.SyncModelState(iter(states), timeout=rpc.transfer_timeout(nbytes), metadata=metadata)
        self.intake.count_bytes_out(nbytes)
        return reply

    def _call_in_background(self, record: LearnerRecord, call: Callable[[LearnerRecord], Any], what: str) -> None:
        """Make a call to a learner without waiting for it (a slow learner must not hold up the others); a failure marks it absent."""
        self._calls.submit(call_learner, call, record).add_done_callback(
            lambda outcome: self.roster.mark_absent_on_error(record, what, outcome.result())
        )

    def collect_buffer(self, round_number: int, run_start: float) -> RoundState:
        """fedbuff: wait until round `round_number`'s buffer has its updates, checking on the learners that train meanwhile.

        The run ends (RunError) when no learner has been able to train for --join-timeout.
        """
        config = self.config
        jobs = self.intake.jobs
        last = self._last_accuracy()
        checks = MemberChecks(self.roster, self._cond, config.learner_lost_after, round_number)
        idle_since: float | None = None
        with self._cond:
            while round_number not in self.intake.filled:
                checks.run_if_due(lambda: [record for record in jobs.training() if record.alive])
                self._check_stop()
                self.dispatch()
                training = len(jobs.training())
                current = self.intake.round
                self.status.show(
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
                self._cond.wait(min(WAIT_SLICE_S, checks.seconds_to_next()))
            return self.intake.filled.pop(round_number)

    def begin_round(self, current: RoundState) -> None:
        """Start the newcomers (they fetch the model with GetModel) and push the new global model to the rest."""
        published = self._published
        with self._cond:
            records = list(current.member_records.values())
            newcomers = {record.learner_id for record in records if not record.started}
            for record in records:
                record.started = True

        def begin(record: LearnerRecord) -> Any:
            if record.pooled:  # its pool fetches the round's model once for all of its learners (GetModel)
                start = learner_pb2.ModelState(round=current.round_number, fetch=True)
                metadata = rpc.token_metadata(record.callback_token)
                return record.stub.SyncModelState(iter([start]), timeout=rpc.CONTROL_TIMEOUT_S, metadata=metadata)
            return self._start(record, None if record.learner_id in newcomers else published.model_states, published.nbytes)

        for record in records:
            self._call_in_background(record, begin, "the round's start")
        if current.secure is not None:  # its key stages run while the learners train
            current.secure.start()

    def collect(self, round_number: int, run_start: float) -> RoundState:
        """Wait until every member has reported or is gone, or the round's deadline; the round needs its quorum.

        With --round-timeout 0 the deadline is set once the quorum has reported: the rest get
        STRAGGLER_GRACE_FACTOR times the time that took (at least STRAGGLER_GRACE_MIN_S).
        """
        config = self.config
        deadline = time.monotonic() + (config.round_timeout or AUTO_ROUND_LIMIT_S)
        last = self._last_accuracy()
        checks = MemberChecks(self.roster, self._cond, config.learner_lost_after, round_number)
        graced = bool(config.round_timeout)
        with self._cond:
            current = self.intake.round
            while True:
                checks.run_if_due(
                    lambda: [
                        record for record in current.member_records.values() if record.alive and record.learner_id not in current.digests
                    ]
                )
                self._check_stop()
                alive = sum(record.alive for record in current.member_records.values())
                self.status.show(
                    f"round {round_number}/{config.rounds}: {current.reported}/{alive} learners reported, "
                    f"{time.monotonic() - run_start:.0f}s elapsed{last}"
                )
                if current.reported >= alive or alive < current.quorum:
                    break
                now = time.monotonic()
                if not graced and current.reported >= current.quorum:
                    graced = True
                    deadline = min(deadline, now + max(STRAGGLER_GRACE_MIN_S, STRAGGLER_GRACE_FACTOR * (now - current.opened_at)))
                if now >= deadline:
                    break
                self._cond.wait(min(deadline - now, WAIT_SLICE_S, checks.seconds_to_next()))
            current.accepting = False
            late = [record for record in current.member_records.values() if record.alive and record.learner_id not in current.digests]
        limit = "--round-timeout" if config.round_timeout else "the stragglers' grace after the quorum reported"
        for record in late:  # it missed the deadline: a later update of this round is stale, and it must register again
            self.roster.mark_absent(record, f"it sent no update for round {round_number} by the deadline ({limit})")
        if current.reported < current.quorum:
            causes = "; ".join(f"learner {learner_id}: {why}" for learner_id, why in sorted(current.lost.items()))
            raise RunError(
                f"round {round_number}: {current.reported} of {len(current.members)} learners reported and "
                f"{current.quorum} are needed (--min-learners); " + (causes or "see the learners' logs")
            )
        return current

    def _last_accuracy(self) -> str:
        """The status line's note of the last evaluated accuracy, if any."""
        accuracies = [entry["test_accuracy"] for entry in self.history if entry["test_accuracy"] is not None]
        return f", last accuracy {100 * accuracies[-1]:.2f}%" if accuracies else ""

    def _note_lost(self, learner_id: int, why: str) -> None:
        """A member was marked absent (under the lock): the open round remembers why, for its quorum error."""
        current = self.intake.round
        if self.intake.jobs is not None:
            self.intake.jobs.drop(learner_id)  # its slot is free for the next in line (dispatched by the waiting loop)
            self._cond.notify_all()
        elif learner_id in current.member_records and learner_id not in current.digests:
            current.lost.setdefault(learner_id, why)

    def close_round(self, finished: RoundState, start: float) -> dict[str, Any]:
        """Aggregate a collected round into the model (or keep the last good one), publish it, open the next round, evaluate."""
        config = self.config
        round_number = finished.round_number
        try:
            if finished.secure is not None:  # the model is still the round's: the masked buffers' changes are from it
                finished.running = finished.secure.unmask(self.model.state_dict(), self.strategy.parameter_names)
            mean = self.strategy.aggregate(finished)
        except ValueError as error:  # secagg.SecAggError among them
            raise RunError(f"round {round_number}: {error}; the model is unchanged") from None
        problem = self.strategy.step(round_number, mean, finished, lambda: self._published.state(self.specs))
        round_seconds = time.monotonic() - finished.opened_at
        self._published = Published.of(round_number + 1, self.model, self._publish_buffers)
        if self.intake.jobs is not None:
            with self._cond:  # the buffer filling now is bounded by this round's norms, as the next round would be
                self.intake.round.norm_bound = self.strategy.norm_bound()
            if round_number < config.rounds:
                self.dispatch()  # the learners the filled buffer freed train on the model it made
        elif round_number < config.rounds:
            # learners start the next round now; this one is evaluated and saved while they train
            # (the model is not touched again before the next collect, which this thread runs after)
            self.begin_round(self.open_round(round_number + 1))
        if config.recompute_bn:  # after publishing: learners train BatchNorm on batch statistics, not these
            self.recompute_batchnorm(round_number)
        evaluated = config.eval_every > 0 and (round_number % config.eval_every == 0 or round_number == config.rounds)
        if evaluated:
            self.status.show(f"round {round_number}/{config.rounds}: evaluating the new global model")
        central = (self.evaluate() if evaluated and self.test_data is not None else None) or {}
        federated = self.evaluate_on_learners(finished) if evaluated and self.learners_evaluate else {}
        aggregate_norm = self.strategy.parameter_norm(mean)
        accountant = self.strategy.accountant
        secure = finished.secure
        norms = finished.update_norms  # none under secure aggregation: the leader never sees an update
        buffered = self.intake.jobs is not None  # fedbuff: the round's members are the learners whose updates filled its buffer
        return {
            "round": round_number,
            "wall_time": time.time(),
            "learners_selected": len(finished.members),
            "learners_reported": len(finished.members) if buffered else finished.reported,
            "learners_dropped": 0 if buffered else len(finished.members) - finished.reported,
            "train_loss": sum(finished.losses) / len(finished.losses),
            "test_loss": central.get("loss"),
            "test_accuracy": central.get("accuracy"),
            **{f"test_{name}": value for name, value in central.items() if name not in ("loss", "accuracy")},
            **federated,
            "bytes_in": finished.bytes_in + (secure.bytes_in if secure is not None else 0),
            "bytes_out": finished.bytes_out + (secure.bytes_out if secure is not None else 0),
            "update_norm_mean": sum(norms) / len(norms) if norms else None,
            "update_norm_max": max(norms) if norms else None,
            "updates_rejected": sum(finished.rejected.values()),
            "updates_clipped": finished.clipped,
            "model_rejected": problem is not None,
            "aggregate_norm": aggregate_norm if aggregate_norm < float("inf") else None,
            **({"dp_epsilon": accountant.epsilon()} if accountant is not None else {}),
            **(
                {
                    "updates_buffered": finished.reported,
                    "staleness_mean": sum(finished.staleness) / len(finished.staleness),
                    "staleness_max": max(finished.staleness),
                    "updates_stale": finished.stale,
                    "learners_training_max": self.intake.jobs.most_training,
                }
                if buffered
                else {}
            ),
            **(
                {"secagg_setup_seconds": secure.setup_seconds, "secagg_unmask_seconds": secure.unmask_seconds} if secure is not None else {}
            ),
            "round_seconds": round_seconds,
            "elapsed_seconds": time.monotonic() - start,
        }

    def _checkpoint_due(self, round_number: int) -> bool:
        """Whether round `round_number` is written: the last round, on shutdown, every --checkpoint-every rounds, or --checkpoint-seconds after the last write."""
        config = self.config
        if round_number == config.rounds or self.stop_event.is_set():
            return True
        if config.checkpoint_every and round_number % config.checkpoint_every == 0:
            return True
        return time.monotonic() - self._saved_at >= config.checkpoint_seconds

    def save(self, metrics: dict[str, Any]) -> None:
        """Write the global model and server optimizer state as the checkpoint of metrics' round."""
        checkpoint.save(
            Path(self.config.checkpoint_dir),
            metrics["round"],
            self.model.state_dict(),
            {"config": dataclasses.asdict(self.config), "metrics": metrics, "num_classes": self.num_classes},
            keep=self.config.keep_checkpoints,
            optimizer_state=self.strategy.optimizer_tensors(),
        )
        self._saved_round = metrics["round"]
        self._saved_at = time.monotonic()

    def _check_stop(self) -> None:
        if self.stop_event.is_set():
            raise RunError("leader shutting down")

    def stop_learners(self, reason: str) -> None:
        """Tell every learner to stop (roster.stop_all)."""
        self.roster.stop_all(reason)

    def recompute_batchnorm(self, round_number: int) -> None:
        """Recompute the global model's BatchNorm statistics from --recompute-bn training images, drawn anew each round."""
        data = self.train_data
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "batchnorm", round_number))
        chosen = torch.randperm(len(data), generator=generator)[: self.config.recompute_bn]
        batches = (
            self.task.make_batch(data.tensors, chosen[first : first + EVAL_BATCH_SIZE], None, torch.contiguous_format)[0]
            for first in range(0, len(chosen), EVAL_BATCH_SIZE)
        )
        recompute_batchnorm(self.model, batches)

    def evaluate(self) -> dict[str, float] | None:
        """Test loss and the task's metrics of the global model on the leader's test set; None when shutdown interrupts it."""
        return evaluate(self.model, self.task, self.test_data, self.device, EVAL_BATCH_SIZE, stop=self.stop_event.is_set)

    def evaluate_on_learners(self, finished: RoundState) -> dict[str, float | int]:
        """The learners that reported in `finished` evaluate the model it made on their own test data (federated_eval)."""
        reporters = {key if isinstance(key, int) else key[0] for key in finished.digests}
        # a simulation pool's learners hold no data of their own to evaluate on
        records = [record for learner_id, record in finished.member_records.items() if learner_id in reporters and not record.pooled]
        states = self._published.for_job(self._published.model_states, learner_pb2.ModelState, finished.round_number)
        return self.federated_evaluation.run(records, finished.round_number, states, self._published.nbytes, self.stop_event.is_set)

    def close(self) -> None:
        """Close the channels to learners and let calls in flight finish."""
        self._calls.shutdown(wait=False, cancel_futures=True)
        self.intake.close()
        self.roster.close()


def training_plan(
    config: LeaderConfig, task: Task, num_classes: int, specs: list[wire.TensorSpec], learners_evaluate: bool = False
) -> leader_pb2.TrainingPlan:
    """The training plan the leader sends every learner at registration: what to build and how to train it."""
    return leader_pb2.TrainingPlan(
        model=task.name,
        task="" if task.builtin else task.name,
        learners_evaluate=learners_evaluate,
        num_classes=num_classes,
        aggregation=config.aggregation,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        local_steps=config.local_steps,
        local_epochs=config.local_epochs,
        seed=config.seed,
        rounds=config.rounds,
        augment=config.augment,
        image_shape=IMAGE_SHAPE if task.builtin else (),
        dataset=config.dataset,
        model_fingerprint=wire.fingerprint(specs),
        torch_version=torch.__version__,
        deterministic=config.deterministic,
        prox_mu=config.prox_mu,
        keep_momentum=config.keep_momentum,
        compression=config.compression,
        topk_ratio=config.topk_ratio,
        lr_schedule=config.lr_schedule,
        warmup_rounds=config.warmup_rounds,
        secure_aggregation=config.secure_aggregation,
    )


class LeaderServicer(leader_pb2_grpc.LeaderServiceServicer):
    """The gRPC boundary: authenticates callers, checks payloads, answers with status codes."""

    def __init__(self, leader: Leader) -> None:
        self.leader = leader

    def _caller(self, context: grpc.ServicerContext) -> int:
        learner_id = self.leader.roster.learner_for_token(rpc.caller_token(context))
        if learner_id is None:  # the gate lets no such call through; kept for calls made without it
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or unknown {rpc.TOKEN_METADATA_KEY}: call RegisterLearner first")
        return learner_id

    def RegisterLearner(self, request: leader_pb2.LearnerInfo, context: grpc.ServicerContext) -> leader_pb2.AckWithMetadata:
        try:
            record, _ = self.leader.roster.register(request, context.peer())
        except rpc.RequestRefused as error:
            context.abort(error.code, str(error))
        return leader_pb2.AckWithMetadata(
            success=True,
            message=f"registered as learner {record.learner_id}",
            learner_id=record.learner_id,
            max_learners=self.leader.config.learners,
            plan=self.leader.plan,
            session_token=record.session_token,
            joins_round=record.joins_round,
            split_examples=self.leader.split_examples(record.learner_id),
            split_layout=[wire.spec_message(spec) for spec in self.leader.split_layout],
        )

    def GetModel(self, request: leader_pb2.Empty, context: grpc.ServicerContext) -> Iterator[leader_pb2.ModelChunk]:
        learner_id = self._caller(context)
        try:
            chunks, nbytes = self.leader.model_chunks_for(learner_id)
        except rpc.RequestRefused as error:
            context.abort(error.code, str(error))
        yield from chunks
        self.leader.intake.count_bytes_out(nbytes)

    def GetData(self, request: leader_pb2.LearnerDataRequest, context: grpc.ServicerContext) -> Iterator[leader_pb2.DataChunk]:
        learner_id = self._caller(context)
        if request.learner_id != learner_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"session belongs to learner {learner_id}, not {request.learner_id}")
        try:
            data = self.leader.data_for(learner_id)
        except rpc.RequestRefused as error:
            context.abort(error.code, str(error))
        manifest, payload = wire.encode(dict(zip(data.tensor_names(), data.tensors, strict=True)))
        yield from wire.frames(leader_pb2.DataChunk, manifest, payload)

    def AccumulateGradients(self, request_iterator: Iterator[leader_pb2.GradientData], context: grpc.ServicerContext) -> leader_pb2.Ack:
        learner_id = self._caller(context)
        intake = self.leader.intake
        received = None
        try:
            received = wire.receive(
                request_iterator,
                max_bytes=intake.update_bytes,
                expected=intake.update_specs,
                check_header=lambda header: intake.check_header(learner_id, header),
                allocate=intake.buffers.take,
            )
            tensors, norms = intake.unpack(received)
            header, payload = received.header, received.payload
            received = None  # accept gives the buffer back once the update is summed or refused
            release = None if intake.keeps_updates else functools.partial(intake.buffers.give, payload)
            message = intake.accept(
                learner_id,
                header,
                tensors,
                norms,
                release=release,
                time_left=context.time_remaining(),
                unweighted=self.leader.strategy.unweighted,
            )
        except wire.WireError as error:
            self._refuse(context, learner_id, grpc.StatusCode.INVALID_ARGUMENT, f"update refused: {error}")
        except rpc.RequestRefused as error:
            self._refuse(context, learner_id, error.code, str(error))
        finally:
            if received is not None and not intake.keeps_updates:
                intake.buffers.give(received.payload)  # refused before accept: nothing views it now
            self.leader.dispatch()  # fedbuff: the job is over, taken or refused; the learner's next turn may come
        return leader_pb2.Ack(success=True, message=message)

    def _refuse(self, context: grpc.ServicerContext, learner_id: int, code: grpc.StatusCode, reason: str) -> None:
        """Count a refused update, log it once per learner per round, and answer with its status."""
        if self.leader.intake.note_rejection(learner_id):
            logger.warning(
                "round %d: refused an update from learner %d (%s): %s", self.leader.intake.round.round_number, learner_id, code.name, reason
            )
        context.abort(code, reason)

    def Heartbeat(self, request: leader_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> leader_pb2.Ack:
        learner_id = self._caller(context)
        if request.learner_id != learner_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"session belongs to learner {learner_id}, not {request.learner_id}")
        member, message = self.leader.membership(learner_id)
        return leader_pb2.Ack(success=member, message=message)


def leader_gate(roster: Roster, enrolment_token: str | None) -> rpc.Gate:
    """Refuse, before any handler runs, registrations without the enrolment secret and calls without a session token."""

    def check(method: str, metadata: Any) -> rpc.Refusal | None:
        if method == "RegisterLearner":
            if enrolment_token is not None and not rpc.secrets_match(
                rpc.metadata_value(metadata, rpc.ENROLMENT_METADATA_KEY), enrolment_token
            ):
                return (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "RegisterLearner needs this federation's enrolment secret (--token-file or $FL_ENROLMENT_TOKEN)",
                )
            return None
        token = rpc.metadata_value(metadata, rpc.TOKEN_METADATA_KEY)
        if roster.learner_for_token(token) is None:
            return grpc.StatusCode.UNAUTHENTICATED, roster.why_ended(
                token
            ) or f"missing or unknown {rpc.TOKEN_METADATA_KEY}: call RegisterLearner first"
        return None

    return rpc.Gate(rpc.LEADER_SERVICE, check)


def leader_test_data(config: LeaderConfig, task: Task) -> Examples | None:
    """The leader's own test set, or None where the learners evaluate instead (--evaluation learners, or auto without one)
    or nothing is evaluated (--eval-every 0).

    A built-in model's classes are counted from its data, so a built-in task always loads its test set.
    """
    if (config.evaluation == "learners" or config.eval_every == 0) and not task.builtin:
        return None
    try:
        return task.test_data(config.data_dir)
    except (TaskError, DataError, OSError) as error:
        missing = not isinstance(error, TaskError) or isinstance(error.__cause__, OSError | DataError)  # not a broken task
        if config.evaluation != "auto" or task.builtin or not missing:
            raise
        logger.info("the leader has no test data of its own (%s): the learners evaluate on theirs", error)
        return None


def serve(
    config: LeaderConfig, enrolment_token: str | None = None, stop_event: threading.Event | None = None
) -> tuple[Leader, grpc.Server, int, Any]:
    """Load data, build the leader and start its server; returns (leader, server, port, health).

    Setting `stop_event` (when given) stops the leader as a signal does: a launcher's way to end the run.
    """
    task = load_task(config.task) if config.task else builtin_task(config.model, config.dataset, 0, config.seed)
    test_data = leader_test_data(config, task)
    train_data = task.train_data(config.data_dir) if config.data_mode == "split" else None
    tls = rpc.Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca)
    if tls is not None and not tls.serving:
        raise ValueError("--tls-ca on the leader needs --tls-cert and --tls-key too")
    leader = Leader(config, test_data, train_data, tls, stop_event, None if task.builtin else task)
    leader.roster.trusts_registrants = enrolment_token is not None or (tls is not None and tls.ca is not None)
    if checkpoint.remove_partial_writes(Path(config.checkpoint_dir)):
        logger.info("removed partly written checkpoint files left by an earlier run in %s", config.checkpoint_dir)
    if config.resume:
        latest = checkpoint.latest(Path(config.checkpoint_dir))
        if latest is None:
            raise ValueError(f"--resume {config.resume}: no checkpoint in {config.checkpoint_dir}; nothing to resume")
        finished = leader.restore(latest)
        if finished >= config.rounds:
            raise ValueError(
                f"--resume {config.resume}: the run already finished all {finished} rounds; pass --rounds N (N > {finished}) to go on"
            )
    service = rpc.LEADER_SERVICE
    intake = leader.intake
    leader.limits = rpc.CallLimits(
        config.stream_idle_timeout,
        is_member=lambda token: leader.roster.learner_for_token(token) is not None,
        stream_deadlines={
            # a stream may take as long as the peer's own deadline for it, and no longer
            f"/{service}/GetModel": rpc.transfer_timeout(leader.model_bytes),
            f"/{service}/AccumulateGradients": rpc.transfer_timeout(intake.update_bytes),
            f"/{service}/GetData": rpc.transfer_timeout(leader.largest_split_bytes()),
        },
    )
    server, port, health = rpc.create_server(
        lambda server: leader_pb2_grpc.add_LeaderServiceServicer_to_server(LeaderServicer(leader), server),
        config.host,
        config.port,
        # a round's members stream at once (GetModel, an update); more threads than that only cost memory
        max_workers=min(MAX_SERVER_THREADS, max(16, 2 * config.learners + 8)),
        reflection_services=[service] if config.reflection else None,
        gate=leader_gate(leader.roster, enrolment_token),
        tls=tls,
        limits=leader.limits,
        request_deserializers={
            f"/{service}/AccumulateGradients": wire.chunk_deserializer(
                leader_pb2.GradientData, wire.first_message_limit(intake.update_specs)
            )
        },
        response_serializers={f"/{service}/{method}": wire.serialize for method in ("GetModel", "GetData")},  # they yield frames
        health_services=[service],
    )
    return leader, server, port, health


def handle_shutdown_signals(leader: Leader, health: Any) -> Callable[[int, Any], None]:
    """On SIGTERM or SIGINT, say so, turn health NOT_SERVING at once and have the round loop wind down; returns the handler.

    The loop stops at its next check (within half a second; an evaluation stops at its next batch) and
    writes the last completed round; main() then tells the learners to stop and gives calls in flight a
    short grace period. A second Ctrl-C ends the process at once.
    """

    def on_signal(signum: int, frame: Any) -> None:
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # load balancers and probes see it at once
        leader.stop_event.set()
        leader.status.clear()
        logger.warning(
            "%s: stopping after saving the last completed round; press Ctrl-C again to quit at once", signal.Signals(signum).name
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one raises KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return on_signal


def main(argv: list[str] | None = None, stop_event: threading.Event | None = None) -> int:
    """Run a federation from the command line (setting `stop_event` stops it, as Ctrl-C does)."""
    config, verbose, enrolment_token = parse_leader_config(argv)
    run_dir = Path(config.run_dir)
    setup_logging("leader", verbose, config.quiet, run_dir / "leader.log")
    logger.info("config: %s", json.dumps(dataclasses.asdict(config), sort_keys=True))
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        leader, server, port, health = serve(config, enrolment_token, stop_event)
        leader.status.keep_logs_apart()
        recorder = Recorder(run_dir, dataclasses.asdict(config), config.tensorboard, keep_rounds_before=leader.start_round)
        if leader.resumed_metrics is not None:
            recorder.ensure_recorded(leader.resumed_metrics)
    except (DataError, TaskError, OSError, ValueError, TensorBoardMissing) as error:
        print(f"leader: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leader: interrupted while starting", file=sys.stderr)
        return 130
    if enrolment_token is None and config.tls_ca is None and not rpc.is_loopback(config.host):
        logger.warning(
            "listening on %s without an enrolment secret or client certificates: anyone who reaches port %d can join "
            "this federation; set $%s or --token-file, or use --tls-ca",
            config.host,
            port,
            rpc.ENROLMENT_ENV,
        )
    logger.info("serving on %s:%d; waiting for %d learners (python learner.py --leader HOST:%d)", config.host, port, config.learners, port)

    handle_shutdown_signals(leader, health)
    status = 0
    try:
        history = leader.run(recorder)
        if history:
            final = history[-1]
            accuracy = "not evaluated" if final["test_accuracy"] is None else f"test accuracy {100 * final['test_accuracy']:.2f}%"
            logger.info("done: %d rounds, %s; results in %s", len(history), accuracy, run_dir)
    except (RunError, OSError) as error:  # OSError: a checkpoint or metrics write failed
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        leader.status.clear()
        if leader.stop_event.is_set():
            logger.info("stopping: %s", error)
            status = 130
        else:
            logger.error("%s", error)
            status = 1
        leader.stop_learners(str(error))
    except KeyboardInterrupt:  # a second Ctrl-C: no goodbyes
        print("leader: interrupted", file=sys.stderr)
        status = 130
    finally:
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        server.stop(grace=SERVER_STOP_GRACE_S).wait()
        leader.close()
        plot = recorder.close()
        if plot is not None:
            logger.info("plot: %s", plot)
    return status


if __name__ == "__main__":
    sys.exit(main())
