"""Non-IID splits of a data set among learners (Dirichlet label skew, McMahan shards) and per-part label histograms."""

from __future__ import annotations

import pytest
import torch

from fedgrpc.data import label_histogram, split_dirichlet, split_shards

NUM_CLASSES = 10


def balanced_labels(per_class: int) -> torch.Tensor:
    """NUM_CLASSES classes of per_class examples each, interleaved (0, 1, ..., 9, 0, ...) like a shuffled data set."""
    return torch.arange(NUM_CLASSES * per_class) % NUM_CLASSES


def assert_partition(parts: list[torch.Tensor], num_examples: int, num_parts: int) -> None:
    """Disjoint, complete over 0..num_examples-1, every part non-empty, int64 and sorted."""
    assert len(parts) == num_parts
    assert all(part.dtype == torch.int64 and len(part) > 0 for part in parts)
    assert all(torch.equal(part, torch.sort(part).values) for part in parts)
    assert sorted(torch.cat(parts).tolist()) == list(range(num_examples))


def max_class_share(labels: torch.Tensor, part: torch.Tensor) -> float:
    """Fraction of a part taken by its most common class: 1/NUM_CLASSES when balanced, 1.0 when a single class."""
    return max(label_histogram(labels, part, NUM_CLASSES)) / len(part)


@pytest.mark.parametrize("alpha", [0.1, 1.0, 1000.0])
def test_dirichlet_is_seeded_disjoint_complete_and_non_empty(alpha):
    labels = balanced_labels(100)
    parts = split_dirichlet(labels, 5, alpha, seed=3)
    assert_partition(parts, 1000, 5)
    assert all(torch.equal(a, b) for a, b in zip(parts, split_dirichlet(labels, 5, alpha, seed=3), strict=False))
    assert not all(torch.equal(a, b) for a, b in zip(parts, split_dirichlet(labels, 5, alpha, seed=4), strict=False))


def test_dirichlet_with_one_part_is_everything():
    labels = torch.tensor([2, 0, 1, 0, 2])
    (part,) = split_dirichlet(labels, 1, 0.5, seed=0)
    assert part.tolist() == [0, 1, 2, 3, 4]


def test_small_alpha_skews_labels_and_large_alpha_does_not():
    labels = balanced_labels(1000)
    skewed = [max_class_share(labels, part) for part in split_dirichlet(labels, 10, 0.1, seed=0)]
    even = [max_class_share(labels, part) for part in split_dirichlet(labels, 10, 1000.0, seed=0)]
    # alpha = 0.1: each class lands almost whole on one or two parts, so most parts are dominated by one class.
    assert sum(skewed) / len(skewed) > 0.5
    # alpha = 1000: each class's proportions are 0.1 +- 0.003 (Dirichlet std sqrt(0.1 * 0.9 / 10001)), so about
    # 100 +- 3 of each class in each part of about 1000: the top class is near 1/10 everywhere.
    assert max(even) < 0.12
    # The part sizes follow: about 1000 each for alpha = 1000.
    assert all(900 < len(part) < 1100 for part in split_dirichlet(labels, 10, 1000.0, seed=0))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_refuses_non_positive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be positive"):
        split_dirichlet(balanced_labels(10), 2, alpha, seed=0)


def test_dirichlet_refuses_more_parts_than_examples_and_no_parts():
    with pytest.raises(ValueError, match="only 5 examples"):
        split_dirichlet(torch.tensor([0, 1, 0, 1, 0]), 6, 1.0, seed=0)
    with pytest.raises(ValueError, match="num_parts must be positive"):
        split_dirichlet(balanced_labels(10), 0, 1.0, seed=0)


def test_dirichlet_gives_up_when_no_draw_fills_every_part():
    # Two examples of one class for two parts: only proportions in [0.5, 1) cut them 1 + 1, and Dirichlet(1e-6)
    # puts almost all its mass at exactly 0 or 1, so the bounded redraws run out.
    with pytest.raises(ValueError, match="larger alpha or fewer parts"):
        split_dirichlet(torch.tensor([0, 0]), 2, 1e-6, seed=0)


def test_shards_by_hand():
    # Stable sort by label: label 0 at indices 1, 3; label 1 at 2, 5; label 2 at 0, 4. Three shards, one per part.
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    parts = split_shards(labels, 3, 1, seed=7)
    assert sorted(part.tolist() for part in parts) == [[0, 4], [1, 3], [2, 5]]


def test_shards_give_each_part_exactly_its_classes():
    # 10 classes x 100 examples, 5 parts x 2 shards: 10 shards of 100, each shard one whole class.
    labels = balanced_labels(100)
    parts = split_shards(labels, 5, 2, seed=0)
    assert_partition(parts, 1000, 5)
    for part in parts:
        assert sorted(label_histogram(labels, part, NUM_CLASSES)) == [0] * 8 + [100, 100]
    assert all(torch.equal(a, b) for a, b in zip(parts, split_shards(labels, 5, 2, seed=0), strict=False))
    assert not all(torch.equal(a, b) for a, b in zip(parts, split_shards(labels, 5, 2, seed=1), strict=False))


def test_shards_of_uneven_size_still_cover_everything():
    # 7 examples into 2 x 2 = 4 shards of sizes 2, 2, 2, 1: parts of 4 + 3 or 3 + 4 examples.
    labels = torch.tensor([3, 1, 2, 0, 1, 3, 0])
    parts = split_shards(labels, 2, 2, seed=0)
    assert_partition(parts, 7, 2)
    assert sorted(len(part) for part in parts) == [3, 4]


def test_shards_refuse_bad_arguments():
    with pytest.raises(ValueError, match="need 6 examples"):
        split_shards(torch.tensor([0, 1, 2, 3, 4]), 3, 2, seed=0)
    with pytest.raises(ValueError, match="num_parts must be positive"):
        split_shards(balanced_labels(10), 0, 2, seed=0)
    with pytest.raises(ValueError, match="classes_per_part must be positive"):
        split_shards(balanced_labels(10), 2, 0, seed=0)


def test_label_histogram_by_hand():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 2])
    # indices 0, 1, 4, 6 hold labels 2, 0, 2, 2: one 0, no 1, three 2s.
    assert label_histogram(labels, torch.tensor([0, 1, 4, 6]), 3) == [1, 0, 3]
    assert label_histogram(labels, torch.tensor([0, 1, 4, 6]), 5) == [1, 0, 3, 0, 0]
    assert label_histogram(labels, torch.tensor([], dtype=torch.int64), 3) == [0, 0, 0]
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        label_histogram(labels, torch.tensor([0]), 2)
