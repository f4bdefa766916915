"""Tampered checkpoints, each kind made from a sound one: what tests/test_checkpoint_trust.py and the
tampered-checkpoint row of bench/faults.py feed a leader's --resume, with the reason its refusal must give."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from fedgrpc.config.options import LeaderConfig
from fedgrpc.leader import checkpoint
from fedgrpc.model import build_model


def make_run(run_dir: Path) -> Path:
    """A run folder as a leader leaves it after round 1 of 3 (tiny-cnn, server momentum); returns the round's record."""
    config = LeaderConfig(
        dataset="synthetic",
        model="tiny-cnn",
        device="cpu",
        rounds=3,
        learners=2,
        aggregation="fedavg",
        server_momentum=0.5,
        run_dir=str(run_dir),
        checkpoint_dir=str(run_dir / "checkpoints"),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    torch.manual_seed(0)
    model = build_model("tiny-cnn", 10)
    momentum = {f"{name}.momentum_buffer": torch.full_like(parameter, 0.01) for name, parameter in model.named_parameters()}
    metadata = {"config": dataclasses.asdict(config), "metrics": {"round": 1}, "num_classes": 10}
    return checkpoint.save(Path(config.checkpoint_dir), 1, model.state_dict(), metadata, optimizer_state=momentum)


def folder_state(directory: Path) -> dict[str, str]:
    """Every entry of a folder and what it holds (a link's target, a file's hash)."""
    state = {}
    for path in sorted(directory.iterdir()):
        if path.is_symlink():
            state[path.name] = f"link to {os.readlink(path)}"
        elif path.is_file():
            state[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[path.name] = "other"
    return state


def rewrite_record(record_path: Path, **changes: object) -> None:
    record = json.loads(record_path.read_text())
    record.update(changes)
    record_path.write_text(json.dumps(record))


def rewrite_tensors(record_path: Path, key: str, data: bytes) -> None:
    """Replace the file `key` names with `data`, and record its CRC so that only the content is wrong."""
    record = json.loads(record_path.read_text())
    (record_path.parent / record[key]).write_bytes(data)
    rewrite_record(record_path, **{f"{key}_crc32": f"{zlib.crc32(data):08x}"})


def altered_weights(record_path: Path, change) -> bytes:
    _, weights = checkpoint.load(record_path)
    change(weights)
    return safetensors_bytes(weights)


def set_first(weights: dict[str, torch.Tensor], value: float) -> None:
    first = next(iter(weights))
    weights[first] = weights[first].clone()
    weights[first].view(-1)[0] = value


TAMPERING = {
    "a name that climbs out": (lambda path: rewrite_record(path, weights="../outside.safetensors"), "not the name of a .safetensors file"),
    "an absolute path": (lambda path: rewrite_record(path, weights="/etc/passwd"), "not the name of a .safetensors file"),
    "a symlink": (lambda path: _replace_with_link(path), "is a symbolic link"),
    "a named pipe": (lambda path: _replace_with_pipe(path), "is not a plain file"),
    "a truncated file": (lambda path: rewrite_tensors(path, "weights", _weights_bytes(path)[:-100]), "truncated"),
    "an altered file": (lambda path: _flip_a_byte(path), "does not match the hash"),
    "a missing round": (lambda path: _drop(path, "round"), "round is None"),
    "a round as text": (lambda path: rewrite_record(path, round="1"), "round is '1'"),
    "a negative round": (lambda path: rewrite_record(path, round=-4), "round is -4"),
    "a mistyped config": (lambda path: rewrite_record(path, config=["tiny-cnn"]), "config is not a run's settings"),
    "NaN weights": (lambda path: rewrite_tensors(path, "weights", altered_weights(path, lambda w: set_first(w, float("nan")))), "NaN"),
    "integer weights": (
        lambda path: rewrite_tensors(path, "weights", altered_weights(path, lambda w: w.update({k: v.long() for k, v in w.items()}))),
        "torch.int64, the model's is",
    ),
    "a missing tensor": (
        lambda path: rewrite_tensors(path, "weights", altered_weights(path, lambda w: w.popitem())),
        "it lacks the model's",
    ),
    "a stranger tensor": (
        lambda path: rewrite_tensors(path, "weights", altered_weights(path, lambda w: w.update(extra=torch.zeros(3)))),
        "tensors the model does not have: 'extra'",
    ),
    "an optimizer state holding inf": (lambda path: _infinite_momentum(path), "NaN or infinite"),
}


def _weights_bytes(record_path: Path) -> bytes:
    return (record_path.parent / json.loads(record_path.read_text())["weights"]).read_bytes()


def _replace_with_link(record_path: Path) -> None:
    weights = record_path.parent / json.loads(record_path.read_text())["weights"]
    outside = record_path.parent.parent / "outside.safetensors"
    shutil.move(weights, outside)
    weights.symlink_to(outside)


def _replace_with_pipe(record_path: Path) -> None:
    weights = record_path.parent / json.loads(record_path.read_text())["weights"]
    weights.unlink()
    os.mkfifo(weights)  # a reader that opened it without care would block here for ever


def _flip_a_byte(record_path: Path) -> None:
    weights = record_path.parent / json.loads(record_path.read_text())["weights"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def _drop(record_path: Path, key: str) -> None:
    record = json.loads(record_path.read_text())
    del record[key]
    record_path.write_text(json.dumps(record))


def _infinite_momentum(record_path: Path) -> None:
    record = json.loads(record_path.read_text())
    state = checkpoint.load_optimizer(record_path, record)
    first = next(iter(state))
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("inf")
    rewrite_tensors(record_path, "optimizer", safetensors_bytes(state))
