"""Accuracy of the learning algorithms on CIFAR-10: partitions x server optimizers, robust rules under attack, DP.

Every run is a real federation on this machine (leader.py plus learner.py processes on loopback): ResNet-20,
4 learners, fedavg, a fixed number of rounds; the table reports each run's final test accuracy (and, with DP,
the epsilon spent). Three groups, each selectable with --groups:

- skew: --partition iid, dirichlet 0.5 and dirichlet 0.1, each with FedAvg, FedAvgM, FedAdam and FedProx;
- attack: 1 of the 4 learners sends its update sign-flipped and scaled 10x; mean against median,
  trimmed-mean and krum;
- dp: DP-FedAvg at two noise multipliers, against no noise, all with the same clipping;
- server-lr: FedAvgM and FedAdam at Dirichlet 0.1 with a server learning rate 10x that of the skew group's
  (FedAvgM's 0.1 with momentum 0.9 takes the steps of plain FedAvg's 1 once the momentum has built up).

    python -m bench.algorithms --data-dir DIR --rounds 20 --local-steps 100 --out docs/algorithms.md
    python -m bench.algorithms --dataset synthetic --model tiny-cnn --rounds 2 --local-steps 5   # a quick check
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import provenance
from bench import report as report_file
from fedgrpc.engines.launcher import free_port, learner_threads
from fedgrpc.leader import plots

ROOT = Path(__file__).resolve().parent.parent
LEARNERS = 4
RUN_TIMEOUT_S = 6 * 3600
ATTACK_SCALE = -10.0  # the hostile learner's update is multiplied by this: sign-flipped and 10x

ALGORITHMS = {
    "FedAvg": ["--server-opt", "sgd", "--server-lr", "1"],
    "FedAvgM": ["--server-opt", "sgdm", "--server-lr", "1", "--server-momentum", "0.9"],
    "FedAdam": ["--server-opt", "adam", "--server-lr", "0.01", "--server-tau", "0.001"],
    "FedProx": ["--server-opt", "sgd", "--server-lr", "1", "--prox-mu", "0.01"],
}
PARTITIONS = {
    "iid": ["--partition", "iid"],
    "dirichlet 0.5": ["--partition", "dirichlet", "--alpha", "0.5"],
    "dirichlet 0.1": ["--partition", "dirichlet", "--alpha", "0.1"],
}
AGGREGATORS = {
    "mean": ["--rule", "mean"],
    "median": ["--rule", "median"],
    "trimmed-mean 0.25": ["--rule", "trimmed-mean", "--trim", "0.25"],
    # Krum needs n > 2f + 2: with 4 learners only f = 0 is allowed, which still drops an update far from the rest
    "krum f=0": ["--rule", "krum", "--byzantine", "0"],
}
SERVER_LR_RUNS = {
    "FedAvgM, server lr 0.1": ["--server-opt", "sgdm", "--server-lr", "0.1", "--server-momentum", "0.9"],
    "FedAdam, server lr 0.1": ["--server-opt", "adam", "--server-lr", "0.1", "--server-tau", "0.001"],
}
DP_CLIP = 1.0
DP_NOISE = (0.0, 0.5, 1.0)


@dataclass
class Run:
    """One federation to run: a group, a label, and the leader flags that make it."""

    group: str
    label: str
    flags: list[str]
    hostile: bool = False


def plan(groups: list[str]) -> list[Run]:
    """Every run of the chosen groups."""
    runs = []
    if "skew" in groups:
        for partition, partition_flags in PARTITIONS.items():
            for algorithm, algorithm_flags in ALGORITHMS.items():
                runs.append(Run("skew", f"{partition}, {algorithm}", [*partition_flags, *algorithm_flags]))
    if "attack" in groups:
        for aggregator, flags in AGGREGATORS.items():
            runs.append(Run("attack", f"1 of {LEARNERS} sign-flipped x10, {aggregator}", flags, hostile=True))
    if "server-lr" in groups:
        for algorithm, flags in SERVER_LR_RUNS.items():
            runs.append(Run("server-lr", f"dirichlet 0.1, {algorithm}", [*PARTITIONS["dirichlet 0.1"], *flags]))
    if "dp" in groups:
        for noise in DP_NOISE:
            flags = ["--clip-norm", str(DP_CLIP), "--dp-noise-multiplier", str(noise)]
            runs.append(Run("dp", f"clip {DP_CLIP}, noise multiplier {noise}", flags))
    return runs


def federate(run: Run, common: list[str], work: Path) -> tuple[list[dict], float]:
    """Run one federation to the end; returns its metrics lines and wall seconds."""
    port = free_port()
    run_dir = work / run.label.replace(" ", "_").replace(",", "").replace("/", "-")
    leader = subprocess.Popen(
        [
            sys.executable,
            "leader.py",
            *common,
            *run.flags,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--learners",
            str(LEARNERS),
            "--run-dir",
            str(run_dir),
            "--quiet",
        ],
        cwd=ROOT,
    )
    learner = [
        "--leader",
        f"127.0.0.1:{port}",
        "--host",
        "127.0.0.1",
        "--device",
        "cpu",
        "--no-progress",
        "--quiet",
        "--threads",
        str(learner_threads(LEARNERS)),
        "--connect-timeout",
        "600",
    ]
    learners = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.algorithms", "--hostile-learner", *learner]
            if run.hostile and index == 0
            else [sys.executable, "learner.py", *learner],
            cwd=ROOT,
        )
        for index in range(LEARNERS)
    ]
    start = time.monotonic()
    try:
        status = leader.wait(timeout=RUN_TIMEOUT_S)
    finally:
        for process in [leader, *learners]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    seconds = time.monotonic() - start
    records = plots.read_metrics(run_dir, missing_ok=True)
    if status != 0:
        print(f"{run.label}: leader exit {status}", file=sys.stderr)
    return records, seconds


def hostile_learner(argv: list[str]) -> int:
    """A learner whose parameter updates are multiplied by ATTACK_SCALE before they are sent (buffers left as they are)."""
    from fedgrpc.learner import main as learner_module

    train = learner_module.Learner._train

    def attacking_train(self: learner_module.Learner, number: int) -> tuple[dict[str, torch.Tensor], int, float]:
        update, examples, loss = train(self, number)
        parameters = {name for name, _ in self.model.named_parameters()}
        return {name: tensor * ATTACK_SCALE if name in parameters else tensor for name, tensor in update.items()}, examples, loss

    learner_module.Learner._train = attacking_train  # this process is the attacker; nothing else runs in it
    return learner_module.main(argv)


def main() -> int:
    """Run the chosen groups and print (and optionally write) the table."""
    if len(sys.argv) > 1 and sys.argv[1] == "--hostile-learner":
        return hostile_learner(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="imagefolder", help="the leader's --dataset")
    parser.add_argument("--data-dir", default=None, help="the leader's --data-dir (the CIFAR-10 JPEG copy, extracted)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=100, help="local batches per learner per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--groups", default="skew,attack,dp", help="comma-separated: skew, attack, dp, server-lr")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    common = [
        "--dataset",
        args.dataset,
        "--model",
        args.model,
        "--device",
        "cpu",
        "--aggregation",
        "fedavg",
        "--rounds",
        str(args.rounds),
        "--local-steps",
        str(args.local_steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--eval-every",
        str(args.rounds),
        "--checkpoint-every",
        str(args.rounds),
        "--seed",
        "0",
    ]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    commit = provenance.commit()
    lines = [
        f"# Algorithms: {args.model}, {LEARNERS} learners, fedavg, {args.rounds} rounds of {args.local_steps} local batches of "
        f"{args.batch_size}, lr {args.lr}, dataset {args.dataset}",
        "",
        f"- machine: {provenance.machine()}; commit {commit}; one run per row, seed 0",
        "",
        "| group | run | final test accuracy | dp epsilon | wall s |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="fl-algorithms-") as work:
        for run in plan(args.groups.split(",")):
            records, seconds = federate(run, common, Path(work))
            final = records[-1] if records and records[-1]["round"] == args.rounds else None
            accuracy = f"{100 * final['test_accuracy']:.2f}%" if final and final["test_accuracy"] is not None else "failed"
            epsilon = f"{final['dp_epsilon']:.2f}" if final and "dp_epsilon" in final else "-"
            line = f"| {run.group} | {run.label} | {accuracy} | {epsilon} | {seconds:.0f} |"
            lines.append(line)
            print(line, flush=True)
    report_file.save(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
