"""The leader's algorithm choices wired end to end: partitions, sampling, robust rules, clipping, DP, FedProx, FedOpt."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from test_leader_rpc import send

from conftest import join_all, leader_config, refusal, register_client, running_leader, start_learners
from fedgrpc import data as utils
from fedgrpc.algorithms import privacy
from fedgrpc.config.options import parse_leader_config
from fedgrpc.leader import checkpoint
from fedgrpc.learner.training import add_proximal_gradient


def filled(leader, value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full_like(tensor, value) for name, tensor in leader.model.state_dict().items()}


def test_shards_give_each_learner_its_classes_and_the_split_is_logged(tmp_path, caplog):
    caplog.set_level("INFO", logger="fedgrpc.data")
    config = leader_config(tmp_path, learners=5, partition="shards", classes_per_learner=2, seed=4)
    with running_leader(config) as running:
        labels = running.leader.train_data.labels
        expected = utils.split_shards(labels, 5, 2, 4)
        assert all(torch.equal(got, want) for got, want in zip(running.leader.splits.parts, expected, strict=True))
        histograms = [utils.label_histogram(labels, shard, 10) for shard in expected]
    logged = [record.getMessage() for record in caplog.records if "(shards)" in record.getMessage()]
    assert logged == [f"split {index} (shards): {sum(counts)} examples, per class {counts}" for index, counts in enumerate(histograms)]


def test_a_fraction_of_learners_is_sampled_each_round_reproducibly(tmp_path):
    selections = []
    for attempt in range(2):
        config = leader_config(tmp_path / str(attempt), learners=4, fraction=0.5, rounds=4, seed=3)
        with running_leader(config) as running:
            learners = start_learners(running.address, 4)
            history = running.leader.run()
            assert join_all(learners) == [0, 0, 0, 0]
        assert [entry["learners_selected"] for entry in history] == [2, 2, 2, 2]
        assert [entry["learners_reported"] for entry in history] == [2, 2, 2, 2]
        selections.append([running.leader.open_round(number).members for number in range(1, 5)])
    assert selections[0] == selections[1]  # seeded by (seed, round)
    assert len(set(selections[0])) > 1  # and not the same pair every round


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "krum"])
def test_robust_aggregators_ignore_one_scaled_sign_flipped_update(tmp_path, channel_to, aggregator):
    config = leader_config(tmp_path, learners=5, rule=aggregator, trim=0.2, byzantine=1)
    with running_leader(config) as running:
        leader = running.leader
        clients = [register_client(channel_to(running.address)) for _ in range(5)]
        leader.started = True
        current = leader.open_round(1)
        for client, value in zip(clients, [0.01, 0.01, 0.01, 0.01, -0.1], strict=False):  # the last: sign flipped and 10x
            assert send(client, filled(leader, value)).success
        current.accepting = False
        result = leader.strategy.aggregate(current)
        for name, tensor in result.items():
            assert torch.allclose(tensor, torch.full_like(tensor, 0.01)), name  # the mean would be -0.012


def test_krum_refuses_a_round_below_its_bound(tmp_path, channel_to):
    config = leader_config(tmp_path, learners=5, rule="krum", byzantine=1, min_learners=4)
    with running_leader(config) as running:
        leader = running.leader
        clients = [register_client(channel_to(running.address)) for _ in range(5)]
        leader.started = True
        current = leader.open_round(1)
        for client in clients[:4]:  # one learner dropped out: 4 is not more than 2*1 + 2
            assert send(client, filled(leader, 0.01)).success
        before = {name: tensor.clone() for name, tensor in leader.model.state_dict().items()}
        with pytest.raises(ValueError, match="more than 2"):
            leader.strategy.aggregate(current)
        assert all(torch.equal(before[name], tensor) for name, tensor in leader.model.state_dict().items())


def test_clipping_bounds_each_update_before_the_mean(tmp_path, channel_to):
    config = leader_config(tmp_path, learners=2, clip_norm=1.0)
    with running_leader(config) as running:
        leader = running.leader
        clients = [register_client(channel_to(running.address)) for _ in range(2)]
        leader.started = True
        current = leader.open_round(1)
        assert send(clients[0], filled(leader, 10.0), num_examples=10).success
        assert send(clients[1], filled(leader, 0.0), num_examples=10).success
        result = leader.strategy.aggregate(current)
        norm = leader.strategy.parameter_norm(result)
        assert math.isclose(norm, 0.5, rel_tol=1e-5)  # the first clipped to norm 1, averaged with zero


def test_dp_noise_has_the_calibrated_spread_and_epsilon_is_reported(tmp_path, channel_to):
    config = leader_config(tmp_path, learners=2, clip_norm=2.0, dp_noise_multiplier=1.5, dp_delta=1e-5)
    with running_leader(config) as running:
        leader = running.leader
        clients = [register_client(channel_to(running.address)) for _ in range(2)]
        leader.started = True
        current = leader.open_round(1)
        for client in clients:
            assert send(client, filled(leader, 0.0)).success
        result = leader.strategy.aggregate(current)
        noise = torch.cat([result[name].flatten().double() for name in leader.strategy.parameter_names])
        expected = 1.5 * 2.0 / 2  # z * C / n on the mean of two clipped updates
        assert noise.numel() > 10_000 and abs(float(noise.std()) / expected - 1) < 0.05
        assert abs(float(noise.mean())) < 0.05 * expected
        accountant = privacy.PrivacyAccountant(1.5, 1.0, 1e-5)
        accountant.step()
        assert leader.strategy.accountant.epsilon() == accountant.epsilon() > 0


def test_a_resume_counts_the_noised_rounds_after_its_checkpoint(tmp_path, channel_to):
    # --checkpoint-every 3: rounds 1 and 2 release noised models but only round 1's checkpoint exists (written
    # here as the leader writes it); the leader stops after round 2 and resumes from round 1
    config = leader_config(tmp_path, learners=2, rounds=3, checkpoint_every=3, clip_norm=2.0, dp_noise_multiplier=1.5)
    ledger = Path(config.checkpoint_dir) / checkpoint.PRIVACY_RECORD
    with running_leader(config) as running:
        leader = running.leader
        clients = [register_client(channel_to(running.address)) for _ in range(2)]
        leader.started = True
        for number in (1, 2):
            current = leader.open_round(number)
            for client in clients:
                assert send(client, filled(leader, 0.0), round=number).success
            leader.strategy.aggregate(current)
            assert json.loads(ledger.read_text()) == {"noised_rounds": number}
            if number == 1:
                record = {"config": dataclasses.asdict(config), "metrics": {}, "num_classes": leader.num_classes}
                saved = checkpoint.save(
                    Path(config.checkpoint_dir),
                    1,
                    leader.model.state_dict(),
                    record,
                    keep=0,
                    optimizer_state=leader.strategy.optimizer_tensors(),
                )
    with running_leader(config) as running:
        running.leader.restore(saved)
        assert running.leader.start_round == 2  # the model goes on from round 1's checkpoint ...
        two = privacy.PrivacyAccountant(1.5, 1.0, config.dp_delta)
        two.step(2)
        assert running.leader.strategy.accountant.rounds == 2  # ... but round 2's release is counted as spent
        assert running.leader.strategy.accountant.epsilon() == two.epsilon()
    ledger.write_text('{"noised_rounds": "two"}')
    with running_leader(config) as running, pytest.raises(ValueError, match="privacy already spent is unknown|not a count"):
        running.leader.restore(saved)


def test_proximal_gradient_by_hand():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    model.weight.grad = torch.tensor([[0.5, 0.5]])
    add_proximal_gradient(model, {"weight": torch.tensor([[0.0, 0.0]])}, mu=0.1)
    assert torch.allclose(model.weight.grad, torch.tensor([[0.6, 0.3]]))  # 0.5 + 0.1*1, 0.5 + 0.1*(-2)


def test_fedprox_and_fedopt_rounds_run_and_adam_state_is_checkpointed(tmp_path):
    config = leader_config(
        tmp_path, learners=2, rounds=2, aggregation="fedavg", local_steps=3, prox_mu=0.01, server_opt="adam", server_lr=0.01
    )
    with running_leader(config) as running:
        assert running.leader.plan.prox_mu == pytest.approx(0.01)
        learners = start_learners(running.address, 2)
        history = running.leader.run()
        assert join_all(learners) == [0, 0]
        tensors = running.leader.strategy.optimizer_tensors()
    assert len(history) == 2
    assert any(name.endswith(".v") for name in tensors) and any(name.endswith(".m") for name in tensors)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rule", "krum", "--learners", "4", "--byzantine", "1"], "needs more than 2*f + 2 learners per round"),
        (["--dp-noise-multiplier", "1.0"], "--dp-noise-multiplier needs --clip-norm"),
        (["--rule", "trimmed-mean", "--trim", "0.5"], "--trim must be in [0, 0.5)"),
        (["--rule", "trimmed-mean", "--trim", "0.1", "--learners", "5"], "trims nothing from 5 learners per round (floor(0.1 x 5) = 0"),
        (["--rule", "trimmed-mean", "--trim", "0.2", "--learners", "2"], "it needs 3 or more, or add learners"),
        (["--fraction", "0"], "--fraction: must be in (0, 1]"),
        (["--recompute-bn", "1000", "--data-mode", "local"], "--recompute-bn needs training images on the leader"),
        (["--keep-momentum", "--aggregation", "fedsgd"], "--keep-momentum applies to local SGD (fedavg, fedbuff)"),
    ],
)
def test_impossible_algorithm_settings_get_one_line_errors(capsys, flags, message):
    # parsed here: the doors' own one-line errors (no traceback) are tests/test_cli.py's
    assert message in refusal(parse_leader_config, [*flags, "--run-dir", "unused"], capsys)


@pytest.mark.parametrize("mode, ratio", [("fp16", 1.95), ("int8", 3.8), ("topk", 10.0)])  # BatchNorm buffers stay as they are
def test_compressed_rounds_run_and_move_fewer_bytes(tmp_path, mode, ratio):
    plain = leader_config(tmp_path / "plain", model="resnet20", learners=2, rounds=2, aggregation="fedavg", local_steps=1)
    squeezed = leader_config(
        tmp_path / mode, model="resnet20", learners=2, rounds=2, aggregation="fedavg", local_steps=1, compression=mode, topk_ratio=0.01
    )
    bytes_in = {}
    for config in (plain, squeezed):
        with running_leader(config) as running:
            learners = start_learners(running.address, 2)
            history = running.leader.run()
            assert join_all(learners) == [0, 0]
        assert [entry["learners_reported"] for entry in history] == [2, 2]
        bytes_in[config.compression] = history[-1]["bytes_in"]
    assert bytes_in["none"] / bytes_in[mode] > ratio


def test_learning_rate_schedule_by_hand():
    from fedgrpc.algorithms.schedule import round_lr

    # warm-up over 2 rounds: 1/2 then 2/2 of the base; cosine over the remaining 4: t = 0, 1, 2, 3 of 4
    lrs = [round_lr(0.1, "cosine", 2, 6, number) for number in range(1, 7)]
    expected = [0.05, 0.1, 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 4)), 0.05, 0.1 * 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert lrs == pytest.approx(expected)
    assert [round_lr(0.1, "constant", 0, 3, number) for number in (1, 2, 3)] == [0.1, 0.1, 0.1]
    with pytest.raises(ValueError, match="unknown schedule"):
        round_lr(0.1, "linear", 0, 3, 1)


def test_the_learners_sgd_steps_exactly_as_torch_optim_sgd():
    from fedgrpc.learner.training import LocalSGD

    torch.manual_seed(0)
    reference = torch.nn.Linear(5, 3)
    ours = torch.nn.Linear(5, 3)
    ours.load_state_dict(reference.state_dict())
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    local_sgd = LocalSGD(list(ours.parameters()), lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(4):
        inputs = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((reference, torch_sgd), (ours, local_sgd)):
            optimizer.zero_grad(set_to_none=True)
            model(inputs).square().sum().backward()
            optimizer.step()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name  # bit for bit, momentum and weight decay included


def test_a_slowed_learner_pauses_after_each_step_for_its_factor_less_one_times_the_step():
    from fedgrpc.leader.main import training_plan
    from fedgrpc.learner.training import LocalTrainer
    from fedgrpc.task import builtin_task

    config = leader_config(Path("unused"), aggregation="fedavg", local_steps=3, batch_size=4)
    task = builtin_task("tiny-cnn", "synthetic", 10)
    model = task.model()
    plan = training_plan(config, task, 10, [])
    data = utils.load_dataset("synthetic", None, train=True, seed=0)
    ticks = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0])  # each step's start and end: 0.5 s, 0.25 s, 1 s
    pauses: list[float] = []
    trainer = LocalTrainer(
        plan,
        0,
        model,
        model,
        task,
        (data.images[:40], data.labels[:40]),
        torch.contiguous_format,
        False,
        slowdown=4.0,
        clock=lambda: next(ticks),
        sleep=pauses.append,
    )
    trainer.train(1)
    assert pauses == [1.5, 0.75, 3.0]  # 3 times each step: every step takes 4 times as long

    unslowed: list[float] = []
    LocalTrainer(
        plan, 0, model, model, task, (data.images[:40], data.labels[:40]), torch.contiguous_format, False, sleep=unslowed.append
    ).train(2)
    assert unslowed == []
