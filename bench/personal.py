"""Personal models under label skew: each learner's accuracy on its own test data under FedAvg, FedPer and FedBN.

Ten learner processes and a leader on this machine (local_federation.py), CIFAR-10 (the JPEG copy) split two classes
per learner (learner i holds classes 2i mod 10 and 2i+1 mod 10 paired as below: each class at two learners), 500
training images of each class per learner and all 1,000 test images of each; bench/tasks/cifar_pairs.py's small
BatchNorm CNN; one local epoch per round (batch 32, lr 0.05, momentum 0.9, weight decay 5e-4). The learners evaluate
after the last round on their own test data; the leader records the mean and spread (metrics.jsonl):

- FedAvg, global: the global model on each learner's own two classes (and, for reference, on all ten classes);
- FedAvg + fine-tuning: the same after --personal-steps local steps on the learner's own training data;
- FedPer (--share fedper): the global features with the learner's own head;
- FedBN (--share fedbn): the global model with the learner's own BatchNorm layers.

    python -m bench.personal --data-dir DIR --out docs/personal.md
    python -m bench.personal --data-dir DIR --rounds 2 --learners 4   # a quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import provenance, report
from fedgrpc.leader import checkpoint, plots
from fedgrpc.task import evaluate, load_task

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "bench" / "tasks" / "cifar_pairs.py"
# learner i's two classes: ten pairs in which every class appears twice and no two learners hold the same pair
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (1, 2), (3, 4), (5, 6), (7, 8), (9, 0)]
METHODS = (("FedAvg", "all"), ("FedPer", "fedper"), ("FedBN", "fedbn"))


def sites(scratch: Path, data_dir: str, learners: int) -> list[str]:
    """One folder per learner naming its two classes."""
    folders = []
    for index in range(learners):
        folder = scratch / f"site{index}"
        folder.mkdir()
        (folder / "site.json").write_text(json.dumps({"root": str(Path(data_dir).resolve()), "classes": PAIRS[index % len(PAIRS)]}))
        folders.append(str(folder))
    return folders


def federate(args: argparse.Namespace, share: str, folders: list[str], run_dir: Path) -> tuple[dict, float]:
    """One federation to the end; its last metrics record and wall time."""
    cmd = [sys.executable, "local_federation.py", "--task", str(TASK), "--data-mode", "local", "--learners", str(len(folders))]
    cmd += [arg for folder in folders for arg in ("--learner-data-dir", folder)]
    cmd += ["--aggregation", "fedavg", "--share", share, "--local-epochs", "1", "--batch-size", "32", "--lr", "0.05"]
    cmd += ["--momentum", "0.9", "--weight-decay", "5e-4", "--rounds", str(args.rounds), "--eval-every", str(args.rounds)]
    cmd += ["--evaluation", "learners", "--run-dir", str(run_dir), "--device", "cpu", "--quiet", "--seed", str(args.seed)]
    if share == "all":
        cmd += ["--personal-steps", str(args.personal_steps)]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return plots.read_metrics(run_dir)[-1], time.perf_counter() - started


def spread(record: dict, prefix: str) -> str:
    """Mean (min-max) in percent of one accuracy the learners reported."""
    mean, low, high = (100 * record[f"{prefix}{suffix}"] for suffix in ("", "_min", "_max"))
    return f"{mean:.1f}% ({low:.1f}-{high:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 copy in image-folder layout (train/, test/)")
    parser.add_argument("--learners", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--personal-steps", type=int, default=20, help="FedAvg + fine-tuning's local steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    rows, records = [], {}
    with tempfile.TemporaryDirectory(prefix="personal-bench-") as scratch:
        folders = sites(Path(scratch), args.data_dir, args.learners)
        for name, share in METHODS:
            run_dir = Path(scratch) / share
            record, seconds = federate(args, share, folders, run_dir)
            records[name] = record
            print(json.dumps({"method": name, "seconds": round(seconds, 1), **record}), flush=True)
            if share == "all":  # the global model on every class, for reference
                task = load_task(str(TASK))
                model = task.model()
                model.load_state_dict(checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))[1])
                everything = evaluate(model, task, task.test_data(args.data_dir), torch.device("cpu"), 1000)["accuracy"]
                rows.append(f"| FedAvg, global model | {spread(record, 'fed_eval_accuracy')} | {100 * everything:.1f}% | {seconds:.0f} s |")
                tuned = spread(record, "fed_eval_personal_accuracy")
                rows.append(f"| FedAvg + {args.personal_steps} fine-tuning steps | {tuned} | | (same run) |")
            else:
                rows.append(f"| {name} (--share {share}) | {spread(record, 'fed_eval_accuracy')} | | {seconds:.0f} s |")
    base = records["FedAvg"]["fed_eval_accuracy"]
    lines = [
        f"# Personal models under label skew ({args.learners} learners, two CIFAR-10 classes each)",
        "",
        f"`python -m bench.personal --data-dir DIR --learners {args.learners} --rounds {args.rounds} "
        f"--personal-steps {args.personal_steps}` on {provenance.machine()}, commit {provenance.commit()}, one run per row.",
        "",
        "| method | accuracy on each learner's own test data: mean (min-max) | global model on all 10 classes | wall time |",
        "|---|---|---|---|",
        *rows,
        "",
        "Personal over global (mean accuracy): "
        + ", ".join(f"{name} {records[name]['fed_eval_accuracy'] / base:.2f}x" for name, _ in METHODS[1:])
        + f", FedAvg + fine-tuning {records['FedAvg']['fed_eval_personal_accuracy'] / base:.2f}x.",
    ]
    print("\n".join(lines))
    report.save(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
