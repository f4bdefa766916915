"""The leader's run folder: where a new run writes (never over another run's results) and how --resume reads one back."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedgrpc.config.files import flag_value
from fedgrpc.leader.plots import METRICS_FILE

if TYPE_CHECKING:
    from fedgrpc.config.options import LeaderConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # the run's settings, written by the leader's Recorder; --resume reads them back


def expand_resume(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """`--resume RUN_DIR` reads RUN_DIR/config.json and writes into RUN_DIR; flags given after it still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run_dir = flag_value(argv, "--resume")
    if run_dir is None:
        return argv
    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        parser.error(f"--resume {run_dir}: no {CONFIG_FILE} there; pass the directory of a run that leader.py wrote")
    prefix = [] if flag_value(argv, "--config") else ["--config", str(config_file)]
    return [*prefix, "--run-dir", run_dir, *argv]


def resolve_paths(config: LeaderConfig) -> LeaderConfig:
    """Fill in the run directory (runs/<start time>) and the checkpoint directory inside it.

    A new run never writes into a directory that holds another run's results (a reused config.json names
    its run's directory): it gets the next free one beside it, <dir>-2, <dir>-3, ...; --resume continues one.
    """
    run_dir = config.run_dir or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    inside = config.checkpoint_dir is None or Path(config.checkpoint_dir) == Path(run_dir) / "checkpoints"
    if not config.resume:
        base, suffix = run_dir, 1
        while holds_results(Path(run_dir)):
            suffix += 1
            run_dir = f"{base}-{suffix}"
        if run_dir != base:
            logger.warning("%s holds another run's results; this run writes to %s (--resume %s continues that one)", base, run_dir, base)
        if not inside and latest_checkpoint(Path(config.checkpoint_dir)) is not None:
            raise ValueError(
                f"--checkpoint-dir {config.checkpoint_dir} holds another run's checkpoints: pass an empty "
                f"directory, or --resume the run they belong to"
            )
    checkpoint_dir = str(Path(run_dir) / "checkpoints") if inside else config.checkpoint_dir
    return dataclasses.replace(config, run_dir=run_dir, checkpoint_dir=checkpoint_dir)


def holds_results(run_dir: Path) -> bool:
    """Whether a directory holds a run's config, metrics or checkpoints."""
    return (run_dir / CONFIG_FILE).exists() or (run_dir / METRICS_FILE).exists() or latest_checkpoint(run_dir / "checkpoints") is not None


def latest_checkpoint(directory: Path) -> Path | None:
    """checkpoint.latest, imported here: checkpoint.py brings PyTorch, which parsing the flags need not wait for."""
    from fedgrpc.leader import checkpoint

    return checkpoint.latest(directory)
