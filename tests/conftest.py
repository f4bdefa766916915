"""Shared helpers: in-process leaders and learners on loopback with ephemeral ports."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import leader as leader_module
import learner as learner_module
import rpc
from leader import Leader, LeaderConfig
from protos import leader_pb2, leader_pb2_grpc


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

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return rpc.token_metadata(self.token)


def register_client(channel: grpc.Channel, callback_token: str | None = None, address: str = "127.0.0.1:1") -> Client:
    """Register through the real RPC, as a learner whose server is at `address` (by default a closed port nobody answers)."""
    stub = leader_pb2_grpc.LeaderServiceStub(channel)
    info = leader_pb2.LearnerInfo(
        network_addr=address, callback_token=callback_token or secrets.token_urlsafe(32), version=rpc.PROTOCOL_VERSION
    )
    reply = stub.RegisterLearner(info, timeout=10)
    return Client(stub, reply.learner_id, reply.session_token, reply.joins_round)


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
