"""Resuming a run from its last checkpoint: the same weights as a run that was never interrupted."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import join_all, leader_config, running_leader, start_learners
from fedgrpc.leader import checkpoint
from fedgrpc.learner.training import batches_per_epoch, round_batches

ROOT = Path(__file__).resolve().parent.parent


def federate(config, resume_from: Path | None = None) -> dict[str, torch.Tensor]:
    with running_leader(config) as running:
        if resume_from is not None:
            running.leader.restore(resume_from)
        learners = start_learners(running.address, 2)
        running.leader.run()
        weights = {name: tensor.clone() for name, tensor in running.leader.model.state_dict().items()}
    assert join_all(learners) == [0, 0]
    return weights


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    # fedavg with server momentum, so the optimizer state must survive the restart too; the learners here restart as well,
    # so they keep no momentum (test_faults resumes with learners that live through it, keeping theirs)
    settings = dict(aggregation="fedavg", local_steps=3, batch_size=64, lr=0.05, server_momentum=0.5, augment=True, seed=11)
    settings.update(keep_momentum=False)
    straight = federate(leader_config(tmp_path / "straight", rounds=4, **settings))

    interrupted = leader_config(tmp_path / "resumed", rounds=2, **settings)
    federate(interrupted)
    latest = checkpoint.latest(Path(interrupted.checkpoint_dir))
    record, _ = checkpoint.load(latest)
    assert record["round"] == 2 and checkpoint.load_optimizer(latest, record)  # momentum buffers were saved
    resumed = federate(leader_config(tmp_path / "resumed", rounds=4, **settings), resume_from=latest)

    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0)


def test_round_batches_are_a_function_of_the_round_alone():
    from fedgrpc.protos import leader_pb2

    plan = leader_pb2.TrainingPlan(aggregation="fedavg", local_steps=2, batch_size=3, seed=5)
    assert batches_per_epoch(10, 3) == 3  # the last batch of one example is dropped
    first, second = round_batches(plan, 1, 10, 1), round_batches(plan, 1, 10, 2)
    assert [len(batch) for batch in first + second] == [3, 3, 3, 3]
    # round 1 and the first batch of round 2 make up one epoch: nine distinct examples
    assert len(set(torch.cat(first + second[:1]).tolist())) == 9
    assert all(torch.equal(a, b) for a, b in zip(second, round_batches(plan, 1, 10, 2), strict=False))
    assert not all(torch.equal(a, b) for a, b in zip(second, round_batches(plan, 0, 10, 2), strict=False))
