"""Round overhead of the blog's set-up: ResNet-18, two learners on loopback, fedsgd, one batch of 32 each per round.

Compares the median seconds per round (the leader's round_seconds: from opening a round to applying its
update) with what a round cannot avoid, measured in the same run on the same machine: one forward and
backward pass of a batch of 32 in a plain PyTorch loop (the learners run theirs side by side, one core
each), plus four model-sized transfers (two updates in, two models out) at the rate of a bare gRPC
stream. Also reports the bytes moved per round against the model's size.

    python -m bench.round --rounds 10
    python -m bench.round --rounds 10 --device cuda   # learners and the plain step on the GPU
    python -m bench.round --rounds 10 --task-runs 2   # also the same workload as a user's task file (--task)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch
import torch.nn.functional as F

from bench import provenance
from bench.wire import BARE_SERVICE, CALL_TIMEOUT_S, bare_server, receive_bytes, timed
from fedgrpc.data import normalize, resolve_device
from fedgrpc.leader import plots
from fedgrpc.model import build_model, memory_format_for
from fedgrpc.transport import rpc, wire

ROOT = Path(__file__).resolve().parent.parent
MODEL = "resnet18"
BATCH = 32
LEARNERS = 2
TRANSFERS_PER_ROUND = 4  # two updates in, two models out
COMPUTE_REPEATS = 10
STREAM_REPEATS = 5
GOAL = 1.25
TASK_FILE = "bench/tasks/resnet18_synthetic.py"  # the same workload as a user's --task
TASK_GOAL = 1.02  # a user's task file costs at most this much more per round than the built-in model


def compute_seconds(repeats: int, device: torch.device) -> list[float]:
    """One learner's fedsgd step (forward and backward of a batch of 32) with its share of the cores, as each learner runs it."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // LEARNERS))  # the launcher splits the cores the same way
    memory_format = memory_format_for("auto", MODEL, device)  # the learners' default choice
    model = build_model(MODEL, 10).to(device, memory_format=memory_format)
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (BATCH,))

    def step() -> None:  # as a learner's: the batch starts in host memory
        model.zero_grad(set_to_none=True)
        inputs = normalize(images.to(device)).contiguous(memory_format=memory_format)
        F.cross_entropy(model(inputs), labels.to(device)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step is done when the GPU is, not when its kernels are queued

    return timed(step, repeats)


def bare_stream_seconds(size: int, repeats: int) -> list[float]:
    """Seconds to pull `size` bytes through a bare gRPC stream of raw 1 MiB chunks on loopback."""
    server, port = bare_server(size)
    channel = rpc.channel(f"127.0.0.1:{port}")
    pull = channel.unary_stream(f"/{BARE_SERVICE}/Pull")
    seconds = []
    try:
        for index in range(repeats + 1):
            start = time.perf_counter()
            receive_bytes(pull(b"", timeout=CALL_TIMEOUT_S), size)
            if index:  # the first pull warms the connection up
                seconds.append(time.perf_counter() - start)
    finally:
        channel.close()
        server.stop(grace=None)
    return seconds


def federation_rounds(rounds: int, checkpoint_every: int, device: torch.device, task: str | None = None) -> list[dict]:
    """Run the real federation (leader and learner processes) for one warm-up round plus `rounds`; returns metrics."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable,
            "local_federation.py",
            *(["--task", task] if task else ["--dataset", "synthetic", "--model", MODEL]),
            "--device",
            str(device),
            "--aggregation",
            "fedsgd",
            "--batch-size",
            str(BATCH),
            "--learners",
            str(LEARNERS),
            "--rounds",
            str(rounds + 1),
            "--eval-every",
            str(rounds + 1),
            "--checkpoint-every",
            str(checkpoint_every),
            "--no-augment",
            "--quiet",
            "--run-dir",
            run_dir,
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"the federation failed (exit {result.returncode}): {result.stderr[-2000:]}")
        return plots.read_metrics(Path(run_dir))


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds, after one warm-up round")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="the leader's --checkpoint-every (default 0: the leader's default, a checkpoint by time, every 60 s)",
    )
    parser.add_argument("--device", default="cpu", help="where the leader, the learners and the plain step compute: cpu or cuda")
    parser.add_argument(
        "--task-runs",
        type=int,
        default=0,
        help="also run the workload through a user's task file, alternating this many federations of each path (default 0: not)",
    )
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))

    size = wire.payload_bytes(wire.specs_of(build_model(MODEL, 10).state_dict()))
    records = federation_rounds(
        args.rounds, args.checkpoint_every, device
    )  # first, alone: nothing else in this process competes for the cores
    compute = compute_seconds(COMPUTE_REPEATS, device)
    stream = bare_stream_seconds(size, STREAM_REPEATS)

    timed = records[1:]
    round_seconds = [record["round_seconds"] for record in timed]
    bytes_moved = [record["bytes_in"] + record["bytes_out"] for record in timed]
    step = statistics.median(compute)
    transfer = statistics.median(stream)
    floor = step + TRANSFERS_PER_ROUND * transfer
    median_round = statistics.median(round_seconds)
    commit = provenance.commit()

    print(f"# Round overhead: {MODEL} ({size / 1e6:.1f} MB), {LEARNERS} learners on loopback, fedsgd, batch {BATCH} each")
    print(
        f"machine: {provenance.machine()}, grpcio {grpc.__version__}; commit {commit}; --device {device}; "
        f"--checkpoint-every {args.checkpoint_every}; {len(timed)} timed rounds after 1 warm-up, "
        f"{COMPUTE_REPEATS} compute steps, {STREAM_REPEATS} bare-stream pulls"
    )
    print()
    print("| measure | median | min | max |")
    print("|---|---|---|---|")
    print(f"| seconds per round (leader's round_seconds) | {median_round:.3f} | {min(round_seconds):.3f} | {max(round_seconds):.3f} |")
    print(f"| one learner's forward + backward, batch {BATCH}, plain PyTorch (s) | {step:.3f} | {min(compute):.3f} | {max(compute):.3f} |")
    print(f"| one {size / 1e6:.1f} MB bare gRPC stream (s) | {transfer:.3f} | {min(stream):.3f} | {max(stream):.3f} |")
    print(
        f"| bytes moved per round / model size | {statistics.median(bytes_moved) / size:.2f} | "
        f"{min(bytes_moved) / size:.2f} | {max(bytes_moved) / size:.2f} |"
    )
    print()
    print(
        f"round / (compute + {TRANSFERS_PER_ROUND} transfers at the bare rate) = {median_round:.3f} / {floor:.3f} = "
        f"{median_round / floor:.2f}x (goal: at most {GOAL}x)"
    )
    if args.task_runs:
        compare_task_path(args.task_runs, args.rounds, args.checkpoint_every, device)


def compare_task_path(runs: int, rounds: int, checkpoint_every: int, device: torch.device) -> None:
    """Median round seconds of the built-in model against the same workload as a task file, federations alternated."""
    seconds: dict[str, list[float]] = {"built-in --model": [], f"--task {TASK_FILE}": []}
    per_run: dict[str, list[float]] = {label: [] for label in seconds}
    for _ in range(runs):
        for label, task in (("built-in --model", None), (f"--task {TASK_FILE}", TASK_FILE)):
            timed = [record["round_seconds"] for record in federation_rounds(rounds, checkpoint_every, device, task)[1:]]
            seconds[label] += timed
            per_run[label].append(statistics.median(timed))
    print()
    print(f"## The same workload through a task file ({runs} federations of each, alternated; {rounds} timed rounds each)")
    print()
    print("| path | median s/round | min | max | each federation's median |")
    print("|---|---|---|---|---|")
    for label, values in seconds.items():
        each = ", ".join(f"{median:.3f}" for median in per_run[label])
        print(f"| {label} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} | {each} |")
    builtin, task = (statistics.median(values) for values in seconds.values())
    print()
    print(f"task / built-in = {task:.3f} / {builtin:.3f} = {task / builtin:.3f}x (goal: at most {TASK_GOAL}x)")


if __name__ == "__main__":
    main()
