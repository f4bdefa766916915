"""What a closed round reports: its record in metrics.jsonl and its line in the log."""

from __future__ import annotations

import time
from typing import Any

import torch

from fedgrpc.algorithms.strategy import Strategy
from fedgrpc.leader.intake import RoundState


def round_metrics(
    finished: RoundState,
    central: dict[str, float],
    federated: dict[str, float | int],
    strategy: Strategy,
    mean: dict[str, torch.Tensor],
    model_rejected: bool,
    most_training: int | None,
    round_seconds: float,
    elapsed_seconds: float,
) -> dict[str, Any]:
    """The round's record: who reported, losses, the leader's (`central`) and the learners' (`federated`) evaluations,
    bytes, norms, privacy spent; fedbuff's buffer (`most_training` set) and secure aggregation's stages where they ran."""
    aggregate_norm = strategy.parameter_norm(mean)
    accountant = strategy.accountant
    secure = finished.secure
    norms = finished.update_norms  # none under secure aggregation: the leader never sees an update
    buffered = most_training is not None  # fedbuff: the round's members are the learners whose updates filled its buffer
    return {
        "round": finished.round_number,
        "wall_time": time.time(),
        "learners_selected": len(finished.members),
        "learners_reported": len(finished.members) if buffered else finished.reported,
        "learners_dropped": 0 if buffered else len(finished.members) - finished.reported,
        "train_loss": sum(finished.losses) / len(finished.losses),
        "test_loss": central.get("loss"),
        "test_accuracy": central.get("accuracy"),
        **{f"test_{name}": value for name, value in central.items() if name not in ("loss", "accuracy")},
        **federated,
        "bytes_in": finished.bytes_in + (secure.bytes_in if secure is not None else 0),
        "bytes_out": finished.bytes_out + (secure.bytes_out if secure is not None else 0),
        "update_norm_mean": sum(norms) / len(norms) if norms else None,
        "update_norm_max": max(norms) if norms else None,
        "updates_rejected": sum(finished.rejected.values()),
        "updates_clipped": finished.clipped,
        "model_rejected": model_rejected,
        "aggregate_norm": aggregate_norm if aggregate_norm < float("inf") else None,
        **({"dp_epsilon": accountant.epsilon()} if accountant is not None else {}),
        **(
            {
                "updates_buffered": finished.reported,
                "staleness_mean": sum(finished.staleness) / len(finished.staleness),
                "staleness_max": max(finished.staleness),
                "updates_stale": finished.stale,
                "learners_training_max": most_training,
            }
            if buffered
            else {}
        ),
        **({"secagg_setup_seconds": secure.setup_seconds, "secagg_unmask_seconds": secure.unmask_seconds} if secure is not None else {}),
        "round_seconds": round_seconds,
        "elapsed_seconds": elapsed_seconds,
    }


def round_line(metrics: dict[str, Any], rounds: int) -> str:
    """The round's one log line: who reported, the training loss, the evaluations, the time."""
    reporters = (
        f"{metrics['updates_buffered']} updates from {metrics['learners_reported']} learners (staleness up to {metrics['staleness_max']})"
        if "updates_buffered" in metrics
        else f"{metrics['learners_reported']} learners"
    )
    return (
        f"round {metrics['round']}/{rounds}: {reporters}, train loss {metrics['train_loss']:.4f}, "
        f"{describe_evaluation(metrics)}, {metrics['round_seconds']:.1f}s"
    )


def describe_evaluation(metrics: dict[str, Any]) -> str:
    """The round's log line's evaluation part: the leader's test loss and accuracy, the learners' mean (min-max)."""
    parts = []
    if metrics.get("test_loss") is not None:
        accuracy = metrics.get("test_accuracy")
        parts.append(f"test loss {metrics['test_loss']:.4f}" + (f", test accuracy {100 * accuracy:.2f}%" if accuracy is not None else ""))
    if "fed_eval_loss" in metrics:
        text = f"learners' loss {metrics['fed_eval_loss']:.4f} ({metrics['fed_eval_loss_min']:.4f}-{metrics['fed_eval_loss_max']:.4f})"
        if "fed_eval_accuracy" in metrics:
            text += (
                f", accuracy {100 * metrics['fed_eval_accuracy']:.2f}% "
                f"({100 * metrics['fed_eval_accuracy_min']:.2f}-{100 * metrics['fed_eval_accuracy_max']:.2f}%)"
            )
        if "fed_eval_personal_accuracy" in metrics:  # --personal-steps
            text += f", {100 * metrics['fed_eval_personal_accuracy']:.2f}% after fine-tuning"
        parts.append(f"{text} over {metrics['fed_eval_learners']} learners")
    return ", ".join(parts) or "not evaluated"
