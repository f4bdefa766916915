"""Aggregation rules: weighted averaging of learner updates and the server optimizer step, free of gRPC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


class RunningMean:
    """A weighted running sum of updates, so memory stays one model's worth (in float64) however many learners report."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, torch.Tensor], weight: float, key: int = 0) -> None:
        """Add `weight * update` to the sum, in float64 so that no finite float32 input can overflow it (`key` is unused)."""
        if not weight > 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        if self._sums and update.keys() != self._sums.keys():
            raise ValueError("update names differ from the earlier updates'")
        for name, tensor in update.items():
            if name not in self._sums:
                self._dtypes[name] = tensor.dtype
                self._sums[name] = torch.zeros(tensor.shape, dtype=torch.float64)
            self._sums[name].add_(tensor.to(torch.float64), alpha=weight)
        self.total_weight += weight
        self.count += 1

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


class OrderedMean:
    """A weighted mean summed in key order whatever order updates arrive in, so that it is reproducible bit for bit.

    Floating-point addition is not associative: summing the same updates in another order can change
    the last bit, and that difference grows over later rounds. It holds every update until mean().
    """

    def __init__(self) -> None:
        self._updates: dict[int, tuple[Mapping[str, torch.Tensor], float]] = {}

    @property
    def count(self) -> int:
        """Updates added so far."""
        return len(self._updates)

    def add(self, update: Mapping[str, torch.Tensor], weight: float, key: int = 0) -> None:
        """Keep `update` with its weight under `key` (the sender's id)."""
        if key in self._updates:
            raise ValueError(f"an update under key {key} was already added")
        if not weight > 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        self._updates[key] = (update, weight)

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean, summed in ascending key order."""
        running = RunningMean()
        for key in sorted(self._updates):
            running.add(*self._updates[key])
        return running.mean()


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, mean_update: Mapping[str, torch.Tensor]) -> None:
    """Apply an averaged update: parameters take an optimizer step on it as a (pseudo-)gradient, buffers take its value."""
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        parameter.grad = mean_update[name].to(parameter.device, parameter.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
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
