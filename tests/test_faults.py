"""Faults during a run: a learner that dies mid-round, a process killed while it writes checkpoints."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from conftest import (
    ROOT,
    join_all,
    leader_config,
    learner_process,
    register_client,
    run_in_thread,
    run_until_stopped,
    running_leader,
    start_learners,
    wait_until,
)
from fedgrpc.leader import checkpoint
from fedgrpc.leader import main as leader_module
from fedgrpc.protos import leader_pb2, learner_pb2, learner_pb2_grpc
from fedgrpc.transport import rpc, wire


def test_learner_killed_mid_round_leaves_a_quorum_that_finishes_the_run(tmp_path, caplog):
    # the round deadline is far off: the leader must notice the dead learner by its failed health checks
    config = leader_config(
        tmp_path,
        learners=3,
        min_learners=2,
        round_timeout=600.0,
        learner_lost_after=2.0,
        rounds=3,
        aggregation="fedavg",
        local_steps=2,
        batch_size=16,
    )
    with running_leader(config) as running:
        processes = [learner_process(running.address) for _ in range(3)]
        begin_round = running.leader.begin_round

        def begin_after_a_death(current):
            # a member of round 1 dies as the round starts, before it can report, however fast the machine trains
            if current.round_number == 1:
                processes[2].send_signal(signal.SIGKILL)
                processes[2].wait()
            begin_round(current)

        running.leader.begin_round = begin_after_a_death
        try:
            runner, result = run_in_thread(running.leader)
            runner.join(120)
            assert not runner.is_alive()
            history = result["history"]
            assert [entry["learners_reported"] for entry in history] == [2, 2, 2]
            assert [entry["learners_selected"] for entry in history] == [3, 2, 2]  # absent after round 1
            assert [entry["learners_dropped"] for entry in history] == [1, 0, 0]
            # the run ended within 120 s of a 600 s round deadline: the leader noticed the death itself, by a failed
            # health check, or by a failed StartTraining when the kill came first
            assert any(
                " failed health checks in round 1" in record.getMessage() or " failed the round's start" in record.getMessage()
                for record in caplog.records
            )
            for process in processes[:2]:
                _, err = process.communicate(timeout=60)
                assert process.returncode == 0, err
                assert "stopping after 3 rounds: training complete" in err
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()


WRITER = """
import sys, torch
from fedgrpc.leader import checkpoint
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
    from fedgrpc.engines.launcher import free_port

    common = [
        "--dataset",
        "synthetic",
        "--model",
        "tiny-cnn",
        "--device",
        "cpu",
        "--aggregation",
        "fedavg",
        "--learners",
        "2",
        "--local-steps",
        "20",
        "--server-momentum",
        "0.5",
        "--rounds",
        "4",
        "--seed",
        "5",
        "--deterministic",
        "--checkpoint-every",
        "1",
    ]
    straight = subprocess.run(
        [sys.executable, "local_federation.py", *common, "--run-dir", str(tmp_path / "straight")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    port = free_port()
    run_dir = tmp_path / "interrupted"
    leader_cmd = [sys.executable, "leader.py", *common, "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(run_dir)]
    learner_cmd = [
        sys.executable,
        "learner.py",
        "--leader",
        f"127.0.0.1:{port}",
        "--host",
        "127.0.0.1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--leader-lost-after",
        "3",
        "--connect-timeout",
        "60",
    ]
    leader = subprocess.Popen(leader_cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    logs = [tmp_path / f"learner{index}.log" for index in range(2)]
    learners = [subprocess.Popen(learner_cmd, cwd=ROOT, stderr=log.open("w")) for log in logs]
    try:
        for line in leader.stderr:
            if "round 2/4" in line:
                leader.send_signal(signal.SIGKILL)
                break
        leader.wait(timeout=30)
        committed = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))[0]["round"]
        assert 2 <= committed < 4
        resumed = subprocess.run(
            [sys.executable, "leader.py", "--resume", str(run_dir), "--join-timeout", "60"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:] + "".join(log.read_text()[-1500:] for log in logs)
        assert f"resuming after round {committed}" in resumed.stderr
        for process, log in zip(learners, logs, strict=False):
            assert process.wait(timeout=60) == 0, log.read_text()[-2000:]
            assert "registering again" in log.read_text() and "training complete" in log.read_text()
    finally:
        for process in [leader, *learners]:
            if process.poll() is None:
                process.kill()
    _, expected = checkpoint.load(checkpoint.latest(tmp_path / "straight" / "checkpoints"))
    record, weights = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))
    assert record["round"] == 4
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name  # bit for bit: --deterministic sums the updates in learner order


def test_a_learner_that_dies_before_training_is_replaced_by_the_next_to_register(tmp_path, channel_to):
    from conftest import CallbackServer

    config = leader_config(tmp_path, learners=2, rounds=1)
    with running_leader(config) as running:
        leader = running.leader
        runner, result = run_in_thread(leader)
        gone = CallbackServer()
        register_client(channel_to(running.address), address=gone.address)  # learner 0, admitted while its server answered
        gone.stop()
        first = start_learners(running.address, 1)
        wait_until(lambda: len(leader.roster.records()) == 2 and not leader.roster.record(0).alive)
        second = start_learners(running.address, 1)
        assert join_all(first + second) == [0, 0]
        runner.join(60)
        assert result["history"][0]["learners_reported"] == 2
        assert {record.address for record in leader.roster.records()}.isdisjoint({gone.address})


def test_a_frozen_learner_misses_the_round_has_its_late_update_refused_and_rejoins(tmp_path):
    # waits on events only: the run goes on until the frozen learner has taken part again, however long that takes
    config = leader_config(
        tmp_path,
        learners=3,
        min_learners=2,
        round_timeout=0.0,
        learner_lost_after=6.0,
        rounds=10_000,
        aggregation="fedavg",
        local_steps=200,
        batch_size=16,
    )
    with running_leader(config) as running:
        leader = running.leader
        processes = [learner_process(running.address, *(["-v"] if index == 2 else [])) for index in range(3)]
        frozen = processes[2]
        lines: list[str] = []
        training = threading.Event()

        def read() -> None:
            for line in frozen.stderr:
                lines.append(line)
                if "round 1: training on" in line:
                    training.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            runner, outcome = run_until_stopped(leader)
            assert training.wait(120), "".join(lines)
            frozen.send_signal(signal.SIGSTOP)  # in the middle of its 200 local steps of round 1
            wait_until(lambda: len(leader.history) >= 1, timeout=240)
            assert leader.history[0]["learners_reported"] == 2
            frozen.send_signal(signal.SIGCONT)
            wait_until(lambda: any(entry["learners_reported"] == 3 for entry in leader.history[1:]), timeout=240)
            leader.stop_event.set()
            runner.join(60)
            assert outcome["error"] == "leader shutting down"
            leader.stop_learners("the test is over")
            for process in processes:
                assert process.wait(timeout=60) == 0
            reader.join(30)
            err = "".join(lines)
            assert "ended this learner's session" in err and "marked absent" in err, err  # its late update was refused
            assert "registering again" in err and err.count("registered as learner") == 2, err
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                    process.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_learner_lost_with_default_flags_leaves_the_run_going_and_its_restart_takes_part_again(tmp_path, signum, caplog):
    # the defaults that matter: two learners, a quorum of half, rounds fitted to their work, --learner-lost-after 30
    config = leader_config(tmp_path, rounds=10_000, round_timeout=0.0, aggregation="fedavg", local_steps=20, batch_size=16)
    with running_leader(config) as running:
        leader = running.leader
        processes = [learner_process(running.address) for _ in range(2)]
        try:
            runner, outcome = run_until_stopped(leader)
            wait_until(lambda: len(leader.history) >= 2, timeout=240)
            processes[1].send_signal(signum)
            assert processes[1].wait(timeout=60) != 0 or signum == signal.SIGINT
            killed_after = len(leader.history)
            processes.append(learner_process(running.address))  # restarted at once, before the leader noticed
            wait_until(
                lambda: len(leader.history) > killed_after
                and any(entry["learners_reported"] == 2 for entry in leader.history[killed_after + 1 :]),
                timeout=240,
            )
            assert processes[0].poll() is None  # the healthy learner never stopped
            leader.stop_event.set()
            runner.join(60)
            assert outcome["error"] == "leader shutting down"
            leader.stop_learners("the test is over")
            assert processes[0].wait(timeout=60) == 0 and processes[2].wait(timeout=60) == 0
            assert any("marked absent" in record.getMessage() for record in caplog.records)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()


def test_ctrl_c_on_the_leader_says_so_stops_and_saves_the_last_round(tmp_path):
    from fedgrpc.engines.launcher import free_port

    port = free_port()
    run_dir = tmp_path / "run"
    leader = subprocess.Popen(
        [
            sys.executable,
            "leader.py",
            "--dataset",
            "synthetic",
            "--model",
            "tiny-cnn",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--rounds",
            "10000",
            "--run-dir",
            str(run_dir),
            "--aggregation",
            "fedavg",
            "--local-steps",
            "5",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    learners = [learner_process(f"127.0.0.1:{port}") for _ in range(2)]
    try:
        seen = []
        for line in leader.stderr:
            seen.append(line)
            if "round 3/10000" in line:
                leader.send_signal(signal.SIGINT)
                break
        rest = leader.stderr.read()
        assert leader.wait(timeout=60) == 130, "".join(seen) + rest
        assert "SIGINT: stopping after saving the last completed round" in rest
        for process in learners:
            _, err = process.communicate(timeout=60)
            assert process.returncode == 0 and "leader shutting down" in err
        # the default checkpoints by time (60 s); the stop wrote the last round the metrics hold
        record, _ = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert record["round"] == metrics[-1]["round"] >= 3
    finally:
        for process in [leader, *learners]:
            if process.poll() is None:
                process.kill()


def test_shutdown_interrupts_an_evaluation(tmp_path):
    leader, server, _, _ = leader_module.serve(leader_config(tmp_path))
    try:
        assert leader.evaluate() is not None
        leader.stop_event.set()
        assert leader.evaluate() is None
    finally:
        server.stop(None)
        leader.close()


def test_reusing_a_runs_config_starts_a_new_run_directory_and_never_touches_the_old_one(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.chdir(tmp_path)
    first = tmp_path / "runs" / "first"
    saved = dataclasses.asdict(
        leader_module.LeaderConfig(dataset="synthetic", run_dir=str(first), checkpoint_dir=str(first / "checkpoints"))
    )
    (first / "checkpoints").mkdir(parents=True)
    (first / "config.json").write_text(json.dumps(saved))
    (first / "metrics.jsonl").write_text('{"round": 1}\n')
    config, _, _ = leader_module.parse_leader_config(["--config", str(first / "config.json")])
    assert (config.run_dir, config.checkpoint_dir) == (f"{first}-2", f"{first}-2/checkpoints")
    (tmp_path / "runs" / "first-2").mkdir()
    (tmp_path / "runs" / "first-2" / "config.json").write_text("{}")
    config, _, _ = leader_module.parse_leader_config(["--config", str(first / "config.json")])
    assert config.run_dir == f"{first}-3"
    resumed, _, _ = leader_module.parse_leader_config(["--resume", str(first)])
    assert resumed.run_dir == str(first)  # --resume continues the run in its own directory
    assert json.loads((first / "config.json").read_text()) == saved

    elsewhere = tmp_path / "shared-checkpoints"
    checkpoint.save(elsewhere, 1, {"w": torch.zeros(1)}, {"metrics": {}}, keep=1)
    with pytest.raises(SystemExit):
        leader_module.parse_leader_config(["--dataset", "synthetic", "--checkpoint-dir", str(elsewhere)])


def test_checkpoints_are_written_by_time_and_after_the_last_round(tmp_path):
    config = leader_config(tmp_path, rounds=3, aggregation="fedavg", local_steps=1)  # --checkpoint-seconds 60
    with running_leader(config) as running:
        learners = start_learners(running.address, 2)
        running.leader.run()
    assert join_all(learners) == [0, 0]
    assert sorted(path.name for path in Path(config.checkpoint_dir).glob("round-*.json")) == ["round-00003.json"]

    config = leader_config(tmp_path / "every", rounds=3, aggregation="fedavg", local_steps=1, checkpoint_seconds=0.0)
    with running_leader(config) as running:
        learners = start_learners(running.address, 2)
        running.leader.run()
    assert join_all(learners) == [0, 0]
    assert sorted(path.name for path in Path(config.checkpoint_dir).glob("round-*.json")) == [
        "round-00001.json",
        "round-00002.json",
        "round-00003.json",
    ]


class Bystander(learner_pb2_grpc.LearnerServiceServicer):
    """A learner server that takes every call and does nothing: a member the leader cannot tell from an honest one."""

    def StartTraining(self, request, context):
        return learner_pb2.Ack(success=True, message="training started")

    def SyncModelState(self, request_iterator, context):
        for _ in request_iterator:
            pass
        return learner_pb2.Ack(success=True, message="received")


def test_stalled_and_trickling_streams_are_cancelled_and_honest_learners_finish(tmp_path, monkeypatch, channel_to):
    monkeypatch.setattr(rpc, "CONTROL_TIMEOUT_S", 3.0)  # streams the leader allows last 3 s plus their bytes at 1 MB/s
    config = leader_config(tmp_path, learners=3, min_learners=2, round_timeout=10.0, rounds=2, stream_idle_timeout=1.0)
    bystander, port, _ = rpc.create_server(
        lambda server: learner_pb2_grpc.add_LearnerServiceServicer_to_server(Bystander(), server),
        "127.0.0.1",
        0,
        max_workers=4,
        health_services=[rpc.LEARNER_SERVICE],
    )
    release = threading.Event()
    with running_leader(config) as running:
        leader = running.leader
        hostile = register_client(channel_to(running.address), address=f"127.0.0.1:{port}")
        honest = start_learners(running.address, 2)
        runner, result = run_in_thread(leader)
        try:
            wait_until(lambda: leader.intake.round.round_number == 1)
            manifest, payload = wire.encode({name: torch.zeros_like(tensor) for name, tensor in leader.model.state_dict().items()})

            def silent():  # opens the stream and never sends a message
                release.wait(60)
                yield from ()

            def trickle():  # a valid header, then one byte every quarter second
                header = leader_pb2.GradientData(manifest=manifest, learner_id=hostile.learner_id, round=1, num_examples=1, train_loss=1.0)
                yield header
                for index in range(len(payload)):
                    if release.wait(0.25):
                        return
                    yield leader_pb2.GradientData(chunk=bytes(payload[index : index + 1]))

            calls = [
                hostile.stub.AccumulateGradients.future(stream(), metadata=hostile.metadata())
                for stream in (silent, silent, trickle, trickle)
            ]
            wait_until(lambda: leader.limits.in_flight() >= 4, timeout=10)
            with pytest.raises(grpc.RpcError) as caught:
                list(hostile.stub.GetModel(leader_pb2.Empty(), timeout=10, metadata=hostile.metadata()))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # a fifth call from the same session
            for call in calls:
                with pytest.raises(grpc.RpcError) as caught:
                    call.result(timeout=30)
                assert caught.value.code() == grpc.StatusCode.CANCELLED
            assert leader.limits.watchdog.cancelled == 4
            assert join_all(honest, timeout=120) == [0, 0]
            runner.join(60)
            assert [entry["learners_reported"] for entry in result["history"]] == [2, 2]
            wait_until(lambda: leader.limits.in_flight() == 0, timeout=10)
        finally:
            release.set()
            bystander.stop(grace=None)


def test_a_shutdown_signal_turns_health_not_serving_and_ends_the_run_after_a_committed_round(tmp_path, channel_to):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedgrpc.leader import main as leader_module

    config = leader_config(tmp_path, rounds=1000)
    leader, server, port, health = leader_module.serve(config)
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        handler = leader_module.handle_shutdown_signals(leader, health)
        learners = start_learners(f"127.0.0.1:{port}", 2)
        runner, outcome = run_until_stopped(leader)
        wait_until(lambda: len(leader.history) >= 2)
        handler(signal.SIGTERM, None)
        check = health_pb2_grpc.HealthStub(channel_to(f"127.0.0.1:{port}")).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING  # still answering, but no longer serving
        runner.join(30)
        assert outcome["error"] == "leader shutting down"
        leader.stop_learners(outcome["error"])
        assert join_all(learners) == [0, 0]
        record, weights = checkpoint.load(checkpoint.latest(Path(config.checkpoint_dir)))
        assert record["round"] == len(leader.history)  # the last committed round is the last one on disk
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)
        server.stop(grace=None)
        leader.close()


def test_rejoin_pauses_double_up_to_a_cap_with_jitter():
    from fedgrpc.learner.main import rejoin_pause

    assert [rejoin_pause(attempt, 0.0) for attempt in range(4)] == [0.5, 1.0, 2.0, 4.0]  # the lower half of 1, 2, 4, 8 s
    assert rejoin_pause(0, 0.999) == pytest.approx(1.0, abs=1e-3)
    assert rejoin_pause(20, 0.0) == 15.0 and rejoin_pause(20, 0.5) == 22.5  # capped at 30 s, jittered over 15-30 s


class QuietContext:
    """A servicer context that keeps its callbacks and notes a cancel."""

    def __init__(self) -> None:
        self.cancelled = False

    def add_callback(self, callback) -> bool:
        return True

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def cancel(self) -> None:
        self.cancelled = True


def test_a_stream_whose_requests_all_arrived_is_not_cancelled_while_the_server_works_on_them():
    watchdog = rpc.Watchdog(idle_s=30.0)
    try:
        working, reading = QuietContext(), QuietContext()
        evaluating = watchdog.watch(working, "/learner.LearnerService/Evaluate", 600.0)
        stalled = watchdog.watch(reading, "/learner.LearnerService/Evaluate", 600.0)
        assert list(rpc._touching(iter([b"model"]), evaluating)) == [b"model"]  # the leader sent the whole model
        next(rpc._touching(iter([b"part", b"rest"]), stalled))  # a peer that sent part of its stream, then nothing
        later = time.monotonic() + 60.0  # an evaluation that takes a minute of a loaded machine
        assert watchdog.expired(later) == [stalled]
        assert watchdog.expired(time.monotonic() + 601.0) == [evaluating]  # its deadline still holds
    finally:
        watchdog.close()
