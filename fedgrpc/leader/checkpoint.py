"""Checkpoints: weights as safetensors plus JSON metadata, written atomically, pruned, and loaded back."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

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
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# A checkpoint is read as strictly as a network payload: it may have been copied, restored or written by another release.
FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}\.safetensors")  # a name in the folder: no separator, no leading dot
CRC32 = re.compile(r"[0-9a-f]{8}")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_RECORD_BYTES = 4 << 20  # a record is the config and one round's metrics: kilobytes
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
MAX_TENSOR_FILE_BYTES = 64 << 30  # a file read without the model's manifest to size it by
MAX_ROUND = 10_000_000
MAX_DIMS = 16
MAX_CLASSES = 1 << 24
SHOWN_CHARS = 80  # of a value from a file, in an error message
PRIVACY_RECORD = "privacy.json"  # noised rounds so far under DP-FedAvg, written every round (record_privacy_spent)
HEADER_ALIGN = 8  # safetensors pads its JSON header with spaces so that the data starts 8-byte aligned

if sys.byteorder != "little":  # tensors are written from native memory; safetensors is little-endian
    raise ImportError("checkpoints need a little-endian machine")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and what is wrong, in one line."""


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


def read_plain_file(path: Path, limit: int) -> bytearray:
    """The bytes of `path`, which must be a plain file (not a link, pipe, device or folder) of at most `limit` bytes.

    The file's kind and size are checked on the open descriptor before a byte is read, so that a link cannot point
    elsewhere and a pipe cannot block or stream without end. Raises CheckpointError naming the file.
    """
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: is a symbolic link; a checkpoint's files must be plain files in its folder") from None
        raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
    with os.fdopen(handle, "rb", buffering=0) as file:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: is not a plain file (a folder, pipe or device); a checkpoint's files must be plain files")
        if info.st_size > limit:
            raise CheckpointError(f"{path}: holds {info.st_size} bytes, more than the {limit} this file may hold")
        data = bytearray(info.st_size)
        view, filled = memoryview(data), 0
        while filled < info.st_size:  # one read returns at most about 2 GiB on Linux
            count = file.readinto(view[filled:])
            if not count:
                break
            filled += count
        if filled != info.st_size or file.read(1):
            raise CheckpointError(f"{path}: changed size while it was read")
    return data


def _file_in(directory: Path, record: Mapping[str, Any], key: str) -> Path:
    """The file `record[key]` names: a plain name of this folder, never a path that leaves it."""
    name = record.get(key)
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
        raise CheckpointError(f"{key} is {_shown(name)}, not the name of a .safetensors file in the checkpoint's folder")
    return directory / name


def _check_hash(data: bytearray, record: Mapping[str, Any], key: str, path: Path) -> None:
    crc, sha = record.get(f"{key}_crc32"), record.get(f"{key}_sha256")  # SHA-256: checkpoints of older releases
    if isinstance(crc, str) and CRC32.fullmatch(crc):
        matches = f"{zlib.crc32(data):08x}" == crc
    elif crc is None and isinstance(sha, str) and SHA256.fullmatch(sha):
        matches = hashlib.sha256(data).hexdigest() == sha
    else:
        raise CheckpointError(f"{key}_crc32 is {_shown(crc)}, not 8 hex digits")
    if not matches:
        raise CheckpointError(f"{path.name} does not match the hash recorded beside it (a damaged or altered file)")


def parse_safetensors(
    data: bytearray, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None, exact: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes, every header entry checked before a tensor is made.

    `expected` (name -> shape, dtype): the tensors must be exactly these (`exact`) or some of them. Float tensors
    must be finite. Raises CheckpointError saying what is wrong.
    """
    if len(data) < 8:
        raise CheckpointError(f"{len(data)} bytes is shorter than a safetensors header (a truncated file)")
    (header_size,) = struct.unpack_from("<Q", data)
    if header_size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise CheckpointError(f"its header claims {header_size} bytes, past the file's end (a truncated or altered file)")
    try:
        header = json.loads(bytes(data[8 : 8 + header_size]))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError("its header is not JSON (a damaged or altered file)") from None
    if not isinstance(header, dict):
        raise CheckpointError("its header is not a JSON object")
    header.pop("__metadata__", None)
    body_start, body_size = 8 + header_size, len(data) - 8 - header_size
    entries = [(name, _entry_layout(name, entry, body_size)) for name, entry in header.items()]
    covered = sorted(span for _, (_, _, span) in entries)
    for (_, end), (start, _) in zip(covered, covered[1:], strict=False):
        if start < end:
            raise CheckpointError("two of its tensors overlap in the file (an altered file)")
    if sum(end - start for start, end in covered) != body_size:
        raise CheckpointError("its tensors do not fill the file (a truncated or altered file)")
    if expected is not None:
        _compare_manifest({name: (shape, dtype) for name, (shape, dtype, _) in entries}, expected, exact)
    tensors = {}
    for name, (shape, dtype, (start, end)) in entries:
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=body_start + start) if count else torch.empty(0, dtype=dtype)
        if dtype.is_floating_point and not bool(torch.isfinite(flat).all()):
            raise CheckpointError(f"tensor {_shown(name)} holds NaN or infinite values")
        tensors[name] = flat.reshape(shape)
    return tensors


def _entry_layout(name: str, entry: Any, body_size: int) -> tuple[tuple[int, ...], torch.dtype, tuple[int, int]]:
    """One header entry's shape, dtype and byte span, each checked."""
    where = f"tensor {_shown(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: its header entry is not {{dtype, shape, data_offsets}}")
    dtype = DTYPES_BY_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: dtype {_shown(entry['dtype'])} is not one a model holds")
    shape, span = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_whole(size, body_size) for size in shape):
        raise CheckpointError(f"{where}: shape {_shown(shape)} is not a list of sizes")
    if not isinstance(span, list) or len(span) != 2 or not all(_whole(offset, body_size) for offset in span) or span[0] > span[1]:
        raise CheckpointError(f"{where}: data_offsets {_shown(span)} do not lie within the file (a truncated or altered file)")
    if span[1] - span[0] != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{where}: {span[1] - span[0]} bytes do not hold a {dtype} tensor of shape {shape}")
    return tuple(shape), dtype, (span[0], span[1])


def _whole(value: Any, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= bound


def _compare_manifest(
    found: Mapping[str, tuple[tuple[int, ...], torch.dtype]], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], exact: bool
) -> None:
    """Raise CheckpointError naming the first tensors that differ from the model's own manifest."""
    missing = [name for name in expected if name not in found] if exact else []
    if missing:
        raise CheckpointError(f"it lacks the model's {_names(missing)}: it was written for another model")
    unknown = [name for name in found if name not in expected]
    if unknown:
        raise CheckpointError(f"it holds tensors the model does not have: {_names(unknown)}")
    for name, (shape, dtype) in found.items():
        model_shape, model_dtype = expected[name]
        if shape != tuple(model_shape) or dtype != model_dtype:
            raise CheckpointError(f"tensor {_shown(name)} is {list(shape)} {dtype}, the model's is {list(model_shape)} {model_dtype}")


def _names(names: list[str]) -> str:
    return ", ".join(_shown(name) for name in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def manifest(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a model's tensors (a state_dict), what a checkpoint's must match."""
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}


def _shown(value: Any) -> str:
    """A value from a file, as a bounded one-line repr for an error message."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def read_record(json_path: Path) -> dict[str, Any]:
    """A checkpoint's JSON record, its schema checked: the round, and the files it names with their hashes."""
    try:
        record = json.loads(bytes(read_plain_file(json_path, MAX_RECORD_BYTES)))
    except (UnicodeDecodeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{json_path}: is not JSON (a damaged or altered record)") from None
    try:
        if not isinstance(record, dict):
            raise CheckpointError("is not a JSON object")
        if not _whole(record.get("round"), MAX_ROUND) or record["round"] < 1:
            raise CheckpointError(f"round is {_shown(record.get('round'))}, not a whole number from 1 to {MAX_ROUND}")
        _file_in(json_path.parent, record, "weights")
        if "optimizer" in record:
            _file_in(json_path.parent, record, "optimizer")
    except CheckpointError as error:
        raise CheckpointError(f"{json_path}: {error}") from None
    return record


def read_run_record(json_path: Path) -> dict[str, Any]:
    """A leader's checkpoint record: read_record's checks, plus the run's fields (its config, classes and metrics)."""
    record = read_record(json_path)
    config, metrics = record.get("config"), record.get("metrics")
    problem = None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str) or not isinstance(config.get("task"), (str, type(None))):
        problem = "config is not a run's settings (with its model and task)"
    elif not _whole(record.get("num_classes"), MAX_CLASSES):
        problem = f"num_classes is {_shown(record.get('num_classes'))}, not a whole number from 0 to {MAX_CLASSES}"
    elif not isinstance(metrics, dict) or metrics.get("round", record["round"]) != record["round"]:
        problem = f"metrics is not round {record['round']}'s record"
    if problem:
        raise CheckpointError(f"{json_path}: {problem}")
    return record


def _read_tensors(
    json_path: Path, record: Mapping[str, Any], key: str, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None, exact: bool
) -> dict[str, torch.Tensor]:
    """The tensors in the file `record[key]` names: a plain file of the folder, its hash and every tensor checked."""
    path = _file_in(json_path.parent, record, key)
    limit = (
        MAX_HEADER_BYTES
        + 8
        + (sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected.values()) if expected else MAX_TENSOR_FILE_BYTES)
    )
    data = read_plain_file(path, limit)
    try:
        _check_hash(data, record, key, path)
        return parse_safetensors(data, expected, exact)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


def load(
    json_path: Path, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's record and weights, every part checked (`expected`: the model's manifest, which they must match).

    Nothing is returned unless all checks pass; any failure raises CheckpointError in one line naming the file.
    """
    record = read_record(json_path)
    return record, _read_tensors(json_path, record, "weights", expected, exact=True)


def load_run(
    json_path: Path,
    record: Mapping[str, Any],
    model_manifest: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    optimizer_manifest: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """What a leader resumes from: weights, optimizer tensors and noised rounds, all checked before any is returned.

    Every noised model made before the stop spent privacy, the rounds after this checkpoint included.
    """
    _, weights = load(json_path, model_manifest)
    optimizer = load_optimizer(json_path, record, optimizer_manifest)
    return weights, optimizer, max(record["round"], privacy_spent(json_path.parent))


def load_into(model: torch.nn.Module, json_path: Path) -> dict[str, Any]:
    """Load a checkpoint's weights into `model` once they all pass the checks; returns the record."""
    record, weights = load(json_path, manifest(model.state_dict()))
    model.load_state_dict(weights)
    return record


def load_optimizer(
    json_path: Path, record: Mapping[str, Any], allowed: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None
) -> dict[str, torch.Tensor]:
    """The optimizer tensors saved with a checkpoint (empty if none were), each one of `allowed` where given."""
    if "optimizer" not in record:
        return {}
    return _read_tensors(json_path, record, "optimizer", allowed, exact=False)


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
    if not os.path.lexists(path):
        return 0
    try:
        rounds = json.loads(bytes(read_plain_file(path, MAX_RECORD_BYTES)))["noised_rounds"]
    except CheckpointError:
        raise
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
