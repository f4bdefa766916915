"""Asynchronous rounds (fedbuff): staleness weights by hand, the buffer, --max-staleness, --concurrency, a lost learner, resume."""

from __future__ import annotations

import logging
import math
import random
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import grpc
import pytest
import torch
from torch import nn

from conftest import (
    ROOT,
    join_all,
    leader_config,
    learner_process,
    refusal,
    run_in_thread,
    run_until_stopped,
    running_leader,
    start_learners,
    wait_until,
)
from fedgrpc.algorithms import fedbuff
from fedgrpc.algorithms.strategy import Strategy
from fedgrpc.config.options import LeaderConfig, parse_leader_config
from fedgrpc.engines.pool import PoolConfig, run_pool
from fedgrpc.leader import checkpoint, plots
from fedgrpc.leader.coordinator import Published
from fedgrpc.leader.intake import Intake
from fedgrpc.learner import training
from fedgrpc.protos import leader_pb2
from fedgrpc.transport import rpc, wire

# ---- the buffer's arithmetic, driven by hand ------------------------------------------------------------------------


@dataclass
class Member:
    """What the intake reads of a learner's record."""

    learner_id: int
    num_examples: int = 100
    alive: bool = True


class Members:
    """The roster, as far as the intake asks it."""

    def __init__(self, count: int) -> None:
        self.records = [Member(learner_id) for learner_id in range(count)]

    def record(self, learner_id: int) -> Member:
        return self.records[learner_id]


class OneTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def buffered_intake(**overrides: object) -> tuple[Intake, Members, LeaderConfig]:
    config = LeaderConfig(**{"aggregation": "fedbuff", "learners": 3, "buffer_size": 2, "max_norm_ratio": 0, **overrides})
    members = Members(3)
    intake = Intake(config, [wire.TensorSpec("w", "float32", (2,))], ["w"], [], members, threading.Condition())
    intake.open(1, [], config.buffered_updates())
    return intake, members, config


def send(intake: Intake, learner_id: int, job: int, examples: int, values: tuple[float, float], unweighted: bool = False) -> str:
    header = leader_pb2.GradientData(learner_id=learner_id, round=job, num_examples=examples, train_loss=1.0)
    intake.check_header(learner_id, header)
    return intake.accept(learner_id, header, {"w": torch.tensor(values)}, unweighted=unweighted)


def start_jobs(intake: Intake, members: Members, version: int) -> dict[int, int]:
    """Give the waiting learners their jobs on model `version`, as a push would: learner id -> job number."""
    given = intake.jobs.assign(members.records)
    return {record.learner_id: intake.jobs.bind(record.learner_id, version).number for record, _ in given}


def test_staleness_weights_and_the_buffer_for_a_scripted_arrival_order():
    intake, members, config = buffered_intake()
    assert start_jobs(intake, members, version=1) == {0: 1, 1: 1, 2: 1}

    send(intake, 0, 1, 10, (1.0, 0.0))  # A, on version 1, into buffer 1: staleness 0
    assert intake.round.round_number == 1 and not intake.filled  # one update is not a buffer of two
    send(intake, 1, 1, 30, (0.0, 1.0))  # B fills buffer 1
    assert intake.round.round_number == 2 and list(intake.filled) == [1]
    first = intake.filled.pop(1)
    assert first.staleness == [0, 0] and first.reported == 2

    # buffer 1 is applied: version 2. A and B wait their turn again and train on it; C still trains on version 1
    assert start_jobs(intake, members, version=2) == {0: 2, 1: 2}
    send(intake, 2, 1, 20, (4.0, 0.0))  # C: version 1 into buffer 2, staleness 1
    send(intake, 0, 2, 10, (0.0, 2.0))  # A: version 2 into buffer 2, staleness 0; the buffer is full
    second = intake.filled.pop(2)
    assert second.staleness == [1, 0]
    assert intake.round.round_number == 3

    strategy = Strategy(config, OneTensor())
    mean = strategy.aggregate(first)
    assert torch.allclose(
        mean["w"].double(), torch.tensor([10 / 40, 30 / 40], dtype=torch.float64)
    )  # nothing stale: fedavg's weighted mean
    mean = strategy.aggregate(second)
    c_weight = 20 / math.sqrt(2)  # examples times 1/sqrt(1 + staleness 1)
    # FedBuff: the discounted sum over the updates' own weights, so that a stale buffer takes a smaller step
    expected = torch.tensor([c_weight * 4.0, 10 * 2.0], dtype=torch.float64) / (20 + 10)
    assert torch.allclose(mean["w"].double(), expected, atol=1e-6)
    assert second.staleness_discount == pytest.approx((c_weight + 10) / 30)


def test_under_dp_a_stale_update_shrinks_the_buffers_step():
    intake, members, config = buffered_intake(clip_norm=10.0, dp_noise_multiplier=1e-9)  # noise too small to see
    start_jobs(intake, members, version=1)
    send(intake, 0, 1, 10, (1.0, 0.0))
    send(intake, 1, 1, 30, (0.0, 1.0))
    intake.filled.clear()
    start_jobs(intake, members, version=2)
    send(intake, 2, 1, 20, (4.0, 0.0), unweighted=True)  # staleness 1
    send(intake, 0, 2, 10, (0.0, 2.0), unweighted=True)  # staleness 0
    mean = Strategy(config, OneTensor()).aggregate(intake.filled.pop(2))
    # DP-FedAvg weighs updates alike; FedBuff's sum over the count: each update moves the model by at most clip / 2
    expected = torch.tensor([4.0 / math.sqrt(2), 2.0], dtype=torch.float64) / 2
    assert torch.allclose(mean["w"].double(), expected, atol=1e-6)


def test_an_update_older_than_max_staleness_is_refused_counted_and_its_learner_goes_on():
    intake, members, _ = buffered_intake(max_staleness=1)
    start_jobs(intake, members, version=1)
    send(intake, 0, 1, 10, (1.0, 0.0))
    send(intake, 1, 1, 10, (1.0, 0.0))  # buffer 1 full
    intake.filled.clear()
    start_jobs(intake, members, version=2)
    send(intake, 0, 2, 10, (1.0, 0.0))
    send(intake, 1, 2, 10, (1.0, 0.0))  # buffer 2 full: C's version-1 model is now 2 aggregations behind buffer 3
    with pytest.raises(rpc.RequestRefused) as refused:
        send(intake, 2, 1, 10, (1.0, 0.0))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "trained on model version 1, 2 aggregations before" in str(refused.value) and "--max-staleness 1" in str(refused.value)
    assert intake.round.stale == 1 and intake.round.reported == 0
    assert start_jobs(intake, members, version=3)[2] == 2  # C trains again, on the newest model


def test_a_retried_update_counts_once_and_a_different_second_one_is_refused():
    intake, members, _ = buffered_intake(buffer_size=3)
    start_jobs(intake, members, version=1)
    send(intake, 0, 1, 10, (1.0, 0.0))
    assert "duplicate" in send(intake, 0, 1, 10, (1.0, 0.0))
    assert intake.round.reported == 1
    with pytest.raises(rpc.RequestRefused) as refused:
        send(intake, 0, 1, 10, (2.0, 0.0))
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(rpc.RequestRefused) as refused:
        send(intake, 1, 7, 10, (1.0, 0.0))  # no such job
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


class Clock:
    """A clock the test sets by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def job_script(durations: dict[int, float], cycles: int, quorum: int) -> list[tuple[float, int, int]]:
    """Learners that each take durations[id] seconds a job and a buffer of `quorum`: (time given, learner, version) of every job.

    Events run in time order: an update is taken (the buffer fills and a new version is made every `quorum` of them),
    then the line is offered jobs, as BufferedRounds.dispatch does; the line is also offered jobs every 0.5 s.
    """
    clock = Clock()
    jobs = fedbuff.Jobs(slots=len(durations), max_staleness=100, clock=clock)
    members = [Member(learner_id) for learner_id in durations]
    version, reported, log, due = 1, 0, [], {}

    def offer() -> None:
        for record, job in jobs.assign(members, needed=quorum - reported):
            jobs.bind(record.learner_id, version)
            log.append((clock.now, record.learner_id, version))
            due[record.learner_id] = (clock.now + durations[record.learner_id], job.number)

    offer()
    while len(log) < cycles * len(durations):
        learner_id = min(due, key=lambda key: due[key][0])
        clock.now = min(due[learner_id][0], math.floor(clock.now / 0.5) * 0.5 + 0.5)
        if clock.now == due[learner_id][0]:
            _, number = due.pop(learner_id)
            jobs.finish(learner_id, number, digest=(clock.now,), version_now=version)
            reported += 1
            if reported == quorum:
                version, reported = version + 1, 0
        offer()
    return log


def test_learners_of_one_pace_wait_for_the_buffer_about_to_fill_and_train_on_the_model_it_makes():
    # four learners of nearly one pace, a buffer of four: each waits the moment until the others' updates fill the
    # buffer, so every job trains on the newest version, the second jobs too (the others' first jobs, whose times are
    # not known yet, are expected at the waiting learner's pace): synchronous rounds throughout
    log = job_script({0: 10.0, 1: 10.2, 2: 10.4, 3: 10.6}, cycles=4, quorum=4)
    assert [version for _, _, version in log] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    # each waited for the slowest of the four: version k + 1 is made when its k-th update (k x 10.6 s) fills buffer k
    assert [round(given, 6) for given, _, _ in log] == [0.0] * 4 + [10.6] * 4 + [21.2] * 4 + [31.8] * 4


def test_a_learner_does_not_wait_for_a_straggler_nor_past_its_allowance():
    # learner 3 takes 4x as long. Its first job's time is not known when the others finish theirs at 10 s: expected at
    # their pace, it holds them for their allowance (a quarter of 10 s; the line is offered jobs every 0.5 s, so they go
    # at 13 s). From then on its job is overdue, nobody waits for it, and each fast job starts the moment the last ends.
    log = job_script({0: 10.0, 1: 10.0, 2: 10.0, 3: 40.0}, cycles=3, quorum=4)
    fast = sorted(given for given, learner, _ in log if learner != 3)
    assert fast == [0.0] * 3 + [13.0] * 3 + [23.0] * 3 + [33.0] * 2

    # a job due within the allowance that does not come holds the line for that allowance (a quarter of 10 s), no longer
    clock = Clock()
    jobs = fedbuff.Jobs(slots=2, max_staleness=100, clock=clock)
    members = [Member(0), Member(1)]
    for record, _ in jobs.assign(members):
        jobs.bind(record.learner_id, 1)
    clock.now = 10.0
    jobs.finish(0, 1, digest=("a",), version_now=1)
    jobs.finish(1, 1, digest=("b",), version_now=1)
    assert [record.learner_id for record, _ in jobs.assign(members, needed=2)] == [0, 1]  # nobody in flight to wait for
    for learner_id in (0, 1):
        jobs.bind(learner_id, 2)
    clock.now = 20.0
    jobs.finish(0, 2, digest=("c",), version_now=2)  # learner 1's update is due now: the buffer lacks only it
    assert jobs.assign(members, needed=1) == []
    clock.now = 22.4
    assert jobs.assign(members, needed=1) == []
    clock.now = 22.6  # past 20 + 0.25 x 10: learner 0 trains on the model it has
    assert [record.learner_id for record, _ in jobs.assign(members, needed=1)] == [0]


# ---- the command line -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--secure-aggregation"], "fedbuff has no cohort"),
        (["--fraction", "0.5"], "fedbuff has none: use --concurrency"),
        (["--deterministic"], "the order updates arrive in is the algorithm"),
        (["--lr-schedule", "cosine"], "fedbuff's learners train at their own pace"),
        (["--concurrency", "5"], "--concurrency 5 exceeds --learners 4"),
        (["--round-timeout", "60"], "fedbuff waits for none"),
    ],
)
def test_fedbuff_refuses_what_needs_a_cohort_in_one_line(capsys, flags, message):
    assert message in refusal(parse_leader_config, ["--aggregation", "fedbuff", "--learners", "4", *flags, "--run-dir", "unused"], capsys)


def test_fedbuff_defaults(tmp_path):
    config, _, _ = parse_leader_config(["--aggregation", "fedbuff", "--learners", "4", "--run-dir", str(tmp_path / "run")])
    # all four train, four updates make an aggregation, an update may lag 4 * 4/4 aggregations, every one is written
    assert (config.training_slots(), config.buffered_updates(), config.staleness_limit(), config.checkpoint_every) == (4, 4, 4, 1)
    with pytest.raises(SystemExit):
        parse_leader_config(["--buffer-size", "3", "--run-dir", str(tmp_path / "sync")])  # a fedbuff flag without fedbuff


# ---- real federations ------------------------------------------------------------------------------------------------


class TrainingWatch:
    """Wraps LocalTrainer.train in every in-process learner: counts those inside it at once, and can hold one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, probe: bool = False) -> None:
        self.cond = threading.Condition()
        self.inside = 0
        self.most = 0
        self.trained: dict[int, int] = {}  # learner id -> jobs trained
        self.hold: int | None = None  # this learner's first job waits for `release`
        self.held = threading.Event()
        self.release = threading.Event()
        original = training.LocalTrainer.train

        def train(trainer: training.LocalTrainer, round_number: int):
            if trainer.learner_id == self.hold and round_number == 1:
                self.held.set()
                assert self.release.wait(120), "the test never released the held learner"
            with self.cond:
                self.inside += 1
                self.most = max(self.most, self.inside)
                self.cond.notify_all()
                if probe:  # a leader that let more than 2 train at once would have them all inside here within this bound
                    self.cond.wait_for(lambda: self.inside > 2, timeout=0.5)
            try:
                return original(trainer, round_number)
            finally:
                with self.cond:
                    self.inside -= 1
                    self.trained[trainer.learner_id] = self.trained.get(trainer.learner_id, 0) + 1

        monkeypatch.setattr(training.LocalTrainer, "train", train)


def test_with_concurrency_2_of_4_learners_never_more_than_2_train_and_all_take_turns(tmp_path, monkeypatch):
    watch = TrainingWatch(monkeypatch, probe=True)
    config = leader_config(tmp_path, aggregation="fedbuff", learners=4, concurrency=2, rounds=6, local_steps=2, batch_size=16)
    with running_leader(config) as running:
        learners = start_learners(running.address, 4)
        history = running.leader.run()
    assert join_all(learners) == [0, 0, 0, 0]
    assert watch.most == 2  # two at once, never three
    assert sorted(watch.trained) == [0, 1, 2, 3]  # the other two waited their turn and had it
    assert [entry["updates_buffered"] for entry in history] == [2] * 6  # the default buffer: one per training slot
    assert history[-1]["learners_training_max"] == 2


def test_a_stale_update_is_refused_over_the_wire_and_its_learner_trains_again(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    watch = TrainingWatch(monkeypatch)
    config = leader_config(tmp_path, aggregation="fedbuff", learners=3, buffer_size=1, max_staleness=1, rounds=10000, local_steps=2)
    with running_leader(config) as running:
        leader = running.leader
        first = start_learners(running.address, 1)
        wait_until(lambda: len(leader.roster.alive()) == 1)
        watch.hold = 0  # the first to register is learner 0: its first job waits while the others go on
        others = start_learners(running.address, 2)
        runner, outcome = run_until_stopped(leader)
        assert watch.held.wait(60)
        wait_until(lambda: len(leader.history) >= 3, timeout=120)  # version 4: learner 0's version-1 model is 3 behind
        watch.release.set()
        wait_until(lambda: watch.trained.get(0, 0) >= 2, timeout=120)  # refused, then given a newer model, and trained on it
        wait_until(lambda: any(entry["updates_stale"] for entry in leader.history), timeout=120)
        leader.stop_event.set()
        runner.join(60)
        assert outcome["error"] == "leader shutting down"
        leader.stop_learners("the test has seen what it checks")
    assert join_all(first + others) == [0, 0, 0]
    refusals = [
        record.getMessage()
        for record in caplog.records
        if record.name == "fedgrpc.leader.service" and "refused an update" in record.getMessage()
    ]
    assert any("from learner 0 (FAILED_PRECONDITION): stale update: trained on model version 1" in line for line in refusals)
    assert sum(entry["updates_stale"] for entry in leader.history) >= 1
    assert any(
        "job 1: update not taken: stale update" in record.getMessage() for record in caplog.records if record.name == "fedgrpc.learner.main"
    )


def test_a_learner_killed_mid_training_costs_only_its_update(tmp_path):
    # one training slot: the run cannot go on unless the killed learner's slot comes back
    config = leader_config(tmp_path, aggregation="fedbuff", learners=3, concurrency=1, rounds=4, local_steps=20, learner_lost_after=6)
    fast: list[subprocess.Popen] = []
    with running_leader(config) as running:
        leader = running.leader
        slow = learner_process(running.address, "--slowdown", "20")
        try:
            wait_until(lambda: len(leader.roster.alive()) == 1)  # learner 0, first in line
            fast = [learner_process(running.address) for _ in range(2)]
            runner, result = run_in_thread(leader)

            def training_its_job() -> bool:
                job = leader.intake.jobs.job_of(0)  # read without the leader's lock: one attribute, and polled again
                return job is not None and job.version == 1

            wait_until(training_its_job, timeout=120)  # its model sent: it trains, 20 times slower than it could
            slow.send_signal(signal.SIGKILL)
            runner.join(180)
            assert "history" in result, "the run did not finish"
            for process in fast:
                assert process.wait(timeout=60) == 0, process.stderr.read()[-2000:]
        finally:
            for process in [slow, *fast]:
                if process.poll() is None:
                    process.kill()
    history = result["history"]
    assert [entry["round"] for entry in history] == [1, 2, 3, 4]
    assert all(entry["updates_buffered"] == 1 for entry in history)
    assert not leader.roster.record(0).alive  # found gone, and its slot went to the next in line


def test_the_leader_killed_resumes_from_the_last_applied_version(tmp_path):
    from fedgrpc.engines.launcher import free_port

    port = free_port()
    run_dir = tmp_path / "run"
    common = ["--dataset", "synthetic", "--model", "tiny-cnn", "--device", "cpu", "--learners", "3", "--aggregation", "fedbuff"]
    common += ["--local-steps", "5", "--rounds", "12", "--no-augment"]
    leader_cmd = [sys.executable, "leader.py", *common, "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(run_dir)]
    extra = ["--leader-lost-after", "3", "--connect-timeout", "60"]
    leader = subprocess.Popen(leader_cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    learners = [learner_process(f"127.0.0.1:{port}", *extra) for _ in range(3)]
    logged = 0
    try:
        for line in leader.stderr:
            if "round 3/12" in line:
                logged = 3
                leader.send_signal(signal.SIGKILL)
                break
        leader.wait(timeout=30)
        committed = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))[0]["round"]
        assert logged == 3 and committed >= logged  # written every aggregation by default: the crash lost at most the buffer
        resumed = subprocess.run(
            [sys.executable, "leader.py", "--resume", str(run_dir), "--join-timeout", "60"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming after round {committed}" in resumed.stderr
        for process in learners:
            assert process.wait(timeout=60) == 0, process.stderr.read()[-2000:]
    finally:
        for process in [leader, *learners]:
            if process.poll() is None:
                process.kill()
    rounds = [record["round"] for record in plots.read_metrics(run_dir)]
    assert rounds == list(range(1, 13))  # each aggregation once, none replayed or skipped
    assert checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))[0]["round"] == 12


@pytest.mark.parametrize(
    "overrides",
    [
        dict(rule="median", compression="int8"),
        dict(clip_norm=1.0, dp_noise_multiplier=0.5),
    ],
    ids=["median-int8", "dp"],
)
def test_rules_compression_and_dp_apply_to_the_buffer(tmp_path, overrides):
    config = leader_config(tmp_path, aggregation="fedbuff", learners=3, buffer_size=3, rounds=3, local_steps=2, **overrides)
    with running_leader(config) as running:
        learners = start_learners(running.address, 3)
        history = running.leader.run()
        update_bytes = running.leader.intake.update_bytes
        model_bytes = running.leader.model_bytes
    assert join_all(learners) == [0, 0, 0]
    assert [entry["updates_buffered"] for entry in history] == [3, 3, 3]
    assert all(entry["bytes_in"] == 3 * update_bytes for entry in history)
    if "compression" in overrides:
        assert update_bytes < model_bytes / 3  # int8 on the wire: a quarter of float32, plus scales
    else:
        epsilons = [entry["dp_epsilon"] for entry in history]
        assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]  # every aggregation spends privacy


# ---- virtual learners in a pool (the Ray engine's, here in-process) -------------------------------------------------


class JobWatch:
    """Records, in a federation of in-process pools, each model version the leader published, the version each job
    was bound to by its learner's fetch, the model each job trained on, and the staleness each taken update was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.versions: dict[int, dict[str, torch.Tensor]] = {}  # version -> the published shared state
        self.bound: dict[tuple[int, int], list[int]] = {}  # (learner id, job) -> the version of each GetModel for it
        self.trained: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (learner id, job) -> the model it trained on
        self.taken: dict[tuple[int, int], tuple[int, int]] = {}  # (learner id, job) -> (staleness, version it joined)
        published_of, bind, finish, train = Published.of.__func__, fedbuff.Jobs.bind, fedbuff.Jobs.finish, training.LocalTrainer.train

        def watched_of(cls, round_number, model, buffers=None):
            with self.lock:
                self.versions[round_number] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
            return published_of(cls, round_number, model, buffers)

        def watched_bind(jobs, learner_id, version):
            job = bind(jobs, learner_id, version)
            with self.lock:
                self.bound.setdefault((learner_id, job.number), []).append(job.version)
            return job

        def watched_finish(jobs, learner_id, number, digest, version_now):
            answer, staleness = finish(jobs, learner_id, number, digest, version_now)
            if answer is None:  # taken, not a retry's duplicate
                with self.lock:
                    self.taken[(learner_id, number)] = (staleness, version_now)
            return answer, staleness

        def watched_train(trainer, round_number):
            if trainer.learner_id >= 0:  # not the pool's warm-up
                with self.lock:
                    self.trained[(trainer.learner_id, round_number)] = {k: v.clone() for k, v in trainer.shared.state_dict().items()}
            return train(trainer, round_number)

        monkeypatch.setattr(Published, "of", classmethod(watched_of))
        monkeypatch.setattr(fedbuff.Jobs, "bind", watched_bind)
        monkeypatch.setattr(fedbuff.Jobs, "finish", watched_finish)
        monkeypatch.setattr(training.LocalTrainer, "train", watched_train)


def test_a_pools_learners_each_train_their_own_jobs_on_the_model_version_the_leader_bound(tmp_path, monkeypatch):
    watch = JobWatch(monkeypatch)
    config = leader_config(tmp_path, aggregation="fedbuff", learners=4, buffer_size=2, rounds=5, local_steps=3, batch_size=16, lr=0.05)
    with running_leader(config) as running:
        pools = [run_pool(PoolConfig(leader=running.address, connect_timeout=30), indices) for indices in ([0, 2], [1, 3])]
        history = running.leader.run()
        assert all(pool.done.wait(60) for pool in pools)
    assert all(pool.stop_reason == "training complete" for pool in pools)

    # every aggregation took its buffer of updates, none refused as stale or malformed
    assert [entry["updates_buffered"] for entry in history] == [2] * 5
    assert not any(entry["updates_stale"] or entry["updates_rejected"] for entry in history)
    assert sorted({learner_id for learner_id, _ in watch.trained}) == [0, 1, 2, 3]  # every virtual learner had its turns
    for learner_id in range(4):  # each learner's jobs, numbered by its own count, one after another
        jobs = sorted(job for owner, job in watch.trained if owner == learner_id)
        assert jobs == list(range(1, len(jobs) + 1))

    # each job fetched its own model once, with its learner's session, and trained on exactly the version that fetch bound
    assert watch.bound.keys() >= watch.trained.keys()
    for key, state in watch.trained.items():
        assert len(watch.bound[key]) == 1, key
        version = watch.bound[key][0]
        assert all(torch.equal(state[name], watch.versions[version][name]) for name in state), (key, version)
    # and the leader weighed each taken update by how far that version lagged behind the buffer it joined
    assert len(watch.taken) >= 10
    for key, (staleness, version_now) in watch.taken.items():
        assert staleness == version_now - watch.bound[key][0] >= 0, key
    recorded = [(entry["round"], entry["staleness_max"]) for entry in history]
    assert recorded == [(v, max(s for s, joined in watch.taken.values() if joined == v)) for v in range(1, 6)]

    # the buffers moved the model, and it learned
    assert not torch.equal(watch.versions[6]["fc.weight"], watch.versions[1]["fc.weight"])
    assert history[-1]["test_loss"] < history[0]["test_loss"]


def test_a_pools_learner_that_drops_out_of_its_first_job_comes_back_for_a_later_one(tmp_path, caplog):
    seed, dropout = 28, 0.3
    # Each job is drawn for by the learner's count of jobs in all its sessions: learners 0 and 3 drop out of their
    # first and none of its second. Drawn by the job's number, which starts at 1 again in each session, they would
    # drop out of every job they were given.
    assert [random.Random(f"dropout-{seed}-{index}-1").random() < dropout for index in range(4)] == [True, False, False, True]
    assert not any(random.Random(f"dropout-{seed}-{index}-2").random() < dropout for index in range(4))
    caplog.set_level(logging.INFO)
    # more aggregations than the test needs: it stops the run once every learner has trained, however long rejoining takes
    config = leader_config(tmp_path, aggregation="fedbuff", learners=4, buffer_size=2, rounds=10000, local_steps=2, batch_size=16)
    with running_leader(config) as running:
        leader = running.leader
        pool_config = PoolConfig(leader=running.address, connect_timeout=30, dropout=dropout, seed=seed)
        pools = [run_pool(pool_config, indices) for indices in ([0, 2], [1, 3])]
        learners = {learner.index: learner for pool in pools for learner in pool.learners}
        runner, outcome = run_until_stopped(leader)
        # rounds_trained counts updates the leader took; read without the pool's lock: one attribute, and polled again
        wait_until(lambda: all(learner.rounds_trained >= 1 for learner in learners.values()), timeout=120)
        leader.stop_event.set()
        runner.join(60)
        leader.stop_learners("the test has seen what it checks")
        assert all(pool.done.wait(60) for pool in pools)
    assert outcome["error"] == "leader shutting down"
    assert any("simulated dropout" in record.getMessage() for record in caplog.records if record.name == "fedgrpc.leader.roster")
    assert learners[0].jobs_given >= 2 and learners[3].jobs_given >= 2  # dropped out of one job, registered again, given another
    assert all(entry["updates_buffered"] == 2 for entry in leader.history)


def test_under_fedbuff_a_pool_keeps_each_virtual_learners_personal_part_from_job_to_job(tmp_path, monkeypatch):
    heads: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (learner, job) -> its head before and after
    train = training.LocalTrainer.train

    def recording_train(trainer, round_number):
        before = trainer.model.fc.weight.detach().clone()
        result = train(trainer, round_number)
        if trainer.learner_id >= 0:  # not the pool's warm-up
            heads[(trainer.learner_id, round_number)] = (before, trainer.model.fc.weight.detach().clone())
        return result

    monkeypatch.setattr(training.LocalTrainer, "train", recording_train)
    config = leader_config(
        tmp_path, aggregation="fedbuff", share="fedper", eval_every=0, learners=2, buffer_size=1, rounds=4, local_steps=3
    )
    with running_leader(config) as running:
        pool = run_pool(PoolConfig(leader=running.address, connect_timeout=30), [0, 1])
        history = running.leader.run()
        assert pool.done.wait(60)
    assert [entry["updates_buffered"] for entry in history] == [1] * 4
    for learner_id, job in heads:  # the head a job starts from is the one the learner's previous job left, not the other's
        if (learner_id, job + 1) in heads:
            assert torch.equal(heads[(learner_id, job + 1)][0], heads[(learner_id, job)][1]), (learner_id, job)
    assert (0, 2) in heads and (1, 2) in heads  # each trained a second job on its own head
    assert not torch.equal(heads[(0, 1)][1], heads[(1, 1)][1])  # two learners, two heads, in one model
