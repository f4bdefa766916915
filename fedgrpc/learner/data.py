"""A learner's data and model checks: the split GetData streams, its own data, and whether both fit the leader's plan."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fedgrpc.console import printable
from fedgrpc.data import Examples, load_dataset
from fedgrpc.protos import leader_pb2
from fedgrpc.transport import rpc, wire

logger = logging.getLogger(__name__)

# Largest data split a learner accepts from GetData.
MAX_DATA_BYTES = 8 << 30
MAX_SPLIT_EXAMPLES = 10**9  # the most examples a split may hold, as the leader bounds a learner's own data
MAX_DATA_TENSORS = 16  # tensors per example a data split may declare (inputs and the target)


class LearnerError(Exception):
    """The learner cannot go on; the message says why."""


class LeaderLost(LearnerError):
    """The leader stopped answering or ended this learner's session; the learner may register again."""

    rounds_trained = 0  # rounds the lost session trained: one that trained was dropped, not refused
    learner_id: int | None = None  # the id the lost session held (or asked back), for the next to ask back


class Stopped(Exception):
    """The leader told this learner to stop."""


def layout_specs(layout: Any) -> list[wire.TensorSpec]:
    """A data split's announced layout (one example of each tensor) as specs; LearnerError when it cannot be a data set."""
    specs = [wire.TensorSpec(entry.name, entry.dtype, tuple(entry.shape)) for entry in layout]
    if len(specs) > MAX_DATA_TENSORS:
        raise LearnerError(f"the leader's data split declares {len(specs)} tensors per example; at most {MAX_DATA_TENSORS} are taken")
    if len({spec.name for spec in specs}) != len(specs):
        raise LearnerError("the leader's data split declares a tensor twice")
    for spec in specs:
        if spec.dtype not in wire.DTYPES or any(dim < 0 for dim in spec.shape):
            raise LearnerError(f"the leader's data split declares {printable(spec.name, 40)!r} as an unknown dtype or a negative shape")
    return specs


def split_specs(count: int, layout: list[wire.TensorSpec]) -> list[wire.TensorSpec]:
    """A data split of `count` examples as GetData streams it: each tensor of the layout with the count in front."""
    return [wire.TensorSpec(spec.name, spec.dtype, (count, *spec.shape)) for spec in layout]


def fetch_split(
    stub: Any,
    learner_id: int,
    split_examples: int,
    layout: list[wire.TensorSpec],
    plan: leader_pb2.TrainingPlan,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[Examples, int]:
    """GetData: a learner's split and its size in bytes, checked against the `split_examples` and layout registration announced.

    Nothing is allocated before the stream's manifest matches that split; memory is committed as bytes arrive.
    Raises grpc.RpcError when the call fails and LearnerError when the split is malformed.
    """
    if len(layout) < 2:
        raise LearnerError("the leader announced no data split layout (inputs and a target): is it the same release?")
    if not 0 <= split_examples <= MAX_SPLIT_EXAMPLES:  # zero-byte examples would pass the byte bound in any number
        raise LearnerError(f"the leader announced a split of {split_examples} examples, outside 0 to {MAX_SPLIT_EXAMPLES}")
    specs = split_specs(split_examples, layout)
    for spec in specs:
        problem = wire.shape_problem(spec.shape)
        if problem is not None:
            raise LearnerError(f"the leader's data split of {split_examples} examples declares {printable(spec.name, 40)!r} with {problem}")
    size = wire.payload_bytes(specs)
    if size > MAX_DATA_BYTES:
        raise LearnerError(f"the leader's data split of {size} bytes exceeds this learner's {MAX_DATA_BYTES}-byte limit")
    responses = stub.GetData(leader_pb2.LearnerDataRequest(learner_id=learner_id), timeout=rpc.transfer_timeout(size), metadata=metadata)
    try:
        received = wire.receive(responses, max_bytes=size, expected=specs)
    except wire.WireError as error:
        raise LearnerError(f"the leader sent a malformed data split: {error}") from None
    data = Examples(tuple(received.tensors[spec.name] for spec in layout), plan.num_classes)
    data.names = tuple(spec.name for spec in layout)
    return data, len(received.payload)


def check_data(data: Examples, plan: leader_pb2.TrainingPlan) -> None:
    """Raise LearnerError unless a learner's examples fit the plan: some examples, class targets among its classes, its image shape."""
    if len(data) == 0:
        raise LearnerError("this learner has no training examples")
    targets = data.targets
    if plan.num_classes and targets.dim() == 1 and not targets.dtype.is_floating_point:
        if int(targets.max()) >= plan.num_classes or int(targets.min()) < 0:
            raise LearnerError(f"labels fall outside the leader's {plan.num_classes} classes")
    if plan.image_shape and tuple(data.tensors[0].shape[1:]) != tuple(plan.image_shape):
        raise LearnerError(f"images are {list(data.tensors[0].shape[1:])}, the leader's model takes {list(plan.image_shape)}")


def check_model(specs: list[wire.TensorSpec], plan: leader_pb2.TrainingPlan) -> None:
    """Raise LearnerError when this side's model.py builds another network than the leader's; warn once on another PyTorch."""
    if plan.model_fingerprint and wire.fingerprint(specs) != plan.model_fingerprint:
        raise LearnerError(f"this learner's model.py builds a different {plan.model} than the leader's: install the same release on both")
    if plan.torch_version and plan.torch_version.split(".")[:2] != torch.__version__.split(".")[:2]:
        logger.warning("the leader runs PyTorch %s, this learner %s: results may differ slightly", plan.torch_version, torch.__version__)


def load_local_data(data_dir: str) -> Examples:
    """A learner's own training data: an image folder (train/<class>/*) or CIFAR-10 in torchvision's format."""
    root = Path(data_dir)
    kind = "imagefolder" if (root / "train").is_dir() else "cifar10"
    return load_dataset(kind, root, train=True)
