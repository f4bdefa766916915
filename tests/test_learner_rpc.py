"""The learner's RPCs over a real socket: only its leader may start it or push a model, and only a model that fits."""

from __future__ import annotations

import grpc
import pytest
import torch

import rpc
import wire
from learner import Learner, LearnerConfig, Stopped, create_server
from model import build_model
from protos import learner_pb2, learner_pb2_grpc


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
    return stub.SyncModelState(wire.stream(learner_pb2.ModelState, manifest, payload, round=round_number),
                               timeout=10, metadata=rpc.token_metadata(token))


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
    number, tensors = learner._pending
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
