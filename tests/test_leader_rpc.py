"""The leader's RPCs over a real socket: hostile updates, authentication, registration limits."""

from __future__ import annotations

import io

import grpc
import pytest
import torch

import rpc
import wire
from conftest import leader_config, register_client, running_leader
from protos import leader_pb2, leader_pb2_grpc, tensors_pb2


@pytest.fixture
def open_round(tmp_path, channel_to):
    """A leader with round 1 open and one registered client (learner 0)."""
    with running_leader(leader_config(tmp_path, learners=2)) as running:
        client = register_client(channel_to(running.address))
        running.leader._open_round(1)
        yield running, client


def valid_update(leader, scale: float = 0.01) -> dict[str, torch.Tensor]:
    return {name: torch.full_like(tensor, scale) for name, tensor in leader.model.state_dict().items()}


def send(client, tensors=None, manifest=None, payload=None, **header):
    if tensors is not None:
        manifest, payload = wire.encode(tensors)
    fields = dict(learner_id=client.learner_id, round=1, num_examples=10, train_loss=1.0)
    fields.update(header)
    messages = wire.stream(leader_pb2.GradientData, manifest, payload, **fields)
    return client.stub.AccumulateGradients(messages, timeout=10, metadata=client.metadata())


def snapshot(leader):
    return {name: tensor.clone() for name, tensor in leader.model.state_dict().items()}


def assert_refused(call, code, fragment=""):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details()


def test_hostile_payloads_are_refused_and_the_model_is_unchanged(open_round):
    running, client = open_round
    leader = running.leader
    before = snapshot(leader)
    good = valid_update(leader)

    pickled = io.BytesIO()
    torch.save(good, pickled)
    blog_style = leader_pb2.GradientData(chunk=pickled.getvalue(), learner_id=0, round=1, num_examples=10)
    assert_refused(lambda: client.stub.AccumulateGradients(iter([blog_style]), timeout=10, metadata=client.metadata()),
                   grpc.StatusCode.INVALID_ARGUMENT, "no tensor manifest")

    manifest, payload = wire.encode(good)
    # a pickle under a genuine manifest is refused on its length, and is never unpickled
    assert len(pickled.getvalue()) != len(payload)
    assert_refused(lambda: send(client, manifest=manifest, payload=pickled.getvalue()), grpc.StatusCode.INVALID_ARGUMENT, "manifest declares")
    assert_refused(lambda: send(client, manifest=manifest, payload=payload[:-4]), grpc.StatusCode.INVALID_ARGUMENT, "truncated")
    assert_refused(lambda: send(client, manifest=manifest, payload=payload + b"\0" * 8), grpc.StatusCode.INVALID_ARGUMENT, "longer")

    wrong_shape = dict(good)
    wrong_shape["fc.bias"] = torch.zeros(11)
    assert_refused(lambda: send(client, wrong_shape), grpc.StatusCode.INVALID_ARGUMENT, "shape")

    wrong_dtype = dict(good)
    wrong_dtype["fc.bias"] = torch.zeros(10, dtype=torch.float64)
    assert_refused(lambda: send(client, wrong_dtype), grpc.StatusCode.INVALID_ARGUMENT, "dtype")

    for bad in (float("nan"), float("inf")):
        non_finite = dict(good)
        non_finite["conv1.weight"] = good["conv1.weight"].clone()
        non_finite["conv1.weight"][0, 0, 0, 0] = bad
        assert_refused(lambda: send(client, non_finite), grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite")

    missing = {name: tensor for name, tensor in good.items() if name != "fc.bias"}
    assert_refused(lambda: send(client, missing), grpc.StatusCode.INVALID_ARGUMENT, "missing tensors: fc.bias")

    # a manifest that declares a huge tensor is refused before anything is allocated
    huge, _ = wire.encode(good)
    huge.tensors.add(name="extra", dtype="float32", shape=[1 << 38])
    huge.total_bytes += 1 << 40
    assert_refused(lambda: send(client, manifest=huge, payload=b""), grpc.StatusCode.INVALID_ARGUMENT, "unexpected tensors: extra")

    assert_refused(lambda: send(client, good, num_examples=0), grpc.StatusCode.INVALID_ARGUMENT, "num_examples")

    after = snapshot(leader)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert leader._round.running.count == 0
    # the same client's well-formed update is taken: the refusals above were about the payloads
    assert send(client, good).success
    assert leader._round.running.count == 1


def test_stale_duplicate_and_conflicting_updates(open_round):
    running, client = open_round
    leader = running.leader
    good = valid_update(leader)

    assert_refused(lambda: send(client, good, round=0), grpc.StatusCode.FAILED_PRECONDITION, "stale")
    assert_refused(lambda: send(client, good, round=2), grpc.StatusCode.FAILED_PRECONDITION, "stale")
    assert send(client, good).message.endswith("accepted")
    assert "counted once" in send(client, good).message
    assert_refused(lambda: send(client, valid_update(leader, 0.02)), grpc.StatusCode.ALREADY_EXISTS, "different update")
    assert leader._round.running.count == 1
    assert leader._round.running.total_weight == 10


def test_calls_without_a_valid_session_token_are_refused(open_round, channel_to):
    running, client = open_round
    stub = leader_pb2_grpc.LeaderServiceStub(channel_to(running.address))
    manifest, payload = wire.encode(valid_update(running.leader))

    def update(metadata, learner_id=0):
        messages = wire.stream(leader_pb2.GradientData, manifest, payload, learner_id=learner_id, round=1, num_examples=10)
        return stub.AccumulateGradients(messages, timeout=10, metadata=metadata)

    assert_refused(lambda: update(()), grpc.StatusCode.UNAUTHENTICATED)
    assert_refused(lambda: update(rpc.token_metadata("forged")), grpc.StatusCode.UNAUTHENTICATED)
    assert_refused(lambda: list(stub.GetModel(leader_pb2.Empty(), timeout=10)), grpc.StatusCode.UNAUTHENTICATED)
    assert_refused(lambda: list(stub.GetData(leader_pb2.LearnerDataRequest(learner_id=0), timeout=10)), grpc.StatusCode.UNAUTHENTICATED)

    other = register_client(channel_to(running.address))
    assert other.learner_id == 1
    # learner 1's token cannot act as learner 0
    assert_refused(lambda: update(other.metadata(), learner_id=0), grpc.StatusCode.PERMISSION_DENIED)
    assert_refused(lambda: list(other.stub.GetData(leader_pb2.LearnerDataRequest(learner_id=0), timeout=10, metadata=other.metadata())),
                   grpc.StatusCode.PERMISSION_DENIED)
    assert running.leader._round.running.count == 0


def test_registration_limits_and_checks(tmp_path, channel_to):
    with running_leader(leader_config(tmp_path, learners=2)) as running:
        channel = channel_to(running.address)
        stub = leader_pb2_grpc.LeaderServiceStub(channel)
        ids = [register_client(channel).learner_id for _ in range(2)]
        assert ids == [0, 1]
        assert_refused(lambda: register_client(channel), grpc.StatusCode.RESOURCE_EXHAUSTED, "full")

    with running_leader(leader_config(tmp_path, learners=2)) as running:
        stub = leader_pb2_grpc.LeaderServiceStub(channel_to(running.address))
        info = dict(network_addr="127.0.0.1:1", callback_token="c" * 32, version=rpc.PROTOCOL_VERSION)
        assert_refused(lambda: stub.RegisterLearner(leader_pb2.LearnerInfo(**{**info, "version": "0"}), timeout=10),
                       grpc.StatusCode.FAILED_PRECONDITION, "same release")
        assert_refused(lambda: stub.RegisterLearner(leader_pb2.LearnerInfo(**{**info, "network_addr": "no-port"}), timeout=10),
                       grpc.StatusCode.INVALID_ARGUMENT, "host:port")
        assert_refused(lambda: stub.RegisterLearner(leader_pb2.LearnerInfo(**{**info, "callback_token": "short"}), timeout=10),
                       grpc.StatusCode.INVALID_ARGUMENT, "callback_token")
        assert_refused(lambda: stub.RegisterLearner(leader_pb2.LearnerInfo(**{**info, "num_examples": 50}), timeout=10),
                       grpc.StatusCode.FAILED_PRECONDITION, "--data-dir")


def test_get_model_and_get_data_stream_checked_tensors(open_round):
    running, client = open_round
    leader = running.leader
    received = wire.receive(client.stub.GetModel(leader_pb2.Empty(), timeout=10, metadata=client.metadata()),
                            max_bytes=leader.update_bytes, expected=leader.specs)
    assert received.header.round == 1
    for name, tensor in leader.model.state_dict().items():
        assert torch.equal(received.tensors[name], tensor)

    data = wire.receive(client.stub.GetData(leader_pb2.LearnerDataRequest(learner_id=0), timeout=10, metadata=client.metadata()),
                        max_bytes=1 << 30)
    shard = leader.data_for(0)
    assert torch.equal(data.tensors["images"], shard.images)
    assert torch.equal(data.tensors["labels"], shard.labels)
    assert len(shard) == 1000  # half of the 2000 synthetic training examples
