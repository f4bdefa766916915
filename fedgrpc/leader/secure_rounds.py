"""The leader's side of secure aggregation: runs a round's SecAgg+ stages over gRPC, sums masked updates, unmasks the sum.

Stages 1-3 (AdvertiseKeys, ShareKeys, CollectMasked) run on a thread of their own while the learners train;
stage 4 (Unmask) runs once the round's updates are in. A member whose stage call fails, or whose answer does
not fit the protocol, is marked absent like any member that fails a call, and the round goes on without it.
The arithmetic and the cryptography are secagg.py's.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import torch

from fedgrpc.algorithms import secagg
from fedgrpc.config.options import LeaderConfig
from fedgrpc.data import derive_seed
from fedgrpc.leader.roster import LearnerRecord, Roster
from fedgrpc.protos import learner_pb2
from fedgrpc.transport import rpc

logger = logging.getLogger(__name__)

DIGEST_STRIDE = 16  # a masked update's digest hashes every 16th entry: a sixteenth of the hashing of the whole


class UnmaskedSum:
    """A round's unmasked sum of weighted updates, read as the weighted mean update (what RunningMean.mean gives)."""

    def __init__(self, total: np.ndarray, count: int, round_state: dict[str, torch.Tensor], parameter_names: list[str]) -> None:
        self.total = total
        self.count = count
        self._round_state = round_state
        self._parameter_names = parameter_names

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean update."""
        return secagg.decode_mean(self.total, self._round_state, self._parameter_names)


class SecureRound:
    """One round's secure aggregation as the leader runs it. Masked updates are added to one uint32 sum as they arrive."""

    def __init__(
        self,
        round_number: int,
        members: list[LearnerRecord],
        neighbours: int,
        threshold: int,
        bound: float,
        weight_cap: float,
        seed: int,
        length: int,
        roster: Roster,
        calls: ThreadPoolExecutor,
    ) -> None:
        self.round_number = round_number
        self.records = {record.learner_id: record for record in members}
        self.bound = bound
        self.weight_cap = weight_cap
        self.roster = roster
        self._calls = calls
        graph = secagg.neighbour_graph(list(self.records), neighbours, seed)
        self.protocol = secagg.LeaderRound(round_number, graph, threshold)
        self.total = np.zeros(length, dtype=np.uint32)
        self.senders: set[int] = set()
        self._lock = threading.Lock()  # guards the sum, the senders and the byte counts
        self.ready = threading.Event()  # stages 1-3 are over
        self.bytes_out = 0  # stage messages sent and received, counted as serialized
        self.bytes_in = 0
        self.setup_seconds = 0.0
        self.unmask_seconds = 0.0
        self._thread = threading.Thread(target=self._prepare, name=f"secagg-{round_number}", daemon=True)

    @classmethod
    def of(
        cls,
        config: LeaderConfig,
        round_number: int,
        members: list[LearnerRecord],
        bound: float,
        weight_cap: float,
        length: int,
        roster: Roster,
        calls: ThreadPoolExecutor,
    ) -> SecureRound:
        """Round `round_number`'s secure aggregation among `members`, with the neighbours and threshold the flags give."""
        neighbours, threshold = secagg.round_parameters(len(members), config.secagg_neighbours, config.secagg_threshold)
        seed = derive_seed(config.seed, "secagg", round_number)
        return cls(round_number, members, neighbours, threshold, bound, weight_cap, seed, length, roster, calls)

    @property
    def threshold(self) -> int:
        """Senders (and shares of each) the unmasking needs."""
        return self.protocol.threshold

    # ---- stages 1-3, while the learners train ---------------------------------------------------------------------

    def start(self) -> None:
        """Run stages 1-3 on their own thread."""
        self._thread.start()

    def _prepare(self) -> None:
        started = time.monotonic()
        try:
            cohort = len(self.records)
            setup = {
                learner_id: learner_pb2.SecAggSetup(
                    round=self.round_number,
                    learner_id=learner_id,
                    cohort_size=cohort,
                    threshold=self.protocol.threshold,
                    bound=self.bound,
                    weight_cap=self.weight_cap,
                )
                for learner_id in self.records
            }
            self._stage(
                "AdvertiseKeys",
                list(self.records),
                lambda learner_id: setup[learner_id],
                lambda stub: stub.AdvertiseKeys,
                lambda learner_id, reply: self.protocol.add_keys(learner_id, reply.mask_key, reply.share_key),
            )

            def neighbour_keys(learner_id: int) -> learner_pb2.SecAggNeighbourKeys:
                keys = self.protocol.neighbour_keys(learner_id)
                return learner_pb2.SecAggNeighbourKeys(
                    round=self.round_number,
                    neighbours=[
                        learner_pb2.NeighbourKeys(learner_id=peer, mask_key=mask, share_key=share) for peer, (mask, share) in keys.items()
                    ],
                )

            def take_shares(learner_id: int, reply: learner_pb2.SecAggShares) -> None:
                encrypted = {share.learner_id: share.ciphertext for share in reply.shares}
                if len(encrypted) != len(reply.shares):
                    raise secagg.SecAggError("two shares for the same neighbour")
                self.protocol.add_shares(learner_id, encrypted)

            self._stage("ShareKeys", sorted(self.protocol.keys), neighbour_keys, lambda stub: stub.ShareKeys, take_shares)

            def collection(learner_id: int) -> learner_pb2.SecAggCollection:
                _, shares = self.protocol.collection_for(learner_id)
                with self._lock:  # before the call: its update may arrive before the leader has read the answer
                    self.protocol.included.add(learner_id)
                return learner_pb2.SecAggCollection(
                    round=self.round_number,
                    shares=[learner_pb2.EncryptedShare(learner_id=peer, ciphertext=share) for peer, share in shares.items()],
                )

            # one that fails the call is marked absent, and the round refuses its update as it refuses any absent learner's
            self._stage("CollectMasked", sorted(self.protocol.shares), collection, lambda stub: stub.CollectMasked, lambda *_: None)
        finally:
            self.setup_seconds = time.monotonic() - started
            self.ready.set()

    def _stage(
        self,
        name: str,
        learner_ids: list[int],
        request_for: Callable[[int], Any],
        method: Callable[[Any], Any],
        take: Callable[[int, Any], None],
    ) -> set[int]:
        """Call one stage's RPC on `learner_ids` at once and take each answer; returns who answered well."""
        requests = {learner_id: request_for(learner_id) for learner_id in learner_ids if self.records[learner_id].alive}

        def call(learner_id: int) -> Any:
            record = self.records[learner_id]
            return method(record.stub)(
                requests[learner_id], timeout=rpc.CONTROL_TIMEOUT_S, metadata=rpc.token_metadata(record.callback_token)
            )

        pending = {self._calls.submit(call, learner_id): learner_id for learner_id in requests}
        answered = set()
        for done in futures.as_completed(pending):
            learner_id = pending[done]
            record = self.records[learner_id]
            with self._lock:
                self.bytes_out += requests[learner_id].ByteSize()
            try:
                reply = done.result()
                with self._lock:
                    self.bytes_in += reply.ByteSize()
                take(learner_id, reply)
            except secagg.SecAggError as error:
                self.roster.mark_absent(record, f"its {name} answer for round {self.round_number} was refused: {error}")
                continue
            except grpc.RpcError as error:
                self.roster.mark_absent(record, f"it failed {name} for round {self.round_number}: {error.code().name}: {error.details()}")
                continue
            except ValueError as error:  # its channel was closed: its slot went to a newcomer
                self.roster.mark_absent(record, f"it failed {name} for round {self.round_number}: {error}")
                continue
            answered.add(learner_id)
        return answered

    # ---- masked updates -------------------------------------------------------------------------------------------

    def may_send(self, learner_id: int) -> bool:
        """Whether a learner was told whom to mask against, and so may send a masked update."""
        with self._lock:
            return learner_id in self.protocol.included

    def add(self, learner_id: int, masked: np.ndarray) -> None:
        """Add a learner's masked update (uint32) to the round's sum, once."""
        with self._lock:
            np.add(self.total, masked, out=self.total)
            self.senders.add(learner_id)

    @staticmethod
    def digest(masked: np.ndarray) -> bytes:
        """What tells an identical retry of a masked update from a different one: a hash of every 16th entry, since masked
        entries look uniformly random and two different updates differ in nearly all of them (a different update that
        matched would only be answered "duplicate"; neither is ever counted twice)."""
        return hashlib.sha256(masked[::DIGEST_STRIDE].tobytes()).digest()

    # ---- stage 4, after the collection ------------------------------------------------------------------------------

    def unmask(self, round_state: dict[str, torch.Tensor], parameter_names: list[str]) -> UnmaskedSum:
        """Ask the senders for their shares, remove every mask from the sum and return it; SecAggError when too few came back."""
        started = time.monotonic()
        self.ready.wait()
        with self._lock:
            senders = set(self.senders)
        if len(senders) < self.protocol.threshold:
            raise secagg.SecAggError(
                f"{len(senders)} learners sent masked updates and secure aggregation needs {self.protocol.threshold} (--secagg-threshold)"
            )
        asked = {learner_id: self.protocol.unmask_request(learner_id, senders) for learner_id in sorted(senders)}

        def request_for(learner_id: int) -> learner_pb2.SecAggUnmaskRequest:
            survivors, dropped = asked[learner_id]
            return learner_pb2.SecAggUnmaskRequest(round=self.round_number, survivors=survivors, dropped=dropped)

        def take(learner_id: int, reply: learner_pb2.SecAggRevealedShares) -> None:
            shares = [(share.learner_id, share.self_seed, share.value) for share in reply.shares]
            with self._lock:
                self.protocol.add_revealed(learner_id, shares, *asked[learner_id])

        self._stage("Unmask", sorted(senders), request_for, lambda stub: stub.Unmask, take)
        total = self.protocol.unmask(self.total, senders)
        scale = secagg.fixed_point_scale(secagg.entry_bound(self.bound), self.protocol.cohort)
        self.unmask_seconds = time.monotonic() - started
        return UnmaskedSum(secagg.dequantize(total, scale), len(senders), round_state, parameter_names)
