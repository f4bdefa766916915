"""A loopback two-learner federation with real leader and learner servers, checked against central training."""

from __future__ import annotations

import copy
import json

import grpc
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import callback_address, join_all, leader_config, running_leader, start_learners
from fedgrpc.data import load_dataset, normalize, split_iid
from fedgrpc.leader import checkpoint
from fedgrpc.model import build_model
from fedgrpc.protos import leader_pb2, leader_pb2_grpc
from fedgrpc.transport import rpc

SEED = 3
SHARD = 1000  # synthetic train set of 2000 split in two: each learner's batch is its whole shard
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 0.001


def shards(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_dataset("synthetic", None, train=True, seed=seed)
    return [(normalize(data.images[part]), data.labels[part]) for part in split_iid(len(data), 2, seed)]


def train_locally(initial: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """What one fedavg learner trains: the tiny CNN from `initial`, `steps` full-batch SGD steps with the tests' settings."""
    local = build_model("tiny-cnn")
    local.load_state_dict(initial)
    optimizer = torch.optim.SGD(local.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(local(inputs), labels).backward()
        optimizer.step()
    return local.state_dict()


def run_federation(tmp_path, learner_flags=None, **overrides):
    config = leader_config(tmp_path, seed=SEED, batch_size=SHARD, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **overrides)
    with running_leader(config) as running:
        initial = copy.deepcopy(running.leader.model.state_dict())
        learners = start_learners(running.address, 2, learner_flags)
        history = running.leader.run()
        final = {name: tensor.clone() for name, tensor in running.leader.model.state_dict().items()}
    assert join_all(learners) == [0, 0]
    return config, initial, final, history


@pytest.mark.parametrize("warmup_rounds, lr", [(0, LR), (2, LR / 2)])  # round 1 of a 2-round warm-up: half the lr
def test_fedsgd_round_equals_one_sgd_step_on_the_union_of_batches(tmp_path, warmup_rounds, lr):
    config, initial, final, history = run_federation(
        tmp_path, aggregation="fedsgd", rounds=1, warmup_rounds=warmup_rounds, lr_schedule="cosine"
    )

    central = build_model("tiny-cnn")
    central.load_state_dict(initial)
    optimizer = torch.optim.SGD(central.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    inputs = torch.cat([x for x, _ in shards(SEED)])
    labels = torch.cat([y for _, y in shards(SEED)])
    F.cross_entropy(central(inputs), labels).backward()
    optimizer.step()

    assert len(history) == 1 and history[0]["learners_reported"] == 2
    for name, tensor in central.state_dict().items():
        assert not torch.equal(tensor, initial[name]), f"{name} did not move"
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "learner_flags", [["--channels-last", "on"], ["--channels-last", "off"], ["--compile"]], ids=["channels-last", "contiguous", "compiled"]
)
def test_fedavg_round_equals_average_of_independently_trained_models(tmp_path, learner_flags):
    steps = 3  # the reference trains in the default memory format, uncompiled: neither may change the result
    config, initial, final, history = run_federation(tmp_path, learner_flags, aggregation="fedavg", local_steps=steps, rounds=1)

    trained = [train_locally(initial, inputs, labels, steps) for inputs, labels in shards(SEED)]

    for name in initial:
        expected = (trained[0][name] + trained[1][name]) / 2
        assert not torch.allclose(trained[0][name], trained[1][name]), f"{name}: learners should differ"
        torch.testing.assert_close(final[name], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("setting", "keep_momentum"), [(None, True), (False, False)], ids=["default", "no-keep-momentum"])
def test_fedavg_learners_keep_momentum_across_rounds_unless_told_not_to(tmp_path, setting, keep_momentum):
    rounds = 2  # one full-shard step a round: round 2's step starts from round 1's momentum, or from none
    config, initial, final, history = run_federation(tmp_path, aggregation="fedavg", local_steps=1, rounds=rounds, keep_momentum=setting)

    data = shards(SEED)

    def federate(keep: bool) -> dict[str, torch.Tensor]:
        models = [build_model("tiny-cnn") for _ in range(2)]
        optimizers = [torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) for model in models]
        global_state = initial
        for _ in range(rounds):
            for index, (local, (inputs, labels)) in enumerate(zip(models, data, strict=False)):
                local.load_state_dict(global_state)
                if not keep:
                    optimizers[index] = torch.optim.SGD(local.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
                optimizers[index].zero_grad()
                F.cross_entropy(local(inputs), labels).backward()
                optimizers[index].step()
            first, second = (model.state_dict() for model in models)
            global_state = {name: (first[name] + second[name]) / 2 for name in initial}
        return global_state

    expected, other = federate(keep_momentum), federate(not keep_momentum)
    assert [entry["learners_reported"] for entry in history] == [2, 2]
    for name in initial:
        assert not torch.allclose(expected[name], other[name], atol=1e-4), f"{name}: kept momentum should change round 2"
        torch.testing.assert_close(final[name], expected[name], atol=1e-5, rtol=0)


def test_rounds_write_loadable_checkpoints_with_metrics(tmp_path):
    config, _, final, history = run_federation(tmp_path, aggregation="fedavg", local_steps=2, rounds=3)

    assert [entry["round"] for entry in history] == [1, 2, 3]
    newest = checkpoint.latest(tmp_path / "checkpoints")
    assert newest is not None and newest.name == "round-00003.json"
    record, weights = checkpoint.load(newest)
    assert record["round"] == 3 and record["config"]["aggregation"] == "fedavg"
    assert record["metrics"]["test_accuracy"] == history[-1]["test_accuracy"]
    model = build_model(record["config"]["model"], record["num_classes"])
    model.load_state_dict(weights)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name])
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["round"] == 3
    # three rounds on learnable synthetic data: the loss falls
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_batchnorm_statistics_are_averaged(tmp_path):
    config = leader_config(tmp_path, model="resnet20", aggregation="fedavg", local_steps=1, batch_size=64, seed=SEED)
    with running_leader(config) as running:
        learners = start_learners(running.address, 2)
        running.leader.run()
        state = running.leader.model.state_dict()
    assert join_all(learners) == [0, 0]
    # one local step each from the initial statistics (mean 0, var 1) moves them; both learners' steps count once
    assert int(state["stem.1.num_batches_tracked"]) == 1
    assert not torch.allclose(state["stem.1.running_mean"], torch.zeros(16))


def make_image_folder(root, split: str, per_class: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for label, name in enumerate(("bright", "dark")):
        (root / split / name).mkdir(parents=True)
        for index in range(per_class):
            base = 200 if label == 0 else 50
            pixels = (base + torch.randint(-40, 40, (32, 32, 3), generator=generator)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / split / name / f"{index}.png")


def test_local_data_mode_trains_on_the_learners_files_and_never_sends_data(tmp_path, channel_to):
    make_image_folder(tmp_path / "leader", "test", per_class=10, seed=0)
    for index in range(2):
        make_image_folder(tmp_path / f"learner{index}", "train", per_class=12, seed=index + 1)
    config = leader_config(
        tmp_path,
        dataset="imagefolder",
        data_dir=str(tmp_path / "leader"),
        data_mode="local",
        aggregation="fedavg",
        local_epochs=2,
        batch_size=8,
        rounds=2,
        lr=0.05,
    )
    with running_leader(config) as running:
        assert running.leader.train_data is None
        threads = []
        for index in range(2):
            threads += start_learners(running.address, 1, ["--data-dir", str(tmp_path / f"learner{index}")])
        history = running.leader.run()
    assert join_all(threads) == [0, 0]
    assert [entry["learners_reported"] for entry in history] == [2, 2]
    assert history[-1]["test_accuracy"] > 0.9  # bright against dark is easy

    with running_leader(config) as running:
        stub = leader_pb2_grpc.LeaderServiceStub(channel_to(running.address))
        info = leader_pb2.LearnerInfo(
            network_addr=callback_address(), callback_token="c" * 32, num_examples=24, version=rpc.PROTOCOL_VERSION
        )
        reply = stub.RegisterLearner(info, timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            list(
                stub.GetData(
                    leader_pb2.LearnerDataRequest(learner_id=reply.learner_id), timeout=10, metadata=rpc.token_metadata(reply.session_token)
                )
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_recompute_bn_gives_the_global_model_the_statistics_of_its_own_weights(tmp_path):
    config = leader_config(
        tmp_path, model="resnet20", aggregation="fedavg", local_steps=1, batch_size=64, seed=SEED, recompute_bn=2000
    )  # the whole synthetic training set, in two batches of 1000
    with running_leader(config) as running:
        learners = start_learners(running.address, 2)
        running.leader.run()
        model = running.leader.model
    assert join_all(learners) == [0, 0]
    _, weights = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))
    stem = model.stem
    assert torch.equal(weights["stem.1.running_mean"], stem[1].running_mean)  # the checkpoint holds the recomputed ones
    images = normalize(load_dataset("synthetic", None, train=True, seed=SEED).images)
    with torch.no_grad():
        activations = stem[0](images)  # what the first BatchNorm sees: the stem convolution of every training image
    # two batches of equal size: the average of their means is the mean over all the images
    assert torch.allclose(stem[1].running_mean, activations.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.allclose(stem[1].running_var, activations.var(dim=(0, 2, 3)), rtol=0.05)
