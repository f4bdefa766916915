"""Training throughput in the channels-last memory format against the default, for the models learners train.

One SGD step (forward, backward, update) on a batch of 128 CIFAR-sized images, on every core, timed in
both memory formats in the same run; the learners would use channels-last only where it is faster.

    python -m bench.channels_last --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bench import provenance
from fedgrpc.data import normalize
from fedgrpc.model import build_model

BATCH = 128
MODELS = ("resnet20", "resnet18-cifar", "resnet18", "small-cnn", "tiny-cnn")


def step_seconds(model_name: str, channels_last: bool, steps: int) -> list[float]:
    """Seconds of each of `steps` training steps, after two warm-up steps."""
    torch.manual_seed(0)
    model = build_model(model_name, 10)
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (BATCH,))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seconds = []
    for index in range(steps + 2):
        start = time.perf_counter()
        inputs = normalize(images).contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        if index >= 2:
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    """Time both formats for each model and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model and format")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    commit = provenance.commit()
    print(f"# Training throughput by memory format: batch {BATCH}, 32x32, {torch.get_num_threads()} threads")
    print(f"machine: {provenance.machine()}; commit {commit}; {args.steps} timed steps per row after two warm-up steps")
    print()
    print("| model | default, images/s median (min-max) | channels-last, images/s median (min-max) | channels-last / default |")
    print("|---|---|---|---|")
    for name in MODELS:
        rates = {}
        for channels_last in (False, True):
            per_step = [BATCH / seconds for seconds in step_seconds(name, channels_last, args.steps)]
            rates[channels_last] = per_step
        cells = [f"{statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f})" for r in (rates[False], rates[True])]
        print(f"| {name} | {cells[0]} | {cells[1]} | {statistics.median(rates[True]) / statistics.median(rates[False]):.2f}x |")


if __name__ == "__main__":
    main()
