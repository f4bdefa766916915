"""One command for a whole federation on this machine: the leader plus N learner processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from config_file import parse_with_config
from options import build_leader_parser, expand_resume

HERE = Path(__file__).resolve().parent
LEARNER_EXIT_GRACE_S = 30.0  # how long learners get to exit after the leader has
LEARNER_CONNECT_TIMEOUT_S = 600.0
LEADER_SETUP_ERROR = 2  # leader.py's exit status for a bad argument, missing data or a busy port  # the leader may spend minutes decoding a large data set before it serves


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
    parser = build_leader_parser(
        prog="local_federation.py", description="Run a leader and its learners on this machine. Takes every leader.py flag."
    )
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
    args = parse_with_config(parser, expand_resume(parser, argv))
    learner_dirs = args.learner_data_dir or []
    if learner_dirs and len(learner_dirs) != args.learners:
        parser.error(f"--learner-data-dir was given {len(learner_dirs)} times for {args.learners} learners")
    if learner_dirs and args.data_mode != "local":
        parser.error("--learner-data-dir needs --data-mode local")
    leader_argv = [
        arg for arg in _drop_values(argv, "--learner-data-dir") if not arg.startswith("--learner-data-dir=") and arg != "--learner-compile"
    ]
    port = args.port or free_port()
    leader_cmd = [sys.executable, str(HERE / "leader.py"), *leader_argv, "--host", "127.0.0.1", "--port", str(port)]
    threads = learner_threads(args.learners)
    processes: list[subprocess.Popen] = []
    leader_process = subprocess.Popen(leader_cmd)
    processes.append(leader_process)
    for index in range(args.learners):
        cmd = [
            sys.executable,
            str(HERE / "learner.py"),
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
        if args.learner_compile:
            cmd.append("--compile")
        if args.token_file:
            cmd += ["--token-file", args.token_file]
        for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--tls-ca", args.tls_ca)):
            if value:
                cmd += [flag, value]  # one certificate for every process on this machine
        processes.append(subprocess.Popen(cmd))
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


def _drop_values(argv: list[str], flag: str) -> list[str]:
    """Remove `flag VALUE` pairs from an argument list."""
    result = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        result.append(arg)
    return result


if __name__ == "__main__":
    sys.exit(main())
