"""A learner's gRPC boundary: LearnerService's handlers and gate, for learner.py and for simulation pools."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from fedgrpc.learner.secagg_party import refuse
from fedgrpc.protos import learner_pb2, learner_pb2_grpc
from fedgrpc.transport import rpc, wire
from fedgrpc.transport.tls import CertificateBinding, Tls

if TYPE_CHECKING:
    from fedgrpc.learner.main import Learner

SERVER_THREADS = 8  # the leader needs at most a few at once (start, push, health check, a secure-aggregation stage, stop)
MAX_STRANGER_CALLS = 2  # calls without this learner's callback secret in flight at once (health checks, reflection)


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    """The gRPC boundary: start the round loop, take pushed models that fit."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.leader_certificate = CertificateBinding()  # under mutual TLS: the leader's, from its first call

    def StartTraining(self, request: learner_pb2.Empty, context: grpc.ServicerContext) -> learner_pb2.Ack:
        self.leader_certificate.check(context)
        return learner_pb2.Ack(success=True, message=self.learner.start())

    def SyncModelState(self, request_iterator: Iterator[learner_pb2.ModelState], context: grpc.ServicerContext) -> learner_pb2.Ack:
        self.leader_certificate.check(context)
        first = next(request_iterator, None)
        if first is not None and first.stop:
            self.learner.stop(first.reason)
            return learner_pb2.Ack(success=True, message="stopping")
        specs = self.learner.specs
        if specs is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "learner has no model yet")
        messages = [] if first is None else itertools.chain([first], request_iterator)
        try:
            received = wire.receive(messages, max_bytes=wire.payload_bytes(specs), expected=specs, allocate=self.learner.receive_buffer)
        except wire.WireError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model state refused: {error}")
        self.learner.offer_state(received.header.round, received.tensors, received.payload)
        return learner_pb2.Ack(success=True, message=f"model for round {received.header.round} received")

    def AdvertiseKeys(self, request: learner_pb2.SecAggSetup, context: grpc.ServicerContext) -> learner_pb2.SecAggPublicKeys:
        self.leader_certificate.check(context)
        return refuse(context, lambda: self.learner.secagg.advertise_keys(request, self.learner.learner_id))

    def ShareKeys(self, request: learner_pb2.SecAggNeighbourKeys, context: grpc.ServicerContext) -> learner_pb2.SecAggShares:
        self.leader_certificate.check(context)
        return refuse(context, lambda: self.learner.secagg.share_keys(request))

    def CollectMasked(self, request: learner_pb2.SecAggCollection, context: grpc.ServicerContext) -> learner_pb2.Ack:
        self.leader_certificate.check(context)
        return refuse(context, lambda: self.learner.secagg.collect(request))

    def Unmask(self, request: learner_pb2.SecAggUnmaskRequest, context: grpc.ServicerContext) -> learner_pb2.SecAggRevealedShares:
        self.leader_certificate.check(context)
        return refuse(context, lambda: self.learner.secagg.unmask(request))

    def Evaluate(self, request_iterator: Iterator[learner_pb2.ModelState], context: grpc.ServicerContext) -> learner_pb2.EvaluateResult:
        self.leader_certificate.check(context)
        specs = self.learner.specs
        if specs is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "learner has no model yet")
        try:
            received = wire.receive(request_iterator, max_bytes=wire.payload_bytes(specs), expected=specs)
        except wire.WireError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model to evaluate refused: {error}")
        if self.learner.evaluation is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this learner holds no test data: the leader's plan did not ask learners to evaluate"
            )
        try:
            return self.learner.evaluation.evaluate(received.header.round, received.tensors)
        except ValueError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))


def callback_gate(owns: Callable[[str], bool], stranger: str) -> rpc.Gate:
    """A LearnerService's gate: only calls carrying a callback secret it `owns` reach a handler; others are told `stranger`."""

    def check(method: str, metadata: Any) -> rpc.Refusal | None:
        token = rpc.metadata_value(metadata, rpc.TOKEN_METADATA_KEY)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, f"missing {rpc.TOKEN_METADATA_KEY}"
        if not owns(token):
            return grpc.StatusCode.PERMISSION_DENIED, stranger
        return None

    return rpc.Gate(rpc.LEARNER_SERVICE, check)


def learner_gate(learner: Learner) -> rpc.Gate:
    """Only the leader holding this learner's callback secret may start it or push a model, checked before any handler runs."""
    return callback_gate(lambda token: rpc.secrets_match(token, learner.callback_token), "token does not belong to this learner's leader")


def create_server(learner: Learner, host: str, port: int, tls: Tls | None = None) -> tuple[grpc.Server, int, Any]:
    """Start the learner's server for `learner` on host:port; returns (server, port, health)."""
    return serve_learner_service(
        LearnerServicer(learner),
        learner_gate(learner),
        lambda token: rpc.secrets_match(token, learner.callback_token),
        learner._first_message_limit,
        host,
        port,
        tls,
    )


def serve_learner_service(
    servicer: learner_pb2_grpc.LearnerServiceServicer,
    gate: rpc.Gate,
    is_member: Callable[[str], bool],
    first_message_limit: Callable[[], int],
    host: str,
    port: int,
    tls: Tls | None = None,
    threads: int = SERVER_THREADS,
) -> tuple[grpc.Server, int, Any]:
    """Start a LearnerService (a learner's, or a pool's) on host:port: its gate, call limits, and pushed models checked for size."""
    return rpc.create_server(
        lambda server: learner_pb2_grpc.add_LearnerServiceServicer_to_server(servicer, server),
        host,
        port,
        max_workers=threads,
        gate=gate,
        tls=tls,
        limits=rpc.CallLimits(is_member=is_member, max_stranger_calls=MAX_STRANGER_CALLS),
        request_deserializers={
            f"/{rpc.LEARNER_SERVICE}/{method}": wire.chunk_deserializer(learner_pb2.ModelState, first_message_limit)
            for method in ("SyncModelState", "Evaluate")
        },
        health_services=[rpc.LEARNER_SERVICE],
    )
