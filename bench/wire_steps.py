"""Where the wire paths spend their time: each step of sending and receiving a model (the 45 MB ResNet-18), timed alone.

python -m bench.wire_steps
python -m bench.wire_steps --model resnet20 --repeats 200   # a model of many small tensors
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable

import torch

from fedgrpc.algorithms import aggregation
from fedgrpc.model import build_model
from fedgrpc.protos import leader_pb2
from fedgrpc.transport import wire

REPEATS = 5


def timed(repeats: int, name: str, call: Callable[[], object]) -> object:
    """Print the median milliseconds of `call` over `repeats` runs after a warm-up; return its last result."""
    result = call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - start)
    print(f"| {name} | {1000 * statistics.median(seconds):.1f} |")
    return result


def main() -> None:
    """Time every step on one thread."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="the model whose state is moved")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per step, after one warm-up")
    args = parser.parse_args()
    repeats = args.repeats
    torch.set_num_threads(1)
    state = build_model(args.model, 10).state_dict()
    specs = wire.specs_of(state)
    manifest, payload = wire.encode(state)
    deserialize = wire.chunk_deserializer(leader_pb2.ModelChunk)
    print(f"# Steps of moving {args.model} ({len(payload) / 1e6:.1f} MB), one thread, median of {repeats} after a warm-up")
    print()
    print("| step | ms |")
    print("|---|---|")
    timed(repeats, "encode the state dict into one flat buffer", lambda: wire.encode(state))
    messages = timed(
        repeats, "frame it as 1 MiB protobuf messages", lambda: list(wire.stream(leader_pb2.ModelChunk, manifest, payload, round=1))
    )
    serialized = timed(
        repeats, "serialize the messages (gRPC does this per call)", lambda: [message.SerializeToString() for message in messages]
    )
    timed(
        repeats,
        "frame and serialize in one step with wire.frames (what the senders do now)",
        lambda: list(wire.frames(leader_pb2.ModelChunk, manifest, payload, round=1)),
    )
    parsed = timed(repeats, "parse them (the receiving side)", lambda: [leader_pb2.ModelChunk.FromString(data) for data in serialized])
    viewed = timed(
        repeats,
        "parse them with wire.chunk_deserializer (bare chunks viewed, not copied)",
        lambda: [deserialize(data) for data in serialized],
    )
    timed(
        repeats,
        "receive: reassemble and check, without the finite check",
        lambda: wire.receive(iter(parsed), len(payload), specs, require_finite=False),
    )
    timed(repeats, "receive with the finite check (which yields the norms)", lambda: wire.receive(iter(parsed), len(payload), specs))
    pool = wire.BufferPool(len(payload), keep=1)

    def receive_viewed_into_reused_buffer() -> None:
        pool.give(wire.receive(iter(viewed), len(payload), specs, allocate=pool.take).payload)

    timed(repeats, "receive viewed chunks into a reused buffer, with the finite check", receive_viewed_into_reused_buffer)
    tensors = wire.decode(specs, payload, require_finite=False)
    floats = [tensor for tensor in tensors.values() if tensor.is_floating_point()]
    timed(repeats, "old finite check: torch.isfinite(t).all() per tensor", lambda: all(bool(torch.isfinite(t).all()) for t in floats))
    timed(repeats, "old norm: t.double().square().sum() per tensor", lambda: sum(float(t.double().square().sum()) for t in floats))
    timed(
        repeats, "earlier norms: torch._foreach_norm accumulating in float64", lambda: torch._foreach_norm(floats, 2, dtype=torch.float64)
    )
    timed(repeats, "old duplicate check: BLAKE2b of the payload", lambda: hashlib.blake2b(payload, digest_size=16).digest())
    running = aggregation.RunningMean()
    timed(repeats, "add to the float64 running sum (buffers reused)", lambda: running.reset().add(tensors, 1.0))
    timed(
        repeats,
        "fresh float64 sum buffers (the old per-round cost)",
        lambda: {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in tensors.items()},
    )


if __name__ == "__main__":
    main()
