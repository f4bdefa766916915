"""gRPC plumbing both roles share: channel and server options, session tokens, health, server creation."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import wire

# Bumped whenever the protos or the payload layout change incompatibly; a learner
# with another version is refused at registration.
PROTOCOL_VERSION = "1"
# Metadata entry that carries a caller's secret on every call after registration.
TOKEN_METADATA_KEY = "x-session-token"
# Deadline of short control calls (register, start, health checks).
CONTROL_TIMEOUT_S = 30.0
# Deadline of calls that stream a model, an update or a data split.
TRANSFER_TIMEOUT_S = 900.0
# Metadata larger than this is refused by the transport (tokens are 43 characters).
MAX_METADATA_BYTES = 16 * 1024
# Keepalive pings find peers that vanished without closing their connection.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
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


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a session token."""
    return ((TOKEN_METADATA_KEY, token),)


def caller_token(context: grpc.ServicerContext) -> str | None:
    """The session token a call carries, or None."""
    for key, value in context.invocation_metadata():
        if key == TOKEN_METADATA_KEY:
            return value
    return None


def token_matches(context: grpc.ServicerContext, expected: str) -> bool:
    """Whether the call carries exactly `expected`, compared in constant time."""
    token = caller_token(context)
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


def create_server(
    add_servicers: Callable[[grpc.Server], None],
    host: str,
    port: int,
    max_workers: int,
    reflection_services: list[str] | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start a server with our options, health checking and optional reflection on host:port (0 picks a free port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_workers * 4,
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
        bound = server.add_insecure_port(bind)
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {bind}: the port is in use or the address is not local; pick another with --port")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def insecure_channel(address: str) -> grpc.Channel:
    """A client channel with our size caps and keepalive."""
    return grpc.insecure_channel(address, options=GRPC_OPTIONS)


def is_serving(channel: grpc.Channel, timeout: float = 5.0) -> bool:
    """Ask the standard health service whether the peer is serving."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
