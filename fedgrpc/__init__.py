"""Federated learning over gRPC: a leader and its learners, after the blog's design, made safe to run on a network.

The client API for a script that trains its own model (see the README's "Federate your own model"):

    import fedgrpc
    federation = fedgrpc.join(model, task, "leader-host:50051", num_examples=len(data))

Commands: `fedgrpc-leader`, `fedgrpc-learner`, `fedgrpc-launch` and `fedgrpc-provision` (or `python -m fedgrpc.leader`, ...).
The package by role: `leader/` and `learner/` (each side's process, service and state), `transport/` (the tensor wire
format, gRPC plumbing and compression both sides share), `algorithms/` (aggregation, server optimizers, FedBuff,
privacy, secure aggregation), `engines/` (one command for a whole federation, on processes or Ray), `config/` (flags
and config files), and beside them the task contract (`task.py`), built-in models (`model.py`) and data (`data.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedgrpc.client import Federation, join
    from fedgrpc.task import Task, TaskError, load_task

__all__ = ["Federation", "Task", "TaskError", "join", "load_task"]

# Imported on first use, so that `import fedgrpc.transport.wire` (or a bad flag) does not wait for PyTorch.
_HOMES = {
    "Federation": "fedgrpc.client",
    "join": "fedgrpc.client",
    "Task": "fedgrpc.task",
    "TaskError": "fedgrpc.task",
    "load_task": "fedgrpc.task",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fedgrpc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
