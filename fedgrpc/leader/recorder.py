"""The run directory: resolved config, one metrics.jsonl line per round, optional TensorBoard, the final plot."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fedgrpc.config.run_dir import CONFIG_FILE
from fedgrpc.leader import checkpoint, plots

logger = logging.getLogger(__name__)


class TensorBoardMissing(ImportError):
    """--tensorboard was asked for but the package is not installed."""


def tensorboard_writer(log_dir: Path) -> Any:
    """A TensorBoard SummaryWriter, or TensorBoardMissing with the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardMissing("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(log_dir))


class Recorder:
    """Writes what a run produces into its directory."""

    def __init__(self, run_dir: Path, config: dict[str, Any], tensorboard: bool = False, keep_rounds_before: int = 1) -> None:
        """Start (or, for a resumed run, continue) a run directory; metrics of rounds >= keep_rounds_before are dropped."""
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(run_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
        self.metrics_path = run_dir / plots.METRICS_FILE
        if self.metrics_path.is_file():
            # a run killed after its checkpoint but before (or during) its metrics line is replayed from there
            kept = [record for record in plots.read_metrics(run_dir) if record["round"] < keep_rounds_before]
            checkpoint.atomic_write(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
        self._writer = tensorboard_writer(run_dir / "tensorboard") if tensorboard else None

    def ensure_recorded(self, metrics: dict[str, Any]) -> None:
        """Record a round's metrics unless a line for that round is already there."""
        existing = plots.read_metrics(self.run_dir, missing_ok=True)
        if all(record["round"] != metrics["round"] for record in existing):
            self.record(metrics)

    def record(self, metrics: dict[str, Any]) -> None:
        """Append one round's metrics as a JSON line (flushed to disk) and to TensorBoard."""
        with open(self.metrics_path, "a") as file:
            file.write(json.dumps(metrics, sort_keys=True) + "\n")
            file.flush()
            os.fsync(file.fileno())
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "round":
                    self._writer.add_scalar(key, value, metrics["round"])
            self._writer.flush()

    def close(self) -> Path | None:
        """Finish TensorBoard and draw the run's plot; returns the PNG path, if any rounds were recorded."""
        if self._writer is not None:
            self._writer.close()
        if not self.metrics_path.is_file():
            return None
        return plots.plot_runs([self.run_dir], self.run_dir / plots.PLOT_FILE)
