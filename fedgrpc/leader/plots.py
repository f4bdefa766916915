"""Plots of recorded runs: accuracy, loss (the leader's and the learners' evaluations) and bytes per round, from metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import math
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
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _is_number(record.get("round")):
            records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """The rounds and values of the records that hold a number under `key` (--eval-every skips rounds)."""
    pairs = [(record["round"], scale * record[key]) for record in records if _is_number(record.get(key))]
    return [at for at, _ in pairs], [value for _, value in pairs]


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
        accuracy_axes.plot(*_points(records, "test_accuracy", 100), marker="o", label=label)
        loss_axes.plot(*_points(records, "test_loss"), marker="o", label=f"{label} test")
        loss_axes.plot(*_points(records, "train_loss"), linestyle="--", label=f"{label} train")
        # the learners' own evaluations: their example-weighted mean, and the band from the lowest to the highest
        for axes, name, scale in ((accuracy_axes, "fed_eval_accuracy", 100), (loss_axes, "fed_eval_loss", 1)):
            at, mean = _points(records, name, scale)
            if at:
                line = axes.plot(at, mean, marker="s", label=f"{label} learners' mean")[0]
                band = [r for r in records if all(_is_number(r.get(f"{name}{end}")) for end in ("", "_min", "_max"))]
                low, high = ([scale * r[f"{name}_{end}"] for r in band] for end in ("min", "max"))
                axes.fill_between(
                    [r["round"] for r in band], low, high, color=line.get_color(), alpha=0.15, label=f"{label} learners' min-max"
                )
        moved = [
            {"round": r["round"], "mb": (r["bytes_in"] + r["bytes_out"]) / 1e6}
            for r in records
            if _is_number(r.get("bytes_in")) and _is_number(r.get("bytes_out"))
        ]
        bytes_axes.plot(*_points(moved, "mb"), marker="o", label=label)
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
