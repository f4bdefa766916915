"""Faults during a run: a learner that dies mid-round."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
