"""Checkpoints: weights as safetensors plus JSON metadata, written atomically, pruned, and loaded back."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

logger = logging.getLogger(__name__)

_ROUND_FILE = re.compile(r"^round-(\d{5})\.json$")
# safetensors' names for the dtypes a model or optimizer state holds
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
PRIVACY_RECORD = "privacy.json"  # noised rounds so far under DP-FedAvg, written every round (record_privacy_spent)
HEADER_ALIGN = 8  # safetensors pads its JSON header with spaces so that the data starts 8-byte aligned

if sys.byteorder != "little":  # tensors are written from native memory; safetensors is little-endian
    raise ImportError("checkpoints need a little-endian machine")


def atomic_write(path: Path, data: bytes | Iterable[bytes | memoryview]) -> int:
    """Write bytes (or pieces in order) so that `path` holds either its old content or all of them: temp file, fsync, rename.

    Returns the CRC-32 of what was written.
    """
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    crc = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb", buffering=0) as file:
            for piece in pieces:
                crc = zlib.crc32(piece, crc)
                view = memoryview(piece)
                while view:  # an unbuffered write may take part of a large piece
                    view = view[file.write(view) :]
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
    return crc


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
    record = {**metadata, "round": round_number, "weights": weights[0], "weights_crc32": weights[1]}
    if optimizer_state is not None:
        record["optimizer"], record["optimizer_crc32"] = _write_tensors(
            directory / f"round-{round_number:05d}.optimizer.safetensors", optimizer_state
        )
    # The JSON is written last: its presence means the weights beside it are complete.
    json_path = directory / f"round-{round_number:05d}.json"
    atomic_write(json_path, json.dumps(record, indent=2, sort_keys=True).encode())
    atomic_write(directory / "latest.json", json.dumps(record, indent=2, sort_keys=True).encode())
    _prune(directory, keep)
    return json_path


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """Write tensors as safetensors atomically, straight from their memory; returns (file name, CRC-32 in hex).

    The CRC-32 catches a torn or damaged file (every error burst up to 32 bits; other damage but once in 4 billion)
    at a seventh of SHA-256's cost on a CPU without SHA instructions; neither hash would stop someone who can
    rewrite the JSON beside the file.
    """
    header: dict[str, Any] = {}
    pieces = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: cannot checkpoint a {tensor.dtype} tensor")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        pieces.append(data)
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % HEADER_ALIGN)
    crc = atomic_write(path, [struct.pack("<Q", len(text)), text, *pieces])
    return path.name, f"{crc:08x}"


def _prune(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` rounds (the JSON first, so no listed round lacks its weights)."""
    rounds = sorted(int(match.group(1)) for name in os.listdir(directory) if (match := _ROUND_FILE.match(name)))
    for old in rounds[:-keep] if keep > 0 else []:
        for suffix in (".json", ".safetensors", ".optimizer.safetensors"):
            (directory / f"round-{old:05d}{suffix}").unlink(missing_ok=True)


def _read_tensors(directory: Path, record: Mapping[str, Any], key: str) -> dict[str, torch.Tensor]:
    """The tensors in the file `record[key]` names, checked against its CRC-32 (or SHA-256, in older checkpoints)."""
    name = record[key]
    data = (directory / name).read_bytes()
    if f"{key}_crc32" in record:
        matches = f"{zlib.crc32(data):08x}" == record[f"{key}_crc32"]
    else:
        matches = hashlib.sha256(data).hexdigest() == record[f"{key}_sha256"]
    if not matches:
        raise ValueError(f"{name} does not match the hash recorded beside it")
    return load_safetensors(data)


def load(json_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a checkpoint's metadata and weights, checking the weights' hash."""
    record = json.loads(json_path.read_text())
    return record, _read_tensors(json_path.parent, record, "weights")


def load_optimizer(json_path: Path, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The optimizer tensors saved with a checkpoint (empty if none were)."""
    if "optimizer" not in record:
        return {}
    return _read_tensors(json_path.parent, record, "optimizer")


def record_privacy_spent(directory: Path, noised_rounds: int) -> None:
    """Durably record that `noised_rounds` noised models have been made, before the newest is published.

    Checkpoints may be written only every --checkpoint-every rounds, but every noised model a learner
    received spent privacy. A resume counts from this record, so a crash between checkpoints never
    makes the reported epsilon understate what was spent.
    """
    atomic_write(directory / PRIVACY_RECORD, json.dumps({"noised_rounds": noised_rounds}).encode())


def privacy_spent(directory: Path) -> int:
    """The noised rounds recorded in `directory`, 0 where there is no record; a damaged record is refused."""
    path = directory / PRIVACY_RECORD
    if not path.exists():
        return 0
    try:
        rounds = json.loads(path.read_text())["noised_rounds"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is damaged ({error.__class__.__name__}), so the privacy already spent is unknown: "
            "restore it from a backup, or start a new run in a fresh --checkpoint-dir"
        ) from None
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise ValueError(
            f"{path} records {rounds!r} noised rounds, not a count: restore it from a backup, "
            "or start a new run in a fresh --checkpoint-dir"
        )
    return rounds


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
