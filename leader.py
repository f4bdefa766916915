"""The leader: serves the global model and data splits, coordinates rounds, aggregates updates."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import secrets
import signal
import statistics
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2

import aggregation
import checkpoint
import compression
import privacy
import schedule
import server_opt
from cli import StatusLine, flag_value, parse_with_config, setup_logging
from plots import METRICS_FILE
from recorder import CONFIG_FILE, Recorder, TensorBoardMissing
import rpc
import wire
from model import MODELS, build_model, recompute_batchnorm
from protos import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from utils import (DATASETS, IMAGE_SHAPE, DataError, ImageData, derive_seed, label_histogram, load_dataset, normalize,
                   resolve_device, split_dirichlet, split_iid, split_shards)

logger = logging.getLogger(__name__)

DEFAULT_PORT = 10134  # the blog's port
AGGREGATIONS = ("fedsgd", "fedavg")
PARTITIONS = ("iid", "dirichlet", "shards")
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")
DATA_MODES = ("split", "local")
EVAL_BATCH_SIZE = 1000
UPDATE_BUFFERS_KEPT = 2  # update buffers kept for reuse between uploads: about as many as arrive at once on 2 cores
# accepted updates waiting for the summing thread; each holds its buffer, so the queue is bounded (a full one holds
# up the next acknowledgement) and leader memory stays flat however many learners report at once
MAX_PENDING_SUMS = 2
SUM_SLOT_TIMEOUT_S = 60.0  # one sum takes tens of ms for ResNet-18; a minute without a free slot means a stuck leader
# Left of a call's deadline when its wait for a summing slot gives up: enough to send the refusal, so that a learner
# never times out on an update the leader then takes.
REPLY_MARGIN_S = 0.25
MAX_LOCAL_EXAMPLES = 10**9
SGDM_DEFAULT_MOMENTUM = 0.9  # FedAvgM's server momentum when --server-momentum is left at 0 (Hsu et al. 2019)
WAIT_SLICE_S = 0.5  # how often waits wake up to check for shutdown
STOP_TIMEOUT_S = 5.0  # a stop message is tiny; a learner that cannot take it in 5 s is frozen or gone
HEALTH_PROBE_INTERVAL_S = 5.0  # how often the leader checks the members that have not reported yet
# Consecutive health checks a member may refuse (its port closed: the process is gone) before it is marked absent,
# without waiting out --learner-lost-after, which is for members that go silent (frozen, or cut off).
REFUSED_PROBES_TO_ABSENT = 2
SERVER_STOP_GRACE_S = 2.0  # calls in flight at shutdown get this long; learners were told to stop first
MAX_PARALLEL_CALLS = 32  # calls to learners in flight at once (round starts, pushes, health checks)
# The leader calls a registrant back before it admits it; a learner's server is up before it registers.
REGISTRATION_PROBE_S = 3.0
# A full federation checks its members before refusing a newcomer: a short check, at most this often.
MEMBER_SWEEP_PROBE_S = 2.0
MEMBER_SWEEP_INTERVAL_S = 2.0
REVOKED_SESSIONS_KEPT = 4096  # ended sessions remembered, so that a late call from one is told why
# --round-timeout 0: once the quorum has reported, the rest get this factor of the time it took, and at least
# the floor; before that, health checks find the members that are gone, and the cap bounds a round that never fills.
STRAGGLER_GRACE_FACTOR = 2.0
STRAGGLER_GRACE_MIN_S = 30.0
AUTO_ROUND_LIMIT_S = 3600.0
# A new global model is refused, and the last good one kept, when it is not finite or its parameter norm grew more
# than this many times in one round: honest rounds change the norm by a few percent.
MODEL_GROWTH_LIMIT = 4.0


@dataclass(frozen=True)
class LeaderConfig:
    """Everything a federation run is configured by; saved with every checkpoint."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    learners: int = 2
    min_learners: int = 0  # 0: half of each round's learners, rounded up, so that a federation survives losing the rest
    rounds: int = 10
    aggregation: str = "fedsgd"
    model: str = "resnet18"
    dataset: str = "cifar10"
    data_dir: str | None = "data"
    data_mode: str = "split"
    batch_size: int = 32
    lr: float = 0.01
    lr_schedule: str = "constant"
    warmup_rounds: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.001
    server_opt: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    prox_mu: float = 0.0
    keep_momentum: bool = False
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_learner: int = 2
    fraction: float = 1.0
    aggregator: str = "mean"
    trim: float = 0.1
    byzantine: int = 0
    clip_norm: float = 0.0  # 0: no clipping
    dp_noise_multiplier: float = 0.0  # 0: no differential privacy
    dp_delta: float = 1e-5
    local_steps: int = 0
    local_epochs: int = 1
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    run_dir: str | None = None  # None: runs/<start time>
    checkpoint_dir: str | None = None  # None: <run_dir>/checkpoints
    keep_checkpoints: int = 3
    checkpoint_every: int = 0  # 0: by --checkpoint-seconds only
    checkpoint_seconds: float = 60.0
    tensorboard: bool = False
    quiet: bool = False
    join_timeout: float = 600.0
    round_timeout: float = 0.0  # 0: fitted to the round (STRAGGLER_GRACE_FACTOR)
    eval_every: int = 1
    recompute_bn: int = 0  # training images the leader recomputes BatchNorm statistics from after averaging; 0: none
    learner_lost_after: float = 30.0
    max_update_norm: float = 0.0  # 0: no bound
    max_norm_ratio: float = 10.0  # 0: no adaptive bound
    max_weight_ratio: float = 4.0  # 0: declared example counts are trusted
    compress: str = "none"
    topk_ratio: float = 0.01
    deterministic: bool = False
    stream_idle_timeout: float = rpc.STREAM_IDLE_TIMEOUT_S
    reflection: bool = False
    resume: str | None = None  # a run directory to continue
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def round_quorum(self, members: int) -> int:
        """Learners that must report for a round of `members` to count: --min-learners, or half of them rounded up."""
        if self.min_learners:
            return max(1, min(self.min_learners, members))
        return max(1, math.ceil(members / 2))

    def sampled(self, available: int) -> int:
        """Learners asked to take part in a round when `available` could: --fraction of them, at least --min-learners."""
        return min(available, max(math.ceil(self.fraction * available), self.min_learners, 1))


class LeaderError(Exception):
    """A request the leader refuses, with the gRPC status it answers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class RunError(Exception):
    """The federation cannot go on; the message says why."""


@dataclass
class LearnerRecord:
    """A registered learner as the leader sees it."""

    learner_id: int
    address: str
    callback_token: str
    session_token: str
    num_examples: int
    channel: grpc.Channel
    stub: learner_pb2_grpc.LearnerServiceStub
    joins_round: int  # it gets StartTraining when this round opens, and a pushed model every round after
    alive: bool = True
    started: bool = False


@dataclass
class Published:
    """The global model learners train on in round `number`, encoded once and framed once for every call that sends it."""

    number: int
    nbytes: int  # the model's payload size; the payload itself is not kept, only its two framings
    model_chunks: list[bytes]  # GetModel's replies, serialized once (wire.frames)
    model_states: list[bytes]  # the round-start push, serialized once

    @classmethod
    def of(cls, number: int, model: torch.nn.Module, buffers: wire.BufferPool | None = None) -> Published:
        """Encode a model's state for round `number` (in a buffer from `buffers`, given back once framed)."""
        manifest, payload = wire.encode(model.state_dict(), allocate=buffers.take if buffers is not None else bytearray)
        published = cls(number, len(payload), list(wire.frames(leader_pb2.ModelChunk, manifest, payload, round=number)),
                        list(wire.frames(learner_pb2.ModelState, manifest, payload, round=number)))
        if buffers is not None:
            buffers.give(payload)  # the frames hold copies
        return published

    def state(self, specs: list[wire.TensorSpec]) -> dict[str, torch.Tensor]:
        """The published model's tensors, decoded from its frames (to go back to it after a refused round)."""
        messages = [learner_pb2.ModelState.FromString(frame) for frame in self.model_states]
        return wire.receive(messages, max_bytes=self.nbytes, expected=specs).tensors


@dataclass
class RoundState:
    """Updates received in the round now open."""

    number: int
    accepting: bool = True
    opened_at: float = field(default_factory=time.monotonic)
    members: frozenset[int] = frozenset()  # learners taking part; a learner that joins mid-round waits for the next
    quorum: int = 1  # updates the round needs
    norm_bound: float = math.inf  # an update's parameter norm is scaled down to this (--max-norm-ratio)
    max_weight: float = math.inf  # the most weight one update's examples give it (--max-weight-ratio)
    clipped: int = 0  # updates scaled down to norm_bound
    lost: dict[int, str] = field(default_factory=dict)  # member id -> why it was marked absent during the round
    running: aggregation.RunningMean | aggregation.UpdateList = field(default_factory=aggregation.RunningMean)
    sums: list[Future] = field(default_factory=list)  # accepted updates' additions to `running`, done or pending
    digests: dict[int, tuple[float, ...]] = field(default_factory=dict)  # learner id -> its accepted update's digest
    losses: list[float] = field(default_factory=list)
    update_norms: list[float] = field(default_factory=list)
    rejected: dict[int, int] = field(default_factory=dict)  # learner id -> refused updates this round
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def reported(self) -> int:
        """Updates accepted so far (answered, though perhaps not yet summed)."""
        return len(self.digests)

    def summed(self) -> aggregation.RunningMean | aggregation.UpdateList:
        """The running sum (or kept updates) once every accepted update is in it; raises what adding one raised."""
        for pending in list(self.sums):
            pending.result()
        return self.running


class Leader:
    """Holds the global model and the federation's state; gRPC-free apart from calling learners."""

    def __init__(self, config: LeaderConfig, test_data: ImageData, train_data: ImageData | None, tls: rpc.Tls | None = None) -> None:
        self.config = config
        self.tls = tls
        self.device = resolve_device(config.device)
        self.test_data = test_data
        self.num_classes = test_data.num_classes
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, self.num_classes).to(self.device)
        self.optimizer = self._server_optimizer()
        self.specs = wire.specs_of(self.model.state_dict())
        self.parameter_names = [name for name, _ in self.model.named_parameters()]
        self.variance_names = [name for name, _ in self.model.named_buffers() if name.endswith("running_var")]
        self.model_bytes = wire.payload_bytes(self.specs)
        # what an update looks like on the wire under --compress, checked before any of its bytes are read
        self.update_specs = compression.wire_specs(self.specs, config.compress, config.topk_ratio, sparse_names=self.parameter_names)
        self.update_bytes = wire.payload_bytes(self.update_specs)
        # updates are summed as they arrive unless a rule needs them all at once (median, Krum, --deterministic);
        # a summed or refused update's buffer is free again, and a kept one saves the page faults of a fresh one
        self.keeps_updates = config.aggregator != "mean" or config.deterministic
        self.update_buffers = wire.BufferPool(self.update_bytes, keep=UPDATE_BUFFERS_KEPT)
        self._publish_buffers = wire.BufferPool(self.model_bytes, keep=1)  # each round's model is encoded here, then framed
        self.train_data = train_data
        self.shards = self._partition(train_data) if train_data is not None else None
        # the share of learners in each round, --min-learners included (Poisson sampling at this rate is the accountant's model)
        sampling_rate = config.sampled(config.learners) / config.learners
        self.accountant = (privacy.PrivacyAccountant(config.dp_noise_multiplier, sampling_rate, config.dp_delta)
                           if config.dp_noise_multiplier else None)
        self._noise = torch.Generator().manual_seed(secrets.randbits(63))
        self.stop_event = threading.Event()
        self.status = StatusLine(enabled=False if config.quiet else None)
        self.history: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._learners: dict[int, LearnerRecord] = {}
        self._tokens: dict[str, int] = {}
        self._revoked: OrderedDict[str, str] = OrderedDict()  # ended session token -> why it ended
        # registrants that proved they belong (enrolment secret, client certificate) may advertise any callback address
        self.trusts_registrants = False
        self._sweep_lock = threading.Lock()
        self._last_sweep = -math.inf
        self._started = False
        self._round = RoundState(0, accepting=False)
        self._running = aggregation.RunningMean()  # one float64 sum for every round, reset rather than reallocated
        self._calls = ThreadPoolExecutor(max_workers=MAX_PARALLEL_CALLS, thread_name_prefix="learner-call")
        # a learner is answered once its update is checked; the float64 sum (tens of ms for ResNet-18) runs behind
        self._summing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-sum")
        self._sum_slots = threading.BoundedSemaphore(MAX_PENDING_SUMS)
        self.start_round = 1
        self.resumed_metrics: dict[str, Any] | None = None
        self.limits: rpc.CallLimits | None = None  # set by serve()
        self._published = Published.of(1, self.model)
        self._model_norm = self._current_model_norm()
        self._norm_reference: float | None = None  # median update norm of the last applied round
        self._saved_round = 0  # the last round on disk
        self._saved_at = time.monotonic()

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """The server optimizer's per-parameter tensors (momentum buffers), named by parameter."""
        names = {id(parameter): name for name, parameter in self.model.named_parameters()}
        tensors = {}
        for parameter, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{names[id(parameter)]}.{key}"] = value
        return tensors

    def restore(self, json_path: Path) -> int:
        """Continue from a checkpoint: global model, server optimizer state and round. Returns its round."""
        record, weights = checkpoint.load(json_path)
        if record["config"]["model"] != self.config.model or record["num_classes"] != self.num_classes:
            raise ValueError(f"{json_path} holds a {record['config']['model']} with {record['num_classes']} classes, not this run's {self.config.model}")
        self.model.load_state_dict(weights)
        parameters = dict(self.model.named_parameters())
        for name, tensor in checkpoint.load_optimizer(json_path, record).items():
            parameter_name, key = name.rsplit(".", 1)
            self.optimizer.state[parameters[parameter_name]][key] = tensor.to(self.device)
        self.start_round = record["round"] + 1
        self.resumed_metrics = record["metrics"]
        if self.accountant is not None:
            # every noised model made before the stop spent privacy, the rounds after this checkpoint included
            spent = max(record["round"], checkpoint.privacy_spent(json_path.parent))
            self.accountant.step(spent)
            if spent > record["round"]:
                logger.info("counting %d noised rounds as spent, %d of them after the checkpoint resumed from",
                            spent, spent - record["round"])
        self._published = Published.of(self.start_round, self.model)
        self._model_norm = self._current_model_norm()
        self._saved_round = record["round"]
        logger.info("resuming after round %d from %s", record["round"], json_path)
        return record["round"]

    def _server_optimizer(self) -> torch.optim.Optimizer:
        """The step the leader takes with the averaged update as a (pseudo-)gradient.

        fedsgd with sgd or sgdm: the blog's SGD with --lr, --momentum and --weight-decay. Otherwise
        --server-opt with --server-lr: plain FedAvg is sgd with lr 1, FedAvgM is sgdm, FedOpt is adam,
        yogi or adagrad.
        """
        config = self.config
        parameters = self.model.parameters()
        if config.aggregation == "fedsgd" and config.server_opt in ("sgd", "sgdm"):
            return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        momentum = config.server_momentum or (SGDM_DEFAULT_MOMENTUM if config.server_opt == "sgdm" else 0.0)
        return server_opt.build_server_optimizer(config.server_opt, parameters, lr=config.server_lr, momentum=momentum,
                                                 beta1=config.server_beta1, beta2=config.server_beta2, tau=config.server_tau)

    def _partition(self, train_data: ImageData) -> list[torch.Tensor]:
        """Each learner's indices into the training set, by --partition; logs every part's label histogram."""
        config = self.config
        if config.partition == "dirichlet":
            shards = split_dirichlet(train_data.labels, config.learners, config.alpha, config.seed)
        elif config.partition == "shards":
            shards = split_shards(train_data.labels, config.learners, config.classes_per_learner, config.seed)
        else:
            shards = split_iid(len(train_data), config.learners, config.seed)
        for learner_id, shard in enumerate(shards):
            logger.info("split %d (%s): %d examples, per class %s", learner_id, config.partition, len(shard),
                        label_histogram(train_data.labels, shard, train_data.num_classes))
        return shards

    def plan(self) -> leader_pb2.TrainingPlan:
        """The training plan sent to every learner at registration."""
        config = self.config
        return leader_pb2.TrainingPlan(
            model=config.model,
            num_classes=self.num_classes,
            aggregation=config.aggregation,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            local_steps=config.local_steps,
            local_epochs=config.local_epochs,
            seed=config.seed,
            rounds=config.rounds,
            augment=config.augment,
            image_shape=IMAGE_SHAPE,
            dataset=config.dataset,
            model_fingerprint=wire.fingerprint(self.specs),
            torch_version=torch.__version__,
            deterministic=config.deterministic,
            prox_mu=config.prox_mu,
            keep_momentum=config.keep_momentum,
            compression=config.compress,
            topk_ratio=config.topk_ratio,
            lr_schedule=config.lr_schedule,
            warmup_rounds=config.warmup_rounds,
        )

    # ---- requests from learners -------------------------------------------------

    def register(self, info: leader_pb2.LearnerInfo, peer: str = "") -> tuple[int, str, int]:
        """Admit a learner whose registration came from `peer` (gRPC's peer string); returns its id, its session token and its first round.

        The learner's callback address is checked (rpc.callback_problem) and called back before it gets a slot,
        so that a registration nobody answers never holds one. A full federation first checks its members.
        """
        self._check_learner_info(info, peer)
        with self._cond:
            known = self._alive_record_for(info.callback_token)
            if known is not None:  # a retried registration gets the same identity
                return known.learner_id, known.session_token, known.joins_round
        channel = rpc.channel(info.network_addr, self.tls)
        failure = rpc.health_check(channel, REGISTRATION_PROBE_S, rpc.LEARNER_SERVICE, info.callback_token)
        if failure is not None:
            channel.close()
            raise LeaderError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"the leader cannot call this learner back at {info.network_addr} ({failure}): check "
                              "--advertise-address, and that the leader can reach that port")
        try:
            learner_id, token, joins_round, replaced = self._admit(info, channel)
        except BaseException:
            channel.close()
            raise
        num_examples = self._learners[learner_id].num_examples
        if replaced is None:
            logger.info("learner %d registered from %s (%d examples)", learner_id, info.network_addr, num_examples)
        else:
            logger.info("learner %d's slot taken by %s (%d examples); it takes part from round %d",
                        learner_id, info.network_addr, num_examples, joins_round)
        return learner_id, token, joins_round

    def _check_learner_info(self, info: leader_pb2.LearnerInfo, peer: str) -> None:
        """Refuse a registration whose fields cannot work, before anything is done for it."""
        if info.version != rpc.PROTOCOL_VERSION:
            raise LeaderError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"learner speaks protocol {info.version[:16] or '?'}, leader {rpc.PROTOCOL_VERSION}: install the same release on both",
            )
        problem = rpc.callback_problem(info.network_addr, peer, self.trusts_registrants)
        if problem is not None:
            raise LeaderError(grpc.StatusCode.INVALID_ARGUMENT, f"network_addr: {problem}")
        if len(info.callback_token) < 16:
            raise LeaderError(grpc.StatusCode.INVALID_ARGUMENT, "callback_token must be a random secret of at least 16 characters")
        if info.tls != (self.tls is not None):
            raise LeaderError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this leader calls learners back over TLS: start the learner with --tls-cert, --tls-key and --tls-ca"
                if self.tls is not None else "this leader does not use TLS: start the learner without --tls-cert",
            )
        if self.config.data_mode == "split" and info.num_examples:
            raise LeaderError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this leader splits the data itself: start the learner without --data-dir, or the leader with --data-mode local",
            )
        if self.config.data_mode == "local" and not 0 < info.num_examples <= MAX_LOCAL_EXAMPLES:
            raise LeaderError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this leader expects learners with their own data: start the learner with --data-dir",
            )

    def _alive_record_for(self, callback_token: str) -> LearnerRecord | None:
        """The live member registered with this callback secret, if any (under the lock)."""
        for record in self._learners.values():
            if record.alive and rpc.secrets_match(callback_token, record.callback_token):
                return record
        return None

    def _admit(self, info: leader_pb2.LearnerInfo, channel: grpc.Channel) -> tuple[int, str, int, LearnerRecord | None]:
        """Give a checked registrant a slot: (id, session token, first round, the absent member it replaced)."""
        with self._cond:
            learner_id = self._free_slot()
        if learner_id is None:
            self._sweep_members()  # a full federation may hold members that are gone
        with self._cond:
            known = self._alive_record_for(info.callback_token)
            if known is not None:  # the same registration, retried while this one was checked
                channel.close()
                return known.learner_id, known.session_token, known.joins_round, None
            learner_id = self._free_slot()
            if learner_id is None:
                raise LeaderError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the federation is full ({self.config.learners} of {self.config.learners} learners) and every member "
                    "answers its health check; a slot frees when one of them stops",
                )
            replaced = self._learners.get(learner_id)
            if replaced is not None:  # the slot of an absent learner: its split and its session go to the newcomer
                self._end_session(replaced, "its slot went to a newcomer")
                replaced.channel.close()
            # before training, a learner starts with the first round; during it, with the round after the open one
            joins_round = max(self._round.number + 1, self.start_round) if self._started else self.start_round
            token = secrets.token_urlsafe(32)
            num_examples = info.num_examples or len(self.shards[learner_id])
            self._learners[learner_id] = LearnerRecord(
                learner_id, info.network_addr, info.callback_token, token, num_examples, channel,
                learner_stub(channel), joins_round,
            )
            self._tokens[token] = learner_id
            self._cond.notify_all()
        return learner_id, token, joins_round, replaced

    def _sweep_members(self) -> None:
        """Check every live member's health (at most one sweep at a time, and not more often than every 2 s).

        A member whose port refuses the check is gone and is marked absent, freeing its slot. One that does
        not answer in time is left alone: it may be busy; the round's own checks time it out.
        """
        if not self._sweep_lock.acquire(timeout=MEMBER_SWEEP_PROBE_S + REGISTRATION_PROBE_S):
            return
        try:
            if time.monotonic() - self._last_sweep < MEMBER_SWEEP_INTERVAL_S:
                return
            with self._cond:
                records = [record for record in self._learners.values() if record.alive]
            answers = list(self._calls.map(lambda record: self._health(record, MEMBER_SWEEP_PROBE_S), records))
            for record, answer in zip(records, answers):
                if answer is not None and not answer.startswith(grpc.StatusCode.DEADLINE_EXCEEDED.name):
                    self._mark_absent(record, f"its health check failed when a newcomer asked for a slot ({answer})")
            self._last_sweep = time.monotonic()
        finally:
            self._sweep_lock.release()

    def _health(self, record: LearnerRecord, timeout: float) -> str | None:
        """None when a member's LearnerService answers SERVING within `timeout`, else what it answered."""
        return rpc.health_check(record.channel, timeout, rpc.LEARNER_SERVICE, record.callback_token)

    def _free_slot(self) -> int | None:
        """The id a newcomer gets: the next unused one, else the lowest one whose learner is absent; None when full."""
        if len(self._learners) < self.config.learners:
            return len(self._learners)
        absent = [learner_id for learner_id, record in self._learners.items() if not record.alive]
        return min(absent) if absent else None

    def membership(self, learner_id: int) -> tuple[bool, str]:
        """Whether a learner is still a member, and what it should know (for Heartbeat)."""
        with self._cond:
            record = self._learners[learner_id]
            number = self._round.number
        if not record.alive:  # its session ends as it is marked absent; a call racing that is told the same
            return False, f"learner {learner_id} was marked absent; register again to take part"
        if not record.started:
            return True, f"waiting to start with round {record.joins_round}"
        return True, f"round {number} in progress"

    def learner_for_token(self, token: str | None) -> int | None:
        """The id a session token belongs to, or None."""
        if token is None:
            return None
        with self._cond:
            return self._tokens.get(token)

    def why_ended(self, token: str | None) -> str | None:
        """Why a session that is no longer valid ended (marked absent, slot taken), if it is a recent one."""
        if token is None:
            return None
        with self._cond:
            return self._revoked.get(token)

    def _end_session(self, record: LearnerRecord, reason: str) -> None:
        """Revoke a member's session token (under the lock): its later calls are refused UNAUTHENTICATED with `reason`."""
        if self._tokens.pop(record.session_token, None) is not None:
            self._revoked[record.session_token] = f"learner {record.learner_id}'s session ended: {reason}; register again to take part"
            while len(self._revoked) > REVOKED_SESSIONS_KEPT:
                self._revoked.popitem(last=False)

    def largest_split_bytes(self) -> int:
        """Bytes of the largest data split GetData streams (0 when learners hold their own data)."""
        if self.train_data is None or self.shards is None:
            return 0
        per_example = self.train_data.images[0].numel() * self.train_data.images.element_size() + self.train_data.labels.element_size()
        return max(len(shard) for shard in self.shards) * per_example

    def split_examples(self, learner_id: int) -> int:
        """Examples in a learner's data split (0 when learners hold their own data)."""
        return 0 if self.shards is None else len(self.shards[learner_id])

    def data_for(self, learner_id: int) -> ImageData:
        """A learner's split of the training set."""
        if self.train_data is None or self.shards is None:
            raise LeaderError(grpc.StatusCode.FAILED_PRECONDITION, "this leader holds no training data (--data-mode local)")
        return self.train_data.subset(self.shards[learner_id])

    def published(self) -> Published:
        """The current global model, encoded."""
        return self._published

    def check_update_header(self, learner_id: int, header: leader_pb2.GradientData) -> None:
        """Refuse an update early, before its bytes are read, when its header is wrong."""
        if header.learner_id != learner_id:
            raise LeaderError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"session belongs to learner {learner_id}, update claims learner {header.learner_id}",
            )
        with self._cond:
            current = self._round
            record = self._learners[learner_id]
            registered = record.num_examples
            alive = record.alive
        if not alive:
            raise LeaderError(grpc.StatusCode.FAILED_PRECONDITION, f"learner {learner_id} was marked absent; register again to take part")
        if header.round == current.number and learner_id not in current.members:
            raise LeaderError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"learner {learner_id} joined during round {current.number} and takes part from round {record.joins_round}",
            )
        if header.round != current.number or not current.accepting:
            raise LeaderError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale update for round {header.round}; the leader is "
                + (f"collecting round {current.number}" if current.accepting else f"not collecting (round {current.number} closed)"),
            )
        limit = self._max_examples(registered)
        if not 0 < header.num_examples <= limit:
            raise LeaderError(grpc.StatusCode.INVALID_ARGUMENT, f"num_examples must be in 1..{limit}, got {header.num_examples}")
        if not math.isfinite(header.train_loss):
            raise LeaderError(grpc.StatusCode.INVALID_ARGUMENT, "train_loss is not finite")

    def _parameter_norm(self, update: dict[str, torch.Tensor]) -> float:
        """L2 norm of an update's parameter part (gradient or model delta), buffers left out."""
        squares = sum(_norm(update[name]) ** 2 for name in self.parameter_names)
        return math.sqrt(squares)

    def note_rejection(self, learner_id: int, code: grpc.StatusCode, reason: str) -> None:
        """Count a refused update; log it once per learner per round."""
        with self._cond:
            current = self._round
            first = learner_id not in current.rejected
            current.rejected[learner_id] = current.rejected.get(learner_id, 0) + 1
        if first:
            logger.warning("round %d: refused an update from learner %d (%s): %s", current.number, learner_id, code.name, reason)

    def count_bytes_out(self, count: int) -> None:
        """Record model bytes sent to learners in the current round."""
        with self._cond:
            self._round.bytes_out += count

    def _max_examples(self, registered: int) -> int:
        """Most examples one update can stand for, so that no learner outweighs the rest by claiming more."""
        config = self.config
        if config.aggregation == "fedsgd":
            return min(config.batch_size, registered)
        if config.local_steps:
            return config.local_steps * config.batch_size
        return registered * config.local_epochs

    def unpack(self, received: wire.Received) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """A received update as the model's dense tensors (decompressed under --compress), with the norms known so far."""
        if self.config.compress == "none":
            return received.tensors, received.norms
        try:
            return compression.decompress(received.tensors, self.specs, self.config.compress), {}
        except ValueError as error:
            raise LeaderError(grpc.StatusCode.INVALID_ARGUMENT, f"update refused: {error}") from None

    def accept_update(self, learner_id: int, header: leader_pb2.GradientData, tensors: dict[str, torch.Tensor],
                      known_norms: dict[str, float] | None = None, release: Callable[[], None] | None = None,
                      time_left: float | None = None) -> str:
        """Check an update and queue it for the round's running sum, once per learner per round.

        The answer comes once the update is checked; the sum runs behind it, and the round waits for it
        (`RoundState.summed`). `release` is called once nothing reads `tensors` any more: after the sum, or
        at once when the update is refused or a duplicate. `time_left` is the call's remaining time: a
        wait for a summing slot that would outlast it is refused instead (RESOURCE_EXHAUSTED, not taken).
        """
        known_norms = known_norms or {}
        holds_slot = queued = False
        try:
            # per-tensor norms stand in for a hash of the bytes: they tell an identical retry from a different update
            # (a different one that matched them would only be answered "duplicate"; neither is ever counted twice)
            norms = {spec.name: known_norms[spec.name] if spec.name in known_norms else _norm(tensors[spec.name]) for spec in self.specs}
            digest = (*norms.values(), float(header.num_examples), header.train_loss)  # by name: a sender picks the order
            for name in self.variance_names:
                if bool((tensors[name] < 0).any()):
                    raise LeaderError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} holds negative variances")
            norm = math.sqrt(sum(norms[name] ** 2 for name in self.parameter_names))
            bound = self.config.max_update_norm
            if bound and norm > bound:
                raise LeaderError(grpc.StatusCode.INVALID_ARGUMENT, f"update norm {norm:.4g} exceeds --max-update-norm {bound:g}")
            if not math.isfinite(norm):  # finite values whose squares overflow even float64
                raise LeaderError(grpc.StatusCode.INVALID_ARGUMENT, f"update norm {norm} is not finite")
            # outside the lock: a wait for the summing thread must not hold up other calls
            wait = SUM_SLOT_TIMEOUT_S if time_left is None else max(0.0, min(SUM_SLOT_TIMEOUT_S, time_left - REPLY_MARGIN_S))
            holds_slot = self._sum_slots.acquire(timeout=wait)
            if not holds_slot:
                raise LeaderError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"update not taken: {MAX_PENDING_SUMS} accepted updates were still waiting to be summed after "
                                  f"{wait:.1f}s, this call's time; send it again")
            with self._cond:
                current = self._round
                if header.round != current.number or not current.accepting:
                    raise LeaderError(grpc.StatusCode.FAILED_PRECONDITION, f"stale update for round {header.round}; round {current.number} is closed")
                previous = current.digests.get(learner_id)
                if previous == digest:
                    return f"duplicate of the accepted update for round {header.round}; counted once"
                if previous is not None:
                    raise LeaderError(grpc.StatusCode.ALREADY_EXISTS, f"learner {learner_id} already sent a different update for round {header.round}")
                # DP-FedAvg averages clipped updates unweighted, so that one learner's influence is bounded by the clip alone
                weight = 1.0 if self.accountant is not None else min(float(header.num_examples), current.max_weight)
                clip = min(self.config.clip_norm or math.inf, current.norm_bound)
                clip = clip if norm > clip else math.inf  # an update within its bounds is summed as it came
                if norm > current.norm_bound:
                    current.clipped += 1
                # queued under the lock, while the round accepts: closing it (accepting = False) fixes the list of sums
                current.sums.append(self._summing.submit(self._add_to_sum, current.running, tensors, weight, learner_id,
                                                         release, clip))
                queued = True  # from here the summing thread frees the slot and the buffer
                current.digests[learner_id] = digest
                current.losses.append(header.train_loss)
                current.update_norms.append(norm)
                current.bytes_in += self.update_bytes
                self._cond.notify_all()
        finally:
            if not queued:
                if holds_slot:
                    self._sum_slots.release()
                if release is not None:
                    release()
        return f"update for round {header.round} accepted"

    def _add_to_sum(self, running: aggregation.RunningMean | aggregation.UpdateList, update: dict[str, torch.Tensor],
                    weight: float, learner_id: int, release: Callable[[], None] | None, clip: float = math.inf) -> None:
        """On the summing thread: scale an accepted update down to `clip` (its parameters' L2 norm), add it to the round's sum, free its slot and buffer."""
        try:
            if math.isfinite(clip):
                update, _ = aggregation.clip_to_norm(update, clip, self.parameter_names)
            running.add(update, weight, key=learner_id)
        finally:
            self._sum_slots.release()
            if release is not None:
                release()

    # ---- the round loop ---------------------------------------------------------

    def run(self, recorder: Recorder | None = None) -> list[dict[str, Any]]:
        """Wait for the learners, run every round, tell learners to stop; returns per-round metrics.

        On shutdown (stop_event) the last completed round is written to disk before RunError says so.
        """
        config = self.config
        try:
            self._wait_for_learners()
            start = time.monotonic()
            self._begin_round(self._open_round(self.start_round))
            for number in range(self.start_round, config.rounds + 1):
                finished = self._collect(number, start)
                metrics = self._close_round(finished, start)
                self.history.append(metrics)
                if self._checkpoint_due(number):
                    self._save(metrics)
                if recorder is not None:
                    recorder.record(metrics)
                self.status.clear()
                evaluation = ("not evaluated" if metrics["test_accuracy"] is None else
                              f"test loss {metrics['test_loss']:.4f}, test accuracy {100 * metrics['test_accuracy']:.2f}%")
                logger.info("round %d/%d: %d learners, train loss %.4f, %s, %.1fs", number, config.rounds,
                            metrics["learners_reported"], metrics["train_loss"], evaluation, metrics["round_seconds"])
                self._check_stop()
        except RunError:
            if self.stop_event.is_set() and self.history and self.history[-1]["round"] > self._saved_round:
                self._save(self.history[-1])  # the model has not moved since: the next round was still collecting
            raise
        self.stop_learners("training complete")
        return self.history

    def _close_round(self, finished: RoundState, start: float) -> dict[str, Any]:
        """Aggregate a collected round into the model (or keep the last good one), publish it, open the next round, evaluate."""
        config = self.config
        number = finished.number
        mean = self._aggregate(finished)
        if config.aggregation == "fedsgd" and config.server_opt in ("sgd", "sgdm"):  # the blog's SGD: --lr is the leader's
            for group in self.optimizer.param_groups:
                group["lr"] = schedule.round_lr(config.lr, config.lr_schedule, config.warmup_rounds, config.rounds, number)
        aggregation.apply_update(self.model, self.optimizer, mean)
        problem = self._model_problem()
        if problem is None:
            self._model_norm = self._current_model_norm()
            self._norm_reference = statistics.median_low(finished.update_norms)
        else:
            self._keep_last_good(number, problem)
        round_seconds = time.monotonic() - finished.opened_at
        self._published = Published.of(number + 1, self.model, self._publish_buffers)
        if number < config.rounds:
            # learners start the next round now; this one is evaluated and saved while they train
            # (the model is not touched again before the next _collect, which this thread runs after)
            self._begin_round(self._open_round(number + 1))
        if config.recompute_bn:  # after publishing: learners train BatchNorm on batch statistics, not these
            self.recompute_batchnorm(number)
        evaluated = number % config.eval_every == 0 or number == config.rounds
        test_loss, test_accuracy = (self.evaluate() if evaluated else None) or (None, None)
        aggregate_norm = self._parameter_norm(mean)
        return {
            "round": number,
            "wall_time": time.time(),
            "learners_selected": len(finished.members),
            "learners_reported": finished.reported,
            "learners_dropped": len(finished.members) - finished.reported,
            "train_loss": sum(finished.losses) / len(finished.losses),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "bytes_in": finished.bytes_in,
            "bytes_out": finished.bytes_out,
            "update_norm_mean": sum(finished.update_norms) / len(finished.update_norms),
            "update_norm_max": max(finished.update_norms),
            "updates_rejected": sum(finished.rejected.values()),
            "updates_clipped": finished.clipped,
            "model_rejected": problem is not None,
            "aggregate_norm": aggregate_norm if math.isfinite(aggregate_norm) else None,
            **({"dp_epsilon": self.accountant.epsilon()} if self.accountant is not None else {}),
            "round_seconds": round_seconds,
            "elapsed_seconds": time.monotonic() - start,
        }

    def _current_model_norm(self) -> float:
        """L2 norm of the global model's parameters (float32 arithmetic: inf when it overflows)."""
        parameters = [parameter.detach() for parameter in self.model.parameters()]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(parameters))))

    def _model_problem(self) -> str | None:
        """Why the model just stepped must not be published (a NaN, an infinity, an exploding norm), or None."""
        norm = self._current_model_norm()
        buffers = [buffer for buffer in self.model.buffers() if buffer.dtype.is_floating_point]
        buffer_norms = torch.stack(torch._foreach_norm(buffers)).tolist() if buffers else []
        if not math.isfinite(norm) or not all(math.isfinite(value) for value in buffer_norms):
            return "it holds NaN or infinite values"
        if norm > MODEL_GROWTH_LIMIT * self._model_norm:
            return f"its parameter norm grew from {self._model_norm:.4g} to {norm:.4g} in one round"
        return None

    def _keep_last_good(self, number: int, problem: str) -> None:
        """Go back to the published model after refusing round `number`'s result, and forget the server optimizer's state."""
        self.model.load_state_dict(self._published.state(self.specs))
        self.optimizer.state.clear()  # momentum or moments that took in the refused step would replay it
        logger.warning("round %d: refused the new global model (%s); kept the model of round %d and reset the server "
                       "optimizer's state", number, problem, number - 1)

    def _checkpoint_due(self, number: int) -> bool:
        """Whether round `number` is written: the last round, on shutdown, every --checkpoint-every rounds, or --checkpoint-seconds after the last write."""
        config = self.config
        if number == config.rounds or self.stop_event.is_set():
            return True
        if config.checkpoint_every and number % config.checkpoint_every == 0:
            return True
        return time.monotonic() - self._saved_at >= config.checkpoint_seconds

    def _save(self, metrics: dict[str, Any]) -> None:
        """Write the global model and server optimizer state as the checkpoint of metrics' round."""
        checkpoint.save(
            Path(self.config.checkpoint_dir),
            metrics["round"],
            self.model.state_dict(),
            {"config": dataclasses.asdict(self.config), "metrics": metrics, "num_classes": self.num_classes},
            keep=self.config.keep_checkpoints,
            optimizer_state=self.optimizer_tensors(),
        )
        self._saved_round = metrics["round"]
        self._saved_at = time.monotonic()

    def _wait_for_learners(self) -> None:
        """Block until --learners live learners have registered, the join timeout passes, or shutdown.

        When the federation fills up, every learner's health is checked: one that died after registering
        frees its slot for the next to register, rather than holding up the first round.
        """
        deadline = time.monotonic() + self.config.join_timeout
        while True:
            with self._cond:
                while (joined := sum(record.alive for record in self._learners.values())) < self.config.learners:
                    self._check_stop()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RunError(
                            f"only {joined} of {self.config.learners} learners registered within "
                            f"{self.config.join_timeout:.0f}s (--join-timeout); start more with: python learner.py --leader HOST:{self.config.port}"
                        )
                    self._cond.wait(min(remaining, WAIT_SLICE_S))
                records = [record for record in self._learners.values() if record.alive]
            answers = list(self._calls.map(lambda record: self._health(record, STOP_TIMEOUT_S), records))
            for record, answer in zip(records, answers):
                if answer is not None:
                    self._mark_absent(record, f"it stopped answering before training ({answer}); its slot goes to the next to register")
            with self._cond:
                if sum(record.alive for record in self._learners.values()) >= self.config.learners:
                    self._started = True
                    break
        logger.info("all %d learners registered; starting training", self.config.learners)

    def _open_round(self, number: int) -> RoundState:
        """Start collecting round `number` from the live learners due to take part in it (a seeded sample of --fraction)."""
        config = self.config
        with self._cond:
            available = sorted(learner_id for learner_id, record in self._learners.items()
                               if record.alive and record.joins_round <= number)
            count = config.sampled(len(available))
            if count < len(available):
                generator = torch.Generator().manual_seed(derive_seed(config.seed, "sample", number))
                chosen = torch.randperm(len(available), generator=generator)[:count].tolist()
                members = frozenset(available[index] for index in chosen)
            else:
                members = frozenset(available)
            # robust rules need every update; --deterministic sums them in learner order; else a running sum is enough
            futures.wait(self._round.sums)  # the sum is reset below: the last round's additions must be over
            running = aggregation.UpdateList() if self.keeps_updates else self._running.reset()
            self._round = RoundState(number, members=members, quorum=config.round_quorum(count), running=running,
                                     norm_bound=self._norm_bound(), max_weight=self._max_weight(members))
            return self._round

    def _norm_bound(self) -> float:
        """--max-norm-ratio times the median update norm of the last applied round (before any, of the model's norm)."""
        reference = self._norm_reference if self._norm_reference is not None else self._model_norm
        if not self.config.max_norm_ratio or not reference > 0:
            return math.inf
        return self.config.max_norm_ratio * reference

    def _max_weight(self, members: frozenset[int]) -> float:
        """With learners' own data, --max-weight-ratio times the median weight the round's members may claim (under the lock)."""
        if not self.config.max_weight_ratio or self.config.data_mode != "local" or not members:
            return math.inf  # in split mode the leader itself knows every learner's examples
        claims = [self._max_examples(self._learners[learner_id].num_examples) for learner_id in members]
        return self.config.max_weight_ratio * statistics.median_low(claims)

    def _aggregate(self, finished: RoundState) -> dict[str, torch.Tensor]:
        """The round's update by --aggregator, plus Gaussian noise on the parameters under DP-FedAvg."""
        config = self.config
        rules = {
            "median": aggregation.coordinate_median,
            "trimmed-mean": lambda updates, weights: aggregation.trimmed_mean(updates, weights, config.trim),
            "krum": lambda updates, weights: aggregation.krum(updates, weights, config.byzantine),
            "multi-krum": lambda updates, weights: aggregation.krum(updates, weights, config.byzantine, len(updates) - config.byzantine),
        }
        try:
            running = finished.summed()
            result = running.mean() if config.aggregator == "mean" else running.aggregate(rules[config.aggregator])
        except ValueError as error:
            raise RunError(f"round {finished.number}: {error}; the model is unchanged") from None
        if self.accountant is not None:
            std = privacy.gaussian_noise_std(config.clip_norm, config.dp_noise_multiplier, running.count)
            for name in self.parameter_names:  # fresh OS randomness: noise anyone could regenerate from --seed protects nothing
                noise = torch.randn(result[name].shape, generator=self._noise, dtype=torch.float64)
                result[name] = (result[name].double() + std * noise).to(result[name].dtype)
            self.accountant.step()
            if config.checkpoint_dir:  # on disk before the noised model can reach anyone
                checkpoint.record_privacy_spent(Path(config.checkpoint_dir), self.accountant.rounds)
        return result

    def _begin_round(self, current: RoundState) -> None:
        """Start the newcomers (they fetch the model with GetModel) and push the new global model to the rest."""
        published = self._published
        with self._cond:
            records = [self._learners[learner_id] for learner_id in sorted(current.members)]
            newcomers = {record.learner_id for record in records if not record.started}
            for record in records:
                record.started = True

        def begin(record: LearnerRecord) -> Any:
            metadata = rpc.token_metadata(record.callback_token)
            if record.learner_id in newcomers:
                return record.stub.StartTraining(learner_pb2.Empty(), timeout=rpc.CONTROL_TIMEOUT_S, metadata=metadata)
            size = published.nbytes
            reply = record.stub.SyncModelState(iter(published.model_states), timeout=rpc.transfer_timeout(size), metadata=metadata)
            self.count_bytes_out(size)
            return reply

        for record in records:  # not awaited: a learner that is slow to take the model must not hold up the others
            self._calls.submit(_try_call, begin, record).add_done_callback(
                lambda outcome, record=record: self._mark_absent_on_error(record, "the round's start", outcome.result()))

    def _collect(self, number: int, run_start: float) -> RoundState:
        """Wait until every member has reported or is gone, or the round's deadline; the round needs its quorum.

        With --round-timeout 0 the deadline is set once the quorum has reported: the rest get
        STRAGGLER_GRACE_FACTOR times the time that took (at least STRAGGLER_GRACE_MIN_S).
        """
        config = self.config
        deadline = time.monotonic() + (config.round_timeout or AUTO_ROUND_LIMIT_S)
        accuracies = [entry["test_accuracy"] for entry in self.history if entry["test_accuracy"] is not None]
        last = f", last accuracy {100 * accuracies[-1]:.2f}%" if accuracies else ""
        probe_every = min(HEALTH_PROBE_INTERVAL_S, config.learner_lost_after / 3)
        next_probe = time.monotonic() + probe_every
        silent_since: dict[int, float] = {}
        refusals: dict[int, int] = {}
        graced = bool(config.round_timeout)
        with self._cond:
            current = self._round
            while True:
                if time.monotonic() >= next_probe:
                    self._cond.release()
                    try:
                        self._probe_members(current, silent_since, refusals, probe_every)
                    finally:
                        self._cond.acquire()
                    next_probe = time.monotonic() + probe_every
                self._check_stop()
                alive = sum(self._learners[learner_id].alive for learner_id in current.members)
                self.status.show(
                    f"round {number}/{config.rounds}: {current.reported}/{alive} learners reported, "
                    f"{time.monotonic() - run_start:.0f}s elapsed{last}"
                )
                if current.reported >= alive or alive < current.quorum:
                    break
                now = time.monotonic()
                if not graced and current.reported >= current.quorum:
                    graced = True
                    deadline = min(deadline, now + max(STRAGGLER_GRACE_MIN_S, STRAGGLER_GRACE_FACTOR * (now - current.opened_at)))
                if now >= deadline:
                    break
                self._cond.wait(min(deadline - now, WAIT_SLICE_S, max(0.0, next_probe - now)))
            current.accepting = False
            late = [self._learners[learner_id] for learner_id in sorted(current.members)
                    if learner_id not in current.digests and self._learners[learner_id].alive]
        for record in late:  # it missed the deadline: a later update of this round is stale, and it must register again
            limit = "--round-timeout" if config.round_timeout else "the stragglers' grace after the quorum reported"
            self._mark_absent(record, f"it sent no update for round {number} by the deadline ({limit})")
        if current.reported < current.quorum:
            causes = "; ".join(f"learner {learner_id}: {why}" for learner_id, why in sorted(current.lost.items()))
            raise RunError(
                f"round {number}: {current.reported} of {len(current.members)} learners reported and {current.quorum} "
                f"are needed (--min-learners); " + (causes or "see the learners' logs")
            )
        return current

    def _probe_members(self, current: RoundState, silent_since: dict[int, float], refusals: dict[int, int], timeout: float) -> None:
        """Health-check the members yet to report; mark absent those whose port refuses twice or that stay silent for --learner-lost-after."""
        with self._cond:
            records = [self._learners[learner_id] for learner_id in sorted(current.members)
                       if learner_id not in current.digests and self._learners[learner_id].alive]
        answers = list(self._calls.map(lambda record: self._health(record, timeout), records))
        now = time.monotonic()
        for record, answer in zip(records, answers):
            if answer is None:
                silent_since.pop(record.learner_id, None)
                refusals.pop(record.learner_id, None)
                continue
            since = silent_since.setdefault(record.learner_id, now)
            if answer.startswith(grpc.StatusCode.DEADLINE_EXCEEDED.name):
                refusals.pop(record.learner_id, None)  # silent, perhaps only busy: --learner-lost-after decides
            else:
                refusals[record.learner_id] = refusals.get(record.learner_id, 0) + 1
            if now - since >= self.config.learner_lost_after or refusals.get(record.learner_id, 0) >= REFUSED_PROBES_TO_ABSENT:
                self._mark_absent(record, f"it failed health checks in round {current.number}: {answer}, for {now - since:.0f}s")

    def _check_stop(self) -> None:
        if self.stop_event.is_set():
            raise RunError("leader shutting down")

    def _call_all(self, what: str, call: Any, records: list[LearnerRecord]) -> None:
        """Call learners in parallel; a learner whose call fails is marked absent."""
        for record, error in zip(records, self._calls.map(lambda record: _try_call(call, record), records)):
            self._mark_absent_on_error(record, what, error)

    def _mark_absent_on_error(self, record: LearnerRecord, what: str, error: str | None) -> None:
        if error is not None:
            self._mark_absent(record, f"it failed {what}: {error}")

    def _mark_absent(self, record: LearnerRecord, why: str) -> None:
        """Take a member out: its slot goes to the next to register, its session ends, and the open round notes why."""
        with self._cond:
            was_alive = record.alive and self._learners.get(record.learner_id) is record
            record.alive = False
            if was_alive:
                self._end_session(record, f"marked absent: {why}")
                if record.learner_id in self._round.members and record.learner_id not in self._round.digests:
                    self._round.lost[record.learner_id] = why
            self._cond.notify_all()
        if was_alive:
            logger.warning("learner %d at %s marked absent: %s", record.learner_id, record.address, why)

    def stop_learners(self, reason: str) -> None:
        """Tell every learner to stop, those marked absent too, in case they come back (best effort, short deadline)."""
        def stop(record: LearnerRecord) -> Any:
            message = learner_pb2.ModelState(stop=True, reason=reason)
            return record.stub.SyncModelState(iter([message]), timeout=STOP_TIMEOUT_S, metadata=rpc.token_metadata(record.callback_token))

        with self._cond:
            records = list(self._learners.values())
        self._call_all("stop", stop, records)

    def recompute_batchnorm(self, number: int) -> None:
        """Recompute the global model's BatchNorm statistics from --recompute-bn training images, drawn anew each round."""
        data = self.train_data
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "batchnorm", number))
        chosen = torch.randperm(len(data), generator=generator)[: self.config.recompute_bn]
        batches = (normalize(data.images[chosen[first : first + EVAL_BATCH_SIZE]].to(self.device))
                   for first in range(0, len(chosen), EVAL_BATCH_SIZE))
        recompute_batchnorm(self.model, batches)

    def evaluate(self) -> tuple[float, float] | None:
        """Test loss and accuracy of the global model; None when shutdown interrupts it."""
        self.model.eval()
        total_loss = 0.0
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(self.test_data), EVAL_BATCH_SIZE):
                if self.stop_event.is_set():  # a shutdown is not kept waiting for a full pass over the test set
                    self.model.train()
                    return None
                images = self.test_data.images[start : start + EVAL_BATCH_SIZE].to(self.device)
                labels = self.test_data.labels[start : start + EVAL_BATCH_SIZE].to(self.device)
                logits = self.model(normalize(images))
                total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(1) == labels).sum())
        self.model.train()
        count = max(1, len(self.test_data))
        return total_loss / count, correct / count

    def close(self) -> None:
        """Close the channels to learners and let calls in flight finish."""
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._summing.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            for record in self._learners.values():
                record.channel.close()


def _norm(tensor: torch.Tensor) -> float:
    """L2 norm accumulated in float64, without a float64 copy of the tensor."""
    if not tensor.dtype.is_floating_point:
        tensor = tensor.double()  # small integer buffers, e.g. BatchNorm's batch counter
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))


def _try_call(call: Any, record: LearnerRecord) -> str | None:
    """Run one call against a learner; returns None or the error's description."""
    try:
        reply = call(record)
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"
    if not reply.success:
        return reply.message
    return None


class LeaderServicer(leader_pb2_grpc.LeaderServiceServicer):
    """The gRPC boundary: authenticates callers, checks payloads, answers with status codes."""

    def __init__(self, leader: Leader) -> None:
        self.leader = leader

    def _caller(self, context: grpc.ServicerContext) -> int:
        learner_id = self.leader.learner_for_token(rpc.caller_token(context))
        if learner_id is None:  # the gate lets no such call through; kept for calls made without it
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or unknown {rpc.TOKEN_METADATA_KEY}: call RegisterLearner first")
        return learner_id


    def RegisterLearner(self, request: leader_pb2.LearnerInfo, context: grpc.ServicerContext) -> leader_pb2.AckWithMetadata:
        try:
            learner_id, token, joins_round = self.leader.register(request, context.peer())
        except LeaderError as error:
            context.abort(error.code, str(error))
        return leader_pb2.AckWithMetadata(
            success=True,
            message=f"registered as learner {learner_id}",
            learner_id=learner_id,
            max_learners=self.leader.config.learners,
            plan=self.leader.plan(),
            session_token=token,
            joins_round=joins_round,
            split_examples=self.leader.split_examples(learner_id),
        )

    def GetModel(self, request: leader_pb2.Empty, context: grpc.ServicerContext) -> Iterator[leader_pb2.ModelChunk]:
        self._caller(context)
        published = self.leader.published()
        yield from published.model_chunks
        self.leader.count_bytes_out(published.nbytes)

    def GetData(self, request: leader_pb2.LearnerDataRequest, context: grpc.ServicerContext) -> Iterator[leader_pb2.DataChunk]:
        learner_id = self._caller(context)
        if request.learner_id != learner_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"session belongs to learner {learner_id}, not {request.learner_id}")
        try:
            data = self.leader.data_for(learner_id)
        except LeaderError as error:
            context.abort(error.code, str(error))
        manifest, payload = wire.encode({"images": data.images, "labels": data.labels})
        yield from wire.frames(leader_pb2.DataChunk, manifest, payload)

    def AccumulateGradients(self, request_iterator: Iterator[leader_pb2.GradientData], context: grpc.ServicerContext) -> leader_pb2.Ack:
        learner_id = self._caller(context)
        leader = self.leader
        received = None
        try:
            received = wire.receive(
                request_iterator,
                max_bytes=leader.update_bytes,
                expected=leader.update_specs,
                check_header=lambda header: leader.check_update_header(learner_id, header),
                allocate=leader.update_buffers.take,
            )
            tensors, norms = leader.unpack(received)
            header, payload = received.header, received.payload
            received = None  # accept_update gives the buffer back once the update is summed or refused
            release = None if leader.keeps_updates else functools.partial(leader.update_buffers.give, payload)
            message = leader.accept_update(learner_id, header, tensors, norms, release=release, time_left=context.time_remaining())
        except wire.WireError as error:
            leader.note_rejection(learner_id, grpc.StatusCode.INVALID_ARGUMENT, str(error))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"update refused: {error}")
        except LeaderError as error:
            leader.note_rejection(learner_id, error.code, str(error))
            context.abort(error.code, str(error))
        finally:
            if received is not None and not leader.keeps_updates:
                leader.update_buffers.give(received.payload)  # refused before accept_update: nothing views it now
        return leader_pb2.Ack(success=True, message=message)

    def Heartbeat(self, request: leader_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> leader_pb2.Ack:
        learner_id = self._caller(context)
        if request.learner_id != learner_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"session belongs to learner {learner_id}, not {request.learner_id}")
        member, message = self.leader.membership(learner_id)
        return leader_pb2.Ack(success=member, message=message)


def learner_stub(channel: grpc.Channel) -> learner_pb2_grpc.LearnerServiceStub:
    """The generated stub, with SyncModelState sending the published model's frames as they are (no serialization per push)."""
    stub = learner_pb2_grpc.LearnerServiceStub(channel)
    stub.SyncModelState = channel.stream_unary(f"/{rpc.LEARNER_SERVICE}/SyncModelState", request_serializer=wire.serialize,
                                               response_deserializer=learner_pb2.Ack.FromString)
    return stub


def leader_gate(leader: Leader, enrolment_token: str | None) -> rpc.Gate:
    """Refuse, before any handler runs, registrations without the enrolment secret and calls without a session token."""

    def check(method: str, metadata: Any) -> rpc.Refusal | None:
        if method == "RegisterLearner":
            if enrolment_token is not None and not rpc.secrets_match(rpc.metadata_value(metadata, rpc.ENROLMENT_METADATA_KEY), enrolment_token):
                return grpc.StatusCode.UNAUTHENTICATED, "RegisterLearner needs this federation's enrolment secret (--token-file or $FL_ENROLMENT_TOKEN)"
            return None
        token = rpc.metadata_value(metadata, rpc.TOKEN_METADATA_KEY)
        if leader.learner_for_token(token) is None:
            return grpc.StatusCode.UNAUTHENTICATED, leader.why_ended(token) or f"missing or unknown {rpc.TOKEN_METADATA_KEY}: call RegisterLearner first"
        return None

    return rpc.Gate(rpc.LEADER_SERVICE, check)


def build_parser() -> argparse.ArgumentParser:
    """The leader's command line; every flag's help states its default."""
    defaults = LeaderConfig()
    parser = argparse.ArgumentParser(
        description="Federated learning leader: serves the global model and coordinates rounds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default=defaults.host, help="address to listen on")
    add("--port", type=int, default=defaults.port, help="port to listen on (0 picks a free one)")
    add("--learners", type=_positive_int, default=defaults.learners, help="learners to wait for before training starts")
    add("--min-learners", type=_non_negative_int, default=defaults.min_learners,
        help="learners that must report for a round to count (0: half of the round's learners, rounded up, so that a "
        "federation of 2 survives losing one)")
    add("--rounds", type=_positive_int, default=defaults.rounds, help="federated rounds to run")
    add("--aggregation", choices=AGGREGATIONS, default=defaults.aggregation,
        help="fedsgd: one batch per learner, the leader averages gradients and takes an SGD step; "
        "fedavg: learners train locally, the leader averages their model deltas")
    add("--model", choices=list(MODELS), default=defaults.model, help="architecture, built from model.py on both sides")
    add("--dataset", choices=DATASETS, default=defaults.dataset, help="data set kind")
    add("--data-dir", default=defaults.data_dir, help="where the data set lives (CIFAR-10 downloads here when online)")
    add("--data-mode", choices=DATA_MODES, default=defaults.data_mode,
        help="split: the leader sends each learner its split (GetData); local: learners train on their own --data-dir")
    add("--batch-size", type=_positive_int, default=defaults.batch_size, help="examples per local batch")
    add("--lr", type=float, default=defaults.lr, help="SGD learning rate (the leader's in fedsgd, the learners' in fedavg)")
    add("--lr-schedule", choices=schedule.SCHEDULES, default=defaults.lr_schedule,
        help="--lr across rounds, after --warmup-rounds of linear warm-up: constant, or cosine decay over the rest")
    add("--warmup-rounds", type=_non_negative_int, default=defaults.warmup_rounds, help="rounds over which --lr ramps up linearly")
    add("--momentum", type=float, default=defaults.momentum, help="SGD momentum (same side as --lr)")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="SGD weight decay (same side as --lr)")
    add("--server-opt", choices=server_opt.SERVER_OPTIMIZERS, default=defaults.server_opt,
        help="the leader's optimizer on the averaged update: sgd (FedAvg; in fedsgd the blog's SGD with --lr, --momentum, "
        "--weight-decay), sgdm (FedAvgM), adam, yogi or adagrad (FedOpt, Reddi et al. 2021); all but fedsgd's sgd use --server-lr")
    add("--server-lr", type=float, default=defaults.server_lr, help="server step size (1 with sgd is plain FedAvg; FedOpt wants about 0.01-0.1)")
    add("--server-momentum", type=float, default=defaults.server_momentum, help="server momentum of sgd and sgdm (0: none for sgd, 0.9 for sgdm)")
    add("--server-beta1", type=float, default=defaults.server_beta1, help="adam, yogi, adagrad: first-moment decay")
    add("--server-beta2", type=float, default=defaults.server_beta2, help="adam, yogi: second-moment decay")
    add("--server-tau", type=_positive_float, default=defaults.server_tau, help="adam, yogi, adagrad: adaptivity (the epsilon added to the root of v)")
    add("--prox-mu", type=_non_negative_float, default=defaults.prox_mu,
        help="FedProx: learners add (mu/2)*||w - w_global||^2 to their loss (0: plain local SGD)")
    add("--keep-momentum", action=argparse.BooleanOptionalAction, default=defaults.keep_momentum,
        help="fedavg: learners keep their SGD momentum from round to round instead of starting each round from none")
    add("--partition", choices=PARTITIONS, default=defaults.partition,
        help="how the leader splits the training set: iid, dirichlet (label skew by --alpha) or shards (--classes-per-learner classes each)")
    add("--alpha", type=_positive_float, default=defaults.alpha, help="dirichlet: concentration (small: each learner sees few classes)")
    add("--classes-per-learner", type=_positive_int, default=defaults.classes_per_learner, help="shards: label shards per learner")
    add("--fraction", type=_fraction, default=defaults.fraction,
        help="share of the live learners asked to take part in each round (seeded sample, at least --min-learners)")
    add("--aggregator", choices=AGGREGATORS, default=defaults.aggregator,
        help="mean (weighted by examples), coordinate-wise median, trimmed-mean (--trim), krum or multi-krum (--byzantine)")
    add("--trim", type=float, default=defaults.trim, help="trimmed-mean: share of the values dropped at each end of every coordinate")
    add("--byzantine", type=_non_negative_int, default=defaults.byzantine, help="krum, multi-krum: learners that may be hostile (needs more than 2f+2 per round)")
    add("--clip-norm", type=_non_negative_float, default=defaults.clip_norm, help="scale each update's parameters down to this L2 norm (0: no clipping)")
    add("--dp-noise-multiplier", type=_non_negative_float, default=defaults.dp_noise_multiplier,
        help="DP-FedAvg: Gaussian noise of this many times --clip-norm on the sum of updates (0: no differential privacy)")
    add("--dp-delta", type=_fraction, default=defaults.dp_delta, help="DP-FedAvg: the delta at which the epsilon spent is reported")
    add("--local-steps", type=int, default=defaults.local_steps, help="fedavg: local batches per round (0: use --local-epochs)")
    add("--local-epochs", type=_positive_int, default=defaults.local_epochs, help="fedavg: local epochs per round")
    add("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment, help="random crop and flip on the learners")
    add("--seed", type=int, default=defaults.seed, help="seed of the model, the split and the learners' shuffling")
    add("--device", default=defaults.device, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add("--threads", type=int, default=defaults.threads, help="CPU threads for evaluation (0: PyTorch's default)")
    add("--run-dir", default=defaults.run_dir, help="directory for this run's config, metrics, plot, log and checkpoints; None means runs/<start time>")
    add("--checkpoint-dir", default=defaults.checkpoint_dir, help="where each round's checkpoint is written; None means <run-dir>/checkpoints")
    add("--keep-checkpoints", type=_positive_int, default=defaults.keep_checkpoints, help="rounds of checkpoints to keep")
    add("--checkpoint-every", type=_non_negative_int, default=defaults.checkpoint_every,
        help="also write a checkpoint every this many rounds (0: by --checkpoint-seconds only)")
    add("--checkpoint-seconds", type=_non_negative_float, default=defaults.checkpoint_seconds,
        help="write a checkpoint once this many seconds have passed since the last, after the last round and on "
        "shutdown: a crash loses at most about this much work (a 45 MB model and its momentum cost about 0.1 s of "
        "leader CPU and the disk's fsync time; 0: every round)")
    add("--join-timeout", type=float, default=defaults.join_timeout, help="seconds to wait for --learners to register")
    add("--round-timeout", type=_non_negative_float, default=defaults.round_timeout,
        help="seconds a round waits for updates (0: fitted to the round: once the quorum has reported, the rest get "
        f"{STRAGGLER_GRACE_FACTOR:g} times the time that took, at least {STRAGGLER_GRACE_MIN_S:g} s; members that are "
        "gone are found by health checks)")
    add("--eval-every", type=_positive_int, default=defaults.eval_every,
        help="evaluate the global model on the test set every this many rounds (and after the last)")
    add("--recompute-bn", type=_non_negative_int, default=defaults.recompute_bn, metavar="IMAGES",
        help="after each round's averaging, recompute the global model's BatchNorm statistics from this many of the "
        "training images the leader holds (--data-mode split): the learners' averaged statistics do not describe "
        "averaged weights (0: keep the average)")
    add("--learner-lost-after", type=_positive_float, default=defaults.learner_lost_after,
        help="seconds a learner due to report may fail health checks before it is marked absent and the round goes on without it")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=defaults.deterministic,
        help="deterministic kernels on the learners and updates summed in learner order, so that a resumed run "
        "reproduces an uninterrupted one bit for bit; the leader holds every update of a round in memory")
    add("--stream-idle-timeout", type=_positive_float, default=defaults.stream_idle_timeout,
        help="seconds a stream may move no message before the leader cancels it, freeing its thread")
    add("--reflection", action=argparse.BooleanOptionalAction, default=defaults.reflection,
        help="serve gRPC reflection, so that grpcurl can list and describe the services without the .proto files")
    add("--compress", choices=compression.MODES, default=defaults.compress,
        help="how learners send updates: none (float32), fp16, int8 (per-tensor scale) or topk (--topk-ratio of each "
        "parameter tensor's entries, the rest carried to the next round: error feedback)")
    add("--topk-ratio", type=_fraction, default=defaults.topk_ratio, help="topk: share of each parameter tensor's entries sent")
    add("--max-update-norm", type=_non_negative_float, default=defaults.max_update_norm,
        help="refuse updates whose parameter L2 norm exceeds this (0: no fixed bound)")
    add("--max-norm-ratio", type=_non_negative_float, default=defaults.max_norm_ratio,
        help="scale down any update whose parameter L2 norm exceeds this many times the median of the last round's "
        "updates (before the first round: of the model's own norm), so that no single update can swamp a round (0: off)")
    add("--max-weight-ratio", type=_non_negative_float, default=defaults.max_weight_ratio,
        help="--data-mode local: an update weighs at most this many times the median example count the round's "
        "learners declared, so that no learner outweighs the rest by claiming more (0: trust the declared counts)")
    add("--resume", metavar="RUN_DIR", default=defaults.resume,
        help="continue the run in RUN_DIR from its last checkpoint, with its config (flags given here win, e.g. --rounds)")
    add("--token-file", default=None, help=f"file holding the enrolment secret learners must present to register (or set ${rpc.ENROLMENT_ENV}); None means anyone who reaches the port may join")
    add("--tls-cert", default=defaults.tls_cert, help="PEM certificate to serve TLS with (and to present when calling learners)")
    add("--tls-key", default=defaults.tls_key, help="PEM private key of --tls-cert")
    add("--tls-ca", default=defaults.tls_ca,
        help="PEM CA certificate that learners' certificates must chain to; also requires learners to present one (mutual TLS)")
    add("--tensorboard", action="store_true", help="also log metrics for TensorBoard under <run-dir>/tensorboard (needs: pip install tensorboard)")
    add("-q", "--quiet", action="store_true", help="no live status line; log warnings and errors only")
    add("-v", "--verbose", action="store_true", help="log debug detail")
    return parser


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def parse_config(argv: list[str] | None = None) -> tuple[LeaderConfig, bool, str | None]:
    """Parse the command line into a LeaderConfig, the verbose flag and the enrolment secret (kept out of the config)."""
    parser = build_parser()
    args = vars(parse_with_config(parser, expand_resume(parser, argv)))
    args.pop("config")
    verbose = args.pop("verbose")
    try:
        enrolment_token = rpc.read_enrolment_token(args.pop("token_file"))
    except ValueError as error:
        parser.error(str(error))
    try:
        config = resolve_paths(LeaderConfig(**args))
    except ValueError as error:
        parser.error(str(error))
    if config.min_learners > config.learners:
        parser.error(f"--min-learners {config.min_learners} exceeds --learners {config.learners}")
    for problem in config_problems(config):
        parser.error(problem)
    if config.dataset == "synthetic" and config.data_mode == "local":
        parser.error("--data-mode local needs real data on the learners: use --dataset cifar10 or imagefolder")
    return config, verbose, enrolment_token


def config_problems(config: LeaderConfig) -> list[str]:
    """Combinations of settings that cannot work, each as a message naming the flags."""
    problems = []
    per_round = config.sampled(config.learners)
    if config.aggregator in ("krum", "multi-krum") and per_round <= 2 * config.byzantine + 2:
        problems.append(f"--aggregator {config.aggregator} needs more than 2*f + 2 learners per round: "
                        f"{per_round} with --byzantine {config.byzantine}; add learners or lower --byzantine")
    if config.aggregator == "trimmed-mean" and not 0 <= config.trim < 0.5:
        problems.append(f"--trim must be in [0, 0.5), got {config.trim}")
    if config.dp_noise_multiplier and not config.clip_norm:
        problems.append("--dp-noise-multiplier needs --clip-norm: the noise is calibrated to the clipped norm")
    if config.dp_noise_multiplier and config.aggregator != "mean":
        problems.append("--dp-noise-multiplier works with --aggregator mean only (the accountant assumes a clipped sum)")
    if config.server_opt in server_opt.FEDOPT_MODES and config.server_momentum:
        problems.append(f"--server-opt {config.server_opt} takes its momentum from --server-beta1; leave --server-momentum at 0")
    if config.server_opt != "sgd" and config.server_lr <= 0:
        problems.append(f"--server-opt {config.server_opt} needs --server-lr > 0")
    if config.keep_momentum and config.aggregation != "fedavg":
        problems.append("--keep-momentum applies to fedavg's local SGD; in fedsgd the leader's optimizer keeps the momentum")
    if config.partition != "iid" and config.data_mode == "local":
        problems.append("--partition applies to the leader's split; with --data-mode local each learner brings its own data")
    if config.recompute_bn and config.data_mode == "local":
        problems.append("--recompute-bn needs training images on the leader; with --data-mode local it has none (use 0)")
    return problems


def expand_resume(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """`--resume RUN_DIR` reads RUN_DIR/config.json and writes into RUN_DIR; flags given after it still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run_dir = flag_value(argv, "--resume")
    if run_dir is None:
        return argv
    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        parser.error(f"--resume {run_dir}: no {CONFIG_FILE} there; pass the directory of a run that leader.py wrote")
    prefix = [] if flag_value(argv, "--config") else ["--config", str(config_file)]
    return [*prefix, "--run-dir", run_dir, *argv]


def resolve_paths(config: LeaderConfig) -> LeaderConfig:
    """Fill in the run directory (runs/<start time>) and the checkpoint directory inside it.

    A new run never writes into a directory that holds another run's results (a reused config.json names
    its run's directory): it gets the next free one beside it, <dir>-2, <dir>-3, ...; --resume continues one.
    """
    run_dir = config.run_dir or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    inside = config.checkpoint_dir is None or Path(config.checkpoint_dir) == Path(run_dir) / "checkpoints"
    if not config.resume:
        base, suffix = run_dir, 1
        while holds_results(Path(run_dir)):
            suffix += 1
            run_dir = f"{base}-{suffix}"
        if run_dir != base:
            logger.warning("%s holds another run's results; this run writes to %s (--resume %s continues that one)", base, run_dir, base)
        if not inside and checkpoint.latest(Path(config.checkpoint_dir)) is not None:
            raise ValueError(f"--checkpoint-dir {config.checkpoint_dir} holds another run's checkpoints: pass an empty "
                             f"directory, or --resume the run they belong to")
    checkpoint_dir = str(Path(run_dir) / "checkpoints") if inside else config.checkpoint_dir
    return dataclasses.replace(config, run_dir=run_dir, checkpoint_dir=checkpoint_dir)


def holds_results(run_dir: Path) -> bool:
    """Whether a directory holds a run's config, metrics or checkpoints."""
    return ((run_dir / CONFIG_FILE).exists() or (run_dir / METRICS_FILE).exists()
            or checkpoint.latest(run_dir / "checkpoints") is not None)


def serve(config: LeaderConfig, enrolment_token: str | None = None) -> tuple[Leader, grpc.Server, int, Any]:
    """Load data, build the leader and start its server; returns (leader, server, port, health)."""
    test_data = load_dataset(config.dataset, config.data_dir, train=False, seed=config.seed)
    train_data = load_dataset(config.dataset, config.data_dir, train=True, seed=config.seed) if config.data_mode == "split" else None
    tls = rpc.Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca)
    if tls is not None and not tls.serving:
        raise ValueError("--tls-ca on the leader needs --tls-cert and --tls-key too")
    leader = Leader(config, test_data, train_data, tls)
    leader.trusts_registrants = enrolment_token is not None or (tls is not None and tls.ca is not None)
    if checkpoint.remove_partial_writes(Path(config.checkpoint_dir)):
        logger.info("removed partly written checkpoint files left by an earlier run in %s", config.checkpoint_dir)
    if config.resume:
        latest = checkpoint.latest(Path(config.checkpoint_dir))
        if latest is None:
            raise ValueError(f"--resume {config.resume}: no checkpoint in {config.checkpoint_dir}; nothing to resume")
        finished = leader.restore(latest)
        if finished >= config.rounds:
            raise ValueError(f"--resume {config.resume}: the run already finished all {finished} rounds; pass --rounds N (N > {finished}) to go on")
    service = rpc.LEADER_SERVICE
    leader.limits = rpc.CallLimits(config.stream_idle_timeout, is_member=lambda token: leader.learner_for_token(token) is not None, stream_deadlines={
        # a stream may take as long as the peer's own deadline for it, and no longer
        f"/{service}/GetModel": rpc.transfer_timeout(leader.model_bytes),
        f"/{service}/AccumulateGradients": rpc.transfer_timeout(leader.update_bytes),
        f"/{service}/GetData": rpc.transfer_timeout(leader.largest_split_bytes()),
    })
    server, port, health = rpc.create_server(
        lambda server: leader_pb2_grpc.add_LeaderServiceServicer_to_server(LeaderServicer(leader), server),
        config.host,
        config.port,
        max_workers=max(16, 2 * config.learners + 8),
        reflection_services=[service] if config.reflection else None,
        gate=leader_gate(leader, enrolment_token),
        tls=tls,
        limits=leader.limits,
        request_deserializers={f"/{service}/AccumulateGradients": wire.chunk_deserializer(
            leader_pb2.GradientData, wire.first_message_limit(leader.update_specs))},
        response_serializers={f"/{service}/{method}": wire.serialize for method in ("GetModel", "GetData")},  # they yield frames
        health_services=[service],
    )
    return leader, server, port, health


def handle_shutdown_signals(leader: Leader, health: Any) -> Callable[[int, Any], None]:
    """On SIGTERM or SIGINT, say so, turn health NOT_SERVING at once and have the round loop wind down; returns the handler.

    The loop stops at its next check (within half a second; an evaluation stops at its next batch) and
    writes the last completed round; main() then tells the learners to stop and gives calls in flight a
    short grace period. A second Ctrl-C ends the process at once.
    """
    def on_signal(signum: int, frame: Any) -> None:
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # load balancers and probes see it at once
        leader.stop_event.set()
        leader.status.clear()
        logger.warning("%s: stopping after saving the last completed round; press Ctrl-C again to quit at once",
                       signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one raises KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return on_signal


def main(argv: list[str] | None = None) -> int:
    """Run a federation from the command line."""
    config, verbose, enrolment_token = parse_config(argv)
    run_dir = Path(config.run_dir)
    setup_logging("leader", verbose, config.quiet, run_dir / "leader.log")
    logger.info("config: %s", json.dumps(dataclasses.asdict(config), sort_keys=True))
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        leader, server, port, health = serve(config, enrolment_token)
        recorder = Recorder(run_dir, dataclasses.asdict(config), config.tensorboard, keep_rounds_before=leader.start_round)
        if leader.resumed_metrics is not None:
            recorder.ensure_recorded(leader.resumed_metrics)
    except (DataError, OSError, ValueError, TensorBoardMissing) as error:
        print(f"leader: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leader: interrupted while starting", file=sys.stderr)
        return 130
    if enrolment_token is None and config.tls_ca is None and not rpc.is_loopback(config.host):
        logger.warning(
            "listening on %s without an enrolment secret or client certificates: anyone who reaches port %d can join "
            "this federation; set $%s or --token-file, or use --tls-ca", config.host, port, rpc.ENROLMENT_ENV,
        )
    logger.info("serving on %s:%d; waiting for %d learners (python learner.py --leader HOST:%d)", config.host, port, config.learners, port)

    handle_shutdown_signals(leader, health)
    status = 0
    try:
        history = leader.run(recorder)
        if history:
            final = history[-1]
            logger.info("done: %d rounds, test accuracy %.2f%%; results in %s", len(history), 100 * final["test_accuracy"], run_dir)
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
