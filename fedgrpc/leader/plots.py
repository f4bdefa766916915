"""Plots of recorded runs: accuracy, loss (the leader's and the learners' evaluations) and bytes per round, from metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def read_metrics(run_dir: Path, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The per-round records of a run directory; a torn last line (a run killed mid-write) is skipped.

    A directory without metrics gives [] with `missing_ok` (a run that has not finished a round yet), else an error.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a run directory written by leader.py?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Draw every run's accuracy, loss and bytes per round on one figure and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (accuracy_axes, loss_axes, bytes_axes) = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    for index, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        label = labels[index] if labels else run_dir.name
        rounds = [record["round"] for record in records]
        evaluated = [record for record in records if record["test_accuracy"] is not None]  # --eval-every skips rounds
        accuracy_axes.plot(
            [record["round"] for record in evaluated], [100 * record["test_accuracy"] for record in evaluated], marker="o", label=label
        )
        tested = [record for record in records if record["test_loss"] is not None]
        loss_axes.plot(
            [record["round"] for record in tested], [record["test_loss"] for record in tested], marker="o", label=f"{label} test"
        )
        loss_axes.plot(rounds, [record["train_loss"] for record in records], linestyle="--", label=f"{label} train")
        # the learners' own evaluations: their example-weighted mean, and the band from the lowest to the highest
        for axes, name, scale in ((accuracy_axes, "fed_eval_accuracy", 100), (loss_axes, "fed_eval_loss", 1)):
            federated = [record for record in records if name in record]
            if federated:
                at = [record["round"] for record in federated]
                line = axes.plot(at, [scale * record[name] for record in federated], marker="s", label=f"{label} learners' mean")[0]
                low, high = ([scale * record[f"{name}_{end}"] for record in federated] for end in ("min", "max"))
                axes.fill_between(at, low, high, color=line.get_color(), alpha=0.15, label=f"{label} learners' min-max")
        bytes_axes.plot(rounds, [(record["bytes_in"] + record["bytes_out"]) / 1e6 for record in records], marker="o", label=label)
    accuracy_axes.set(title="Test accuracy", xlabel="round", ylabel="%")
    loss_axes.set(title="Loss", xlabel="round", ylabel="the task's loss")
    bytes_axes.set(title="Bytes moved (in + out)", xlabel="round", ylabel="MB")
    bytes_axes.set_ylim(bottom=0)
    for axes in (accuracy_axes, loss_axes, bytes_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    """Plot one or more run directories into a PNG."""
    parser = argparse.ArgumentParser(description="Plot the metrics of one or more runs on one figure.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    parser.add_argument(
        "--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/metrics.png for one run, comparison.png for several)"
    )
    parser.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run (default: directory names)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.run_dirs):
        parser.error(f"{len(args.labels)} labels for {len(args.run_dirs)} runs")
    out = args.out or (args.run_dirs[0] / PLOT_FILE if len(args.run_dirs) == 1 else Path("comparison.png"))
    try:
        plot_runs(args.run_dirs, out, args.labels)
    except (FileNotFoundError, KeyError) as error:
        print(f"plots: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
