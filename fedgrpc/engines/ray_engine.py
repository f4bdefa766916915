"""Learners on Ray: pools of virtual learners (pool.py) as Ray actors sized by CPU and GPU shares, here or on a Ray cluster."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

# Ray reads these as it is imported: no usage report from a federation's machines, and every pool's log lines shown
# (Ray folds lines that differ only in numbers, such as each pool's address, into "repeated" counts).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
import ray  # noqa: E402

from fedgrpc.engines import import_path  # noqa: E402

if TYPE_CHECKING:  # pool.py imports PyTorch, which the launcher's Ray thread need not wait for
    from fedgrpc.engines.pool import LearnerPool, PoolConfig

logger = logging.getLogger(__name__)

# Ray restarts an actor that dies (a killed process, a lost node) this many times; its learners register again.
ACTOR_RESTARTS = 5
# Object store of a Ray instance the run starts itself: the pools keep their learners' state in their own memory
# and pass nothing through the store, so Ray's default (30% of RAM) would only reserve memory nobody uses.
LOCAL_OBJECT_STORE_BYTES = 128 << 20
ACTOR_CALLS = 2  # an actor answers finished() while Ray may still be delivering an earlier one
FINISHED_POLL_S = 1.0  # how long one finished() call waits in the actor
ACTOR_CALL_MARGIN_S = 10.0  # beyond that, for the answer to come back from a busy node


@dataclass
class RayEngineConfig:
    """The Ray engine's settings: how many virtual learners, what each actor reserves, and how many actors."""

    learners: int
    learner_cpus: float = 1.0  # CPUs each actor reserves; its torch threads follow (at least one)
    learner_gpus: float = 0.0  # GPU share each actor reserves (0.25: four actors per GPU)
    actors: int = 0  # 0: as many as the cluster's CPUs (and GPUs) hold, at most one per learner


class PoolActor:
    """A Ray actor holding one LearnerPool; Ray restarts it (re-running __init__) when its process dies."""

    def __init__(self, config: PoolConfig, indices: list[int], enrolment_token: str | None, threads: int) -> None:
        from fedgrpc.engines.pool import run_pool

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if not config.advertise_host:  # a cluster: the leader calls the pool back at this node's address
            config = replace(config, advertise_host=ray.util.get_node_ip_address())
        self.pool: LearnerPool = run_pool(config, indices, enrolment_token, threads)

    def finished(self, timeout: float) -> bool:
        """Whether the pool has stopped (the leader told it to), waiting up to `timeout` seconds."""
        return self.pool.done.wait(timeout)


def actor_count(config: RayEngineConfig, resources: dict[str, float]) -> int:
    """Actors to start: --actors, else as many as the cluster's CPUs (and GPUs) hold at the declared shares, at most one per learner."""
    if config.actors:
        return min(config.actors, config.learners)
    fits = math.floor(resources.get("CPU", 1) / config.learner_cpus) if config.learner_cpus > 0 else config.learners
    if config.learner_gpus > 0:
        fits = min(fits, math.floor(resources.get("GPU", 0) / config.learner_gpus))
    return max(1, min(fits, config.learners))


def assign(learners: int, actors: int) -> list[list[int]]:
    """Virtual learners 0..learners-1 dealt round-robin to `actors` pools, so that a sample draws on every pool alike."""
    return [list(range(first, learners, actors)) for first in range(actors)]


class RayFederation:
    """The Ray side of a run: joins or starts Ray, starts the pools, and takes them down at the end."""

    def __init__(self, ray_address: str | None = None) -> None:
        self.ray_address = ray_address  # None: start a Ray instance for this run and stop it after
        self.actors: list[Any] = []

    def connect(self) -> None:
        """Join --ray-address, or start a Ray instance on this machine for this run."""
        # workers import fedgrpc from where this process does: on a cluster every node needs it installed or at that path
        runtime_env = {"env_vars": {"PYTHONPATH": import_path()}}
        quiet = logging.ERROR  # Ray's own notices: the leader's log says what started where
        if self.ray_address:
            ray.init(address=self.ray_address, runtime_env=runtime_env, log_to_driver=True, logging_level=quiet)
        else:
            ray.init(
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                runtime_env=runtime_env,
                log_to_driver=True,
                logging_level=quiet,
            )

    def start(self, config: RayEngineConfig, pool_config: PoolConfig, enrolment_token: str | None) -> None:
        """Start the pools: each reserves --learner-cpus and --learner-gpus and serves its share of the virtual learners."""
        resources = ray.cluster_resources()
        if config.learner_gpus > 0 and not resources.get("GPU"):
            raise ValueError(
                f"--learner-gpus {config.learner_gpus:g} asks for GPUs, and this Ray cluster has none: drop it, or add GPU nodes"
            )
        if config.learner_cpus > resources.get("CPU", 0):
            raise ValueError(f"--learner-cpus {config.learner_cpus:g} is more than this Ray cluster's {resources.get('CPU', 0):g} CPUs")
        count = actor_count(config, resources)
        threads = max(1, math.floor(config.learner_cpus))
        remote = ray.remote(PoolActor).options(
            num_cpus=config.learner_cpus,
            num_gpus=config.learner_gpus,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
            max_concurrency=ACTOR_CALLS,
        )
        if config.learner_gpus > 0:
            pool_config = replace(pool_config, device="cuda")
        self.actors = [remote.remote(pool_config, indices, enrolment_token, threads) for indices in assign(config.learners, count)]
        logger.info(
            "%d virtual learners on %d Ray actors (%g CPU%s each)",
            config.learners,
            count,
            config.learner_cpus,
            f", {config.learner_gpus:g} GPU" if config.learner_gpus else "",
        )

    def wait_finished(self, run_over: threading.Event) -> None:
        """Return once every pool has stopped, or `run_over` is set: Ray can go down while the leader writes its results."""
        while not run_over.is_set():
            answers = [actor.finished.remote(FINISHED_POLL_S) for actor in self.actors]
            try:
                if all(ray.get(answers, timeout=FINISHED_POLL_S + ACTOR_CALL_MARGIN_S)):
                    return
            except (ray.exceptions.RayError, TimeoutError):  # an actor restarting: ask again
                run_over.wait(FINISHED_POLL_S)

    def stop(self) -> None:
        """Take the pools down, then stop the Ray instance this run started, or leave the cluster it joined."""
        if not ray.is_initialized():
            return
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        started = time.monotonic()
        ray.shutdown()
        logger.debug("Ray stopped in %.1fs", time.monotonic() - started)


def node_address() -> str:
    """This machine's address in the Ray cluster, where the cluster's nodes reach the leader."""
    return ray.util.get_node_ip_address()
