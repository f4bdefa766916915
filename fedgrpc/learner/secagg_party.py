"""A learner's side of secure aggregation: its answers to the leader's four SecAgg+ stage calls, and its masked update.

the learner (main.py) and pools (engines/pool.py) hold one SecAggParty per (virtual) learner; the protocol itself is algorithms/secagg.py's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import grpc
import numpy as np
import torch

from fedgrpc.algorithms import secagg
from fedgrpc.protos import learner_pb2
from fedgrpc.transport import rpc


class SecAggParty:
    """One learner's secure-aggregation state: the newest round it was set up for, and its answers to the stage calls.

    Stage calls come from the leader's threads while the learner trains; `reached` tells whether a round has got as
    far as a masked update needs.
    Each answer raises rpc.RequestRefused with the status to send when a call does not fit.
    """

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self._cond = cond or threading.Condition()  # the learner's own, so that its waits wake when a stage comes
        self._round: secagg.LearnerRound | None = None
        self.weight_cap = 0.0

    def advertise_keys(self, request: learner_pb2.SecAggSetup, learner_id: int) -> learner_pb2.SecAggPublicKeys:
        """Stage 1: fresh keys for the round."""
        if request.learner_id != learner_id:
            raise rpc.RequestRefused(grpc.StatusCode.PERMISSION_DENIED, f"this is learner {learner_id}, not {request.learner_id}")
        with self._cond:
            if self._round is not None and request.round <= self._round.round_number:
                raise rpc.RequestRefused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"round {request.round} is not after round {self._round.round_number}, already set up",
                )
            if not (request.weight_cap >= 0 and np.isfinite(request.weight_cap)):
                raise rpc.RequestRefused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"weight_cap must be finite and not negative, got {request.weight_cap}"
                )
            try:
                self._round = secagg.LearnerRound(request.round, learner_id, request.cohort_size, request.threshold, request.bound)
            except secagg.SecAggError as error:
                raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
            self.weight_cap = request.weight_cap
            mask_key, share_key = self._round.public_keys()
            self._cond.notify_all()
        return learner_pb2.SecAggPublicKeys(mask_key=mask_key, share_key=share_key)

    def share_keys(self, request: learner_pb2.SecAggNeighbourKeys) -> learner_pb2.SecAggShares:
        """Stage 2: encrypted shares for each neighbour."""
        keys = {neighbour.learner_id: (neighbour.mask_key, neighbour.share_key) for neighbour in request.neighbours}
        if len(keys) != len(request.neighbours):
            raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "a neighbour is named twice")
        encrypted = self._apply(request.round, lambda current: current.share_keys(keys))
        return learner_pb2.SecAggShares(
            shares=[learner_pb2.EncryptedShare(learner_id=peer, ciphertext=share) for peer, share in encrypted.items()]
        )

    def collect(self, request: learner_pb2.SecAggCollection) -> learner_pb2.Ack:
        """Stage 3: the neighbours to mask against, and their shares for this learner."""
        shares = {share.learner_id: share.ciphertext for share in request.shares}
        if len(shares) != len(request.shares):
            raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "two shares from the same neighbour")
        self._apply(request.round, lambda current: current.collect(list(shares), shares))
        return learner_pb2.Ack(success=True, message=f"masking against {len(shares)} neighbours in round {request.round}")

    def unmask(self, request: learner_pb2.SecAggUnmaskRequest) -> learner_pb2.SecAggRevealedShares:
        """Stage 4: the shares of the senders' self-mask seeds and of the dropped ones' mask keys; once per round."""
        revealed = self._apply(request.round, lambda current: current.reveal(list(request.survivors), list(request.dropped)))
        return learner_pb2.SecAggRevealedShares(
            shares=[learner_pb2.RevealedShare(learner_id=peer, self_seed=is_seed, value=value) for peer, is_seed, value in revealed]
        )

    def _apply(self, round_number: int, step: Callable[[secagg.LearnerRound], object]) -> object:
        """Run a stage on the round's state, under the lock; round mismatches and protocol errors become refusals."""
        with self._cond:
            current = self._round
            if current is None or current.round_number != round_number:
                where = "no round" if current is None else f"round {current.round_number}"
                raise rpc.RequestRefused(grpc.StatusCode.FAILED_PRECONDITION, f"round {round_number} was not set up here ({where} is)")
            try:
                result = step(current)
            except secagg.RevealRefused as error:
                raise rpc.RequestRefused(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None
            except secagg.SecAggError as error:
                raise rpc.RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
            self._cond.notify_all()
            return result

    def reached(self, round_number: int, collected: bool) -> secagg.LearnerRound | None:
        """The round's state once stage 1 (or with `collected`, stage 3: whom to mask against) is over for it, else None."""
        with self._cond:
            current = self._round
            if current is None or current.round_number != round_number or (collected and current.included is None):
                return None
            return current

    def newest_round(self) -> int:
        """The newest round set up here (0: none)."""
        with self._cond:
            return 0 if self._round is None else self._round.round_number

    def encode(
        self,
        current: secagg.LearnerRound,
        update: Mapping[str, torch.Tensor],
        round_state: Mapping[str, torch.Tensor],
        parameter_names: list[str],
        num_examples: int,
    ) -> np.ndarray:
        """An update as secure aggregation weighs and bounds it (secagg.encode_update), before masking; a copy of `update`."""
        weight = min(num_examples, self.weight_cap) / self.weight_cap if self.weight_cap else 1.0
        return secagg.encode_update(update, round_state, parameter_names, current.bound, weight)


def masked_tensors(current: secagg.LearnerRound, vector: np.ndarray, masks: secagg.MaskGenerator | None = None) -> dict[str, torch.Tensor]:
    """An encoded update masked for the round, as the one int32 tensor GradientData carries (`masks`: a kept generator)."""
    return {secagg.MASKED_TENSOR: torch.from_numpy(current.mask(vector, masks).view(np.int32))}


def refuse(context: grpc.ServicerContext, call: Callable[[], object]) -> object:
    """Run a stage's answer, or abort the call with the refusal's status."""
    try:
        return call()
    except rpc.RequestRefused as refusal:
        context.abort(refusal.code, str(refusal))
