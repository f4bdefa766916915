"""What secure aggregation costs in accuracy: bench.ray_cifar's run on CIFAR-10, with and without it, one after the other.

The configuration is bench.ray_cifar's: ResNet-20, the CIFAR-10 JPEG copy split Dirichlet(0.3) over 100 virtual
learners on the Ray engine, 10 sampled per round, 16 local steps of batch 32 at lr 0.05, BatchNorm statistics
recomputed on the leader, here for --rounds rounds. Both runs add --deterministic (updates summed in learner
order, deterministic kernels), so that what differs between them is secure aggregation alone: each update
clipped to twice the initial model's norm and rounded to the fixed-point step, and the unmasked sum.

    python -m bench.secure_accuracy --data-dir DIR --rounds 20 --out docs/secure-accuracy.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import provenance, ray_cifar, report

ROOT = Path(__file__).resolve().parent.parent
RAY_FLAGS = ["--engine", "ray", "--learners", "100", "--fraction", "0.1", "--partition", "dirichlet", "--alpha", "0.3", "--deterministic"]


def main(argv: list[str] | None = None) -> int:
    """Run the plain and the secure federation and print (and with --out, save) their accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 copy in image-folder layout (train/, test/)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--recompute-bn", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    runs: dict[str, list[dict]] = {}
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="secure-accuracy-") as scratch:
        for mode, extra in (("plain", []), ("secure", ["--secure-aggregation"])):
            run_dir = Path(scratch) / mode
            flags = [*RAY_FLAGS, *extra, "--rounds", str(args.rounds), "--eval-every", str(args.eval_every)]
            started = time.monotonic()
            subprocess.run(ray_cifar.federation(args.data_dir, args, run_dir, *flags), cwd=ROOT, check=True, timeout=ray_cifar.RUN_LIMIT_S)
            walls[mode] = time.monotonic() - started
            runs[mode] = ray_cifar.rounds_of(run_dir)

    lines = [
        f"# Secure aggregation and accuracy: ResNet-20 on CIFAR-10, bench.ray_cifar's configuration, {args.rounds} rounds",
        f"machine: {provenance.machine()}; commit {provenance.commit()}; one run per mode, --deterministic in both",
        "",
        "| round | plain test accuracy | secure test accuracy | difference, points |",
        "|---|---|---|---|",
    ]
    for plain, secure in zip(runs["plain"], runs["secure"], strict=True):
        if plain["test_accuracy"] is not None and secure["test_accuracy"] is not None:
            difference = 100 * (secure["test_accuracy"] - plain["test_accuracy"])
            lines.append(
                f"| {plain['round']} | {100 * plain['test_accuracy']:.2f}% | {100 * secure['test_accuracy']:.2f}% | {difference:+.2f} |"
            )
    plain_s, secure_s = ray_cifar.seconds_per_round(runs["plain"]), ray_cifar.seconds_per_round(runs["secure"])
    lines += [
        "",
        f"Seconds per round (rounds without evaluation): plain {plain_s:.2f}, secure {secure_s:.2f} ({secure_s / plain_s:.2f}x); "
        f"launch to exit: plain {walls['plain']:.0f} s, secure {walls['secure']:.0f} s.",
    ]
    print("\n".join(lines))
    report.save(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
