"""The learner: registers with the leader, trains on its data each round, and reports its update."""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from fedgrpc.config.options import LearnerConfig
from fedgrpc.console import printable, setup_logging
from fedgrpc.data import DataError, Examples, resolve_device
from fedgrpc.leader.federated_eval import LocalEvaluation
from fedgrpc.learner.data import (
    LeaderLost,
    LearnerError,
    Stopped,
    check_data,
    check_model,
    fetch_split,
    layout_specs,
    load_local_data,
    split_specs,
)
from fedgrpc.learner.momentum import MomentumStore
from fedgrpc.learner.options import parse_learner_config
from fedgrpc.learner.personal import PersonalStore, share_as_planned
from fedgrpc.learner.secagg_party import SecAggParty, masked_tensors
from fedgrpc.learner.service import MAX_STRANGER_CALLS, create_server
from fedgrpc.learner.training import LocalTrainer
from fedgrpc.model import compiled_for_training, memory_format_for
from fedgrpc.protos import leader_pb2
from fedgrpc.task import Task, TaskError, builtin_task, load_task
from fedgrpc.transport import compression, rpc, wire
from fedgrpc.transport.tls import Tls, speaks_tls, tls_mismatch

# the learner and what it builds on, for pools, the client API and tests
__all__ = [
    "MAX_STRANGER_CALLS",
    "LeaderLost",
    "Learner",
    "LearnerConfig",
    "LearnerError",
    "Stopped",
    "create_server",
    "layout_specs",
    "main",
    "send_update",
    "split_specs",
]

logger = logging.getLogger(__name__)

# One registration attempt, after which the learner says it is waiting; the leader calls this learner back (up to
# 3 s) before it answers, and a retried registration gets the same identity.
REGISTER_ATTEMPT_S = 5.0
# Pause between registrations refused for now (a full federation, a busy leader): drawn from 1-2x this, so that
# learners refused together do not all come back in the same instant.
REGISTER_RETRY_S = 2.0
HEARTBEAT_INTERVAL_S = 5.0  # how often a waiting learner checks that the leader still counts it as a member
# An update refused as busy (RESOURCE_EXHAUSTED) or answered too late (DEADLINE_EXCEEDED) is sent again, up to this
# many times in all, after a pause of SEND_RETRY_PAUSE_S times the attempt number.
SEND_ATTEMPTS = 3
SEND_RETRY_PAUSE_S = 1.0
RETRIED_SEND_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
RECEIVE_BUFFERS_KEPT = 2  # one being read into the model, one for a model pushed meanwhile
# Pause before registering again after losing the leader: doubling from the first
# value up to the cap, each drawn at random from its upper half, so that a hundred
# learners whose leader restarted do not all register in the same instant.
REJOIN_BACKOFF_S = 1.0
REJOIN_BACKOFF_MAX_S = 30.0


class Learner:
    """One learner's state: its model, its data and the round it is in."""

    def __init__(
        self,
        config: LearnerConfig,
        enrolment_token: str | None = None,
        tls: Tls | None = None,
        task: Task | None = None,
        personal: PersonalStore | None = None,
        momentum: MomentumStore | None = None,
    ) -> None:
        self.config = config
        # the user's task (--task), or None to follow the leader's built-in model; its model is built now, so that
        # registration can name the task and its manifest's digest
        self.user_task = task
        self.task: Task | None = None  # what this learner trains, once the plan came
        self._task_model = task.model() if task is not None else None
        self.tls = tls
        self._enrolment_metadata = ((rpc.ENROLMENT_METADATA_KEY, enrolment_token),) if enrolment_token else ()
        self.device = resolve_device(config.device)
        # the layout convolutions run in, chosen once the plan names the model; the state is the same values either way
        self.memory_format = torch.contiguous_format
        self.callback_token = secrets.token_urlsafe(32)
        self.channel = rpc.channel(config.leader, tls)
        self.stub = rpc.leader_stub(self.channel, self._first_message_limit)
        self.model: torch.nn.Module | None = None
        self._forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # the model, or with --compile its compiled form
        self.specs: list[wire.TensorSpec] | None = None  # the shared tensors: what the leader sends and takes back
        self.shared: Any = None  # the model's shared part (sharing.part): the model itself when all is shared
        self.personal_names: list[str] = []  # what --share keeps here, never sent
        self.personal = personal or PersonalStore()
        self.momentum = momentum or MomentumStore()  # the kept momentum (keep_momentum) of this and earlier sessions
        self.learner_id = -1
        self.former_learner_id: int | None = None  # the id an earlier session held, asked back at registration
        self.split_examples = 0  # examples of the split the leader sends (GetData); 0 with local data
        self.plan: leader_pb2.TrainingPlan | None = None
        self.data: Examples | None = None
        self.own_examples = 0  # a client script's own data (client.py): the examples it declares; 0 for learner.py
        self.split_layout: list[wire.TensorSpec] = []  # what GetData streams, one example each (AckWithMetadata.split_layout)
        self.evaluation: LocalEvaluation | None = None  # where the leader asks learners to evaluate on their own test data
        self.trainer: LocalTrainer | None = None  # the round's local work, once prepared
        self.rounds_trained = 0
        self.rounds_started = 0
        self.round_state: dict[str, torch.Tensor] | None = None  # the round's global model, where kept (rounds())
        self._session_token = ""
        self._cond = threading.Condition()
        self._started = False
        # a pushed model waiting for the round loop: (round, tensors, the buffer the tensors view)
        self._pending: tuple[int, dict[str, torch.Tensor], bytearray | None] | None = None
        # received models land in kept buffers: the first write to a fresh 45 MB one costs 20-25 ms of page faults
        self._receive_buffers: wire.BufferPool | None = None
        self._stop_reason: str | None = None
        self._residual: dict[str, torch.Tensor] = {}  # topk's error feedback: what earlier rounds left unsent
        self._send_buffers: wire.BufferPool | None = None  # one update buffer, reused: a fresh one pays its page faults
        self.secagg = SecAggParty(self._cond)  # under secure aggregation: this learner's side of each round's stages

    # ---- calls from the leader (through LearnerServicer) ----------------------

    def start(self) -> str:
        """Let the round loop begin."""
        with self._cond:
            already = self._started
            self._started = True
            self._cond.notify_all()
        return "already training" if already else "training started"

    def offer_state(self, round_number: int, tensors: dict[str, torch.Tensor], payload: bytearray | None = None) -> None:
        """Keep a pushed global model (whose tensors view `payload`) until the round loop takes it."""
        with self._cond:
            if self._pending is None or round_number > self._pending[0]:
                replaced, self._pending = self._pending, (round_number, tensors, payload)
                payload = replaced[2] if replaced is not None else None
            self._cond.notify_all()
        self._give_back(payload)  # the one replaced or not kept: nothing will read it

    def receive_buffer(self, size: int) -> bytearray:
        """A buffer for a received model: a kept one when there is one."""
        return self._receive_buffers.take(size) if self._receive_buffers is not None else bytearray(size)

    def _give_back(self, payload: bytearray | None) -> None:
        """Return a received model's buffer for reuse once nothing reads its tensors."""
        if payload is not None and self._receive_buffers is not None:
            self._receive_buffers.give(payload)

    def stop(self, reason: str) -> None:
        """End the round loop at its next wait."""
        with self._cond:
            self._stop_reason = reason or "told to stop"
            self._cond.notify_all()

    # ---- the learner's own work ------------------------------------------------

    def register(self, advertise_address: str) -> None:
        """Join the federation, retrying while the leader is not up yet (bounded by --connect-timeout)."""
        info = leader_pb2.LearnerInfo(
            network_addr=advertise_address,
            callback_token=self.callback_token,
            num_examples=len(self.data) if self.data is not None else self.own_examples,
            version=rpc.PROTOCOL_VERSION,
            tls=self.tls is not None and self.tls.serving,
            task=self.user_task.name if self.user_task is not None else "",
            model_fingerprint=wire.fingerprint(wire.specs_of(self._task_model.state_dict())) if self._task_model is not None else "",
            former_learner_id=self.former_learner_id,
        )
        reply = register_until_admitted(self.stub, info, self.config, self._enrolment_metadata)
        self.learner_id = reply.learner_id
        self.split_examples = reply.split_examples
        self.split_layout = layout_specs(reply.split_layout)
        self.plan = reply.plan
        self._session_token = reply.session_token
        joins = f", joining from round {reply.joins_round}" if reply.joins_round > 1 else ""
        logger.info(
            "registered as learner %d of %d: %s, %s, batch %d%s",
            reply.learner_id,
            reply.max_learners,
            self.plan.model,
            self.plan.aggregation,
            self.plan.batch_size,
            joins,
        )

    def prepare(self, train: bool = True) -> None:
        """Build the model the plan names and fetch the data split when the leader holds the data.

        With `train` False (a client's own loop trains, client.py) only the model, its checks and the held-out data are
        prepared.
        """
        plan = self.plan
        if plan.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: an op without such a kernel still runs
        task = self.user_task or builtin_task(plan.model, plan.dataset, plan.num_classes, plan.seed)
        self.task = task
        self.memory_format = memory_format_for(self.config.channels_last, plan.model, self.device)
        model = self._task_model if self._task_model is not None else task.model()
        self.model = model.to(self.device, memory_format=self.memory_format)
        self._forward = compiled_for_training(self.model, self.device) if self.config.compile else self.model
        check_model(wire.specs_of(self.model.state_dict()), plan)
        self.shared, self.personal_names, self.specs = share_as_planned(self.model, plan, task, self.personal)
        self._receive_buffers = wire.BufferPool(wire.payload_bytes(self.specs), keep=RECEIVE_BUFFERS_KEPT)
        if plan.learners_evaluate:
            self.evaluation = own_evaluation(self, task)
        if not train:
            return
        if self.data is None:
            self.data = self._fetch_data()
        check_data(self.data, plan)
        self.trainer = LocalTrainer(
            plan,
            self.learner_id,
            self.model,
            self._forward,
            task,
            tuple(tensor.to(self.device) for tensor in self.data.tensors),
            self.memory_format,
            progress=self.config.progress and not self.config.quiet,
            slowdown=self.config.slowdown,
            shared=self.shared,
            kept=self.momentum,
            owner=self.learner_id if self.split_examples else -1,  # a split from the leader is this id's; own data is ours
        )
        if self.evaluation is not None and plan.personal_steps:
            self.evaluation.finetune = self.trainer.finetune

    def keep_personal(self, round_number: int) -> None:
        """After a round's training: keep the personal part (and write it under --personal-dir)."""
        if self.personal_names:
            self.personal.keep(round_number, self.model, self.personal_names)

    def _first_message_limit(self) -> int:
        """Most bytes the first message of a stream from the leader may take: a model's or a data split's manifest (what
        GetData must stream: split_examples examples of the layout registration announced), a chunk, a header."""
        if self.specs is not None or self.plan is None:
            return wire.first_message_limit(self.specs or [])
        return wire.first_message_limit(split_specs(self.split_examples, self.split_layout))

    def _fetch_data(self) -> Examples:
        """GetData: this learner's split, exactly as many examples of the layout as registration said."""
        try:
            data, nbytes = fetch_split(self.stub, self.learner_id, self.split_examples, self.split_layout, self.plan, self._metadata())
        except grpc.RpcError as error:
            raise self._call_failed("GetData", error) from None
        logger.info("received %d training examples (%.1f MB)", len(data), nbytes / 1e6)
        return data

    def _call_failed(self, what: str, error: grpc.RpcError) -> LearnerError:
        """The error to raise for a failed call: LeaderLost when the leader is unreachable or no longer knows us."""
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:  # marked absent, slot given away, or a restarted leader
            return LeaderLost(f"{what} failed: the leader at {self.config.leader} ended this learner's session ({error.details()})")
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return LeaderLost(f"{what} failed ({error.code().name}): the leader at {self.config.leader} went away")
        return LearnerError(f"{what} failed: {error.code().name}: {error.details()}")

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return rpc.token_metadata(self._session_token)

    def run(self) -> str:
        """Wait for StartTraining, then train round after round until told to stop; returns the reason."""
        try:
            for round_number in self.rounds():
                update, num_examples, loss = self._train(round_number)
                self.keep_personal(round_number)
                self._raise_if_stopped()
                self.report(round_number, update, num_examples, loss)
        except Stopped as stop:
            if self.rounds_started == 0:
                raise  # told to stop before training: the caller says so
            return str(stop)
        return self._stop_reason or "told to stop"

    def rounds(self) -> Iterator[int]:
        """Each round (under fedbuff, each job) this learner takes part in, yielded once its global model is in self.model.

        The caller does the round's work and report()s it; the next round's model is awaited when the caller asks for
        it. Raises Stopped when the leader says stop (before the first round, or while a round is under way).
        """
        self._wait(lambda: self._started, "StartTraining")
        round_number, state, payload = self._get_model()
        while True:
            self.shared.load_state_dict(state)  # the personal part stays as this learner's training left it
            # the round's model, kept past the buffer's reuse: secure aggregation sends buffers as changes from it,
            # and a client's update is the change from it
            self.round_state = {name: tensor.clone() for name, tensor in state.items()} if self.keeps_round_state() else None
            self._give_back(payload)  # the model holds its own copy now
            self.rounds_started += 1
            yield round_number
            self.rounds_trained += 1
            self._wait(lambda: self._pending is not None and self._pending[0] > round_number, "the next global model")
            with self._cond:
                (round_number, state, payload), self._pending = self._pending, None

    def keeps_round_state(self) -> bool:
        """Whether each round's global model is kept beside the trained one (see rounds()): a client's update is the change from it."""
        return self.plan.secure_aggregation or self.own_examples > 0

    def _raise_if_stopped(self) -> None:
        with self._cond:
            if self._stop_reason is not None:
                raise Stopped(self._stop_reason)

    def _raise_if_stopped_within(self, seconds: float) -> None:
        """Wait `seconds` unless a stop comes first, then raise Stopped if one came."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop_reason is not None, timeout=seconds)
        self._raise_if_stopped()

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Wait for `ready` or a stop, checking every few seconds that the leader is still alive."""
        interval = min(HEARTBEAT_INTERVAL_S, self.config.leader_lost_after / 3)
        silent_since: float | None = None
        with self._cond:
            while True:
                if self._stop_reason is not None:
                    raise Stopped(self._stop_reason)
                if ready():
                    return
                if self._cond.wait(interval):
                    continue
                self._cond.release()
                try:
                    alive = self._heartbeat(interval)
                finally:
                    self._cond.acquire()
                now = time.monotonic()
                silent_since = None if alive else (silent_since or now)
                if silent_since is not None and now - silent_since >= self.config.leader_lost_after:
                    raise LeaderLost(f"lost the leader at {self.config.leader} while waiting for {what}")

    def _heartbeat(self, timeout: float) -> bool:
        """Whether the leader answered; raises LeaderLost when it no longer counts this learner as a member."""
        try:
            reply = self.stub.Heartbeat(leader_pb2.HeartbeatRequest(learner_id=self.learner_id), timeout=timeout, metadata=self._metadata())
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:  # marked absent, or a restarted leader
                raise LeaderLost(f"the leader at {self.config.leader} ended this learner's session ({error.details()})") from None
            return False
        if not reply.success:
            raise LeaderLost(f"the leader dropped this learner: {reply.message}")
        return True

    def _get_model(self) -> tuple[int, dict[str, torch.Tensor], bytearray]:
        """GetModel: the current global model, checked against the local architecture; with the buffer its tensors view."""
        model_bytes = wire.payload_bytes(self.specs)
        responses = self.stub.GetModel(leader_pb2.Empty(), timeout=rpc.transfer_timeout(model_bytes), metadata=self._metadata())
        try:
            received = wire.receive(responses, max_bytes=model_bytes, expected=self.specs, allocate=self.receive_buffer)
        except grpc.RpcError as error:
            raise self._call_failed("GetModel", error) from None
        except wire.WireError as error:
            raise LearnerError(f"the leader's model does not fit this learner's {self.plan.model}: {error}") from None
        return received.header.round, received.tensors, received.payload

    def _superseded(self, round_number: int) -> Callable[[], bool]:
        """Whether a later round has begun (its model or its secure aggregation came): a wait for round `round_number` is over."""

        def over() -> bool:
            pending = self._pending
            return (pending is not None and pending[0] > round_number) or self.secagg.newest_round() > round_number

        return over

    def _train(self, round_number: int) -> tuple[dict[str, torch.Tensor], int, float]:
        """Do round `round_number`'s local work; returns (update, examples used, mean loss)."""
        return self.trainer.train(round_number)

    def report(self, round_number: int, update: dict[str, torch.Tensor], num_examples: int, loss: float) -> None:
        """AccumulateGradients: stream the round's update (masked under secure aggregation); a stale round is logged, not
        fatal; a busy or late answer is retried."""
        round_state = self.round_state
        if self.plan.secure_aggregation:
            # the leader runs stage 3 as the round starts; waiting heartbeats, so a session the leader ended ends the wait
            superseded = self._superseded(round_number)
            self._wait(
                lambda: superseded() or self.secagg.reached(round_number, collected=True) is not None, "the round's masking partners"
            )
            current = self.secagg.reached(round_number, collected=True)
            if current is None:
                logger.warning(
                    "round %d: not among the round's secure aggregation (the leader went on without it); update not sent", round_number
                )
                return
            parameters = [name for name, _ in self.shared.named_parameters()]
            update = masked_tensors(current, self.secagg.encode(current, update, round_state, parameters, num_examples))
        else:
            update = compress_for_plan(update, self.plan, self.shared, self._residual)
        if self._send_buffers is None:
            self._send_buffers = wire.BufferPool(wire.payload_bytes(wire.specs_of(update)), keep=1)
        manifest, payload = wire.encode(update, allocate=self._send_buffers.take)

        def before_retry(error: grpc.RpcError, pause: float) -> None:
            self._raise_if_stopped()  # the leader said stop while this update was under way
            logger.warning(
                "%s %d: update not taken (%s: %s); sending it again", work_unit(self.plan), round_number, error.code().name, error.details()
            )
            self._raise_if_stopped_within(pause)

        header = {"learner_id": self.learner_id, "round": round_number, "num_examples": num_examples, "train_loss": loss}
        try:
            reply = send_update(self.stub, manifest, payload, header, self._metadata(), before_retry)
        except UpdateNotTaken as refusal:
            self._raise_if_stopped()
            logger.warning("%s %d: update not taken: %s", work_unit(self.plan), round_number, refusal)
            return
        except grpc.RpcError as error:
            self._raise_if_stopped()
            raise self._call_failed(f"sending the {work_unit(self.plan)} {round_number} update", error) from None
        finally:
            self._send_buffers.give(payload)  # the calls are over: nothing reads the payload any more
        logger.info(
            "%s %d: sent update (%d examples, loss %.4f): %s", work_unit(self.plan), round_number, num_examples, loss, reply.message
        )


def work_unit(plan: leader_pb2.TrainingPlan) -> str:
    """What the leader numbers a learner's work by: rounds, or under fedbuff its own training jobs."""
    return "job" if plan.aggregation == "fedbuff" else "round"


def own_evaluation(learner: Learner, task: Task) -> LocalEvaluation:
    """The evaluations the leader asks a learner for, on its held-out data (its task's test_data(--data-dir)), with
    its personal part where --share keeps one."""
    try:
        data = task.test_data(learner.config.data_dir)
    except (TaskError, DataError, OSError) as error:
        raise LearnerError(f"the leader asks learners to evaluate on their own test data, and this one has none: {error}") from None
    logger.info("evaluating global models on %d held-out examples of this learner's own", len(data))
    stopping = lambda: learner._stop_reason is not None  # noqa: E731
    personal = learner.personal.of_round if learner.personal_names else None
    loaded = {spec.name for spec in learner.specs}  # what a global model carries: the shared tensors
    return LocalEvaluation(task, data, learner.model, learner.device, stopping, personal=personal, loaded=loaded)


def register_until_admitted(
    stub: Any, info: leader_pb2.LearnerInfo, config: LearnerConfig, metadata: tuple[tuple[str, str], ...]
) -> leader_pb2.AckWithMetadata:
    """RegisterLearner, retried while the leader is not up yet or has no slot (bounded by --connect-timeout)."""
    deadline = time.monotonic() + config.connect_timeout
    attempts = 0
    refusals = 0
    last_refusal = ""
    tls_answered = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if refusals:
                raise LearnerError(
                    f"the leader at {config.leader} had no slot for this learner within "
                    f"{config.connect_timeout:.0f}s (--connect-timeout): {last_refusal}"
                )
            raise LearnerError(
                f"no leader answered at {config.leader} within {config.connect_timeout:.0f}s: check --leader and that leader.py is running"
            )
        if not tls_answered and not refusals:  # until the leader answers a TLS probe: a mismatch waiting cannot mend
            theirs = speaks_tls(config.leader)
            tls_answered = theirs is not None
            mismatch = tls_mismatch(config.leader, info.tls, "leader", theirs) if tls_answered else None
            if mismatch is not None:
                raise LearnerError(mismatch)
        if attempts == 1 and not refusals:
            logger.info("waiting for the leader at %s (up to %.0fs)", config.leader, config.connect_timeout)
        attempts += 1
        try:
            # wait_for_ready: gRPC itself waits, reconnecting with capped backoff, for a leader still starting;
            # retrying is safe because the leader answers a repeated registration with the same identity
            return stub.RegisterLearner(info, timeout=min(REGISTER_ATTEMPT_S, remaining), wait_for_ready=True, metadata=metadata)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # full, or busy: a slot may free up
                last_refusal = error.details()
                if not refusals:
                    logger.warning("%s; waiting for a slot (up to %.0fs, --connect-timeout)", last_refusal, remaining)
                refusals += 1
                time.sleep(min(remaining, REGISTER_RETRY_S * (1 + random.random())))  # nothing to wake for: not a peer's answer
                continue
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise LearnerError(f"the leader refused registration: {error.details()}") from None


class UpdateNotTaken(Exception):
    """The leader refused an update as not for the open round (FAILED_PRECONDITION); the message is its reason."""


def send_update(
    stub: Any,
    manifest: Any,
    payload: bytearray,
    header: dict[str, Any],
    metadata: tuple[tuple[str, str], ...],
    before_retry: Callable[[grpc.RpcError, float], None],
) -> leader_pb2.Ack:
    """AccumulateGradients for one update (header: GradientData's fields), sent again when the leader is busy or answers late.

    Sending the same update again is safe: the leader counts an identical update once per round. Before each retry
    `before_retry(error, pause)` runs and waits `pause` seconds (or raises to give up). Raises UpdateNotTaken when the
    round closed without it, and the last grpc.RpcError when retrying cannot help.
    """
    for attempt in range(1, SEND_ATTEMPTS + 1):
        messages = wire.frames(leader_pb2.GradientData, manifest, payload, **header)
        try:
            return stub.AccumulateGradients(messages, timeout=rpc.transfer_timeout(len(payload)), metadata=metadata)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise UpdateNotTaken(error.details()) from None
            if error.code() not in RETRIED_SEND_CODES or attempt == SEND_ATTEMPTS:
                raise
            before_retry(error, SEND_RETRY_PAUSE_S * attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def compress_for_plan(
    update: dict[str, torch.Tensor], plan: leader_pb2.TrainingPlan, model: Any, residual: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """An update as the plan's --compression sends it (top-k keeps what it leaves out in `residual` for the next round)."""
    if not plan.compression or plan.compression == "none":
        return update
    parameters = [name for name, _ in model.named_parameters()]
    return compression.compress(update, plan.compression, plan.topk_ratio, sparse_names=parameters, residual=residual)


def rejoin_pause(attempt: int, draw: float) -> float:
    """Seconds to pause before the `attempt`-th re-registration (0-based), for a uniform `draw` in [0, 1)."""
    ceiling = min(REJOIN_BACKOFF_MAX_S, REJOIN_BACKOFF_S * 2**attempt)
    return ceiling * (0.5 + draw / 2)


def advertise_address_for(config: LearnerConfig, port: int) -> str:
    """The address the leader should call us at: --advertise-address, or our address on the route to the leader."""
    if config.advertise_address:
        rpc.parse_address(config.advertise_address)
        return config.advertise_address
    if config.host not in ("0.0.0.0", "::", "[::]"):
        return f"[{config.host}]:{port}" if ":" in config.host else f"{config.host}:{port}"
    leader_host, leader_port = rpc.parse_address(config.leader)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((leader_host.strip("[]"), leader_port))  # UDP connect sends nothing; it only picks a route
            own_host = probe.getsockname()[0]
    except OSError:
        own_host = socket.gethostname()
    return f"{own_host}:{port}"


def main(argv: list[str] | None = None) -> int:
    """Run a learner from the command line."""
    config, verbose, enrolment_token, tls = parse_learner_config(argv)
    setup_logging("learner", verbose, config.quiet, log_format=config.log_format)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        task = load_task(config.task) if config.task else None
        local_data = None
        if config.data_dir:
            local_data = task.train_data(config.data_dir) if task is not None else load_local_data(config.data_dir)
        attempt = 0
        # these outlive a session: a learner that rejoins keeps its personal part, its momentum and (asked back) its id
        personal, momentum, former_id = PersonalStore(config.personal_dir), MomentumStore(), None
        while True:
            try:
                return run_session(config, enrolment_token, tls, local_data, task, personal, momentum, former_id)
            except LeaderLost as error:
                if not config.rejoin:
                    raise
                former_id = error.learner_id
                if error.rounds_trained:  # it was dropped after taking part, not refused again and again: no long backoff
                    attempt = 0
                pause = rejoin_pause(attempt, random.random())
                attempt += 1
                logger.warning("%s; registering again in %.1fs (up to %.0fs)", error, pause, config.connect_timeout)
                time.sleep(pause)  # spreads out the learners of a restarted leader; the leader itself is awaited by register()
    except Stopped as stop:
        logger.info("stopping before training: %s", stop)
        return 0
    except (LearnerError, TaskError, DataError, OSError, ValueError) as error:
        print(f"learner: {printable(str(error))}", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        print(f"learner: call to the leader failed: {error.code().name}: {printable(error.details() or '')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("learner: interrupted", file=sys.stderr)
        return 130


def run_session(
    config: LearnerConfig,
    enrolment_token: str | None,
    tls: Tls | None,
    local_data: Examples | None,
    task: Task | None = None,
    personal: PersonalStore | None = None,
    momentum: MomentumStore | None = None,
    former_id: int | None = None,
) -> int:
    """One membership of a federation: serve, register (asking back `former_id`, the id an earlier one held), train until
    told to stop. Raises LeaderLost if the leader goes."""
    learner = Learner(config, enrolment_token, tls, task, personal, momentum)
    learner.data = local_data
    learner.former_learner_id = former_id
    server, port, _ = create_server(learner, config.host, config.port, tls)
    try:
        learner.register(advertise_address_for(config, port))
        learner.prepare()
        reason = learner.run()
        logger.info("stopping after %d rounds: %s", learner.rounds_trained, reason)
        return 0
    except LeaderLost as error:
        error.rounds_trained = learner.rounds_trained
        error.learner_id = learner.learner_id if learner.learner_id >= 0 else former_id
        raise
    finally:
        server.stop(grace=2).wait()  # an interpreter that exits while gRPC's threads still run can abort
        learner.channel.close()


def run() -> None:
    """The `fedgrpc-learner` command: main() with the command line's arguments, then exit with its status."""
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: gRPC's core threads can still be winding down then, and destroying them
    # aborts the process now and then ("terminate called without an active exception") after a clean run.
    os._exit(status)


if __name__ == "__main__":
    run()
