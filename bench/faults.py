"""Fault benchmark: each fault row run several times against real leader and learner processes on loopback.

Prints a Markdown table, one line per row (and writes it to --out). Run it from the repository root as a
module, so that the repository's own modules import without touching sys.path:

    python -m bench.faults --runs 3 --out docs/faults.md
    python -m bench.faults --runs 1 --rows learner-killed,hostile-payloads

Every run of a row gets its own temporary directory outside the repository and a deadline, bounds every
wait, and kills every process it started, whatever happens. A row the leader cannot run yet is reported as
"not run: <reason>". The leader calls every registrant back (a health check of the learner service) before
it admits it, so hostile clients register with the address of a small learner service run by this script
(it answers those health checks, StartTraining and model pushes like a learner would): the leader opens
rounds with them as members and their payloads meet the full checks.

Rows 1-10 inject faults into federations set up for them (quorums, timeouts); rows 11-15 run the leader on
its safe defaults (a quorum of half the round's learners, the fitted round deadline, norm bounds, the caps
on callers without a session; row 13 adds server momentum) and check that a dropped learner, a flood of
health streams, huge updates and registrations naming callbacks that are no learner leave the run
finishing every round. The table gives each row's time to detect and time to recover (the footnote says
what each row measures), the rounds lost and the bad updates accepted.
"""

from __future__ import annotations

import argparse
import datetime
import io
import ipaddress
import os
import platform
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench import report as report_file
from bench import tamper as tamper_kinds
from fedgrpc.engines.launcher import free_port
from fedgrpc.leader import checkpoint, plots
from fedgrpc.leader.roster import REGISTRATION_PROBE_S  # how long the leader waits for a registrant to answer its call-back
from fedgrpc.protos import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from fedgrpc.transport import rpc, wire
from fedgrpc.transport.tls import Tls

ROOT = Path(__file__).resolve().parent.parent
# Every row: tiny data, tiny model, CPU, so that --runs 3 of every row fits in under a quarter of an hour on 2 cores.
SMALL = ["--dataset", "synthetic", "--model", "tiny-cnn", "--device", "cpu"]
DEFAULT_RUNS = 3
RUN_TIMEOUT_S = 240.0  # one run of one row, start to finish; a watchdog kills its processes after it
STARTUP_TIMEOUT_S = 90.0  # a process importing torch on a busy 2-core machine
JOIN_TIMEOUT_S = 120.0  # the leader's --join-timeout, so a broken row fails in minutes rather than ten
CALL_TIMEOUT_S = 10.0  # deadline of every call this script makes as a client
EXIT_TIMEOUT_S = 120.0  # a run that should end on its own
RSS_POLL_S = 0.1  # how often the leader's VmHWM is read
MAX_MODEL_BYTES = 64 << 20  # GetModel replies larger than this are refused (tiny-cnn is 46 KB)

# learner killed / frozen
QUORUM_ROUNDS = 4
QUORUM_ROUND_TIMEOUT_S = 5.0
KILLED_ROUND_TIMEOUT_S = 60.0  # far off: the leader must notice the dead learner by its health checks
KILLED_LOST_AFTER_S = 2.0  # the leader's --learner-lost-after in that row
FROZEN_ROUNDS = 6  # the frozen learner is caught in round 2, 3 or 4, and its late update meets a later round
# the frozen row runs with the default fitted round deadline (--round-timeout 0): the leader finds the silent learner by
# its health checks, which time out, and marks it absent after this long (its --learner-lost-after)
FROZEN_LOST_AFTER_S = 4.0
CPU_POLL_S = 0.002  # how often a learner's CPU time is read to catch it training
TRAINING_CPU_S = 0.01  # main-thread CPU burned since the round opened that says "it is training now"
LATE_UPDATE_WAIT_S = 30.0  # how long after SIGCONT its late update may take to be refused

# leader killed and resumed
RESUME_ROUNDS = 6
RESUME_KILL_AFTER_ROUND = 2

# checkpoint writer killed
CHECKPOINT_KILLS_PER_RUN = 3
KILL_MOMENT_MAX_S = 0.3  # the kill lands at a random moment this long after the first complete checkpoint
WRITER = """
import sys, torch
from fedgrpc.leader import checkpoint
from pathlib import Path
directory, start = Path(sys.argv[1]), int(sys.argv[2])
for number in range(start, start + 1000):
    checkpoint.save(directory, number, {"w": torch.full((2_000_000,), float(number))}, {"metrics": {}}, keep=2)
    print(number, flush=True)
"""

# registrations at once
REGISTRATION_SLOTS = 100
BUSY_RETRY_S = 0.05  # a registration refused as busy (the host's share of calls without a session) is sent again after this

# stalled streams
STALL_IDLE_TIMEOUT_S = 2.0
STALLED_GET_MODELS = 8
TRICKLE_INTERVAL_S = 1.0  # the slow update stream sends one byte this often
STALL_SLACK_S = 3.0  # on top of the leader's own stream deadline and idle timeout
STALL_ROUND_TIMEOUT_S = 60.0  # round 1 stays open past the bound (about 35 s), so the leader's limits end the streams, not the run's end
STALL_ROUNDS = 3
STALL_CLIENT_WINDOW_BYTES = 1024  # a hostile reader's flow-control window: a 46 KB model cannot fit in it

# rows 11, 12, 14 and 15 run the leader with its default flags apart from the work: 2 learners, FedAvg, a few local
# steps per round (default_work)
DEFAULT_LOCAL_STEPS = 20
AT_ONCE_S = 1.0  # a refusal "at once" (the caps, a registration naming a port that is no learner) comes within this

# learner dropped out and restarted
DROPOUT_ROUNDS = 16
DROPOUT_AFTER_ROUND = 2
# rounds long enough (most of a second each on 2 busy cores) that those left after the restart outlast the new
# process's start, even when the leader finds the old one gone before the new one registers
DROPOUT_LOCAL_STEPS = 100

# health Watch flood
FLOOD_LEADER_STREAMS = 50
FLOOD_LEARNER_STREAMS = 8
FLOOD_SETTLE_S = 5.0  # how long the refusals may take to arrive, all told; each must come at once (AT_ONCE_S)
FLOOD_ROUNDS = 4

# huge updates
HUGE_ROUNDS = 5
HUGE_VALUES = (1e38, torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)  # the hostile rounds' fill values
HUGE_LOCAL_STEPS = DEFAULT_LOCAL_STEPS
LEADER_BATCH_SIZE = 32  # the leader's default --batch-size: the hostile update claims the most examples a round allows

# registrations naming the leader, or a port that never answers
NAMED_ROUNDS = 3
SILENT_REGISTRATIONS = 10
SILENT_ROUNDS = 3

# files a leader writes into its run directory; anything else there is unexpected
LEADER_FILES = re.compile(
    r"^(config\.json|leader\.log|metrics\.jsonl|metrics\.png|"
    r"checkpoints/(latest\.json|round-\d{5}\.(json|safetensors|optimizer\.safetensors)))$"
)
REFUSED_PAYLOAD_CODES = {"INVALID_ARGUMENT", "FAILED_PRECONDITION"}
REFUSED_AUTH_CODES = {"UNAUTHENTICATED", "PERMISSION_DENIED"}


class NotRun(Exception):
    """The leader cannot run this row (yet); the message says why."""


class RunFailed(Exception):
    """A run could not get as far as measuring its outcome; the message says why."""


# ---- processes ----------------------------------------------------------------------------------------------


class LoggedProcess:
    """A child process whose output lines are read in a thread and kept with the (monotonic) time each arrived."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], read_stdout: bool = False, track_rss: bool = False) -> None:
        self.name = name
        pipe_out = subprocess.PIPE if read_stdout else subprocess.DEVNULL
        pipe_err = subprocess.DEVNULL if read_stdout else subprocess.PIPE
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=pipe_out, stderr=pipe_err, text=True, errors="replace", bufsize=1
        )
        self.pid = self.process.pid
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.peak_rss_kib: int | None = None
        self._cond = threading.Condition()
        self._eof = False
        stream = self.process.stdout if read_stdout else self.process.stderr
        self._reader = threading.Thread(target=self._read, args=(stream,), name=f"read-{name}", daemon=True)
        self._reader.start()
        if track_rss:
            threading.Thread(target=self._poll_rss, name=f"rss-{name}", daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _poll_rss(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        while self.process.poll() is None:
            try:
                for line in path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kib = int(line.split()[1])  # the high-water mark only grows: the last read is the peak
            except (OSError, ValueError, IndexError):
                return  # the process is gone
            time.sleep(RSS_POLL_S)  # polling our own measurement of the process, not waiting for a peer

    def find(self, pattern: str, after: float = 0.0) -> tuple[float, re.Match] | None:
        """The first line read at or after `after` that matches, without waiting."""
        regex = re.compile(pattern)
        with self._cond:
            for stamp, line in self.lines:
                if stamp >= after and (match := regex.search(line)):
                    return stamp, match
        return None

    def matches(self, pattern: str) -> list[re.Match]:
        """Every line read so far that matches."""
        regex = re.compile(pattern)
        with self._cond:
            return [match for _, line in self.lines if (match := regex.search(line))]

    def wait_for(self, pattern: str, timeout: float, after: float = 0.0) -> tuple[float, re.Match] | None:
        """Wait up to `timeout` for a line matching `pattern` (read at or after `after`); None on timeout or end of output."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for stamp, line in self.lines[seen:]:
                    if stamp >= after and (match := regex.search(line)):
                        return stamp, match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status, or None if it is still running after `timeout`; the output read so far is complete on exit."""
        try:
            status = self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=5.0)
        return status

    def signal(self, signum: int) -> None:
        """Send a signal if the process still runs."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL it (a stopped process dies too) and reap it."""
        self.signal(signal.SIGKILL)
        try:
            self.process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, count: int = 3) -> str:
        """The last few output lines, for a note."""
        with self._cond:
            return " | ".join(line for _, line in self.lines[-count:])


def main_thread_cpu_s(pid: int) -> float | None:
    """CPU time of a process's main thread (where a learner trains), from /proc/PID/schedstat; None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class Harness:
    """One run of one row: a temporary directory, a deadline, and everything it starts, all stopped at the end."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self._tmp = tempfile.TemporaryDirectory(prefix="fl-faults-")
        self.tmp = Path(self._tmp.name)
        self.deadline = time.monotonic() + RUN_TIMEOUT_S
        self.processes: list[LoggedProcess] = []
        self.leaders: list[LoggedProcess] = []
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        # whatever a run is blocked on, its processes are killed at the deadline, which ends every wait on them
        self._watchdog = threading.Timer(RUN_TIMEOUT_S, self._kill_all)
        self._watchdog.daemon = True
        self._watchdog.start()

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left to this run, at most `cap`."""
        left = max(0.0, self.deadline - time.monotonic())
        return left if cap is None else min(left, cap)

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, read_stdout: bool = False, leader: bool = False
    ) -> LoggedProcess:
        """Start a process of this run."""
        process = LoggedProcess(name, argv, env or self.env, read_stdout=read_stdout, track_rss=leader)
        with self._lock:
            self.processes.append(process)
            if leader:
                self.leaders.append(process)
        return process

    def leader(self, port: int, run_dir: Path, flags: list[str], env: dict[str, str] | None = None) -> LoggedProcess:
        """Start `python leader.py` on 127.0.0.1:port with the small settings and `flags`."""
        argv = [
            sys.executable,
            "leader.py",
            *SMALL,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--run-dir",
            str(run_dir),
            "--join-timeout",
            str(JOIN_TIMEOUT_S),
            *flags,
        ]
        return self.start("leader", argv, env, leader=True)

    def learner(self, port: int, extra: list[str] | None = None, env: dict[str, str] | None = None) -> LoggedProcess:
        """Start `python learner.py` against the leader on 127.0.0.1:port."""
        argv = [
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
            "--no-progress",
            *(extra or []),
        ]
        return self.start(f"learner{len(self.processes)}", argv, env)

    def channel(self, address: str, tls: Tls | None = None) -> grpc.Channel:
        """A client channel closed at the end of the run."""
        channel = rpc.channel(address, tls)
        self.on_close(channel.close)
        return channel

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` when the run ends (last registered, first run)."""
        with self._lock:
            self._closers.append(closer)

    def peak_rss_mib(self) -> float | None:
        """The largest VmHWM read from any leader of this run."""
        peaks = [process.peak_rss_kib for process in self.leaders if process.peak_rss_kib is not None]
        return max(peaks) / 1024 if peaks else None

    def dump_logs(self, log: Callable[[str], None]) -> None:
        """Every process's output, with times relative to the run's start, for a run that went wrong."""
        start = self.deadline - RUN_TIMEOUT_S
        for process in list(self.processes):
            log(f"---- {process.name} (pid {process.pid}, exit {process.process.poll()})")
            for stamp, line in list(process.lines):
                log(f"{stamp - start:8.3f} {line}")

    def _kill_all(self) -> None:
        with self._lock:
            processes = list(self.processes)
        for process in processes:
            process.kill()

    def close(self) -> None:
        """Kill every process, close every channel and server, remove the directory."""
        self._watchdog.cancel()
        self._kill_all()
        with self._lock:
            closers = list(reversed(self._closers))
        for closer in closers:
            closer()
        self._tmp.cleanup()


def serving_port(leader: LoggedProcess, harness: Harness) -> None:
    """Wait until the leader serves; RunFailed with its last lines if it exits or stalls first."""
    if leader.wait_for(r"serving on ", harness.remaining(STARTUP_TIMEOUT_S)) is None:
        status = leader.wait_exit(1.0)
        raise RunFailed(f"leader did not start (exit {status}): {leader.tail()}")


def learner_id_of(learner: LoggedProcess, harness: Harness) -> int:
    """The id a learner process says it registered as."""
    hit = learner.wait_for(r"registered as learner (\d+)", harness.remaining(STARTUP_TIMEOUT_S))
    if hit is None:
        raise RunFailed(f"{learner.name} did not register: {learner.tail()}")
    return int(hit[1].group(1))


def rounds_missing(run_dir: Path, rounds: int) -> int:
    """Rounds 1..rounds with no line in metrics.jsonl."""
    present = {record.get("round") for record in plots.read_metrics(run_dir, missing_ok=True)}
    return sum(1 for number in range(1, rounds + 1) if number not in present)


def unexpected_files(run_dir: Path) -> list[str]:
    """Files in a run directory that the leader does not write."""
    return sorted(
        path.relative_to(run_dir).as_posix()
        for path in run_dir.rglob("*")
        if path.is_file() and not LEADER_FILES.match(path.relative_to(run_dir).as_posix())
    )


def final_weights(checkpoint_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The newest checkpoint's record and weights (RunFailed when there is none)."""
    latest = checkpoint.latest(checkpoint_dir)
    if latest is None:
        raise RunFailed(f"no checkpoint in {checkpoint_dir}")
    return checkpoint.load(latest)


# ---- a learner service for hostile clients, and the clients -------------------------------------------------


class FakeLearner(learner_pb2_grpc.LearnerServiceServicer):
    """The learner side of hostile clients: answers the leader's health checks, StartTraining and pushes, and records them."""

    WORKERS = 16

    def __init__(self, harness: Harness) -> None:
        self._cond = threading.Condition()
        self.started: set[str] = set()  # callback tokens that got StartTraining
        self.pushed: dict[str, list[int]] = {}  # callback token -> rounds of the models pushed to it
        self.stopped: set[str] = set()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=self.WORKERS), options=rpc.GRPC_OPTIONS)
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(self, self.server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        for service in ("", rpc.LEARNER_SERVICE):  # the leader calls a registrant back for the learner service's health
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.address = f"127.0.0.1:{port}"
        harness.on_close(lambda: self.server.stop(grace=None))

    def StartTraining(self, request: learner_pb2.Empty, context: grpc.ServicerContext) -> learner_pb2.Ack:
        with self._cond:
            self.started.add(rpc.caller_token(context) or "")
            self._cond.notify_all()
        return learner_pb2.Ack(success=True, message="training started")

    def SyncModelState(self, request_iterator: Iterator[learner_pb2.ModelState], context: grpc.ServicerContext) -> learner_pb2.Ack:
        token = rpc.caller_token(context) or ""
        first = next(request_iterator, None)
        for _ in request_iterator:
            pass  # the rest of the model's chunks; nothing here uses them
        with self._cond:
            if first is not None and first.stop:
                self.stopped.add(token)
            elif first is not None:
                self.pushed.setdefault(token, []).append(first.round)
            self._cond.notify_all()
        return learner_pb2.Ack(success=True, message="ok")

    def wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Wait up to `timeout` for `ready()` (evaluated under this service's lock)."""
        with self._cond:
            return self._cond.wait_for(ready, timeout)


@dataclass
class Client:
    """A hand-driven learner client: a stub plus the ids and secrets it registered with."""

    stub: leader_pb2_grpc.LeaderServiceStub
    learner_id: int
    token: str
    callback_token: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying this client's session token."""
        return rpc.token_metadata(self.token)


def learner_info(network_addr: str, callback_token: str | None = None) -> leader_pb2.LearnerInfo:
    """A registration as the current release's learner, calling back at `network_addr`."""
    return leader_pb2.LearnerInfo(
        network_addr=network_addr, callback_token=callback_token or secrets.token_urlsafe(32), version=rpc.PROTOCOL_VERSION
    )


def register(channel: grpc.Channel, network_addr: str, metadata: tuple[tuple[str, str], ...] = ()) -> Client:
    """Register through the real RPC."""
    stub = leader_pb2_grpc.LeaderServiceStub(channel)
    info = learner_info(network_addr)
    reply = stub.RegisterLearner(info, timeout=CALL_TIMEOUT_S, metadata=metadata)
    return Client(stub, reply.learner_id, reply.session_token, info.callback_token)


def fetch_model(client: Client, require_finite: bool = True) -> dict[str, torch.Tensor]:
    """The leader's current global model, as a client sees it (a learner refuses one that is not finite; this may take it)."""
    replies = client.stub.GetModel(leader_pb2.Empty(), timeout=CALL_TIMEOUT_S, metadata=client.metadata())
    received = wire.receive(replies, max_bytes=MAX_MODEL_BYTES, require_finite=require_finite)
    return {name: tensor.clone() for name, tensor in received.tensors.items()}


@dataclass
class Outcome:
    """How one client call ended."""

    what: str
    code: str  # "OK" or the status code's name
    detail: str
    seconds: float


def attempt(what: str, call: Callable[[], Any]) -> Outcome:
    """Make one call (which carries its own deadline) and note how it ended and how long it took."""
    start = time.monotonic()
    try:
        reply = call()
    except grpc.RpcError as error:
        return Outcome(what, error.code().name, error.details() or "", time.monotonic() - start)
    message = getattr(reply, "message", "")
    if hasattr(reply, "success") and not reply.success:
        return Outcome(what, "NOT_SUCCESS", message, time.monotonic() - start)
    return Outcome(what, "OK", message, time.monotonic() - start)


def update_call(client: Client, messages: Callable[[], Iterator[Any]], metadata: Any = None) -> Callable[[], Any]:
    """An AccumulateGradients call that builds its request stream when made."""
    return lambda: client.stub.AccumulateGradients(
        messages(), timeout=CALL_TIMEOUT_S, metadata=client.metadata() if metadata is None else metadata
    )


def update_stream(tensors: dict[str, torch.Tensor], learner_id: int, **header: Any) -> Callable[[], Iterator[Any]]:
    """A well-formed update stream for `tensors`, with header fields that `header` overrides."""
    manifest, payload = wire.encode(tensors)
    return raw_stream(manifest, payload, learner_id, **header)


def raw_stream(manifest: Any, payload: bytes | bytearray, learner_id: int, **header: Any) -> Callable[[], Iterator[Any]]:
    """An update stream of a given manifest and payload."""
    fields = dict(learner_id=learner_id, round=1, num_examples=10, train_loss=1.0)
    fields.update(header)
    return lambda: wire.stream(leader_pb2.GradientData, manifest, payload, **fields)


def code_counts(outcomes: list[Outcome]) -> str:
    """How the calls ended, e.g. 'INVALID_ARGUMENT x17, FAILED_PRECONDITION x1', for a note."""
    return ", ".join(f"{code} x{count}" for code, count in Counter(outcome.code for outcome in outcomes).most_common())


def unexpected(outcomes: list[Outcome], allowed: set[str]) -> list[str]:
    """Descriptions of the outcomes whose code is not in `allowed`."""
    return [f"{outcome.what}: {outcome.code} {outcome.detail[:80]}" for outcome in outcomes if outcome.code not in allowed]


# ---- results ------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one run of a row measured."""

    ok: bool
    detect_s: float | None = None
    recover_s: float | None = None
    rounds_lost: int | None = None
    bad_accepted: int | None = None
    peak_rss_mib: float | None = None
    notes: list[str] = field(default_factory=list)


class Expect:
    """Collects the expectations a run missed."""

    def __init__(self) -> None:
        self.missed: list[str] = []

    def __call__(self, condition: bool, what: str) -> bool:
        if not condition:
            self.missed.append(what)
        return condition

    def result(self, harness: Harness, **measured: Any) -> RunResult:
        """The run's result: as expected when nothing was missed."""
        notes = measured.pop("notes", [])
        return RunResult(not self.missed, peak_rss_mib=harness.peak_rss_mib(), notes=[*self.missed, *notes], **measured)


@dataclass
class Context:
    """What rows share across runs: the environment, the leader's flags, the straight run of the resume row."""

    env: dict[str, str]
    leader_help: str
    straight: dict[str, torch.Tensor] | str | None = None  # weights, or why the straight run failed

    def leader_has(self, flag: str) -> bool:
        """Whether `python leader.py --help` lists a flag."""
        return re.search(rf"(^|\s){re.escape(flag)}\b", self.leader_help) is not None


# ---- rows -----------------------------------------------------------------------------------------------------


def quorum_flags(rounds: int, round_timeout: float = QUORUM_ROUND_TIMEOUT_S) -> list[str]:
    """Three learners, two of which make a round."""
    return [
        "--learners",
        "3",
        "--min-learners",
        "2",
        "--round-timeout",
        str(round_timeout),
        "--aggregation",
        "fedavg",
        "--local-steps",
        "5",
        "--rounds",
        str(rounds),
    ]


def row_learner_killed(harness: Harness, context: Context, index: int) -> RunResult:
    """SIGKILL one of three learners while it trains round 1; the other two finish the run."""
    expect = Expect()
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(
        port, run_dir, [*quorum_flags(QUORUM_ROUNDS, KILLED_ROUND_TIMEOUT_S), "--learner-lost-after", str(KILLED_LOST_AFTER_S)]
    )
    learners = [harness.learner(port) for _ in range(3)]
    victim = learners[-1]
    victim_id = learner_id_of(victim, harness)
    if leader.wait_for(r"starting training", harness.remaining(STARTUP_TIMEOUT_S)) is None:
        raise RunFailed(f"training did not start: {leader.tail()}")
    # killed while it trains round 1 (a fresh process spends about a second on it); at once if it was quicker than that
    killed_at = signal_while_training(victim, 1, signal.SIGKILL, harness.remaining(QUORUM_ROUND_TIMEOUT_S))
    notes = ["killed while training round 1" if killed_at is not None else "killed after its round 1 update"]
    if killed_at is None:
        killed_at = time.monotonic()
    victim.kill()
    # the leader notices: a warning naming the learner at its address, or a round that ends without it
    seen = leader.wait_for(rf"learner {victim_id} at \S+|round \d+/{QUORUM_ROUNDS}: 2 learners", harness.remaining(), after=killed_at)
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    lost = rounds_missing(run_dir, QUORUM_ROUNDS)
    expect(seen is not None, "the leader never logged the learner as failed or a round without it")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    expect(lost == 0, f"{lost} rounds missing from metrics.jsonl")
    if seen is not None:
        notes.append(f"noticed by: {seen[1].string.split(' ', 4)[-1][:120]!r}")
    for learner in learners[:-1]:
        code = learner.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
        if code != 0:
            notes.append(f"{learner.name} exit {code}: {learner.tail(2)}")
    return expect.result(harness, detect_s=seen[0] - killed_at if seen else None, rounds_lost=lost, notes=notes)


def signal_while_training(victim: LoggedProcess, round_number: int, signum: int, limit_s: float) -> float | None:
    """Send `signum` to a learner once its main thread is busy with `round_number`'s local work; None if it finished first."""
    done = rf"round {round_number}: (sent update|update not taken)"
    base = main_thread_cpu_s(victim.pid)
    deadline = time.monotonic() + limit_s
    while base is not None and time.monotonic() < deadline:
        cpu = main_thread_cpu_s(victim.pid)
        if cpu is None or victim.find(done) is not None:
            return None
        if cpu - base >= TRAINING_CPU_S:
            victim.signal(signum)
            return time.monotonic()
        time.sleep(CPU_POLL_S)  # polling our own reading of its CPU time, not waiting for a peer
    return None


def row_learner_frozen(harness: Harness, context: Context, index: int) -> RunResult:
    """SIGSTOP one of three learners while it trains, until the leader marks it absent; SIGCONT; its late update must be refused."""
    expect = Expect()
    port, run_dir = free_port(), harness.tmp / "run"
    # 100 local steps: long enough that the freeze reliably lands while it trains, now that rounds overlap; the round
    # deadline is the fitted default, so that the silent learner is found by its health checks, not by a timeout
    leader = harness.leader(
        port, run_dir, [*quorum_flags(FROZEN_ROUNDS, 0), "--local-steps", "100", "--learner-lost-after", str(FROZEN_LOST_AFTER_S)]
    )
    learners = [harness.learner(port) for _ in range(3)]
    victim = learners[-1]
    victim_id = learner_id_of(victim, harness)
    # the round's model reaches the learner just after the previous round's line; round 1 is left out (a fresh process
    # spends a second warming up, longer than the later rounds take), and the next round is tried if the learner
    # trained too fast to catch; the last two rounds are left for its late update to meet
    triggers = [(rf"round {number}/{FROZEN_ROUNDS}:", number + 1) for number in range(1, FROZEN_ROUNDS - 2)]
    stopped_at, frozen_round = None, None
    for pattern, number in triggers:
        if leader.wait_for(pattern, harness.remaining(STARTUP_TIMEOUT_S)) is None:
            raise RunFailed(f"the leader did not log {pattern!r}: {leader.tail()}")
        stopped_at = signal_while_training(victim, number, signal.SIGSTOP, harness.remaining(QUORUM_ROUND_TIMEOUT_S))
        if stopped_at is not None:
            frozen_round = number
            break
    if stopped_at is None or frozen_round is None:
        raise RunFailed(
            f"never caught the learner training (each round's local work ended before it burned {TRAINING_CPU_S * 1000:.0f} ms of CPU)"
        )
    # stopped until its round has closed without it (the leader marks it absent once its health checks have timed out
    # for --learner-lost-after); the later rounds are short, so it resumes at once for its late update to meet a round
    # that is still running
    closed = leader.wait_for(
        rf"round {frozen_round}/{FROZEN_ROUNDS}: (\d+) learners", harness.remaining(QUORUM_ROUND_TIMEOUT_S * 4), after=stopped_at
    )
    resumed_at = time.monotonic()
    victim.signal(signal.SIGCONT)
    refused_pattern = rf"refused an update from learner {victim_id}\b"
    # a late update is refused in the round (FAILED_PRECONDITION), or, once the leader has marked the learner absent and
    # ended its session, at the door (UNAUTHENTICATED): the learner then says its session ended and registers again
    victim_refused = (
        rf"round {frozen_round}: update not taken|sending the round {frozen_round} update failed: .*ended this learner's session"
    )
    refused = None
    deadline = time.monotonic() + harness.remaining(LATE_UPDATE_WAIT_S)
    while refused is None and time.monotonic() < deadline:
        refused = leader.wait_for(refused_pattern, min(0.2, deadline - time.monotonic()), after=stopped_at) or victim.find(victim_refused)
        if victim.process.poll() is not None and leader.process.poll() is not None:
            refused = leader.find(refused_pattern, after=stopped_at) or victim.find(victim_refused)
            break
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    late_accepted = victim.find(rf"round {frozen_round}: sent update", after=resumed_at) is not None
    metrics = {record["round"]: record for record in plots.read_metrics(run_dir, missing_ok=True)}
    frozen_metrics = metrics.get(frozen_round, {})
    expect(
        closed is not None and int(closed[1].group(1)) == 2,
        f"round {frozen_round} closed with {closed[1].group(1) if closed else 'no'} learners, not 2 without the frozen one",
    )
    expect(
        frozen_metrics.get("learners_reported") == 2,
        f"metrics round {frozen_round}: learners_reported {frozen_metrics.get('learners_reported')}",
    )
    rejected = sum(record.get("updates_rejected", 0) for number, record in metrics.items() if number > frozen_round)
    expect(refused is not None or rejected > 0, "the late update was neither logged as refused nor counted in updates_rejected")
    expect(not late_accepted, "the late update was accepted")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    lost = rounds_missing(run_dir, FROZEN_ROUNDS)
    expect(lost == 0, f"{lost} rounds missing from metrics.jsonl")
    notes = [f"frozen in round {frozen_round} for {resumed_at - stopped_at:.1f}s"]
    if refused is not None:
        notes.append(f"late update refused: {refused[1].string.split(' ', 4)[-1][:120]!r}")
    if victim.find(r"stopping after") is not None and refused is None:
        notes.append("the frozen learner was told to stop before it sent its late update")
    return expect.result(
        harness, detect_s=closed[0] - stopped_at if closed else None, rounds_lost=lost, bad_accepted=int(late_accepted), notes=notes
    )


def resume_flags(context: Context) -> list[str]:
    """The resume row's federation: two learners, FedAvg with server momentum, seeded (deterministic when the leader can be)."""
    flags = [
        "--learners",
        "2",
        "--aggregation",
        "fedavg",
        "--local-steps",
        "20",
        "--server-momentum",
        "0.5",
        "--rounds",
        str(RESUME_ROUNDS),
        "--seed",
        "5",
        "--checkpoint-every",
        "1",
    ]  # a checkpoint of every round: one exists at the kill
    if context.leader_has("--deterministic"):
        flags.append("--deterministic")  # asks for bit-for-bit equality with the uninterrupted run
    return flags


RESUME_LEARNER_FLAGS = ["--leader-lost-after", "3", "--connect-timeout", "60"]


def straight_weights(context: Context) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted run with the resume row's flags, run once per benchmark."""
    if context.straight is None:
        harness = Harness(context.env)
        try:
            port, run_dir = free_port(), harness.tmp / "straight"
            leader = harness.leader(port, run_dir, resume_flags(context))
            learners = [harness.learner(port, RESUME_LEARNER_FLAGS) for _ in range(2)]
            status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S * 2))
            for learner in learners:
                learner.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
            if status != 0:
                context.straight = f"the uninterrupted run failed (exit {status}): {leader.tail()}"
            else:
                record, weights = final_weights(run_dir / "checkpoints")
                context.straight = (
                    weights if record["round"] == RESUME_ROUNDS else f"the uninterrupted run ended at round {record['round']}"
                )
        except RunFailed as error:
            context.straight = f"the uninterrupted run failed: {error}"
        finally:
            harness.close()
    if isinstance(context.straight, str):
        raise RunFailed(context.straight)
    return context.straight


def row_leader_killed(harness: Harness, context: Context, index: int) -> RunResult:
    """SIGKILL the leader after round 2, restart it with --resume; the learners rejoin and the weights match a straight run."""
    expected = straight_weights(context)
    expect = Expect()
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(port, run_dir, resume_flags(context))
    learners = [harness.learner(port, RESUME_LEARNER_FLAGS) for _ in range(2)]
    if leader.wait_for(rf"round {RESUME_KILL_AFTER_ROUND}/{RESUME_ROUNDS}:", harness.remaining(EXIT_TIMEOUT_S)) is None:
        raise RunFailed(f"the leader never finished round {RESUME_KILL_AFTER_ROUND}: {leader.tail()}")
    leader.kill()
    done_before_kill = max(int(match.group(1)) for match in leader.matches(rf"round (\d+)/{RESUME_ROUNDS}:"))
    committed = final_weights(run_dir / "checkpoints")[0]["round"]
    restarted_at = time.monotonic()
    resumed = harness.start("resumed leader", [sys.executable, "leader.py", "--resume", str(run_dir), "--join-timeout", "60"], leader=True)
    resumed_from = resumed.wait_for(r"resuming after round (\d+)", harness.remaining(STARTUP_TIMEOUT_S))
    first_round = resumed.wait_for(rf"round \d+/{RESUME_ROUNDS}:", harness.remaining(EXIT_TIMEOUT_S))
    status = resumed.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    notes = [
        f"checkpoint at kill: round {committed}",
        "--deterministic on both runs" if "--deterministic" in resume_flags(context) else "leader has no --deterministic",
    ]
    for learner in learners:
        code = learner.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
        if code != 0 or learner.find(r"training complete") is None:
            notes.append(f"{learner.name} exit {code}: {learner.tail(2)}")
    expect(status == 0, f"resumed leader exit {status}: {resumed.tail()}")
    expect(resumed_from is not None, "the resumed leader did not say which round it resumed after")
    rounds_lost = done_before_kill - int(resumed_from[1].group(1)) if resumed_from else None
    if status == 0:
        record, weights = final_weights(run_dir / "checkpoints")
        expect(record["round"] == RESUME_ROUNDS, f"the resumed run ended at round {record['round']}")
        differing = [name for name in expected if not torch.equal(weights.get(name, torch.empty(0)), expected[name])]
        if differing:
            worst = max(float((weights[name].double() - expected[name].double()).abs().max()) for name in differing if name in weights)
            expect(False, f"{len(differing)} of {len(expected)} tensors differ from the uninterrupted run (max |diff| {worst:.3g})")
    return expect.result(harness, recover_s=first_round[0] - restarted_at if first_round else None, rounds_lost=rounds_lost, notes=notes)


def row_checkpoint_killed(harness: Harness, context: Context, index: int) -> RunResult:
    """SIGKILL a process that writes checkpoints at random moments; the newest checkpoint must always load intact."""
    expect = Expect()
    generator = random.Random(index)
    directory = harness.tmp / "checkpoints"
    start = 1
    for kill in range(CHECKPOINT_KILLS_PER_RUN):
        writer = harness.start("writer", [sys.executable, "-c", WRITER, str(directory), str(start)], read_stdout=True)
        if writer.wait_for(r"^\d+$", harness.remaining(STARTUP_TIMEOUT_S)) is None:
            raise RunFailed(f"the checkpoint writer wrote nothing: exit {writer.wait_exit(1.0)}")
        time.sleep(generator.uniform(0.0, KILL_MOMENT_MAX_S))  # a random moment in the writer's loop, not a wait for a peer
        writer.kill()
        latest = checkpoint.latest(directory)
        try:
            record, weights = checkpoint.load(latest)
        except (OSError, ValueError, KeyError, TypeError) as error:
            expect(False, f"kill {kill + 1}: the newest checkpoint does not load: {error}")
            break
        if not expect(
            torch.equal(weights["w"], torch.full((2_000_000,), float(record["round"]))),
            f"kill {kill + 1}: round {record['round']} holds the wrong weights",
        ):
            break
        start = record["round"] + 1
    return expect.result(harness, notes=[f"{start - 1} checkpoints written over {CHECKPOINT_KILLS_PER_RUN} kills"])


def row_registration_burst(harness: Harness, context: Context, index: int) -> RunResult:
    """101 concurrent registrations for 100 slots: 100 distinct ids, one RESOURCE_EXHAUSTED, the leader still serving."""
    expect = Expect()
    fake = FakeLearner(harness)
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(port, run_dir, ["--learners", str(REGISTRATION_SLOTS), "--rounds", "1", "--round-timeout", "120"])
    serving_port(leader, harness)
    channel = harness.channel(f"127.0.0.1:{port}")
    stub = leader_pb2_grpc.LeaderServiceStub(channel)

    def one(_: int) -> Outcome | leader_pb2.AckWithMetadata:
        info = learner_info(fake.address)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            try:
                return stub.RegisterLearner(info, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as error:
                busy = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in (error.details() or "")
                if not busy or time.monotonic() > deadline:  # busy: one host's share of calls without a session; as learner.py, try again
                    return Outcome("registration", error.code().name, error.details() or "", 0.0)
                time.sleep(BUSY_RETRY_S)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=REGISTRATION_SLOTS + 1) as pool:
        replies = list(pool.map(one, range(REGISTRATION_SLOTS + 1)))
    elapsed = time.monotonic() - started
    accepted = [reply for reply in replies if isinstance(reply, leader_pb2.AckWithMetadata)]
    refused = [reply for reply in replies if isinstance(reply, Outcome)]
    serving = rpc.is_serving(channel, timeout=CALL_TIMEOUT_S)
    expect(
        sorted(reply.learner_id for reply in accepted) == list(range(REGISTRATION_SLOTS)),
        f"{len(accepted)} accepted, ids not exactly 0..{REGISTRATION_SLOTS - 1}",
    )
    expect(len({reply.session_token for reply in accepted}) == len(accepted), "session tokens repeat")
    codes = Counter(outcome.code for outcome in refused)
    expect(codes == Counter({"RESOURCE_EXHAUSTED": 1}), f"refusals: {dict(codes) or 'none'}")
    expect(serving, "the leader's health check does not answer SERVING after the burst")
    return expect.result(harness, detect_s=elapsed)


def open_round_with_fake_learners(
    harness: Harness, count: int, flags: list[str], env: dict[str, str] | None = None, enrolment: tuple[tuple[str, str], ...] = ()
) -> tuple[LoggedProcess, Path, FakeLearner, list[Client], int]:
    """A leader whose federation is `count` hand-driven clients, with round 1 open (StartTraining reached them all)."""
    fake = FakeLearner(harness)
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(port, run_dir, ["--learners", str(count), "--aggregation", "fedavg", *flags], env=env)
    serving_port(leader, harness)
    channel = harness.channel(f"127.0.0.1:{port}")
    clients = [register(channel, fake.address, enrolment) for _ in range(count)]
    tokens = {client.callback_token for client in clients}
    if not fake.wait(lambda: tokens <= fake.started, harness.remaining(STARTUP_TIMEOUT_S)):
        raise RunFailed(f"the leader did not start its clients: {leader.tail()}")
    return leader, run_dir, fake, clients, port


def row_hostile_payloads(harness: Harness, context: Context, index: int) -> RunResult:
    """Malformed updates from the only (hand-driven) learner in an open round: all refused, nothing written, model unchanged."""
    expect = Expect()
    leader, run_dir, fake, (client,), _ = open_round_with_fake_learners(harness, 1, ["--rounds", "1", "--round-timeout", "120"])
    model = fetch_model(client)
    good = {name: torch.zeros_like(tensor) for name, tensor in model.items()}  # a zero FedAvg delta leaves the model as it is
    manifest, payload = wire.encode(good)
    learner_id = client.learner_id
    pickled = io.BytesIO()
    torch.save(good, pickled)  # our own tensors, pickled as the blog's learners sent them; nothing here unpickles anything

    def with_tensor(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**good, name: value}

    first_name, first = next(iter(good.items()))
    last_name, last = list(good.items())[-1]
    nan, inf = first.clone(), first.clone()
    nan.view(-1)[0], inf.view(-1)[0] = float("nan"), float("inf")
    unknown_dtype, _ = wire.encode(good)
    unknown_dtype.tensors[0].dtype = "complex128"
    short_total, _ = wire.encode(good)
    short_total.total_bytes -= 4
    duplicate_name, _ = wire.encode(good)
    duplicate_name.tensors.add(name=first_name, dtype="float32", shape=list(first.shape))
    duplicate_name.total_bytes += first.numel() * 4
    huge, _ = wire.encode(good)
    huge.tensors.add(name="extra", dtype="float32", shape=[1 << 38])
    huge.total_bytes += 1 << 40
    blog_style = leader_pb2.GradientData(chunk=pickled.getvalue(), learner_id=learner_id, round=1, num_examples=10)
    # one message whose chunk is above the 4 MiB chunk limit but under gRPC's 6 MiB message cap, so the leader's check meets it
    big_chunk = list(
        wire.stream(
            leader_pb2.GradientData,
            manifest,
            bytes(payload) + b"\0" * (5 << 20),
            chunk_bytes=5 << 20,
            learner_id=learner_id,
            round=1,
            num_examples=10,
            train_loss=1.0,
        )
    )
    cases: list[tuple[str, Callable[[], Iterator[Any]]]] = [
        ("pickle with no manifest (the blog's format)", lambda: iter([blog_style])),
        ("pickle under a genuine manifest", raw_stream(manifest, pickled.getvalue(), learner_id)),
        ("empty stream", lambda: iter([])),
        ("manifest with an unknown dtype", raw_stream(unknown_dtype, payload, learner_id)),
        ("manifest whose sizes do not add up", raw_stream(short_total, payload, learner_id)),
        ("manifest naming a tensor twice", raw_stream(duplicate_name, payload, learner_id)),
        ("manifest declaring 1 TiB", raw_stream(huge, b"", learner_id)),
        ("truncated bytes", raw_stream(manifest, payload[:-4], learner_id)),
        ("bytes beyond the manifest", raw_stream(manifest, bytes(payload) + b"\0" * 8, learner_id)),
        ("a 5 MiB chunk", lambda: iter(big_chunk)),
        ("wrong shape", update_stream(with_tensor(last_name, torch.zeros(last.numel() + 1)), learner_id)),
        ("wrong dtype", update_stream(with_tensor(last_name, last.double()), learner_id)),
        ("NaN", update_stream(with_tensor(first_name, nan), learner_id)),
        ("infinity", update_stream(with_tensor(first_name, inf), learner_id)),
        ("missing tensor", update_stream({name: t for name, t in good.items() if name != last_name}, learner_id)),
        ("num_examples 0", update_stream(good, learner_id, num_examples=0)),
        ("num_examples 10^12", update_stream(good, learner_id, num_examples=10**12)),
        ("NaN train_loss", update_stream(good, learner_id, train_loss=float("nan"))),
    ]
    outcomes = [attempt(what, update_call(client, messages)) for what, messages in cases]
    honest = attempt("the well-formed update", update_call(client, update_stream(good, learner_id)))
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    bad = unexpected(outcomes, REFUSED_PAYLOAD_CODES)
    expect(not bad, f"not refused as expected: {'; '.join(bad)}")
    expect(honest.code == "OK", f"the well-formed update after them: {honest.code} {honest.detail}")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    extra = unexpected_files(run_dir)
    expect(not extra, f"files the leader does not write: {extra}")
    notes = [f"hostile calls ended: {code_counts(outcomes)}"]
    if status == 0:
        record, weights = final_weights(run_dir / "checkpoints")
        expect(all(torch.equal(weights[name], model[name]) for name in model), "the model changed although only a zero update was taken")
        rejected = record["metrics"].get("updates_rejected")
        if rejected != len(cases):
            notes.append(f"updates_rejected {rejected} for {len(cases)} refusals")
    return expect.result(
        harness,
        detect_s=max(outcome.seconds for outcome in outcomes),
        rounds_lost=rounds_missing(run_dir, 1),
        bad_accepted=sum(outcome.code in ("OK", "NOT_SUCCESS") for outcome in outcomes),
        notes=notes,
    )


def row_stale_duplicate(harness: Harness, context: Context, index: int) -> RunResult:
    """Stale, future, replayed, repeated and conflicting updates: refused, or (an identical retry) counted once."""
    expect = Expect()
    leader, run_dir, fake, (first, second), _ = open_round_with_fake_learners(harness, 2, ["--rounds", "2", "--round-timeout", "120"])
    model = fetch_model(first)
    zero = {name: torch.zeros_like(tensor) for name, tensor in model.items()}
    other = {name: torch.full_like(tensor, 0.001) for name, tensor in model.items()}
    update_bytes = wire.payload_bytes(wire.specs_of(zero))
    hostile: list[Outcome] = []
    hostile.append(attempt("stale round 0", update_call(first, update_stream(zero, first.learner_id, round=0))))
    hostile.append(attempt("future round 2", update_call(first, update_stream(zero, first.learner_id, round=2))))
    taken = attempt("first update", update_call(first, update_stream(zero, first.learner_id)))
    retry = attempt("identical retry", update_call(first, update_stream(zero, first.learner_id)))
    hostile.append(attempt("different second update", update_call(first, update_stream(other, first.learner_id))))
    closing = attempt("the other learner's update", update_call(second, update_stream(zero, second.learner_id)))
    pushed = fake.wait(lambda: all(2 in fake.pushed.get(client.callback_token, []) for client in (first, second)), harness.remaining(60.0))
    expect(pushed, "round 2 never started")
    hostile.append(attempt("round-1 update replayed in round 2", update_call(first, update_stream(zero, first.learner_id))))
    hostile.append(attempt("other learner's round-1 update replayed", update_call(second, update_stream(zero, second.learner_id))))
    finals = [
        attempt(f"round 2 update {n}", update_call(client, update_stream(zero, client.learner_id, round=2)))
        for n, client in enumerate((first, second))
    ]
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    expected_codes = ["FAILED_PRECONDITION", "FAILED_PRECONDITION", "ALREADY_EXISTS", "FAILED_PRECONDITION", "FAILED_PRECONDITION"]
    wrong = [
        f"{outcome.what}: {outcome.code} (expected {code}) {outcome.detail[:60]}"
        for outcome, code in zip(hostile, expected_codes, strict=False)
        if outcome.code != code
    ]
    expect(not wrong, "; ".join(wrong))
    for outcome in (taken, closing, *finals):
        expect(outcome.code == "OK", f"{outcome.what}: {outcome.code} {outcome.detail[:80]}")
    expect(retry.code == "OK" and "counted once" in retry.detail, f"identical retry: {retry.code} {retry.detail[:80]}")
    metrics = {record["round"]: record for record in plots.read_metrics(run_dir, missing_ok=True)}
    counted_twice = 0
    for number in (1, 2):
        record = metrics.get(number, {})
        if record.get("learners_reported", 0) > 2 or record.get("bytes_in", 0) > 2 * update_bytes:
            counted_twice += 1
        expect(record.get("learners_reported") == 2, f"round {number}: learners_reported {record.get('learners_reported')}")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    accepted = sum(outcome.code in ("OK", "NOT_SUCCESS") for outcome in hostile) + counted_twice
    return expect.result(
        harness,
        detect_s=max(outcome.seconds for outcome in hostile),
        rounds_lost=rounds_missing(run_dir, 2),
        bad_accepted=accepted,
        notes=[f"hostile calls ended: {code_counts(hostile)}"],
    )


def row_impersonation(harness: Harness, context: Context, index: int) -> RunResult:
    """An enrolment secret on the leader; calls without it, without or with forged/other tokens, and forged leader calls."""
    expect = Expect()
    secret = secrets.token_urlsafe(24)
    env = {**context.env, rpc.ENROLMENT_ENV: secret}
    enrolment = ((rpc.ENROLMENT_METADATA_KEY, secret),)
    fake = FakeLearner(harness)
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(
        port,
        run_dir,
        ["--learners", "2", "--aggregation", "fedavg", "--local-steps", "2", "--rounds", "1", "--round-timeout", "120"],
        env=env,
    )
    real = harness.learner(port, env=env)
    serving_port(leader, harness)
    channel = harness.channel(f"127.0.0.1:{port}")
    stub = leader_pb2_grpc.LeaderServiceStub(channel)
    outcomes = [
        attempt("register without the enrolment secret", lambda: stub.RegisterLearner(learner_info(fake.address), timeout=CALL_TIMEOUT_S)),
        attempt(
            "register with a wrong enrolment secret",
            lambda: stub.RegisterLearner(
                learner_info(fake.address), timeout=CALL_TIMEOUT_S, metadata=((rpc.ENROLMENT_METADATA_KEY, "wrong " + secret),)
            ),
        ),
    ]
    client = register(channel, fake.address, enrolment)
    joined = leader.wait_for(rf"learner (?!{client.learner_id}\b)(\d+) registered from (\S+)", harness.remaining(STARTUP_TIMEOUT_S))
    if joined is None:
        raise RunFailed(f"the real learner did not register: {real.tail()}")
    real_id, real_address = int(joined[1].group(1)), joined[1].group(2)
    model = fetch_model(client)
    zero = {name: torch.zeros_like(tensor) for name, tensor in model.items()}
    anonymous = Client(stub, client.learner_id, "", "")
    forged = Client(stub, client.learner_id, secrets.token_urlsafe(32), "")
    outcomes += [
        attempt("update without a session token", update_call(anonymous, update_stream(zero, client.learner_id), metadata=())),
        attempt("update with a forged session token", update_call(forged, update_stream(zero, client.learner_id))),
        attempt("GetModel without a session token", lambda: list(stub.GetModel(leader_pb2.Empty(), timeout=CALL_TIMEOUT_S))),
        attempt(
            "GetData without a session token",
            lambda: list(stub.GetData(leader_pb2.LearnerDataRequest(learner_id=client.learner_id), timeout=CALL_TIMEOUT_S)),
        ),
        attempt("update claiming another learner's id", update_call(client, update_stream(zero, real_id))),
        attempt(
            "GetData of another learner's split",
            lambda: list(
                stub.GetData(leader_pb2.LearnerDataRequest(learner_id=real_id), timeout=CALL_TIMEOUT_S, metadata=client.metadata())
            ),
        ),
    ]
    if hasattr(leader_pb2, "HeartbeatRequest") and hasattr(stub, "Heartbeat"):
        outcomes.append(
            attempt(
                "Heartbeat as another learner",
                lambda: stub.Heartbeat(leader_pb2.HeartbeatRequest(learner_id=real_id), timeout=CALL_TIMEOUT_S, metadata=client.metadata()),
            )
        )
    # someone who is not the leader calls the real learner back
    to_learner = learner_pb2_grpc.LearnerServiceStub(harness.channel(real_address))
    model_manifest, model_payload = wire.encode(model)
    outcomes += [
        attempt(
            "StartTraining to a learner without its callback secret",
            lambda: to_learner.StartTraining(learner_pb2.Empty(), timeout=CALL_TIMEOUT_S),
        ),
        attempt(
            "stop sent to a learner with a wrong callback secret",
            lambda: to_learner.SyncModelState(
                iter([learner_pb2.ModelState(stop=True, reason="forged")]),
                timeout=CALL_TIMEOUT_S,
                metadata=rpc.token_metadata(client.token),
            ),
        ),
        attempt(
            "model pushed to a learner with a wrong callback secret",
            lambda: to_learner.SyncModelState(
                wire.stream(learner_pb2.ModelState, model_manifest, model_payload, round=2),
                timeout=CALL_TIMEOUT_S,
                metadata=rpc.token_metadata(secrets.token_urlsafe(32)),
            ),
        ),
    ]
    started = fake.wait(lambda: client.callback_token in fake.started, harness.remaining(STARTUP_TIMEOUT_S))
    expect(started, "the leader never started the hand-driven learner")
    honest = attempt("the registered client's own update", update_call(client, update_stream(zero, client.learner_id)))
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    real_status = real.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    bad = unexpected(outcomes, REFUSED_AUTH_CODES)
    expect(not bad, f"not refused as expected: {'; '.join(bad)}")
    expect(honest.code == "OK", f"the registered client's own update: {honest.code} {honest.detail[:80]}")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    expect(real_status == 0 and real.find(r"training complete") is not None, f"real learner exit {real_status}: {real.tail(2)}")
    return expect.result(
        harness,
        detect_s=max(outcome.seconds for outcome in outcomes),
        rounds_lost=rounds_missing(run_dir, 1),
        bad_accepted=sum(outcome.code in ("OK", "NOT_SUCCESS") for outcome in outcomes),
        notes=[f"hostile calls ended: {code_counts(outcomes)}"],
    )


@dataclass
class WatchedStream:
    """A hostile call whose end this script sees: when it was opened, and when and how it ended."""

    what: str
    opened: float
    ended: float | None = None
    code: str | None = None


def answer_pushes(fake: FakeLearner, client: Client, update: dict[str, torch.Tensor], rounds: int, harness: Harness) -> None:
    """Behave from round 2 on: send `update` for every round whose model the leader pushes, until it says stop."""
    for number in range(2, rounds + 1):
        if not fake.wait(
            lambda: number in fake.pushed.get(client.callback_token, []) or client.callback_token in fake.stopped, harness.remaining()
        ):
            return
        if client.callback_token in fake.stopped:
            return
        attempt(f"round {number} update", update_call(client, update_stream(update, client.learner_id, round=number)))


def row_stalled_streams(harness: Harness, context: Context, index: int) -> RunResult:
    """A member opens unread GetModel streams and a 1-byte-per-second update; the leader ends them, the rounds go on."""
    if not context.leader_has("--stream-idle-timeout"):
        raise NotRun("leader lacks --stream-idle-timeout")
    expect = Expect()
    fake = FakeLearner(harness)
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(
        port,
        run_dir,
        [
            "--learners",
            "3",
            "--min-learners",
            "2",
            "--round-timeout",
            str(STALL_ROUND_TIMEOUT_S),
            "--rounds",
            str(STALL_ROUNDS),
            "--aggregation",
            "fedavg",
            "--local-steps",
            "5",
            "--stream-idle-timeout",
            str(STALL_IDLE_TIMEOUT_S),
        ],
    )
    serving_port(leader, harness)
    client = register(harness.channel(f"127.0.0.1:{port}"), fake.address)
    learners = [harness.learner(port) for _ in range(2)]
    if not fake.wait(lambda: client.callback_token in fake.started, harness.remaining(STARTUP_TIMEOUT_S)):
        raise RunFailed(f"the leader never started the hostile member: {leader.tail()}")
    model = fetch_model(client)
    zero = {name: torch.zeros_like(tensor) for name, tensor in model.items()}
    manifest, payload = wire.encode(model)
    # the leader's own limits: the idle timeout for a reader that stopped, the stream deadline for a trickle
    bound = rpc.transfer_timeout(len(payload)) + STALL_IDLE_TIMEOUT_S + STALL_SLACK_S
    client_deadline = STALL_ROUND_TIMEOUT_S  # ours comes long after the leader should have acted
    # a reader with a window far smaller than the model: the leader's write blocks, as for a peer that stopped reading
    stalled = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.http2.lookahead_bytes", STALL_CLIENT_WINDOW_BYTES),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
        ],
    )
    harness.on_close(stalled.close)
    stalled_stub = leader_pb2_grpc.LeaderServiceStub(stalled)
    lock = threading.Condition()
    stop_trickle = threading.Event()
    harness.on_close(stop_trickle.set)

    def watch(what: str, call: Any) -> WatchedStream:
        entry = WatchedStream(what, time.monotonic())

        def ended(done: Any) -> None:
            with lock:
                entry.ended, entry.code = time.monotonic(), done.code().name
                lock.notify_all()

        harness.on_close(call.cancel)
        call.add_done_callback(ended)
        return entry

    def trickle() -> Iterator[Any]:
        yield leader_pb2.GradientData(
            manifest=manifest, chunk=b"\0", learner_id=client.learner_id, round=1, num_examples=10, train_loss=1.0
        )
        while not stop_trickle.wait(TRICKLE_INTERVAL_S):  # our own sending pace: one byte a second
            yield leader_pb2.GradientData(chunk=b"\0")

    slow = watch(
        "1-byte-per-second update", client.stub.AccumulateGradients.future(trickle(), timeout=client_deadline, metadata=client.metadata())
    )
    readers = []
    for number in range(STALLED_GET_MODELS):
        call = stalled_stub.GetModel(leader_pb2.Empty(), timeout=client_deadline, metadata=client.metadata())
        readers.append((call, watch(f"unread GetModel {number + 1}", call)))
    opened = slow.opened
    cancelled_pattern = r"cancelled a GetModel stream"

    def settled() -> bool:
        # grpc-python reports the end of a response stream only once it is read, so the leader's log tells
        # when it cancelled the unread ones; refusals (no message pending) and the update stream end visibly
        refused = sum(entry.ended is not None for _, entry in readers)
        return slow.ended is not None and len(leader.matches(cancelled_pattern)) >= STALLED_GET_MODELS - refused

    with lock:
        while not settled() and time.monotonic() < opened + bound and harness.remaining() > 0:
            lock.wait(0.25)  # re-checks the leader's log, which this script reads itself
    stop_trickle.set()
    # the leader's cancellations of unread streams, then what reading them now gives
    cancellations = [stamp for stamp, line in list(leader.lines) if re.search(cancelled_pattern, line)]
    for call, entry in readers:
        if entry.ended is None:
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                pass  # its code is recorded by the done callback
    ends = [stamp for stamp in [slow.ended, *(entry.ended for _, entry in readers if entry.code == "RESOURCE_EXHAUSTED")] if stamp]
    ends += cancellations
    in_time = [stamp for stamp in ends if stamp <= opened + bound]
    codes = Counter(entry.code for _, entry in readers)
    expect(
        slow.ended is not None and slow.ended <= opened + bound and slow.code != "OK",
        f"the 1-byte-per-second update ended {f'after {slow.ended - opened:.1f}s' if slow.ended else 'never'} with {slow.code}",
    )
    expect(
        len(in_time) >= STALLED_GET_MODELS + 1,
        f"{STALLED_GET_MODELS + 1 - len(in_time)} hostile streams not ended by the leader within {bound:.0f}s",
    )
    expect(not codes.get("OK"), f"{codes.get('OK')} unread GetModel streams ended OK when read later (the leader never cut them)")
    honest = attempt("the hostile member's round 1 update", update_call(client, update_stream(zero, client.learner_id)))
    responder = threading.Thread(target=answer_pushes, args=(fake, client, zero, STALL_ROUNDS, harness), daemon=True)
    responder.start()
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    for learner in learners:
        code = learner.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
        expect(code == 0, f"{learner.name} exit {code}: {learner.tail(2)}")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    reported = [record.get("learners_reported", 0) for record in plots.read_metrics(run_dir, missing_ok=True)]
    expect(len(reported) == STALL_ROUNDS and all(count >= 2 for count in reported), f"learners reported per round: {reported}")
    return expect.result(
        harness,
        detect_s=max(in_time) - opened if in_time else None,
        rounds_lost=rounds_missing(run_dir, STALL_ROUNDS),
        bad_accepted=codes.get("OK", 0) + (slow.code == "OK"),
        notes=[
            f"update stream: {slow.code} after {fmt(slow.ended - opened if slow.ended else None, 1)}s; "
            f"GetModel: {len(cancellations)} cancelled by the leader, then {dict(codes)}; "
            f"hostile member's own update afterwards: {honest.code}; bound {bound:.0f}s"
        ],
    )


def write_pki(directory: Path) -> dict[str, str]:
    """A private CA and two certificates it signed for 127.0.0.1 and localhost (leader, learner), as tests/test_tls.py makes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("bench CA"))
        .issuer_name(name("bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": str(directory / "ca.pem")}
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    for serial, role in enumerate(("leader", "learner"), start=2):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(role))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(san, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{role}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        files[f"{role}_cert"], files[f"{role}_key"] = str(directory / f"{role}.pem"), str(directory / f"{role}.key")
    return files


def row_tls(harness: Harness, context: Context, index: int) -> RunResult:
    """Two rounds over mutual TLS; a TLS client without a certificate and a plaintext client are refused."""
    try:
        pki = write_pki(harness.tmp / "pki")
    except ImportError:
        raise NotRun("the cryptography package is not installed") from None
    expect = Expect()
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(
        port,
        run_dir,
        [
            "--learners",
            "2",
            "--aggregation",
            "fedavg",
            "--local-steps",
            "2",
            "--rounds",
            "2",
            "--tls-cert",
            pki["leader_cert"],
            "--tls-key",
            pki["leader_key"],
            "--tls-ca",
            pki["ca"],
        ],
    )
    learners = [
        harness.learner(port, ["--tls-cert", pki["learner_cert"], "--tls-key", pki["learner_key"], "--tls-ca", pki["ca"]]) for _ in range(2)
    ]
    serving_port(leader, harness)
    address = f"127.0.0.1:{port}"
    ca = Path(pki["ca"]).read_bytes()
    info = leader_pb2.LearnerInfo(
        network_addr="127.0.0.1:1", callback_token=secrets.token_urlsafe(32), version=rpc.PROTOCOL_VERSION, tls=True
    )
    outcomes = []
    for what, channel in (
        ("TLS client without a certificate", grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))),
        ("plaintext client", grpc.insecure_channel(address)),
    ):
        harness.on_close(channel.close)
        outcomes.append(attempt(what, lambda: leader_pb2_grpc.LeaderServiceStub(channel).RegisterLearner(info, timeout=CALL_TIMEOUT_S)))
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    for outcome in outcomes:
        expect(outcome.code != "OK", f"{outcome.what} was let in")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    reported = [record.get("learners_reported") for record in plots.read_metrics(run_dir, missing_ok=True)]
    expect(reported == [2, 2], f"learners reported per round: {reported}")
    for learner in learners:
        code = learner.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
        expect(code == 0, f"{learner.name} exit {code}: {learner.tail(2)}")
    return expect.result(
        harness,
        detect_s=max(outcome.seconds for outcome in outcomes),
        rounds_lost=rounds_missing(run_dir, 2),
        bad_accepted=sum(outcome.code == "OK" for outcome in outcomes),
        notes=[f"refused with {code_counts(outcomes)}"],
    )


# ---- rows on the safe defaults: dropout, floods, huge updates, callbacks ------------------------------------------


def metrics_by_round(run_dir: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl's lines by round."""
    return {record["round"]: record for record in plots.read_metrics(run_dir, missing_ok=True)}


def registered_address(leader: LoggedProcess, learner_id: int, harness: Harness) -> str:
    """The callback address the leader logged for a learner it admitted."""
    hit = leader.wait_for(rf"learner {learner_id} registered from (\S+) \(", harness.remaining(STARTUP_TIMEOUT_S))
    if hit is None:
        raise RunFailed(f"learner {learner_id} never registered: {leader.tail()}")
    return hit[1].group(1)


def expect_exit(expect: Expect, process: LoggedProcess, harness: Harness, wanted: int = 0) -> int | None:
    """Wait for a process that should end on its own and expect its exit status."""
    code = process.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    expect(code == wanted, f"{process.name} exit {code}: {process.tail(2)}")
    return code


def expect_every_round(expect: Expect, run_dir: Path, rounds: int, reporters: int) -> None:
    """Every round 1..rounds in metrics.jsonl, each with `reporters` learners reporting."""
    metrics = metrics_by_round(run_dir)
    reported = [metrics.get(number, {}).get("learners_reported") for number in range(1, rounds + 1)]
    expect(all(count == reporters for count in reported), f"learners reported per round: {reported}")


def default_work(rounds: int, local_steps: int = DEFAULT_LOCAL_STEPS) -> list[str]:
    """The leader's flags for a run on its defaults: two learners, FedAvg with `local_steps` per round, `rounds` rounds."""
    return ["--learners", "2", "--aggregation", "fedavg", "--local-steps", str(local_steps), "--rounds", str(rounds)]


def row_learner_dropout(harness: Harness, context: Context, index: int) -> RunResult:
    """Default flags; after round 2 one of two learners gets Ctrl-C and is started again at once; it must take part again.

    The restarted process is a newcomer (new port, new callback secret): it takes the old one's slot and must take
    part from the round the leader told it at registration, without being dropped again.
    """
    expect = Expect()
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(port, run_dir, default_work(DROPOUT_ROUNDS, DROPOUT_LOCAL_STEPS))
    healthy, victim = harness.learner(port), harness.learner(port)
    victim_id = learner_id_of(victim, harness)
    if leader.wait_for(rf"round {DROPOUT_AFTER_ROUND}/{DROPOUT_ROUNDS}:", harness.remaining(EXIT_TIMEOUT_S)) is None:
        raise RunFailed(f"the leader never finished round {DROPOUT_AFTER_ROUND}: {leader.tail()}")
    signalled_at = time.monotonic()
    victim.signal(signal.SIGINT)
    restarted = harness.learner(port)  # a new process: new port, new callback secret, registers as a newcomer
    joined = restarted.wait_for(
        r"registered as learner (\d+) of \d+.*?(?:joining from round (\d+))?$", harness.remaining(STARTUP_TIMEOUT_S)
    )
    joins_round = int(joined[1].group(2) or 1) if joined else None
    # the leader notices the old process: marked absent (its port refuses health checks), or its slot given to the new one
    noticed = leader.wait_for(rf"learner {victim_id}(?:'s slot taken| at \S+ marked absent)", harness.remaining(), after=signalled_at)
    recovered = None
    if joins_round is not None:
        back = rf"round ({'|'.join(str(number) for number in range(joins_round, DROPOUT_ROUNDS + 1))})/{DROPOUT_ROUNDS}: 2 learners"
        recovered = leader.wait_for(back, harness.remaining(), after=signalled_at)
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    victim_status = victim.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    expect_exit(expect, healthy, harness)
    expect_exit(expect, restarted, harness)
    expect(joined is not None, f"the restarted learner never registered: {restarted.tail(2)}")
    metrics = metrics_by_round(run_dir)
    rejoined = [
        number for number, record in metrics.items() if joins_round and number >= joins_round and record.get("learners_reported") == 2
    ]
    expect(bool(rejoined), f"no round after the restart (from round {joins_round}) had both learners reporting")
    expect(
        joins_round is None or metrics.get(joins_round, {}).get("learners_reported") == 2,
        f"round {joins_round}, the restarted learner's first: learners_reported {metrics.get(joins_round, {}).get('learners_reported')}",
    )
    dropped = restarted.find(r"ended this learner's session \((.*?)\); registering again")
    expect(dropped is None, f"the restarted learner was dropped: {dropped[1].group(1)[:200] if dropped else ''}")
    lost = rounds_missing(run_dir, DROPOUT_ROUNDS)
    expect(lost == 0, f"{lost} rounds missing from metrics.jsonl")
    single = [number for number, record in metrics.items() if record.get("learners_reported") == 1]
    notes = [
        f"Ctrl-C'd learner exit {victim_status}",
        f"restarted learner joined from round {joins_round}",
        f"rounds with 1 learner: {single or 'none'}",
    ]
    if noticed is not None:
        notes.append(f"noticed by: {noticed[1].string.split(' ', 4)[-1][:120]!r}")
    return expect.result(
        harness,
        detect_s=noticed[0] - signalled_at if noticed else None,
        recover_s=recovered[0] - signalled_at if recovered else None,
        rounds_lost=lost,
        notes=notes,
    )


def open_watches(harness: Harness, address: str, count: int, settled: threading.Condition) -> list[WatchedStream]:
    """Open `count` health Watch streams at `address` without a session, at once, on one connection; each entry notes its end."""
    stub = health_pb2_grpc.HealthStub(harness.channel(address))
    entries = []
    for number in range(count):
        entry = WatchedStream(f"Watch {number + 1} at {address}", time.monotonic())

        def ended(call: Any, entry: WatchedStream = entry) -> None:
            with settled:
                entry.ended, entry.code = time.monotonic(), call.code().name
                settled.notify_all()

        call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=harness.remaining())
        harness.on_close(call.cancel)
        call.add_done_callback(ended)
        entries.append(entry)
    return entries


def row_health_watch_flood(harness: Harness, context: Context, index: int) -> RunResult:
    """A stranger opens 50 health Watch streams on the leader and 8 on a learner; all but the capped few are refused at once."""
    expect = Expect()
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(port, run_dir, default_work(FLOOD_ROUNDS))
    learners = [harness.learner(port) for _ in range(2)]
    learner_address = registered_address(leader, 0, harness)
    registered_address(leader, 1, harness)
    settled = threading.Condition()
    floods = {
        "leader": open_watches(harness, f"127.0.0.1:{port}", FLOOD_LEADER_STREAMS, settled),
        "learner": open_watches(harness, learner_address, FLOOD_LEARNER_STREAMS, settled),
    }
    everything = [entry for entries in floods.values() for entry in entries]
    cap = rpc.MAX_STRANGER_STREAMS_PER_PEER  # every stream comes from 127.0.0.1
    with settled:  # until every stream past the caps has ended, or the settling time is over
        settled.wait_for(
            lambda: all(sum(entry.ended is None for entry in entries) <= cap for entries in floods.values()),
            harness.remaining(FLOOD_SETTLE_S),
        )
        outcomes = {where: Counter(entry.code or "open" for entry in entries) for where, entries in floods.items()}
        refusals = [entry.ended - entry.opened for entry in everything if entry.code == "RESOURCE_EXHAUSTED"]
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    for where, counts in outcomes.items():
        expect(counts["open"] <= cap, f"{counts['open']} Watch streams on the {where} stayed open; the cap is {cap} per peer")
        others = {code: count for code, count in counts.items() if code not in ("open", "RESOURCE_EXHAUSTED")}
        expect(not others, f"Watch streams on the {where} ended otherwise: {others}")
    slow = [seconds for seconds in refusals if seconds > AT_ONCE_S]
    expect(not slow, f"{len(slow)} refusals took over {AT_ONCE_S:g}s (slowest {max(slow, default=0):.2f}s)")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    for learner in learners:
        expect_exit(expect, learner, harness)
    expect_every_round(expect, run_dir, FLOOD_ROUNDS, 2)
    admitted_beyond = sum(max(0, counts["open"] - cap) for counts in outcomes.values())
    return expect.result(
        harness,
        detect_s=max(refusals) if refusals else None,
        rounds_lost=rounds_missing(run_dir, FLOOD_ROUNDS),
        bad_accepted=admitted_beyond,
        notes=[f"{where}: {dict(counts)}" for where, counts in outcomes.items()],
    )


def checkpoints_not_finite(checkpoint_dir: Path) -> tuple[list[int], int]:
    """Rounds whose checkpoint holds a non-finite weight or server-optimizer tensor, and how many checkpoints there are."""
    bad, count = [], 0
    for json_path in sorted(checkpoint_dir.glob("round-*.json")):
        record, weights = checkpoint.load(json_path)
        tensors = [*weights.values()]
        if "optimizer" in record:
            tensors += list(checkpoint.load_optimizer(json_path, record).values())
        count += 1
        if not all(bool(torch.isfinite(tensor).all()) for tensor in tensors if tensor.is_floating_point()):
            bad.append(record["round"])
    return bad, count


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor holds finite values only."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors.values() if tensor.is_floating_point())


def wait_for_round(fake: FakeLearner, client: Client, number: int, harness: Harness) -> bool:
    """Wait until round `number` is open for a hand-driven member (StartTraining for round 1, the model pushed after); False on stop."""
    token = client.callback_token
    opened = (lambda: token in fake.started) if number == 1 else (lambda: number in fake.pushed.get(token, []))
    if not fake.wait(lambda: opened() or token in fake.stopped, harness.remaining()):
        return False
    return fake.wait(lambda: opened() and token not in fake.stopped, 0.0)


def row_huge_updates(harness: Harness, context: Context, index: int) -> RunResult:
    """A member sends updates filled with 1e38 and float32's max for 3 rounds under server momentum; every model stays finite."""
    expect = Expect()
    fake = FakeLearner(harness)
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(
        port,
        run_dir,
        [
            "--learners",
            "2",
            "--aggregation",
            "fedavg",
            "--local-steps",
            str(HUGE_LOCAL_STEPS),
            "--server-opt",
            "sgdm",
            "--rounds",
            str(HUGE_ROUNDS),
            "--checkpoint-every",
            "1",
            "--keep-checkpoints",
            str(HUGE_ROUNDS),
        ],
    )
    serving_port(leader, harness)
    client = register(harness.channel(f"127.0.0.1:{port}"), fake.address)
    honest = harness.learner(port)
    published_bad: list[int] = []  # rounds whose published model (the one a member fetches) is not finite
    answers: list[Outcome] = []
    last_hostile_at = None
    for number in range(1, HUGE_ROUNDS + 1):
        if not wait_for_round(fake, client, number, harness):
            raise RunFailed(f"round {number} never opened for the hostile member: {leader.tail()}")
        model = fetch_model(client, require_finite=False)  # taken as published, to be checked here
        if not all_finite(model):
            published_bad.append(number - 1)
        value = HUGE_VALUES[number - 1] if number <= len(HUGE_VALUES) else 0.0  # after the hostile rounds it behaves
        update = {name: torch.full_like(tensor, value) for name, tensor in model.items()}
        outcome = attempt(
            f"round {number} update filled with {value:g}",
            update_call(client, update_stream(update, client.learner_id, round=number, num_examples=HUGE_LOCAL_STEPS * LEADER_BATCH_SIZE)),
        )
        if value:
            answers.append(outcome)
            last_hostile_at = time.monotonic()
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    expect_exit(expect, honest, harness)
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    refused = unexpected(answers, {"OK"})
    expect(not refused, f"hostile updates not taken (the leader should scale them down): {'; '.join(refused)}")
    metrics = metrics_by_round(run_dir)
    hostile_rounds = range(1, len(HUGE_VALUES) + 1)
    clipped = [metrics.get(number, {}).get("updates_clipped") for number in hostile_rounds]
    expect(all(count is not None and count >= 1 for count in clipped), f"updates_clipped in the hostile rounds: {clipped}")
    expect_every_round(expect, run_dir, HUGE_ROUNDS, 2)
    checkpoint_bad, checkpoints = checkpoints_not_finite(run_dir / "checkpoints")
    expect(checkpoints == HUGE_ROUNDS, f"{checkpoints} checkpoints for {HUGE_ROUNDS} rounds (--checkpoint-every 1)")
    final_finite = status == 0 and all_finite(final_weights(run_dir / "checkpoints")[1])
    expect(final_finite, "the final model is not finite")
    bad_rounds = sorted(set(published_bad) | set(checkpoint_bad))
    expect(not bad_rounds, f"non-finite models: published after rounds {published_bad}, checkpointed in rounds {checkpoint_bad}")
    # recovered: the first round after the hostile ones closes as a normal round (finite, nothing clipped)
    after = len(HUGE_VALUES) + 1
    recovered = leader.find(rf"round {after}/{HUGE_ROUNDS}:")
    expect(
        metrics.get(after, {}).get("updates_clipped") == 0,
        f"round {after} (honest again): updates_clipped {metrics.get(after, {}).get('updates_clipped')}",
    )
    rejected = [number for number, record in metrics.items() if record.get("model_rejected")]
    return expect.result(
        harness,
        detect_s=max(outcome.seconds for outcome in answers) if answers else None,
        recover_s=recovered[0] - last_hostile_at if recovered and last_hostile_at else None,
        rounds_lost=rounds_missing(run_dir, HUGE_ROUNDS),
        bad_accepted=len(bad_rounds),
        notes=[
            f"updates_clipped per hostile round: {clipped}",
            f"new models refused in rounds: {rejected or 'none'}",
            f"{checkpoints} checkpoints checked",
        ],
    )


def row_leader_address_registration(harness: Harness, context: Context, index: int) -> RunResult:
    """A stranger registers naming the leader's own address before two learners: refused at once, no slot taken."""
    expect = Expect()
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(port, run_dir, default_work(NAMED_ROUNDS))
    serving_port(leader, harness)
    address = f"127.0.0.1:{port}"
    stub = leader_pb2_grpc.LeaderServiceStub(harness.channel(address))
    outcome = attempt("registration naming the leader", lambda: stub.RegisterLearner(learner_info(address), timeout=CALL_TIMEOUT_S))
    learners = [harness.learner(port) for _ in range(2)]
    ids = sorted(learner_id_of(learner, harness) for learner in learners)
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    expect(outcome.code == "FAILED_PRECONDITION", f"the registration naming the leader: {outcome.code} {outcome.detail[:100]}")
    expect(outcome.seconds < AT_ONCE_S, f"refused after {outcome.seconds:.2f}s, not at once")
    expect(ids == [0, 1], f"the learners got ids {ids}, not 0 and 1: the stranger took a slot")
    expect(leader.find(rf"registered from {re.escape(address)}\b") is None, "the leader admitted its own address")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    for learner in learners:
        expect_exit(expect, learner, harness)
    expect_every_round(expect, run_dir, NAMED_ROUNDS, 2)
    return expect.result(
        harness,
        detect_s=outcome.seconds,
        rounds_lost=rounds_missing(run_dir, NAMED_ROUNDS),
        bad_accepted=int(outcome.code == "OK"),
        notes=[f"refused {outcome.code}: {outcome.detail[:120]!r}"],
    )


class SilentListener:
    """A TCP port that accepts connections and never sends a byte: a callback address that never answers."""

    def __init__(self, harness: Harness) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._socket.settimeout(0.5)  # the accepting thread checks for the end of the run this often
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self._accepted: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="silent-listener", daemon=True).start()
        harness.on_close(self.close)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self._accepted.append(connection)  # held open, never read or written

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed.set()
        self._socket.close()
        for connection in self._accepted:
            connection.close()


def row_silent_callbacks(harness: Harness, context: Context, index: int) -> RunResult:
    """10 concurrent registrations naming a port that accepts and never speaks, while two learners start: none admitted."""
    expect = Expect()
    silent = SilentListener(harness)
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(port, run_dir, default_work(SILENT_ROUNDS))
    learners = [harness.learner(port) for _ in range(2)]
    serving_port(leader, harness)
    stub = leader_pb2_grpc.LeaderServiceStub(harness.channel(f"127.0.0.1:{port}"))
    started = time.monotonic()

    def one(number: int) -> Outcome:
        return attempt(
            f"registration {number + 1} naming a silent port",
            lambda: stub.RegisterLearner(learner_info(silent.address), timeout=CALL_TIMEOUT_S),
        )

    with ThreadPoolExecutor(max_workers=SILENT_REGISTRATIONS) as pool:
        outcomes = list(pool.map(one, range(SILENT_REGISTRATIONS)))
    ids = sorted(learner_id_of(learner, harness) for learner in learners)
    both_in = leader.wait_for(r"all \d+ learners registered", harness.remaining(STARTUP_TIMEOUT_S))
    status = leader.wait_exit(harness.remaining(EXIT_TIMEOUT_S))
    codes = Counter(outcome.code for outcome in outcomes)
    # each is refused once the leader's call back has timed out, or at once while the registrations without a session
    # already in flight fill the leader's share of threads for strangers (RESOURCE_EXHAUSTED)
    wrong = unexpected(outcomes, {"FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"})
    expect(not wrong, f"registrations naming a silent port: {'; '.join(wrong)}")
    expect(codes["FAILED_PRECONDITION"] > 0, f"no registration waited for the call back: {dict(codes)}")
    slow = [outcome.seconds for outcome in outcomes if outcome.code == "RESOURCE_EXHAUSTED" and outcome.seconds > AT_ONCE_S]
    expect(not slow, f"{len(slow)} registrations refused as busy only after {max(slow, default=0):.2f}s")
    # the leader gives up on a silent callback at its probe's deadline, not later
    late = [
        outcome.seconds
        for outcome in outcomes
        if outcome.code == "FAILED_PRECONDITION" and outcome.seconds > REGISTRATION_PROBE_S + AT_ONCE_S
    ]
    expect(
        not late,
        f"{len(late)} registrations refused only after {max(late, default=0):.2f}s (the probe gives up after {REGISTRATION_PROBE_S:g}s)",
    )
    expect(ids == [0, 1], f"the learners got ids {ids}, not 0 and 1")
    expect(status == 0, f"leader exit {status}: {leader.tail()}")
    for learner in learners:
        expect_exit(expect, learner, harness)
    expect_every_round(expect, run_dir, SILENT_ROUNDS, 2)
    waited = [learner.find(r"waiting for a slot") for learner in learners]
    return expect.result(
        harness,
        detect_s=max(outcome.seconds for outcome in outcomes),
        recover_s=both_in[0] - started if both_in else None,
        rounds_lost=rounds_missing(run_dir, SILENT_ROUNDS),
        bad_accepted=codes.get("OK", 0),
        notes=[f"refused with {code_counts(outcomes)}", f"learners told to wait for a slot: {sum(hit is not None for hit in waited)}"],
    )


@dataclass(frozen=True)
class Row:
    """One line of the table: a fault, how it is injected, and the function that runs it once."""

    key: str
    title: str
    injected: str
    run: Callable[[Harness, Context, int], RunResult]


def row_tampered_checkpoint(harness: Harness, context: Context, index: int) -> RunResult:
    """Each kind of tampered checkpoint (bench/tamper.py) under `leader.py --resume`: refused in one line, exit 2, nothing served, the folder as it was."""
    expect = Expect()
    for number, (kind, (tamper, reason)) in enumerate(tamper_kinds.TAMPERING.items()):
        record_path = tamper_kinds.make_run(harness.tmp / f"run-{number}")
        tamper(record_path)
        before = tamper_kinds.folder_state(record_path.parent)
        argv = [sys.executable, "leader.py", "--resume", str(record_path.parent.parent), "--join-timeout", "1", "--device", "cpu"]
        resumed = harness.start(f"leader-{number}", argv, leader=True)
        status = resumed.wait_exit(harness.remaining(STARTUP_TIMEOUT_S))
        output = [line for _, line in resumed.lines]  # complete once it exited
        lines = [line for line in output if line.startswith("leader: ")]
        expect(status == 2, f"{kind}: exit {status}, not 2")
        expect(len(lines) == 1 and reason in lines[0], f"{kind}: {lines or 'no one-line error'}")
        expect(not any("serving on" in line or "Traceback" in line for line in output), f"{kind}: it served or raised")
        expect(tamper_kinds.folder_state(record_path.parent) == before, f"{kind}: the checkpoint folder changed")
    return expect.result(harness, notes=[f"{len(tamper_kinds.TAMPERING)} kinds of tampering"])


FORGED_RECORD = "2026-12-07 00:00:00,000 leader INFO round 9/9: 2 learners, test accuracy 100.00% (forged)"
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} leader [A-Z]+ ")


class ForgingLearner(FakeLearner):
    """A learner whose answer to StartTraining carries a forged log record."""

    def StartTraining(self, request: learner_pb2.Empty, context: grpc.ServicerContext) -> learner_pb2.Ack:
        return learner_pb2.Ack(success=False, message=f"busy\r\n{FORGED_RECORD}\x1b[0m")


def row_forged_log(harness: Harness, context: Context, index: int) -> RunResult:
    """Peers put forged records into what the leader logs (a StartTraining answer, a tensor name): leader.log keeps one record per line."""
    expect = Expect()
    port, run_dir = free_port(), harness.tmp / "run"
    leader = harness.leader(port, run_dir, ["--learners", "2", "--aggregation", "fedavg", "--local-steps", "2", "--rounds", "1"])
    serving_port(leader, harness)
    channel = harness.channel(f"127.0.0.1:{port}")
    forger, honest = ForgingLearner(harness), FakeLearner(harness)
    register(channel, forger.address)
    client = register(channel, honest.address)
    if leader.wait_for(r"marked absent", harness.remaining(STARTUP_TIMEOUT_S)) is None:
        raise RunFailed(f"the forging learner was never marked absent: {leader.tail()}")
    tensors = fetch_model(client)
    tensors[f"conv1.weight\n{FORGED_RECORD}"] = next(iter(tensors.values()))
    manifest, payload = wire.encode(tensors)
    messages = wire.stream(leader_pb2.GradientData, manifest, payload, learner_id=client.learner_id, round=1, num_examples=10)
    outcome = attempt(
        "an update with a forged tensor name",
        lambda: client.stub.AccumulateGradients(messages, timeout=CALL_TIMEOUT_S, metadata=client.metadata()),
    )
    expect(outcome.code == "INVALID_ARGUMENT", f"the forged tensor name: {outcome.code}")
    leader.wait_for(r"refused an update", harness.remaining(STARTUP_TIMEOUT_S))
    leader.kill()
    log = (run_dir / "leader.log").read_text()
    lines = log.splitlines()
    forged = log.count("round 9/9")  # the forged record's start: a refusal cuts a long tensor name before its end
    expect(forged >= 2, "the forged text did not reach the log: nothing was tested")
    expect(all(LOG_RECORD.match(line) for line in lines), "a line of leader.log is not one of the leader's records")
    expect(not any(line.startswith(FORGED_RECORD) for line in lines), "a forged record stands as a line of its own")
    return expect.result(harness, notes=[f"{forged} forged records logged escaped"])


ROWS = [
    Row(
        "learner-killed",
        "learner killed mid-round",
        "SIGKILL 1 of 3 learners while it trains round 1 (quorum 2, round timeout 60 s, --learner-lost-after 2)",
        row_learner_killed,
    ),
    Row(
        "learner-frozen",
        "learner frozen",
        f"SIGSTOP 1 of 3 learners while it trains (100 local steps, round 2-4 of 6, default round deadline, --learner-lost-after "
        f"{FROZEN_LOST_AFTER_S:g}); SIGCONT once its round closed without it",
        row_learner_frozen,
    ),
    Row(
        "leader-killed", "leader killed", "SIGKILL the leader after round 2 of 6; restart with --resume, learners rejoin", row_leader_killed
    ),
    Row(
        "checkpoint-killed",
        "killed while checkpointing",
        f"SIGKILL a process writing 8 MB checkpoints at a random moment, {CHECKPOINT_KILLS_PER_RUN} times",
        row_checkpoint_killed,
    ),
    Row(
        "registration-burst",
        "100 registrations at once",
        "101 concurrent RegisterLearner calls for 100 slots (from one host: those refused as busy try again, as learner.py does)",
        row_registration_burst,
    ),
    Row(
        "hostile-payloads",
        "hostile payloads",
        "18 malformed updates in an open round: pickles, bad manifests, truncated/oversized bytes, NaN/inf, wrong shape/dtype/count",
        row_hostile_payloads,
    ),
    Row(
        "stale-duplicate",
        "replayed / stale / duplicate update",
        "stale, future and replayed rounds, an identical retry, a different second update",
        row_stale_duplicate,
    ),
    Row(
        "impersonation",
        "impersonation / no token / bad enrolment secret",
        "registrations without or with a wrong secret; calls without, with forged or with another learner's token; forged leader calls",
        row_impersonation,
    ),
    Row(
        "stalled-streams",
        "stalled streams",
        f"a member opens {STALLED_GET_MODELS} unread GetModel streams and a 1-byte/s update (--stream-idle-timeout {STALL_IDLE_TIMEOUT_S:g})",
        row_stalled_streams,
    ),
    Row("tls", "TLS and mTLS", "2 rounds over mTLS; a TLS client without a certificate and a plaintext client register", row_tls),
    Row(
        "learner-dropout",
        "learner dropped and restarted",
        f"default flags, 2 learners, {DROPOUT_LOCAL_STEPS} local steps: Ctrl-C (SIGINT) one after round {DROPOUT_AFTER_ROUND} "
        f"of {DROPOUT_ROUNDS} and start it again at once",
        row_learner_dropout,
    ),
    Row(
        "health-watch-flood",
        "health Watch flood",
        f"a stranger opens {FLOOD_LEADER_STREAMS} health Watch streams on the leader and {FLOOD_LEARNER_STREAMS} on a learner "
        f"during a {FLOOD_ROUNDS}-round run",
        row_health_watch_flood,
    ),
    Row(
        "huge-updates",
        "huge finite updates",
        f"1 of 2 members sends updates filled with 1e38, then float32's max ({len(HUGE_VALUES)} rounds of {HUGE_ROUNDS}, "
        "--server-opt sgdm)",
        row_huge_updates,
    ),
    Row(
        "leader-address-registration",
        "registration naming the leader",
        "default flags: a stranger registers with the leader's own address as its callback, before 2 learners",
        row_leader_address_registration,
    ),
    Row(
        "silent-callbacks",
        "callbacks that never answer",
        f"default flags: {SILENT_REGISTRATIONS} concurrent registrations naming a port that accepts and never speaks, "
        "while 2 learners start",
        row_silent_callbacks,
    ),
    Row(
        "tampered-checkpoint",
        "tampered checkpoint",
        f"--resume from a checkpoint tampered {len(tamper_kinds.TAMPERING)} ways: paths out, a link, a pipe, truncated, "
        "altered, mistyped records, NaN, integer, missing and stranger tensors, an infinite optimizer state",
        row_tampered_checkpoint,
    ),
    Row(
        "forged-log",
        "forged log records",
        "a learner answers StartTraining with a forged record; another sends an update whose tensor name carries one",
        row_forged_log,
    ),
]


@dataclass
class RowSummary:
    """A row's runs, summarized for the table."""

    row: Row
    results: list[RunResult] = field(default_factory=list)
    not_run: str | None = None


def run_row(row: Row, context: Context, runs: int, log: Callable[[str], None], show_logs: bool = False) -> RowSummary:
    """Run a row `runs` times; each run is bounded and cleans up after itself."""
    summary = RowSummary(row)
    for index in range(runs):
        harness = Harness(context.env)
        started = time.monotonic()
        result: RunResult | None = None
        try:
            result = row.run(harness, context, index)
        except NotRun as reason:
            summary.not_run = str(reason)
            log(f"{row.key}: not run: {reason}")
            return summary
        except RunFailed as error:
            result = RunResult(False, peak_rss_mib=harness.peak_rss_mib(), notes=[str(error)])
        except grpc.RpcError as error:  # a call the row expected to work failed
            result = RunResult(False, peak_rss_mib=harness.peak_rss_mib(), notes=[f"run aborted: {error.code().name}: {error.details()}"])
        except Exception as error:  # anything else this run did not plan for: record it, keep the other rows' results
            detail = repr(error)
            result = RunResult(False, peak_rss_mib=harness.peak_rss_mib(), notes=[f"run aborted: {detail}"])
        finally:
            if show_logs and not (result is not None and result.ok):
                harness.dump_logs(log)
            harness.close()
        summary.results.append(result)
        verdict = "as expected" if result.ok else "NOT as expected"
        log(
            f"{row.key} run {index + 1}/{runs}: {verdict} in {time.monotonic() - started:.1f}s"
            + (f" ({'; '.join(result.notes)})" if result.notes else "")
        )
    return summary


# ---- the report -----------------------------------------------------------------------------------------------


def header_lines(runs: int) -> list[str]:
    """Machine, versions, commit, date and run count."""
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
    return [
        "# Fault benchmark",
        "",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs ({platform.machine()})",
        f"- python {platform.python_version()}, torch {torch.__version__}, grpcio {grpc.__version__}",
        f"- commit: {commit or 'unknown'}" + (" (with uncommitted changes to tracked files)" if changed else ""),
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- runs per row: {runs}",
        f"- every row: {' '.join(SMALL)}; processes on loopback",
    ]


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for the table, or '-'."""
    return "-" if value is None else f"{value:.{digits}f}"


def seconds(value: float) -> str:
    """Seconds to three decimals below 10 s (refusals take milliseconds), to one above."""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def median_max(values: list[float | None]) -> str:
    """'median / max' of the values measured, for the table; '-' when none was."""
    measured = [value for value in values if value is not None]
    return f"{seconds(statistics.median(measured))} / {seconds(max(measured))}" if measured else "-"


def table_lines(summaries: list[RowSummary]) -> list[str]:
    """The Markdown table, one line per row."""
    lines = [
        "| row | injected | runs | outcome as expected (k/N) | time to detect (s, median / max) "
        "| time to recover (s, median / max) | rounds lost (max) | bad updates accepted (total) | leader peak RSS (MiB, max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for summary in summaries:
        row = summary.row
        name = f"{ROWS.index(row) + 1}. {row.title}"
        if summary.not_run is not None:
            lines.append(f"| {name} | {row.injected} | 0 | not run: {summary.not_run} | - | - | - | - | - |")
            continue
        results = summary.results
        lost = [result.rounds_lost for result in results if result.rounds_lost is not None]
        bad = [result.bad_accepted for result in results if result.bad_accepted is not None]
        rss = [result.peak_rss_mib for result in results if result.peak_rss_mib is not None]
        detect = median_max([result.detect_s for result in results])
        recover = median_max([result.recover_s for result in results])
        lines.append(
            f"| {name} | {row.injected} | {len(results)} | {sum(result.ok for result in results)}/{len(results)} | {detect} | {recover} "
            f"| {max(lost) if lost else '-'} | {sum(bad) if bad else '-'} | {fmt(max(rss) if rss else None, 0)} |"
        )
    return lines


def note_lines(summaries: list[RowSummary]) -> list[str]:
    """What each run noted (missed expectations first), so that a k/N below N/N says why."""
    lines = []
    for summary in summaries:
        for index, result in enumerate(summary.results, start=1):
            if result.notes:
                verdict = "" if result.ok else "NOT as expected: "
                lines.append(f"- {ROWS.index(summary.row) + 1}. {summary.row.title}, run {index}: {verdict}{'; '.join(result.notes)}")
    return ["", "Notes:", "", *lines] if lines else []


DEFINITIONS = [
    "",
    "Time to detect: 1: kill to the leader's first line naming the learner at its address, or a round closed without it; "
    "2: SIGSTOP to the round closing without it; 5: all 101 answers; 6-8, 10, 12, 14, 15: the slowest refusal; "
    "9: opening to the last hostile stream ended; 11: Ctrl-C to the leader's line marking the learner absent or giving "
    "its slot to the restarted one; 13: the slowest answer to a hostile update (taken, scaled down). "
    "Time to recover: 3: restart to the first round completed after resume; 11: Ctrl-C to the first round completed "
    "with both learners again, the restarted one included; 13: the last hostile update to the first round after the "
    "hostile ones completed; 15: the first registration naming the silent port to both learners registered "
    "(the rows with none refuse without disrupting anything: nothing to recover). "
    "Rounds lost: rounds missing from metrics.jsonl (3: rounds logged done before the kill that the resumed leader re-ran). "
    "Bad updates accepted: hostile calls answered with success, a duplicate counted twice (7), a frozen learner's late "
    "update taken (2), Watch streams left open beyond the per-peer cap (12), rounds whose published or checkpointed "
    "model is not finite (13).",
]


def parse_rows(text: str | None) -> list[Row]:
    """Rows named by key or number, comma-separated, in table order; all when None."""
    if not text:
        return list(ROWS)
    chosen = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        matches = [row for number, row in enumerate(ROWS, start=1) if item in (row.key, str(number))]
        if not matches:
            raise ValueError(f"unknown row {item!r}; rows: {', '.join(row.key for row in ROWS)}")
        chosen.extend(row for row in matches if row not in chosen)
    return sorted(chosen, key=ROWS.index)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen rows, print the table (and write it to --out)."""
    parser = argparse.ArgumentParser(
        description="Fault benchmark against real leader and learner processes on loopback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs of every row")
    parser.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated rows to run, by name or number ({', '.join(row.key for row in ROWS)}); None means all",
    )
    parser.add_argument("--show-logs", action="store_true", help="print every process's output for runs that are not as expected")
    parser.add_argument("--out", default=None, help="also write the report to this Markdown file; None means print only")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        rows = parse_rows(args.rows)
    except ValueError as error:
        parser.error(str(error))
    header = header_lines(args.runs)
    print("\n".join(header), flush=True)
    env = {key: value for key, value in os.environ.items() if key != rpc.ENROLMENT_ENV}  # only the row that tests a secret sets one
    helped = subprocess.run(
        [sys.executable, "leader.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S
    )
    if helped.returncode != 0:
        print(f"faults: python leader.py --help failed: {helped.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    context = Context(env, helped.stdout)
    started = time.monotonic()
    summaries = [run_row(row, context, args.runs, lambda text: print(text, file=sys.stderr, flush=True), args.show_logs) for row in rows]
    total = time.monotonic() - started
    report = [*header, f"- wall time of the benchmark: {total:.0f}s", "", *table_lines(summaries), *DEFINITIONS, *note_lines(summaries)]
    print("\n" + "\n".join(report[len(header) :]), flush=True)
    report_file.save(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
