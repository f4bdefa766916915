"""Compiled rounds: seconds per round of a two-learner federation with and without `--learner-compile`.

`bench.step_time --compile` times one learner's step alone; this times whole rounds of the real federation
(`local_federation.py`: leader, two learners, each with its share of the cores), alternating uncompiled and
compiled runs so that drifts in the machine's speed fall on both. Each run trains --rounds rounds of
--local-steps batches; its first round (the compile, for the compiled runs) is left out. Run it from the
repository root as a module:

    python -m bench.compiled_rounds --data-dir DIR --out compiled-rounds.md   # docs/step-time.md keeps the findings
    python -m bench.compiled_rounds --dataset synthetic --runs 1 --rounds 2 --local-steps 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import provenance
from bench import report as report_file
from fedgrpc.leader import plots

ROOT = Path(__file__).resolve().parent.parent
MODES = {"uncompiled": [], "compiled": ["--learner-compile"]}


def round_seconds(args: argparse.Namespace, extra: list[str]) -> list[float]:
    """One federation's `round_seconds` for rounds 2 onwards (round 1 pays start-up and any compile)."""
    with tempfile.TemporaryDirectory(prefix="fl-compiled-") as run_dir:
        command = [
            sys.executable,
            "local_federation.py",
            "--dataset",
            args.dataset,
            "--model",
            args.model,
            "--device",
            args.device,
            "--learners",
            "2",
            "--partition",
            "iid",
            "--aggregation",
            "fedavg",
            "--local-steps",
            str(args.local_steps),
            "--rounds",
            str(args.rounds),
            "--batch-size",
            str(args.batch_size),
            "--eval-every",
            str(args.rounds),
            "--checkpoint-every",
            str(args.rounds),
            "--quiet",
            "--run-dir",
            run_dir,
            "--checkpoint-dir",
            str(Path(run_dir) / "checkpoints"),
            *extra,
        ]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        records = plots.read_metrics(Path(run_dir))
    return [record["round_seconds"] for record in records if record["round"] > 1]


def main() -> int:
    """Alternate uncompiled and compiled federations --runs times each; print seconds per round and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="imagefolder", help="imagefolder (the CIFAR-10 JPEG copy), cifar10 or synthetic")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--local-steps", type=int, default=40, help="each learner's batches per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run, the first left out")
    parser.add_argument("--runs", type=int, default=2, help="runs of each mode, alternated")
    parser.add_argument("--out", default=None, help="also write the report to this Markdown file")
    args = parser.parse_args()
    if args.rounds < 2 or args.runs < 1 or args.local_steps < 1:
        parser.error("--rounds must be at least 2, --runs and --local-steps at least 1")

    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for run in range(1, args.runs + 1):
        for mode, extra in MODES.items():
            measured = round_seconds(args, extra)
            seconds[mode] += measured
            print(f"run {run}, {mode}: " + ", ".join(f"{value:.1f}" for value in measured) + " s a round", flush=True)

    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    lines = [
        f"# Compiled rounds: {args.model}, 2 learners, fedavg, {args.local_steps} local steps of batch {args.batch_size}",
        "",
        f"- machine: {provenance.machine()}; --device {args.device}; "
        f"commit {provenance.commit()}; {args.runs} runs of each mode, alternated, "
        f"rounds 2-{args.rounds} of each",
        "",
        "| learners | seconds per round, median (min-max) | rounds |",
        "|---|---|---|",
    ]
    lines += [f"| {mode} | {medians[mode]:.1f} ({min(values):.1f}-{max(values):.1f}) | {len(values)} |" for mode, values in seconds.items()]
    lines += ["", f"uncompiled / compiled: {medians['uncompiled'] / medians['compiled']:.2f}x"]
    print("\n".join(lines))
    report_file.save(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
