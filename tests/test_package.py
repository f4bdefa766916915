"""`pip install .`: one import name, four commands, and nothing generic at the top of site-packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The checkout installed with pip into a folder of its own (dependencies come from this interpreter)."""
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(ROOT / "fedgrpc", source / "fedgrpc", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def run_installed(installed: Path, cwd: Path, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command run where the checkout is not importable: only the installed package (and this Python's) is."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_install_puts_one_name_at_the_top_of_site_packages(installed):
    top = sorted(path.name for path in installed.iterdir())
    assert top == ["bin", "fedgrpc", "fedgrpc-0.6.0.dist-info"]
    commands = sorted(path.name for path in (installed / "bin").iterdir())
    assert commands == ["fedgrpc-launch", "fedgrpc-leader", "fedgrpc-learner", "fedgrpc-provision"]
    roles = sorted(path.name for path in (installed / "fedgrpc").iterdir() if path.is_dir() and path.name != "__pycache__")
    assert roles == ["algorithms", "config", "engines", "leader", "learner", "protos", "transport"]
    assert (installed / "fedgrpc" / "protos" / "leader.proto").is_file()


def test_installed_package_gives_the_client_api_and_the_commands(installed, tmp_path):
    imported = run_installed(installed, tmp_path, sys.executable, "-c", "import fedgrpc; print(fedgrpc.__file__, fedgrpc.join.__module__)")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == [str(installed / "fedgrpc" / "__init__.py"), "fedgrpc.client"]
    for command in ("fedgrpc-leader", "fedgrpc-learner", "fedgrpc-launch", "fedgrpc-provision"):
        helped = run_installed(installed, tmp_path, str(installed / "bin" / command), "--help")
        assert helped.returncode == 0, helped.stderr
        assert helped.stdout.startswith(f"usage: {command} ")
    refused = run_installed(installed, tmp_path, str(installed / "bin" / "fedgrpc-leader"), "--rounds", "0")
    assert refused.returncode == 2 and refused.stderr.startswith("fedgrpc-leader: error: argument --rounds")


def test_installed_launcher_runs_a_round_away_from_the_checkout(installed, tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--learners", "2", "--rounds", "1", "--model", "tiny-cnn", "--dataset", "synthetic", "--run-dir", str(run_dir)]
    finished = run_installed(installed, tmp_path, str(installed / "bin" / "fedgrpc-launch"), *flags, "-q", timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
