"""Update compression on the wire: fp16, int8 quantization and top-k sparsification with error feedback."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import torch

from fedgrpc.config.choices import COMPRESSION_MODES as MODES
from fedgrpc.transport import wire

# Symmetric int8 quantization uses levels -127..127 only, so that x and -x quantize to mirror images;
# -128 is never produced and a payload holding it is refused.
INT8_LEVELS = 127
INT8_WIRE_DTYPE = "int8"
SCALE_DTYPE = "float32"
SCALE_SHAPE = (1,)
# int32 indices: 8 bytes per kept entry instead of 12 with int64; every tensor of a real model has
# far fewer than 2**31 elements, and wire_specs refuses one that does not.
INDEX_DTYPE = "int32"
MAX_INDEXED_NUMEL = 2**31 - 1
VALUE_DTYPE = "float32"

SCALE_SUFFIX = ".scale"
INDICES_SUFFIX = ".indices"
VALUES_SUFFIX = ".values"


def wire_specs(
    specs: Sequence[wire.TensorSpec],
    mode: str,
    topk_ratio: float = 0.01,
    sparse_names: Collection[str] | None = None,
) -> list[wire.TensorSpec]:
    """The specs of the compressed payload for an update of these specs, in payload order."""
    _check_mode(mode, topk_ratio)
    out: list[wire.TensorSpec] = []
    for spec in specs:
        out.extend(_compressed_specs(spec, mode, topk_ratio, sparse_names))
    clashes = [name for name, count in Counter(spec.name for spec in out).items() if count > 1]
    if clashes:
        raise ValueError(f"{mode} compression would give two tensors the same name: {', '.join(clashes[:5])}")
    return out


def compressed_bytes(
    specs: Sequence[wire.TensorSpec],
    mode: str,
    topk_ratio: float = 0.01,
    sparse_names: Collection[str] | None = None,
) -> int:
    """Bytes of the compressed payload for an update of these specs."""
    return wire.payload_bytes(wire_specs(specs, mode, topk_ratio, sparse_names))


def compress(
    update: Mapping[str, torch.Tensor],
    mode: str,
    topk_ratio: float = 0.01,
    sparse_names: Collection[str] | None = None,
    residual: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Compress an update into the tensors `wire_specs` describes, in that order.

    `residual` (topk only) is the sender's error-feedback memory, kept across rounds: each sparsified
    tensor is added to its residual before the k largest magnitudes are chosen, and what was not sent
    stays in the residual (entries are created on first use and updated in place).
    """
    specs = wire.specs_of(update)
    wire_specs(specs, mode, topk_ratio, sparse_names)  # refuses bad modes, ratios and name clashes up front
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        tensor = update[spec.name].detach()
        if not _compressible(spec, mode, sparse_names):
            out[spec.name] = tensor
        elif mode == "fp16":
            out[spec.name] = _to_fp16(spec.name, tensor)
        elif mode == "int8":
            out[spec.name], out[spec.name + SCALE_SUFFIX] = quantize_int8(spec.name, tensor)
        else:
            k = topk_count(math.prod(spec.shape), topk_ratio)
            out[spec.name + INDICES_SUFFIX], out[spec.name + VALUES_SUFFIX] = _sparsify(spec.name, tensor, k, residual)
    return out


def decompress(tensors: Mapping[str, torch.Tensor], specs: Sequence[wire.TensorSpec], mode: str) -> dict[str, torch.Tensor]:
    """Rebuild a dense update with exactly `specs` from received compressed tensors, refusing malformed ones (ValueError).

    Top-k's k is read from the payload (the leader's wire.receive already held it to wire_specs); here
    indices must be unique and in range, scales finite and non-negative, and nothing may be left over.
    """
    if mode not in MODES:
        raise ValueError(f"unknown compression mode {mode!r}; expected one of {', '.join(MODES)}")
    taken: set[str] = set()

    def take(name: str, dtype: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"compressed update lacks tensor {name!r}")
        if tensor.dtype != wire.DTYPES[dtype]:
            raise ValueError(f"tensor {name!r} has dtype {wire.DTYPE_NAMES.get(tensor.dtype, tensor.dtype)}, expected {dtype}")
        if shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        taken.add(name)
        return tensor

    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        dtype = wire.DTYPES[spec.dtype]
        # which float tensors were sparsified is visible from the payload, so decompress needs no sparse_names
        sparse = mode == "topk" and spec.name + INDICES_SUFFIX in tensors
        if not _compressible(spec, mode, None) or (mode == "topk" and not sparse):
            out[spec.name] = take(spec.name, spec.dtype, spec.shape)
        elif mode == "fp16":
            out[spec.name] = take(spec.name, "float16", spec.shape).to(dtype)
        elif mode == "int8":
            stored = take(spec.name, INT8_WIRE_DTYPE, spec.shape)
            scale = take(spec.name + SCALE_SUFFIX, SCALE_DTYPE, SCALE_SHAPE)
            out[spec.name] = dequantize_int8(spec.name, stored, scale).to(dtype)
        else:
            indices = take(spec.name + INDICES_SUFFIX, INDEX_DTYPE, None)
            values = take(spec.name + VALUES_SUFFIX, VALUE_DTYPE, None)
            out[spec.name] = densify(spec.name, indices, values, spec.shape).to(dtype)
    leftover = [name for name in tensors if name not in taken]
    if leftover:
        raise ValueError(f"unexpected tensors in compressed update: {', '.join(leftover[:5])}" + (" ..." if len(leftover) > 5 else ""))
    return out


def topk_count(numel: int, topk_ratio: float) -> int:
    """Entries top-k keeps of a tensor with `numel` (> 0) elements: ceil(ratio * numel), at least 1."""
    return min(numel, max(1, math.ceil(topk_ratio * numel)))


def quantize_int8(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor symmetric int8: (int8 levels, float32 scale of shape (1,)) with scale = max|x| / 127.

    Levels are x / scale rounded to nearest, ties to even (torch.round). An all-zero tensor gets scale 0
    and levels 0, without dividing by zero; it dequantizes to exact zeros.
    """
    source = tensor.float()
    peak = float(source.abs().max())
    if not math.isfinite(peak):
        raise ValueError(f"tensor {name!r} holds NaN or infinite values; int8 cannot quantize it")
    scale = torch.tensor([peak / INT8_LEVELS], dtype=torch.float32, device=tensor.device)
    if peak == 0.0:
        levels = torch.zeros(tensor.shape, dtype=torch.int8, device=tensor.device)
    else:
        # clamp: x / scale can exceed 127 by an ulp because scale itself was rounded to float32
        levels = torch.round(source / scale).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return levels, scale


def dequantize_int8(name: str, stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 values from int8 levels and their scale, refusing a bad scale or level -128."""
    value = float(scale.reshape(-1)[0])
    # a scale so large that 127 * scale overflows float32 could only come from a broken or hostile sender
    if not (math.isfinite(value) and 0.0 <= value and value * INT8_LEVELS <= torch.finfo(torch.float32).max):
        raise ValueError(f"tensor {name!r} has int8 scale {value}, expected a finite value >= 0")
    levels = stored
    if bool((levels == -INT8_LEVELS - 1).any()):
        raise ValueError(f"tensor {name!r} holds int8 level -128, outside the symmetric range -127..127")
    return levels.float() * value


def densify(name: str, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A dense float32 tensor of `shape`, zero except `values` at flat `indices`, refusing bad indices."""
    numel = math.prod(shape)
    if indices.dim() != 1 or values.dim() != 1 or len(indices) != len(values):
        raise ValueError(f"tensor {name!r}: top-k indices {list(indices.shape)} and values {list(values.shape)} must be 1-D of one length")
    if not 0 < len(indices) <= numel:
        raise ValueError(f"tensor {name!r}: {len(indices)} top-k entries for a tensor of {numel} elements")
    ordered = indices.sort().values
    if int(ordered[0]) < 0 or int(ordered[-1]) >= numel:
        raise ValueError(f"tensor {name!r}: top-k index out of range [0, {numel})")
    if bool((ordered[1:] == ordered[:-1]).any()):
        raise ValueError(f"tensor {name!r}: top-k indices repeat")
    dense = torch.zeros(numel, dtype=torch.float32, device=values.device)
    dense[indices.long()] = values
    return dense.view(shape)


def _check_mode(mode: str, topk_ratio: float) -> None:
    """Refuse an unknown mode, or a top-k ratio outside (0, 1]."""
    if mode not in MODES:
        raise ValueError(f"unknown compression mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "topk" and not 0.0 < topk_ratio <= 1.0:
        raise ValueError(f"top-k ratio must be in (0, 1], got {topk_ratio}")


def _compressible(spec: wire.TensorSpec, mode: str, sparse_names: Collection[str] | None) -> bool:
    """Whether `mode` rewrites this tensor: non-empty float tensors only, and for topk only those in sparse_names."""
    if mode == "none" or not wire.DTYPES[spec.dtype].is_floating_point or math.prod(spec.shape) == 0:
        return False
    # buffers (BatchNorm statistics) are values, not deltas: zeroing most of them would corrupt them
    return mode != "topk" or sparse_names is None or spec.name in sparse_names


def _compressed_specs(spec: wire.TensorSpec, mode: str, topk_ratio: float, sparse_names: Collection[str] | None) -> list[wire.TensorSpec]:
    """What one tensor becomes on the wire."""
    if not _compressible(spec, mode, sparse_names):
        return [spec]
    if mode == "fp16":
        return [wire.TensorSpec(spec.name, "float16", spec.shape)]
    if mode == "int8":
        return [
            wire.TensorSpec(spec.name, INT8_WIRE_DTYPE, spec.shape),
            wire.TensorSpec(spec.name + SCALE_SUFFIX, SCALE_DTYPE, SCALE_SHAPE),
        ]
    numel = math.prod(spec.shape)
    if numel > MAX_INDEXED_NUMEL:
        raise ValueError(f"tensor {spec.name!r} has {numel} elements, more than {INDEX_DTYPE} indices can address")
    k = topk_count(numel, topk_ratio)
    return [
        wire.TensorSpec(spec.name + INDICES_SUFFIX, INDEX_DTYPE, (k,)),
        wire.TensorSpec(spec.name + VALUES_SUFFIX, VALUE_DTYPE, (k,)),
    ]


def _to_fp16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float16, refusing values beyond float16's range (they would become infinities)."""
    half = tensor.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise ValueError(f"tensor {name!r} holds values that float16 cannot represent (|x| > 65504, NaN or infinite)")
    return half


def _sparsify(name: str, tensor: torch.Tensor, k: int, residual: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 flat indices in ascending order, float32 values) of the k largest magnitudes, with error feedback."""
    if residual is None:
        accumulated = tensor.reshape(-1)
    else:
        memory = residual.get(name)
        if memory is None:
            memory = residual[name] = tensor.clone(memory_format=torch.contiguous_format)  # view(-1) below needs it
        elif memory.shape != tensor.shape:
            raise ValueError(f"residual for {name!r} has shape {list(memory.shape)}, the update {list(tensor.shape)}")
        else:
            memory.add_(tensor)
        accumulated = memory.view(-1)
    # ascending indices: one payload for one selection whatever order topk returned, and a sequential scatter
    indices = torch.topk(accumulated.abs(), k, sorted=False).indices.sort().values
    values = accumulated[indices].to(torch.float32)  # advanced indexing copies, so the zeroing below keeps them
    if residual is not None:
        accumulated[indices] = 0  # what was sent leaves the memory; the rest waits for later rounds
    return indices.to(torch.int32), values
