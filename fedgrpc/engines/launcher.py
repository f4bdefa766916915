"""One command for a whole federation: the leader plus N learners, as processes on loopback or as virtual learners on Ray."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fedgrpc.config.files import flag_value, parse_with_config, read_enrolment_token
from fedgrpc.engines import import_path

if TYPE_CHECKING:  # imported where they are used: they bring PyTorch and Ray, which a bad flag need not wait for
    from fedgrpc.engines.pool import PoolConfig
    from fedgrpc.engines.ray_engine import RayEngineConfig

LEARNER_EXIT_GRACE_S = 30.0  # how long learners get to exit after the leader has
LEARNER_CONNECT_TIMEOUT_S = 600.0  # the leader may spend minutes decoding a large data set before it serves
LEADER_SETUP_ERROR = 2  # leader.py's exit status for a bad argument, missing data or a busy port
ENGINES = ("processes", "ray")
# flags of this command that leader.py does not take: (flag, whether a value follows)
LAUNCHER_FLAGS = {
    "--learner-data-dir": True,
    "--learner-compile": False,
    "--engine": True,
    "--learner-cpus": True,
    "--learner-gpus": True,
    "--ray-address": True,
    "--actors": True,
    "--examples-per-learner": True,
    "--simulate-dropout": True,
}


def free_port() -> int:
    """A port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def learner_threads(learners: int, cores: int | None = None) -> int:
    """Split the machine's cores among the learners: processes that oversubscribe cores run several times slower."""
    return max(1, (cores or os.cpu_count() or 1) // learners)


def main(argv: list[str] | None = None) -> int:
    """Start the leader with the given leader flags, then --learners learners, and wait for the run to end."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Ray takes seconds to start: with --engine ray it starts now, while this process imports PyTorch
    ray_thread = RayThread(flag_value(argv, "--ray-address")) if flag_value(argv, "--engine") == "ray" else None
    try:
        return launch(argv, ray_thread)
    except SystemExit as exit:
        if ray_thread is not None:  # a bad flag, or --help, said its piece: Ray, starting for nothing, ends with the process
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit.code if isinstance(exit.code, int) else LEADER_SETUP_ERROR)
        raise
    finally:
        if ray_thread is not None:
            ray_thread.finish()


def launch(argv: list[str], ray_thread: RayThread | None) -> int:
    """Parse the flags, then run the federation with the chosen engine."""
    from fedgrpc.config.options import (
        build_leader_parser,
        expand_resume,
        non_negative_float,
        positive_float,
        positive_int,
        probability_below_one,
    )

    parser = build_leader_parser(description="Run a leader and its learners on this machine. Takes every leader.py flag.")
    for action in parser._actions:
        if action.dest == "port":  # the launcher picks a free port unless told one
            action.default = 0
            action.help = "port the leader listens on (0 picks a free one)"
    group = parser.add_argument_group("learners this command starts")
    group.add_argument(
        "--learner-data-dir",
        action="append",
        default=None,
        help="give learners their own data (repeat once per learner; needs --data-mode local)",
    )
    group.add_argument(
        "--learner-compile", action="store_true", help="start the learners with --compile (torch.compile their training steps)"
    )
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default="processes",
        help="processes: one learner.py process per learner; ray: virtual learners served by a pool of Ray actors (thousands per machine)",
    )
    ray_group = parser.add_argument_group("the Ray engine (--engine ray)")
    ray_group.add_argument("--learner-cpus", type=positive_float, default=1.0, help="CPUs each Ray actor reserves (its torch threads)")
    ray_group.add_argument(
        "--learner-gpus", type=non_negative_float, default=0.0, help="share of a GPU each Ray actor reserves (0.25: four actors per GPU)"
    )
    ray_group.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (ray start --head prints it) instead of starting Ray on this machine for the run",
    )
    ray_group.add_argument(
        "--actors", type=positive_int, default=None, help="Ray actors serving the learners (default: as many as the declared shares fit)"
    )
    ray_group.add_argument(
        "--examples-per-learner",
        type=positive_int,
        default=50,
        help="with --data-mode local --dataset synthetic: synthetic examples each virtual learner makes from its index",
    )
    ray_group.add_argument(
        "--simulate-dropout",
        type=probability_below_one,
        default=0.0,
        metavar="P",
        help="each round (under fedbuff, each job) each virtual learner drops out with probability P (seeded): it fails "
        "the leader's call as a learner that is gone would, without training, and registers again (under "
        "--secure-aggregation after the round's key stages, the costly case); 0: none",
    )
    args = parse_with_config(parser, expand_resume(parser, argv))
    learner_dirs = args.learner_data_dir or []
    if learner_dirs and len(learner_dirs) != args.learners:
        parser.error(f"--learner-data-dir was given {len(learner_dirs)} times for {args.learners} learners")
    if learner_dirs and args.data_mode != "local":
        parser.error("--learner-data-dir needs --data-mode local")
    if args.engine == "ray":
        if learner_dirs or args.learner_compile:
            parser.error("--learner-data-dir and --learner-compile work with --engine processes only")
        if args.data_mode == "local" and (args.dataset != "synthetic" or args.task):
            parser.error("--engine ray with --data-mode local makes synthetic data: add --dataset synthetic, or use --data-mode split")
        if args.evaluation in ("learners", "both"):
            parser.error("--engine ray's pools do not evaluate on their learners' data yet: use --evaluation leader")
    elif any(flag_given(argv, flag) for flag in ("--learner-cpus", "--learner-gpus", "--ray-address", "--actors", "--simulate-dropout")):
        parser.error("--learner-cpus, --learner-gpus, --ray-address, --actors and --simulate-dropout need --engine ray")
    leader_argv = drop_flags(argv, LAUNCHER_FLAGS)
    port = args.port or free_port()
    if args.engine == "ray":
        return run_on_ray(args, leader_argv, port, ray_thread or RayThread(args.ray_address))
    leader_cmd = [sys.executable, "-m", "fedgrpc.leader", *leader_argv, "--host", "127.0.0.1", "--port", str(port)]
    threads = learner_threads(args.learners)
    processes: list[subprocess.Popen] = []
    child_env = {**os.environ, "PYTHONPATH": import_path()}
    leader_process = subprocess.Popen(leader_cmd, env=child_env)
    processes.append(leader_process)
    for index in range(args.learners):
        cmd = [
            sys.executable,
            "-m",
            "fedgrpc.learner",
            "--leader",
            f"127.0.0.1:{port}",
            "--host",
            "127.0.0.1",
            "--threads",
            str(threads),
            "--device",
            args.device,
            "--connect-timeout",
            str(LEARNER_CONNECT_TIMEOUT_S),
            "--no-progress",
        ]  # several bars on one terminal overwrite each other; the leader's status line stands in
        if learner_dirs:
            cmd += ["--data-dir", learner_dirs[index]]
        if args.task:
            cmd += ["--task", args.task]
        if args.learner_compile:
            cmd.append("--compile")
        if args.token_file:
            cmd += ["--token-file", args.token_file]
        if args.log_format != "text":
            cmd += ["--log-format", args.log_format]
        for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--tls-ca", args.tls_ca)):
            if value:
                cmd += [flag, value]  # one certificate for every process on this machine
        processes.append(subprocess.Popen(cmd, env=child_env))
    try:
        status = leader_process.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to every process of the group; the leader tells the learners to stop.
        status = leader_process.wait()
    for process in processes[1:]:
        if status == LEADER_SETUP_ERROR and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the leader never served, so nobody will tell its learners to stop
        try:
            process.wait(timeout=LEARNER_EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return status


class RayThread:
    """Ray's side of a run, on a thread of its own: joins or starts Ray at once, starts the pools when told, and stops Ray
    once the pools have stopped or the run is over.

    One thread does it all because the processes Ray starts are killed when the thread that started them ends.
    """

    def __init__(self, ray_address: str | None) -> None:
        self.ray_address = ray_address
        self.failure: str | None = None
        self.on_failure = threading.Event()  # set when Ray could not start: the leader stops waiting for learners
        self._pools: list[tuple[RayEngineConfig, PoolConfig, str]] = []
        self._pools_given = threading.Event()
        self._run_over = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray", daemon=True)
        self._thread.start()

    def start_pools(self, engine_config: RayEngineConfig, pool_config: PoolConfig, enrolment_token: str) -> None:
        """Start the pools of virtual learners once Ray is up."""
        self._pools.append((engine_config, pool_config, enrolment_token))
        self._pools_given.set()

    def finish(self) -> None:
        """The run is over: stop Ray (if the pools have not already let it go) and wait for it."""
        self._run_over.set()
        self._pools_given.set()
        self._thread.join()

    def _run(self) -> None:
        from fedgrpc.engines import ray_engine

        engine = ray_engine.RayFederation(self.ray_address)
        try:
            engine.connect()
            self._pools_given.wait()
            if self._pools and not self._run_over.is_set():
                engine.start(*self._pools[0])
                engine.wait_finished(self._run_over)  # Ray goes down while the leader writes its results
        except (ConnectionError, RuntimeError, ValueError) as error:  # what ray.init raises for a cluster it cannot join
            self.failure = f"local_federation.py: could not start the learners on Ray: {error}"
            self.on_failure.set()
        finally:
            engine.stop()


def run_on_ray(args: argparse.Namespace, leader_argv: list[str], port: int, ray_thread: RayThread) -> int:
    """Run the leader in this process while `ray_thread` starts the pools of virtual learners; then let Ray go.

    The leader shares this process with Ray's driver, which saves a Python with PyTorch (about 600 MB) per run.
    """
    from fedgrpc.engines import ray_engine
    from fedgrpc.engines.pool import PoolConfig
    from fedgrpc.leader import main as leader
    from fedgrpc.task import is_task_file
    from fedgrpc.transport import rpc

    on_cluster = args.ray_address is not None
    # On a cluster the leader listens on every interface, and an enrolment secret keeps strangers out.
    enrolment_token = read_enrolment_token(args.token_file) or secrets.token_urlsafe(32)
    os.environ[rpc.ENROLMENT_ENV] = enrolment_token
    host = "0.0.0.0" if on_cluster else "127.0.0.1"
    pool_config = PoolConfig(
        leader=f"{ray_engine.node_address() if on_cluster else '127.0.0.1'}:{port}",
        host=host,
        advertise_host="" if on_cluster else "127.0.0.1",  # "": each node's own address
        examples_per_learner=args.examples_per_learner if args.data_mode == "local" else 0,
        connect_timeout=LEARNER_CONNECT_TIMEOUT_S,
        dropout=args.simulate_dropout,
        seed=args.seed,
        task=str(Path(args.task).resolve()) if args.task and is_task_file(args.task) else args.task,  # actors start elsewhere
        # the pools present the leader's own certificate, as the launcher's learner processes do
        **{
            f"tls_{part}": str(Path(path).resolve()) if path else None
            for part, path in (("cert", args.tls_cert), ("key", args.tls_key), ("ca", args.tls_ca))
        },
    )
    engine_config = ray_engine.RayEngineConfig(args.learners, args.learner_cpus, args.learner_gpus, args.actors or 0)
    ray_thread.start_pools(engine_config, pool_config, enrolment_token)
    status = leader.main(
        [*drop_flags(leader_argv, {"--token-file": True}), "--host", host, "--port", str(port)], stop_event=ray_thread.on_failure
    )
    ray_thread.finish()
    if ray_thread.failure is not None:
        print(ray_thread.failure, file=sys.stderr)
        return LEADER_SETUP_ERROR
    return status


def flag_given(argv: list[str], flag: str) -> bool:
    """Whether `flag` appears in an argument list, alone or as flag=value."""
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)


def drop_flags(argv: list[str], flags: dict[str, bool]) -> list[str]:
    """An argument list without `flags` (flag -> whether a value follows it), given alone or as flag=value."""
    result = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in arg
            continue
        result.append(arg)
    return result


if __name__ == "__main__":
    sys.exit(main())
