"""Where the wire paths spend their time: each step of sending and receiving the 45 MB ResNet-18, timed alone.

    python -m bench.wire_steps
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable

import torch

import aggregation
import wire
from model import build_model
from protos import leader_pb2

REPEATS = 5


def timed(name: str, call: Callable[[], object]) -> object:
    """Print the median milliseconds of `call` over REPEATS runs after a warm-up; return its last result."""
    result = call()
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - start)
    print(f"| {name} | {1000 * statistics.median(seconds):.1f} |")
    return result


def main() -> None:
    """Time every step on one thread."""
    torch.set_num_threads(1)
    state = build_model("resnet18", 10).state_dict()
    specs = wire.specs_of(state)
    manifest, payload = wire.encode(state)
    deserialize = wire.chunk_deserializer(leader_pb2.ModelChunk)
    print(f"# Steps of moving resnet18 ({len(payload) / 1e6:.1f} MB), one thread, median of {REPEATS} after a warm-up")
    print()
    print("| step | ms |")
    print("|---|---|")
    timed("encode the state dict into one flat buffer", lambda: wire.encode(state))
    messages = timed("frame it as 1 MiB protobuf messages", lambda: list(wire.stream(leader_pb2.ModelChunk, manifest, payload, round=1)))
    serialized = timed("serialize the messages (gRPC does this per call)", lambda: [message.SerializeToString() for message in messages])
    parsed = timed("parse them (the receiving side)", lambda: [leader_pb2.ModelChunk.FromString(data) for data in serialized])
    viewed = timed("parse them with wire.chunk_deserializer (bare chunks viewed, not copied)",
                   lambda: [deserialize(data) for data in serialized])
    timed("receive: reassemble and check, without the finite check", lambda: wire.receive(iter(parsed), len(payload), specs, require_finite=False))
    timed("receive with the finite check (which yields the norms)", lambda: wire.receive(iter(parsed), len(payload), specs))
    pool = wire.BufferPool(len(payload), keep=1)

    def receive_viewed_into_reused_buffer() -> None:
        pool.give(wire.receive(iter(viewed), len(payload), specs, allocate=pool.take).payload)

    timed("receive viewed chunks into a reused buffer, with the finite check", receive_viewed_into_reused_buffer)
    tensors = wire.decode(specs, payload, require_finite=False)
    floats = [tensor for tensor in tensors.values() if tensor.is_floating_point()]
    timed("old finite check: torch.isfinite(t).all() per tensor", lambda: all(bool(torch.isfinite(t).all()) for t in floats))
    timed("old norm: t.double().square().sum() per tensor", lambda: sum(float(t.double().square().sum()) for t in floats))
    timed("old duplicate check: BLAKE2b of the payload", lambda: hashlib.blake2b(payload, digest_size=16).digest())
    running = aggregation.RunningMean()
    timed("add to the float64 running sum (buffers reused)", lambda: running.reset().add(tensors, 1.0))
    timed("fresh float64 sum buffers (the old per-round cost)", lambda: {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in tensors.items()})


if __name__ == "__main__":
    main()
