"""Safe by default: what a stranger, a lost learner or a single update can do to a run with the default flags."""

from __future__ import annotations

import math
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import callback_address, join_all, leader_config, register_client, running_leader, start_learners, wait_until
from fedgrpc.data import load_dataset
from fedgrpc.leader import main as leader_module
from fedgrpc.learner import main as learner_module
from fedgrpc.model import build_model
from fedgrpc.protos import leader_pb2, leader_pb2_grpc, tensors_pb2
from fedgrpc.transport import rpc, wire


def assert_refused(call, code, fragment=""):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details(), caught.value.details()
    return caught.value.details()


def send(client, tensors, round=1, num_examples=10):
    manifest, payload = wire.encode(tensors)
    messages = wire.stream(
        leader_pb2.GradientData, manifest, payload, learner_id=client.learner_id, round=round, num_examples=num_examples, train_loss=1.0
    )
    return client.stub.AccumulateGradients(messages, timeout=10, metadata=client.metadata())


def filled(leader, value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full_like(tensor, value) for name, tensor in leader.model.state_dict().items()}


def norm64(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(tensor.double().square().sum()) for tensor in tensors.values()))


def info(address: str, **fields) -> leader_pb2.LearnerInfo:
    return leader_pb2.LearnerInfo(network_addr=address, callback_token="c" * 32, version=rpc.PROTOCOL_VERSION, **fields)


# ---- defaults -------------------------------------------------------------------------------------------------------


def test_the_default_quorum_is_half_of_the_round_rounded_up_and_rounds_fit_their_work():
    defaults = leader_module.LeaderConfig()
    assert [defaults.round_quorum(members) for members in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    assert leader_module.LeaderConfig(min_learners=3).round_quorum(2) == 2  # never more than take part
    assert defaults.round_timeout == 0 and defaults.checkpoint_every == 0 and defaults.checkpoint_seconds == 60
    assert defaults.max_norm_ratio == 10 and defaults.max_weight_ratio == 4


# ---- finding 6: no single finite update ruins the model ---------------------------------------------------------------


def test_huge_finite_updates_are_scaled_to_the_rounds_bound_and_the_model_steps_as_computed_by_hand(tmp_path, channel_to):
    # defaults: fedsgd, the leader's SGD with momentum 0.9, --max-norm-ratio 10
    with running_leader(leader_config(tmp_path, learners=2)) as running:
        leader = running.leader
        hostile, honest = (register_client(channel_to(running.address)) for _ in range(2))
        reference_model = build_model("tiny-cnn", 10)
        reference_model.load_state_dict(leader.model.state_dict())
        optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.001)
        model_norm = norm64(dict(reference_model.named_parameters()))
        honest_update = filled(leader, 0.01)
        bound = 2 * model_norm  # round 1: twice the model's own norm
        for number, value in enumerate((1e38, float(torch.finfo(torch.float32).max), 1e38), start=1):
            leader.open_round(number)
            huge = filled(leader, value)
            assert send(hostile, huge, round=number).success and send(honest, honest_update, round=number).success
            metrics = leader.close_round(leader.collect(number, 0.0), 0.0)
            assert metrics["updates_clipped"] == 1 and not metrics["model_rejected"]
            scale = bound / norm64(huge)
            for name, parameter in reference_model.named_parameters():
                parameter.grad = ((huge[name].double() * scale + honest_update[name].double()) / 2).float()
            optimizer.step()
            for name, tensor in reference_model.state_dict().items():
                assert torch.allclose(leader.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-6), (number, name)
            bound = 10 * norm64(honest_update)  # later rounds: ten times the lower median of the last round's norms
        assert all(bool(torch.isfinite(tensor).all()) for tensor in leader.model.state_dict().values())


def test_a_model_that_explodes_is_never_published_and_the_last_good_one_is_kept(tmp_path, channel_to):
    # every bound switched off, so only the model's own check stands between the update and the published model
    config = leader_config(tmp_path, learners=1, aggregation="fedavg", max_norm_ratio=0.0, server_opt="sgdm")
    with running_leader(config) as running:
        leader = running.leader
        client = register_client(channel_to(running.address))
        before = {name: tensor.clone() for name, tensor in leader.model.state_dict().items()}
        leader.open_round(1)
        assert send(client, filled(leader, -1e30)).success  # a delta that moves every weight by 1e30
        metrics = leader.close_round(leader.collect(1, 0.0), 0.0)
        assert metrics["model_rejected"] and not leader.strategy.optimizer.state  # the momentum that took it in is gone
        for name, tensor in leader.model.state_dict().items():
            assert torch.equal(tensor, before[name]), name
        published = wire.receive(
            client.stub.GetModel(leader_pb2.Empty(), timeout=10, metadata=client.metadata()),
            max_bytes=leader.model_bytes,
            expected=leader.specs,
        )
        assert published.header.round == 2
        for name, tensor in published.tensors.items():
            assert torch.equal(tensor, before[name]), name
        leader.save(metrics)
        _, weights = leader_module.checkpoint.load(leader_module.checkpoint.latest(Path(config.checkpoint_dir)))
        assert all(torch.equal(weights[name], before[name]) for name in before)

        leader.open_round(2)  # the next round goes on from the kept model
        assert send(client, filled(leader, 0.001), round=2).success
        assert not leader.close_round(leader.collect(2, 0.0), 0.0)["model_rejected"]


# ---- finding 7: a declared example count cannot outweigh the rest -----------------------------------------------------


def test_a_learner_claiming_a_billion_examples_weighs_at_most_four_times_the_median(tmp_path, channel_to):
    config = leader_config(
        tmp_path,
        learners=2,
        aggregation="fedavg",
        data_mode="local",
        dataset="imagefolder",
        local_epochs=1,
        server_opt="sgd",
        max_norm_ratio=0.0,
    )
    test_data = load_dataset("synthetic", None, train=False)
    leader = leader_module.Leader(config, test_data, None)
    for token, claimed in (("c" * 32, 100), ("d" * 32, 10**9)):  # the roster calls each back at the shared CallbackServer
        leader.roster.register(
            leader_pb2.LearnerInfo(
                network_addr=callback_address(), callback_token=token, num_examples=claimed, version=rpc.PROTOCOL_VERSION
            ),
            peer="ipv4:127.0.0.1:1",
        )
    try:
        current = leader.open_round(1)
        assert current.max_weight == 4 * 100  # the lower median of the claims (100, 10^9), times --max-weight-ratio
        before = {name: tensor.clone() for name, tensor in leader.model.state_dict().items()}
        header = leader_pb2.GradientData(round=1, num_examples=100, train_loss=1.0)
        leader.intake.accept(0, header, filled(leader, 0.001))
        header = leader_pb2.GradientData(round=1, learner_id=1, num_examples=10**9, train_loss=1.0)
        leader.intake.accept(1, header, filled(leader, 0.006))
        leader.close_round(leader.collect(1, 0.0), 0.0)
        # weights 100 and 400: the mean delta is (100 * 0.001 + 400 * 0.006) / 500 = 0.005, and FedAvg subtracts it
        # (trusting the claim it would be 0.006 - 5e-10)
        for name, tensor in leader.model.state_dict().items():
            assert torch.allclose(tensor, before[name] - 0.005, atol=1e-6), name
    finally:
        leader.close()


# ---- findings 8-11: registration cannot be turned against the leader or others ---------------------------------------


def test_callback_addresses_are_checked_against_where_the_registration_came_from():
    peer = "ipv4:10.1.2.3:55555"
    assert rpc.callback_problem("10.1.2.3:7000", peer, trusted=False) is None
    assert "not the address this registration came from" in rpc.callback_problem("10.9.9.9:7000", peer, trusted=False)
    assert rpc.callback_problem("10.9.9.9:7000", peer, trusted=True) is None  # the enrolment secret vouches for it
    assert rpc.callback_problem("learner-7.example:7000", peer, trusted=True) is None
    assert rpc.callback_problem("localhost:7000", "ipv6:[::1]:4000", trusted=False) is None
    assert rpc.callback_problem("127.0.0.1:7000", "ipv6:[::ffff:127.0.0.1]:4000", trusted=False) is None
    for address in ("169.254.169.254:80", "[fe80::1]:80", "224.0.0.1:80", "0.0.0.0:80", "[::]:80", "255.255.255.255:80"):
        assert "link-local, multicast or unspecified" in rpc.callback_problem(address, peer, trusted=True), address
    assert "longer than" in rpc.callback_problem("a" * 254 + ":80", peer, trusted=True)
    assert "longer than" in rpc.callback_problem("a" * 64 + ".example:80", peer, trusted=True)


def test_registrations_naming_other_hosts_metadata_addresses_or_huge_names_are_refused_without_a_call(tmp_path, channel_to, caplog):
    with running_leader(leader_config(tmp_path)) as running:
        stub = leader_pb2_grpc.LeaderServiceStub(channel_to(running.address))
        with socket.socket() as listener:  # a bystander on another loopback address: the leader must not dial it
            listener.bind(("127.0.0.2", 0))
            listener.listen()
            listener.settimeout(0.5)
            other = f"127.0.0.2:{listener.getsockname()[1]}"
            assert_refused(
                lambda: stub.RegisterLearner(info(other), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
                "not the address this registration came from (127.0.0.1)",
            )
            assert_refused(
                lambda: stub.RegisterLearner(info("169.254.169.254:80"), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "link-local"
            )
            details = assert_refused(
                lambda: stub.RegisterLearner(info("h" * 1_000_000 + ":80"), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
                "longer than a DNS name allows",
            )
            assert len(details) < 500
            with pytest.raises(socket.timeout):
                listener.accept()  # nobody called it
        assert not running.leader.roster.records()
    assert sum(len(record.getMessage()) for record in caplog.records) < 10_000  # a 1 MB name is not logged


def test_a_registration_naming_the_leader_itself_is_refused_and_a_default_run_goes_on(tmp_path, channel_to):
    with running_leader(leader_config(tmp_path, round_timeout=0.0)) as running:
        stub = leader_pb2_grpc.LeaderServiceStub(channel_to(running.address))
        assert_refused(
            lambda: stub.RegisterLearner(info(running.address), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"cannot call this learner back at {running.address} (it does not serve learner.LearnerService",
        )
        assert not running.leader.roster.records()  # it never held a slot
        learners = start_learners(running.address, 2)
        history = running.leader.run()
    assert join_all(learners) == [0, 0]
    assert history[0]["learners_reported"] == 2


def test_registrations_nobody_answers_hold_no_slot_and_honest_learners_get_in(tmp_path, channel_to):
    with socket.socket() as silent, running_leader(leader_config(tmp_path, round_timeout=0.0)) as running:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # accepts connections and never speaks: every check of it times out
        stub = leader_pb2_grpc.LeaderServiceStub(channel_to(running.address))
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        tokens = [f"{index:032d}" for index in range(6)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            strangers = [
                pool.submit(
                    lambda token=token: stub.RegisterLearner(
                        leader_pb2.LearnerInfo(network_addr=address, callback_token=token, version=rpc.PROTOCOL_VERSION), timeout=30
                    )
                )
                for token in tokens
            ]
            learners = start_learners(running.address, 2)
            history = running.leader.run()
            codes = []
            for future in strangers:
                with pytest.raises(grpc.RpcError) as caught:
                    future.result()
                codes.append(caught.value.code())
                # refused after its call-back timed out, or at once as one host's share of calls without a session
                assert "DEADLINE_EXCEEDED" in caught.value.details() or "calls without a session from 127.0.0.1" in caught.value.details()
            assert set(codes) <= {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert grpc.StatusCode.FAILED_PRECONDITION in codes
    assert join_all(learners) == [0, 0]
    assert history[0]["learners_reported"] == 2
    assert {record.address for record in running.leader.roster.records()}.isdisjoint({address})


# ---- finding 5: strangers' streams cannot starve members -------------------------------------------------------------


def test_fifty_unauthenticated_health_watches_leave_members_served(tmp_path, channel_to):
    with running_leader(leader_config(tmp_path)) as running:
        client = register_client(channel_to(running.address))
        stranger = channel_to(running.address)
        watches = [health_pb2_grpc.HealthStub(stranger).Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(50)]
        try:
            opened = refused = 0
            for watch in watches:
                try:
                    next(watch)
                    opened += 1
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                    refused += 1
            assert opened == rpc.MAX_STRANGER_STREAMS_PER_PEER and refused == 50 - opened
            member = channel_to(running.address)
            for _ in range(20):  # members' calls and a member's health check are all answered
                reply = client.stub.Heartbeat(
                    leader_pb2.HeartbeatRequest(learner_id=client.learner_id), timeout=10, metadata=client.metadata()
                )
                assert reply.success
                assert rpc.is_serving(member, timeout=10, token=client.token)
            assert running.leader.limits.strangers_in_flight()[1] == opened
        finally:
            for watch in watches:
                watch.cancel()
        wait_until(lambda: running.leader.limits.strangers_in_flight() == (0, 0))


def test_health_watches_on_a_learner_leave_the_leaders_calls_served(channel_to):
    learner = learner_module.Learner(learner_module.LearnerConfig(leader="127.0.0.1:1", device="cpu"))
    server, port, _ = learner_module.create_server(learner, "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{port}"
        stranger = channel_to(address)
        watches = [health_pb2_grpc.HealthStub(stranger).Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(8)]
        outcomes = []
        for watch in watches:
            try:
                next(watch)
                outcomes.append("open")
            except grpc.RpcError as error:
                outcomes.append(error.code().name)
        assert outcomes.count("open") <= learner_module.MAX_STRANGER_CALLS
        leader_side = channel_to(address)
        for _ in range(10):  # the leader's check and StartTraining carry the callback secret: a member's calls
            assert rpc.health_check(leader_side, 10, rpc.LEARNER_SERVICE, learner.callback_token) is None
        stub = rpc.learner_stub(leader_side)
        reply = stub.StartTraining(leader_module.learner_pb2.Empty(), timeout=10, metadata=rpc.token_metadata(learner.callback_token))
        assert reply.success
        for watch in watches:
            watch.cancel()
    finally:
        server.stop(None)
        learner.channel.close()


# ---- findings 12-13: declared sizes are checked before they are believed ---------------------------------------------


def test_an_update_manifest_far_larger_than_the_models_is_refused_unparsed(tmp_path, channel_to):
    with running_leader(leader_config(tmp_path)) as running:
        client = register_client(channel_to(running.address))
        running.leader.open_round(1)
        manifest = tensors_pb2.TensorManifest(total_bytes=250_000 * 4)
        for index in range(250_000):
            manifest.tensors.add(name=f"t{index}", dtype="float32", shape=[1])
        assert manifest.ByteSize() > 5_000_000
        message = leader_pb2.GradientData(manifest=manifest, learner_id=client.learner_id, round=1, num_examples=1)
        details = assert_refused(
            lambda: client.stub.AccumulateGradients(iter([message]), timeout=30, metadata=client.metadata()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "exceeds the",
        )
        assert "bytes its manifest, a chunk and a header take" in details  # refused on its size, before protobuf parsed it


def test_a_data_stream_declaring_more_than_the_announced_split_is_refused_before_any_allocation():
    learner = learner_module.Learner(learner_module.LearnerConfig(leader="127.0.0.1:1", device="cpu"))
    learner.plan = leader_pb2.TrainingPlan(image_shape=[3, 32, 32], num_classes=10)
    learner.split_examples = 10
    learner.split_layout = [wire.TensorSpec("images", "uint8", (3, 32, 32)), wire.TensorSpec("labels", "int64", ())]
    declared = {"images": torch.zeros(0, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64)}
    manifest, _ = wire.encode(declared)
    manifest.tensors[0].shape[:] = [2**20, 3, 32, 32]  # 3 GiB declared, 64 bytes sent
    manifest.tensors[1].shape[:] = [2**20]
    manifest.total_bytes = 2**20 * 3 * 32 * 32 + 2**20 * 8

    def fake_get_data(request, timeout, metadata):
        return iter([leader_pb2.DataChunk(manifest=manifest, chunk=b"x" * 64)])

    learner.stub.GetData = fake_get_data
    try:
        # refused on the declared shape, which receive() checks before it allocates the payload
        with pytest.raises(
            learner_module.LearnerError,
            match=r"malformed data split: tensor 'images' has shape \[1048576, 3, 32, 32\], expected \[10, 3, 32, 32\]",
        ):
            learner._fetch_data()
    finally:
        learner.channel.close()


def test_a_lazily_committed_buffer_costs_what_is_written_not_what_is_declared():
    def resident_mib() -> float:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024

    before = resident_mib()
    buffer = wire.lazy_buffer(1 << 30)
    buffer[0:64] = b"x" * 64
    assert resident_mib() - before < 64  # 1 GiB declared, 64 bytes written
    assert bytes(buffer[0:64]) == b"x" * 64 and bytes(buffer[64:128]) == bytes(64)
