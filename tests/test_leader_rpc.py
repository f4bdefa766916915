"""The leader's RPCs over a real socket: hostile updates, authentication, registration limits."""

from __future__ import annotations

import io
import threading

import grpc
import pytest
import torch

from conftest import callback_address, join_all, leader_config, register_client, running_leader, start_learners
from fedgrpc.protos import leader_pb2, leader_pb2_grpc
from fedgrpc.transport import rpc, wire


@pytest.fixture
def open_round(tmp_path, channel_to):
    """A leader with round 1 open and one registered client (learner 0)."""
    with running_leader(leader_config(tmp_path, learners=2)) as running:
        client = register_client(channel_to(running.address))
        running.leader.open_round(1)
        yield running, client


def valid_update(leader, scale: float = 0.01) -> dict[str, torch.Tensor]:
    return {name: torch.full_like(tensor, scale) for name, tensor in leader.model.state_dict().items()}


def send(client, tensors=None, manifest=None, payload=None, timeout=10.0, **header):
    if tensors is not None:
        manifest, payload = wire.encode(tensors)
    fields = dict(learner_id=client.learner_id, round=1, num_examples=10, train_loss=1.0)
    fields.update(header)
    messages = wire.stream(leader_pb2.GradientData, manifest, payload, **fields)
    return client.stub.AccumulateGradients(messages, timeout=timeout, metadata=client.metadata())


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
    assert_refused(
        lambda: client.stub.AccumulateGradients(iter([blog_style]), timeout=10, metadata=client.metadata()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no tensor manifest",
    )

    manifest, payload = wire.encode(good)
    # a pickle under a genuine manifest is refused on its length, and is never unpickled
    assert len(pickled.getvalue()) != len(payload)
    assert_refused(
        lambda: send(client, manifest=manifest, payload=pickled.getvalue()), grpc.StatusCode.INVALID_ARGUMENT, "manifest declares"
    )
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
    assert leader.intake.round.summed().count == 0
    # the same client's well-formed update is taken: the refusals above were about the payloads
    assert send(client, good).success
    assert leader.intake.round.summed().count == 1


def test_stale_duplicate_and_conflicting_updates(open_round):
    running, client = open_round
    leader = running.leader
    good = valid_update(leader)

    assert_refused(lambda: send(client, good, round=0), grpc.StatusCode.FAILED_PRECONDITION, "stale")
    assert_refused(lambda: send(client, good, round=2), grpc.StatusCode.FAILED_PRECONDITION, "stale")
    assert send(client, good).message.endswith("accepted")
    assert "counted once" in send(client, good).message
    assert_refused(lambda: send(client, valid_update(leader, 0.02)), grpc.StatusCode.ALREADY_EXISTS, "different update")
    assert leader.intake.round.summed().count == 1
    assert leader.intake.round.summed().total_weight == 10


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
    assert_refused(
        lambda: list(other.stub.GetData(leader_pb2.LearnerDataRequest(learner_id=0), timeout=10, metadata=other.metadata())),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert running.leader.intake.round.summed().count == 0


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
        assert_refused(
            lambda: stub.RegisterLearner(leader_pb2.LearnerInfo(**{**info, "version": "0"}), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
            "same release",
        )
        assert_refused(
            lambda: stub.RegisterLearner(leader_pb2.LearnerInfo(**{**info, "network_addr": "no-port"}), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "host:port",
        )
        assert_refused(
            lambda: stub.RegisterLearner(leader_pb2.LearnerInfo(**{**info, "callback_token": "short"}), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "callback_token",
        )
        assert_refused(
            lambda: stub.RegisterLearner(leader_pb2.LearnerInfo(**{**info, "num_examples": 50}), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
            "--data-dir",
        )


def test_get_model_and_get_data_stream_checked_tensors(open_round):
    running, client = open_round
    leader = running.leader
    received = wire.receive(
        client.stub.GetModel(leader_pb2.Empty(), timeout=10, metadata=client.metadata()),
        max_bytes=leader.intake.update_bytes,
        expected=leader.specs,
    )
    assert received.header.round == 1
    for name, tensor in leader.model.state_dict().items():
        assert torch.equal(received.tensors[name], tensor)

    data = wire.receive(
        client.stub.GetData(leader_pb2.LearnerDataRequest(learner_id=0), timeout=10, metadata=client.metadata()), max_bytes=1 << 30
    )
    shard = leader.splits.data_for(0)
    assert torch.equal(data.tensors["images"], shard.images)
    assert torch.equal(data.tensors["labels"], shard.labels)
    assert len(shard) == 1000  # half of the 2000 synthetic training examples


def test_enrolment_secret_gates_registration_before_any_handler_runs(tmp_path, channel_to, monkeypatch):
    from fedgrpc.leader import main as leader_module

    leader, server, port, _ = leader_module.serve(leader_config(tmp_path), enrolment_token="correct horse")
    try:
        stub = leader_pb2_grpc.LeaderServiceStub(channel_to(f"127.0.0.1:{port}"))
        info = leader_pb2.LearnerInfo(network_addr=callback_address(), callback_token="c" * 32, version=rpc.PROTOCOL_VERSION)
        for metadata in ((), ((rpc.ENROLMENT_METADATA_KEY, "battery staple"),)):
            assert_refused(
                lambda: stub.RegisterLearner(info, timeout=10, metadata=metadata), grpc.StatusCode.UNAUTHENTICATED, "enrolment secret"
            )
        assert leader.roster.learner_for_token("anything") is None and not leader.roster.records()
        reply = stub.RegisterLearner(info, timeout=10, metadata=((rpc.ENROLMENT_METADATA_KEY, "correct horse"),))
        assert reply.success and reply.learner_id == 0

        # a call without a session token never reaches the handler
        calls = []
        original = leader_module.LeaderServicer._caller
        monkeypatch.setattr(leader_module.LeaderServicer, "_caller", lambda self, context: calls.append(1) or original(self, context))
        leader.open_round(1)
        manifest, payload = wire.encode(valid_update(leader))
        messages = wire.stream(leader_pb2.GradientData, manifest, payload, learner_id=0, round=1, num_examples=10)
        assert_refused(lambda: stub.AccumulateGradients(messages, timeout=10), grpc.StatusCode.UNAUTHENTICATED)
        assert calls == []
    finally:
        server.stop(None)
        leader.close()


def test_learner_presents_the_enrolment_secret_from_a_file(tmp_path):
    from fedgrpc.leader import main as leader_module

    secret_file = tmp_path / "secret"
    secret_file.write_text("correct horse\n")
    leader, server, port, _ = leader_module.serve(leader_config(tmp_path, learners=1, rounds=1), enrolment_token="correct horse")
    try:
        threads = start_learners(f"127.0.0.1:{port}", 1, ["--token-file", str(secret_file)])
        assert len(leader.run()) == 1
        assert join_all(threads) == [0]
    finally:
        server.stop(None)
        leader.close()


def test_norm_bound_refuses_large_updates_and_rejections_are_counted_once_logged(tmp_path, channel_to, caplog):
    with running_leader(leader_config(tmp_path, max_update_norm=1.0)) as running:
        client = register_client(channel_to(running.address))
        leader = running.leader
        leader.open_round(1)
        big = valid_update(leader, scale=1.0)  # norm sqrt(11642) ~ 108
        for _ in range(2):
            assert_refused(lambda: send(client, big), grpc.StatusCode.INVALID_ARGUMENT, "exceeds --max-update-norm 1")
        assert_refused(lambda: send(client, big, round=7), grpc.StatusCode.FAILED_PRECONDITION, "stale")
        assert leader.intake.round.rejected == {0: 3}
        assert leader.intake.round.summed().count == 0
        small = valid_update(leader, scale=0.001)  # norm ~ 0.108
        assert send(client, small).success
    warnings = [record for record in caplog.records if "refused an update from learner 0" in record.getMessage()]
    assert len(warnings) == 1


def test_negative_batchnorm_variances_are_refused(tmp_path, channel_to):
    with running_leader(leader_config(tmp_path, model="resnet20")) as running:
        client = register_client(channel_to(running.address))
        leader = running.leader
        leader.open_round(1)
        update = {name: torch.zeros_like(tensor) for name, tensor in leader.model.state_dict().items()}
        update["stem.1.running_var"] = torch.full_like(update["stem.1.running_var"], -1.0)
        assert_refused(lambda: send(client, update), grpc.StatusCode.INVALID_ARGUMENT, "stem.1.running_var holds negative variances")
        assert leader.intake.round.summed().count == 0


def test_a_retried_registration_gets_the_same_identity(tmp_path, channel_to):
    with running_leader(leader_config(tmp_path, learners=2)) as running:
        channel = channel_to(running.address)
        first, again = register_client(channel, "same secret" * 3), register_client(channel, "same secret" * 3)
        assert (first.learner_id, first.token) == (again.learner_id, again.token)
        assert len(running.leader.roster.records()) == 1


def test_a_hundred_concurrent_registrations_get_distinct_ids_and_the_next_is_refused(tmp_path, channel_to):
    from concurrent.futures import ThreadPoolExecutor

    with running_leader(leader_config(tmp_path, learners=100)) as running:
        channel = channel_to(running.address)
        with ThreadPoolExecutor(max_workers=100) as pool:
            clients = list(pool.map(lambda _: register_client(channel), range(100)))
        assert sorted(client.learner_id for client in clients) == list(range(100))
        assert len({client.token for client in clients}) == 100
        assert_refused(lambda: register_client(channel), grpc.StatusCode.RESOURCE_EXHAUSTED, "full (100 of 100 learners)")
        assert rpc.is_serving(channel)


def heartbeat(client, learner_id=None):
    request = leader_pb2.HeartbeatRequest(learner_id=client.learner_id if learner_id is None else learner_id)
    return client.stub.Heartbeat(request, timeout=10, metadata=client.metadata())


def test_a_learner_that_misses_the_deadline_is_told_so_and_its_slot_goes_to_a_newcomer(tmp_path, channel_to):
    config = leader_config(tmp_path, learners=2, min_learners=1, round_timeout=0.5)
    with running_leader(config) as running:
        leader = running.leader
        channel = channel_to(running.address)
        late, punctual = register_client(channel), register_client(channel)
        leader.started = True
        leader.open_round(1)
        assert heartbeat(late).success
        assert_refused(lambda: heartbeat(late, learner_id=1), grpc.StatusCode.PERMISSION_DENIED, "belongs to learner 0")
        assert send(punctual, valid_update(leader)).success
        finished = leader.collect(1, 0.0)  # learner 0 sends nothing before the deadline
        assert finished.summed().count == 1
        # its session ends with it: every later call is refused with the reason, and the learner registers again
        assert_refused(lambda: heartbeat(late), grpc.StatusCode.UNAUTHENTICATED, "marked absent: it sent no update for round 1")
        assert_refused(lambda: send(late, valid_update(leader)), grpc.StatusCode.UNAUTHENTICATED, "register again")

        leader.open_round(2)
        newcomer = register_client(channel)
        assert (newcomer.learner_id, newcomer.joins_round) == (0, 3)  # the absent learner's slot, from the round after this one
        assert_refused(lambda: heartbeat(late), grpc.StatusCode.UNAUTHENTICATED)  # its session ended with its slot
        assert heartbeat(newcomer).success
        assert_refused(lambda: send(newcomer, valid_update(leader), round=2), grpc.StatusCode.FAILED_PRECONDITION, "from round 3")
        assert send(punctual, valid_update(leader), round=2).success
        assert leader.open_round(3).members == {0, 1}


@pytest.mark.parametrize("aggregator, kept", [("mean", 1), ("median", 0)])
def test_a_summed_update_leaves_its_buffer_to_the_next_and_a_kept_one_does_not(tmp_path, channel_to, aggregator, kept):
    with running_leader(leader_config(tmp_path, learners=2, rule=aggregator)) as running:
        leader = running.leader
        first, second = (register_client(channel_to(running.address)) for _ in range(2))
        current = leader.open_round(1)
        send(first, valid_update(leader, 0.01))
        current.summed()  # the first update's buffer is given back after its sum, which runs behind the answer
        send(second, valid_update(leader, 0.03))  # under mean, into the buffer the first update arrived in
        current.summed()
        assert leader.intake.buffers.kept == kept
        if aggregator == "mean":
            expected = 0.02  # (10 * 0.01 + 10 * 0.03) / 20, so the first update was summed before its buffer was reused
            assert all(torch.allclose(tensor, torch.full_like(tensor, expected)) for tensor in leader.intake.round.summed().mean().values())
        else:
            updates = leader.intake.round.summed().aggregate(lambda updates, weights: {"kept": [u for u in updates]})["kept"]
            assert [float(next(iter(update.values())).flatten()[0]) for update in updates] == pytest.approx([0.01, 0.03])


def test_an_update_is_answered_once_checked_and_the_round_waits_for_its_sum(tmp_path, channel_to, monkeypatch):
    with running_leader(leader_config(tmp_path, learners=3, max_norm_ratio=0.0)) as running:  # the mean of the updates as sent
        leader = running.leader
        clients = [register_client(channel_to(running.address)) for _ in range(3)]
        leader.started = True
        current = leader.open_round(1)
        gate = threading.Event()
        add_to_sum = leader.intake._add_to_sum
        monkeypatch.setattr(leader.intake, "_add_to_sum", lambda *args: (gate.wait(30), add_to_sum(*args)))
        for client, value in zip(clients[:2], [0.01, 0.04], strict=False):
            assert send(client, valid_update(leader, value)).success  # answered while its sum is held back
        assert current.reported == 2 and current.running.count == 0
        # both slots for pending sums are taken: the third update waits for one, but not past its call's deadline,
        # and is refused rather than taken after its sender has given up on it
        assert_refused(
            lambda: send(clients[2], valid_update(leader, 0.07), timeout=1.0), grpc.StatusCode.RESOURCE_EXHAUSTED, "send it again"
        )
        assert current.reported == 2 and 2 not in current.digests
        gate.set()
        assert send(clients[2], valid_update(leader, 0.07)).success  # the same update again, now there is room
        finished = leader.collect(1, 0.0)  # returns once the third is accepted too
        result = leader.strategy.aggregate(finished)
        assert finished.running.count == 3
        assert all(torch.allclose(tensor, torch.full_like(tensor, 0.04)) for tensor in result.values())  # (0.01 + 0.04 + 0.07) / 3
