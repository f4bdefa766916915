"""What every benchmark prints about where its figures came from: the commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The short hash of the checked-out commit (empty outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine() -> str:
    """The platform, its CPU count, and the Python and PyTorch versions."""
    return f"{platform.platform()}, {os.cpu_count()} CPUs; python {platform.python_version()}, torch {torch.__version__}"
