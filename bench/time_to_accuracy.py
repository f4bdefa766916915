"""Time to accuracy: an IID fedavg federation of two learners against centralized training of the same model.

Both sides train ResNet-20 from seed 0 with one recipe: SGD with --lr, momentum 0.9 and weight decay
5e-4, in the memory format learners choose by default, batches of --batch-size with random crop and flip, --warmup
epochs of linear warm-up then cosine decay, --epochs passes over the training set. The learning rate changes at the
federated rounds' boundaries on both sides: with --rounds-per-epoch k the centralized side cuts each epoch into k
even runs of batches, each at the rate of the round that sees as many examples (a warm-up of one epoch with
k = 1 is no warm-up: round r of a W-round warm-up gets r/W of --lr). The federation does one local epoch per round (each
learner one pass over its half), so federated round r and centralized epoch r have seen the same
number of examples. Both evaluate the whole test set after every epoch. The centralized side runs in
this process on every core; the federation is `local_federation.py`, which splits the cores between
its two learners (--learners 1: one learner holding the whole set, which leaves only the federation's
machinery between it and centralized training). Reports each epoch's accuracy and elapsed seconds,
the wall time to --target, the final accuracies, and the ratios the goals are stated in. With
--compress, one federation per mode; with --seeds, the whole comparison once per seed, then each seed's ratio and
their median.

    python -m bench.time_to_accuracy --data-dir DIR --epochs 50 --out time-to-accuracy-run.md   # docs/time-to-accuracy.md collects runs
    python -m bench.time_to_accuracy --dataset synthetic --model tiny-cnn --epochs 2   # a quick check
    python -m bench.time_to_accuracy --data-dir DIR --epochs 2 --target 0.45 --seeds 0,1,2   # one ratio per seed, and the median
    python -m bench.time_to_accuracy --data-dir DIR --device cuda   # both sides on the GPU
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import provenance
from bench import report as report_file
from fedgrpc.algorithms import schedule
from fedgrpc.data import derive_seed, load_dataset, normalize, resolve_device, training_inputs
from fedgrpc.leader import plots
from fedgrpc.learner.training import batches_per_epoch
from fedgrpc.model import build_model, compiled_for_training, memory_format_for

ROOT = Path(__file__).resolve().parent.parent
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
EVAL_BATCH = 1000
FEDERATION_TIMEOUT_S = 24 * 3600


def centralized(args: argparse.Namespace) -> list[tuple[float, float]]:
    """Train on the whole training set in this process; (accuracy, elapsed seconds) after each epoch."""
    torch.set_num_threads(os.cpu_count() or 1)
    train = load_dataset(args.dataset, args.data_dir, train=True, seed=args.seed)
    test = load_dataset(args.dataset, args.data_dir, train=False, seed=args.seed)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the leader seeds the same way before it builds the model
    memory_format = memory_format_for("auto", args.model, device)  # the learners' default choice
    model = build_model(args.model, train.num_classes).to(device, memory_format=memory_format)
    images, labels = train.images.to(device), train.labels.to(device)  # kept where the model trains, as a learner does
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    forward = compiled_for_training(model, device) if args.compile else model  # as learners started with --compile do
    history = []
    start = time.monotonic()
    per_epoch = args.rounds_per_epoch
    firsts = range(0, len(train), args.batch_size)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(derive_seed(args.seed, "epoch", epoch)))
        generator = torch.Generator().manual_seed(derive_seed(args.seed, "augment", epoch))
        for index, first in enumerate(firsts):
            # the learning rate of the federated round that sees these examples: with --rounds-per-epoch k the
            # epoch's batches are cut into k even runs, and both sides warm up and decay by examples seen
            number = (epoch - 1) * per_epoch + index * per_epoch // len(firsts) + 1
            for group in optimizer.param_groups:
                group["lr"] = schedule.round_lr(args.lr, "cosine", args.warmup * per_epoch, args.epochs * per_epoch, number)
            indices = order[first : first + args.batch_size].to(device)
            optimizer.zero_grad(set_to_none=True)
            inputs = training_inputs(images, indices, generator, memory_format)
            F.cross_entropy(forward(inputs), labels[indices]).backward()
            optimizer.step()
        history.append((accuracy(model, test.images, test.labels, device), time.monotonic() - start))
        print(f"centralized epoch {epoch}: {100 * history[-1][0]:.2f}% at {history[-1][1]:.0f} s", flush=True)
    return history


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device = torch.device("cpu")) -> float:
    """Test accuracy, evaluated as the leader does (inference mode, batches of 1000)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for first in range(0, len(labels), EVAL_BATCH):
            logits = model(normalize(images[first : first + EVAL_BATCH].to(device)))
            correct += int((logits.argmax(1).cpu() == labels[first : first + EVAL_BATCH]).sum())
    return correct / max(1, len(labels))


def federated(args: argparse.Namespace, compress: str) -> tuple[list[tuple[float, float]], int]:
    """Run the federation; (accuracy, elapsed seconds) after each epoch, and the median update bytes per round."""
    return finish_federation(args, compress, start_federation(args, compress))


def start_federation(args: argparse.Namespace, compress: str) -> tuple[subprocess.Popen, tempfile.TemporaryDirectory]:
    """Launch the federation in the background; finish_federation waits for it and reads its metrics."""
    per_epoch = args.rounds_per_epoch
    rounds = args.epochs * per_epoch
    work = ["--local-epochs", "1"] if per_epoch == 1 else ["--local-steps", str(local_steps(args))]
    run_dir = tempfile.TemporaryDirectory(prefix="fl-tta-")
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
        str(args.learners),
        "--partition",
        "iid",
        "--aggregation",
        "fedavg",
        *work,
        "--rounds",
        str(rounds),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--momentum",
        str(MOMENTUM),
        "--weight-decay",
        str(WEIGHT_DECAY),
        "--lr-schedule",
        "cosine",
        "--warmup-rounds",
        str(args.warmup * per_epoch),
        "--eval-every",
        str(per_epoch),
        "--checkpoint-every",
        str(rounds),
        "--compress",
        compress,
        "--server-lr",
        str(args.server_lr),
        "--server-opt",
        args.server_opt,
        "--server-momentum",
        str(args.server_momentum),
        "--recompute-bn",
        str(args.recompute_bn),
        "--seed",
        str(args.seed),
        "--keep-momentum" if args.keep_momentum else "--no-keep-momentum",
        "--prox-mu",
        str(args.prox_mu),
        "--quiet",
        "--run-dir",
        run_dir.name,
        "--checkpoint-dir",
        str(Path(run_dir.name) / "checkpoints"),
    ]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.compile:
        command.append("--learner-compile")
    return subprocess.Popen(command, cwd=ROOT), run_dir


def finish_federation(
    args: argparse.Namespace, compress: str, started: tuple[subprocess.Popen, tempfile.TemporaryDirectory]
) -> tuple[list[tuple[float, float]], int]:
    """Wait for a started federation; (accuracy, elapsed seconds) after each epoch, and the median update bytes per round."""
    process, run_dir = started
    per_epoch = args.rounds_per_epoch
    with run_dir:
        try:
            status = process.wait(timeout=FEDERATION_TIMEOUT_S)
        finally:
            process.kill()  # a no-op once it has exited; a federation past its bound is not left running
        if status != 0:
            raise subprocess.CalledProcessError(status, process.args)
        records = plots.read_metrics(Path(run_dir.name))
    bytes_in = sorted(record["bytes_in"] for record in records)[len(records) // 2]
    records = [record for record in records if record["round"] % per_epoch == 0]  # the rounds that end an epoch
    for record in records:
        print(
            f"federated ({compress}) epoch {record['round'] // per_epoch}: {100 * record['test_accuracy']:.2f}% "
            f"at {record['elapsed_seconds']:.0f} s",
            flush=True,
        )
    return [(record["test_accuracy"], record["elapsed_seconds"]) for record in records], bytes_in


def local_steps(args: argparse.Namespace) -> int:
    """Each learner's batches per round when --rounds-per-epoch splits its epoch; refuses a split that is not even."""
    size = -(-len(load_dataset(args.dataset, args.data_dir, train=True, seed=args.seed)) // args.learners)  # the larger IID part
    steps, rest = divmod(batches_per_epoch(size, args.batch_size), args.rounds_per_epoch)
    if rest:
        raise SystemExit(
            f"--rounds-per-epoch {args.rounds_per_epoch} does not divide a learner's "
            f"{steps * args.rounds_per_epoch + rest} batches an epoch; pick a divisor"
        )
    return steps


def seed_list(text: str) -> list[int]:
    """--seeds: distinct integers separated by commas."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"each seed once, got {text!r}")
    return seeds


def time_to(history: list[tuple[float, float]], target: float) -> float | None:
    """Elapsed seconds at the first epoch whose accuracy reaches `target`, or None."""
    return next((seconds for value, seconds in history if value >= target), None)


def main() -> int:
    """Run the centralized side, then one federation per --compress mode (or one beside it), and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="imagefolder", help="imagefolder (the CIFAR-10 JPEG copy), cifar10 or synthetic")
    parser.add_argument("--data-dir", default=None, help="the extracted data set (with train/ and test/ for imagefolder)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument(
        "--seed", type=int, default=0, help="the seed of both sides: the initial model, batch order, augmentation and the learners' split"
    )
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help="comma-separated seeds: the whole comparison once per seed, then each seed's time-to-target ratio and "
        "their median (a one-epoch reading under a climbing rate moves by points from seed to seed)",
    )
    parser.add_argument("--epochs", type=int, default=50, help="epochs on each side (federated rounds of one local epoch)")
    parser.add_argument("--warmup", type=int, default=2, help="epochs of linear learning-rate warm-up")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--target", type=float, default=0.85, help="the accuracy whose wall time is compared")
    parser.add_argument("--compress", default="none", help="comma-separated --compress modes, one federation each")
    parser.add_argument(
        "--server-lr",
        type=float,
        default=1.0,
        help="the leader's step on the averaged update (1: plain FedAvg; 2 moves the global model twice as far)",
    )
    parser.add_argument("--server-opt", default="sgd", help="the leader's --server-opt: sgd (plain FedAvg) or sgdm (FedAvgM)")
    parser.add_argument(
        "--server-momentum",
        type=float,
        default=0.0,
        help="the leader's --server-momentum, with --server-opt sgdm (0.5 doubles a steady step); default 0",
    )
    parser.add_argument(
        "--recompute-bn",
        type=int,
        default=0,
        help="the leader's --recompute-bn: training images its BatchNorm statistics are recomputed from each round",
    )
    parser.add_argument(
        "--prox-mu",
        type=float,
        default=0.0,
        help="the leader's --prox-mu: FedProx's pull of each learner toward the round's global model (0: off)",
    )
    parser.add_argument(
        "--keep-momentum",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the leader's --keep-momentum (its default here): learners keep their SGD momentum from round to round, "
        "as the centralized side keeps it from epoch to epoch; --no-keep-momentum starts each round from none",
    )
    parser.add_argument(
        "--centralized",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the centralized side too (--no-centralized: only the federations, e.g. to compare --compress modes)",
    )
    parser.add_argument(
        "--federated",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the federation too (--no-federated: only the centralized side, e.g. at another batch size)",
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="start the federation before the centralized side, so that both share the machine at once "
        "(on a GPU whose steps are bound by the host, each side keeps its own cores); off by default",
    )
    parser.add_argument(
        "--learners",
        type=int,
        default=2,
        help="learners in the federation, splitting the training set and the cores evenly (2: the goals' set-up; "
        "1 holds the whole set, a control for what the split and averaging cost)",
    )
    parser.add_argument(
        "--rounds-per-epoch",
        type=int,
        default=1,
        help="federated rounds per epoch (2: rounds of half an epoch, averaged twice as often); 1 is the goals' set-up",
    )
    parser.add_argument("--device", default="cpu", help="where both sides train and test: cpu or cuda (the leader and learners too)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both sides' training steps (learners get --compile); on CUDA as CUDA graphs too",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args()
    if args.learners < 1:
        parser.error(f"--learners must be at least 1, got {args.learners}")
    if args.rounds_per_epoch < 1:
        parser.error(f"--rounds-per-epoch must be at least 1, got {args.rounds_per_epoch}")
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as error:
        parser.error(str(error))
    if args.dataset != "synthetic" and not args.data_dir:
        parser.error(f"--dataset {args.dataset} needs --data-dir (the CIFAR-10 JPEG copy, extracted)")
    modes = args.compress.split(",") if args.federated else []
    if not (modes or args.centralized):
        parser.error("--no-federated with --no-centralized leaves nothing to run")
    if args.side_by_side and (len(modes) != 1 or not args.centralized):
        parser.error("--side-by-side runs one federation beside the centralized side: give one --compress mode, with --centralized")
    seeds = [args.seed] if args.seeds is None else args.seeds
    lines: list[str] = []
    ratios: dict[int, dict[str, float | None]] = {}
    for seed in seeds:
        args.seed = seed
        seed_lines, ratios[seed] = compare(args, modes)
        print("\n".join(seed_lines), flush=True)
        lines += seed_lines + [""]
    if len(seeds) > 1:
        summary = seeds_summary(ratios, args.target)
        print("\n".join(summary), flush=True)
        lines += summary
    report_file.save(lines, args.out)
    return 0


def compare(args: argparse.Namespace, modes: list[str]) -> tuple[list[str], dict[str, float | None]]:
    """One seed's comparison: the report's lines, and each federation's time to --target over centralized's (None: not reached)."""
    started = start_federation(args, modes[0]) if args.side_by_side else None
    try:
        central = centralized(args) if args.centralized else []
    except BaseException:
        if started is not None:
            started[0].kill()  # not left training on its own
        raise
    runs = {mode: finish_federation(args, mode, started) if started is not None else federated(args, mode) for mode in modes}
    commit = provenance.commit()
    columns = (["centralized"] if central else []) + [f"federated ({mode})" for mode in runs]
    lines = [
        f"# Time to accuracy: {args.model}, {args.dataset}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
        f"{args.warmup} warm-up epochs then cosine"
        + (f", the lr set {args.rounds_per_epoch} times an epoch on both sides" if args.rounds_per_epoch > 1 else ""),
        "",
        f"- machine: {provenance.machine()}; --device {args.device}"
        + ("; training steps compiled (--compile)" if args.compile else "")
        + f"; commit {commit}; seed {args.seed}; one run of each"
        + ("; the two sides ran side by side, sharing the machine" if args.side_by_side else ""),
        f"- federated: {args.learners} learner{'s' if args.learners != 1 else ''}, IID, fedavg with server step {args.server_lr:g}"
        + (f" and server momentum {args.server_momentum:g}, " if args.server_opt == "sgdm" else ", ")
        + ("learners keep their momentum across rounds, " if args.keep_momentum else "")
        + (f"FedProx mu {args.prox_mu:g}, " if args.prox_mu else "")
        + ("one local epoch per round, " if args.rounds_per_epoch == 1 else f"{args.rounds_per_epoch} rounds per local epoch, ")
        + (
            f"BatchNorm statistics recomputed from {args.recompute_bn} training images each round"
            if args.recompute_bn
            else "BatchNorm statistics averaged"
        )
        if runs
        else "- federated: not run (--no-federated)",
        "",
        "| epoch | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    histories = ([central] if central else []) + [history for history, _ in runs.values()]
    for epoch in range(1, args.epochs + 1):
        cells = [
            f"{100 * history[epoch - 1][0]:.2f}% ({history[epoch - 1][1]:.0f} s)" if epoch <= len(history) else "-" for history in histories
        ]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    central_time = time_to(central, args.target)
    lines += [
        "",
        f"| run | final accuracy | minus centralized, points | time to {100 * args.target:.0f}%, s | "
        "against centralized | update bytes per round |",
        "|---|---|---|---|---|---|",
    ]
    if central:
        lines.append(f"| centralized | {100 * central[-1][0]:.2f}% | - | {_seconds(central_time)} | 1.00x | - |")
    ratios: dict[str, float | None] = {}
    for mode, (history, bytes_in) in runs.items():
        reached = time_to(history, args.target)
        ratios[mode] = reached / central_time if reached is not None and central_time else None
        ratio = "-" if ratios[mode] is None else f"{ratios[mode]:.2f}x"
        gap = f"{100 * (history[-1][0] - central[-1][0]):+.2f}" if central else "-"
        lines.append(f"| federated ({mode}) | {100 * history[-1][0]:.2f}% | {gap} | {_seconds(reached)} | {ratio} | {bytes_in:,} |")
    return lines, ratios


def seeds_summary(ratios: dict[int, dict[str, float | None]], target: float) -> list[str]:
    """Each seed's time-to-target ratio per federation and their median (a federation that did not reach it counts as slowest)."""
    modes = list(next(iter(ratios.values())))
    lines = [
        f"## Time to {100 * target:.0f}% against centralized, by seed",
        "",
        "| seed | " + " | ".join(f"federated ({mode})" for mode in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for seed, by_mode in ratios.items():
        lines.append(f"| {seed} | " + " | ".join(_ratio(by_mode[mode]) for mode in modes) + " |")
    medians = [statistics.median(math.inf if by_mode[mode] is None else by_mode[mode] for by_mode in ratios.values()) for mode in modes]
    lines.append("| median | " + " | ".join(_ratio(None if median == math.inf else median) for median in medians) + " |")
    return lines


def _ratio(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}x"


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    sys.exit(main())
