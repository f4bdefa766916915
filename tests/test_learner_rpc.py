"""The learner's RPCs over a real socket: only its leader may start it or push a model, and only a model that fits."""

from __future__ import annotations

import grpc
import pytest
import torch

from fedgrpc.learner import main as learner_module
from fedgrpc.learner.main import Learner, LearnerConfig, LearnerError, Stopped, create_server
from fedgrpc.model import build_model
from fedgrpc.protos import leader_pb2, learner_pb2, learner_pb2_grpc
from fedgrpc.transport import rpc, wire


@pytest.fixture
def learner_server(channel_to):
    learner = Learner(LearnerConfig(leader="127.0.0.1:1", device="cpu"))
    learner.model = build_model("tiny-cnn")
    learner.specs = wire.specs_of(learner.model.state_dict())
    server, port, _ = create_server(learner, "127.0.0.1", 0)  # the server learner.py runs, chunk deserializer included
    try:
        yield learner, learner_pb2_grpc.LearnerServiceStub(channel_to(f"127.0.0.1:{port}"))
    finally:
        server.stop(None)


def push(stub, tensors, token, round_number=2):
    manifest, payload = wire.encode(tensors)
    return stub.SyncModelState(
        wire.stream(learner_pb2.ModelState, manifest, payload, round=round_number), timeout=10, metadata=rpc.token_metadata(token)
    )


def test_only_the_leader_holding_the_callback_token_is_obeyed(learner_server):
    learner, stub = learner_server
    state = {k: torch.ones_like(v) for k, v in learner.model.state_dict().items()}
    for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED), (rpc.token_metadata("x" * 43), grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as caught:
            stub.StartTraining(learner_pb2.Empty(), timeout=10, metadata=metadata)
        assert caught.value.code() == code
        with pytest.raises(grpc.RpcError) as caught:
            push(stub, state, metadata[0][1] if metadata else "")
        assert caught.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert learner._pending is None and not learner._started

    assert stub.StartTraining(learner_pb2.Empty(), timeout=10, metadata=rpc.token_metadata(learner.callback_token)).success
    assert learner._started
    assert push(stub, state, learner.callback_token).success
    number, tensors, _ = learner._pending
    assert number == 2 and all(torch.equal(tensors[k], state[k]) for k in state)


def test_a_model_that_does_not_fit_is_refused(learner_server):
    learner, stub = learner_server
    state = learner.model.state_dict()
    bad = dict(state, **{"fc.weight": torch.zeros(10, 5)})
    with pytest.raises(grpc.RpcError) as caught:
        push(stub, bad, learner.callback_token)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in caught.value.details()
    nan = dict(state, **{"fc.bias": torch.full((10,), float("nan"))})
    with pytest.raises(grpc.RpcError) as caught:
        push(stub, nan, learner.callback_token)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert learner._pending is None


def test_stop_message_ends_the_wait(learner_server):
    learner, stub = learner_server
    stop = learner_pb2.ModelState(stop=True, reason="training complete")
    assert stub.SyncModelState(iter([stop]), timeout=10, metadata=rpc.token_metadata(learner.callback_token)).success
    with pytest.raises(Stopped, match="training complete"):
        learner._wait(lambda: False, "anything")


class Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"refused with {self._code.name}"


class ScriptedLeader:
    """A stub whose AccumulateGradients answers with the scripted refusals, then accepts; keeps the bytes of every call."""

    def __init__(self, refusals):
        self.refusals = list(refusals)
        self.calls = []

    def AccumulateGradients(self, messages, timeout, metadata):
        self.calls.append(b"".join(messages))  # the serialized frames, as sent
        if self.refusals:
            raise Refusal(self.refusals.pop(0))
        return leader_pb2.Ack(success=True, message="update for round 1 accepted")


def sending_learner(refusals, monkeypatch):
    monkeypatch.setattr(learner_module, "SEND_RETRY_PAUSE_S", 0.01)
    learner = Learner(LearnerConfig(leader="127.0.0.1:1", device="cpu"))
    learner.plan = leader_pb2.TrainingPlan(compression="none")
    learner.learner_id = 0
    learner.stub = ScriptedLeader(refusals)
    return learner


def test_a_busy_or_late_answer_sends_the_same_update_again(monkeypatch):
    busy, late = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED
    learner = sending_learner([busy, late], monkeypatch)
    learner.report(1, {"w": torch.arange(6.0)}, 10, 0.5)
    calls = learner.stub.calls
    assert len(calls) == 3 and calls[0] == calls[1] == calls[2]  # the leader counts identical updates once

    learner = sending_learner([busy] * learner_module.SEND_ATTEMPTS, monkeypatch)
    with pytest.raises(LearnerError, match="RESOURCE_EXHAUSTED"):
        learner.report(1, {"w": torch.arange(6.0)}, 10, 0.5)
    assert len(learner.stub.calls) == learner_module.SEND_ATTEMPTS


def test_a_refused_update_is_not_sent_again(monkeypatch):
    learner = sending_learner([grpc.StatusCode.INVALID_ARGUMENT], monkeypatch)
    with pytest.raises(LearnerError, match="INVALID_ARGUMENT"):
        learner.report(1, {"w": torch.arange(6.0)}, 10, 0.5)
    assert len(learner.stub.calls) == 1


def test_pushed_models_land_in_reused_buffers(learner_server):
    learner, stub = learner_server
    learner._receive_buffers = wire.BufferPool(wire.payload_bytes(learner.specs), keep=2)
    state = {k: torch.ones_like(v) for k, v in learner.model.state_dict().items()}
    assert push(stub, state, learner.callback_token, round_number=2).success
    first = learner._pending[2]
    assert push(stub, state, learner.callback_token, round_number=3).success  # replaces round 2, whose buffer is free again
    assert learner._pending[0] == 3 and learner._receive_buffers.kept == 1
    assert push(stub, state, learner.callback_token, round_number=3).success  # not newer: not kept, its buffer freed
    assert learner._pending[0] == 3 and learner._receive_buffers.kept == 1
    assert push(stub, state, learner.callback_token, round_number=4).success
    assert learner._pending[0] == 4 and learner._pending[2] is first  # round 2's buffer, written again
    assert all(torch.equal(learner._pending[1][k], state[k]) for k in state)
