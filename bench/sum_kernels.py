"""The leader's running sum of updates: what adding one 45 MB float32 update costs in each candidate form.

Today's form (aggregation.RunningMean) adds each update to a float64 sum, so that no finite float32 input can
overflow it and many updates sum without float32's rounding. The candidates keep that precision, or say what
they give up; the float32 sum is the floor (one pass over float32, no guarantee):

    python -m bench.sum_kernels --repeats 7

Prints each form's median seconds per update and its ratio to today's, measured in one run on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from bench import provenance

ELEMENTS = 11_220_000  # ResNet-18's 44.8 MB of float32
STAGING_ELEMENTS = 1 << 20  # float64 elements of the reused promotion buffer (8 MB)
BLOCK = 8  # updates a float32 partial sum takes before it is folded into the float64 total


def timed(step: Callable[[], None], repeats: int) -> float:
    """Median seconds of `step` over `repeats` runs, after one warm-up."""
    step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed additions per form, after one warm-up")
    args = parser.parse_args()
    update = torch.randn(ELEMENTS) * 1e-3
    weight = 0.37
    total64 = torch.zeros(ELEMENTS, dtype=torch.float64)
    total32 = torch.zeros(ELEMENTS)
    compensation, scratch, scaled = torch.zeros(ELEMENTS), torch.zeros(ELEMENTS), torch.zeros(ELEMENTS)
    halves = list(zip(total64.chunk(2), update.chunk(2), strict=True))
    pool = ThreadPoolExecutor(max_workers=2)
    block_count = [0]

    def float64_sum() -> None:
        total64.add_(update, alpha=weight)

    def float32_sum() -> None:
        total32.add_(update, alpha=weight)

    def compensated_float32() -> None:  # Kahan: the float32 sum plus a float32 term holding what each addition lost
        nonlocal total32, scratch
        torch.mul(update, weight, out=scaled)
        scaled.sub_(compensation)
        torch.add(total32, scaled, out=scratch)
        torch.sub(scratch, total32, out=compensation)
        compensation.sub_(scaled)
        total32, scratch = scratch, total32

    def float64_of_a_float64_copy() -> None:  # promote first, then a same-dtype add (one 90 MB copy at a time)
        total64.add_(update.to(torch.float64), alpha=weight)

    staging = torch.empty(STAGING_ELEMENTS, dtype=torch.float64)

    def float64_through_a_staging_block() -> None:  # promote block by block into one reused 8 MB buffer
        for start in range(0, ELEMENTS, STAGING_ELEMENTS):
            piece = update[start : start + STAGING_ELEMENTS]
            block = staging[: piece.numel()]
            block.copy_(piece)
            total64[start : start + piece.numel()].add_(block, alpha=weight)

    def float64_two_threads() -> None:
        list(pool.map(lambda pair: pair[0].add_(pair[1], alpha=weight), halves))

    def float32_blocks_into_float64() -> None:  # float32 partial sums of BLOCK updates, each folded into float64
        total32.add_(update, alpha=weight)
        block_count[0] += 1
        if block_count[0] == BLOCK:
            total64.add_(total32)
            total32.zero_()
            block_count[0] = 0

    forms = {
        "float64 sum (today)": float64_sum,
        "float64 sum of a float64 copy": float64_of_a_float64_copy,
        "float64 sum through an 8 MB float64 staging block": float64_through_a_staging_block,
        "float64 sum, two halves on two threads": float64_two_threads,
        "compensated float32 (Kahan)": compensated_float32,
        f"float32 blocks of {BLOCK}, folded into float64": float32_blocks_into_float64,
        "float32 sum (no precision guarantee: the floor)": float32_sum,
    }
    print(f"# The leader's running sum: one {ELEMENTS * 4 / 1e6:.1f} MB float32 update added, median of {args.repeats}")
    print(f"machine: {provenance.machine()}; commit {provenance.commit()}")
    print()
    print("| form | s per update | / today's |")
    print("|---|---|---|")
    today = timed(float64_sum, args.repeats)
    for name, step in forms.items():
        seconds = today if step is float64_sum else timed(step, args.repeats)
        print(f"| {name} | {seconds:.4f} | {seconds / today:.2f}x |")
    print(f"\ntorch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
