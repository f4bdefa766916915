"""Wire throughput: the blog's 45 MB ResNet-18 through GetModel, SyncModelState and AccumulateGradients, against bare gRPC.

Each path moves the same payload in the same 1 MiB chunks as a bare gRPC stream of raw bytes (no protobuf
message around them, no checks) measured in the same run, so the ratio is what this system's framing,
checks and bookkeeping cost. Client and server share this process, as the bare stream's do.

The leader answers AccumulateGradients once an update is checked and adds it to the round's float64 sum
behind the answer. The call is timed to the answer, as the learner waits; a second row adds the wait for
that sum, which the round's close waits for, and which the next call here waits for before it starts.
The paths take turns, run after run, and each ratio is the median over runs of the path against the bare
stream of the same run, so that the machine's drift in speed between runs does not count as the path's.

    python -m bench.wire --runs 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import grpc
import torch

from bench import provenance
from fedgrpc.leader import main as leader_module
from fedgrpc.learner import main as learner_module
from fedgrpc.protos import leader_pb2
from fedgrpc.transport import rpc, wire

MODEL = "resnet18"  # the blog's model: 44.8 MB of float32 weights and buffers
DEFAULT_RUNS = 5
CALL_TIMEOUT_S = 120.0
BARE_SERVICE = "bench.Bare"


def bare_server(payload_size: int) -> tuple[grpc.Server, int]:
    """A server with two raw-bytes methods: Pull streams `payload_size` bytes out, Push takes a stream in."""
    outgoing = bytes(payload_size)

    def pull(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from wire.iter_chunks(outgoing)

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        receive_bytes(requests, payload_size)
        return b""

    handler = grpc.method_handlers_generic_handler(
        BARE_SERVICE,
        {
            "Pull": grpc.unary_stream_rpc_method_handler(pull),
            "Push": grpc.stream_unary_rpc_method_handler(push),
        },
    )
    server, port, _ = rpc.create_server(lambda server: server.add_generic_rpc_handlers((handler,)), "127.0.0.1", 0, max_workers=4)
    return server, port


def receive_bytes(chunks: Iterator[bytes], size: int) -> bytearray:
    """Copy a stream of raw chunks into one buffer, the least a receiver of the payload must do."""
    received = bytearray(size)
    filled = 0
    for chunk in chunks:
        received[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    return received


def timed(call: Callable[[], object], runs: int) -> list[float]:
    """Seconds of each of `runs` calls, after one warm-up call."""
    call()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def interleaved(
    paths: dict[str, Callable[[], object]], settles: dict[str, tuple[str, Callable[[], object]]], runs: int
) -> dict[str, list[float]]:
    """Seconds of each path's calls: one warm-up call of each, then `runs` rounds that call every path once in turn.

    A path named in `settles` (path -> (row, settle)) also gets that row: the call plus the settle() after it.
    Taking the paths in turn, run after run, exposes each to the same drift of the machine's speed, so the ratio
    of a path to the bare stream in the same round measures the path rather than the moment it ran in.
    """
    seconds: dict[str, list[float]] = {}
    for name, call in paths.items():
        call()
        seconds[name] = []
        if name in settles:
            row, settle = settles[name]
            settle()
            seconds[row] = []
    for _ in range(runs):
        for name, call in paths.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
            if name in settles:
                row, settle = settles[name]
                settle()
                seconds[row].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    """Measure every path and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed repetitions per path, after one warm-up")
    args = parser.parse_args()
    # torch keeps its default thread count, as leader.py and learner.py do with their default --threads 0

    with tempfile.TemporaryDirectory() as tmp:
        config = leader_module.LeaderConfig(
            host="127.0.0.1",
            port=0,
            dataset="synthetic",
            data_dir=None,
            model=MODEL,
            learners=2,
            device="cpu",
            run_dir=tmp,
            checkpoint_dir=f"{tmp}/checkpoints",
        )
        leader, leader_server, leader_port, _ = leader_module.serve(config)
        channel = rpc.channel(f"127.0.0.1:{leader_port}")
        stub = rpc.leader_stub(channel)  # as a learner reads GetModel
        learner_server, learner_port = None, None
        try:
            specs = leader.specs
            size = wire.payload_bytes(specs)
            update = {name: torch.full_like(tensor, 1e-3) for name, tensor in leader.model.state_dict().items()}
            update_manifest, update_payload = wire.encode(update)

            # a real learner server taking pushed models, as the leader pushes them
            learner = learner_module.Learner(learner_module.LearnerConfig(leader="127.0.0.1:1", device="cpu"))
            learner.specs = specs
            learner_server, learner_port, _ = learner_module.create_server(learner, "127.0.0.1", 0)

            # that learner took part in round 1: AccumulateGradients is timed on rounds the leader opens here
            info = leader_pb2.LearnerInfo(
                network_addr=f"127.0.0.1:{learner_port}", callback_token=learner.callback_token, version=rpc.PROTOCOL_VERSION
            )
            reply = stub.RegisterLearner(info, timeout=CALL_TIMEOUT_S)
            metadata = rpc.token_metadata(reply.session_token)
            rounds = iter(range(1, 1_000_000))

            def get_model() -> None:
                responses = stub.GetModel(leader_pb2.Empty(), timeout=CALL_TIMEOUT_S, metadata=metadata)
                wire.receive(responses, max_bytes=size, expected=specs)

            def accumulate() -> None:
                number = next(rounds)
                leader.open_round(number)
                messages = wire.frames(
                    leader_pb2.GradientData,
                    update_manifest,
                    update_payload,
                    learner_id=reply.learner_id,
                    round=number,
                    num_examples=1,
                    train_loss=1.0,
                )
                ack = stub.AccumulateGradients(messages, timeout=CALL_TIMEOUT_S, metadata=metadata)
                assert ack.success, ack.message

            learner_stub = rpc.learner_stub(rpc.channel(f"127.0.0.1:{learner_port}"))  # as the leader pushes

            published = leader.published()  # the leader frames each round's model once for every push

            def sync_model_state() -> None:
                ack = learner_stub.SyncModelState(
                    iter(published.frames), timeout=CALL_TIMEOUT_S, metadata=rpc.token_metadata(learner.callback_token)
                )
                assert ack.success, ack.message

            bare, bare_port = bare_server(size)
            bare_channel = rpc.channel(f"127.0.0.1:{bare_port}")
            pull = bare_channel.unary_stream(f"/{BARE_SERVICE}/Pull")
            push = bare_channel.stream_unary(f"/{BARE_SERVICE}/Push")
            outgoing = bytes(size)

            def bare_pull() -> None:
                receive_bytes(pull(b"", timeout=CALL_TIMEOUT_S), size)

            def bare_push() -> None:
                push(wire.iter_chunks(outgoing), timeout=CALL_TIMEOUT_S)

            def summed() -> None:
                leader.intake.round.summed()

            results = interleaved(
                {
                    "bare stream, server to client": bare_pull,
                    "GetModel (leader to learner)": get_model,
                    "bare stream, client to server": bare_push,
                    "SyncModelState (leader to learner)": sync_model_state,
                    "AccumulateGradients (learner to leader)": accumulate,
                },
                {"AccumulateGradients (learner to leader)": ("AccumulateGradients and the leader's sum", summed)},
                args.runs,
            )
            bare.stop(grace=None)
        finally:
            leader_server.stop(grace=None)
            if learner_server is not None:
                learner_server.stop(grace=None)
            leader.close()

    def rate(seconds: float) -> float:
        return size / seconds / 1e6

    baselines = {
        "GetModel (leader to learner)": "bare stream, server to client",
        "SyncModelState (leader to learner)": "bare stream, client to server",
        "AccumulateGradients (learner to leader)": "bare stream, client to server",
        "AccumulateGradients and the leader's sum": "bare stream, client to server",
    }
    commit = provenance.commit()
    print(f"# Wire throughput: {MODEL}, {size / 1e6:.1f} MB in {wire.CHUNK_BYTES >> 20} MiB chunks, loopback, one process")
    print(
        f"machine: {platform.platform()}, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}, torch {torch.__version__}, grpcio {grpc.__version__}; commit {commit}; "
        f"{args.runs} timed runs per path after one warm-up"
    )
    print()
    print("| path | MB/s median | min | max | vs bare stream (same direction), median of the runs' ratios |")
    print("|---|---|---|---|---|")
    for path, seconds in results.items():
        rates = [rate(value) for value in seconds]
        baseline = baselines.get(path)
        ratio = "1 (baseline)"
        if baseline:  # each run's path against the bare stream of the same round
            ratio = f"{statistics.median(bare / own for bare, own in zip(results[baseline], seconds, strict=True)):.2f}x"
        print(f"| {path} | {statistics.median(rates):.0f} | {min(rates):.0f} | {max(rates):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
