"""The federation's coordinator: holds the global model and runs the blog's round flow over its learners.

Register, hand out the model and data, collect updates, aggregate, repeat. Who is in the federation lives
in roster.py, one round's updates in intake.py, how they become the next model in strategy.py; the gRPC
boundary in service.py; the command line in config/options.py and main.py.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fedgrpc import sharing
from fedgrpc.algorithms.strategy import FIRST_ROUND_NORM_RATIO, Strategy
from fedgrpc.config.options import STRAGGLER_GRACE_FACTOR, STRAGGLER_GRACE_MIN_S, LeaderConfig, kept_momentum
from fedgrpc.console import StatusLine
from fedgrpc.data import IMAGE_SHAPE, Examples, derive_seed, resolve_device, split_by
from fedgrpc.leader import checkpoint
from fedgrpc.leader.buffered_rounds import BufferedRounds, start_pooled
from fedgrpc.leader.federated_eval import FederatedEvaluation
from fedgrpc.leader.intake import Intake, RoundState
from fedgrpc.leader.recorder import Recorder
from fedgrpc.leader.roster import LearnerRecord, MemberChecks, Roster, call_learner, round_members
from fedgrpc.leader.round_report import round_line, round_metrics
from fedgrpc.leader.secure_rounds import SecureRound
from fedgrpc.model import recompute_batchnorm
from fedgrpc.protos import leader_pb2, learner_pb2
from fedgrpc.task import Task, builtin_task, evaluate, task_name
from fedgrpc.transport import rpc, wire
from fedgrpc.transport.tls import Tls

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1000
WAIT_SLICE_S = 0.5  # how often waits wake up to check for shutdown
MAX_PARALLEL_CALLS = 32  # calls to learners in flight at once (round starts, pushes, health checks)
AUTO_ROUND_LIMIT_S = 3600.0  # --round-timeout 0: a round whose quorum never reports while members answer ends here


class RunError(Exception):
    """The federation cannot go on; the message says why."""


@dataclass
class Published:
    """The global model learners train on in round `round_number`, encoded once and framed once for every call that sends it."""

    round_number: int
    nbytes: int  # the model's payload size; the payload itself is not kept, only its framing
    # the model's messages, serialized once (wire.frames): GetModel's replies and the round-start push alike, since
    # ModelState numbers chunk, manifest and round as ModelChunk does (tests/test_protos.py)
    frames: list[bytes]

    @classmethod
    def of(cls, round_number: int, model: Any, buffers: wire.BufferPool | None = None) -> Published:
        """Encode a model's (or its shared part's) state for round `round_number` (in a buffer from `buffers`, given back once framed)."""
        manifest, payload = wire.encode(model.state_dict(), allocate=buffers.take if buffers is not None else bytearray)
        published = cls(round_number, len(payload), list(wire.frames(leader_pb2.ModelChunk, manifest, payload, round=round_number)))
        if buffers is not None:
            buffers.give(payload)  # the frames hold copies
        return published

    def for_job(self, number: int) -> list[bytes]:
        """fedbuff: the model's frames numbered for a learner's job instead of the round."""
        first = leader_pb2.ModelChunk.FromString(self.frames[0])  # one chunk parsed and written again; the rest are shared
        first.round = number
        return [first.SerializeToString(), *self.frames[1:]]

    def state(self, specs: list[wire.TensorSpec]) -> dict[str, torch.Tensor]:
        """The published model's tensors, decoded from its frames (to go back to it after a refused round)."""
        messages = [learner_pb2.ModelState.FromString(frame) for frame in self.frames]
        return wire.receive(messages, max_bytes=self.nbytes, expected=specs).tensors


class Splits:
    """The leader's training set cut into one part per learner, as GetData streams them (none with --data-mode local)."""

    def __init__(self, data: Examples | None, parts: list[torch.Tensor] | None) -> None:
        self.data = data
        self.parts = parts
        # what GetData streams: each tensor of the training set with the example count left off
        self.layout = [] if data is None else wire.specs_of(dict(zip(data.tensor_names(), (t[0] for t in data.tensors), strict=True)))

    @classmethod
    def of(cls, config: LeaderConfig, data: Examples | None) -> Splits:
        """The training set split as --partition says among --learners parts (None: learners hold their own data)."""
        if data is None:
            return cls(None, None)
        return cls(data, split_by(config.partition, data, config.learners, config.alpha, config.classes_per_learner, config.seed))

    def examples(self, learner_id: int) -> int:
        """Examples in a learner's data split (0 when learners hold their own data)."""
        return 0 if self.parts is None else len(self.parts[learner_id])

    def largest_bytes(self) -> int:
        """Bytes of the largest data split GetData streams (0 when learners hold their own data)."""
        return 0 if self.parts is None else max(len(part) for part in self.parts) * wire.payload_bytes(self.layout)

    def data_for(self, learner_id: int) -> Examples:
        """A learner's split of the training set."""
        if self.data is None or self.parts is None:
            raise rpc.RequestRefused(grpc.StatusCode.FAILED_PRECONDITION, "this leader holds no training data (--data-mode local)")
        return self.data.subset(self.parts[learner_id])


def checkpoint_due(config: LeaderConfig, round_number: int, stopping: bool, seconds_since_saved: float) -> bool:
    """Whether round `round_number` is written: the last round, on shutdown, every --checkpoint-every rounds, or
    --checkpoint-seconds after the last write."""
    if round_number == config.rounds or stopping:
        return True
    if config.checkpoint_every and round_number % config.checkpoint_every == 0:
        return True
    return seconds_since_saved >= config.checkpoint_seconds


class Leader:
    """The federation's coordinator: holds the global model and runs rounds through its roster, intake and strategy."""

    def __init__(
        self,
        config: LeaderConfig,
        test_data: Examples | None,
        train_data: Examples | None,
        tls: Tls | None = None,
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
        # what is federated (--share): the leader publishes, checks, aggregates and saves these tensors and no others
        self.share, self.shared, whole = sharing.leader_part(self.model, self.task, config.share, config.aggregation, config.evaluation)
        self.specs = wire.specs_of(self.shared.state_dict())
        self.model_bytes = wire.payload_bytes(self.specs)
        self.splits = Splits.of(config, train_data)
        self.stop_event = stop_event or threading.Event()  # set by a signal (or by a launcher) to wind the run down
        self.status = StatusLine(enabled=False if config.quiet else None)
        self.history: list[dict[str, Any]] = []
        self.started = False  # training has begun: a newcomer joins the round after the open one
        self.start_round = 1
        self.resumed_metrics: dict[str, Any] | None = None
        self.limits: rpc.CallLimits | None = None  # set by serve()
        self._cond = threading.Condition()  # guards the roster's records and the open round, shared by both
        self._calls = ThreadPoolExecutor(max_workers=MAX_PARALLEL_CALLS, thread_name_prefix="learner-call")
        self.roster = Roster(config, tls, self._cond, self._calls, self.splits.examples, self._first_round)
        variance_names = [name for name, _ in self.shared.named_buffers() if name.endswith("running_var")]
        self.strategy = Strategy(config, self.shared, Path(config.checkpoint_dir) if config.checkpoint_dir else None)
        self.intake = Intake(config, self.specs, self.strategy.parameter_names, variance_names, self.roster, self._cond)
        self.roster.on_absent = self._note_lost
        self.buffered = BufferedRounds(self) if config.aggregation == "fedbuff" else None
        # with a personal part that trains, the leader's copy is no one's model: only the learners can evaluate
        self.central_evaluation = test_data is not None and whole
        self.learners_evaluate = config.learners_evaluate(leader_has_test_data=self.central_evaluation)
        self.federated_evaluation = FederatedEvaluation(self.roster, self._calls, config.evaluation_learners, config.seed)
        # secure aggregation: every entry of a learner's update lies within this bound (its parameters' L2 norm included)
        self.secagg_bound = config.clip_norm or FIRST_ROUND_NORM_RATIO * self.strategy.model_norm
        self._publish_buffers = wire.BufferPool(self.model_bytes, keep=1)  # each round's model is encoded here, then framed
        self._published = Published.of(1, self.shared)
        self._saved_round = 0  # the last round on disk
        self._saved_at = time.monotonic()
        self.plan = training_plan(config, self.task, self.num_classes, wire.specs_of(self.model.state_dict()), self.learners_evaluate)
        self.plan.MergeFrom(leader_pb2.TrainingPlan(share=self.share, shared_fingerprint=wire.fingerprint(self.specs)))
        self.roster.expected_task = (self.plan.task, self.plan.model_fingerprint)

    def restore(self, json_path: Path) -> int:
        """Continue from a checkpoint: global model, server optimizer state and round. Returns its round."""
        record = checkpoint.read_run_record(json_path)
        saved = task_name(record["config"]["task"]) if record["config"]["task"] else record["config"]["model"]
        if saved != self.task.name or record["num_classes"] != self.num_classes:
            raise ValueError(f"{json_path} holds a {saved} with {record['num_classes']} classes, not this run's {self.task.name}")
        model_manifest = checkpoint.manifest(self.shared.state_dict())
        weights, optimizer_tensors, spent = checkpoint.load_run(json_path, record, model_manifest, self.strategy.optimizer_manifest())
        self.shared.load_state_dict(weights)
        self.strategy.restore(optimizer_tensors, spent)
        if self.strategy.accountant is not None and spent > record["round"]:
            logger.info("counting %d noised rounds as spent, %d of them after the checkpoint resumed from", spent, spent - record["round"])
        self.start_round = record["round"] + 1
        self.resumed_metrics = record["metrics"]
        self._published = Published.of(self.start_round, self.shared)
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

    def published(self) -> Published:
        """The current global model, encoded."""
        return self._published

    def model_chunks_for(self, learner_id: int) -> tuple[list[bytes], int]:
        """GetModel's replies for a learner and the model's size: in fedbuff numbered for its job, which trains on this version."""
        with self._cond:
            published = self._published
            if self.intake.jobs is None:
                return published.frames, published.nbytes
            job = self.intake.jobs.bind(learner_id, published.round_number)
        return published.for_job(job.number), published.nbytes

    # ---- the round loop -----------------------------------------------------------------------------------------

    def run(self, recorder: Recorder | None = None) -> list[dict[str, Any]]:
        """Wait for the learners, run every round, tell learners to stop; returns per-round metrics.

        On shutdown (stop_event) the last completed round is written to disk before RunError says so.
        """
        config = self.config
        try:
            self.wait_for_learners()
            start = time.monotonic()
            if self.buffered is not None:
                self.buffered.open(self.start_round)
            else:
                self.begin_round(self.open_round(self.start_round))
            for round_number in range(self.start_round, config.rounds + 1):
                finished = self.buffered.collect(round_number, start) if self.buffered is not None else self.collect(round_number, start)
                metrics = self.close_round(finished, start)
                self.history.append(metrics)
                if checkpoint_due(config, round_number, self.stop_event.is_set(), time.monotonic() - self._saved_at):
                    self.save(metrics)
                if recorder is not None:
                    recorder.record(metrics)
                self.status.clear()
                logger.info("%s", round_line(metrics, config.rounds))
                self._check_stop(metrics)
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
            records = round_members(self.roster.alive(), config, round_number)
            claims = [self.intake.max_examples(record.num_examples) for record in records]
            max_weight = self.strategy.max_weight(claims)
            quorum = config.round_quorum(len(records))
            secure = None
            if config.secure_aggregation:
                # an update's weight is its examples over this cap, so that the leader learns only the round's total weight
                weight_cap = 0.0 if self.strategy.unweighted else min(float(max(claims)), max_weight)
                size = self.intake.update_specs[0].shape[0]
                secure = SecureRound.of(config, round_number, records, self.secagg_bound, weight_cap, size, self.roster, self._calls)
                quorum = max(quorum, secure.threshold)
            return self.intake.open(round_number, records, quorum, self.strategy.norm_bound(), max_weight, secure)

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
                return start_pooled(record, current.round_number)
            return self._start(record, None if record.learner_id in newcomers else published.frames, published.nbytes)

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
        accuracies = [entry.get("test_accuracy") or entry.get("fed_eval_accuracy") for entry in self.history]
        accuracies = [accuracy for accuracy in accuracies if accuracy is not None]  # the leader's, else the learners' mean
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
                finished.running = finished.secure.unmask(self.shared.state_dict(), self.strategy.parameter_names)
            mean = self.strategy.aggregate(finished)
        except ValueError as error:  # secagg.SecAggError among them
            raise RunError(f"round {round_number}: {error}; the model is unchanged") from None
        problem = self.strategy.step(round_number, mean, finished, lambda: self._published.state(self.specs))
        round_seconds = time.monotonic() - finished.opened_at
        self._published = Published.of(round_number + 1, self.shared, self._publish_buffers)
        if self.intake.jobs is not None:
            with self._cond:  # the buffer filling now is bounded by this round's norms, as the next round would be
                self.intake.round.norm_bound = self.strategy.norm_bound()
            if round_number < config.rounds:
                self.buffered.dispatch()  # the learners the filled buffer freed train on the model it made
        elif round_number < config.rounds:
            # learners start the next round now; this one is evaluated and saved while they train
            # (the model is not touched again before the next collect, which this thread runs after)
            self.begin_round(self.open_round(round_number + 1))
        if config.recompute_bn:  # after publishing: learners train BatchNorm on batch statistics, not these
            self.recompute_batchnorm(round_number)
        evaluated = config.eval_every > 0 and (round_number % config.eval_every == 0 or round_number == config.rounds)
        if evaluated:
            self.status.show(f"round {round_number}/{config.rounds}: evaluating the new global model")
        central = (self.evaluate() if evaluated and self.central_evaluation else None) or {}
        federated = self.evaluate_on_learners(finished) if evaluated and self.learners_evaluate else {}
        return round_metrics(
            finished,
            central,
            federated,
            self.strategy,
            mean,
            model_rejected=problem is not None,
            most_training=self.intake.jobs.most_training if self.intake.jobs is not None else None,
            round_seconds=round_seconds,
            elapsed_seconds=time.monotonic() - start,
        )

    def save(self, metrics: dict[str, Any]) -> None:
        """Write the global model and server optimizer state as the checkpoint of metrics' round."""
        checkpoint.save(
            Path(self.config.checkpoint_dir),
            metrics["round"],
            self.shared.state_dict(),
            {"config": dataclasses.asdict(self.config), "metrics": metrics, "num_classes": self.num_classes},
            keep=self.config.keep_checkpoints,
            optimizer_state=self.strategy.optimizer_tensors(),
        )
        self._saved_round = metrics["round"]
        self._saved_at = time.monotonic()

    def _check_stop(self, metrics: dict[str, Any] | None = None) -> None:
        """RunError on shutdown, or after a round (`metrics`) that showed the run cannot learn as configured."""
        if self.stop_event.is_set():
            raise RunError("leader shutting down")
        if metrics is not None and (hopeless := self.strategy.hopeless(metrics["learners_reported"])) is not None:
            raise RunError(f"round {metrics['round']}: {hopeless}")

    def stop_learners(self, reason: str) -> None:
        """Tell every learner to stop (roster.stop_all)."""
        self.roster.stop_all(reason)

    def recompute_batchnorm(self, round_number: int) -> None:
        """Recompute the global model's BatchNorm statistics from --recompute-bn training examples, drawn anew each round."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "batchnorm", round_number))
        data = self.train_data
        chosen = torch.randperm(len(data), generator=generator)[: self.config.recompute_bn].split(EVAL_BATCH_SIZE)
        recompute_batchnorm(self.model, (self.task.make_batch(data.tensors, part, None, torch.contiguous_format)[0] for part in chosen))

    def evaluate(self) -> dict[str, float] | None:
        """Test loss and the task's metrics of the global model on the leader's test set; None when shutdown interrupts it."""
        return evaluate(self.model, self.task, self.test_data, self.device, EVAL_BATCH_SIZE, stop=self.stop_event.is_set)

    def evaluate_on_learners(self, finished: RoundState) -> dict[str, float | int]:
        """The learners that reported in `finished` evaluate the model it made on their own test data (federated_eval)."""
        states = self._published.for_job(finished.round_number)
        return self.federated_evaluation.run(finished, states, self._published.nbytes, self.stop_event.is_set)

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
        keep_momentum=kept_momentum(config),
        compression=config.compression,
        topk_ratio=config.topk_ratio,
        lr_schedule=config.lr_schedule,
        warmup_rounds=config.warmup_rounds,
        secure_aggregation=config.secure_aggregation,
        personal_steps=config.personal_steps,
    )
