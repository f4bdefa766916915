"""Many virtual learners in one process: one LearnerService for all of them, one model, each round's model fetched once.

Every virtual learner registers, authenticates, trains and reports through the same RPCs and checks as a
learner.py process; only its state between rounds (ids, secrets, data, kept momentum, error feedback) lives
here instead of in a process of its own. It registers as pooled (LearnerInfo.pooled), so the leader starts
its rounds without pushing the model (ModelState.fetch) and the pool fetches each round's model with GetModel
once for all of its learners. Under fedbuff the leader starts each learner's training jobs the same way, and
each job's model is fetched by its own learner as its turn comes, since that fetch binds the job to the model
version it trains on. ray_engine.py runs such pools as Ray actors.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import random
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from fedgrpc import sharing
from fedgrpc.algorithms import secagg
from fedgrpc.data import resolve_device, synthetic_shard
from fedgrpc.learner.data import LeaderLost, LearnerError, check_data, check_model, fetch_split, layout_specs
from fedgrpc.learner.main import UpdateNotTaken, compress_for_plan, send_update
from fedgrpc.learner.personal import share_as_planned
from fedgrpc.learner.secagg_party import SecAggParty, masked_tensors, refuse
from fedgrpc.learner.service import callback_gate, serve_learner_service
from fedgrpc.learner.training import LocalTrainer
from fedgrpc.model import memory_format_for
from fedgrpc.protos import leader_pb2, learner_pb2, learner_pb2_grpc
from fedgrpc.task import Task, builtin_task, load_task
from fedgrpc.transport import rpc, wire
from fedgrpc.transport.tls import Tls

logger = logging.getLogger(__name__)

# Registrations in flight at once per pool: the leader admits a few calls without a session per host at a time
# (rpc.CallLimits) and refuses the rest as busy; more in flight only trades answers for refusals.
REGISTER_CONCURRENCY = 8
REGISTER_ATTEMPT_S = 10.0  # one registration; the leader calls the pool back (up to 3 s) before it answers
CALL_BACK_ATTEMPTS = 5  # registrations of one learner whose call-back failed (FAILED_PRECONDITION) before the pool gives up
REGISTER_RETRY_S = 0.2  # pause before retrying a busy refusal, drawn from 1-2x this so that pools do not retry in step
FULL_RETRY_S = 2.0  # pause before asking a full federation again
HEARTBEAT_INTERVAL_S = 5.0  # an idle pool checks this often that the leader still counts its learners as members
OUTBOX_SIZE = 2  # trained updates waiting to be sent
SENDER_EXIT_S = 4.0  # a send's retries pause 1 + 2 s (learner.send_update); then the sender is left to exit alone
POOL_SERVER_THREADS = 16  # the leader makes up to 32 calls at once (round starts, secure aggregation's stages), all to pools


@dataclass
class PoolConfig:
    """What a pool needs: where the leader is, where to serve, and how its learners get their data."""

    leader: str
    host: str = "127.0.0.1"  # where the pool's LearnerService listens
    advertise_host: str = "127.0.0.1"  # the host the leader calls the pool back at
    device: str = "cpu"
    threads: int = 1  # torch threads for training
    # 0: each learner is sent its split by the leader (GetData); K > 0: each makes K synthetic examples from its
    # index, for a leader run with --data-mode local --dataset synthetic
    examples_per_learner: int = 0
    connect_timeout: float = 600.0
    leader_lost_after: float = 30.0
    # simulated dropouts: each round each learner drops out with this probability (seeded by `seed`, its index and the
    # round), after the round's key stages under secure aggregation, and without training either way
    dropout: float = 0.0
    seed: int = 0
    task: str | None = None  # the leader's --task, a file every node holds; None: the leader's built-in model
    # the pool's TLS material, files every node holds at these paths (as learner.py's --tls-cert, --tls-key, --tls-ca)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None


@dataclass
class VirtualLearner:
    """One learner of a pool: its identity with the leader and what it keeps between rounds."""

    index: int  # its place in the simulation: 0 .. N-1, the seed of its synthetic data
    callback_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    learner_id: int = -1
    session_token: str = ""
    split_examples: int = 0
    trainer: LocalTrainer | None = None  # kept between rounds when it holds something worth keeping
    residual: dict[str, torch.Tensor] = field(default_factory=dict)  # topk's error feedback
    personal: dict[str, torch.Tensor] | None = None  # its personal part (--share), as its last round left it
    rounds_trained: int = 0
    session_of: str = ""  # the callback secret its session token was issued for (register)
    jobs_given: int = 0  # fedbuff: the jobs the leader started it on in all its sessions (the seed of its dropout draws)
    secagg: SecAggParty = field(default_factory=SecAggParty)  # its side of each round's secure aggregation
    # under secure aggregation, a trained update waiting for its round's third stage: (round, update, round's model,
    # examples, loss); sent once the leader says whom to mask against, else replaced by the learner's next round
    parked: tuple | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of this learner's calls to the leader."""
        return rpc.token_metadata(self.session_token)


class LearnerPool:
    """Hosts virtual learners `indices`: registers them, trains those the leader starts, one at a time, and reports their updates."""

    def __init__(self, config: PoolConfig, indices: list[int], enrolment_token: str | None = None, tls: Tls | None = None) -> None:
        self.config = config
        self.tls = tls
        self._enrolment_metadata = ((rpc.ENROLMENT_METADATA_KEY, enrolment_token),) if enrolment_token else ()
        self.device = resolve_device(config.device)
        self.user_task = load_task(config.task) if config.task else None  # None: a built-in one, made from the first plan
        self.task: Task | None = None  # what the pool trains, once the first plan came
        # the user's model is built now, so that registration can name its manifest's digest, and kept to train
        self._task_model = self.user_task.model() if self.user_task is not None else None
        self._task_fingerprint = wire.fingerprint(wire.specs_of(self._task_model.state_dict())) if self._task_model is not None else ""
        self.split_layout: list[wire.TensorSpec] = []  # what GetData streams (the same for every learner of a leader)
        self.learners = [VirtualLearner(index) for index in indices]
        self.channel = rpc.channel(config.leader, tls)
        self.stub = rpc.leader_stub(self.channel, self._first_message_limit)
        self.plan: leader_pb2.TrainingPlan | None = None
        self.model: torch.nn.Module | None = None
        self.shared: Any = None  # the model's shared part (sharing.part): what is received and reported
        self.personal_names: list[str] = []
        self._fresh_personal: dict[str, torch.Tensor] = {}  # a learner's personal part before its first round
        self.specs: list[wire.TensorSpec] | None = None
        self.memory_format = torch.contiguous_format
        self._lock = threading.Lock()
        self._by_token: dict[str, VirtualLearner] = {}  # callback secret -> learner, for the gate and the handlers
        self._registered = threading.Condition(self._lock)  # a registration's answer came (VirtualLearner.session_of)
        # (learner, round or fedbuff job, the callback secret it was started under) to train; None: stop
        self._jobs: queue.Queue[tuple[VirtualLearner, int, str] | None] = queue.Queue()
        self.models: PoolModels | None = None  # where each round's or job's model comes from, once the plan came
        self._stop_reason: str | None = None
        self._stopped = threading.Event()
        self.done = threading.Event()  # set once the pool has stopped serving (run_pool)
        self._registering = ThreadPoolExecutor(max_workers=REGISTER_CONCURRENCY, thread_name_prefix="pool-register")
        # updates waiting for the sender thread; bounded, so that a slow leader holds up training rather than memory
        self._outbox: queue.Queue[tuple | None] = queue.Queue(maxsize=OUTBOX_SIZE)
        self._masks: secagg.MaskGenerator | None = None  # the sender's, kept: fresh megabytes cost page faults every update
        self._sender = threading.Thread(target=self._send_updates, name="pool-send", daemon=True)
        self._sender.start()
        self.server, self.port, _ = create_server(self, config.host, 0, tls)
        self.address = f"{config.advertise_host}:{self.port}"

    # ---- calls from the leader (through PoolServicer) ------------------------------------------------------------

    def learner_for(self, callback_token: str | None) -> VirtualLearner | None:
        """The learner a call's callback secret belongs to."""
        if callback_token is None:
            return None
        with self._lock:
            learner = self._by_token.get(callback_token)
        return learner if learner is not None and rpc.secrets_match(callback_token, learner.callback_token) else None

    def start_round(self, learner: VirtualLearner, round_number: int, callback_token: str) -> None:
        """Queue a learner's round (under fedbuff, its job) started under `callback_token`; the worker trains them one after another."""
        self._jobs.put((learner, round_number, callback_token))

    def stop(self, reason: str) -> None:
        """End the pool: the leader told one of its learners to stop, and they share this process."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason or "told to stop"
        self._stopped.set()
        self._jobs.put(None)  # wakes the worker

    @property
    def stop_reason(self) -> str | None:
        """Why the pool stopped, once it did."""
        with self._lock:
            return self._stop_reason

    # ---- registration -----------------------------------------------------------------------------------------

    def register_all(self) -> None:
        """Register every learner of the pool, a few at a time; raises the first failure that retrying cannot mend."""
        for outcome in self._registering.map(self.register, self.learners):
            del outcome  # map re-raises a failed registration here

    def register(self, learner: VirtualLearner) -> None:
        """Register one learner (again, with a fresh secret, after its session ended), retrying while the leader is busy or full."""
        with self._lock:
            self._by_token.pop(learner.callback_token, None)
            learner.callback_token = secrets.token_urlsafe(32)
            self._by_token[learner.callback_token] = learner
        info = leader_pb2.LearnerInfo(
            network_addr=self.address,
            callback_token=learner.callback_token,
            num_examples=self.config.examples_per_learner,
            version=rpc.PROTOCOL_VERSION,
            tls=self.tls is not None and self.tls.serving,
            pooled=True,
            task=self.user_task.name if self.user_task is not None else "",
            model_fingerprint=self._task_fingerprint,
        )
        deadline = time.monotonic() + self.config.connect_timeout
        call_backs_failed = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopped.is_set():
                raise LearnerError(f"learner {learner.index} could not register with the leader at {self.config.leader}")
            try:
                reply = self.stub.RegisterLearner(
                    info, timeout=min(REGISTER_ATTEMPT_S, remaining), wait_for_ready=True, metadata=self._enrolment_metadata
                )
                break
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy, or full until a slot frees
                    pause = FULL_RETRY_S if "full" in (error.details() or "") else REGISTER_RETRY_S
                    self._stopped.wait(min(remaining, pause * (1 + random.random())))
                    continue
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION and call_backs_failed < CALL_BACK_ATTEMPTS - 1:
                    # The pool's own server is up, so a call-back that failed most likely timed out on a busy machine;
                    # a leader that cannot reach this node at all still fails every attempt, and the pool stops.
                    call_backs_failed += 1
                    self._stopped.wait(min(remaining, REGISTER_RETRY_S * (1 + random.random())))
                    continue
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise LearnerError(f"the leader refused registration: {error.details()}") from None
        with self._registered:
            if learner.learner_id != reply.learner_id:
                learner.trainer = None  # another slot: another split, and its own seeds
                learner.personal = None  # trained on the other split
            learner.secagg = SecAggParty()  # a new session: a restarted leader may count rounds from an earlier one
            learner.parked = None
            learner.learner_id = reply.learner_id
            learner.session_token = reply.session_token
            learner.session_of = info.callback_token
            self._registered.notify_all()
            learner.split_examples = reply.split_examples
            self.split_layout = layout_specs(reply.split_layout)
            if self.plan is None:
                self._prepare(reply.plan)

    def _prepare(self, plan: leader_pb2.TrainingPlan) -> None:
        """Build the pool's one model from the first registration's plan (under the lock)."""
        if plan.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.task = self.user_task or builtin_task(plan.model, plan.dataset, plan.num_classes, plan.seed)
        memory_format = memory_format_for("auto", plan.model, self.device)
        model = (self._task_model if self._task_model is not None else self.task.model()).to(self.device, memory_format=memory_format)
        check_model(wire.specs_of(model.state_dict()), plan)
        self.shared, self.personal_names, specs = share_as_planned(model, plan, self.task)
        self._fresh_personal = sharing.personal_state(model, self.personal_names)
        self.plan, self.model, self.specs, self.memory_format = plan, model, specs, memory_format
        self.models = PoolModels(self.stub, specs, plan.model, per_job=plan.aggregation == "fedbuff")
        if self.task.builtin:  # a user's task's data is not known before the first split arrives
            warm = functools.partial(warm_up, plan, self.task, self.device, memory_format)
            threading.Thread(target=warm, name="pool-warm-up", daemon=True).start()

    def _first_message_limit(self) -> int:
        """Most bytes the first message of a stream from the leader may take (wire.first_message_limit)."""
        if self.specs is not None:
            return wire.first_message_limit(self.specs)
        return wire.first_message_limit([])

    # ---- the pool's work --------------------------------------------------------------------------------------

    def run(self) -> str:
        """Register every learner, then train the rounds the leader starts until told to stop; returns the reason.

        Raises LeaderLost when the leader stops answering for --leader-lost-after.
        """
        self.register_all()
        logger.info("pool at %s: %d learners registered", self.address, len(self.learners))
        silent_since: float | None = None
        while not self._stopped.is_set():
            try:
                job = self._jobs.get(timeout=min(HEARTBEAT_INTERVAL_S, self.config.leader_lost_after / 3))
            except queue.Empty:
                now = time.monotonic()
                silent_since = None if self._leader_answers() else (silent_since or now)
                if silent_since is not None and now - silent_since >= self.config.leader_lost_after:
                    raise LeaderLost(f"lost the leader at {self.config.leader}") from None
                continue
            silent_since = None
            if job is not None:
                self._train_and_send(*job)
        return self.stop_reason or "told to stop"

    def _leader_answers(self) -> bool:
        """Whether the leader answers a heartbeat from one of the pool's learners."""
        learner = self.learners[0]
        try:
            self.stub.Heartbeat(
                leader_pb2.HeartbeatRequest(learner_id=learner.learner_id), timeout=HEARTBEAT_INTERVAL_S, metadata=learner.metadata()
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._registering.submit(self._register_again, learner)
                return True  # the leader answered; it no longer counts this learner
            return False
        return True

    def _register_again(self, learner: VirtualLearner) -> None:
        """Register a learner whose session ended (marked absent), so that it takes part again."""
        try:
            self.register(learner)
        except LearnerError as error:
            logger.warning("learner %d: %s", learner.index, error)

    def drops_out(self, learner: VirtualLearner, round_number: int) -> bool:
        """Whether a learner drops out of a round, or under fedbuff of its latest job (simulated dropouts, PoolConfig.dropout)."""
        # a job's number starts again at 1 in each session: drawn by it, a learner that dropped out would again and again
        turn = learner.jobs_given if self.models.per_job else round_number
        draw = random.Random(f"dropout-{self.config.seed}-{learner.index}-{turn}").random()
        return draw < self.config.dropout

    def drop_out(self, learner: VirtualLearner) -> None:
        """A learner dropped out: the leader marks it absent as its call fails, and it registers again."""
        self._registering.submit(self._register_again, learner)

    def _train_and_send(self, learner: VirtualLearner, round_number: int, callback_token: str) -> None:
        """Train one learner's round (under fedbuff, its job) on its model and hand its update to the sender; a failed
        call loses that update only."""
        if self.plan.secure_aggregation and self.config.dropout and self.drops_out(learner, round_number):
            return  # after its key stages; without secure aggregation it failed the round's start instead
        if not self._in_session(learner, callback_token):
            return  # started in a session that has ended since: the leader forgot that work with it
        try:
            state = self.models.for_work(learner, round_number)
            if state is None:
                return  # the round (or job) ended before this learner's turn: the leader has moved on
            trainer = self._trainer_for(learner)
            self.shared.load_state_dict(state)
            if self.personal_names:  # the pool's one model takes this learner's own part, and gives it back after
                self.model.load_state_dict(learner.personal or self._fresh_personal, strict=False)
            update, num_examples, loss = trainer.train(round_number)
            if self.personal_names:
                learner.personal = sharing.personal_state(self.model, self.personal_names)
            if not (self.plan.keep_momentum and self.plan.momentum) and self.config.examples_per_learner:
                learner.trainer = None  # nothing kept: synthetic data is made again faster than it is stored
            if self.plan.secure_aggregation:  # copied: the model's buffers change with the next learner
                with self._lock:
                    learner.parked = (round_number, {name: tensor.clone() for name, tensor in update.items()}, state, num_examples, loss)
                self.offer_secure(learner)
                return
            manifest, payload = wire.encode(compress_for_plan(update, self.plan, self.shared, learner.residual))
            # sent while the next learner trains: the leader's answer takes a few ms that the worker need not wait
            self._outbox.put((learner, round_number, manifest, payload, num_examples, loss))
        except grpc.RpcError as error:
            self._call_failed(learner, round_number, error)
        except LearnerError as error:  # a malformed model or split from the leader: this round's update is lost
            logger.error("learner %d, round %d: %s", learner.index, round_number, error)

    def _in_session(self, learner: VirtualLearner, callback_token: str) -> bool:
        """Whether work started under `callback_token` is the learner's now, once its registration's answer is in (a
        fedbuff job can come before the answer to the registration that earned it)."""
        with self._registered:
            self._registered.wait_for(
                lambda: learner.callback_token != callback_token or learner.session_of == callback_token, timeout=REGISTER_ATTEMPT_S
            )
            return learner.callback_token == callback_token == learner.session_of

    def offer_secure_later(self, learner: VirtualLearner) -> None:
        """offer_secure on another thread: a stage call must not wait for room in the outbox."""
        self._registering.submit(self.offer_secure, learner)

    def offer_secure(self, learner: VirtualLearner) -> None:
        """Hand a parked update to the sender once its round's third stage has come (from the worker or the stage call)."""
        with self._lock:
            parked = learner.parked
            if parked is None or learner.secagg.reached(parked[0], collected=True) is None:
                return
            learner.parked = None
        round_number, update, state, num_examples, loss = parked
        self._outbox.put((learner, round_number, None, (update, state), num_examples, loss))

    def _call_failed(self, learner: VirtualLearner, round_number: int, error: grpc.RpcError) -> None:
        """A call for one learner failed: register it again if its session ended, else note the lost update."""
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:  # marked absent, or its slot given away
            self._registering.submit(self._register_again, learner)
        elif not self._stopped.is_set():
            logger.warning("learner %d, round %d: %s: %s", learner.index, round_number, error.code().name, error.details())

    def _send_updates(self) -> None:
        """The sender thread: sends queued updates in order until the pool stops."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            learner, round_number, *update = item
            try:
                self._send(learner, round_number, *update)
                learner.rounds_trained += 1
            except grpc.RpcError as error:
                self._call_failed(learner, round_number, error)

    def _trainer_for(self, learner: VirtualLearner) -> LocalTrainer:
        """A learner's trainer over its data, made on its first round (and kept while it holds momentum or a fetched split)."""
        if learner.trainer is not None:
            return learner.trainer
        if self.config.examples_per_learner:
            data = synthetic_shard(self.config.examples_per_learner, self.plan.seed, learner.index)
        else:
            data, _ = fetch_split(self.stub, learner.learner_id, learner.split_examples, self.split_layout, self.plan, learner.metadata())
        check_data(data, self.plan)
        learner.trainer = LocalTrainer(
            self.plan,
            learner.learner_id,
            self.model,
            self.model,
            self.task,
            tuple(tensor.to(self.device) for tensor in data.tensors),
            self.memory_format,
            progress=False,
            shared=self.shared,
        )
        return learner.trainer

    def _send(self, learner: VirtualLearner, round_number: int, manifest: Any, payload: Any, num_examples: int, loss: float) -> None:
        """AccumulateGradients for one learner; a stale round is dropped, a busy or late answer retried.

        Under secure aggregation `manifest` is None and `payload` holds the update and its round's model: it is encoded
        and masked here, on the sender thread, while the worker trains the next learner.
        """
        if manifest is None:
            current = learner.secagg.reached(round_number, collected=True)
            if current is None:
                return  # a later round has begun: the leader closed this one without it
            update, state = payload
            parameters = [name for name, _ in self.shared.named_parameters()]
            vector = learner.secagg.encode(current, update, state, parameters, num_examples)
            if self._masks is None or self._masks.length != vector.size:
                self._masks = secagg.MaskGenerator(vector.size)
            manifest, payload = wire.encode(masked_tensors(current, vector, self._masks))
        header = {"learner_id": learner.learner_id, "round": round_number, "num_examples": num_examples, "train_loss": loss}
        try:
            send_update(self.stub, manifest, payload, header, learner.metadata(), lambda error, pause: self._stopped.wait(pause))
        except UpdateNotTaken as refusal:  # the round closed without it
            logger.info("learner %d, round %d: update not taken: %s", learner.index, round_number, refusal)

    def close(self) -> None:
        """Stop serving and close the channel to the leader."""
        self._stopped.set()
        self._outbox.put(None)
        self._sender.join(timeout=SENDER_EXIT_S)
        self._registering.shutdown(wait=False, cancel_futures=True)
        self.server.stop(grace=1).wait()
        self.channel.close()


class PoolServicer(learner_pb2_grpc.LearnerServiceServicer):
    """The pool's gRPC boundary: the callback secret each call carries says which of its learners it is for."""

    def __init__(self, pool: LearnerPool) -> None:
        self.pool = pool

    def _learner(self, context: grpc.ServicerContext) -> VirtualLearner:
        learner = self.pool.learner_for(rpc.caller_token(context))
        if learner is None:  # the gate lets no such call through; kept for calls made without it
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "token does not belong to a learner of this pool")
        return learner

    def StartTraining(self, request: learner_pb2.Empty, context: grpc.ServicerContext) -> learner_pb2.Ack:
        self._learner(context)
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, "a pooled learner's rounds and jobs start with SyncModelState (fetch), which names them"
        )

    def SyncModelState(self, request_iterator: Iterator[learner_pb2.ModelState], context: grpc.ServicerContext) -> learner_pb2.Ack:
        learner = self._learner(context)
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty model state stream")
        if first.stop:
            self.pool.stop(first.reason)
            return learner_pb2.Ack(success=True, message="stopping")
        if first.round < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"round must be positive, got {first.round}")
        if not first.fetch:  # a pushed model: the pool takes each round's model from GetModel, so only the round is read
            for _ in itertools.chain([first], request_iterator):
                pass
        if self.pool.models.per_job:
            learner.jobs_given += 1
        if not self.pool.plan.secure_aggregation and self.pool.config.dropout and self.pool.drops_out(learner, first.round):
            self._drop_out(learner, context)
        self.pool.start_round(learner, first.round, rpc.caller_token(context))
        return learner_pb2.Ack(success=True, message=f"{'job' if self.pool.models.per_job else 'round'} {first.round} queued")

    def _drop_out(self, learner: VirtualLearner, context: grpc.ServicerContext) -> None:
        """Fail the leader's call as a learner that is gone would, and have it register again."""
        self.pool.drop_out(learner)
        context.abort(grpc.StatusCode.UNAVAILABLE, "simulated dropout")

    def AdvertiseKeys(self, request: learner_pb2.SecAggSetup, context: grpc.ServicerContext) -> learner_pb2.SecAggPublicKeys:
        learner = self._learner(context)
        return refuse(context, lambda: learner.secagg.advertise_keys(request, learner.learner_id))

    def ShareKeys(self, request: learner_pb2.SecAggNeighbourKeys, context: grpc.ServicerContext) -> learner_pb2.SecAggShares:
        learner = self._learner(context)
        return refuse(context, lambda: learner.secagg.share_keys(request))

    def CollectMasked(self, request: learner_pb2.SecAggCollection, context: grpc.ServicerContext) -> learner_pb2.Ack:
        learner = self._learner(context)
        if self.pool.config.dropout and self.pool.drops_out(learner, request.round):  # after sharing its keys: the costly case
            self._drop_out(learner, context)
        reply = refuse(context, lambda: learner.secagg.collect(request))
        self.pool.offer_secure_later(learner)  # its update may be trained already
        return reply

    def Unmask(self, request: learner_pb2.SecAggUnmaskRequest, context: grpc.ServicerContext) -> learner_pb2.SecAggRevealedShares:
        learner = self._learner(context)
        return refuse(context, lambda: learner.secagg.unmask(request))


def warm_up(plan: leader_pb2.TrainingPlan, task: Task, device: torch.device, memory_format: torch.memory_format) -> None:
    """Train a throwaway copy of the model for one round while the pool's learners register.

    A process's first training step costs far more than later ones (PyTorch picks and builds its convolution
    kernels); paid here, it stays out of round 1.
    """
    warm_plan = leader_pb2.TrainingPlan()
    warm_plan.CopyFrom(plan)
    warm_plan.local_steps = 1
    model = task.model().to(device, memory_format=memory_format)
    data = synthetic_shard(max(2, plan.batch_size), plan.seed, -1)
    tensors = (data.images.to(device), (data.labels % plan.num_classes).to(device))
    trainer = LocalTrainer(warm_plan, -1, model, model, task, tensors, memory_format, False)
    try:
        trainer.train(1)
    except RuntimeError as error:  # the real round will meet it too, and say so
        logger.debug("warm-up failed: %s", error)


class PoolModels:
    """The global model each round or job of a pool's learners trains on, fetched with GetModel.

    A round's model is fetched once for all of the pool's learners. Under fedbuff a learner's job is bound to the model
    version its own fetch returns (the leader numbers the model with the job), so each job's model is fetched by its
    learner as its turn comes: on the newest model, and nothing kept for the learners still waiting.
    """

    def __init__(self, stub: Any, specs: list[wire.TensorSpec], model_name: str, per_job: bool) -> None:
        self.stub = stub
        self.specs = specs
        self.model_name = model_name
        self.per_job = per_job
        self._round = 0  # the round of the model in self._state
        self._state: dict[str, torch.Tensor] | None = None

    def for_work(self, learner: VirtualLearner, number: int) -> dict[str, torch.Tensor] | None:
        """The model of `learner`'s round (under fedbuff, its job) `number`; None when the leader has moved past it."""
        if self.per_job:
            fetched, state = self._fetch(learner)
            return state if fetched == number else None
        if self._round != number:
            self._round, self._state = self._fetch(learner)
        return self._state if self._round == number else None

    def _fetch(self, learner: VirtualLearner) -> tuple[int, dict[str, torch.Tensor]]:
        """GetModel with `learner`'s session: the round (or job) the leader numbers the model with, and its tensors."""
        model_bytes = wire.payload_bytes(self.specs)
        responses = self.stub.GetModel(leader_pb2.Empty(), timeout=rpc.transfer_timeout(model_bytes), metadata=learner.metadata())
        try:
            received = wire.receive(responses, max_bytes=model_bytes, expected=self.specs)
        except wire.WireError as error:
            raise LearnerError(f"the leader's model does not fit this pool's {self.model_name}: {error}") from None
        return received.header.round, received.tensors


def create_server(pool: LearnerPool, host: str, port: int, tls: Tls | None = None) -> tuple[grpc.Server, int, Any]:
    """Start the pool's LearnerService on host:port, open only to the leader holding one of its learners' secrets."""

    def owns(token: str) -> bool:
        return pool.learner_for(token) is not None

    gate = callback_gate(owns, "token does not belong to a learner of this pool")
    return serve_learner_service(PoolServicer(pool), gate, owns, pool._first_message_limit, host, port, tls, threads=POOL_SERVER_THREADS)


def run_pool(config: PoolConfig, indices: list[int], enrolment_token: str | None = None, threads: int | None = None) -> LearnerPool:
    """Start a pool serving learners `indices` and run it on a thread of its own; returns the pool (its `done` event ends with it)."""
    if threads:
        torch.set_num_threads(threads)
    pool = LearnerPool(config, indices, enrolment_token, Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca))

    def work() -> None:
        try:
            reason = pool.run()
            logger.info("pool at %s stopping: %s", pool.address, reason)
        except (LearnerError, grpc.RpcError) as error:
            logger.error("pool at %s: %s", pool.address, error)
        finally:
            pool.close()
            pool.done.set()

    threading.Thread(target=work, name="pool", daemon=True).start()
    return pool
