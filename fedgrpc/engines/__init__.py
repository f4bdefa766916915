"""Engines that run a whole federation from one command: learners as processes on this machine, or virtual learners
in pools, on Ray or in-process."""

from __future__ import annotations

import os
import site
import sysconfig
from pathlib import Path


def import_path() -> str:
    """PYTHONPATH for a process this one starts (a learner, a Ray worker): fedgrpc's folder where it is not installed
    (a checkout), then the working directory (where a `--task package.module` lives), then the PYTHONPATH already set.

    An installed fedgrpc's site-packages is left out: the child finds it there anyway, and on PYTHONPATH it would
    come before the standard library.
    """
    package_parent = Path(__file__).resolve().parent.parent.parent
    folders = [*site.getsitepackages(), site.getusersitepackages(), *(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))]
    installed = {Path(folder).resolve() for folder in folders}
    parts = [] if package_parent in installed else [str(package_parent)]
    return os.pathsep.join(filter(None, [*parts, os.getcwd(), os.environ.get("PYTHONPATH")]))
