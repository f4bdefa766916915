"""The real commands end to end on tiny data, and the one-line errors users meet."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import refusal
from fedgrpc.algorithms import aggregation
from fedgrpc.config import choices
from fedgrpc.config.options import parse_leader_config
from fedgrpc.leader import checkpoint
from fedgrpc.learner.options import parse_learner_config
from fedgrpc.model import MODELS, build_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--model", "tiny-cnn", "--device", "cpu"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_local_federation_trains_and_writes_checkpoints(tmp_path):
    result = run(
        "local_federation.py",
        *TINY,
        "--rounds",
        "3",
        "--aggregation",
        "fedavg",
        "--local-steps",
        "20",
        "--lr",
        "0.05",
        "--run-dir",
        str(tmp_path),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.count("stopping after 3 rounds: training complete") == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoints", "config.json", "leader.log", "metrics.jsonl", "metrics.png"]
    assert json.loads((tmp_path / "config.json").read_text())["local_steps"] == 20
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert "round 3/3" in (tmp_path / "leader.log").read_text()
    record, weights = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))
    assert record["round"] == 3
    accuracies = [json.loads(line)["test_accuracy"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert accuracies[-1] > 0.5, accuracies  # ten classes: chance is 0.1
    model = build_model(record["config"]["model"], record["num_classes"])
    model.load_state_dict(weights)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def _lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)


def test_sigterm_on_the_leader_stops_learners_cleanly(tmp_path):
    leader = subprocess.Popen(
        [
            sys.executable,
            "leader.py",
            *TINY,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--rounds",
            "1000",
            "--aggregation",
            "fedsgd",
            "--run-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(leader.stderr, lines), daemon=True).start()
    port = None
    learners = []
    seen = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = lines.get(timeout=deadline - time.monotonic())
            seen.append(line)
            if port is None and "serving on" in line:
                port = line.split("serving on 127.0.0.1:")[1].split(";")[0]
                learners = [
                    subprocess.Popen(
                        [sys.executable, "learner.py", "--leader", f"127.0.0.1:{port}", "--host", "127.0.0.1", "--device", "cpu"],
                        cwd=ROOT,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(2)
                ]
            if "round 2/1000" in line:
                break
        assert port is not None and learners, "".join(seen)
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(timeout=60) == 130
        for process in learners:
            _, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            assert "leader shutting down" in err and "Traceback" not in err
    finally:
        for process in [leader, *learners]:
            if process.poll() is None:
                process.kill()
    assert checkpoint.latest(tmp_path / "checkpoints") is not None


@pytest.mark.parametrize(
    "flags, message",
    [(["--leader", "no-port-here"], "is not a host:port address"), (["--slowdown", "0.5"], "--slowdown: must be 1 or more, got 0.5")],
)
def test_bad_learner_flags_are_refused_in_one_line(capsys, flags, message):
    assert message in refusal(parse_learner_config, flags, capsys)


def test_learner_errors_are_one_line():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    result = run("learner.py", "--leader", f"127.0.0.1:{free}", "--host", "127.0.0.1", "--connect-timeout", "6")
    assert result.returncode == 1
    assert f"waiting for the leader at 127.0.0.1:{free} (up to 6s)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("learner: no leader answered")
    assert "Traceback" not in result.stderr


def test_leader_errors_are_one_line(tmp_path):
    result = run("leader.py", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"leader: no image folder at {tmp_path / 'nowhere' / 'test'}: expected {tmp_path / 'nowhere' / 'test'}/<class>/<image> files"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("leader.py", *TINY, "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(tmp_path / "busy"))
    assert result.returncode == 2 and "the port is in use" in result.stderr and "Traceback" not in result.stderr
    result = run("leader.py", "--learners", "0")
    assert result.returncode == 2 and "--learners: must be at least 1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("door", ["local_federation.py", "leader.py"])
def test_a_bad_flag_is_answered_before_pytorch_loads(door):
    # -X importtime lists every module the process imported: the leader loads PyTorch once its flags are good, and
    # the launcher leaves it to the leader and learners it starts
    result = run("-X", "importtime", door, "--model", "gpt")
    assert result.returncode == 2 and "invalid choice: 'gpt'" in result.stderr
    imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "fedgrpc.config.options" in imported and "argparse" in imported
    assert not [name for name in imported if name.split(".")[0] in ("torch", "numpy", "grpc")]


def test_the_flag_choices_name_what_the_modules_implement():
    assert choices.MODEL_NAMES == tuple(MODELS)
    assert choices.RULE_NAMES == tuple(aggregation.RULES)
    assert set(choices.FEDOPT_MODES) < set(choices.SERVER_OPTIMIZERS)


def test_an_unknown_model_is_refused_with_the_choices(capsys):
    assert "invalid choice: 'gpt'" in refusal(parse_leader_config, ["--model", "gpt"], capsys)


def test_join_timeout_ends_the_run_with_a_hint(tmp_path):
    result = run("leader.py", *TINY, "--host", "127.0.0.1", "--port", "0", "--join-timeout", "1", "--run-dir", str(tmp_path))
    assert result.returncode == 1
    assert "only 0 of 2 learners registered within 1s" in result.stderr and "python learner.py --leader" in result.stderr
