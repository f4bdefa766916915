"""Robust aggregation rules (median, trimmed mean, Krum), norm clipping and UpdateList against numbers computed by hand."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fedgrpc.algorithms import aggregation


def _updates(rows: list[list[float]], counts: list[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """One update per row: the row as float tensor "w", and an integer counter "n" when counts are given."""
    updates = []
    for i, row in enumerate(rows):
        update = {"w": torch.tensor(row)}
        if counts is not None:
            update["n"] = torch.tensor(counts[i])
        updates.append(update)
    return updates


def test_median_odd_count_by_hand():
    updates = _updates([[1.0, 5.0], [3.0, -2.0], [10.0, 0.0]], counts=[10, 13, 20])
    result = aggregation.coordinate_median(updates, [1, 1, 2])
    # sorted columns: 1, 3, 10 -> 3 and -2, 0, 5 -> 0; weights do not matter for floats
    assert torch.equal(result["w"], torch.tensor([3.0, 0.0]))
    # integers take the weighted mean: (10 + 13 + 2*20) / 4 = 15.75 -> 16
    assert result["n"].dtype == torch.int64 and int(result["n"]) == 16


def test_median_even_count_and_ties_by_hand():
    updates = _updates([[1.0, 2.0, 2.0], [4.0, 5.0, 2.0], [2.0, 2.0, 3.0], [7.0, 5.0, 2.0]])
    result = aggregation.coordinate_median(updates, [1, 1, 1, 1])
    # sorted columns: 1 2 4 7 -> (2+4)/2 = 3; 2 2 5 5 -> (2+5)/2 = 3.5; 2 2 2 3 -> (2+2)/2 = 2
    assert torch.equal(result["w"], torch.tensor([3.0, 3.5, 2.0]))


def test_trimmed_mean_by_hand():
    updates = _updates([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    weights = [1, 2, 3, 4, 5]
    # trim 0.2 of 5: k = 1, drop one value at each end: (2+3+4)/3 = 3 and (0+1+2)/3 = 1
    assert torch.equal(aggregation.trimmed_mean(updates, weights, 0.2)["w"], torch.tensor([3.0, 1.0]))
    # trim 0.3 of 5: k = floor(1.5) = 1, the same
    assert torch.equal(aggregation.trimmed_mean(updates, weights, 0.3)["w"], torch.tensor([3.0, 1.0]))
    # trim 0.4 of 5: k = 2, only the middle value: 3 and 1
    assert torch.equal(aggregation.trimmed_mean(updates, weights, 0.4)["w"], torch.tensor([3.0, 1.0]))
    # trim 0.19 of 5: k = floor(0.95) = 0, the unweighted mean: 110/5 = 22 and -44/5 = -8.8
    assert torch.allclose(aggregation.trimmed_mean(updates, weights, 0.19)["w"], torch.tensor([22.0, -8.8]))


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7, math.nan])
def test_trimmed_mean_refuses_bad_trim(trim):
    with pytest.raises(ValueError, match=r"0 <= trim < 0.5"):
        aggregation.trimmed_mean(_updates([[1.0]]), [1], trim)


def test_krum_scores_and_selection_by_hand():
    # Five points in the plane, x in tensor "w" and y in tensor "b", so that distances span both tensors:
    # a=(0,0) b=(1,0) c=(1,2) d=(4,4) e=(100,0)
    points = [(0.0, 0.0), (1.0, 0.0), (1.0, 2.0), (4.0, 4.0), (100.0, 0.0)]
    updates = [{"w": torch.tensor([x]), "b": torch.tensor([y]), "n": torch.tensor(i + 1)} for i, (x, y) in enumerate(points)]
    weights = [1, 2, 3, 4, 5]
    # squared distances: ab 1, ac 5, ad 32, ae 10000, bc 4, bd 25, be 9801, cd 13, ce 9805, de 9232
    # f = 1: each score sums the n - f - 2 = 2 nearest others
    # a: 1+5 = 6, b: 1+4 = 5, c: 4+5 = 9, d: 13+25 = 38, e: 9232+9801 = 19033
    assert aggregation.krum_scores(updates, 1) == [6.0, 5.0, 9.0, 38.0, 19033.0]
    chosen = aggregation.krum(updates, weights, 1)
    assert torch.equal(chosen["w"], torch.tensor([1.0])) and torch.equal(chosen["b"], torch.tensor([0.0]))  # b
    # integers take the weighted mean of all five, not the chosen one's: (1+4+9+16+25)/15 = 3.67 -> 4
    assert int(chosen["n"]) == 4
    # multi-Krum, 3: b (weight 2), a (1), c (3): x = (2*1 + 1*0 + 3*1)/6 = 5/6, y = (0 + 0 + 3*2)/6 = 1
    multi = aggregation.krum(updates, weights, 1, select=3)
    assert torch.allclose(multi["w"], torch.tensor([5 / 6])) and torch.equal(multi["b"], torch.tensor([1.0]))


def test_krum_breaks_ties_by_lower_index():
    updates = _updates([[0.0], [1.0], [2.0]])
    # f = 0: one nearest other each: 0 -> 1, 1 -> 1, 2 -> 1, all tied
    assert aggregation.krum_scores(updates, 0) == [1.0, 1.0, 1.0]
    assert torch.equal(aggregation.krum(updates, [1, 1, 1], 0)["w"], torch.tensor([0.0]))
    # select 2: updates 0 and 1, equal weights: 0.5
    assert torch.equal(aggregation.krum(updates, [1, 1, 1], 0, select=2)["w"], torch.tensor([0.5]))


@pytest.mark.parametrize("byzantine", [0, 1, 2])
def test_krum_refuses_at_its_bound_and_accepts_one_above(byzantine):
    bound = 2 * byzantine + 2
    with pytest.raises(ValueError, match=rf"krum needs more than 2\*f \+ 2 updates: got {bound} with --byzantine {byzantine}"):
        aggregation.krum(_updates([[float(i)] for i in range(bound)]), [1] * bound, byzantine)
    with pytest.raises(ValueError, match="krum needs more than"):
        aggregation.krum_scores(_updates([[float(i)] for i in range(bound)]), byzantine)
    accepted = _updates([[float(i)] for i in range(bound + 1)])
    assert len(aggregation.krum_scores(accepted, byzantine)) == bound + 1
    aggregation.krum(accepted, [1] * (bound + 1), byzantine)


def test_krum_refuses_bad_select_and_negative_byzantine():
    updates = _updates([[float(i)] for i in range(5)])
    for select in (0, 5):  # n - f = 4 at most with f = 1
        with pytest.raises(ValueError, match="select"):
            aggregation.krum(updates, [1] * 5, 1, select=select)
    aggregation.krum(updates, [1] * 5, 1, select=4)
    with pytest.raises(ValueError, match="byzantine"):
        aggregation.krum_scores(updates, -1)


def test_one_update_is_returned_by_median_and_trimmed_mean():
    update = {"w": torch.tensor([0.1, -7.0]), "n": torch.tensor(5, dtype=torch.int32)}
    for result in (aggregation.coordinate_median([update], [3]), aggregation.trimmed_mean([update], [3], 0.4)):
        assert torch.equal(result["w"], update["w"]) and result["n"].dtype == torch.int32 and int(result["n"]) == 5
    # Krum cannot run on one update: it needs more than 2f + 2 = 2 even with f = 0.
    with pytest.raises(ValueError, match="got 1 with --byzantine 0"):
        aggregation.krum([update], [3], 0)


def test_equal_updates_are_returned_unchanged_in_their_dtype():
    update = {"w": torch.tensor([0.1, -7.3], dtype=torch.float16), "v": torch.tensor([1 / 3]), "n": torch.tensor(9)}
    updates, weights = [update] * 5, [1, 2, 3, 4, 5]
    rules = [
        aggregation.coordinate_median,
        functools.partial(aggregation.trimmed_mean, trim=0.2),
        functools.partial(aggregation.krum, byzantine=0),
        functools.partial(aggregation.krum, byzantine=1, select=3),
    ]
    for rule in rules:
        result = rule(updates, weights)
        assert list(result) == ["w", "v", "n"]
        for name, tensor in update.items():
            assert result[name].dtype == tensor.dtype and torch.equal(result[name], tensor), (rule, name)


def test_outlier_moves_the_mean_but_not_the_robust_rules():
    honest = [[1.0, 2.0], [1.25, 2.25], [0.75, 1.75], [1.0, 2.0]]
    updates = _updates(honest + [[1000.0, 2000.0]])  # a 1000x larger update
    weights = [1] * 5
    # mean: (4 + 1000)/5 = 200.8 and (8 + 2000)/5 = 401.6
    assert torch.allclose(aggregation.weighted_mean(updates, weights)["w"], torch.tensor([200.8, 401.6]))
    # median: sorted 0.75 1 1 1.25 1000 -> 1 and 1.75 2 2 2.25 2000 -> 2
    assert torch.equal(aggregation.coordinate_median(updates, weights)["w"], torch.tensor([1.0, 2.0]))
    # trim 0.2: drop 0.75 and 1000: (1 + 1 + 1.25)/3 = 13/12, and (2 + 2 + 2.25)/3 = 25/12
    assert torch.allclose(aggregation.trimmed_mean(updates, weights, 0.2)["w"], torch.tensor([13 / 12, 25 / 12]))
    # Krum, f = 1: the two [1, 2] updates are 0 apart, so one of them scores lowest (0 + 0.125) and the first wins
    assert torch.equal(aggregation.krum(updates, weights, 1)["w"], torch.tensor([1.0, 2.0]))
    multi = aggregation.krum(updates, weights, 1, select=4)["w"]
    assert torch.equal(multi, torch.tensor([1.0, 2.0]))  # the four honest ones: (1 + 1.25 + 0.75 + 1)/4 = 1


def test_krum_never_picks_an_update_holding_nan():
    updates = _updates([[math.nan, 0.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0], [1.0, 1.0]])
    scores = aggregation.krum_scores(updates, 1)
    assert scores[0] == math.inf and scores[1] == 0.0
    assert torch.equal(aggregation.krum(updates, [1] * 5, 1, select=4)["w"], torch.tensor([2.0, 2.0]))  # (1+1+5+1)/4


def test_rules_refuse_mismatched_rounds():
    with pytest.raises(ValueError, match="zero updates"):
        aggregation.coordinate_median([], [])
    with pytest.raises(ValueError, match="weights"):
        aggregation.coordinate_median(_updates([[1.0], [2.0]]), [1])
    with pytest.raises(ValueError, match="positive"):
        aggregation.trimmed_mean(_updates([[1.0], [2.0]]), [1, 0], 0.1)
    with pytest.raises(ValueError, match="names differ"):
        aggregation.coordinate_median([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        aggregation.krum_scores([{"w": torch.zeros(1)}, {"w": torch.zeros(2)}, {"w": torch.zeros(1)}], 0)


def test_clip_to_norm_scales_parameters_down_only():
    update = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "running_mean": torch.tensor([100.0]), "n": torch.tensor(7)}
    clipped, norm = aggregation.clip_to_norm(update, 1.0, ["w", "b"])
    # joint norm sqrt(9 + 16) = 5; scaled by 1/5
    assert norm == 5.0
    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.0])) and torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert clipped["w"].dtype == torch.float32
    assert torch.equal(clipped["running_mean"], torch.tensor([100.0])) and int(clipped["n"]) == 7  # buffers untouched
    assert torch.equal(update["w"], torch.tensor([3.0, 0.0]))  # the input is not modified
    # max_norm above the norm (and exactly at it): unchanged, never scaled up
    for max_norm in (10.0, 5.0):
        same, norm = aggregation.clip_to_norm(update, max_norm, ["w", "b"])
        assert norm == 5.0 and all(torch.equal(same[name], update[name]) for name in update)


def test_clip_to_norm_refuses_bad_input():
    update = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(1)}
    for max_norm in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="max_norm"):
            aggregation.clip_to_norm(update, max_norm, ["w"])
    with pytest.raises(ValueError, match="no tensor"):
        aggregation.clip_to_norm(update, 1.0, ["v"])
    with pytest.raises(ValueError, match="not a float"):
        aggregation.clip_to_norm(update, 1.0, ["n"])
    with pytest.raises(ValueError, match="norm is inf"):
        aggregation.clip_to_norm({"w": torch.tensor([math.inf])}, 1.0, ["w"])


def test_update_list_calls_the_rule_in_key_order():
    updates = aggregation.UpdateList()
    by_key = {key: {"w": torch.tensor(float(key))} for key in (3, 1, 2)}  # added out of key order
    for key, update in by_key.items():
        updates.add(update, 10.0 * key, key=key)
    seen = []

    def rule(got, weights):
        seen.append(([float(update["w"]) for update in got], weights))
        return got[0]

    assert updates.aggregate(rule) is by_key[1]
    assert seen == [([1.0, 2.0, 3.0], [10.0, 20.0, 30.0])]
    assert updates.count == 3 and updates.total_weight == 60.0
    # median of 1, 2, 3 = 2; mean weighted by 10, 20, 30: (10 + 40 + 90)/60 = 7/3
    assert torch.equal(updates.aggregate(aggregation.coordinate_median)["w"], torch.tensor(2.0))
    assert torch.allclose(updates.mean()["w"], torch.tensor(7 / 3))


def test_update_list_refuses_bad_input():
    updates = aggregation.UpdateList()
    assert updates.count == 0 and updates.total_weight == 0
    with pytest.raises(ValueError, match="zero updates"):
        updates.aggregate(aggregation.coordinate_median)
    with pytest.raises(ValueError, match="positive"):
        updates.add({"w": torch.zeros(1)}, 0, key=1)
    updates.add({"w": torch.zeros(1)}, 1, key=1)
    with pytest.raises(ValueError, match="already added"):
        updates.add({"w": torch.zeros(1)}, 1, key=1)
