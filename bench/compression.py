"""Bytes per round under each --compress mode: a real two-learner ResNet-20 federation per mode, bytes counted by the leader.

Accuracy costs need the time-to-accuracy benchmark on CIFAR-10; this measures the bytes only.

    python -m bench.compression
"""

from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import provenance
from fedgrpc.leader import plots
from fedgrpc.transport import compression

ROOT = Path(__file__).resolve().parent.parent
MODEL = "resnet20"
TOPK_RATIO = 0.01


def bytes_in_per_round(mode: str) -> int:
    """The update bytes the leader received in round 2 of a two-round, two-learner fedavg run."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable,
            "local_federation.py",
            "--dataset",
            "synthetic",
            "--model",
            MODEL,
            "--device",
            "cpu",
            "--aggregation",
            "fedavg",
            "--local-steps",
            "2",
            "--rounds",
            "2",
            "--compress",
            mode,
            "--topk-ratio",
            str(TOPK_RATIO),
            "--quiet",
            "--run-dir",
            run_dir,
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SystemExit(f"--compress {mode} failed (exit {result.returncode}): {result.stderr[-1500:]}")
        records = plots.read_metrics(Path(run_dir))
        return records[-1]["bytes_in"]


def main() -> None:
    """Run every mode and print the table."""
    measured = {mode: bytes_in_per_round(mode) for mode in compression.MODES}
    commit = provenance.commit()
    print(f"# Update bytes per round: {MODEL}, 2 learners, fedavg, --topk-ratio {TOPK_RATIO}")
    print(
        f"machine: {platform.platform()}; python {platform.python_version()}, torch {torch.__version__}; commit {commit}; one run per mode"
    )
    print()
    print("| --compress | update bytes in per round (2 learners) | fewer bytes than none |")
    print("|---|---|---|")
    for mode, count in measured.items():
        print(f"| {mode} | {count:,} | {measured['none'] / count:.2f}x |")


if __name__ == "__main__":
    main()
