"""Where a learner's training step goes: its split read on the host against on the device, and the bare step.

Three loops of ResNet-20 steps (batch 128, SGD with momentum, the learners' memory format), each with
the threads one of two learners on this machine gets:

- host split: the learner loop as it was, with the split in host memory. Each step gathers, crops and
  flips its batch on the CPU, copies it to the device, and reads the loss back (a wait for the device).
- device split: the learner loop now, with the split kept on the device. The batch is gathered,
  cropped and flipped there, and the loss is summed there and read once per loop.
- bare step: one batch already on the device, stepped again and again: forward, backward, update.
  No loop that trains on fresh batches can beat it.
- with --compile, the device-split loop again with the model through torch.compile, as learners started
  with --compile train (on CUDA also replayed as CUDA graphs). Its warm-up loop pays the compile.

Prints milliseconds per step (median, min and max over --runs loops of --steps steps) and the ratios,
then a torch.profiler table of the device-split loop. On a CPU the three loops do nearly the same work.

    python -m bench.step_time --device cuda
    python -m bench.step_time --device cpu --steps 3 --runs 1   # a quick check of the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench import provenance
from fedgrpc.data import augment, normalize, resolve_device, training_inputs
from fedgrpc.model import build_model, compiled_for_training, memory_format_for

MODEL = "resnet20"
BATCH = 128
SPLIT = 25_000  # one of two learners' halves of CIFAR-10's 50,000 training images
LEARNERS = 2
PROFILE_ROWS = 15


def main() -> None:
    """Time the three loops, print the table and the profile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="where the model trains: cuda or cpu")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed loop, after a warm-up loop")
    parser.add_argument("--runs", type=int, default=5, help="timed loops of each kind")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the device-split loop with the step compiled, as learners started with --compile run it "
        "(the profile then covers the compiled loop)",
    )
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // LEARNERS))  # as the launcher gives each learner
    torch.manual_seed(0)
    memory_format = memory_format_for("auto", MODEL, device)
    model = build_model(MODEL, 10).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    host_images = torch.randint(0, 256, (SPLIT, 3, 32, 32), dtype=torch.uint8)
    host_labels = torch.randint(0, 10, (SPLIT,))
    device_images, device_labels = host_images.to(device), host_labels.to(device)
    generator = torch.Generator().manual_seed(0)
    fixed = training_inputs(device_images, torch.arange(BATCH), None, memory_format)

    forward: Callable[[torch.Tensor], torch.Tensor] = model

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(inputs), labels)
        loss.backward()
        optimizer.step()
        return loss

    def batches() -> list[torch.Tensor]:
        return [torch.randint(0, SPLIT, (BATCH,), generator=generator) for _ in range(args.steps)]

    def host_split() -> None:
        total = 0.0
        for indices in batches():
            inputs = normalize(augment(host_images[indices], generator).to(device)).contiguous(memory_format=memory_format)
            total += step(inputs, host_labels[indices].to(device)).item() * BATCH

    def device_split() -> None:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for indices in batches():
            indices = indices.to(device)
            inputs = training_inputs(device_images, indices, generator, memory_format)
            total += step(inputs, device_labels[indices]).detach().double() * BATCH
        total.item()

    def bare_step() -> None:
        for _ in range(args.steps):
            step(fixed, device_labels[:BATCH])

    loops: dict[str, Callable[[], None]] = {"host split": host_split, "device split": device_split, "bare step": bare_step}
    times = {name: per_step_ms(loop, device, args) for name, loop in loops.items()}
    if args.compile:  # last, so that the loops above run the model as it is; its warm-up loop pays the compile
        forward = compiled_for_training(model, device)
        times["device split, compiled"] = per_step_ms(device_split, device, args)
    print(f"# {MODEL} training step, batch {BATCH}, --device {device.type}")
    print()
    print(
        f"machine: {provenance.machine()}; commit {provenance.commit()}; {torch.get_num_threads()} threads; "
        f"{args.runs} timed loops of {args.steps} steps each, after one warm-up loop"
    )
    print()
    print("| loop | ms per step, median (min-max) |")
    print("|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) |")
    host, now, bare = (statistics.median(times[name]) for name in loops)
    print()
    print(
        f"host split / device split = {host / now:.2f}x; device split / bare step = {now / bare:.2f}x"
        + (f"; device split / compiled = {now / statistics.median(times['device split, compiled']):.2f}x" if args.compile else "")
    )
    print()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        device_split()
        synchronize(device)
    for sort in ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else []):
        print(f"## torch.profiler, one device-split loop of {args.steps} steps, by {sort}")
        print()
        print(profiler.key_averages().table(sort_by=sort, row_limit=PROFILE_ROWS))


def per_step_ms(loop: Callable[[], None], device: torch.device, args: argparse.Namespace) -> list[float]:
    """Milliseconds per step of each of --runs timed loops, after one untimed loop."""
    loop()
    synchronize(device)
    values = []
    for _ in range(args.runs):
        start = time.perf_counter()
        loop()
        synchronize(device)
        values.append(1000 * (time.perf_counter() - start) / args.steps)
    return values


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
