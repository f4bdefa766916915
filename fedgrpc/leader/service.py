"""The leader's gRPC boundary: LeaderService's handlers and gate, and serve(), which loads the task and starts them."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from fedgrpc.config.options import LeaderConfig
from fedgrpc.data import DataError, Examples
from fedgrpc.leader import checkpoint
from fedgrpc.leader.coordinator import Leader
from fedgrpc.leader.roster import Roster
from fedgrpc.protos import leader_pb2, leader_pb2_grpc
from fedgrpc.task import Task, TaskError, builtin_task, load_task
from fedgrpc.transport import rpc, wire
from fedgrpc.transport.tls import Tls, peer_certificate

logger = logging.getLogger(__name__)

SERVER_STOP_GRACE_S = 2.0  # calls in flight at shutdown get this long; learners were told to stop first
MAX_SERVER_THREADS = 256  # the leader's server threads, whatever --learners: a simulation registers 100,000


class LeaderServicer(leader_pb2_grpc.LeaderServiceServicer):
    """The gRPC boundary: authenticates callers, checks payloads, answers with status codes."""

    def __init__(self, leader: Leader) -> None:
        self.leader = leader

    def _caller(self, context: grpc.ServicerContext) -> int:
        learner_id = self.leader.roster.learner_for_token(rpc.caller_token(context))
        if learner_id is None:  # the gate lets no such call through; kept for calls made without it
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or unknown {rpc.TOKEN_METADATA_KEY}: call RegisterLearner first")
        bound = self.leader.roster.record(learner_id).certificate
        if bound is not None and peer_certificate(context) != bound:  # a leaked token is no good without its certificate
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this session was issued to another client certificate: register with your own")
        return learner_id

    def RegisterLearner(self, request: leader_pb2.LearnerInfo, context: grpc.ServicerContext) -> leader_pb2.AckWithMetadata:
        try:
            record, _ = self.leader.roster.register(request, context.peer(), peer_certificate(context))
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
            split_examples=self.leader.splits.examples(record.learner_id),
            split_layout=[wire.spec_message(spec) for spec in self.leader.splits.layout],
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
            data = self.leader.splits.data_for(learner_id)
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
            if self.leader.buffered is not None:
                self.leader.buffered.dispatch()  # fedbuff: the job is over, taken or refused; the learner's next turn may come
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
    tls = Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca)
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
            f"/{service}/GetData": rpc.transfer_timeout(leader.splits.largest_bytes()),
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
