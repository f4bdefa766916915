"""Asynchronous rounds against a straggler: time to accuracy of synchronous fedavg and of fedbuff, with and without one.

Four learner.py processes and leader.py on this machine, ResNet-20 on the CIFAR-10 JPEG copy split IID four ways,
each job --local-steps batches of --batch-size at --lr (momentum 0.9, weight decay 5e-4, crop and flip), the
server's plain step. One learner is slowed --slowdown times (learner.py --slowdown) in the straggler pair. fedavg
waits for every learner each round (--round-timeout 600, so the default grace never drops the straggler); fedbuff
runs with its defaults (a buffer of 4, one per learner training, all 4 training). Each run trains for its budget of wall time with no
evaluation, writing every round; then the checkpoint first written after each --grid seconds is evaluated on the
10,000 test images, and the time to each target is the elapsed time of the first evaluated checkpoint at or above it.

    python -m bench.fedbuff --data-dir DIR --out docs/fedbuff.md
    python -m bench.fedbuff --data-dir DIR --earlier runs.jsonl   # reuse runs printed before (one JSON line each)
    python -m bench.fedbuff --data-dir DIR --straggler-minutes 1 --plain-minutes 1 --grid 20   # a quick check
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import provenance, report
from fedgrpc.data import load_dataset
from fedgrpc.engines.launcher import free_port
from fedgrpc.leader import checkpoint, plots
from fedgrpc.task import builtin_task, evaluate

ROOT = Path(__file__).resolve().parent.parent
LEARNERS = 4
TARGETS = (0.40, 0.50, 0.55, 0.60, 0.65)
STOP_GRACE_S = 120


def run(args: argparse.Namespace, run_dir: Path, aggregation: str, straggler: bool, minutes: float) -> None:
    """One federation for `minutes` of training, stopped by SIGTERM (the leader saves and says goodbye)."""
    port = free_port()
    leader_cmd = [
        sys.executable,
        "leader.py",
        *("--dataset", "imagefolder", "--data-dir", args.data_dir, "--model", "resnet20", "--learners", str(LEARNERS)),
        *("--aggregation", aggregation, "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size)),
        *("--lr", str(args.lr), "--momentum", "0.9", "--weight-decay", "5e-4", "--rounds", "1000000", "--eval-every", "0"),
        *("--checkpoint-every", "1", "--keep-checkpoints", "1000000", "--run-dir", str(run_dir), "--threads", "1"),
        *("--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--quiet"),
        *(["--round-timeout", "600"] if aggregation == "fedavg" else args.fedbuff_flags.split()),
    ]
    learner_cmd = [sys.executable, "learner.py", "--leader", f"127.0.0.1:{port}", "--host", "127.0.0.1", "--device", "cpu"]
    learner_cmd += ["--threads", "1", "--quiet", "--connect-timeout", "300"]
    leader = subprocess.Popen(leader_cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    learners = [
        subprocess.Popen(learner_cmd + (["--slowdown", str(args.slowdown)] if straggler and index == 0 else []), cwd=ROOT)
        for index in range(LEARNERS)
    ]
    try:
        metrics = run_dir / plots.METRICS_FILE
        while not metrics.is_file():  # training starts once the data set is loaded and all four registered
            if leader.poll() is not None:
                raise RuntimeError(f"leader exited with {leader.returncode} before training")
            time.sleep(1)
        time.sleep(minutes * 60)  # the first round's time is over the budget: points past it are not evaluated
        leader.send_signal(signal.SIGTERM)
        leader.wait(timeout=STOP_GRACE_S)
    finally:
        for process in [leader, *learners]:
            if process.poll() is None:
                process.kill()
            process.wait()


def evaluated(args: argparse.Namespace, run_dir: Path, test_data, minutes: float) -> list[tuple[int, float, float, float]]:
    """(round, elapsed seconds, test accuracy, staleness) of the first checkpoint after each --grid seconds, up to `minutes`."""
    rounds = [record for record in plots.read_metrics(run_dir) if record["elapsed_seconds"] <= minutes * 60]
    task = builtin_task("resnet20", "imagefolder", test_data.num_classes)
    model = task.model()
    points, mark = [], args.grid
    for record in rounds:
        if record["elapsed_seconds"] < mark:
            continue
        while mark <= record["elapsed_seconds"]:
            mark += args.grid
        path = run_dir / "checkpoints" / f"round-{record['round']:05d}.json"
        if not path.is_file():
            continue
        model.load_state_dict(checkpoint.load(path)[1])
        accuracy = evaluate(model, task, test_data, torch.device("cpu"), 1000)["accuracy"]
        points.append((record["round"], record["elapsed_seconds"], accuracy, record.get("staleness_mean") or 0.0))
    return points


def first_at(points: list[tuple[int, float, float, float]], target: float) -> float | None:
    """Elapsed seconds of the first evaluated checkpoint at or above `target`."""
    return next((elapsed for _, elapsed, accuracy, _ in points if accuracy >= target), None)


def cases(args: argparse.Namespace) -> list[bool]:
    """Whether each pair of runs --cases names has the straggler."""
    names = args.cases.split(",")
    return [straggler for straggler, name in ((True, "straggler"), (False, "plain")) if name in names]


def main(argv: list[str] | None = None) -> int:
    """Run the four federations one after the other, evaluate their checkpoints, print (and with --out, save) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 copy in image-folder layout (train/, test/)")
    parser.add_argument("--straggler-minutes", type=float, default=20.0, help="training time of each run with the straggler")
    parser.add_argument("--plain-minutes", type=float, default=8.0, help="training time of each run without it")
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--grid", type=float, default=30.0, help="seconds between evaluated checkpoints")
    parser.add_argument("--fedbuff-flags", default="", help="leader flags for the fedbuff runs (default: none, its defaults)")
    parser.add_argument("--cases", default="straggler,plain", help="which pairs of runs: straggler, plain or both")
    parser.add_argument("--earlier", default=None, help="JSON lines this benchmark printed: those runs are reported, not run again")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    test_data = load_dataset("imagefolder", args.data_dir, train=False)
    torch.set_num_threads(2)
    results: dict[tuple[bool, str], list[tuple[int, float, float, float]]] = {}
    commits: dict[tuple[bool, str], str] = {}
    if args.earlier:
        for line in Path(args.earlier).read_text().splitlines():
            earlier = json.loads(line)
            key = (earlier["straggler"], earlier["aggregation"])
            results[key], commits[key] = [tuple(point) for point in earlier["points"]], earlier["commit"]
    with tempfile.TemporaryDirectory(prefix="fedbuff-bench-") as scratch:
        for straggler in cases(args):
            minutes = args.straggler_minutes if straggler else args.plain_minutes
            for aggregation in ("fedavg", "fedbuff"):
                if (straggler, aggregation) in results:
                    continue
                run_dir = Path(scratch) / f"{aggregation}-{'straggler' if straggler else 'plain'}"
                run(args, run_dir, aggregation, straggler, minutes)
                results[(straggler, aggregation)] = evaluated(args, run_dir, test_data, minutes)
                commits[(straggler, aggregation)] = provenance.commit()
                line = {"straggler": straggler, "aggregation": aggregation, "commit": commits[(straggler, aggregation)]}
                print(json.dumps({**line, "points": results[(straggler, aggregation)]}), flush=True)
    results = {key: results[key] for key in sorted(results, key=lambda key: (not key[0], key[1]))}

    lines = [
        f"# fedbuff against synchronous fedavg: 4 learners, ResNet-20 on CIFAR-10, one slowed {args.slowdown:g}x",
        f"machine: {provenance.machine()}; one run per row, one after the other, alone on the machine",
        f"each job {args.local_steps} steps of batch {args.batch_size} at lr {args.lr:g}; {args.straggler_minutes:g} min of training "
        f"with the straggler, {args.plain_minutes:g} min without; checkpoints evaluated every {args.grid:g} s; "
        f"fedbuff with {args.fedbuff_flags or 'its defaults'}",
        "",
        "| learners | aggregation | commit | rounds | end accuracy | last 3 evaluated | "
        + " | ".join(f"time to {100 * target:.0f}%" for target in TARGETS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(TARGETS),
    ]
    for (straggler, aggregation), points in results.items():
        label = f"one {args.slowdown:g}x slower" if straggler else "all at one pace"
        times = [first_at(points, target) for target in TARGETS]
        end = f"{100 * points[-1][2]:.2f}%" if points else "-"
        last = f"{100 * sum(point[2] for point in points[-3:]) / len(points[-3:]):.2f}%" if points else "-"
        lines.append(
            f"| {label} | {aggregation} | {commits[(straggler, aggregation)]} | {points[-1][0] if points else 0} | {end} | {last} | "
            + " | ".join("-" if seconds is None else f"{seconds:.0f} s" for seconds in times)
            + " |"
        )
    lines += ["", "fedbuff / fedavg, time to each target:", ""]
    for straggler in cases(args):
        ratios = []
        for target in TARGETS:
            sync, buffered = first_at(results[(straggler, "fedavg")], target), first_at(results[(straggler, "fedbuff")], target)
            ratios.append("-" if sync is None or buffered is None else f"{buffered / sync:.2f}x")
        lines.append(
            f"- {'with' if straggler else 'without'} the straggler: "
            + ", ".join(f"{100 * target:.0f}%: {ratio}" for target, ratio in zip(TARGETS, ratios, strict=True))
        )
    lines += ["", "Every evaluated checkpoint (round, seconds, accuracy, mean staleness):", ""]
    for (straggler, aggregation), points in results.items():
        lines.append(
            f"- {aggregation}, {'straggler' if straggler else 'no straggler'}: "
            + "; ".join(
                f"{round_number} {elapsed:.0f}s {100 * accuracy:.1f}% {staleness:.1f}"
                for round_number, elapsed, accuracy, staleness in points
            )
        )
    print("\n".join(lines))
    report.save(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
