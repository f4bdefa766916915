"""Random crop and flip of one batch: `utils.augment` against indexing with one tensor per dimension, and against a step.

Both ways compute the same batch from the same draws (checked here before timing). The training step
(ResNet-20 forward, backward and SGD update on the same batch, in the learners' memory format) shows
what share of a learner's step the augmentation is on this machine.

    python -m bench.augment --runs 50
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from bench import provenance
from bench.wire import timed
from fedgrpc.data import CROP_PADDING, augment, normalize
from fedgrpc.model import build_model, memory_format_for

BATCH = 128
MODEL = "resnet20"
STEP_RUNS = 5


def indexed_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same crop and flip by indexing the padded batch with one tensor per dimension, then flipping."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    shifts = torch.randint(0, 2 * CROP_PADDING + 1, (2, batch), generator=generator)
    rows = (torch.arange(height).view(1, -1) + shifts[0].view(-1, 1)).view(batch, 1, height, 1)
    columns = (torch.arange(width).view(1, -1) + shifts[1].view(-1, 1)).view(batch, 1, 1, width)
    cropped = padded[torch.arange(batch).view(-1, 1, 1, 1), torch.arange(channels).view(1, -1, 1, 1), rows, columns]
    flip = (torch.rand(batch, generator=generator) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, cropped.flip(3), cropped)


def main() -> None:
    """Check that both ways agree, time them at one thread and at every core, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed batches per row, after one warm-up batch")
    args = parser.parse_args()
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        if not torch.equal(
            augment(images, torch.Generator().manual_seed(seed)), indexed_augment(images, torch.Generator().manual_seed(seed))
        ):
            raise SystemExit(f"utils.augment and the indexed version disagree for seed {seed}")
    cores = torch.get_num_threads()
    print(f"# Crop and flip of a batch of {BATCH} 32x32 images")
    print(
        f"machine: {provenance.machine()}; commit {provenance.commit()}; {args.runs} timed batches per row after one warm-up, "
        f"{STEP_RUNS} timed {MODEL} steps"
    )
    print()
    print(
        "| threads | indexed, ms median (min-max) | utils.augment, ms median (min-max) | indexed / augment | "
        f"{MODEL} step, ms median | augment / step |"
    )
    print("|---|---|---|---|---|---|")
    model = build_model(MODEL, 10)
    memory_format = memory_format_for("auto", MODEL, torch.device("cpu"))
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    labels = torch.randint(0, 10, (BATCH,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(normalize(images).contiguous(memory_format=memory_format)), labels).backward()
        optimizer.step()

    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        generator = torch.Generator().manual_seed(0)
        old = [1000 * seconds for seconds in timed(lambda: indexed_augment(images, generator), args.runs)]
        new = [1000 * seconds for seconds in timed(lambda: augment(images, generator), args.runs)]
        steps = [1000 * seconds for seconds in timed(step, STEP_RUNS)]
        print(
            f"| {threads} | {statistics.median(old):.2f} ({min(old):.2f}-{max(old):.2f}) | "
            f"{statistics.median(new):.2f} ({min(new):.2f}-{max(new):.2f}) | {statistics.median(old) / statistics.median(new):.1f}x | "
            f"{statistics.median(steps):.0f} | {100 * statistics.median(new) / statistics.median(steps):.2f}% |"
        )


if __name__ == "__main__":
    main()
