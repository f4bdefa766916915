"""gRPC plumbing both roles share: channel and server options, session tokens, health, server creation."""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import wire
from protos import leader_pb2, learner_pb2

logger = logging.getLogger(__name__)

# Full gRPC names of the two services, as the generated descriptors spell them.
LEADER_SERVICE = leader_pb2.DESCRIPTOR.services_by_name["LeaderService"].full_name
LEARNER_SERVICE = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name

# Bumped whenever the protos or the payload layout change incompatibly; a learner
# with another version is refused at registration.
PROTOCOL_VERSION = "1"
# Metadata entry that carries a caller's secret on every call after registration.
TOKEN_METADATA_KEY = "x-session-token"
# Metadata entry that carries the federation's shared enrolment secret on RegisterLearner.
ENROLMENT_METADATA_KEY = "x-enrolment-token"
# Environment variable the commands read the enrolment secret from, so it stays out of `ps` output.
ENROLMENT_ENV = "FL_ENROLMENT_TOKEN"
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
# A stream that moves no message for this long is cancelled, so that a peer that
# stops reading or writing frees its server thread.
STREAM_IDLE_TIMEOUT_S = 30.0
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
    match = _ADDRESS.match(address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{address!r} is not a host:port address, e.g. 127.0.0.1:10134")
    return match.group(1), int(match.group(2))


def read_enrolment_token(token_file: str | None) -> str | None:
    """The enrolment secret from --token-file, else $FL_ENROLMENT_TOKEN, else None."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read --token-file {token_file}: {error.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get(ENROLMENT_ENV) or None


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
        refusal = self._check(details.method[len(self._prefix):], details.invocation_metadata)
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

    def moved(self) -> None:
        self.last_moved = time.monotonic()


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
            with self._lock:
                expired = [entry for entry in self._open if now - entry.last_moved > self.idle_s or now > entry.deadline]
                self._open.difference_update(expired)
            for entry in expired:
                reason = "its deadline passed" if now > entry.deadline else f"it moved nothing for {self.idle_s:g}s"
                logger.warning("cancelled a %s stream from %s: %s", entry.method.rsplit("/", 1)[-1], entry.context.peer(), reason)
                self.cancelled += 1
                entry.context.cancel()

    def close(self) -> None:
        """Stop the watching thread."""
        self._closed.set()


class CallLimits(grpc.ServerInterceptor):
    """Resource limits on every call: in-flight calls per session token, and the stream watchdog's idle timeout and deadlines."""

    def __init__(self, idle_s: float = STREAM_IDLE_TIMEOUT_S, max_calls_per_caller: int = MAX_CALLS_PER_CALLER,
                 stream_deadlines: dict[str, float] | None = None) -> None:
        self.watchdog = Watchdog(idle_s)
        self.max_calls_per_caller = max_calls_per_caller
        self._deadlines = stream_deadlines or {}
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()

    def in_flight(self) -> int:
        """Calls now counted against their callers' caps."""
        with self._lock:
            return sum(self._in_flight.values())

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        caller = metadata_value(details.invocation_metadata, TOKEN_METADATA_KEY)
        streaming = handler.request_streaming or handler.response_streaming
        if caller is None and not streaming:
            return handler
        method = details.method
        behaviour = _behaviour(handler)

        def admit(request: Any, context: grpc.ServicerContext) -> tuple[Any, _Watched | None]:
            if caller is not None:
                self._acquire(caller, context)
            if not streaming:
                return request, None
            entry = self.watchdog.watch(context, method, self._deadlines.get(method))
            return (_touching(request, entry) if handler.request_streaming else request), entry

        if handler.response_streaming:
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

    def _acquire(self, caller: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            if self._in_flight[caller] >= self.max_calls_per_caller:
                busy = True
            else:
                busy = False
                self._in_flight[caller] += 1
        if busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this session already has {self.max_calls_per_caller} calls in flight; wait for one to finish")
        if not context.add_callback(lambda: self._release(caller)):
            self._release(caller)

    def _release(self, caller: str) -> None:
        with self._lock:
            self._in_flight[caller] -= 1
            if self._in_flight[caller] <= 0:
                del self._in_flight[caller]


def _touching(requests: Iterator[Any], entry: _Watched) -> Iterator[Any]:
    """Pass a request stream through, noting each message's arrival."""
    for request in requests:
        entry.moved()
        yield request


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


def _handler_like(handler: grpc.RpcMethodHandler, behaviour: Callable,
                  request_deserializer: Callable[[bytes], Any] | None = None,
                  response_serializer: Callable[[Any], bytes] | None = None) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that runs `behaviour`, with `handler`'s (de)serializers where no other is given."""
    return _HANDLER_FACTORIES[handler.request_streaming, handler.response_streaming](
        behaviour, request_deserializer=request_deserializer or handler.request_deserializer,
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
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start a server with our options, call limits, health checking and optional reflection on host:port (0 picks a free port).

    `request_deserializers` and `response_serializers` replace the generated ones of the named methods (full paths).
    """
    limits = limits or CallLimits()
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
        bound = server.add_secure_port(bind, tls.server_credentials()) if tls is not None and tls.serving else server.add_insecure_port(bind)
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {bind}: the port is in use or the address is not local; pick another with --port")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


@dataclass(frozen=True)
class Tls:
    """PEM bytes for TLS: our certificate and key (to serve, or as a client certificate) and the CA peers must chain to."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str | None, key: str | None, ca: str | None) -> Tls | None:
        """Read --tls-cert, --tls-key and --tls-ca; None when none is given."""
        if bool(cert) != bool(key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not (cert or ca):
            return None
        return cls(*(_read_pem(flag, path) for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca))))

    @property
    def serving(self) -> bool:
        """Whether we hold a certificate and key to serve TLS with."""
        return self.cert is not None and self.key is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS for our server; with a CA, clients must present a certificate it signed (mutual TLS)."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS for our calls: the peer must chain to our CA; we present our certificate when we hold one."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


def _read_pem(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {flag} {path}: {error.strerror}") from None


def channel(address: str, tls: Tls | None = None) -> grpc.Channel:
    """A client channel with our size caps and keepalive, over TLS when `tls` is given."""
    if tls is None:
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    return grpc.secure_channel(address, tls.channel_credentials(), options=GRPC_OPTIONS)


def is_serving(channel: grpc.Channel, timeout: float = 5.0) -> bool:
    """Ask the standard health service whether the peer is serving."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
