"""Checkpoints: weights as safetensors plus JSON metadata, written atomically, pruned, and loaded back."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

logger = logging.getLogger(__name__)

_ROUND_FILE = re.compile(r"^round-(\d{5})\.json$")


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that `path` holds either its old content or all of `data`: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def save(
    directory: Path,
    round_number: int,
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    keep: int = 3,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write round `round_number`'s weights, optional optimizer tensors and metadata; keep the newest `keep` rounds.

    The optimizer tensors go to a file of their own, so that the weights file loads straight into the model.
    Returns the JSON path.
    """
    weights = _write_tensors(directory / f"round-{round_number:05d}.safetensors", state)
    record = {**metadata, "round": round_number, "weights": weights[0], "weights_sha256": weights[1]}
    if optimizer_state is not None:
        record["optimizer"], record["optimizer_sha256"] = _write_tensors(directory / f"round-{round_number:05d}.optimizer.safetensors", optimizer_state)
    # The JSON is written last: its presence means the weights beside it are complete.
    json_path = directory / f"round-{round_number:05d}.json"
    atomic_write(json_path, json.dumps(record, indent=2, sort_keys=True).encode())
    atomic_write(directory / "latest.json", json.dumps(record, indent=2, sort_keys=True).encode())
    _prune(directory, keep)
    return json_path


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """Write tensors as safetensors atomically; returns (file name, SHA-256)."""
    data = save_safetensors({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})
    atomic_write(path, data)
    return path.name, hashlib.sha256(data).hexdigest()


def _prune(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` rounds (the JSON first, so no listed round lacks its weights)."""
    rounds = sorted(int(match.group(1)) for name in os.listdir(directory) if (match := _ROUND_FILE.match(name)))
    for old in rounds[:-keep] if keep > 0 else []:
        for suffix in (".json", ".safetensors", ".optimizer.safetensors"):
            (directory / f"round-{old:05d}{suffix}").unlink(missing_ok=True)


def _read_tensors(directory: Path, name: str, sha256: str) -> dict[str, torch.Tensor]:
    data = (directory / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{name} does not match the hash recorded beside it")
    return load_safetensors(data)


def load(json_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a checkpoint's metadata and weights, checking the weights' hash."""
    record = json.loads(json_path.read_text())
    return record, _read_tensors(json_path.parent, record["weights"], record["weights_sha256"])


def load_optimizer(json_path: Path, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The optimizer tensors saved with a checkpoint (empty if none were)."""
    if "optimizer" not in record:
        return {}
    return _read_tensors(json_path.parent, record["optimizer"], record["optimizer_sha256"])


def remove_partial_writes(directory: Path) -> int:
    """Delete temp files that a process killed mid-write left behind; returns how many."""
    if not directory.is_dir():
        return 0
    partial = [name for name in os.listdir(directory) if name.startswith(".") and name.endswith(".tmp")]
    for name in partial:
        (directory / name).unlink(missing_ok=True)
    return len(partial)


def latest(directory: Path) -> Path | None:
    """The newest round's JSON in `directory`, or None."""
    if not directory.is_dir():
        return None
    names = sorted(name for name in os.listdir(directory) if _ROUND_FILE.match(name))
    return directory / names[-1] if names else None
