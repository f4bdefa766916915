"""What a checkpoint costs the leader: one save of ResNet-18's weights and server momentum (90 MB), and its parts.

    python -m bench.checkpoint_save --repeats 10

The save is timed whole (two safetensors files, two JSON files, pruning an old round); then its two
tensor files written as checkpoints write them now and as they were written before (safetensors'
bytes, then SHA-256); then the parts: the hashes over one 45 MB file, safetensors' serialization, and
writing and unlinking a file of that size. Wall and CPU time: what the kernel does for a write's fsync
or an unlink may be a wait on the disk rather than work.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from bench import provenance
from fedgrpc.leader import checkpoint
from fedgrpc.model import build_model

MODEL = "resnet18"
KEEP = 3  # the leader's default --keep-checkpoints: every save from the fourth on prunes a round


def median_ms(repeats: int, call: Callable[[], object], setup: Callable[[], object] = lambda: None) -> tuple[float, float]:
    """Median wall and CPU milliseconds of `call` over `repeats` runs after a warm-up, `setup()` untimed before each."""
    setup()
    call()
    wall, cpu = [], []
    for _ in range(repeats):
        setup()
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main() -> None:
    """Time a save and its parts on one thread and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per row, after one warm-up")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(MODEL, 10)
    state = model.state_dict()
    momentum = {f"{name}.momentum_buffer": torch.randn_like(parameter) for name, parameter in model.named_parameters()}
    data = save_safetensors(dict(state))
    rounds = iter(range(1, 1_000_000))

    with tempfile.TemporaryDirectory(dir=Path.cwd()) as directory:  # the disk checkpoints go to by default
        root = Path(directory)
        for _ in range(KEEP):  # a full directory, so that every timed save prunes a round, as in a long run
            checkpoint.save(root, next(rounds), state, {}, keep=KEEP, optimizer_state=momentum)
        rows = {
            "checkpoint.save: weights and momentum, JSON, prune": median_ms(
                args.repeats, lambda: checkpoint.save(root, next(rounds), state, {}, keep=KEEP, optimizer_state=momentum)
            )
        }
        files = [root / "weights.safetensors", root / "momentum.safetensors"]

        def remove_files() -> None:
            for path in files:
                path.unlink(missing_ok=True)

        def write_now() -> None:
            for path, tensors in zip(files, (state, momentum), strict=False):
                checkpoint._write_tensors(path, tensors)

        def write_before() -> None:  # what _write_tensors did before c5be480
            for path, tensors in zip(files, (state, momentum), strict=False):
                serialized = save_safetensors(dict(tensors))
                checkpoint.atomic_write(path, serialized)
                hashlib.sha256(serialized).hexdigest()

        rows["both tensor files now: straight from memory, CRC-32"] = median_ms(args.repeats, write_now, remove_files)
        rows["both tensor files before: safetensors bytes, SHA-256"] = median_ms(args.repeats, write_before, remove_files)
        rows["SHA-256 of one 45 MB file (what checkpoints recorded before)"] = median_ms(
            args.repeats, lambda: hashlib.sha256(data).digest()
        )
        rows["CRC-32 of one 45 MB file (what they record now)"] = median_ms(args.repeats, lambda: zlib.crc32(data))
        rows["safetensors serialization into bytes (skipped now)"] = median_ms(args.repeats, lambda: save_safetensors(dict(state)))
        target = root / "one.bin"
        rows["write one 45 MB file, fsync, rename"] = median_ms(
            args.repeats, lambda: checkpoint.atomic_write(target, data), lambda: target.unlink(missing_ok=True)
        )
        rows["unlink one 45 MB file"] = median_ms(args.repeats, lambda: os.unlink(target), lambda: checkpoint.atomic_write(target, data))

    print(f"# Checkpoint cost: {MODEL}, {len(data) / 1e6:.1f} MB of weights plus as much momentum")
    print(
        f"machine: {provenance.machine()}; commit {provenance.commit()}; 1 torch thread; "
        f"median of {args.repeats} runs per row after one warm-up; checkpoints in {Path.cwd()}"
    )
    print()
    print("| step | wall ms | CPU ms |")
    print("|---|---|---|")
    for name, (wall, cpu) in rows.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
