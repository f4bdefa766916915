"""What a federation trains: its model, data, loss and metrics, built in or from a user's task file (code never travels).

A task file is plain Python that every machine of the federation holds (`--task FILE.py` or `--task package.module`):

    def model() -> torch.nn.Module
    def train_data(data_dir) -> torch.utils.data.Dataset   # items: tuples of tensors, the last the target
    def test_data(data_dir) -> torch.utils.data.Dataset
    def loss(outputs, targets) -> torch.Tensor             # optional; default: cross-entropy over the last dimension
    def metrics(outputs, targets) -> dict[str, float]      # optional; default: accuracy for class targets
    def shared(model) -> list[str] | str                   # optional: the state-dict names federated, or a preset (sharing.py)

The leader names the task and the digest of its model's tensor manifest; a learner holding another task is refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedgrpc.data import Examples, load_dataset, training_inputs
from fedgrpc.model import build_model

REQUIRED_FUNCTIONS = ("model", "train_data", "test_data")
CONTRACT = "a task defines model(), train_data(data_dir) and test_data(data_dir)"
MAX_METRICS = 16  # metric names a task may report: each becomes a column of metrics.jsonl
MAX_METRIC_NAME = 64


class TaskError(Exception):
    """A task cannot be loaded or one of its functions failed; the message names the file and the function."""


Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]
# (a split's tensors, the batch's indices, an augmentation generator or None, the memory format) -> (inputs, targets)
BatchMaker = Callable[[Sequence[torch.Tensor], torch.Tensor, torch.Generator | None, torch.memory_format], Batch]


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the outputs' last dimension (class scores), for class targets of any leading shape."""
    if outputs.dim() == 2:
        return F.cross_entropy(outputs, targets)
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def default_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy when the outputs are class scores for integer targets; nothing otherwise."""
    if targets.dtype.is_floating_point or outputs.dim() != targets.dim() + 1:
        return {}
    return {"accuracy": (outputs.argmax(-1) == targets).double().mean().item()}


def plain_batch(tensors: Sequence[torch.Tensor], indices: torch.Tensor, generator: Any, memory_format: Any) -> Batch:
    """A user task's batch: every tensor at `indices`, the last as the targets (no augmentation: the task's data is as given)."""
    picked = tuple(tensor[indices] for tensor in tensors)
    return picked[:-1], picked[-1]


def image_batch(tensors: Sequence[torch.Tensor], indices: torch.Tensor, generator: Any, memory_format: Any) -> Batch:
    """A built-in task's batch: uint8 images cropped, flipped (with a generator), normalized; int64 labels."""
    images, labels = tensors
    return (training_inputs(images, indices, generator, memory_format),), labels[indices]


@dataclass
class Task:
    """A task's functions, called with errors that name where they came from."""

    name: str  # what the leader announces and a learner must match: a file's stem, a module's name, a built-in model's name
    source: str  # the file or module, for messages
    functions: dict[str, Callable[..., Any]]
    make_batch: BatchMaker = plain_batch
    builtin: bool = False
    _checked_loss: bool = field(default=False, repr=False)

    def model(self) -> nn.Module:
        """The task's model, freshly built."""
        built = self._call("model")
        if not isinstance(built, nn.Module):
            raise TaskError(f"{self.source}: model() returned {_describe(built)}, not a torch.nn.Module")
        if not any(True for _ in built.parameters()):
            raise TaskError(f"{self.source}: model() returned a module without parameters: there is nothing to train")
        return built

    def train_data(self, data_dir: str | None) -> Examples:
        """The training set as whole tensors."""
        return self._examples("train_data", data_dir)

    def test_data(self, data_dir: str | None) -> Examples:
        """The held-out set as whole tensors."""
        return self._examples("test_data", data_dir)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (a scalar tensor)."""
        value = self._call("loss", outputs, targets) if "loss" in self.functions else default_loss(outputs, targets)
        if not self._checked_loss:  # once: the hot path does not pay for it
            if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.dtype.is_floating_point:
                raise TaskError(f"{self.source}: loss() returned {_describe(value)}, not a scalar floating-point tensor")
            self._checked_loss = True
        return value

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """A batch's metrics (means over the batch), checked: a few named finite numbers."""
        if "metrics" not in self.functions:
            return default_metrics(outputs, targets)
        values = self._call("metrics", outputs, targets)
        if not isinstance(values, dict):
            raise TaskError(f"{self.source}: metrics() returned {_describe(values)}, not a dict of names to numbers")
        try:
            checked = {name: float(value.item() if isinstance(value, torch.Tensor) else value) for name, value in values.items()}
        except (TypeError, ValueError, RuntimeError):
            raise TaskError(f"{self.source}: metrics() returned a value that is not a number") from None
        problem = metrics_problem(checked)
        if problem is not None:
            raise TaskError(f"{self.source}: metrics(): {problem}")
        return checked

    def _examples(self, function: str, data_dir: str | None) -> Examples:
        data = self._call(function, data_dir)
        if isinstance(data, Examples):  # a built-in loader's own form
            examples = data
        else:
            examples = as_examples(data, f"{self.source}: {function}()")
        if len(examples) == 0:
            raise TaskError(f"{self.source}: {function}() returned an empty data set")
        return examples

    def _call(self, function: str, *args: Any) -> Any:
        try:
            return self.functions[function](*args)
        except TaskError:
            raise
        except Exception as error:  # a user's code may raise anything: say where, in one line
            if self.builtin:
                raise
            raise TaskError(f"{self.source}: {function}() raised {type(error).__name__}: {_one_line(error)}") from error


def metrics_problem(values: Mapping[Any, Any]) -> str | None:
    """Why metrics cannot be recorded (too many, a name that is no identifier or is "loss", a value not finite), or None.

    The learner checks its task's metrics with it, and the leader every evaluation a learner reports.
    """
    if len(values) > MAX_METRICS:
        return f"{len(values)} metrics; at most {MAX_METRICS}"
    for name, value in values.items():
        if not isinstance(name, str) or not name.isidentifier() or len(name) > MAX_METRIC_NAME or name == "loss":
            shown = name[:MAX_METRIC_NAME] if isinstance(name, str) else name
            return f"metric names must be identifiers of up to {MAX_METRIC_NAME} characters other than 'loss', got {shown!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} is not finite"
    return None


def evaluate(
    model: nn.Module, task: Task, data: Examples, device: torch.device, batch_size: int, stop: Callable[[], bool] = lambda: False
) -> dict[str, float] | None:
    """Mean loss and the task's metrics of `model` on `data`, each batch weighed by its examples; None when `stop()` turns true."""
    model.eval()
    sums: dict[str, float] = {}
    tensors = data.tensors
    try:
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                if stop():  # a shutdown is not kept waiting for a full pass over the test set
                    return None
                part = tuple(tensor[start : start + batch_size].to(device) for tensor in tensors)
                count = len(part[-1])
                inputs, targets = task.make_batch(part, torch.arange(count, device=device), None, torch.contiguous_format)
                outputs = model(*inputs)
                sums["loss"] = sums.get("loss", 0.0) + float(task.loss(outputs, targets)) * count
                for name, value in task.metrics(outputs, targets).items():
                    sums[name] = sums.get(name, 0.0) + value * count
    finally:
        model.train()
    examples = max(1, len(data))
    return {name: total / examples for name, total in sums.items()}


def as_examples(data: Any, where: str) -> Examples:
    """A Dataset whose items are tuples of tensors (or numbers), stacked into whole tensors; TaskError if it is not one."""
    if isinstance(data, torch.utils.data.TensorDataset):
        tensors = tuple(data.tensors)
    else:
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise TaskError(f"{where} returned {_describe(data)}, not a torch.utils.data.Dataset with a length")
        count = len(data)
        if count == 0:
            raise TaskError(f"{where} returned an empty data set")
        items = [data[index] for index in range(count)]
        width = _item_width(items[0], where)
        if any(_item_width(item, where) != width for item in items):
            raise TaskError(f"{where}: items have different numbers of parts: every item needs (inputs..., target) alike")
        columns = []
        for position in range(width):
            try:
                columns.append(torch.stack([torch.as_tensor(item[position]) for item in items]))
            except (RuntimeError, TypeError, ValueError) as error:
                raise TaskError(
                    f"{where}: item part {position} cannot be stacked ({_one_line(error)}): every item needs the same shapes"
                ) from None
        tensors = tuple(columns)
    if len(tensors) < 2:
        raise TaskError(f"{where}: items must be tuples of at least an input and a target, got {len(tensors)} tensor(s)")
    length = tensors[0].shape[0] if tensors[0].dim() else -1
    if any(tensor.dim() == 0 or tensor.shape[0] != length for tensor in tensors):
        raise TaskError(f"{where}: the tensors of a data set must all hold one entry per example")
    for tensor in tensors:
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise TaskError(f"{where}: the data holds NaN or infinite values")
    targets = tensors[-1]
    classes = int(targets.max()) + 1 if len(targets) and not targets.dtype.is_floating_point and targets.dtype != torch.bool else 0
    return Examples(tuple(tensor.contiguous() for tensor in tensors), num_classes=max(classes, 0))


def _item_width(item: Any, where: str) -> int:
    if not isinstance(item, tuple | list) or len(item) < 2:
        raise TaskError(f"{where}: each item must be a tuple (inputs..., target), got {_describe(item)}")
    return len(item)


def builtin_task(model_name: str, dataset: str, num_classes: int, seed: int = 0) -> Task:
    """A built-in image classifier on a built-in data set: the same path a user's task takes."""

    def model() -> nn.Module:
        return build_model(model_name, num_classes)

    def train_data(data_dir: str | None) -> Examples:
        return load_dataset(dataset, data_dir, train=True, seed=seed)

    def test_data(data_dir: str | None) -> Examples:
        return load_dataset(dataset, data_dir, train=False, seed=seed)

    functions = {"model": model, "train_data": train_data, "test_data": test_data}
    return Task(model_name, f"built-in {model_name}", functions, make_batch=image_batch, builtin=True)


def is_task_file(spec: str) -> bool:
    """Whether a --task names a file (a path, or a name ending in .py) rather than a module."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def task_name(spec: str) -> str:
    """The name a --task goes by on the wire: a file's name without .py, or the module's dotted name."""
    return Path(spec).stem if is_task_file(spec) else spec


def load_task(spec: str) -> Task:
    """The task a --task names: a Python file (path ending in .py) or an importable module (package.module)."""
    if is_task_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise TaskError(f"--task {spec}: no such file")
        name = task_name(spec)
        module_name = f"_fl_task_{name}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise TaskError(f"--task {spec}: not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling by Ray look modules up by name
        loader: Callable[[], Any] = lambda: module_spec.loader.exec_module(module)  # noqa: E731 - the user's own local file
    else:
        name = spec
        module = None
        loader = lambda: importlib.import_module(spec)  # noqa: E731
    try:
        loaded = loader()
    except Exception as error:  # importing runs the user's code: any error, in one line
        raise TaskError(f"--task {spec}: importing it raised {type(error).__name__}: {_one_line(error)}") from None
    module = module if module is not None else loaded
    functions = {}
    for function in (*REQUIRED_FUNCTIONS, "loss", "metrics", "shared"):
        value = getattr(module, function, None)
        if value is None and function in REQUIRED_FUNCTIONS:
            raise TaskError(f"--task {spec}: no {function}() function; {CONTRACT}")
        if value is not None:
            if not callable(value):
                raise TaskError(f"--task {spec}: {function} is a {type(value).__name__}, not a function")
            functions[function] = value
    return Task(name, spec, functions)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or "(no message)"
