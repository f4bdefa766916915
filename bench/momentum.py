"""Kept against fresh learner momentum: each setting run twice with local_federation.py, once with the leader's
--no-keep-momentum and once with --keep-momentum, and the final round's test accuracy and loss of each.

The settings: a user's task (examples/sequence.py, a GRU on int64 tokens) with long and short rounds, sampled
learners and fedbuff; with --data-dir, the CIFAR-10 JPEG copy on small-cnn split by label skew (Dirichlet 0.3) and
by label shards with half of the learners sampled each round. One run per setting and side; synchronous runs repeat
to the digit on this machine, fedbuff's depend on the order updates arrive in.

    python -m bench.momentum --data-dir DIR --out momentum-run.md
    python -m bench.momentum   # the user's task only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import provenance, report

ROOT = Path(__file__).resolve().parent.parent
SEQUENCE = ["--task", "examples/sequence.py", "--lr", "0.1", "--aggregation", "fedavg"]
SETTINGS = [
    ("GRU task, 2 learners, 50-step rounds x 6", [*SEQUENCE, "--local-steps", "50", "--rounds", "6"]),
    ("GRU task, 2 learners, 7-step rounds x 43", [*SEQUENCE, "--local-steps", "7", "--rounds", "43"]),
    (
        "GRU task, 4 learners, half sampled, 50-step rounds x 12",
        [*SEQUENCE, "--learners", "4", "--fraction", "0.5", "--local-steps", "50", "--rounds", "12"],
    ),
    (
        "GRU task, fedbuff, 3 learners, 50-step jobs x 6",
        [*SEQUENCE, "--aggregation", "fedbuff", "--learners", "3", "--local-steps", "50", "--rounds", "6"],
    ),
]
CIFAR = ["--dataset", "imagefolder", "--model", "small-cnn", "--aggregation", "fedavg", "--learners", "4", "--local-steps", "20"]
CIFAR_SETTINGS = [
    (
        "CIFAR-10 small-cnn, 4 learners, Dirichlet 0.3, 20-step rounds x 15",
        [*CIFAR, "--partition", "dirichlet", "--alpha", "0.3", "--rounds", "15"],
    ),
    (
        "CIFAR-10 small-cnn, 4 learners, 2 classes each, half sampled, 20-step rounds x 20",
        [*CIFAR, "--partition", "shards", "--classes-per-learner", "2", "--fraction", "0.5", "--rounds", "20"],
    ),
]


def final_round(flags: list[str]) -> dict:
    """The last metrics.jsonl entry of a local_federation.py run with `flags`."""
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        command = [sys.executable, "local_federation.py", *flags, "--quiet", "--run-dir", str(run_dir)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"momentum: {' '.join(flags)} failed: {result.stderr.strip().splitlines()[-1:]}")
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="the extracted CIFAR-10 JPEG copy: adds the two CIFAR-10 settings")
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args()
    settings = SETTINGS + [(name, [*flags, "--data-dir", args.data_dir]) for name, flags in CIFAR_SETTINGS if args.data_dir]
    lines = [
        f"Kept against fresh learner momentum ({provenance.machine()}, commit {provenance.commit()}), one run per cell:",
        "",
        "| setting | fresh: accuracy, loss | kept: accuracy, loss | kept - fresh, points |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name, flags in settings:
        fresh, kept = final_round([*flags, "--no-keep-momentum"]), final_round([*flags, "--keep-momentum"])
        gain = 100 * (kept["test_accuracy"] - fresh["test_accuracy"])
        row = (
            f"| {name} | {100 * fresh['test_accuracy']:.2f}%, {fresh['test_loss']:.4f} "
            f"| {100 * kept['test_accuracy']:.2f}%, {kept['test_loss']:.4f} | {gain:+.2f} |"
        )
        print(row, flush=True)
        lines.append(row)
    report.save(lines, args.out)


if __name__ == "__main__":
    main()
