"""Aggregation rules, free of gRPC: weighted and robust averaging of learner updates, clipping, the server step."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Average updates tensor by tensor, weighting each by its example count."""
    if not updates:
        raise ValueError("cannot average zero updates")
    running = RunningMean()
    for update, weight in zip(updates, weights, strict=True):
        running.add(update, weight)
    return running.mean()


# float64 elements promoted at a time (8 MB, within a cache): adding a float32 tensor to a float64 one element by element
# is several times slower than copying a block of it to float64 and adding like to like (bench/sum_kernels.py)
PROMOTION_BLOCK = 1 << 20


def add_promoted(total: torch.Tensor, tensor: torch.Tensor, weight: float, staging: torch.Tensor, accumulate: bool = True) -> None:
    """total += weight * tensor, in float64 (`total`'s dtype), promoting `tensor` block by block through `staging`;
    with `accumulate` False, total = weight * tensor (what it adds to a zero sum, without reading the sum).

    The same arithmetic as adding the tensors directly: each element is promoted exactly, then multiplied and
    added in float64.
    """
    flat_total, flat = total.view(-1), tensor.reshape(-1)
    for start in range(0, flat.numel(), staging.numel()):
        piece = flat[start : start + staging.numel()]
        block = staging[: piece.numel()]
        block.copy_(piece)
        if accumulate:
            flat_total[start : start + piece.numel()].add_(block, alpha=weight)
        else:
            torch.mul(block, weight, out=flat_total[start : start + piece.numel()])


class RunningMean:
    """A weighted running sum of updates, so memory stays one model's worth (in float64) however many learners report."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._staging = torch.empty(0, dtype=torch.float64)  # made at the first add: the promotion block (add_promoted)
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, torch.Tensor], weight: float, key: int = 0) -> None:
        """Add `weight * update` to the sum, in float64 so that no finite float32 input can overflow it (`key` is unused)."""
        if not weight > 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        if self._sums and update.keys() != self._sums.keys():
            raise ValueError("update names differ from the earlier updates'")
        if not self._staging.numel():
            self._staging = torch.empty(PROMOTION_BLOCK, dtype=torch.float64)
        for name, tensor in update.items():
            if name not in self._sums:
                self._dtypes[name] = tensor.dtype
                self._sums[name] = torch.empty(tensor.shape, dtype=torch.float64)
            # the first update is written rather than added: an empty sum's buffers are never zeroed nor read
            add_promoted(self._sums[name], tensor, weight, self._staging, accumulate=self.count > 0)
        self.total_weight += weight
        self.count += 1

    def reset(self) -> RunningMean:
        """Empty the sum, keeping its buffers (memory already mapped): the next add writes them instead of adding to them."""
        self.total_weight = 0.0
        self.count = 0
        return self

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean of everything added, in each tensor's original dtype."""
        if not self.count:
            raise ValueError("cannot average zero updates")
        result = {}
        for name, total in self._sums.items():
            mean = total / self.total_weight
            dtype = self._dtypes[name]
            result[name] = mean.to(dtype) if dtype.is_floating_point else mean.round().to(dtype)
        return result


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, mean_update: Mapping[str, torch.Tensor]) -> None:
    """Apply an averaged update: parameters take an optimizer step on it as a (pseudo-)gradient, buffers take its value."""
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        parameter.grad = mean_update[name].to(parameter.device, parameter.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = model.state_dict()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in state:  # a non-persistent buffer (a rotary table) is the model's own and never travels
                buffer.copy_(mean_update[name])


def model_delta(global_state: Mapping[str, torch.Tensor], local_model: nn.Module) -> dict[str, torch.Tensor]:
    """FedAvg's update: global minus local weights for parameters (a pseudo-gradient), local values for buffers."""
    parameters = dict(local_model.named_parameters())
    update = {}
    for name, tensor in local_model.state_dict().items():
        if name in parameters:
            update[name] = (global_state[name] - tensor).detach()
        else:
            update[name] = tensor.detach()
    return update


def gradient_update(model: nn.Module) -> dict[str, torch.Tensor]:
    """FedSGD's update: each parameter's gradient, and buffer values (BatchNorm statistics)."""
    parameters = dict(model.named_parameters())
    update = {}
    for name, tensor in model.state_dict().items():
        if name in parameters:
            grad = parameters[name].grad
            update[name] = torch.zeros_like(tensor) if grad is None else grad.detach()
        else:
            update[name] = tensor.detach()
    return update


# Robust aggregation rules (median, trimmed mean, Krum) and norm clipping. Each takes every update of a
# round at once, so the leader holds them all in an UpdateList. Float tensors follow the rule; integer
# tensors (BatchNorm's num_batches_tracked) are counters, not votes, so they always take the weighted mean
# that RunningMean gives. Everything is computed in float64 and returned in each input tensor's dtype.


def _check_round(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None) -> None:
    """Refuse an empty round, mismatched names or shapes, or weights that do not pair with updates."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if weights is not None:
        if len(weights) != len(updates):
            raise ValueError(f"got {len(updates)} updates but {len(weights)} weights")
        for weight in weights:
            if not weight > 0:
                raise ValueError(f"update weight must be positive, got {weight}")
    first = updates[0]
    for update in updates[1:]:
        if update.keys() != first.keys():
            raise ValueError("update names differ from the earlier updates'")
        for name, tensor in update.items():
            if tensor.shape != first[name].shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from {tuple(first[name].shape)}")


def _float_names(update: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that a rule aggregates (the floating-point ones)."""
    return [name for name, tensor in update.items() if tensor.dtype.is_floating_point]


def _stacked(updates: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    """One tensor's values from every update, stacked along a new first dimension, in float64."""
    return torch.stack([update[name].to(torch.float64) for update in updates])


def _combine(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], floats: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Float results cast back to their dtypes, plus the weighted mean of the integer tensors, in the updates' name order."""
    first = updates[0]
    integers = [name for name in first if name not in floats]
    means = weighted_mean([{name: update[name] for name in integers} for update in updates], weights) if integers else {}
    return {name: floats[name].to(tensor.dtype) if name in floats else means[name] for name, tensor in first.items()}


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median of float tensors (unweighted; mean of the two middle values for an even count)."""
    _check_round(updates, weights)
    n = len(updates)
    floats = {}
    for name in _float_names(updates[0]):
        ordered = _stacked(updates, name).sort(dim=0).values
        # torch.median picks the lower middle value; the usual median averages the two middle ones.
        floats[name] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return _combine(updates, weights, floats)


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], trim: float) -> dict[str, torch.Tensor]:
    """Per coordinate, drop the floor(trim * n) largest and smallest values and average the rest (unweighted)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trimmed mean needs 0 <= trim < 0.5, got {trim}")
    _check_round(updates, weights)
    n = len(updates)
    k = math.floor(trim * n)
    # trim < 0.5 makes k < n / 2, even after rounding trim * n (exact for n a power of two, and short
    # of n / 2 by more than half a unit in the last place otherwise), so at least one value remains.
    assert n - 2 * k >= 1, (trim, n)
    floats = {}
    for name in _float_names(updates[0]):
        ordered = _stacked(updates, name).sort(dim=0).values
        floats[name] = ordered[k : n - k].mean(dim=0)
    return _combine(updates, weights, floats)


def _check_krum(n: int, byzantine: int) -> None:
    """Refuse a Byzantine count that Krum cannot tolerate with `n` updates."""
    if byzantine < 0:
        raise ValueError(f"krum needs --byzantine >= 0, got {byzantine}")
    if not n > 2 * byzantine + 2:
        raise ValueError(f"krum needs more than 2*f + 2 updates: got {n} with --byzantine {byzantine}")


def krum_scores(updates: Sequence[Mapping[str, torch.Tensor]], byzantine: int) -> list[float]:
    """Krum's score of each update: summed squared distances to its n - f - 2 nearest others (float tensors only)."""
    _check_krum(len(updates), byzantine)
    _check_round(updates, None)
    n = len(updates)
    # Summed tensor by tensor, so that memory holds n copies of one tensor rather than of the model;
    # and by direct differences rather than torch.cdist, whose matrix-product shortcut cancels badly
    # when updates are close. n is the number of learners, so n * n / 2 differences are cheap.
    distances = [[0.0] * n for _ in range(n)]
    for name in _float_names(updates[0]):
        stacked = _stacked(updates, name)
        stacked = stacked.reshape(n, stacked[0].numel())  # numel, not -1: a tensor may be empty
        for i in range(n):
            for j in range(i + 1, n):
                distances[i][j] += float((stacked[i] - stacked[j]).square().sum())
    for i in range(n):
        for j in range(i + 1, n):
            # An update holding NaN is as far from the rest as can be, and NaN would make sorting arbitrary.
            if math.isnan(distances[i][j]):
                distances[i][j] = math.inf
            distances[j][i] = distances[i][j]
    nearest = n - byzantine - 2
    return [sum(sorted(distances[i][:i] + distances[i][i + 1 :])[:nearest]) for i in range(n)]


def krum(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], byzantine: int, select: int = 1
) -> dict[str, torch.Tensor]:
    """Krum (select=1): the update with the lowest score; multi-Krum: the weighted mean of the `select` lowest-scoring."""
    n = len(updates)
    _check_krum(n, byzantine)
    if not 1 <= select <= n - byzantine:
        raise ValueError(f"multi-krum needs 1 <= select <= n - f = {n - byzantine}, got {select}")
    _check_round(updates, weights)
    scores = krum_scores(updates, byzantine)
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:select]  # equal scores go to the lower index
    names = _float_names(updates[0])
    if select == 1:
        # Taken as is, not as weight * x / weight, which can differ from x in the last bit.
        floats = {name: updates[chosen[0]][name].to(torch.float64, copy=True) for name in names}
    else:
        floats = weighted_mean([{name: updates[i][name].to(torch.float64) for name in names} for i in chosen], [weights[i] for i in chosen])
    return _combine(updates, weights, floats)


def clip_to_norm(update: Mapping[str, torch.Tensor], max_norm: float, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], float]:
    """Scale the tensors in `names` down so that their joint L2 norm is at most max_norm; returns (update, original norm)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    for name in names:
        if name not in update:
            raise ValueError(f"cannot clip {name}: the update has no tensor by that name")
        if not update[name].dtype.is_floating_point:
            raise ValueError(f"cannot clip {name}: it is {update[name].dtype}, not a float tensor")
    norm = math.sqrt(sum(float(update[name].to(torch.float64).square().sum()) for name in names))
    if not math.isfinite(norm):
        # Scaling by max_norm / inf would turn the update into zeros and NaNs, not a bounded update.
        raise ValueError(f"cannot clip an update whose norm is {norm}")
    clipped = dict(update)
    if norm > max_norm:
        scale = max_norm / norm
        for name in names:
            clipped[name] = (update[name].to(torch.float64) * scale).to(update[name].dtype)
    return clipped, norm


class UpdateList:
    """Every update of a round, kept under its sender's key, for rules that need them all at once (median, Krum)."""

    def __init__(self) -> None:
        self._updates: dict[int, tuple[Mapping[str, torch.Tensor], float]] = {}

    @property
    def count(self) -> int:
        """Updates added so far."""
        return len(self._updates)

    @property
    def total_weight(self) -> float:
        """The sum of the weights added so far."""
        return sum(weight for _, weight in self._updates.values())

    def add(self, update: Mapping[str, torch.Tensor], weight: float, key: int = 0) -> None:
        """Keep `update` with its weight under `key` (the sender's id)."""
        if key in self._updates:
            raise ValueError(f"an update under key {key} was already added")
        if not weight > 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        self._updates[key] = (update, weight)

    def aggregate(
        self, rule: Callable[[list[Mapping[str, torch.Tensor]], list[float]], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Call `rule(updates, weights)` on everything added, in ascending key order."""
        if not self._updates:
            raise ValueError("cannot aggregate zero updates")
        keys = sorted(self._updates)
        return rule([self._updates[key][0] for key in keys], [self._updates[key][1] for key in keys])

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean summed in ascending key order, whatever order updates arrived in.

        Floating-point addition is not associative: summing the same updates in another order can change
        the last bit, and that difference grows over later rounds. This sum is reproducible bit for bit.
        """
        return self.aggregate(weighted_mean)


@dataclass(frozen=True)
class RuleSettings:
    """The settings a rule may read: --trim and --byzantine."""

    trim: float = 0.1
    byzantine: int = 0


# How a round's updates combine, by --rule: each takes the round's updates (in learner order), their weights and the
# settings. A new rule is one function and one line here. "mean" is also summed as updates arrive (RunningMean),
# so that it needs one model's memory however many report; the others need every update at once.
Rule = Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[float], RuleSettings], dict[str, torch.Tensor]]
RULES: dict[str, Rule] = {
    "mean": lambda updates, weights, settings: weighted_mean(updates, weights),
    "median": lambda updates, weights, settings: coordinate_median(updates, weights),
    "trimmed-mean": lambda updates, weights, settings: trimmed_mean(updates, weights, settings.trim),
    "krum": lambda updates, weights, settings: krum(updates, weights, settings.byzantine),
    "multi-krum": lambda updates, weights, settings: krum(updates, weights, settings.byzantine, len(updates) - settings.byzantine),
}
