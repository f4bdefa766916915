"""Which of a model's tensors a federation shares; the rest stay personal to each learner and never leave it.

Presets (the leader's --share, sent to learners in the training plan):

    all       every parameter and buffer (FedAvg)
    fedper    all but the head: the last module, in definition order, that holds parameters (FedPer's and FedRep's split)
    fedbn     all but the normalization layers, their weights and their statistics (FedBN)
    adapters  only the parameters that train (requires_grad): a PEFT LoRA model's adapters; frozen weights and buffers
              stay as each learner loaded them

A task may choose its own: `def shared(model)` returning the state-dict names to federate, or a preset's name. Both
sides compute the set from their own copy of the task; the plan carries the shared manifest's digest to compare.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fedgrpc.config.options import SHARE_PRESETS
from fedgrpc.task import Task, TaskError

TASK_SHARE = "task"  # the plan's name for a set the task's shared() chose


class SharingError(ValueError):
    """A share preset or a task's shared() does not fit the model; the message says what to do."""


def is_norm(module: nn.Module) -> bool:
    """Whether a module normalizes activations (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm, or a class named so)."""
    known = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)
    return isinstance(module, known) or "norm" in type(module).__name__.lower()


def _direct_tensors(model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """Each module with each state-dict name of its own tensors (not its children's)."""
    names = set(model.state_dict())
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = [name for name, _ in module.named_parameters(recurse=False)] + [name for name, _ in module.named_buffers(recurse=False)]
        for name in own:
            full = f"{prefix}.{name}" if prefix else name
            if full in names:
                yield module, full


def trained_names(model: nn.Module) -> set[str]:
    """The state-dict names of the parameters that train (requires_grad), a tied one under each of its names."""
    return {name for name, parameter in model.named_parameters(remove_duplicate=False) if parameter.requires_grad}


def preset_names(model: nn.Module, preset: str) -> list[str]:
    """The state-dict names a preset shares, in state-dict order."""
    order = list(model.state_dict())
    if preset == "all":
        return order
    if preset == "adapters":
        trained = trained_names(model)
        return [name for name in order if name in trained]
    if preset == "fedbn":
        personal = {name for module, name in _direct_tensors(model) if is_norm(module)}
        if not personal:
            raise SharingError("--share fedbn: this model has no normalization layers to keep local; use --share all or fedper")
        return [name for name in order if name not in personal]
    if preset == "fedper":
        holders = [prefix for prefix, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
        head = holders[-1] if holders else ""
        if not head:
            raise SharingError("--share fedper: the model's only module is its head, so nothing would be shared; use --share all")
        return [name for name in order if not name.startswith(head + ".")]
    raise SharingError(f"--share {preset}: not a preset; choose one of {', '.join(SHARE_PRESETS)}")


def shared_names(model: nn.Module, share: str, task: Task | None = None) -> list[str]:
    """The state-dict names a federation shares under `share` (a preset, or "task" for the task's shared()), checked.

    At least one trainable parameter must be shared: a federation of nothing is refused.
    """
    if share == TASK_SHARE:
        names = _task_names(model, task)
    else:
        names = preset_names(model, share or "all")
    if not trained_names(model).intersection(names):
        raise SharingError(f"--share {share}: no trainable parameter would be shared, so the federation would learn nothing")
    return names


def _task_names(model: nn.Module, task: Task | None) -> list[str]:
    if task is None or "shared" not in task.functions:
        raise SharingError("the leader's plan says the task chooses what is shared, and this task has no shared() function")
    chosen = task._call("shared", model)
    if isinstance(chosen, str):
        if chosen not in SHARE_PRESETS:
            raise TaskError(f"{task.source}: shared() returned {chosen[:40]!r}, not a preset ({', '.join(SHARE_PRESETS)}) or names")
        return preset_names(model, chosen)
    try:
        chosen_names = set(chosen)
    except TypeError:
        raise TaskError(f"{task.source}: shared() returned a {type(chosen).__name__}, not state-dict names or a preset") from None
    order = list(model.state_dict())
    strangers = sorted(str(name)[:80] for name in chosen_names.difference(order))
    if strangers:
        raise TaskError(f"{task.source}: shared() names {strangers[0]!r}, which is not in the model's state dict")
    return [name for name in order if name in chosen_names]


def plan_share(requested: str | None, task: Task) -> str:
    """What the plan says is shared: --share when given, else the task's shared() when it has one, else all."""
    if requested:
        return requested
    return TASK_SHARE if "shared" in task.functions else "all"


class SharedPart:
    """The shared tensors of a model, seen as a model: what the leader holds, publishes, checks and saves, and what a
    learner receives and reports. Its tensors are the model's own (loading one writes into the model)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model = model
        self.names = frozenset(names)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in self.model.state_dict().items() if name in self.names}

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, parameter) for name, parameter in self.model.named_parameters() if name in self.names]

    def parameters(self) -> list[nn.Parameter]:
        return [parameter for _, parameter in self.named_parameters()]

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, buffer) for name, buffer in self.model.named_buffers() if name in self.names]

    def buffers(self) -> list[torch.Tensor]:
        return [buffer for _, buffer in self.named_buffers()]

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the shared tensors in; every one must be there, and nothing else."""
        if set(state) != self.names:
            missing, strangers = sorted(self.names.difference(state)), sorted(set(state).difference(self.names))
            raise KeyError(f"a shared state must hold exactly the shared tensors (missing {missing[:3]}, not shared {strangers[:3]})")
        self.model.load_state_dict(state, strict=False)


def part(model: nn.Module, names: list[str]) -> Any:
    """The model itself when everything is shared (nothing changes for a plain federation), else its SharedPart."""
    return model if len(names) == len(model.state_dict()) else SharedPart(model, names)


def personal_names(model: nn.Module, names: list[str]) -> list[str]:
    """The state-dict names a learner keeps to itself: those neither shared nor frozen. A frozen parameter (a
    pretrained base under adapters) is every machine's alike, loaded from its own copy: never sent, never kept."""
    frozen = {name for name, parameter in model.named_parameters(remove_duplicate=False) if not parameter.requires_grad}
    shared = set(names)
    return [name for name in model.state_dict() if name not in shared and name not in frozen]


def personal_state(model: nn.Module, personal: list[str]) -> dict[str, torch.Tensor]:
    """A copy of a learner's personal tensors, the state-dict names `personal` (personal_names)."""
    wanted = set(personal)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name in wanted}


def leader_part(model: nn.Module, task: Task, requested: str | None, aggregation: str, evaluation: str) -> tuple[str, Any, bool]:
    """The leader's side of --share: the plan's share (plan_share), the model's shared part (part), and whether the
    leader's copy is a whole model it can evaluate (leader_evaluates, which refuses combinations that cannot work)."""
    share = plan_share(requested, task)
    names = shared_names(model, share, task)
    return share, part(model, names), leader_evaluates(model, names, aggregation, evaluation)


def leader_evaluates(model: nn.Module, names: list[str], aggregation: str, evaluation: str) -> bool:
    """Whether the leader's copy is a whole model worth evaluating: no learner keeps a personal part (what is not
    shared is frozen, loaded alike everywhere).

    SharingError where a personal part that trains meets fedsgd (whose learners do not train), or --evaluation asks
    the leader for a model it does not hold.
    """
    parameters = dict(model.named_parameters(remove_duplicate=False))
    personal = personal_names(model, names)
    whole = not personal
    if aggregation == "fedsgd" and any(name in parameters for name in personal):
        raise SharingError("the part each learner keeps (--share, or the task's shared()) trains locally: add --aggregation fedavg")
    if not whole and evaluation in ("leader", "both"):
        raise SharingError(
            f"--evaluation {evaluation}: each learner keeps part of this model (--share), so the leader holds no whole "
            "model to evaluate; use --evaluation learners"
        )
    return whole
