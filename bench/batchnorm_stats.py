"""Whether a checkpoint's test accuracy is held back by its BatchNorm statistics: evaluated as saved, then recomputed.

The leader sets every BatchNorm running mean and variance to the learners' average, while the weights
move by the server's step on the averaged update, or, under --compress topk, by the entries sent. When
the two disagree, the saved statistics no longer describe what the saved weights compute. This
evaluates a checkpoint's weights as saved, then again after recomputing every BatchNorm layer's
statistics from the whole training set (weights untouched; `model.recompute_batchnorm`, what the
leader's --recompute-bn does on a sample): a large gain says the saved statistics, not the weights,
were what failed. The statistics are recomputed twice: from the images as they are (what --recompute-bn
does), and from them cropped and flipped as the learners' training batches are, whose statistics the
learners' running averages track.

    python -m bench.batchnorm_stats --checkpoint RUN/checkpoints/latest.json --data-dir DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench import provenance
from bench.time_to_accuracy import accuracy
from fedgrpc.data import derive_seed, load_dataset, normalize, training_inputs
from fedgrpc.leader import checkpoint
from fedgrpc.model import build_model, recompute_batchnorm

BATCH = 1000
SEED = 0


def main() -> int:
    """Evaluate the checkpoint both ways and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint's JSON (round-NNNNN.json or latest.json)")
    parser.add_argument("--dataset", default="imagefolder", help="imagefolder (the CIFAR-10 JPEG copy), cifar10 or synthetic")
    parser.add_argument("--data-dir", default=None, help="the extracted data set (with train/ and test/ for imagefolder)")
    args = parser.parse_args()
    record, weights = checkpoint.load(args.checkpoint)
    model = build_model(record["config"]["model"], record["num_classes"])
    model.load_state_dict(weights)
    train = load_dataset(args.dataset, args.data_dir, train=True)
    test = load_dataset(args.dataset, args.data_dir, train=False)
    saved = accuracy(model, test.images, test.labels)
    recompute_batchnorm(model, (normalize(train.images[first : first + BATCH]) for first in range(0, len(train), BATCH)))
    recomputed = accuracy(model, test.images, test.labels)
    generator = torch.Generator().manual_seed(derive_seed(SEED, "batchnorm", "augment"))
    order = torch.arange(len(train))
    recompute_batchnorm(
        model, (training_inputs(train.images, order[first : first + BATCH], generator) for first in range(0, len(train), BATCH))
    )
    augmented = accuracy(model, test.images, test.labels)
    config = record["config"]
    print(f"# BatchNorm statistics: {config['model']} after round {record['round']}, {args.dataset}")
    print(f"machine: {provenance.machine()}; commit {provenance.commit()}; checkpoint {args.checkpoint}")
    print(
        f"run: --aggregation {config['aggregation']} --compress {config['compress']} --server-opt {config['server_opt']} "
        f"--server-lr {config['server_lr']:g}" + (" --keep-momentum" if config.get("keep_momentum") else "")
    )
    print()
    print("| statistics | test accuracy |")
    print("|---|---|")
    print(f"| as saved (the learners' average) | {100 * saved:.2f}% |")
    print(f"| recomputed on the {len(train):,} training images | {100 * recomputed:.2f}% |")
    print(f"| recomputed on them cropped and flipped, as training batches are | {100 * augmented:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
