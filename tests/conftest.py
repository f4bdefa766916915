"""Shared helpers: in-process leaders and learners on loopback with ephemeral ports."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fedgrpc.leader import main as leader_module
from fedgrpc.leader.main import Leader, LeaderConfig
from fedgrpc.learner import main as learner_module
from fedgrpc.protos import leader_pb2, leader_pb2_grpc
from fedgrpc.transport import rpc

ROOT = Path(__file__).resolve().parent.parent


def learner_process(address: str, *extra: str) -> subprocess.Popen:
    """learner.py as a process on loopback, one thread, its stderr piped."""
    return subprocess.Popen(
        [sys.executable, "learner.py", "--leader", address, "--host", "127.0.0.1", "--device", "cpu", "--threads", "1", *extra],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_in_thread(leader) -> tuple[threading.Thread, dict]:
    """leader.run() in a daemon thread; its history lands in the returned dict."""
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("history", leader.run()), daemon=True)
    runner.start()
    return runner, result


def run_until_stopped(leader) -> tuple[threading.Thread, dict]:
    """leader.run() in a daemon thread for a run ended by stop_event; the RunError it then raises lands in the dict."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["history"] = leader.run()
        except leader_module.RunError as error:
            outcome["error"] = str(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    return runner, outcome


def wait_until(condition, timeout: float = 60.0) -> None:
    """Poll in-process state until `condition` holds; fail after `timeout` seconds (a generous outer bound)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)  # polling our own in-process state, not waiting on a peer


def refusal(parse, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What a command's parser printed refusing `argv`: it exits with status 2 and says why in one line (and a hint)."""
    with pytest.raises(SystemExit) as caught:
        parse(argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) <= 2, error
    return error


def leader_config(tmp_path: Path, **overrides: object) -> LeaderConfig:
    """A small, fast federation on loopback: synthetic data, the BatchNorm-free tiny CNN, no augmentation."""
    settings: dict[str, object] = dict(
        host="127.0.0.1",
        port=0,
        dataset="synthetic",
        data_dir=None,
        model="tiny-cnn",
        rounds=1,
        learners=2,
        augment=False,
        device="cpu",
        run_dir=str(tmp_path / "run"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
        join_timeout=60.0,
        round_timeout=60.0,
    )
    settings.update(overrides)
    return LeaderConfig(**settings)


@dataclass
class RunningLeader:
    leader: Leader
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def running_leader(config: LeaderConfig) -> Iterator[RunningLeader]:
    """A leader serving on an ephemeral port for the duration of the block."""
    leader, server, port, _ = leader_module.serve(config)
    try:
        yield RunningLeader(leader, port)
    finally:
        leader.stop_event.set()
        server.stop(grace=None)
        leader.close()


class LearnerThread(threading.Thread):
    """learner.main run in a thread, keeping its exit code."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(daemon=True)
        self.args = args
        self.exit_code: int | None = None

    def run(self) -> None:
        self.exit_code = learner_module.main(self.args)


def start_learners(address: str, count: int, extra: list[str] | None = None) -> list[LearnerThread]:
    """Start `count` real learners (each with its own gRPC server) against a leader."""
    threads = []
    for _ in range(count):
        thread = LearnerThread(["--leader", address, "--host", "127.0.0.1", "--device", "cpu", "--connect-timeout", "30", *(extra or [])])
        thread.start()
        threads.append(thread)
    return threads


def join_all(threads: list[LearnerThread], timeout: float = 60.0) -> list[int | None]:
    for thread in threads:
        thread.join(timeout)
    return [thread.exit_code for thread in threads]


@dataclass
class Client:
    """A hand-driven learner client: a stub plus the session token and id it registered with."""

    stub: leader_pb2_grpc.LeaderServiceStub
    learner_id: int
    token: str
    joins_round: int = 1
    reply: leader_pb2.AckWithMetadata | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return rpc.token_metadata(self.token)


class CallbackServer:
    """A server that answers the leader's registration check (health SERVING for the learner service) and serves nothing else.

    The address hand-driven clients register with: the leader admits them, and any call it makes to
    them (StartTraining, a pushed model) fails UNIMPLEMENTED, as to a learner that cannot take part.
    """

    def __init__(self) -> None:
        self.server, port, self.health = rpc.create_server(
            lambda server: None, "127.0.0.1", 0, max_workers=32, health_services=[rpc.LEARNER_SERVICE]
        )
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.stop(grace=None)


_callback_server: CallbackServer | None = None


def callback_address() -> str:
    """The address of one CallbackServer shared by every hand-driven client of the test session."""
    global _callback_server
    if _callback_server is None:
        _callback_server = CallbackServer()
    return _callback_server.address


def register_client(
    channel: grpc.Channel,
    callback_token: str | None = None,
    address: str | None = None,
    task: str = "",
    fingerprint: str = "",
    former_learner_id: int | None = None,
) -> Client:
    """Register through the real RPC, as a learner whose server is at `address` (by default the shared CallbackServer)."""
    address = address or callback_address()
    stub = leader_pb2_grpc.LeaderServiceStub(channel)
    info = leader_pb2.LearnerInfo(
        network_addr=address,
        callback_token=callback_token or secrets.token_urlsafe(32),
        version=rpc.PROTOCOL_VERSION,
        task=task,
        model_fingerprint=fingerprint,
        former_learner_id=former_learner_id,
    )
    for attempt in range(100):  # a leader busy with other registrations says so; learner.py waits and tries again too
        try:
            reply = stub.RegisterLearner(info, timeout=10)
            break
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "in flight" not in error.details() or attempt == 99:
                raise
            time.sleep(0.05)  # the busy leader's other registrations finish in milliseconds; not a wait for a peer's answer
    return Client(stub, reply.learner_id, reply.session_token, reply.joins_round, reply)


@pytest.fixture
def channel_to() -> Iterator:
    """Factory for client channels to an address, closed after the test."""
    channels: list[grpc.Channel] = []

    def make(address: str) -> grpc.Channel:
        channel = rpc.channel(address)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        channel.close()
