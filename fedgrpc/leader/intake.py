"""One round's intake: each update received, checked, bounded and summed, every buffer with one owner at a time."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from fedgrpc.algorithms import aggregation, fedbuff
from fedgrpc.algorithms.secagg import MASKED_TENSOR
from fedgrpc.config.options import LeaderConfig
from fedgrpc.leader.roster import LearnerRecord, Roster
from fedgrpc.leader.secure_rounds import SecureRound
from fedgrpc.protos import leader_pb2
from fedgrpc.transport import compression, rpc, wire

UPDATE_BUFFERS_KEPT = 2  # update buffers kept for reuse between uploads: about as many as arrive at once on 2 cores
# accepted updates waiting for the summing thread; each holds its buffer, so the queue is bounded (a full one holds
# up the next acknowledgement) and leader memory stays flat however many learners report at once
MAX_PENDING_SUMS = 2
SUM_SLOT_TIMEOUT_S = 60.0  # one sum takes tens of ms for ResNet-18; a minute without a free slot means a stuck leader
# Left of a call's deadline when its wait for a summing slot gives up: enough to send the refusal, so that a learner
# never times out on an update the leader then takes.
REPLY_MARGIN_S = 0.25


@dataclass
class RoundState:
    """Updates received in the round now open."""

    round_number: int
    accepting: bool = True
    opened_at: float = field(default_factory=time.monotonic)
    # each member's record as the round opened: a learner that joins mid-round, even into a freed slot, waits for the next
    member_records: dict[int, LearnerRecord] = field(default_factory=dict)
    quorum: int = 1  # updates the round needs
    norm_bound: float = math.inf  # an update's parameter norm is scaled down to this (--max-norm-ratio)
    max_weight: float = math.inf  # the most weight one update's examples give it (--max-weight-ratio)
    running: aggregation.RunningMean | aggregation.UpdateList = field(default_factory=aggregation.RunningMean)
    secure: SecureRound | None = None  # under --secure-aggregation: the round's stages and its sum of masked updates
    sums: list[Future] = field(default_factory=list)  # accepted updates' additions to `running`, done or pending
    # learner id (fedbuff: (learner id, job number)) -> its accepted update's digest
    digests: dict[int | tuple[int, int], tuple[float, ...] | bytes] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    update_norms: list[float] = field(default_factory=list)
    rejected: dict[int, int] = field(default_factory=dict)  # learner id -> refused updates this round
    clipped: int = 0  # updates scaled down to norm_bound
    lost: dict[int, str] = field(default_factory=dict)  # member id -> why it was marked absent during the round
    bytes_in: int = 0
    bytes_out: int = 0
    # fedbuff: each accepted update's staleness (aggregations its model lags behind this one), updates refused as too
    # stale, and the updates' summed weights before and after their staleness discount
    staleness: list[int] = field(default_factory=list)
    stale: int = 0
    example_weight: float = 0.0
    discounted_weight: float = 0.0

    @property
    def members(self) -> frozenset[int]:
        """Ids of the learners taking part."""
        return frozenset(self.member_records)

    @property
    def reported(self) -> int:
        """Updates accepted so far (answered, though perhaps not yet summed)."""
        return len(self.digests)

    @property
    def staleness_discount(self) -> float:
        """fedbuff: the updates' summed weights after their staleness discount over those before it (1 in synchronous rounds):
        what turns the buffer's weighted mean into FedBuff's discounted sum over the updates' own weights."""
        return self.discounted_weight / self.example_weight if self.example_weight else 1.0

    def summed(self) -> aggregation.RunningMean | aggregation.UpdateList:
        """The running sum (or kept updates) once every accepted update is in it; raises what adding one raised."""
        for pending in list(self.sums):
            pending.result()
        return self.running


class Intake:
    """Takes the open round's updates: checks each against the model and the round, bounds it, and sums it behind the answer.

    A learner is answered once its update is checked; the float64 sum (tens of ms for ResNet-18) runs on one
    summing thread behind it. Shares the leader's lock (`cond`), which guards `round`.
    """

    def __init__(
        self,
        config: LeaderConfig,
        specs: list[wire.TensorSpec],
        parameter_names: list[str],
        variance_names: list[str],
        roster: Roster,
        cond: threading.Condition,
    ) -> None:
        self.config = config
        self.specs = specs
        self.parameter_names = parameter_names
        self.variance_names = variance_names
        self.roster = roster
        self._cond = cond
        # what an update looks like on the wire (under --compression, or masked), checked before any of its bytes are read
        if config.secure_aggregation:
            masked_length = sum(spec.numel for spec in specs if wire.DTYPES[spec.dtype].is_floating_point) + 1
            self.update_specs = [wire.TensorSpec(MASKED_TENSOR, "int32", (masked_length,))]
        else:
            self.update_specs = compression.wire_specs(specs, config.compression, config.topk_ratio, sparse_names=parameter_names)
        self.update_bytes = wire.payload_bytes(self.update_specs)
        # updates are summed as they arrive unless a rule needs them all at once (median, Krum, --deterministic);
        # a summed or refused update's buffer is free again, and a kept one saves the page faults of a fresh one
        # (a masked sum is exact integer arithmetic: its order never matters)
        self.keeps_updates = (config.rule != "mean" or config.deterministic) and not config.secure_aggregation
        self.buffers = wire.BufferPool(self.update_bytes, keep=UPDATE_BUFFERS_KEPT)
        self.round = RoundState(0, accepting=False)
        # fedbuff: who trains on which version; the buffers filled and waiting for the leader to apply them, by round
        self.jobs = fedbuff.Jobs(config.training_slots(), config.staleness_limit()) if config.aggregation == "fedbuff" else None
        self.filled: dict[int, RoundState] = {}
        self._running = aggregation.RunningMean()  # one float64 sum for every round, reset rather than reallocated
        self._summing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-sum")
        self._sum_slots = threading.BoundedSemaphore(MAX_PENDING_SUMS)

    def open(
        self,
        round_number: int,
        members: list[LearnerRecord],
        quorum: int,
        norm_bound: float = math.inf,
        max_weight: float = math.inf,
        secure: SecureRound | None = None,
    ) -> RoundState:
        """Start taking round `round_number`'s updates from `members` (under the lock: the last round's sums are over first)."""
        with self._cond:
            futures.wait(self.round.sums)  # the sum is reset below: the last round's additions must be over
            self.round = RoundState(
                round_number,
                member_records={record.learner_id: record for record in members},
                quorum=quorum,
                running=self._fresh_sum(),
                norm_bound=norm_bound,
                max_weight=max_weight,
                secure=secure,
            )
            self._cond.notify_all()
            return self.round

    def _fresh_sum(self) -> aggregation.RunningMean | aggregation.UpdateList:
        """An empty sum for a new round (under the lock): the one float64 sum reused, or in fedbuff a new one (the filled
        buffer before it may not be applied yet)."""
        if self.keeps_updates:
            return aggregation.UpdateList()
        return aggregation.RunningMean() if self.jobs is not None else self._running.reset()

    def _buffer_filled(self, full: RoundState) -> None:
        """fedbuff (under the lock): a buffer has its updates; keep it for the leader and open the next at once."""
        full.accepting = False
        self.filled[full.round_number] = full
        self.round = RoundState(
            full.round_number + 1, quorum=full.quorum, running=self._fresh_sum(), norm_bound=full.norm_bound, max_weight=full.max_weight
        )
        self._cond.notify_all()

    def max_examples(self, registered: int) -> int:
        """Most examples one update can stand for, so that no learner outweighs the rest by claiming more."""
        config = self.config
        if config.aggregation == "fedsgd":
            return min(config.batch_size, registered)
        if config.local_steps:
            return config.local_steps * config.batch_size
        return registered * config.local_epochs

    def check_header(self, learner_id: int, header: leader_pb2.GradientData) -> None:
        """Refuse an update early, before its bytes are read, when its header is wrong."""
        if header.learner_id != learner_id:
            raise rpc.RequestRefused(
                grpc.StatusCode.PERMISSION_DENIED, f"session belongs to learner {learner_id}, update claims learner {header.learner_id}"
            )
        record = self.roster.record(learner_id)
        with self._cond:
            current = self.round
        if not record.alive:
            raise rpc.RequestRefused(
                grpc.StatusCode.FAILED_PRECONDITION, f"learner {learner_id} was marked absent; register again to take part"
            )
        if self.jobs is not None:
            with self._cond:
                self._check_job(self.round, learner_id, header.round)
        elif header.round == current.round_number and current.member_records.get(learner_id) is not record:
            raise rpc.RequestRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"learner {learner_id} joined during round {current.round_number} and takes part from round {record.joins_round}",
            )
        elif header.round != current.round_number or not current.accepting:
            raise rpc.RequestRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale update for round {header.round}; the leader is "
                + (
                    f"collecting round {current.round_number}"
                    if current.accepting
                    else f"not collecting (round {current.round_number} closed)"
                ),
            )
        limit = self.max_examples(record.num_examples)
        if not 0 < header.num_examples <= limit:
            raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"num_examples must be in 1..{limit}, got {header.num_examples}")
        if not math.isfinite(header.train_loss):
            raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "train_loss is not finite")

    def _check_job(self, current: RoundState, learner_id: int, number: int, digest: object = None) -> tuple[str | None, int]:
        """fedbuff (under the lock): refuse an update that is not for the learner's job or is too stale (counted); with its
        digest, take it: (None, its staleness), or (the answer to an identical retry, 0)."""
        try:
            if digest is None:
                return None, self.jobs.check(learner_id, number, current.round_number) or 0
            return self.jobs.finish(learner_id, number, digest, current.round_number)
        except fedbuff.StaleUpdate:
            current.stale += 1
            raise

    def unpack(self, received: wire.Received) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """A received update as the model's dense tensors (decompressed under --compression), with the norms known so far."""
        if self.config.compression == "none":
            return received.tensors, received.norms
        try:
            return compression.decompress(received.tensors, self.specs, self.config.compression), {}
        except ValueError as error:
            raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"update refused: {error}") from None

    def accept(
        self,
        learner_id: int,
        header: leader_pb2.GradientData,
        tensors: dict[str, torch.Tensor],
        known_norms: dict[str, float] | None = None,
        release: Callable[[], None] | None = None,
        time_left: float | None = None,
        unweighted: bool = False,
    ) -> str:
        """Check an update and queue it for the round's running sum, once per learner per round.

        The answer comes once the update is checked; the sum runs behind it, and the round waits for it
        (`RoundState.summed`). `release` is called once nothing reads `tensors` any more: after the sum, or
        at once when the update is refused or a duplicate. `time_left` is the call's remaining time: a
        wait for a summing slot that would outlast it is refused instead (RESOURCE_EXHAUSTED, not taken).
        `unweighted` gives every update weight 1 (DP-FedAvg: one learner's influence is bounded by the clip alone).
        """
        if self.config.secure_aggregation:
            return self._accept_masked(learner_id, header, tensors[MASKED_TENSOR], release)
        known_norms = known_norms or {}
        holds_slot = queued = False
        try:
            # per-tensor norms stand in for a hash of the bytes: they tell an identical retry from a different update
            # (a different one that matched them would only be answered "duplicate"; neither is ever counted twice)
            norms = {
                spec.name: known_norms[spec.name] if spec.name in known_norms else tensor_norm(tensors[spec.name]) for spec in self.specs
            }
            digest = (*norms.values(), float(header.num_examples), header.train_loss)  # by name: a sender picks the order
            for name in self.variance_names:
                if bool((tensors[name] < 0).any()):
                    raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{name} holds negative variances")
            norm = math.sqrt(sum(norms[name] ** 2 for name in self.parameter_names))
            bound = self.config.max_update_norm
            if bound and norm > bound:
                raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"update norm {norm:.4g} exceeds --max-update-norm {bound:g}")
            if not math.isfinite(norm):  # finite values whose squares overflow even float64
                raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"update norm {norm} is not finite")
            # outside the lock: a wait for the summing thread must not hold up other calls
            wait = SUM_SLOT_TIMEOUT_S if time_left is None else max(0.0, min(SUM_SLOT_TIMEOUT_S, time_left - REPLY_MARGIN_S))
            holds_slot = self._sum_slots.acquire(timeout=wait)
            if not holds_slot:
                raise rpc.RequestRefused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"update not taken: {MAX_PENDING_SUMS} accepted updates were still waiting to be summed "
                    f"after {wait:.1f}s, this call's time; send it again",
                )
            with self._cond:
                current = self.round
                if self.jobs is None:
                    duplicate, staleness, key = self._first_of_round(current, learner_id, header, digest), 0, learner_id
                else:
                    duplicate, staleness = self._check_job(current, learner_id, header.round, digest)
                    key = (learner_id, header.round)
                if duplicate is not None:
                    return duplicate
                base_weight = 1.0 if unweighted else min(float(header.num_examples), current.max_weight)
                weight = base_weight * fedbuff.staleness_weight(staleness)
                clip = min(self.config.clip_norm or math.inf, current.norm_bound)
                clip = clip if norm > clip else math.inf  # an update within its bounds is summed as it came
                if norm > current.norm_bound:
                    current.clipped += 1
                # queued under the lock, while the round accepts: closing it (accepting = False) fixes the list of sums
                # kept updates (median, Krum) go by sender, or in fedbuff by arrival: a learner may send two to one buffer
                order = learner_id if self.jobs is None else len(current.digests)
                current.sums.append(self._summing.submit(self._add_to_sum, current.running, tensors, weight, order, release, clip))
                queued = True  # from here the summing thread frees the slot and the buffer
                current.digests[key] = digest
                current.losses.append(header.train_loss)
                current.update_norms.append(norm)
                current.bytes_in += self.update_bytes
                if self.jobs is not None:
                    current.member_records.setdefault(learner_id, self.roster.record(learner_id))
                    current.staleness.append(staleness)
                    current.example_weight += base_weight
                    current.discounted_weight += weight
                    if current.reported >= current.quorum:
                        self._buffer_filled(current)
                self._cond.notify_all()
        finally:
            if not queued:
                if holds_slot:
                    self._sum_slots.release()
                if release is not None:
                    release()
        return f"update for {'job' if self.jobs is not None else 'round'} {header.round} accepted"

    @staticmethod
    def _first_of_round(
        current: RoundState, learner_id: int, header: leader_pb2.GradientData, digest: tuple[float, ...] | bytes
    ) -> str | None:
        """Under the lock: refuse an update for a closed round or a second, different one; the answer to an identical retry, or None."""
        if header.round != current.round_number or not current.accepting:
            raise rpc.RequestRefused(
                grpc.StatusCode.FAILED_PRECONDITION, f"stale update for round {header.round}; round {current.round_number} is closed"
            )
        previous = current.digests.get(learner_id)
        if previous == digest:
            return f"duplicate of the accepted update for round {header.round}; counted once"
        if previous is not None:
            raise rpc.RequestRefused(
                grpc.StatusCode.ALREADY_EXISTS, f"learner {learner_id} already sent a different update for round {header.round}"
            )
        return None

    def _accept_masked(
        self, learner_id: int, header: leader_pb2.GradientData, tensor: torch.Tensor, release: Callable[[], None] | None
    ) -> str:
        """Add a masked update to the round's modular sum, once per learner per round: it can be checked for nothing but its
        shape and its sender, and summing it is cheap enough to do at once."""
        try:
            masked = tensor.numpy().view(np.uint32)
            digest = SecureRound.digest(masked)
            with self._cond:
                current = self.round
                duplicate = self._first_of_round(current, learner_id, header, digest)
                if duplicate is not None:
                    return duplicate
                if current.secure is None or not current.secure.may_send(learner_id):
                    raise rpc.RequestRefused(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"learner {learner_id} was not told whom to mask against in round {header.round}: its update cannot be unmasked",
                    )
                current.secure.add(learner_id, masked)
                current.digests[learner_id] = digest
                current.losses.append(header.train_loss)
                current.bytes_in += self.update_bytes
                self._cond.notify_all()
        finally:
            if release is not None:
                release()
        return f"masked update for round {header.round} accepted"

    def _add_to_sum(
        self,
        running: aggregation.RunningMean | aggregation.UpdateList,
        update: dict[str, torch.Tensor],
        weight: float,
        learner_id: int,
        release: Callable[[], None] | None,
        clip: float = math.inf,
    ) -> None:
        """On the summing thread: scale an update down to `clip` (its parameters' L2 norm), add it to the sum, free its slot and buffer."""
        try:
            if math.isfinite(clip):
                update, _ = aggregation.clip_to_norm(update, clip, self.parameter_names)
            running.add(update, weight, key=learner_id)
        finally:
            self._sum_slots.release()
            if release is not None:
                release()

    def note_rejection(self, learner_id: int) -> bool:
        """Count a refused update; True the first time this round for this learner (log it then)."""
        with self._cond:
            current = self.round
            first = learner_id not in current.rejected
            current.rejected[learner_id] = current.rejected.get(learner_id, 0) + 1
        return first

    def count_bytes_out(self, count: int) -> None:
        """Record model bytes sent to learners in the current round."""
        with self._cond:
            self.round.bytes_out += count

    def close(self) -> None:
        """Stop the summing thread."""
        self._summing.shutdown(wait=False, cancel_futures=True)


def tensor_norm(tensor: torch.Tensor) -> float:
    """L2 norm accumulated in float64, without a float64 copy of the tensor."""
    if not tensor.dtype.is_floating_point:
        tensor = tensor.double()  # small integer buffers, e.g. BatchNorm's batch counter
    return float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64))
