"""Faults during a run: a learner that dies mid-round, a process killed while it writes checkpoints."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import checkpoint
from conftest import leader_config, running_leader

ROOT = Path(__file__).resolve().parent.parent


def learner_process(address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "learner.py", "--leader", address, "--host", "127.0.0.1", "--device", "cpu", "--threads", "1"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)  # polling our own in-process state, not waiting on a peer


def test_learner_killed_mid_round_leaves_a_quorum_that_finishes_the_run(tmp_path):
    config = leader_config(tmp_path, learners=3, min_learners=2, round_timeout=8.0, rounds=3,
                           aggregation="fedavg", local_steps=2, batch_size=16)
    with running_leader(config) as running:
        processes = [learner_process(running.address) for _ in range(3)]
        try:
            result: dict = {}
            runner = threading.Thread(target=lambda: result.setdefault("history", running.leader.run()), daemon=True)
            runner.start()
            wait_until(lambda: running.leader._round.number == 1)
            processes[2].send_signal(signal.SIGKILL)
            runner.join(120)
            assert not runner.is_alive()
            history = result["history"]
            assert [entry["learners_reported"] for entry in history] == [2, 2, 2]
            assert [entry["learners_dropped"] for entry in history] == [1, 1, 1]
            for process in processes[:2]:
                _, err = process.communicate(timeout=60)
                assert process.returncode == 0, err
                assert "stopping after 3 rounds: training complete" in err
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()


WRITER = """
import sys, torch, checkpoint
from pathlib import Path
directory, start = Path(sys.argv[1]), int(sys.argv[2])
for number in range(start, start + 1000):
    checkpoint.save(directory, number, {"w": torch.full((2_000_000,), float(number))}, {"metrics": {}}, keep=2)
    print(number, flush=True)
"""


def test_sigkill_while_checkpointing_leaves_the_previous_checkpoint_loadable(tmp_path):
    generator = random.Random(0)
    start = 1
    for _ in range(5):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(start)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            writer.stdout.readline()  # one complete checkpoint, then kill it somewhere inside a later write
            time.sleep(generator.uniform(0.0, 0.3))  # a random moment in the writer's loop, not a wait for a peer
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        finally:
            if writer.poll() is None:
                writer.kill()
        latest = checkpoint.latest(tmp_path)
        record, weights = checkpoint.load(latest)  # raises if the weights do not match their recorded hash
        assert torch.equal(weights["w"], torch.full((2_000_000,), float(record["round"])))
        start = record["round"] + 1
    assert start > 5
    (tmp_path / ".round-00099.safetensors.abc.tmp").write_bytes(b"half")
    leftovers = checkpoint.remove_partial_writes(tmp_path)
    assert leftovers >= 1 and not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert checkpoint.load(checkpoint.latest(tmp_path))[0]["round"] == start - 1


def test_leader_killed_mid_run_resumes_and_learners_rejoin_with_the_uninterrupted_weights(tmp_path):
    from local_federation import free_port

    common = ["--dataset", "synthetic", "--model", "tiny-cnn", "--device", "cpu", "--aggregation", "fedavg",
              "--local-steps", "20", "--server-momentum", "0.5", "--rounds", "6", "--seed", "5"]
    straight = subprocess.run([sys.executable, "local_federation.py", *common, "--run-dir", str(tmp_path / "straight")],
                              cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert straight.returncode == 0, straight.stderr[-2000:]

    port = free_port()
    run_dir = tmp_path / "interrupted"
    leader_cmd = [sys.executable, "leader.py", *common, "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(run_dir)]
    learner_cmd = [sys.executable, "learner.py", "--leader", f"127.0.0.1:{port}", "--host", "127.0.0.1", "--device", "cpu",
                   "--threads", "1", "--leader-lost-after", "3", "--connect-timeout", "60"]
    leader = subprocess.Popen(leader_cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    logs = [tmp_path / f"learner{index}.log" for index in range(2)]
    learners = [subprocess.Popen(learner_cmd, cwd=ROOT, stderr=log.open("w")) for log in logs]
    try:
        for line in leader.stderr:
            if "round 2/6" in line:
                leader.send_signal(signal.SIGKILL)
                break
        leader.wait(timeout=30)
        committed = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))[0]["round"]
        assert 2 <= committed < 6
        resumed = subprocess.run([sys.executable, "leader.py", "--resume", str(run_dir), "--join-timeout", "60"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert resumed.returncode == 0, resumed.stderr[-2000:] + "".join(log.read_text()[-1500:] for log in logs)
        assert f"resuming after round {committed}" in resumed.stderr
        for process, log in zip(learners, logs):
            assert process.wait(timeout=60) == 0, log.read_text()[-2000:]
            assert "registering again" in log.read_text() and "training complete" in log.read_text()
    finally:
        for process in [leader, *learners]:
            if process.poll() is None:
                process.kill()
    _, expected = checkpoint.load(checkpoint.latest(tmp_path / "straight" / "checkpoints"))
    record, weights = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))
    assert record["round"] == 6
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=0)
