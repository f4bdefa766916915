"""Who is in the federation: registration checks, slots, session tokens and liveness."""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from fedgrpc.config.options import LeaderConfig
from fedgrpc.console import printable
from fedgrpc.data import derive_seed
from fedgrpc.protos import leader_pb2, learner_pb2, learner_pb2_grpc
from fedgrpc.transport import rpc
from fedgrpc.transport.tls import Tls, tls_mismatch

logger = logging.getLogger(__name__)

MAX_LOCAL_EXAMPLES = 10**9
# The leader calls a registrant back before it admits it; a learner's server is up before it registers.
REGISTRATION_PROBE_S = 3.0
# A full federation checks its members before refusing a newcomer: a short check, at most this often.
MEMBER_SWEEP_PROBE_S = 2.0
# A pool (LearnerInfo.pooled) registers thousands of learners at one address; once the address answered a call-back,
# its registrations in the next seconds are admitted without one each, which would halve a pool's registration rate.
POOL_CALL_BACK_REUSE_S = 10.0
MEMBER_SWEEP_INTERVAL_S = 2.0
# Consecutive health checks a member may refuse (its port closed: the process is gone) before it is marked absent,
# without waiting out --learner-lost-after, which is for members that go silent (frozen, or cut off).
REFUSED_PROBES_TO_ABSENT = 2
STOP_TIMEOUT_S = 5.0  # a stop message is tiny; a learner that cannot take it in 5 s is frozen or gone
FILL_CHECK_S = 5.0  # the health check of every member once the slots are full, before training starts
WAIT_SLICE_S = 0.5  # how often a wait for registrations wakes up to check for shutdown
HEALTH_PROBE_INTERVAL_S = 5.0  # how often a wait checks the members that have not reported yet
REVOKED_SESSIONS_KEPT = 4096  # ended sessions remembered, so that a late call from one is told why


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
    pooled: bool = False  # it shares its address with the other learners of a simulation pool (LearnerInfo.pooled)
    certificate: str | None = None  # under mutual TLS, the SHA-256 of the certificate it registered with: its session's
    alive: bool = True
    started: bool = False


def call_learner(call: Callable[[LearnerRecord], Any], record: LearnerRecord) -> str | None:
    """Run one call against a learner; returns None or the error's description."""
    try:
        reply = call(record)
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"
    except ValueError as error:  # the channel was closed: its slot went to a newcomer
        return str(error)
    if not reply.success:
        return reply.message
    return None


def check_learner_info(
    info: leader_pb2.LearnerInfo, peer: str, config: LeaderConfig, expected_task: tuple[str, str], tls_on: bool, trusts_registrants: bool
) -> None:
    """Refuse (RequestRefused) a registration from `peer` whose fields cannot work, before anything is done for it."""
    if info.version != rpc.PROTOCOL_VERSION:
        raise rpc.RequestRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"learner speaks protocol {printable(info.version, 16) or '?'}, leader {rpc.PROTOCOL_VERSION}: install the same release on both",
        )
    mismatch = task_mismatch(info, *expected_task)
    if mismatch is not None:
        raise rpc.RequestRefused(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
    problem = rpc.callback_problem(info.network_addr, peer, trusts_registrants)
    if problem is not None:
        raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"network_addr: {problem}")
    if len(info.callback_token) < 16:
        raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "callback_token must be a random secret of at least 16 characters")
    if info.tls != (tls_on):
        raise rpc.RequestRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "this leader calls learners back over TLS: start the learner with --tls-cert, --tls-key and --tls-ca"
            if tls_on
            else "this leader does not use TLS: start the learner without --tls-cert",
        )
    if config.data_mode == "split" and info.num_examples:
        raise rpc.RequestRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "this leader splits the data itself: start the learner without --data-dir, or the leader with --data-mode local",
        )
    if config.data_mode == "local" and not 0 < info.num_examples <= MAX_LOCAL_EXAMPLES:
        raise rpc.RequestRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "this leader expects learners with their own data: start the learner with --data-dir",
        )


def same_certificate(record: LearnerRecord, certificate: str | None) -> LearnerRecord:
    """`record`, for a registration retried with its callback secret, if it comes with the certificate the first one did."""
    if record.certificate != certificate:
        raise rpc.RequestRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            "this learner registered with another client certificate: a secret is bound to its certificate",
        )
    return record


def task_mismatch(info: leader_pb2.LearnerInfo, task: str, fingerprint: str) -> str | None:
    """Why a registering learner's task cannot train with this leader's (`task` empty: a built-in model), or None."""
    theirs = printable(info.task, 80)
    if info.task == task and (not task or info.model_fingerprint == fingerprint):
        return None
    if not task:
        return f"this learner holds the task {theirs!r}, this leader trains a built-in model: start the learner without --task, or the leader with --task {theirs}"
    if not info.task:
        return f"this leader trains the task {task!r} (model manifest {fingerprint[:12]}): start the learner with --task and the same task file"
    return (
        f"this learner holds the task {theirs!r} (model manifest {printable(info.model_fingerprint, 12)}), this leader trains "
        f"{task!r} (model manifest {fingerprint[:12]}): give both the same task file"
    )


class MemberChecks:
    """The health checks a wait makes of the learners it depends on, every few seconds, with the leader's lock released."""

    def __init__(self, roster: Roster, cond: threading.Condition, learner_lost_after: float, round_number: int) -> None:
        self.roster = roster
        self._cond = cond
        self.round_number = round_number
        self.every = min(HEALTH_PROBE_INTERVAL_S, learner_lost_after / 3)
        self._next = time.monotonic() + self.every
        self._silent_since: dict[int, float] = {}
        self._refusals: dict[int, int] = {}

    def run_if_due(self, due: Callable[[], list[LearnerRecord]]) -> None:
        """Under the lock: once the interval has passed, check the learners `due()` names (roster.probe) outside it."""
        if time.monotonic() < self._next:
            return
        records = due()
        self._cond.release()  # a check waits on the network
        try:
            self.roster.probe(records, self._silent_since, self._refusals, self.every, self.round_number)
        finally:
            self._cond.acquire()
        self._next = time.monotonic() + self.every

    def seconds_to_next(self) -> float:
        """How long a wait may sleep before the next check is due."""
        return max(0.0, self._next - time.monotonic())


def round_members(alive: list[LearnerRecord], config: LeaderConfig, round_number: int) -> list[LearnerRecord]:
    """Round `round_number`'s members among `alive` (by id, as Roster.alive gives them): those due to take part in it, a
    seeded --fraction of them, by id."""
    available = [record for record in alive if record.joins_round <= round_number]
    count = config.sampled(len(available))
    if count < len(available):
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "sample", round_number))
        chosen = torch.randperm(len(available), generator=generator)[:count].tolist()
        available = sorted((available[index] for index in chosen), key=lambda record: record.learner_id)
    return available


class Channels:
    """One client channel (and stub) per learner address, shared by the learners of a pool and closed when the last one leaves."""

    def __init__(self, tls: Tls | None) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        # address -> (channel, its stub, learners using it)
        self._open: dict[str, tuple[grpc.Channel, learner_pb2_grpc.LearnerServiceStub, int]] = {}

    def take(self, address: str) -> tuple[grpc.Channel, learner_pb2_grpc.LearnerServiceStub]:
        """The channel to `address` and its stub, opened on first use; give() them back once."""
        with self._lock:
            if address in self._open:
                channel, stub, users = self._open[address]
            else:
                channel = rpc.channel(address, self.tls)
                stub, users = rpc.learner_stub(channel), 0
            self._open[address] = (channel, stub, users + 1)
            return channel, stub

    def give(self, address: str) -> None:
        """A learner at `address` no longer uses its channel; the last one closes it."""
        with self._lock:
            if address not in self._open:
                return
            channel, stub, users = self._open[address]
            if users > 1:
                self._open[address] = (channel, stub, users - 1)
                return
            del self._open[address]
        channel.close()

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            channels, self._open = [channel for channel, _, _ in self._open.values()], {}
        for channel in channels:
            channel.close()


def callback_key(callback_token: str) -> bytes:
    """What the roster indexes a callback secret by: its digest, so that finding a registration takes no timing from the secret."""
    return hashlib.sha256(callback_token.encode()).digest()


class Roster:
    """The federation's --learners slots and who holds them: admits registrants, ends sessions, notices who is gone.

    Shares the leader's lock (`cond`); `first_round()` (called under it) names the round a newcomer joins in,
    and `on_absent(learner_id, why)` (called under it) lets the open round note a member it lost.
    """

    def __init__(
        self,
        config: LeaderConfig,
        tls: Tls | None,
        cond: threading.Condition,
        calls: ThreadPoolExecutor,
        split_examples: Callable[[int], int],
        first_round: Callable[[], int],
    ) -> None:
        self.config = config
        self.tls = tls
        # registrants that proved they belong (enrolment secret, client certificate) may advertise any callback address
        self.trusts_registrants = False
        self.expected_task = ("", "")  # the leader's task name (empty: a built-in model) and its model manifest's digest
        self.on_absent: Callable[[int, str], None] = lambda learner_id, why: None
        self._cond = cond
        self._calls = calls
        self._split_examples = split_examples
        self._first_round = first_round
        self._records: dict[int, LearnerRecord] = {}
        self._tokens: dict[str, int] = {}
        self._by_callback: dict[bytes, LearnerRecord] = {}  # live members by callback_key
        self._absent_slots: list[int] = []  # heap of slots whose learner is absent, for the next newcomer
        self._next_unused = 0  # no slot below it is unused (a slot asked back can be taken out of order)
        self._pools_reported: set[str] = set()  # pool addresses whose learners' absence was logged
        self._pools_answered: dict[str, float] = {}  # pool address -> when it last answered a registration's call-back
        self.channels = Channels(tls)
        self._revoked: OrderedDict[str, str] = OrderedDict()  # ended session token -> why it ended
        self._sweep_lock = threading.Lock()
        self._last_sweep = -math.inf

    # ---- who is here --------------------------------------------------------------------------------------------

    def record(self, learner_id: int) -> LearnerRecord:
        """The record in a slot."""
        with self._cond:
            return self._records[learner_id]

    def records(self) -> list[LearnerRecord]:
        """Every slot's record, absent ones included, by id."""
        with self._cond:
            return [self._records[learner_id] for learner_id in sorted(self._records)]

    def alive(self) -> list[LearnerRecord]:
        """The live members, by id."""
        return [record for record in self.records() if record.alive]

    def alive_count(self) -> int:
        """How many members are live."""
        with self._cond:
            return len(self._by_callback)

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

    # ---- joining ------------------------------------------------------------------------------------------------

    def register(
        self, info: leader_pb2.LearnerInfo, peer: str = "", certificate: str | None = None
    ) -> tuple[LearnerRecord, LearnerRecord | None]:
        """Admit a learner whose registration came from `peer` (gRPC's peer string): (its record, the absent one it replaced).

        The learner's callback address is checked (rpc.callback_problem) and called back before it gets a slot,
        so that a registration nobody answers never holds one. A full federation first checks its members.
        A retried registration (the same callback secret, the same client certificate) gets the same record.
        """
        check_learner_info(info, peer, self.config, self.expected_task, self.tls is not None, self.trusts_registrants)
        with self._cond:
            known = self._alive_record_for(info.callback_token)
            if known is not None:
                return same_certificate(known, certificate), None
        channel, stub = self.channels.take(info.network_addr)
        failure = None if info.pooled and self._pool_answered(info.network_addr) else self._call_back(channel, info)
        if failure is not None:
            self.channels.give(info.network_addr)
            raise rpc.RequestRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the leader cannot call this learner back at {info.network_addr} ({failure}): check "
                "--advertise-address, and that the leader can reach that port",
            )
        try:
            record, replaced = self._admit(info, channel, stub, certificate)
        except BaseException:
            self.channels.give(info.network_addr)
            raise
        if replaced is None:
            logger.log(
                logging.DEBUG if info.pooled else logging.INFO,  # a pool registers thousands: its launcher reports them
                "learner %d registered from %s (%d examples)",
                record.learner_id,
                info.network_addr,
                record.num_examples,
            )
        else:
            logger.info(
                "learner %d's slot taken by %s (%d examples); it takes part from round %d",
                record.learner_id,
                info.network_addr,
                record.num_examples,
                record.joins_round,
            )
        return record, replaced

    def _call_back(self, channel: grpc.Channel, info: leader_pb2.LearnerInfo) -> rpc.Unhealthy | None:
        """The registration's call-back: None when the learner's LearnerService answers SERVING to its secret."""
        failure = rpc.health_check(channel, REGISTRATION_PROBE_S, rpc.LEARNER_SERVICE, info.callback_token)
        if failure is not None and failure.gone and (mismatch := tls_mismatch(info.network_addr, self.tls is not None, "learner")):
            return rpc.Unhealthy(mismatch, gone=True)
        if failure is None and info.pooled:
            with self._cond:
                self._pools_answered[info.network_addr] = time.monotonic()
        return failure

    def _pool_answered(self, address: str) -> bool:
        """Whether a pool at `address` answered a call-back in the last POOL_CALL_BACK_REUSE_S seconds.

        Its next registrations are admitted without a call-back each: the address is proven to be a pool, and a
        learner's own secret is proven at its first round start, whose failure marks it absent like any learner.
        """
        with self._cond:
            answered = self._pools_answered.get(address)
        return answered is not None and time.monotonic() - answered < POOL_CALL_BACK_REUSE_S

    def _alive_record_for(self, callback_token: str) -> LearnerRecord | None:
        """The live member registered with this callback secret, if any (under the lock)."""
        record = self._by_callback.get(callback_key(callback_token))
        return record if record is not None and rpc.secrets_match(callback_token, record.callback_token) else None

    def _admit(
        self, info: leader_pb2.LearnerInfo, channel: grpc.Channel, stub: learner_pb2_grpc.LearnerServiceStub, certificate: str | None
    ) -> tuple[LearnerRecord, LearnerRecord | None]:
        """Give a checked registrant a slot: (its record, the absent member it replaced)."""
        wanted = info.former_learner_id if info.HasField("former_learner_id") else None
        with self._cond:
            learner_id = self._free_slot(wanted)
        if learner_id is None:
            self.sweep()  # a full federation may hold members that are gone
        with self._cond:
            known = self._alive_record_for(info.callback_token)
            if known is not None:  # the same registration, retried while this one was checked
                self.channels.give(info.network_addr)
                return same_certificate(known, certificate), None
            learner_id = self._free_slot(wanted)
            if learner_id is None:
                raise rpc.RequestRefused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the federation is full ({self.config.learners} of {self.config.learners} learners) and every member "
                    "answers its health check; a slot frees when one of them stops",
                )
            replaced = self._records.get(learner_id)
            if replaced is not None:  # the slot of an absent learner: its split and its session go to the newcomer
                if self._absent_slots[0] == learner_id:
                    heapq.heappop(self._absent_slots)
                else:  # asked back out of turn
                    self._absent_slots.remove(learner_id)
                    heapq.heapify(self._absent_slots)
                self._end_session(replaced, "its slot went to a newcomer")
                self.channels.give(replaced.address)
            record = LearnerRecord(
                learner_id,
                info.network_addr,
                info.callback_token,
                secrets.token_urlsafe(32),
                info.num_examples or self._split_examples(learner_id),
                channel,
                stub,
                self._first_round(),
                pooled=info.pooled,
                certificate=certificate,
            )
            self._records[learner_id] = record
            self._tokens[record.session_token] = learner_id
            self._by_callback[callback_key(info.callback_token)] = record
            if len(self._by_callback) >= self.config.learners:
                self._cond.notify_all()  # fill() waits for this; waking it at every registration slows registering
        return record, replaced

    def _free_slot(self, wanted: int | None = None) -> int | None:
        """The id a registrant gets (under the lock): the one it asks back (`wanted`, its former_learner_id) when that
        slot is unused or its learner absent, else the lowest unused one, else the lowest one whose learner is absent;
        None when full."""
        if wanted is not None and 0 <= wanted < self.config.learners:
            if wanted not in self._records or wanted in self._absent_slots:
                return wanted
        while self._next_unused in self._records:
            self._next_unused += 1
        if self._next_unused < self.config.learners:
            return self._next_unused
        return self._absent_slots[0] if self._absent_slots else None

    # ---- leaving ------------------------------------------------------------------------------------------------

    def mark_absent(self, record: LearnerRecord, why: str) -> None:
        """Take a member out: its slot goes to the next to register, its session ends, and the open round hears why."""
        with self._cond:
            was_alive = record.alive and self._records.get(record.learner_id) is record
            record.alive = False
            if was_alive:
                self._by_callback.pop(callback_key(record.callback_token), None)
                heapq.heappush(self._absent_slots, record.learner_id)
                self._end_session(record, f"marked absent: {why}")
                self.on_absent(record.learner_id, why)
            self._cond.notify_all()
        if not was_alive:
            return
        if not record.pooled:
            logger.warning("learner %d at %s marked absent: %s", record.learner_id, record.address, why)
        elif record.address not in self._pools_reported:  # a pool's learners go together: one line for all of them
            self._pools_reported.add(record.address)
            logger.warning("learners of the pool at %s marked absent, learner %d first: %s", record.address, record.learner_id, why)

    def mark_absent_on_error(self, record: LearnerRecord, what: str, error: str | None) -> None:
        """mark_absent when a call to the learner (`what`) failed with `error`."""
        if error is not None:
            self.mark_absent(record, f"it failed {what}: {error}")

    def _end_session(self, record: LearnerRecord, reason: str) -> None:
        """Revoke a member's session token (under the lock): its later calls are refused UNAUTHENTICATED with `reason`."""
        if self._tokens.pop(record.session_token, None) is not None:
            self._revoked[record.session_token] = f"learner {record.learner_id}'s session ended: {reason}; register again to take part"
            while len(self._revoked) > REVOKED_SESSIONS_KEPT:
                self._revoked.popitem(last=False)

    def fill(self, deadline: float, stopping: Callable[[], bool]) -> bool:
        """Wait until every slot holds a live learner; False at `deadline` or once `stopping()`.

        When the slots fill up, every member's health is checked: one that died after registering frees its
        slot for the next to register, rather than holding up the first round.
        """
        while True:
            with self._cond:
                while len(self._by_callback) < self.config.learners:
                    remaining = deadline - time.monotonic()
                    if stopping() or remaining <= 0:
                        return False
                    self._cond.wait(min(remaining, WAIT_SLICE_S))
            records = self.alive()
            for record, answer in zip(records, self.check(records, FILL_CHECK_S), strict=True):
                if answer is not None:
                    self.mark_absent(record, f"it stopped answering before training ({answer}); its slot goes to the next to register")
            if self.alive_count() >= self.config.learners:
                return True

    def stop_all(self, reason: str) -> None:
        """Tell every learner to stop, those marked absent too, in case they come back (best effort, short deadline)."""

        def stop(record: LearnerRecord) -> Any:
            message = learner_pb2.ModelState(stop=True, reason=reason)
            return record.stub.SyncModelState(iter([message]), timeout=STOP_TIMEOUT_S, metadata=rpc.token_metadata(record.callback_token))

        records = self.records()
        called = one_per_pool(records)
        for record, error in zip(called, self._calls.map(lambda record: call_learner(stop, record), called), strict=True):
            self.mark_absent_on_error(record, "stop", error)

    # ---- liveness -----------------------------------------------------------------------------------------------

    def health(self, record: LearnerRecord, timeout: float) -> rpc.Unhealthy | None:
        """None when a member's LearnerService answers SERVING within `timeout`, else what it answered."""
        return rpc.health_check(record.channel, timeout, rpc.LEARNER_SERVICE, record.callback_token)

    def check(self, records: list[LearnerRecord], timeout: float) -> list[rpc.Unhealthy | None]:
        """health() of several members at once; the learners of a pool share one check of their address."""
        called = one_per_pool(records)
        answers = dict(zip(map(check_key, called), self._calls.map(lambda record: self.health(record, timeout), called), strict=True))
        return [answers[check_key(record)] for record in records]

    def sweep(self) -> None:
        """Check every live member's health (at most one sweep at a time, and not more often than every 2 s).

        A member whose check says it is gone (rpc.Unhealthy.gone) is marked absent, freeing its slot. One that does
        not answer in time, or is busy, is left alone: the round's own checks time it out.
        """
        if not self._sweep_lock.acquire(timeout=MEMBER_SWEEP_PROBE_S + REGISTRATION_PROBE_S):
            return
        try:
            if time.monotonic() - self._last_sweep < MEMBER_SWEEP_INTERVAL_S:
                return
            records = self.alive()
            for record, answer in zip(records, self.check(records, MEMBER_SWEEP_PROBE_S), strict=False):
                if answer is not None and answer.gone:
                    self.mark_absent(record, f"its health check failed when a newcomer asked for a slot ({answer})")
            self._last_sweep = time.monotonic()
        finally:
            self._sweep_lock.release()

    def probe(
        self, records: list[LearnerRecord], silent_since: dict[int, float], refusals: dict[int, int], timeout: float, round_number: int
    ) -> None:
        """Health-check members due to report; mark absent those whose port refuses twice or that stay silent for --learner-lost-after."""
        now = time.monotonic()
        for record, answer in zip(records, self.check(records, timeout), strict=False):
            if answer is None:
                silent_since.pop(record.learner_id, None)
                refusals.pop(record.learner_id, None)
                continue
            since = silent_since.setdefault(record.learner_id, now)
            if answer.gone:
                refusals[record.learner_id] = refusals.get(record.learner_id, 0) + 1
            else:
                refusals.pop(record.learner_id, None)  # silent or busy, perhaps only slow: --learner-lost-after decides
            if now - since >= self.config.learner_lost_after or refusals.get(record.learner_id, 0) >= REFUSED_PROBES_TO_ABSENT:
                self.mark_absent(record, f"it failed health checks in round {round_number}: {answer}, for {now - since:.0f}s")

    def close(self) -> None:
        """Close the channels to learners."""
        self.channels.close()


def check_key(record: LearnerRecord) -> str | int:
    """What one call stands for: a pooled learner's address (its pool answers for all its learners), else its id."""
    return record.address if record.pooled else record.learner_id


def one_per_pool(records: list[LearnerRecord]) -> list[LearnerRecord]:
    """The records to call: every unpooled learner, and one learner of each pool."""
    chosen: dict[str | int, LearnerRecord] = {}
    for record in sorted(records, key=lambda record: not record.alive):  # a live one: the pool still knows its secret
        chosen.setdefault(check_key(record), record)
    return list(chosen.values())
