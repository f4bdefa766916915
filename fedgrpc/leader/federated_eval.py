"""Federated evaluation: learners evaluate a global model on their own held-out data; the leader keeps the weighted mean and spread."""

from __future__ import annotations

import copy
import logging
import math
import random
import statistics
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import torch
from torch import nn

from fedgrpc.data import Examples, derive_seed
from fedgrpc.leader.intake import RoundState
from fedgrpc.leader.roster import LearnerRecord, Roster
from fedgrpc.protos import learner_pb2
from fedgrpc.task import Task, evaluate, metrics_problem
from fedgrpc.transport import rpc

logger = logging.getLogger(__name__)

# A learner's evaluation may take this long beyond receiving the model: a held-out set of tens of thousands of
# examples on a CPU that is training the next round at the same time.
EVALUATE_SLACK_S = 600.0
# Most held-out examples a learner may claim: its report's weight in the mean (as MAX_LOCAL_EXAMPLES bounds training).
MAX_EVAL_EXAMPLES = 100_000_000
LOCAL_EVAL_BATCH_SIZE = 1000  # examples per batch when a learner evaluates a global model


@dataclass(frozen=True)
class Report:
    """One learner's checked evaluation: its example count, mean loss and metrics."""

    learner_id: int
    num_examples: int
    values: dict[str, float]  # "loss" and the task's metrics


def check_result(result: learner_pb2.EvaluateResult, round_number: int) -> dict[str, float]:
    """The result's numbers, or ValueError saying why they cannot be counted (wrong round, counts, names or values)."""
    if result.round != round_number:
        raise ValueError(f"the result is for round {result.round}, not {round_number}")
    if not 0 < result.num_examples <= MAX_EVAL_EXAMPLES:
        raise ValueError(f"num_examples must be in 1..{MAX_EVAL_EXAMPLES}, got {result.num_examples}")
    values = checked_values(result.loss, result.metrics)
    if result.personalized:  # the same numbers after the plan's personal_steps of fine-tuning
        values.update(checked_values(result.personal_loss, result.personal_metrics, prefix="personal_"))
    return values


def checked_values(loss: float, metrics: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """A loss and its metrics under their names (with `prefix`), or ValueError when they cannot be counted."""
    problem = metrics_problem(metrics) or (None if math.isfinite(loss) else "loss is not finite")
    if problem is not None:
        raise ValueError(f"personal metrics: {problem}" if prefix else problem)
    return {f"{prefix}loss": loss, **{f"{prefix}{name}": value for name, value in metrics.items()}}


def summarize(reports: Sequence[Report]) -> dict[str, float | int]:
    """metrics.jsonl's federated evaluation entries: per value, the mean weighted by examples and the min, median and max.

    Only values every report carries are summarized, so that a mean is always over the same learners.
    """
    if not reports:
        return {}
    names = set(reports[0].values).intersection(*(report.values for report in reports[1:]))
    total = sum(report.num_examples for report in reports)
    summary: dict[str, float | int] = {"fed_eval_learners": len(reports), "fed_eval_examples": total}
    for name in sorted(names):
        values = [report.values[name] for report in reports]
        summary[f"fed_eval_{name}"] = sum(report.values[name] * report.num_examples for report in reports) / total
        summary[f"fed_eval_{name}_min"] = min(values)
        summary[f"fed_eval_{name}_median"] = statistics.median(values)
        summary[f"fed_eval_{name}_max"] = max(values)
    return summary


def choose(records: Sequence[LearnerRecord], count: int, seed: int, round_number: int) -> list[LearnerRecord]:
    """The learners asked to evaluate: all of them (count 0 or at least as many), else a seeded sample of `count`."""
    ordered = sorted(records, key=lambda record: record.learner_id)
    if count <= 0 or count >= len(ordered):
        return ordered
    return sorted(random.Random(derive_seed(seed, "evaluate", round_number)).sample(ordered, count), key=lambda record: record.learner_id)


class FederatedEvaluation:
    """Sends a global model to learners with Evaluate, checks each answer, and marks a learner that fails absent."""

    def __init__(self, roster: Roster, calls: Executor, learners: int, seed: int) -> None:
        self.roster = roster
        self._calls = calls
        self.learners = learners  # --evaluation-learners (0: all)
        self.seed = seed

    def run(self, finished: RoundState, states: list[bytes], nbytes: int, stop: Callable[[], bool]) -> dict[str, float | int]:
        """Ask the chosen learners among those that reported in `finished` to evaluate the model it made (framed as `states`).

        A simulation pool's learners are left out: they hold no data of their own to evaluate on. Returns the summary.
        """
        round_number = finished.round_number
        reporters = {key if isinstance(key, int) else key[0] for key in finished.digests}
        records = [record for learner_id, record in finished.member_records.items() if learner_id in reporters and not record.pooled]
        chosen = choose([record for record in records if record.alive], self.learners, self.seed, round_number)
        reports: list[Report] = []
        lock = threading.Lock()
        timeout = rpc.transfer_timeout(nbytes) + EVALUATE_SLACK_S

        def evaluate(record: LearnerRecord) -> None:
            metadata = rpc.token_metadata(record.callback_token)
            try:
                result = record.stub.Evaluate(iter(states), timeout=timeout, metadata=metadata)
                values = check_result(result, round_number)
            except grpc.RpcError as error:
                self.roster.mark_absent_on_error(record, "evaluation", f"{error.code().name}: {error.details()}")
                return
            except ValueError as error:  # an answer that cannot be counted: as a malformed update, the learner is dropped
                self.roster.mark_absent_on_error(record, "evaluation", f"its result was refused: {error}")
                return
            with lock:
                reports.append(Report(record.learner_id, result.num_examples, values))

        futures = [self._calls.submit(evaluate, record) for record in chosen]
        for future in futures:
            while not stop():
                try:
                    future.result(timeout=0.5)  # a slice, so that a shutdown is not kept waiting for a slow learner
                    break
                except TimeoutError:
                    continue
        with lock:
            return summarize(sorted(reports, key=lambda report: report.learner_id))


class LocalEvaluation:
    """A learner's side: global models evaluated on its own held-out data, in a copy of its model, one at a time."""

    def __init__(
        self,
        task: Task,
        data: Examples,
        model: nn.Module,
        device: torch.device,
        stopping: Callable[[], bool],
        personal: Callable[[int], dict[str, torch.Tensor]] | None = None,
        loaded: Collection[str] | None = None,
    ) -> None:
        self.task = task
        self.data = data
        self.device = device
        self._stopping = stopping
        # a copy: a client's task hands over the script's own model, which trains meanwhile; frozen parameters that
        # no evaluation loads (a pretrained base under adapters; `loaded`: the names a global model carries) are
        # shared with the model rather than copied, since nothing writes them
        frozen = {
            id(parameter): parameter
            for name, parameter in model.named_parameters()
            if not parameter.requires_grad and loaded is not None and name not in loaded
        }
        self._model = copy.deepcopy(model, memo=frozen)
        self._lock = threading.Lock()
        # the learner's personal part (--share) after a round, by round: evaluated with the shared part that round made
        self._personal = personal
        # with the plan's personal_steps: fine-tunes the copy in place on the learner's own data (LocalTrainer.finetune)
        self.finetune: Callable[[nn.Module, int], None] | None = None

    def evaluate(self, round_number: int, state: dict[str, torch.Tensor]) -> learner_pb2.EvaluateResult:
        """Evaluate round `round_number`'s global model (its tensors `state`); ValueError when a stop cut it short."""
        with self._lock:
            self._model.load_state_dict(state, strict=self._personal is None)
            if self._personal is not None:
                self._model.load_state_dict(self._personal(round_number), strict=False)
            values = evaluate(self._model, self.task, self.data, self.device, LOCAL_EVAL_BATCH_SIZE, stop=self._stopping)
            tuned = None
            if values is not None and self.finetune is not None:
                self.finetune(self._model, round_number)
                tuned = evaluate(self._model, self.task, self.data, self.device, LOCAL_EVAL_BATCH_SIZE, stop=self._stopping)
        if values is None or (self.finetune is not None and tuned is None):
            raise ValueError("stopping: the evaluation was cut short")
        loss = values.pop("loss")
        logger.info("round %d: evaluated the global model on %d own examples: loss %.4f %s", round_number, len(self.data), loss, values)
        result = learner_pb2.EvaluateResult(round=round_number, num_examples=len(self.data), loss=loss, metrics=values)
        if tuned is not None:
            result.personalized = True
            result.personal_loss = tuned.pop("loss")
            result.personal_metrics.update(tuned)
            logger.info("round %d: after fine-tuning: loss %.4f %s", round_number, result.personal_loss, tuned)
        return result
