"""Scale benchmark: one real leader process against N simulated learners; seconds per round and leader peak memory against N.

For each N the leader runs as `python leader.py` on loopback, and one further process (this module with
--simulate) plays all N learners: it hosts one gRPC server with the LearnerService and the standard health
service, registers N learners through the real RegisterLearner (one callback address for all of them, each
with its own callback secret, by which the server tells the leader's calls apart), and answers StartTraining
(GetModel, then an update) and every pushed model (an update) with a ready-made update of the model's exact
layout through the real AccumulateGradients, from a bounded pool of sender threads. Nothing trains, so the
leader's own work is what scales: registration, health checks, model pushes, receiving, checking and summing
updates. Run it from the repository root as a module, so that the repository's own modules import without
touching sys.path:

    python -m bench.scale --out docs/scale.md
    python -m bench.scale --learners-list 10,100 --rounds 3

Seconds per round come from the leader's metrics.jsonl (`round_seconds`; round 1 is a warm-up and left out of
the median), peak memory from /proc/PID/status (VmHWM), polled while the leader runs.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from bench import report as report_file
from fedgrpc.engines.launcher import free_port
from fedgrpc.leader import plots
from fedgrpc.model import MODELS, build_model
from fedgrpc.protos import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from fedgrpc.transport import rpc, wire

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LEARNERS = "10,100,1000"
DEFAULT_ROUNDS = 5  # round 1 is a warm-up: the median is over the rest
# The issue asks for a model of about 100 k parameters; of model.MODELS, resnet20 (272 k) is the nearest on a
# log scale (tiny-cnn has 11.6 k, resnet18 11.2 M), and its BatchNorm buffers put float and integer buffers in every update.
DEFAULT_MODEL = "resnet20"
DEFAULT_SENDERS = 32  # simulated learners' calls to the leader in flight at once (registrations, GetModel, updates)
SERVER_WORKERS = 64  # the simulator's server threads: the leader makes at most 32 calls to learners at once
DEFAULT_TIMEOUT_S = 1800.0  # one N, start to finish; the leader and the simulator are killed after it
LEADER_JOIN_TIMEOUT_S = 600.0
LEADER_ROUND_TIMEOUT_S = 600.0
STARTUP_TIMEOUT_S = 120.0  # the first registration waits this long for a leader still importing torch
POLL_S = 0.1  # how often the leader's /proc status and metrics are read
EXIT_GRACE_S = 60.0  # after the last round: the leader stops N learners and draws its plot; the simulator waits for stops
KILL_GRACE_S = 10.0  # a child asked to stop (or done: the leader stopped every learner before exiting) gets this long
WAIT_SLICE_S = 0.5  # the simulator's main thread wakes this often, so that SIGTERM's handler runs promptly
UPDATE_VALUE = 1e-4  # every parameter of every update: small, finite, identical across learners
UPDATE_EXAMPLES = 1  # within 1..batch size, the leader's bound for --local-steps 1 whatever the split
UPDATE_LOSS = 2.3
LOG_TAIL_LINES = 3
SUMMARY_PREFIX = "SCALE-SUMMARY "  # the simulator's last stdout line: its counts as JSON


# ---- the simulated learners ---------------------------------------------------------------------------------


@dataclass
class SimulatedLearner:
    """One learner as the simulator plays it: the secrets it registered with and the rounds it answered."""

    callback_token: str
    learner_id: int = -1
    session_token: str = ""
    rounds: set[int] = field(default_factory=set)
    stopped: bool = False


@dataclass(frozen=True)
class SimConfig:
    """The simulator's settings."""

    leader: str
    learners: int
    senders: int = DEFAULT_SENDERS
    deadline_s: float = DEFAULT_TIMEOUT_S


class Simulator(learner_pb2_grpc.LearnerServiceServicer):
    """Many learners behind one LearnerService: each call is routed by the callback secret the leader presents."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._cond = threading.Condition()
        self._by_token: dict[str, SimulatedLearner] = {}
        self._senders = ThreadPoolExecutor(max_workers=config.senders, thread_name_prefix="sender")
        self.channel = rpc.channel(config.leader)
        self.stub = leader_pb2_grpc.LeaderServiceStub(self.channel)
        self.outcomes: Counter[str] = Counter()  # "call: OK" or "call: CODE"
        self.first_error: dict[str, str] = {}
        self.register_s = 0.0
        self.stop_reasons: Counter[str] = Counter()
        self.finished = threading.Event()  # set on SIGTERM or when every learner was told to stop
        self._first_chunk: tuple[Any, bytes] | None = None  # the update's manifest and first chunk
        self._rest: list[leader_pb2.GradientData] = []  # its later chunks, framed once for every learner and round
        self._update_bytes = 0
        self._model_bytes = 0
        self.server, self.port, _ = rpc.create_server(
            lambda server: learner_pb2_grpc.add_LearnerServiceServicer_to_server(self, server),
            "127.0.0.1",
            0,
            max_workers=SERVER_WORKERS,
            gate=self._gate(),
            health_services=[rpc.LEARNER_SERVICE],
        )

    def _gate(self) -> rpc.Gate:
        """Refuse leader calls without a callback secret of one of ours, as learner.learner_gate does for one."""

        def check(method: str, metadata: Any) -> rpc.Refusal | None:
            token = rpc.metadata_value(metadata, rpc.TOKEN_METADATA_KEY)
            if token is None:
                return grpc.StatusCode.UNAUTHENTICATED, f"missing {rpc.TOKEN_METADATA_KEY}"
            with self._cond:
                known = token in self._by_token
            return None if known else (grpc.StatusCode.PERMISSION_DENIED, "token belongs to none of these learners")

        return rpc.Gate(learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name, check)

    # ---- registration and the ready-made update -----------------------------------------------

    def register_all(self) -> bool:
        """Register every simulated learner; the first one's plan names the model the update is built for. Whether all got in."""
        learners = [SimulatedLearner(secrets.token_urlsafe(32)) for _ in range(self.config.learners)]
        with self._cond:
            self._by_token = {learner.callback_token: learner for learner in learners}
        plan = self._register(learners[0], STARTUP_TIMEOUT_S)  # waits for a leader still starting
        if plan is None:
            return False
        started = time.monotonic()
        self._prepare_update(plan)
        plans = list(self._senders.map(lambda learner: self._register(learner, rpc.CONTROL_TIMEOUT_S), learners[1:]))
        self.register_s = time.monotonic() - started
        return all(plan is not None for plan in plans)

    def _register(self, learner: SimulatedLearner, timeout: float) -> leader_pb2.TrainingPlan | None:
        info = leader_pb2.LearnerInfo(
            network_addr=f"127.0.0.1:{self.port}", callback_token=learner.callback_token, version=rpc.PROTOCOL_VERSION, tls=False
        )
        try:
            reply = self.stub.RegisterLearner(info, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as error:
            self._note("RegisterLearner", error)
            return None
        self._note("RegisterLearner")
        with self._cond:
            learner.learner_id, learner.session_token = reply.learner_id, reply.session_token
        return reply.plan

    def _prepare_update(self, plan: leader_pb2.TrainingPlan) -> None:
        """Encode one update of the plan's model: UPDATE_VALUE for parameters, the fresh model's values for buffers."""
        model = build_model(plan.model, plan.num_classes)
        specs = wire.specs_of(model.state_dict())
        if wire.fingerprint(specs) != plan.model_fingerprint:
            raise RuntimeError(f"this model.py builds a different {plan.model} than the leader's")
        if getattr(plan, "compression", "none") not in ("", "none"):  # the field is newer than this benchmark
            raise RuntimeError(f"the leader wants {plan.compression} updates; the simulator sends plain float32 ones")
        parameters = {name for name, _ in model.named_parameters()}
        update = {
            name: torch.full_like(tensor, UPDATE_VALUE) if name in parameters else tensor.clone()
            for name, tensor in model.state_dict().items()
        }  # buffers: non-negative variances, integer counters
        manifest, payload = wire.encode(update)
        chunks = list(wire.iter_chunks(payload))
        self._first_chunk = (manifest, chunks[0])
        self._rest = [leader_pb2.GradientData(chunk=chunk) for chunk in chunks[1:]]
        self._update_bytes = self._model_bytes = len(payload)

    # ---- calls from the leader --------------------------------------------------------------------

    def _learner(self, context: grpc.ServicerContext) -> SimulatedLearner:
        with self._cond:
            return self._by_token[rpc.caller_token(context) or ""]  # the gate let only our secrets through

    def StartTraining(self, request: learner_pb2.Empty, context: grpc.ServicerContext) -> learner_pb2.Ack:
        learner = self._learner(context)
        self._senders.submit(self._fetch_and_send, learner)
        return learner_pb2.Ack(success=True, message="training started")

    def SyncModelState(self, request_iterator: Iterator[learner_pb2.ModelState], context: grpc.ServicerContext) -> learner_pb2.Ack:
        learner = self._learner(context)
        first = next(request_iterator, None)
        if first is not None and first.stop:
            with self._cond:
                learner.stopped = True
                self.stop_reasons[first.reason] += 1
                if all(other.stopped for other in self._by_token.values()):
                    self.finished.set()
            return learner_pb2.Ack(success=True, message="stopping")
        if first is None or not first.HasField("manifest"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model state without a manifest")
        received = len(first.chunk) + sum(len(message.chunk) for message in request_iterator)
        if received != first.manifest.total_bytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"received {received} of {first.manifest.total_bytes} bytes")
        self._senders.submit(self._send, learner, first.round)
        return learner_pb2.Ack(success=True, message=f"model for round {first.round} received")

    # ---- calls to the leader ----------------------------------------------------------------------

    def _fetch_and_send(self, learner: SimulatedLearner) -> None:
        """What a started learner does first: GetModel (the round is in its header), then the update."""
        try:
            replies = self.stub.GetModel(
                leader_pb2.Empty(), timeout=rpc.transfer_timeout(self._model_bytes), metadata=rpc.token_metadata(learner.session_token)
            )
            number, received = 0, 0
            for index, reply in enumerate(replies):
                if index == 0:
                    number = reply.round
                received += len(reply.chunk)
        except grpc.RpcError as error:
            self._note("GetModel", error)
            return
        if received != self._model_bytes:
            self._note("GetModel", detail=f"received {received} of {self._model_bytes} bytes")
            return
        self._note("GetModel")
        self._send(learner, number)

    def _send(self, learner: SimulatedLearner, number: int) -> None:
        """AccumulateGradients: the ready-made update for round `number`, once per round."""
        with self._cond:
            if number in learner.rounds or learner.stopped:
                return
            learner.rounds.add(number)
        manifest, chunk = self._first_chunk
        first = leader_pb2.GradientData(
            chunk=chunk,
            manifest=manifest,
            learner_id=learner.learner_id,
            round=number,
            num_examples=UPDATE_EXAMPLES,
            train_loss=UPDATE_LOSS,
        )
        try:
            self.stub.AccumulateGradients(
                itertools.chain([first], self._rest),
                timeout=rpc.transfer_timeout(self._update_bytes),
                metadata=rpc.token_metadata(learner.session_token),
            )
        except grpc.RpcError as error:
            self._note("AccumulateGradients", error)
            return
        self._note("AccumulateGradients")

    def _note(self, call: str, error: grpc.RpcError | None = None, detail: str | None = None) -> None:
        """Count a call's outcome; keep the first detail of each kind of failure."""
        code = "OK" if error is None and detail is None else "SHORT" if error is None else error.code().name
        with self._cond:
            self.outcomes[f"{call}: {code}"] += 1
            if code != "OK":
                self.first_error.setdefault(f"{call}: {code}", detail or error.details() or "")

    def summary(self) -> dict[str, Any]:
        """Counts for the benchmark: calls by outcome, registration time, stops."""
        with self._cond:
            return {
                "learners": self.config.learners,
                "registered": sum(learner.learner_id >= 0 for learner in self._by_token.values()),
                "stopped": sum(learner.stopped for learner in self._by_token.values()),
                "register_s": self.register_s,
                "outcomes": dict(self.outcomes),
                "first_error": self.first_error,
                "stop_reasons": dict(self.stop_reasons),
            }

    def close(self) -> None:
        """Stop serving and calling."""
        self._senders.shutdown(wait=False, cancel_futures=True)
        self.server.stop(grace=1.0).wait()
        self.channel.close()


def simulate(config: SimConfig) -> int:
    """Play `config.learners` learners until the leader stops them all, SIGTERM, or the deadline; print a summary line."""
    torch.set_num_threads(1)  # nothing here computes; leave the cores to the leader and to gRPC
    simulator = Simulator(config)
    signal.signal(signal.SIGTERM, lambda signum, frame: simulator.finished.set())
    status = 0
    try:
        if simulator.register_all():
            deadline = time.monotonic() + config.deadline_s
            while not simulator.finished.wait(WAIT_SLICE_S):
                if time.monotonic() > deadline:
                    logger.warning("deadline of %.0fs passed before the leader stopped every learner", config.deadline_s)
                    break
        else:
            logger.error("not every simulated learner registered; giving up (the leader would wait for its --join-timeout)")
            status = 1
    except RuntimeError as error:
        logger.error("%s", error)
        status = 1
    print(SUMMARY_PREFIX + json.dumps(simulator.summary()), flush=True)
    simulator.close()
    return status


# ---- one measurement: a leader and the simulator for one N --------------------------------------------------


@dataclass
class Measurement:
    """What one N measured."""

    learners: int
    rounds_planned: int
    round_seconds: list[float] = field(default_factory=list)
    wall_times: list[float] = field(default_factory=list)  # when each round's metrics were taken (Unix seconds)
    reported: list[int] = field(default_factory=list)  # learners_reported of each round
    peak_rss_kib: int | None = None
    rounds_rss_kib: int | None = None  # VmHWM once the last round's metrics were written, before stopping learners and plotting
    serving_rss_kib: int | None = None  # VmRSS once the leader serves, before any learner registered
    threads_round1: int | None = None
    threads_max: int | None = None
    wall_s: float = 0.0
    leader_cpu_s: float | None = None
    sim_cpu_s: float | None = None
    register_s: float | None = None
    leader_exit: int | None = None
    notes: list[str] = field(default_factory=list)


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS (KiB) and Threads from /proc/PID/status; empty once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            try:
                values[key] = int(rest.split()[0])
            except (ValueError, IndexError):
                pass
    return values


def log_tail(path: Path, count: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, joined for a note."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(line[:300] for line in lines[-count:]) or "(empty log)"


class Child:
    """A child process reaped with wait4, so that its own CPU time is known once it exits."""

    def __init__(self, argv: list[str], env: dict[str, str], stdout: Any, stderr: Any) -> None:
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        self.pid = self.process.pid
        self.cpu_s: float | None = None

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        if self.process.returncode is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == 0:
                return None
            self.process.returncode = os.waitstatus_to_exitcode(status)  # Popen then knows it is reaped
            self.cpu_s = usage.ru_utime + usage.ru_stime
        return self.process.returncode

    def wait(self, timeout: float) -> int | None:
        """Wait up to `timeout` for it to exit; its status, or None."""
        deadline = time.monotonic() + timeout
        while (status := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(POLL_S)  # wait4 has no timeout; this polls our own child, not a peer
        return status

    def stop(self, timeout: float) -> int:
        """Wait up to `timeout` for it to exit, then SIGTERM it, then SIGKILL it; its exit status."""
        status = self.wait(timeout)
        for ask in (self.process.terminate, self.process.kill):
            if status is not None:
                break
            ask()
            status = self.wait(KILL_GRACE_S)
        return -signal.SIGKILL if status is None else status


def leader_argv(learners: int, args: argparse.Namespace, port: int, run_dir: Path) -> list[str]:
    """The leader's command line for one N."""
    return [
        sys.executable,
        "leader.py",
        "--dataset",
        "synthetic",
        "--model",
        args.model,
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--learners",
        str(learners),
        "--rounds",
        str(args.rounds),
        "--aggregation",
        "fedavg",
        "--local-steps",
        "1",
        "--run-dir",
        str(run_dir),
        "--join-timeout",
        f"{LEADER_JOIN_TIMEOUT_S:g}",
        "--round-timeout",
        f"{LEADER_ROUND_TIMEOUT_S:g}",
        "-q",
    ]


def measure(learners: int, args: argparse.Namespace, env: dict[str, str]) -> Measurement:
    """Run the leader with `learners` simulated learners; everything started here is stopped before returning."""
    result = Measurement(learners, args.rounds)
    with tempfile.TemporaryDirectory(prefix="fl-scale-") as tmp:
        tmp_path = Path(tmp)
        run_dir = tmp_path / "run"
        port = free_port()
        started = time.monotonic()
        deadline = started + args.timeout
        with (
            open(tmp_path / "leader.stderr", "w") as leader_err,
            open(tmp_path / "sim.stdout", "w") as sim_out,
            open(tmp_path / "sim.stderr", "w") as sim_err,
        ):
            leader = Child(leader_argv(learners, args, port, run_dir), env, subprocess.DEVNULL, leader_err)
            simulator: Child | None = None
            try:
                simulator = Child(
                    [
                        sys.executable,
                        "-m",
                        "bench.scale",
                        "--simulate",
                        "--leader",
                        f"127.0.0.1:{port}",
                        "--learners",
                        str(learners),
                        "--senders",
                        str(args.senders),
                        "--timeout",
                        f"{args.timeout:g}",
                    ],
                    env,
                    sim_out,
                    sim_err,
                )
                watch(result, leader, simulator, run_dir, deadline, args.timeout)
            finally:
                # the leader has exited, or was just told to stop (it then stops its learners and exits within a minute);
                # the simulator ends once the leader stopped every learner
                result.leader_exit = leader.stop(EXIT_GRACE_S if simulator is not None else 0.0)
                result.leader_cpu_s = leader.cpu_s
                if simulator is not None:
                    simulator.stop(KILL_GRACE_S)
                    result.sim_cpu_s = simulator.cpu_s
        result.wall_s = time.monotonic() - started
        records = plots.read_metrics(run_dir, missing_ok=True)
        result.round_seconds = [record["round_seconds"] for record in records]
        result.wall_times = [record["wall_time"] for record in records]
        result.reported = [record["learners_reported"] for record in records]
        add_notes(result, run_dir, tmp_path)
    return result


def watch(result: Measurement, leader: Child, simulator: Child, run_dir: Path, deadline: float, timeout: float) -> None:
    """Poll the leader's memory, threads and metrics until it exits; stop it early when the simulator died or time is up."""
    sim_gone_at: float | None = None
    log = run_dir / "leader.log"
    while leader.poll() is None:
        status = proc_status(leader.pid)
        if "VmHWM" in status:
            result.peak_rss_kib = status["VmHWM"]  # the high-water mark only grows: the last read is the peak
        if "Threads" in status:
            result.threads_max = max(result.threads_max or 0, status["Threads"])
        if result.serving_rss_kib is None and "VmRSS" in status and log.is_file() and "serving on " in log.read_text(errors="replace"):
            result.serving_rss_kib = status["VmRSS"]
        if result.rounds_rss_kib is None and "VmHWM" in status:
            done = len(plots.read_metrics(run_dir, missing_ok=True))
            if done and result.threads_round1 is None and "Threads" in status:
                result.threads_round1 = status["Threads"]
            if done >= result.rounds_planned:
                result.rounds_rss_kib = status["VmHWM"]
        now = time.monotonic()
        if now > deadline:
            result.notes.append(f"timed out after {timeout:.0f}s (--timeout)")
            leader.process.terminate()  # SIGTERM: the leader stops its learners and exits; Child.stop kills it if it does not
            return
        if (sim_status := simulator.poll()) is not None:
            sim_gone_at = sim_gone_at or now
            if sim_status != 0 or now - sim_gone_at > EXIT_GRACE_S:
                result.notes.append(f"the simulator exited ({sim_status}) while the leader still ran")
                leader.process.terminate()
                return
        time.sleep(POLL_S)  # sampling the leader's /proc entry, not waiting for a peer


def sim_summary(tmp_path: Path) -> dict[str, Any] | None:
    """The simulator's summary line, or None when it printed none."""
    try:
        lines = (tmp_path / "sim.stdout").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith(SUMMARY_PREFIX):
            return json.loads(line[len(SUMMARY_PREFIX) :])
    return None


def add_notes(result: Measurement, run_dir: Path, tmp_path: Path) -> None:
    """Say what went wrong and where the run stopped, from the leader's log and the simulator's counts."""
    summary = sim_summary(tmp_path)
    if summary is not None:
        result.register_s = summary["register_s"]
        failed = {key: count for key, count in summary["outcomes"].items() if not key.endswith(": OK")}
        if failed:
            details = "; ".join(f"{key} x{count} ({summary['first_error'].get(key, '')[:160]})" for key, count in failed.items())
            result.notes.append(f"simulator calls failed: {details}")
        if summary["registered"] < result.learners:
            result.notes.append(f"{summary['registered']} of {result.learners} registered")
    else:
        result.notes.append(f"no summary from the simulator: {log_tail(tmp_path / 'sim.stderr')}")
    short = [
        f"round {number}: {count} of {result.learners} reported"
        for number, count in enumerate(result.reported, start=1)
        if count != result.learners
    ]
    result.notes.extend(short)
    log = run_dir / "leader.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    warnings = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
    if warnings:
        result.notes.append(f"leader.log: {len(warnings)} warnings or errors, the first: {warnings[0][:300]}")
    done = len(result.round_seconds)
    if result.leader_exit != 0 or done < result.rounds_planned:
        if "starting training" not in text:
            where = f"before training ({text.count(' registered from ')} of {result.learners} registrations logged)"
        else:
            where = f"in round {done + 1}"
        result.notes.append(f"leader exit {result.leader_exit}, stopped {where}; last leader.log lines: {log_tail(log)}")
        errors = log_tail(tmp_path / "leader.stderr")
        if errors not in ("(empty log)", "(no log)"):
            result.notes.append(f"leader stderr: {errors}")


# ---- the report -----------------------------------------------------------------------------------------------


def header_lines(args: argparse.Namespace, parameters: int, update_bytes: int) -> list[str]:
    """Machine, versions, commit, date, model and run count."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit, changed = "unknown", ""
    template = " ".join(leader_argv(0, args, 0, Path("TMP"))[1:]).replace("--learners 0", "--learners N").replace("--port 0", "--port P")
    return [
        "# Scale benchmark",
        "",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs ({platform.machine()})",
        f"- python {platform.python_version()}, torch {torch.__version__}, grpcio {grpc.__version__}",
        f"- commit: {commit or 'unknown'}" + (" (with uncommitted changes to tracked files)" if changed else ""),
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- model: {args.model}, {parameters:,} parameters; one update or model is {update_bytes / 1e6:.2f} MB",
        f"- rounds per N: {args.rounds} (round 1 is a warm-up, left out of the median); one run per N",
        f"- leader: python {template}",
        f"- learners: one simulator process (`python -m bench.scale --simulate`) plays all N behind one gRPC server and one "
        f"client channel; {args.senders} of its calls to the leader in flight at most (updates in flight, and so the leader's "
        f"buffers for them, follow --senders); no training, no GetData, no Heartbeat",
        "- connections: gRPC shares one TCP connection among channels to the same address, so all of it runs over two "
        "(simulator to leader, and the leader's N per-learner channels to the simulator); what N separate hosts' sockets "
        "and HTTP/2 transports would cost is not in these figures",
    ]


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for the table, or '-'."""
    return "-" if value is None else f"{value:.{digits}f}"


def mib(kib: int | None) -> float | None:
    """KiB as MiB, or None."""
    return None if kib is None else kib / 1024


def table_lines(results: list[Measurement]) -> list[str]:
    """The Markdown table, one line per N."""
    lines = [
        "| N | rounds done | median s/round (min-max) | round 1 s | median s between rounds | leader peak RSS MiB (rounds / whole run) "
        "| leader RSS serving MiB | leader threads (end of round 1 / max) | register s | wall s | leader CPU s | simulator CPU s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        timed = result.round_seconds[1:] or result.round_seconds  # without a second round, round 1 is all there is
        median = f"{statistics.median(timed):.2f} ({min(timed):.2f}-{max(timed):.2f})" if timed else "-"
        if result.round_seconds and len(result.round_seconds) == 1:
            median += " (round 1 only)"
        gaps = [later - earlier for earlier, later in zip(result.wall_times, result.wall_times[1:], strict=False)]
        threads = f"{result.threads_round1 if result.threads_round1 is not None else '-'} / {result.threads_max or '-'}"
        notes = "; ".join(result.notes).replace("|", "/") or "-"
        lines.append(
            f"| {result.learners} | {len(result.round_seconds)}/{result.rounds_planned} | {median} "
            f"| {fmt(result.round_seconds[0] if result.round_seconds else None, 2)} "
            f"| {fmt(statistics.median(gaps) if gaps else None, 2)} "
            f"| {fmt(mib(result.rounds_rss_kib), 0)} / {fmt(mib(result.peak_rss_kib), 0)} "
            f"| {fmt(mib(result.serving_rss_kib), 0)} | {threads} | {fmt(result.register_s, 2)} | {fmt(result.wall_s)} "
            f"| {fmt(result.leader_cpu_s)} | {fmt(result.sim_cpu_s)} | {notes} |"
        )
    return lines


def ratio_lines(results: list[Measurement]) -> list[str]:
    """Peak RSS at the largest N against the smallest, and per added learner (whole run, and during the rounds)."""
    lines = []
    for what, peak in (("whole run", lambda result: result.peak_rss_kib), ("during the rounds", lambda result: result.rounds_rss_kib)):
        measured = [result for result in results if peak(result) is not None]
        if len(measured) < 2:
            continue
        small = min(measured, key=lambda result: result.learners)
        large = max(measured, key=lambda result: result.learners)
        if small.learners == large.learners:
            continue
        extra_kib = peak(large) - peak(small)
        lines.append(
            f"- leader peak RSS ({what}) at N={large.learners} over N={small.learners}: {peak(large) / peak(small):.2f}x "
            f"({extra_kib / 1024:+.0f} MiB, {extra_kib / (large.learners - small.learners):+.0f} KiB per added learner)"
        )
    return ["", *lines] if lines else []


DEFINITIONS = [
    "",
    "s/round: the leader's own `round_seconds` from metrics.jsonl, as leader.py defines it; s between rounds: the gaps "
    "between consecutive rounds' `wall_time` (the leader's throughput, whatever overlaps it runs). "
    "Peak RSS: the leader's VmHWM, read every 0.1 s: once the last round's metrics line appeared (rounds), and the last "
    "read before it exited (whole run: stopping N learners and drawing the plot too); RSS serving: its VmRSS once it logged `serving on`, "
    "before any registration. Threads: /proc/PID/status `Threads:` when metrics.jsonl got its first line, and the most seen. "
    "Register s: the first registration answered to the last (N - 1 registrations, at most --senders at once). "
    "CPU s: user plus system seconds of the whole process.",
]


def parse_learners(text: str) -> list[int]:
    """'10,100,1000' as a list of positive ints."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(value < 1 for value in values):
        raise ValueError(f"--learners-list needs positive counts, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Measure every N, print the table (and write it to --out); or, with --simulate, be the learners."""
    parser = argparse.ArgumentParser(
        description="Scale benchmark: one leader against N simulated learners on loopback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--learners-list", default=DEFAULT_LEARNERS, help="comma-separated learner counts, one leader run each")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds per N (the first is a warm-up)")
    parser.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL, help="architecture the leader runs")
    parser.add_argument("--senders", type=int, default=DEFAULT_SENDERS, help="simulated learners' calls to the leader in flight at most")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds one N may take before its processes are stopped")
    parser.add_argument("--out", default=None, help="also write the report to this Markdown file; None means print only")
    parser.add_argument("--simulate", action="store_true", help="internal: be the simulated learners of one run")
    parser.add_argument("--leader", default=None, help="internal, with --simulate: the leader's host:port")
    parser.add_argument("--learners", type=int, default=0, help="internal, with --simulate: learners to play")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.senders < 1 or args.timeout <= 0:
        parser.error("--rounds and --senders must be at least 1, --timeout above 0")
    if args.simulate:
        if not args.leader or args.learners < 1:
            parser.error("--simulate needs --leader and --learners")
        return simulate(SimConfig(args.leader, args.learners, args.senders, args.timeout))
    try:
        counts = parse_learners(args.learners_list)
    except ValueError as error:
        parser.error(str(error))

    model = build_model(args.model, 10)  # the synthetic data set has ten classes
    parameters = sum(parameter.numel() for parameter in model.parameters())
    header = header_lines(args, parameters, wire.payload_bytes(wire.specs_of(model.state_dict())))
    print("\n".join(header), flush=True)
    env = {key: value for key, value in os.environ.items() if key != rpc.ENROLMENT_ENV}  # the simulator presents no secret
    started = time.monotonic()
    results = []
    for count in counts:
        result = measure(count, args, env)
        results.append(result)
        print(
            f"N={count}: {len(result.round_seconds)}/{args.rounds} rounds in {result.wall_s:.0f}s"
            + (f" ({'; '.join(result.notes)})" if result.notes else ""),
            file=sys.stderr,
            flush=True,
        )
    report = [
        *header,
        f"- wall time of the benchmark: {time.monotonic() - started:.0f}s",
        "",
        *table_lines(results),
        *ratio_lines(results),
        *DEFINITIONS,
    ]
    print("\n" + "\n".join(report[len(header) :]), flush=True)
    report_file.save(report, args.out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s scale %(levelname)s %(message)s")
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # As learner.py does: skip the interpreter's teardown, during which gRPC's threads can abort the process.
    os._exit(status)
