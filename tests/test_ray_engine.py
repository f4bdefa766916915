"""The Ray engine: virtual learners in pools of Ray actors, on a two-node Ray cluster started on this machine."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedgrpc.engines import ray_engine
from fedgrpc.leader import checkpoint
from fedgrpc.model import build_model
from fedgrpc.transport import wire

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 280


@pytest.fixture(scope="module")
def cluster_address() -> str:
    """A Ray cluster of two nodes of one CPU each, on this machine (Ray's test helper)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 << 20})
    cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


def run_on_ray(run_dir: Path, cluster_address: str, *flags: str) -> subprocess.CompletedProcess:
    """federation() run with the Ray engine on the test cluster."""
    command = federation(run_dir, *flags, "--engine", "ray", "--ray-address", cluster_address)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def federation(run_dir: Path, *flags: str) -> list[str]:
    """local_federation.py on a synthetic task small enough for a test, writing into run_dir."""
    return [
        sys.executable,
        "local_federation.py",
        "--dataset",
        "synthetic",
        "--model",
        "tiny-cnn",
        "--device",
        "cpu",
        "--aggregation",
        "fedavg",
        "--batch-size",
        "16",
        "--local-steps",
        "3",
        "--seed",
        "11",
        "--quiet",
        "--run-dir",
        str(run_dir),
        *flags,
    ]


def final_weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """The round and weights of a run's newest checkpoint."""
    record, weights = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))
    return record["round"], weights


def metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per round."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_actors_and_their_learners_follow_the_declared_shares():
    config = ray_engine.RayEngineConfig(learners=1000, learner_cpus=0.5)
    assert ray_engine.actor_count(config, {"CPU": 2.0}) == 4
    assert ray_engine.actor_count(ray_engine.RayEngineConfig(learners=3, learner_cpus=0.5), {"CPU": 2.0}) == 3  # one per learner at most
    gpu_bound = ray_engine.RayEngineConfig(learners=1000, learner_cpus=1, learner_gpus=0.25)
    assert ray_engine.actor_count(gpu_bound, {"CPU": 16.0, "GPU": 1.0}) == 4
    assert ray_engine.assign(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]


def test_four_virtual_learners_on_two_nodes_end_with_the_process_engines_weights(tmp_path, cluster_address):
    # kept momentum: round 2 starts from each learner's round-1 momentum, which a pool must keep for each of its (two)
    # learners
    flags = ["--learners", "4", "--rounds", "2", "--deterministic", "--keep-momentum", "--momentum", "0.9", "--checkpoint-every", "1"]
    on_ray = run_on_ray(tmp_path / "ray", cluster_address, *flags)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    processes = subprocess.run(federation(tmp_path / "processes", *flags), cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert processes.returncode == 0, processes.stderr[-3000:]

    ray_round, ray_weights = final_weights(tmp_path / "ray")
    process_round, process_weights = final_weights(tmp_path / "processes")
    assert ray_round == process_round == 2
    assert ray_weights.keys() == process_weights.keys()
    for name in ray_weights:
        assert torch.equal(ray_weights[name], process_weights[name]), name

    # every learner reported in both rounds; each of the 2 pools fetched each round's model once, where 4
    # processes were sent it 4 times
    model_bytes = wire.payload_bytes(wire.specs_of(build_model("tiny-cnn").state_dict()))
    for ray_round_metrics, process_round_metrics in zip(metrics(tmp_path / "ray"), metrics(tmp_path / "processes"), strict=True):
        assert ray_round_metrics["learners_reported"] == process_round_metrics["learners_reported"] == 4
        assert ray_round_metrics["bytes_out"] == 2 * model_bytes
        assert process_round_metrics["bytes_out"] == 4 * model_bytes


def test_a_users_task_file_runs_on_ray_and_its_int64_tokens_reach_the_pools(tmp_path, cluster_address):
    flags = ["--task", "examples/sequence.py", "--learners", "6", "--rounds", "2", "--local-steps", "20", "--lr", "0.1"]
    result = run_on_ray(tmp_path / "run", cluster_address, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    history = metrics(tmp_path / "run")
    assert [entry["learners_reported"] for entry in history] == [6, 6]
    assert history[-1]["test_loss"] < history[0]["test_loss"]  # the pools trained the GRU on their token splits


def pool_actor_pids() -> list[int]:
    """Processes Ray titled as PoolActor workers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith(b"ray::PoolActor"):
                pids.append(int(entry.name))
    return pids


def test_an_actor_killed_mid_run_is_restarted_and_its_learners_take_part_again(tmp_path, cluster_address):
    run_dir = tmp_path / "run"
    # more rounds than the test needs: it stops the run itself once the restarted pool's learners have taken part,
    # so the run lasts as long as the restart takes on this machine, however fast or busy it is
    flags = ["--learners", "20", "--rounds", "100000", "--checkpoint-every", "1"]
    launcher = subprocess.Popen(
        federation(run_dir, *flags, "--engine", "ray", "--ray-address", cluster_address),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(metrics(run_dir)) < 1:  # the leader's own record: round 1 is done
            assert launcher.poll() is None and time.monotonic() < deadline, "round 1 did not complete"
            time.sleep(0.1)  # polling a file the run writes
        while len(pool_actor_pids()) != 2:  # an earlier run's actors may still be exiting
            assert time.monotonic() < deadline, pool_actor_pids()
            time.sleep(0.1)
        os.kill(pool_actor_pids()[0], signal.SIGKILL)
        while not rejoined(metrics(run_dir)):
            assert launcher.poll() is None and time.monotonic() < deadline, [r["learners_reported"] for r in metrics(run_dir)]
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)  # as Ctrl-C: the leader saves the last round and stops the learners
        output, _ = launcher.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 130, output[-3000:]  # stopped by the signal, not by a failure
    history = metrics(run_dir)
    assert [record["round"] for record in history] == list(range(1, len(history) + 1))
    # the killed pool's learners were lost, the leader went on with the other pool's, and they took part again
    lost_at = next(index for index, record in enumerate(history) if record["learners_reported"] < 20)
    assert history[lost_at]["learners_reported"] >= 10
    assert output.count("learners registered") == 3, output[-3000:]  # two pools, and the restarted one again
    saved_round, _ = final_weights(run_dir)
    assert saved_round == history[-1]["round"]


def rejoined(history: list[dict]) -> bool:
    """Whether a round with all 20 learners followed one with fewer."""
    reported = [record["learners_reported"] for record in history]
    lost = [index for index, count in enumerate(reported) if count < 20]
    return bool(lost) and 20 in reported[lost[0] + 1 :]


def test_secure_aggregation_on_ray_unmasks_rounds_whose_learners_drop_out_after_the_key_stages(tmp_path, cluster_address):
    run_dir = tmp_path / "run"
    dropout, learners, seed = 0.2, 20, 11
    flags = ["--learners", str(learners), "--rounds", "3", "--secure-aggregation", "--simulate-dropout", str(dropout), "--eval-every", "0"]
    result = run_on_ray(run_dir, cluster_address, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    history = metrics(run_dir)
    assert [record["round"] for record in history] == [1, 2, 3]
    # every learner is a member of round 1; those whose seeded draw falls below the rate drop out of it after
    # sharing their keys, and the leader removes their masks from the others' updates
    drops = sum(random.Random(f"dropout-{seed}-{index}-1").random() < dropout for index in range(learners))
    assert 0 < drops < learners // 2
    assert history[0]["learners_selected"] == learners
    assert history[0]["learners_reported"] == learners - drops
    assert "simulated dropout" in result.stderr
    assert all(record["secagg_unmask_seconds"] > 0 and math.isfinite(record["train_loss"]) for record in history)


def test_fedbuff_on_ray_fills_every_buffer_and_each_job_fetches_its_model(tmp_path, cluster_address):
    run_dir = tmp_path / "run"
    flags = ["--aggregation", "fedbuff", "--learners", "6", "--rounds", "3", "--buffer-size", "3", "--eval-every", "3"]
    result = run_on_ray(run_dir, cluster_address, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    history = metrics(run_dir)
    assert [record["round"] for record in history] == [1, 2, 3]
    assert all(record["updates_buffered"] == 3 and not record["updates_rejected"] for record in history)
    # each job's learner fetched the model its job trains on: the leader sent at least one model per update it took
    model_bytes = wire.payload_bytes(wire.specs_of(build_model("tiny-cnn").state_dict()))
    assert sum(record["bytes_out"] for record in history) >= 9 * model_bytes
    assert final_weights(run_dir)[0] == 3 and math.isfinite(history[-1]["test_loss"])
