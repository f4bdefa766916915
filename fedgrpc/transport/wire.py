"""Tensor wire format: named tensors as a plain manifest plus raw bytes, chunked and checked."""

from __future__ import annotations

import hashlib
import itertools
import math
import mmap
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedgrpc.console import printable
from fedgrpc.protos import tensors_pb2

# 1 MiB chunks: gRPC Python moves about 1.3x more MB/s with them than with 64 KiB
# or 4 MiB chunks over loopback.
CHUNK_BYTES = 1 << 20
# Largest chunk a receiver accepts; senders of other implementations may use up to this.
MAX_CHUNK_BYTES = 4 << 20
# gRPC per-message cap: a full chunk plus room for a manifest of a few thousand tensors.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (2 << 20)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# Room beyond its manifest and one chunk that a stream's first message may take (round, counts, loss, a stop reason).
HEADER_SLACK_BYTES = 64 << 10
# Most dimensions torch gives a tensor; a shape's non-zero sizes multiply below 2**63 so that its strides fit in int64.
MAX_DIMS = 64
# Characters of a received tensor name that a refusal shows.
MAX_SHOWN_NAME_CHARS = 80

# `bytes chunk = 1` in every chunked message: field 1, length-delimited, so its tag is one byte
CHUNK_TAG = 0x0A
# Longest length prefix protobuf (upb) reads: a length below 2**32 takes 5 bytes, and a longer, padded one is refused.
VARINT_MAX_BYTES = 5
_CHUNK_KEY = bytes([CHUNK_TAG])

if sys.byteorder != "little":  # the payload is little-endian and read as native memory
    raise ImportError("the tensor wire format needs a little-endian machine")


class WireError(ValueError):
    """A received payload does not match what the receiver expects; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype name and shape of one tensor in a payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Entries of the tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's raw bytes."""
        return self.numel * DTYPES[self.dtype].itemsize


def shape_problem(shape: Sequence[int]) -> str | None:
    """Why no tensor can take this shape (a negative size, too many dimensions, strides past int64), or None.

    A zero-size tensor needs no bytes, so only this check stands between its declared shape and torch.
    """
    if len(shape) > MAX_DIMS:
        return f"{len(shape)} dimensions, more than the {MAX_DIMS} a tensor may have"
    if any(dim < 0 for dim in shape):
        return f"a negative dimension {list(shape)}"
    if math.prod(max(dim, 1) for dim in shape) >= 2**63:
        return f"dimensions {list(shape)} whose non-zero sizes multiply past 2**63"
    return None


def payload_bytes(specs: Sequence[TensorSpec]) -> int:
    """Size of the flat payload that holds tensors of these specs."""
    return sum(spec.nbytes for spec in specs)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """Describe tensors (in mapping order) as wire specs."""
    return [TensorSpec(name, DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]


def fingerprint(specs: Sequence[TensorSpec]) -> str:
    """SHA-256 over names, dtypes and shapes: equal for two models exactly when their wire layouts match."""
    text = ";".join(f"{spec.name}:{spec.dtype}:{','.join(map(str, spec.shape))}" for spec in specs)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_message(spec: TensorSpec) -> tensors_pb2.TensorSpec:
    """One spec as its proto message."""
    return tensors_pb2.TensorSpec(name=spec.name, dtype=spec.dtype, shape=spec.shape)


def manifest_of(specs: Sequence[TensorSpec]) -> tensors_pb2.TensorManifest:
    """The manifest that describes tensors of these specs."""
    manifest = tensors_pb2.TensorManifest(total_bytes=payload_bytes(specs))
    for spec in specs:
        manifest.tensors.add(name=spec.name, dtype=spec.dtype, shape=spec.shape)
    return manifest


def first_message_limit(specs: Sequence[TensorSpec]) -> int:
    """Most bytes the first message of a stream of these specs may take: their manifest, one chunk and a header."""
    return manifest_of(specs).ByteSize() + MAX_CHUNK_BYTES + HEADER_SLACK_BYTES


def lazy_buffer(size: int) -> mmap.mmap:
    """A zeroed writable buffer whose memory is committed page by page as it is written, not when it is made.

    For payloads whose size a peer declared: a stream that declares a large payload and sends little costs
    the receiver what it sent, not what it declared.
    """
    return bytearray() if size == 0 else mmap.mmap(-1, size)


def encode(
    tensors: Mapping[str, torch.Tensor],
    allocate: Callable[[int], bytearray] = bytearray,
) -> tuple[tensors_pb2.TensorManifest, bytearray]:
    """Pack tensors into one flat little-endian buffer with the manifest describing it.

    `allocate` gives the buffer (a BufferPool's take reuses one); every byte of it is written.
    """
    specs = specs_of(tensors)
    total = payload_bytes(specs)
    payload = allocate(total)
    offset = 0
    for spec, tensor in zip(specs, tensors.values(), strict=False):
        if spec.nbytes:
            view = torch.frombuffer(payload, dtype=tensor.dtype, count=tensor.numel(), offset=offset)
            view.view(tensor.shape).copy_(tensor.detach())  # one copy, from any device
        offset += spec.nbytes
    return manifest_of(specs), payload


def iter_chunks(payload: bytes | bytearray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Slice a payload into chunks; an empty payload yields one empty chunk."""
    view = memoryview(payload)
    if not view.nbytes:
        yield b""
        return
    for start in range(0, view.nbytes, chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


def read_manifest(manifest: tensors_pb2.TensorManifest) -> list[TensorSpec]:
    """Check a manifest's structure (known dtypes, unique names, sizes that add up); return its specs."""
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for entry in manifest.tensors:
        name = printable(entry.name, MAX_SHOWN_NAME_CHARS)  # as a refusal shows it
        if entry.dtype not in DTYPES:
            raise WireError(f"tensor {name!r} has unknown dtype {printable(entry.dtype, MAX_SHOWN_NAME_CHARS)!r}")
        if entry.name in seen:
            raise WireError(f"tensor {name!r} appears twice in the manifest")
        problem = shape_problem(entry.shape)
        if problem is not None:
            raise WireError(f"tensor {name!r} has {problem}")
        seen.add(entry.name)
        specs.append(TensorSpec(entry.name, entry.dtype, tuple(entry.shape)))
    total = payload_bytes(specs)
    if total != manifest.total_bytes:
        raise WireError(f"manifest says {manifest.total_bytes} bytes but its tensors need {total}")
    return specs


def check_specs(received: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    """Require the received specs to name, type and shape exactly the expected tensors."""
    want = {spec.name: spec for spec in expected}
    got = {spec.name: spec for spec in received}
    missing = [name for name in want if name not in got]
    if missing:
        raise WireError(f"missing tensors: {_some_names(missing)}")
    unexpected = [name for name in got if name not in want]
    if unexpected:
        raise WireError(f"unexpected tensors: {_some_names(unexpected)}")
    for name, spec in got.items():
        if spec.dtype != want[name].dtype:
            raise WireError(f"tensor {name!r} has dtype {spec.dtype}, expected {want[name].dtype}")
        if spec.shape != want[name].shape:
            raise WireError(f"tensor {name!r} has shape {list(spec.shape)}, expected {list(want[name].shape)}")


def _some_names(names: Sequence[str]) -> str:
    """The first five tensor names, for a one-line message: a peer's names may hold newlines or run to megabytes."""
    return ", ".join(printable(name, MAX_SHOWN_NAME_CHARS) for name in names[:5]) + (" ..." if len(names) > 5 else "")


def decode(specs: Sequence[TensorSpec], payload: bytearray, require_finite: bool = True) -> dict[str, torch.Tensor]:
    """View a complete payload as tensors (zero-copy), refusing NaN or infinite values."""
    decoder = _Decoder(specs, payload, require_finite)
    decoder.upto(len(payload))
    return decoder.tensors


class _Decoder:
    """Views a payload as its tensors one at a time, as soon as each tensor's bytes are all in, checking each.

    A receiver calls upto() after every chunk, so the checks of the first tensors run while gRPC is still
    receiving the rest (torch releases the GIL while it computes).
    """

    def __init__(self, specs: Sequence[TensorSpec], payload: bytearray, require_finite: bool) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.norms: dict[str, float] = {}  # L2 norm of each float tensor when values are checked (the check computes it)
        self._specs = specs
        self._payload = payload
        self._require_finite = require_finite
        self._next = 0
        self._offset = 0

    def upto(self, filled: int) -> None:
        """View and check every tensor not yet done whose bytes lie within the first `filled` bytes."""
        to_check: dict[str, torch.Tensor] = {}
        while self._next < len(self._specs) and self._offset + self._specs[self._next].nbytes <= filled:
            spec = self._specs[self._next]
            dtype = DTYPES[spec.dtype]
            count = math.prod(spec.shape)
            if count:
                tensor = torch.frombuffer(self._payload, dtype=dtype, count=count, offset=self._offset).view(spec.shape)
            else:
                tensor = torch.empty(spec.shape, dtype=dtype)
            if self._require_finite and dtype.is_floating_point:
                to_check[spec.name] = tensor
            self.tensors[spec.name] = tensor
            self._offset += spec.nbytes
            self._next += 1
        if to_check:
            self.norms.update(_finite_norms(to_check))


def _finite_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's L2 norm, raising WireError when a value is NaN or infinite; one pass, no mask as large as a tensor.

    The norms of all the tensors are computed by one call per dtype: a model has many small tensors, and
    per-tensor calls cost more than the arithmetic. They accumulate in float32 (float64 tensors in
    float64), which on a CPU is over ten times faster than accumulating float32 values in float64: the
    mixed-dtype path is not vectorized. A NaN or infinity makes its tensor's norm NaN or infinite. So
    can a finite tensor whose squares overflow float32 (values beyond about 1e19); a non-finite norm is
    therefore confirmed against the values, and a finite tensor's norm recomputed in float64.
    """
    norms: dict[str, float] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, tensor in tensors.items():
        by_dtype.setdefault(tensor.dtype, []).append(name)
    for dtype, names in by_dtype.items():
        accumulate = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
        values = torch.stack(torch._foreach_norm([tensors[name] for name in names], 2, dtype=accumulate)).tolist()
        norms.update(zip(names, values, strict=False))
    for name, norm in norms.items():
        if not math.isfinite(norm):
            if not bool(torch.isfinite(tensors[name]).all()):
                raise WireError(f"tensor {name!r} holds NaN or infinite values")
            norms[name] = float(torch.linalg.vector_norm(tensors[name], dtype=torch.float64))
    return {name: norms[name] for name in tensors}


class ChunkOnly:
    """A received chunk message that holds nothing but its bytes, as a view into the buffer gRPC received."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: memoryview) -> None:
        self.chunk = chunk

    @staticmethod
    def HasField(name: str) -> bool:  # noqa: N802 - the protobuf message method it stands in for
        return False


class Oversized:
    """A received message that was not parsed: larger than the receiver's limit for a message with a manifest."""

    __slots__ = ("size", "limit")

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit

    @staticmethod
    def HasField(name: str) -> bool:  # noqa: N802 - the protobuf message method it stands in for
        return False


def chunk_deserializer(message_type: type, limit: int | Callable[[], int] | None = None) -> Callable[[bytes], Any]:
    """gRPC deserializer for a chunked message type that skips protobuf's copy of bare chunks.

    A message with only its `chunk` field set is the chunk tag, a varint length and the bytes: every
    message of a stream after the first. Such a message becomes a ChunkOnly viewing the received buffer;
    any other (the first, with the manifest, or anything unexpected) goes through protobuf as usual,
    unless it is larger than `limit` bytes (a number, or a function giving the receiver's current one,
    e.g. first_message_limit of its model): then it becomes an Oversized, unparsed, so that a manifest
    far larger than the receiver's own never costs it the memory of parsing it. `receive` refuses it.
    """
    parse = message_type.FromString

    def deserialize(data: bytes) -> Any:
        if len(data) > 1 and data[0] == CHUNK_TAG:
            length, shift = 0, 0
            for position in range(1, min(len(data), 1 + VARINT_MAX_BYTES)):
                byte = data[position]
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    if position + 1 + length == len(data):
                        return ChunkOnly(memoryview(data)[position + 1 :])
                    break
        most = limit() if callable(limit) else limit
        if most is not None and len(data) > most:
            return Oversized(len(data), most)
        return parse(data)

    return deserialize


class BufferPool:
    """Payload buffers of one size, kept for reuse: the first write to a fresh 45 MB buffer costs 20-25 ms of page faults."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    @property
    def kept(self) -> int:
        """Buffers waiting to be taken again."""
        with self._lock:
            return len(self._free)

    def take(self, size: int) -> bytearray:
        """A buffer of `size` bytes: a kept one when the size is this pool's, else a new one. Its old contents remain."""
        if size == self.size:
            with self._lock:
                if self._free:
                    return self._free.pop()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        """Keep a buffer nobody references any more for a later take."""
        if len(buffer) == self.size:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buffer)


@dataclass
class Received:
    """A complete, checked payload: the stream's first message, its tensors and their raw bytes."""

    header: Any
    tensors: dict[str, torch.Tensor]
    payload: bytearray
    norms: dict[str, float]  # L2 norm of each float tensor, from the finite check (empty without it)


def receive(
    messages: Iterable[Any],
    max_bytes: int,
    expected: Sequence[TensorSpec] | None = None,
    check_header: Callable[[Any], None] | None = None,
    require_finite: bool = True,
    allocate: Callable[[int], bytearray] = lazy_buffer,
) -> Received:
    """Assemble a chunked stream whose first message carries the manifest.

    Refuses (WireError) before allocating anything when the manifest is malformed,
    too large or does not match `expected`; as soon as a tensor whose bytes are
    all in holds a NaN or infinity; and after the stream ends when the bytes do not
    add up. `check_header` sees the first message before any bulk bytes are read
    and may raise to refuse it. `allocate` gives the payload buffer (a BufferPool's
    take reuses one); every byte of it is written. By default its memory is committed
    as bytes arrive (lazy_buffer), so a declared size costs nothing until it is sent.
    """
    iterator = iter(messages)
    first = next(iterator, None)
    if first is None:
        raise WireError("empty stream: expected a manifest and tensor bytes")
    if isinstance(first, Oversized):
        raise WireError(f"first message of {first.size} bytes exceeds the {first.limit} bytes its manifest, a chunk and a header take")
    if not first.HasField("manifest"):
        raise WireError("the first message carries no tensor manifest; payloads are raw tensor bytes, never pickles")
    specs = read_manifest(first.manifest)
    if expected is not None:
        check_specs(specs, expected)
    if first.manifest.total_bytes > max_bytes:
        raise WireError(f"payload of {first.manifest.total_bytes} bytes exceeds the {max_bytes}-byte limit")
    if check_header is not None:
        check_header(first)
    total = first.manifest.total_bytes
    payload = allocate(total)
    decoder = _Decoder(specs, payload, require_finite)
    filled = 0
    for index, message in enumerate(itertools.chain([first], iterator)):
        if isinstance(message, Oversized) or (index and message.HasField("manifest")):
            raise WireError("only the first message may carry a manifest")
        chunk = message.chunk
        if len(chunk) > MAX_CHUNK_BYTES:
            raise WireError(f"chunk of {len(chunk)} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
        if filled + len(chunk) > total:
            raise WireError(f"payload is longer than the {total} bytes its manifest declares")
        payload[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
        decoder.upto(filled)
    if filled != total:
        raise WireError(f"truncated payload: received {filled} of {total} bytes")
    return Received(first, decoder.tensors, payload, decoder.norms)


def stream(
    message_type: type,
    manifest: tensors_pb2.TensorManifest,
    payload: bytes | bytearray,
    chunk_bytes: int = CHUNK_BYTES,
    **header: Any,
) -> Iterator[Any]:
    """Yield messages of `message_type`: the first with manifest and header fields, then bare chunks."""
    for index, chunk in enumerate(iter_chunks(payload, chunk_bytes)):
        if index == 0:
            yield message_type(chunk=chunk, manifest=manifest, **header)
        else:
            yield message_type(chunk=chunk)


def frames(
    message_type: type,
    manifest: tensors_pb2.TensorManifest,
    payload: bytes | bytearray,
    chunk_bytes: int = CHUNK_BYTES,
    **header: Any,
) -> Iterator[bytes]:
    """`stream`'s messages, already serialized, for a gRPC call whose serializer is `serialize`.

    The first goes through protobuf; every bare chunk after it is framed directly as the chunk field's
    tag, the chunk's length and its bytes: one copy of the payload, where building a message and then
    serializing it copies it twice. The bytes are those protobuf would produce.
    """
    view = memoryview(payload)
    for start in range(0, max(view.nbytes, 1), chunk_bytes):
        chunk = view[start : start + chunk_bytes]
        if start == 0:
            yield message_type(chunk=bytes(chunk), manifest=manifest, **header).SerializeToString()
        else:
            yield b"".join((_CHUNK_KEY, _varint(chunk.nbytes), chunk))


def serialize(message: Any) -> bytes:
    """gRPC serializer for chunked streams: frames from `frames` are sent as they are, messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _varint(value: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer, low bits first."""
    encoded = bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)
