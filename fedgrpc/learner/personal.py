"""A learner's personal part (the tensors --share keeps off the wire): kept across its sessions in memory and, with
--personal-dir, in checkpoint files on its own disk, so that a restarted learner gets it back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedgrpc import sharing
from fedgrpc.leader import checkpoint
from fedgrpc.learner.data import LearnerError
from fedgrpc.protos import leader_pb2
from fedgrpc.task import Task
from fedgrpc.transport import wire

logger = logging.getLogger(__name__)

KEPT_FILES = 2  # the newest personal checkpoints kept: one being written, one whole
# rounds whose personal part is kept in memory: an evaluation of round r's model may come while round r+1 trains
ROUNDS_KEPT = 2


class PersonalStore:
    """Where a learner keeps its personal tensors between rounds, sessions and (with a folder) restarts."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.tensors: dict[str, torch.Tensor] | None = None  # the newest personal part, as the last round left it
        self._by_round: dict[int, dict[str, torch.Tensor]] = {}  # the last rounds' parts, for evaluations of their models
        self.saves = 0  # personal checkpoints written, numbered on from a restored one (federations restart their rounds)
        self._read = False

    def restore(self, model: nn.Module, names: list[str]) -> bool:
        """Load the kept personal part of `names` into `model`: from memory, else from the folder. Whether there was one.

        A saved part is checked against the model's personal tensors (names, shapes, dtypes, finite values) before
        any of it is loaded: a file of another task, another --share or altered bytes stops the learner with the reason.
        """
        if not names:
            return False
        wanted = set(names)
        expected = checkpoint.manifest({name: tensor for name, tensor in model.state_dict().items() if name in wanted})
        if self.tensors is None and self.directory is not None and not self._read:
            self._read = True
            latest = checkpoint.latest(self.directory)
            if latest is not None:
                try:
                    record, self.tensors = checkpoint.load(latest, expected)
                except checkpoint.CheckpointError as error:
                    raise LearnerError(
                        f"--personal-dir {self.directory}: {error}; move the folder away to start this learner's personal part afresh"
                    ) from None
                self.saves = record["round"]
                logger.info("restored this learner's personal part (%d tensors) from %s", len(names), latest)
        if self.tensors is None:
            return False
        if checkpoint.manifest(self.tensors) != expected:  # kept in memory under another plan (a leader restarted differently)
            logger.warning("the kept personal part does not fit the plan's shared set; starting it afresh")
            self.tensors = None
            return False
        model.load_state_dict(self.tensors, strict=False)
        return True

    def of_round(self, round_number: int) -> dict[str, torch.Tensor]:
        """The personal part that went with round `round_number`'s update (evaluated with the model that round made), else
        the newest; empty before any."""
        return self._by_round.get(round_number, self.tensors or {})

    def keep(self, round_number: int, model: nn.Module, names: list[str]) -> None:
        """Keep the personal tensors `names` of `model` after round `round_number`; write them with a folder."""
        wanted = set(names)
        self.tensors = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items() if name in wanted}
        self._by_round = {kept: tensors for kept, tensors in self._by_round.items() if kept > round_number - ROUNDS_KEPT}
        self._by_round[round_number] = self.tensors
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.saves += 1
            checkpoint.save(self.directory, self.saves, self.tensors, {"personal": True, "after_round": round_number}, keep=KEPT_FILES)


def share_as_planned(
    model: nn.Module, plan: leader_pb2.TrainingPlan, task: Task | None, store: PersonalStore | None = None
) -> tuple[Any, list[str], list[wire.TensorSpec]]:
    """The model's shared part under the plan's --share, the names it keeps personal and the shared tensors' specs;
    with a `store`, the personal part it kept is loaded back into the model.

    LearnerError when this side's task shares other tensors than the leader's (the plan's shared_fingerprint).
    """
    names = sharing.shared_names(model, plan.share, task)
    shared = sharing.part(model, names)
    specs = wire.specs_of(shared.state_dict())
    if plan.shared_fingerprint and wire.fingerprint(specs) != plan.shared_fingerprint:
        raise LearnerError(
            f"under --share {plan.share} this side's {plan.model} shares other tensors than the leader's: hold the same task on both"
        )
    personal = sharing.personal_names(model, names)
    if personal and store is not None:
        restored = " (restored)" if store.restore(model, personal) else ""
        logger.info("--share %s: %d tensors federated, %d kept on this learner%s", plan.share, len(specs), len(personal), restored)
    return shared, personal, specs
