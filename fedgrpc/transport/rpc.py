"""gRPC plumbing both roles share: channel and server options, session tokens, health, server creation."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedgrpc.config.choices import ENROLMENT_ENV, STREAM_IDLE_TIMEOUT_S
from fedgrpc.protos import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from fedgrpc.transport import wire

if TYPE_CHECKING:
    from fedgrpc.transport.tls import Tls

logger = logging.getLogger(__name__)

# Full gRPC names of the two services, as the generated descriptors spell them.
LEADER_SERVICE = leader_pb2.DESCRIPTOR.services_by_name["LeaderService"].full_name
LEARNER_SERVICE = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name

# Bumped whenever the protos or the payload layout change incompatibly; a learner
# with another version is refused at registration.
PROTOCOL_VERSION = "7"
# Metadata entry that carries a caller's secret on every call after registration.
TOKEN_METADATA_KEY = "x-session-token"
# Metadata entry that carries the federation's shared enrolment secret on RegisterLearner.
ENROLMENT_METADATA_KEY = "x-enrolment-token"
# Deadline of short control calls (register, start, health checks).
CONTROL_TIMEOUT_S = 30.0
# Deadlines of calls that stream a model, an update or a data split: the control
# deadline plus the payload at this slowest acceptable rate, so a stalled peer is
# given up on in about a minute for ResNet-18 (45 MB) rather than holding a round.
MIN_TRANSFER_BYTES_PER_S = 1_000_000


def transfer_timeout(num_bytes: int) -> float:
    """Deadline for streaming `num_bytes`."""
    return CONTROL_TIMEOUT_S + num_bytes / MIN_TRANSFER_BYTES_PER_S


# Metadata larger than this is refused by the transport (tokens are 43 characters).
MAX_METADATA_BYTES = 16 * 1024
# Keepalive pings find peers that vanished without closing their connection.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# Calls one session token may have in flight at once. An honest learner needs two
# (a transfer and a heartbeat); the cap keeps one peer from taking every thread.
MAX_CALLS_PER_CALLER = 4
# Calls from peers that hold no session (health checks, reflection, registration) are bounded so that they can never
# take the threads members need: in-flight calls in all (a share of the server's threads) and from one host (half of
# that, so that one host cannot keep the rest out; a refused learner waits and tries again), and streams, which may
# stay open, per host and in all.
STRANGER_THREAD_SHARE = 0.5
STRANGER_HOST_SHARE = 0.5
MAX_STRANGER_STREAMS = 4
MAX_STRANGER_STREAMS_PER_PEER = 2
# A stream opened without a session (a health Watch) ends after this long; its client may open another.
STRANGER_STREAM_S = 60.0
# DNS's limits on a host name and on each of its dot-separated labels.
MAX_HOST_NAME_CHARS = 253
MAX_HOST_LABEL_CHARS = 63
# Cap gRPC's exponential reconnect backoff (default up to 120 s), so a learner that
# started before its leader registers within seconds of the leader coming up.
MAX_RECONNECT_BACKOFF_MS = 2_000

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]
SERVER_OPTIONS = GRPC_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
]

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-_]+):(\d{1,5})$")


def parse_address(address: str) -> tuple[str, int]:
    """Split 'host:port' (or '[v6]:port'), raising ValueError with a hint when it is malformed."""
    if len(address) > MAX_HOST_NAME_CHARS + len("[]:65535"):
        raise ValueError(f"address of {len(address)} characters is longer than a DNS name allows")
    match = _ADDRESS.match(address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{address!r} is not a host:port address, e.g. 127.0.0.1:10134")
    host = match.group(1)
    if not host.startswith("[") and (
        len(host) > MAX_HOST_NAME_CHARS or any(len(label) > MAX_HOST_LABEL_CHARS for label in host.split("."))
    ):
        raise ValueError(
            f"host name {host[:40]!r}... is longer than DNS allows ({MAX_HOST_NAME_CHARS} characters, {MAX_HOST_LABEL_CHARS} a label)"
        )
    return host, int(match.group(2))


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a host part spells ('[v6]' too), IPv4-mapped IPv6 as IPv4; None for a host name."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def peer_host(peer: str) -> str:
    """The host part of gRPC's peer string ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5'); the whole string for other transports."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = rest.rsplit(":", 1)[0]
    ip = ip_of(host)
    return str(ip) if ip is not None else host


def callback_problem(address: str, peer: str, trusted: bool) -> str | None:
    """Why the leader must not call a registrant back at `address`, or None.

    Link-local (cloud metadata services live there), multicast and unspecified addresses are never called.
    An untrusted registrant (no enrolment secret, no client certificate) may only name the address its
    registration came from, so that nobody can make the leader dial a third party.
    """
    try:
        host, _ = parse_address(address)
    except ValueError as error:
        return str(error)
    ip = ip_of(host)
    if ip is not None and (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255")):
        return f"{host} is a link-local, multicast or unspecified address; advertise the address the leader can reach"
    if trusted:
        return None
    source = ip_of(peer_host(peer))
    if source is None:
        return None  # not an IP transport (a Unix socket): nothing to compare
    if ip == source or (host == "localhost" and source.is_loopback):
        return None
    return (
        f"the callback address {address} is not the address this registration came from ({source}); "
        f"advertising another address needs the federation's enrolment secret (${ENROLMENT_ENV}) or a client certificate"
    )


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a session token."""
    return ((TOKEN_METADATA_KEY, token),)


def metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    """The value of one metadata entry, or None."""
    for entry_key, value in metadata or ():
        if entry_key == key:
            return value if isinstance(value, str) else None
    return None


def caller_token(context: grpc.ServicerContext) -> str | None:
    """The session token a call carries, or None."""
    return metadata_value(context.invocation_metadata(), TOKEN_METADATA_KEY)


def secrets_match(given: str | None, expected: str) -> bool:
    """Whether `given` is exactly `expected`, compared in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class RequestRefused(Exception):
    """A peer's request refused, with the gRPC status to answer it with; the message is the reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# What a gate returns to refuse a call: the status and the reason.
Refusal = tuple[grpc.StatusCode, str]


class Gate(grpc.ServerInterceptor):
    """Refuses calls to one service whose metadata fails a check, before any handler runs."""

    def __init__(self, service: str, check: Callable[[str, Sequence[tuple[str, Any]]], Refusal | None]) -> None:
        self._prefix = f"/{service}/"
        self._check = check

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if not details.method.startswith(self._prefix):
            return continuation(details)  # health and reflection stay open
        handler = continuation(details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        refusal = self._check(details.method[len(self._prefix) :], details.invocation_metadata)
        if refusal is None:
            return handler
        code, reason = refusal

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, reason)

        return _HANDLER_FACTORIES[handler.request_streaming, handler.response_streaming](refuse)


@dataclass(eq=False)
class _Watched:
    """One open stream: when it last moved a message, and its own deadline."""

    context: grpc.ServicerContext
    method: str
    deadline: float
    last_moved: float = field(default_factory=time.monotonic)
    # every request arrived: the server works on them (an evaluation, a sum), which its deadline bounds, not idleness
    requests_done: bool = False

    def moved(self) -> None:
        self.last_moved = time.monotonic()

    def idle(self, now: float, idle_s: float) -> bool:
        return not self.requests_done and now - self.last_moved > idle_s


class Watchdog:
    """Cancels streams that move no message for `idle_s`, or outlive their deadline; one thread watches them all."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.cancelled = 0
        self._lock = threading.Lock()
        self._open: set[_Watched] = set()
        self._closed = threading.Event()
        threading.Thread(target=self._run, name="stream-watchdog", daemon=True).start()

    def watch(self, context: grpc.ServicerContext, method: str, limit_s: float | None) -> _Watched:
        """Start watching a stream until its RPC ends."""
        entry = _Watched(context, method, time.monotonic() + limit_s if limit_s else float("inf"))
        with self._lock:
            self._open.add(entry)
        if not context.add_callback(lambda: self._forget(entry)):
            self._forget(entry)  # the RPC already ended
        return entry

    def _forget(self, entry: _Watched) -> None:
        with self._lock:
            self._open.discard(entry)

    def _run(self) -> None:
        while not self._closed.wait(min(1.0, self.idle_s / 4)):
            now = time.monotonic()
            for entry in self.expired(now):
                reason = "its deadline passed" if now > entry.deadline else f"it moved nothing for {self.idle_s:g}s"
                logger.warning("cancelled a %s stream from %s: %s", entry.method.rsplit("/", 1)[-1], entry.context.peer(), reason)
                self.cancelled += 1
                entry.context.cancel()

    def expired(self, now: float) -> list[_Watched]:
        """The streams to cancel at `now` (idle too long, or past their deadline), no longer watched."""
        with self._lock:
            expired = [entry for entry in self._open if entry.idle(now, self.idle_s) or now > entry.deadline]
            self._open.difference_update(expired)
        return expired

    def close(self) -> None:
        """Stop the watching thread."""
        self._closed.set()


class CallLimits(grpc.ServerInterceptor):
    """Resource limits on every call: in-flight calls per session, bounds on callers with no session, and the stream watchdog.

    A call counts as a member's when its session token passes `is_member`; any other call is a stranger's
    (health checks, reflection, registration) and is admitted only within the stranger bounds, so strangers
    can never take the threads members need. Non-blocking handlers (the health Watch) stay non-blocking.
    """

    def __init__(
        self,
        idle_s: float = STREAM_IDLE_TIMEOUT_S,
        max_calls_per_caller: int = MAX_CALLS_PER_CALLER,
        stream_deadlines: dict[str, float] | None = None,
        is_member: Callable[[str], bool] | None = None,
        max_stranger_calls: int | None = None,
    ) -> None:
        self.watchdog = Watchdog(idle_s)
        self.max_calls_per_caller = max_calls_per_caller
        self.max_stranger_calls = max_stranger_calls  # None: create_server sets a share of its threads
        self.refused_strangers = 0
        self._deadlines = stream_deadlines or {}
        self._is_member = is_member or (lambda token: True)
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._stranger_calls = 0
        self._stranger_calls_by_peer: Counter[str] = Counter()  # peer host -> calls in flight
        self._stranger_streams: Counter[str] = Counter()  # peer host -> open streams

    def in_flight(self) -> int:
        """Calls now counted against their callers' caps."""
        with self._lock:
            return sum(self._in_flight.values())

    def strangers_in_flight(self) -> tuple[int, int]:
        """Calls and streams from callers with no session now in flight."""
        with self._lock:
            return self._stranger_calls, sum(self._stranger_streams.values())

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        token = metadata_value(details.invocation_metadata, TOKEN_METADATA_KEY)
        caller = token if token is not None and self._is_member(token) else None
        streaming = handler.request_streaming or handler.response_streaming
        method = details.method
        behaviour = _behaviour(handler)

        def admit(request: Any, context: grpc.ServicerContext) -> tuple[Any, _Watched | None]:
            if caller is not None:
                self._acquire(caller, context)
            else:
                self._admit_stranger(peer_host(context.peer()), streaming, context)
            if not streaming:
                return request, None
            limit = self._deadlines.get(method) if caller is not None else STRANGER_STREAM_S
            entry = self.watchdog.watch(context, method, limit)
            return (_touching(request, entry) if handler.request_streaming else request), entry

        if getattr(behaviour, "experimental_non_blocking", False):
            # served by callbacks, holding no thread (the health Watch): admitted and watched, then handed on as it is
            def run(request: Any, context: grpc.ServicerContext, send_response_callback: Callable | None = None) -> Any:
                request, _ = admit(request, context)
                return behaviour(request, context, send_response_callback=send_response_callback)

            run.experimental_non_blocking = True
            run.experimental_thread_pool = getattr(behaviour, "experimental_thread_pool", None)
        elif handler.response_streaming:

            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                request, entry = admit(request, context)
                for response in behaviour(request, context):
                    yield response
                    entry.moved()  # the server asks for the next message once this one went out
        else:

            def run(request: Any, context: grpc.ServicerContext) -> Any:
                request, _ = admit(request, context)
                return behaviour(request, context)

        return _handler_like(handler, run)

    def _admit_stranger(self, peer: str, streaming: bool, context: grpc.ServicerContext) -> None:
        """Count a call from a caller with no session, or refuse it (RESOURCE_EXHAUSTED) past the stranger bounds."""
        per_peer = max(1, int(self.max_stranger_calls * STRANGER_HOST_SHARE))
        with self._lock:
            if self._stranger_calls >= self.max_stranger_calls:
                refusal = f"{self._stranger_calls} calls without a session are in flight; try again shortly"
            elif self._stranger_calls_by_peer[peer] >= per_peer:
                refusal = f"{per_peer} calls without a session from {peer} are in flight; try again shortly"
            elif streaming and (
                sum(self._stranger_streams.values()) >= MAX_STRANGER_STREAMS
                or self._stranger_streams[peer] >= MAX_STRANGER_STREAMS_PER_PEER
            ):
                refusal = "too many streams without a session are open; close one or try again shortly"
            else:
                refusal = None
                self._stranger_calls += 1
                self._stranger_calls_by_peer[peer] += 1
                if streaming:
                    self._stranger_streams[peer] += 1
            if refusal is not None:
                self.refused_strangers += 1
        if refusal is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        if not context.add_callback(lambda: self._release_stranger(peer, streaming)):
            self._release_stranger(peer, streaming)

    def _release_stranger(self, peer: str, streaming: bool) -> None:
        with self._lock:
            self._stranger_calls -= 1
            self._stranger_calls_by_peer[peer] -= 1
            if self._stranger_calls_by_peer[peer] <= 0:
                del self._stranger_calls_by_peer[peer]
            if streaming:
                self._stranger_streams[peer] -= 1
                if self._stranger_streams[peer] <= 0:
                    del self._stranger_streams[peer]

    def _acquire(self, caller: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            if self._in_flight[caller] >= self.max_calls_per_caller:
                busy = True
            else:
                busy = False
                self._in_flight[caller] += 1
        if busy:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this session already has {self.max_calls_per_caller} calls in flight; wait for one to finish",
            )
        if not context.add_callback(lambda: self._release(caller)):
            self._release(caller)

    def _release(self, caller: str) -> None:
        with self._lock:
            self._in_flight[caller] -= 1
            if self._in_flight[caller] <= 0:
                del self._in_flight[caller]


def _touching(requests: Iterator[Any], entry: _Watched) -> Iterator[Any]:
    """Pass a request stream through, noting each message's arrival and the stream's end."""
    for request in requests:
        entry.moved()
        yield request
    entry.requests_done = True


class MethodCodecs(grpc.ServerInterceptor):
    """Replaces the request deserializer or response serializer of the named methods (full method paths), leaving the rest as it is."""

    def __init__(self, deserializers: dict[str, Callable[[bytes], Any]], serializers: dict[str, Callable[[Any], bytes]]) -> None:
        self._deserializers = deserializers
        self._serializers = serializers

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        deserializer = self._deserializers.get(details.method)
        serializer = self._serializers.get(details.method)
        if handler is None or (deserializer is None and serializer is None):
            return handler
        return _handler_like(handler, _behaviour(handler), request_deserializer=deserializer, response_serializer=serializer)


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable:
    """The function a method handler runs, whatever its kind."""
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _handler_like(
    handler: grpc.RpcMethodHandler,
    behaviour: Callable,
    request_deserializer: Callable[[bytes], Any] | None = None,
    response_serializer: Callable[[Any], bytes] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that runs `behaviour`, with `handler`'s (de)serializers where no other is given."""
    return _HANDLER_FACTORIES[handler.request_streaming, handler.response_streaming](
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=response_serializer or handler.response_serializer,
    )


def create_server(
    add_servicers: Callable[[grpc.Server], None],
    host: str,
    port: int,
    max_workers: int,
    reflection_services: list[str] | None = None,
    gate: Gate | None = None,
    tls: Tls | None = None,
    limits: CallLimits | None = None,
    request_deserializers: dict[str, Callable[[bytes], Any]] | None = None,
    response_serializers: dict[str, Callable[[Any], bytes]] | None = None,
    health_services: Sequence[str] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start a server with our options, call limits, health checking and optional reflection on host:port (0 picks a free port).

    `request_deserializers` and `response_serializers` replace the generated ones of the named methods (full paths).
    Health answers SERVING for the server as a whole and for each of `health_services`, so that a peer can tell
    which role it reached.
    """
    limits = limits or CallLimits()
    if limits.max_stranger_calls is None:
        limits.max_stranger_calls = max(2, int(max_workers * STRANGER_THREAD_SHARE))
    interceptors: list[grpc.ServerInterceptor] = [gate] if gate is not None else []  # the gate first: refused calls count against nothing
    interceptors.append(limits)
    if request_deserializers or response_serializers:  # innermost: the handler the others wrap
        interceptors.append(MethodCodecs(request_deserializers or {}, response_serializers or {}))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_workers * 4,
        interceptors=interceptors,
    )
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_services is not None:
        # lets grpcurl and other tools list and describe the services without the .proto files
        names = [*reflection_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
    bind = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = (
            server.add_secure_port(bind, tls.server_credentials()) if tls is not None and tls.serving else server.add_insecure_port(bind)
        )
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {bind}: the port is in use or the address is not local; pick another with --port")
    server.start()
    for service in ("", *health_services):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def channel(address: str, tls: Tls | None = None) -> grpc.Channel:
    """A client channel with our size caps and keepalive, over TLS when `tls` is given."""
    if tls is None:
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    return grpc.secure_channel(address, tls.channel_credentials(), options=GRPC_OPTIONS)


def is_serving(channel: grpc.Channel, timeout: float = 5.0, service: str = "", token: str | None = None) -> bool:
    """Ask the standard health service whether the peer serves `service` ("": the server as a whole)."""
    return health_check(channel, timeout, service, token) is None


# Health-check failures that say the peer is gone: its port refuses connections, or what answers is not the
# service asked for. Any other (a deadline, a busy server) may be a peer that is only slow.
GONE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND})


@dataclass(frozen=True)
class Unhealthy:
    """A health check that did not answer SERVING: what it answered, and whether that means the peer is gone."""

    reason: str
    gone: bool

    def __str__(self) -> str:
        return self.reason


def health_check(channel: grpc.Channel, timeout: float = 5.0, service: str = "", token: str | None = None) -> Unhealthy | None:
    """None when the peer's health service says it serves `service`, else what it answered instead.

    `token` is sent as the caller's session token, so that the peer counts the check as a member's call.
    """
    metadata = token_metadata(token) if token is not None else None
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata
        )
    except grpc.RpcError as error:
        gone = error.code() in GONE_CODES
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return Unhealthy(f"it does not serve {service or 'anything'} (NOT_FOUND)", gone)
        return Unhealthy(f"{error.code().name}: {error.details()}", gone)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return Unhealthy(f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", gone=True)
    return None


def leader_stub(channel: grpc.Channel, limit: Callable[[], int] | None = None) -> leader_pb2_grpc.LeaderServiceStub:
    """The generated stub, reading received chunks as views (wire.chunk_deserializer) and sending updates as wire.frames.

    `limit` gives the most bytes a received stream's first message may take (wire.first_message_limit).
    """
    stub = leader_pb2_grpc.LeaderServiceStub(channel)
    stub.AccumulateGradients = channel.stream_unary(
        f"/{LEADER_SERVICE}/AccumulateGradients", request_serializer=wire.serialize, response_deserializer=leader_pb2.Ack.FromString
    )
    stub.GetModel = channel.unary_stream(
        f"/{LEADER_SERVICE}/GetModel",
        request_serializer=leader_pb2.Empty.SerializeToString,
        response_deserializer=wire.chunk_deserializer(leader_pb2.ModelChunk, limit),
    )
    stub.GetData = channel.unary_stream(
        f"/{LEADER_SERVICE}/GetData",
        request_serializer=leader_pb2.LearnerDataRequest.SerializeToString,
        response_deserializer=wire.chunk_deserializer(leader_pb2.DataChunk, limit),
    )
    return stub


def learner_stub(channel: grpc.Channel) -> learner_pb2_grpc.LearnerServiceStub:
    """The generated stub, with SyncModelState and Evaluate sending the published model's frames as they are (no serialization per call)."""
    stub = learner_pb2_grpc.LearnerServiceStub(channel)
    stub.SyncModelState = channel.stream_unary(
        f"/{LEARNER_SERVICE}/SyncModelState", request_serializer=wire.serialize, response_deserializer=learner_pb2.Ack.FromString
    )
    stub.Evaluate = channel.stream_unary(
        f"/{LEARNER_SERVICE}/Evaluate", request_serializer=wire.serialize, response_deserializer=learner_pb2.EvaluateResult.FromString
    )
    return stub
