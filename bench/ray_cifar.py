"""Real work on the Ray engine: ResNet-20 on CIFAR-10 split Dirichlet(0.3) over 100 learners, 10 trained per round.

The Ray engine runs the federation itself: 100 virtual learners on 2 actors, for --rounds rounds, evaluated
every --eval-every rounds; the report gives its test accuracy by round and its seconds per round. The
process engine cannot hold 100 learners here (a PyTorch process each), so it runs the same round instead:
10 learner processes, all of them in every round, each doing the same local work (--local-steps batches of
--batch-size), for a few rounds. Seconds per round are compared over rounds without evaluation; left out are
round 1 (each learner's first data transfer and first step) and the rounds that ran beside an evaluation.

    python -m bench.ray_cifar --data-dir DIR --rounds 40 --out docs/ray-cifar.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import provenance, report

ROOT = Path(__file__).resolve().parent.parent
RUN_LIMIT_S = 7200


def federation(data_dir: str, args: argparse.Namespace, run_dir: Path, *flags: str) -> list[str]:
    """local_federation.py on the CIFAR-10 copy with the benchmark's training settings."""
    return [
        sys.executable,
        "local_federation.py",
        "--dataset",
        "imagefolder",
        "--data-dir",
        data_dir,
        "--model",
        "resnet20",
        "--aggregation",
        "fedavg",
        "--batch-size",
        str(args.batch_size),
        "--local-steps",
        str(args.local_steps),
        "--lr",
        str(args.lr),
        "--seed",
        "0",
        "--recompute-bn",
        str(args.recompute_bn),
        "--quiet",
        "--run-dir",
        str(run_dir),
        *flags,
    ]


def rounds_of(run_dir: Path) -> list[dict]:
    """A run's metrics, one dict per round."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def seconds_per_round(rounds: list[dict]) -> float:
    """Median seconds of the rounds after the first that neither were evaluated nor ran beside an evaluation (the one after)."""
    quiet = [
        record["round_seconds"]
        for before, record in zip(rounds, rounds[1:], strict=False)
        if record["test_accuracy"] is None and before["test_accuracy"] is None
    ]
    return statistics.median(quiet)


def main(argv: list[str] | None = None) -> int:
    """Run both engines one after the other and print (and with --out, save) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 copy in image-folder layout (train/, test/)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds of the Ray engine's run")
    parser.add_argument("--process-rounds", type=int, default=4, help="rounds of the process engine's run")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=16, help="about one pass over a learner's 500 images")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--recompute-bn", type=int, default=2000, help="training images the leader recomputes BatchNorm statistics from (0: off)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ray-cifar-") as scratch:
        ray_dir, process_dir = Path(scratch) / "ray", Path(scratch) / "processes"
        ray_flags = ["--engine", "ray", "--learners", "100", "--fraction", "0.1", "--partition", "dirichlet", "--alpha", "0.3"]
        started = time.monotonic()
        subprocess.run(
            federation(args.data_dir, args, ray_dir, *ray_flags, "--rounds", str(args.rounds), "--eval-every", str(args.eval_every)),
            cwd=ROOT,
            check=True,
            timeout=RUN_LIMIT_S,
        )
        ray_wall = time.monotonic() - started
        process_flags = ["--learners", "10", "--rounds", str(args.process_rounds), "--eval-every", "0"]
        subprocess.run(federation(args.data_dir, args, process_dir, *process_flags), cwd=ROOT, check=True, timeout=RUN_LIMIT_S)
        ray_rounds, process_rounds = rounds_of(ray_dir), rounds_of(process_dir)

    lines = [
        "# ResNet-20 on CIFAR-10, Dirichlet(0.3) over 100 virtual learners, 10 per round (Ray engine)",
        f"machine: {provenance.machine()}; commit {provenance.commit()}; one run per engine; "
        f"batch {args.batch_size}, {args.local_steps} local steps, lr {args.lr}, momentum 0.9 not kept between rounds, "
        f"BatchNorm statistics recomputed on the leader from {args.recompute_bn} training images each round",
        "",
        "| round | test accuracy | train loss | seconds since start |",
        "|---|---|---|---|",
    ]
    for record in ray_rounds:
        if record["test_accuracy"] is not None:
            lines.append(
                f"| {record['round']} | {100 * record['test_accuracy']:.2f}% | {record['train_loss']:.3f} | {record['elapsed_seconds']:.0f} |"
            )
    ray_seconds, process_seconds = seconds_per_round(ray_rounds), seconds_per_round(process_rounds)
    lines += [
        "",
        "| engine | learners held | s per round (median; round 1 and rounds beside an evaluation left out) |",
        "|---|---|---|",
        f"| Ray: 100 virtual learners on 2 actors | 100 | {ray_seconds:.2f} |",
        f"| processes: 10 learner.py processes, all trained every round | 10 | {process_seconds:.2f} |",
        "",
        f"Ray engine / process engine: {ray_seconds / process_seconds:.2f}x per round; the Ray run took {ray_wall:.0f} s from "
        "launch to exit.",
    ]
    print("\n".join(lines))
    report.save(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
