"""LoRA adapters against the whole model: bytes per round and loss of one causal-LM federation run both ways.

A tiny Llama-style base model (examples/lora_task.py's make_tiny_base) is fine-tuned by two learners with FedAvg on
the task's token sequences, twice with the same plan: once through PEFT LoRA adapters with --share adapters (the base
frozen on every machine, never sent), once with every weight trainable and --share all (FEDGRPC_LORA_FULL=1). Prints
the bytes each round moves both ways, their ratio, and the test loss after the last round.

    python -m bench.lora
    python -m bench.lora --rounds 20 --hidden 256 --layers 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers

from bench import provenance
from examples.lora_task import BASE_MODEL_ENV, FULL_ENV, LORA_RANK, TARGET_MODULES, make_tiny_base
from fedgrpc.leader import plots
from fedgrpc.task import evaluate, load_task

ROOT = Path(__file__).resolve().parent.parent
TASK = "examples/lora_task.py"
LEARNERS = 2
BATCH = 32
RUN_TIMEOUT_S = 1800
WAYS = {"adapters": ("0", "adapters"), "full model": ("1", "all")}  # label: (FEDGRPC_LORA_FULL, --share)


def federation(base: Path, full: str, share: str, args: argparse.Namespace) -> list[dict]:
    """Run local_federation.py on the LoRA task (leader and learner processes); returns its per-round metrics."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable,
            "local_federation.py",
            "--task",
            TASK,
            "--share",
            share,
            "--aggregation",
            "fedavg",
            "--learners",
            str(LEARNERS),
            "--rounds",
            str(args.rounds),
            "--local-steps",
            str(args.local_steps),
            "--batch-size",
            str(BATCH),
            "--lr",
            str(args.lr),
            "--device",
            "cpu",
            "--quiet",
            "--run-dir",
            run_dir,
        ]
        env = {**os.environ, BASE_MODEL_ENV: str(base), FULL_ENV: full}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if result.returncode != 0:
            raise SystemExit(f"the --share {share} federation failed (exit {result.returncode}): {result.stderr[-3000:]}")
        return plots.read_metrics(Path(run_dir))


def untrained_loss(base: Path) -> float:
    """The base model's test loss, where both federations start."""
    os.environ[BASE_MODEL_ENV] = str(base)
    task = load_task(TASK)
    return evaluate(task.model(), task, task.test_data(None), torch.device("cpu"), batch_size=256)["loss"]


def main() -> None:
    """Run both federations and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds of each federation (default: 10)")
    parser.add_argument("--local-steps", type=int, default=20, help="SGD steps per learner per round (default: 20)")
    parser.add_argument("--lr", type=float, default=0.2, help="the learners' SGD learning rate, both ways (default: 0.2)")
    parser.add_argument("--hidden", type=int, default=128, help="the base model's hidden size (default: 128)")
    parser.add_argument("--layers", type=int, default=4, help="the base model's decoder layers (default: 4)")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as directory:
        base = make_tiny_base(Path(directory) / "base", hidden=args.hidden, layers=args.layers)
        untrained = untrained_loss(base)
        for label, (full, share) in WAYS.items():
            results[label] = federation(base, full, share, args)

    print(f"# LoRA adapters against the whole model: a {args.layers}-layer, {args.hidden}-wide Llama-style base, {LEARNERS} learners")
    print(
        f"machine: {provenance.machine()}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"commit {provenance.commit()}; fedavg, {args.rounds} rounds of {args.local_steps} local steps, batch {BATCH}, "
        f"lr {args.lr}; LoRA rank {LORA_RANK} on {', '.join(TARGET_MODULES)}; one federation each way"
    )
    print()
    print(
        "| federated | bytes in per round (updates) | bytes out per round (models) | test loss after round 1 | "
        f"after round {args.rounds} | median s/round |"
    )
    print("|---|---|---|---|---|---|")
    moved = {}
    for label, records in results.items():
        bytes_in = statistics.median(record["bytes_in"] for record in records)
        bytes_out = statistics.median(record["bytes_out"] for record in records)
        moved[label] = bytes_in + bytes_out
        seconds = statistics.median(record["round_seconds"] for record in records)
        print(
            f"| {label} (--share {WAYS[label][1]}) | {bytes_in:,.0f} | {bytes_out:,.0f} | {records[0]['test_loss']:.4f} | "
            f"{records[-1]['test_loss']:.4f} | {seconds:.2f} |"
        )
    print()
    print(f"test loss before training (the base alone: LoRA's B matrices start at zero): {untrained:.4f}")
    full, adapters = moved["full model"], moved["adapters"]
    print(f"bytes per round, full model / adapters = {full:,.0f} / {adapters:,.0f} = {full / adapters:.1f}x")


if __name__ == "__main__":
    main()
