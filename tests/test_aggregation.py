"""Aggregation rules against numbers computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedgrpc.algorithms import aggregation


def test_weighted_mean_by_hand():
    updates = [
        {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)},
        {"w": torch.tensor([4.0, -1.0]), "n": torch.tensor(13)},
    ]
    mean = aggregation.weighted_mean(updates, [1, 3])
    # (1*1 + 3*4)/4 = 3.25, (1*2 + 3*-1)/4 = -0.25; integers: (10 + 39)/4 = 12.25 -> 12
    assert torch.equal(mean["w"], torch.tensor([3.25, -0.25]))
    assert mean["n"].dtype == torch.int64 and int(mean["n"]) == 12


def test_one_update_and_identical_updates_average_to_themselves():
    update = {"w": torch.tensor([0.5, -7.0])}
    assert torch.equal(aggregation.weighted_mean([update], [5])["w"], update["w"])
    assert torch.equal(aggregation.weighted_mean([update] * 3, [1, 2, 3])["w"], update["w"])


def test_running_mean_refuses_bad_input():
    running = aggregation.RunningMean()
    with pytest.raises(ValueError, match="zero updates"):
        running.mean()
    with pytest.raises(ValueError, match="positive"):
        running.add({"w": torch.zeros(1)}, 0)
    running.add({"w": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="names differ"):
        running.add({"v": torch.zeros(1)}, 1)


def test_apply_update_steps_parameters_and_copies_buffers():
    model = nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0]))
        model.bias.copy_(torch.tensor([0.0, 0.0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    update = {
        "weight": torch.tensor([2.0, -2.0]),
        "bias": torch.tensor([1.0, 0.0]),
        "running_mean": torch.tensor([0.3, 0.4]),
        "running_var": torch.tensor([2.0, 3.0]),
        "num_batches_tracked": torch.tensor(4),
    }
    aggregation.apply_update(model, optimizer, update)
    assert torch.equal(model.weight.data, torch.tensor([0.0, 3.0]))  # 1 - 0.5*2, 2 + 0.5*2
    assert torch.equal(model.bias.data, torch.tensor([-0.5, 0.0]))
    assert torch.equal(model.running_mean, torch.tensor([0.3, 0.4]))
    assert int(model.num_batches_tracked) == 4


def test_fedavg_delta_with_server_lr_one_gives_the_average_model():
    global_model = nn.Linear(1, 1)
    with torch.no_grad():
        global_model.weight.fill_(1.0)
        global_model.bias.fill_(0.0)
    start = {k: v.clone() for k, v in global_model.state_dict().items()}
    deltas = []
    for weight in (3.0, 5.0):
        local = nn.Linear(1, 1)
        with torch.no_grad():
            local.weight.fill_(weight)
            local.bias.fill_(weight / 2)
        deltas.append(aggregation.model_delta(start, local))
    assert torch.equal(deltas[0]["weight"], torch.tensor([[-2.0]]))
    aggregation.apply_update(global_model, torch.optim.SGD(global_model.parameters(), lr=1.0), aggregation.weighted_mean(deltas, [1, 1]))
    assert global_model.weight.item() == 4.0 and global_model.bias.item() == 2.0


def test_gradient_update_holds_gradients_and_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model(torch.tensor([[1.0, 2.0], [3.0, 5.0]])).sum().backward()
    update = aggregation.gradient_update(model)
    assert list(update) == list(model.state_dict())
    assert torch.equal(update["0.weight"], model[0].weight.grad)
    assert torch.equal(update["1.running_mean"], model[1].running_mean)


def test_large_finite_updates_cannot_overflow_the_sum():
    huge = {"w": torch.tensor([3e38], dtype=torch.float32)}
    mean = aggregation.weighted_mean([huge, huge], [32, 32])
    assert torch.isfinite(mean["w"]).all() and mean["w"].item() == pytest.approx(3e38, rel=1e-6)


def test_update_list_mean_is_the_same_whatever_the_arrival_order():
    # float64 addition is not associative: 1e16 + 1 rounds back to 1e16, so the running sum depends on the order
    big, one, minus_big = ({"w": torch.tensor([value], dtype=torch.float64)} for value in (1e16, 1.0, -1e16))
    arrivals = [[(0, big), (1, one), (2, minus_big)], [(0, big), (2, minus_big), (1, one)]]
    running_means = []
    for arrival in arrivals:
        running = aggregation.RunningMean()
        for key, update in arrival:
            running.add(update, 1.0, key=key)
        running_means.append(float(running.mean()["w"]))
    assert running_means == [0.0, 1 / 3]  # (1e16 + 1 - 1e16) / 3 in two orders
    ordered_means = []
    for arrival in arrivals:
        ordered = aggregation.UpdateList()
        for key, update in arrival:
            ordered.add(update, 1.0, key=key)
        assert ordered.count == 3
        ordered_means.append(float(ordered.mean()["w"]))
    assert ordered_means == [0.0, 0.0]  # always summed as keys 0, 1, 2
    with pytest.raises(ValueError, match="already added"):
        ordered.add(one, 1.0, key=1)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((3_000_001,), torch.float32),
        ((7, 3, 3, 3), torch.float32),
        ((), torch.int64),
        ((5,), torch.float16),
        ((2_097_155,), torch.bfloat16),
    ],
)
def test_the_blockwise_promoted_sum_is_the_direct_float64_sum_bit_for_bit(shape, dtype):
    from fedgrpc.algorithms.aggregation import PROMOTION_BLOCK, add_promoted

    generator = torch.Generator().manual_seed(len(shape))
    update = (torch.randn(shape, generator=generator) * 100).to(dtype)
    direct = torch.randn(shape, generator=generator, dtype=torch.float64)
    blockwise = direct.clone()
    direct.add_(update, alpha=0.37)  # element by element, promoted as it goes
    add_promoted(blockwise, update, 0.37, torch.empty(PROMOTION_BLOCK, dtype=torch.float64))
    assert torch.equal(blockwise, direct)


def test_the_blockwise_promoted_sum_takes_a_transposed_tensor():
    from fedgrpc.algorithms.aggregation import add_promoted

    update = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # not contiguous
    total = torch.zeros(4, 3, dtype=torch.float64)
    add_promoted(total, update, 2.0, torch.empty(5, dtype=torch.float64))  # a staging block smaller than the tensor
    assert torch.equal(total, 2.0 * update.double())


def test_a_reset_sum_takes_nothing_from_the_round_before_and_matches_a_fresh_sum_bit_for_bit():
    generator = torch.Generator().manual_seed(3)
    rounds = [[{"w": torch.randn(3_000_001, generator=generator), "n": torch.tensor(7 + index)} for index in range(3)] for _ in range(2)]
    reused = aggregation.RunningMean()
    for updates in rounds:
        reused.reset()  # the round before's sums are still in its buffers: the first add must overwrite them
        fresh = aggregation.RunningMean()
        for weight, update in zip((3.0, 0.5, 11.0), updates, strict=True):
            reused.add(update, weight)
            fresh.add(update, weight)
        mean = reused.mean()
        assert reused.count == 3 and reused.total_weight == 14.5
        assert torch.equal(mean["w"], fresh.mean()["w"]) and int(mean["n"]) == 9  # (3*7 + 0.5*8 + 11*9) / 14.5 = 8.55, rounded
        expected = (3.0 * updates[0]["w"].double() + 0.5 * updates[1]["w"].double() + 11.0 * updates[2]["w"].double()) / 14.5
        assert torch.equal(mean["w"], expected.float())
