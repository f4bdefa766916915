"""Engines that run a whole federation from one command: learners as processes on this machine, or virtual learners
in pools, on Ray or in-process."""

from __future__ import annotations

import os
from pathlib import Path


def import_path() -> str:
    """PYTHONPATH for a process this one starts (a learner, a Ray worker): fedgrpc from where this process imports it,
    then the working directory (where a `--task package.module` lives), then the PYTHONPATH already set."""
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    return os.pathsep.join(filter(None, [package_parent, os.getcwd(), os.environ.get("PYTHONPATH")]))
