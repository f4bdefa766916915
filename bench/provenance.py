"""What every benchmark prints about where its figures came from: the commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """$BENCH_COMMIT if set (for a copy of a tree whose git metadata is absent or stale), else the checked-out commit."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on this machine
        return ""


def machine() -> str:
    """The platform, its CPU count, the GPU if there is one, and the Python and PyTorch versions."""
    return f"{platform.platform()}, {os.cpu_count()} CPUs{gpu()}; python {platform.python_version()}, torch {torch.__version__}"


def gpu() -> str:
    """', ' and the CUDA card's name, memory and CUDA version, or '' where there is none."""
    if not torch.cuda.is_available():
        return ""
    card = torch.cuda.get_device_properties(0)
    return f", {card.name} ({card.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
