"""The leader: serves the global model and data splits, and runs the blog's round flow over its learners.

    python leader.py --learners 2 --task my_task.py

The coordinator is coordinator.Leader, its gRPC boundary service.py; this module is the command. It parses the flags
before the rest of the leader (and PyTorch) loads, so that `--help` or a bad flag is answered at once.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgrpc.config.options import LeaderConfig, parse_leader_config
from fedgrpc.console import printable, setup_logging

if TYPE_CHECKING:
    from fedgrpc.leader import checkpoint
    from fedgrpc.leader.coordinator import Leader, RunError, training_plan
    from fedgrpc.leader.service import LeaderServicer, handle_shutdown_signals, serve
    from fedgrpc.protos import learner_pb2

# the command and what it builds on, for launchers, benchmarks and tests
__all__ = [
    "Leader",
    "LeaderConfig",
    "LeaderServicer",
    "RunError",
    "checkpoint",
    "handle_shutdown_signals",
    "learner_pb2",
    "main",
    "parse_leader_config",
    "serve",
    "training_plan",
]

# Where the names above live, imported on first use: they bring PyTorch, which `--help` or a bad flag need not wait for.
_HOMES = {
    "Leader": "fedgrpc.leader.coordinator",
    "RunError": "fedgrpc.leader.coordinator",
    "training_plan": "fedgrpc.leader.coordinator",
    "LeaderServicer": "fedgrpc.leader.service",
    "handle_shutdown_signals": "fedgrpc.leader.service",
    "serve": "fedgrpc.leader.service",
    "checkpoint": "fedgrpc.leader",
    "learner_pb2": "fedgrpc.protos",
}

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = importlib.import_module(_HOMES[name])
    return getattr(home, name) if hasattr(home, name) else importlib.import_module(f"{_HOMES[name]}.{name}")


def main(argv: list[str] | None = None, stop_event: threading.Event | None = None) -> int:
    """Run a federation from the command line (setting `stop_event` stops it, as Ctrl-C does)."""
    config, verbose, enrolment_token = parse_leader_config(argv)
    return run(config, verbose, enrolment_token, stop_event)


def run(config: LeaderConfig, verbose: bool, enrolment_token: str | None, stop_event: threading.Event | None) -> int:
    """Serve the federation the parsed flags describe until it ends; returns the exit status."""
    # imported once the flags are known to be good: they bring PyTorch
    import torch
    from grpc_health.v1 import health_pb2

    from fedgrpc.data import DataError
    from fedgrpc.leader.coordinator import RunError
    from fedgrpc.leader.recorder import Recorder, TensorBoardMissing
    from fedgrpc.leader.round_report import describe_evaluation
    from fedgrpc.leader.service import SERVER_STOP_GRACE_S, handle_shutdown_signals, serve
    from fedgrpc.task import TaskError
    from fedgrpc.transport import rpc

    run_dir = Path(config.run_dir)
    setup_logging("leader", verbose, config.quiet, run_dir / "leader.log", config.log_format)
    logger.info("config: %s", json.dumps(dataclasses.asdict(config), sort_keys=True))
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        leader, server, port, health = serve(config, enrolment_token, stop_event)
        leader.status.keep_logs_apart()
        recorder = Recorder(run_dir, dataclasses.asdict(config), config.tensorboard, keep_rounds_before=leader.start_round)
        if leader.resumed_metrics is not None:
            recorder.ensure_recorded(leader.resumed_metrics)
    except (DataError, TaskError, OSError, ValueError, TensorBoardMissing) as error:
        print(f"leader: {printable(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leader: interrupted while starting", file=sys.stderr)
        return 130
    if enrolment_token is None and config.tls_ca is None and not rpc.is_loopback(config.host):
        logger.warning(
            "listening on %s without an enrolment secret or client certificates: anyone who reaches port %d can join "
            "this federation; set $%s or --token-file, or use --tls-ca",
            config.host,
            port,
            rpc.ENROLMENT_ENV,
        )
    logger.info("serving on %s:%d; waiting for %d learners (python learner.py --leader HOST:%d)", config.host, port, config.learners, port)

    handle_shutdown_signals(leader, health)
    status = 0
    try:
        history = leader.run(recorder)
        if history:
            logger.info("done: %d rounds, %s; results in %s", len(history), describe_evaluation(history[-1]), run_dir)
    except (RunError, OSError) as error:  # OSError: a checkpoint or metrics write failed
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        leader.status.clear()
        if leader.stop_event.is_set():
            logger.info("stopping: %s", error)
            status = 130
        else:
            logger.error("%s", error)
            status = 1
        leader.stop_learners(str(error))
    except KeyboardInterrupt:  # a second Ctrl-C: no goodbyes
        print("leader: interrupted", file=sys.stderr)
        status = 130
    finally:
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        server.stop(grace=SERVER_STOP_GRACE_S).wait()
        leader.close()
        plot = recorder.close()
        if plot is not None:
            logger.info("plot: %s", plot)
    return status


if __name__ == "__main__":
    sys.exit(main())
