"""Kept momentum, fedavg's default: each learner's momentum by round, so that a round replayed after a leader restart
starts where the uninterrupted run's did, and the id a rejoining learner asks back so that its split goes with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import utils
from conftest import leader_config, register_client, running_leader
from fedgrpc.config.options import parse_leader_config
from fedgrpc.leader.main import training_plan
from fedgrpc.learner.momentum import MomentumStore
from fedgrpc.learner.training import LocalTrainer
from fedgrpc.task import builtin_task


@pytest.mark.parametrize(
    ("flags", "kept"),
    [
        (["--aggregation", "fedavg"], True),
        (["--aggregation", "fedbuff"], True),
        (["--aggregation", "fedavg", "--no-keep-momentum"], False),
        (["--aggregation", "fedavg", "--fraction", "0.5"], False),  # a sampled learner's momentum is rounds old
        (["--aggregation", "fedavg", "--fraction", "0.5", "--keep-momentum"], True),
        (["--aggregation", "fedavg", "--momentum", "0"], False),
        (["--aggregation", "fedsgd"], False),  # the leader's optimizer holds fedsgd's momentum
    ],
)
def test_learners_keep_their_momentum_by_default_when_every_learner_trains_every_round(flags, kept):
    config, _, _ = parse_leader_config(["--dataset", "synthetic", *flags])
    assert config.keep_momentum is kept  # resolved when parsed, so that config.json records it
    if "fedbuff" not in flags:  # which refuses --deterministic (arrival order is its algorithm)
        assert config.checkpoint_every == 0
        # a resumed --deterministic run is exact if every round is written: learners keep only their last rounds' momentum
        deterministic, _, _ = parse_leader_config(["--dataset", "synthetic", "--deterministic", *flags])
        assert deterministic.checkpoint_every == (1 if kept else 0)


def trainer_and_rounds(store: MomentumStore) -> tuple[LocalTrainer, torch.nn.Module]:
    config = leader_config(Path("unused"), aggregation="fedavg", local_steps=4, batch_size=8, lr=0.05, keep_momentum=True)
    task = builtin_task("tiny-cnn", "synthetic", 10)
    torch.manual_seed(0)
    model = task.model()
    plan = training_plan(config, task, 10, [])
    data = utils.load_dataset("synthetic", None, train=True, seed=0)
    trainer = LocalTrainer(
        plan, 0, model, model, task, (data.images[:64], data.labels[:64]), torch.contiguous_format, False, kept=store, owner=0
    )
    return trainer, model


def test_a_round_replayed_after_a_leader_restart_starts_from_the_momentum_the_round_before_left():
    store = MomentumStore()
    trainer, model = trainer_and_rounds(store)
    global_model = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # every round starts here

    def round_update(trainer: LocalTrainer, round_number: int) -> dict[str, torch.Tensor]:
        trainer.model.load_state_dict(global_model)
        return trainer.train(round_number)[0]

    first = [round_update(trainer, number) for number in (1, 2, 3)]
    # the leader died writing round 2's checkpoint and restarted from round 1's: round 2 again in this session, then
    # round 3 in a new one (the learner rejoined)
    replayed = round_update(trainer, 2)
    renewed, _ = trainer_and_rounds(store)
    again = round_update(renewed, 3)
    # a trainer that keeps its optimizer without the rounds' momentum: round 2 again goes on from round 3's
    unkept, _ = trainer_and_rounds(MomentumStore())
    unkept.kept = None
    stale = [round_update(unkept, number) for number in (1, 2, 3, 2)][-1]
    for name in first[1]:
        assert torch.equal(replayed[name], first[1][name]), name
        assert torch.equal(again[name], first[2][name]), name
    assert any(not torch.equal(stale[name], first[1][name]) for name in first[1])


def test_kept_momentum_applies_only_to_the_data_and_model_that_made_it():
    parameters = [torch.zeros(3, 2), torch.zeros(4)]
    store = MomentumStore()
    store.keep(1, 0, [torch.ones(3, 2), None])
    assert [None if b is None else b.sum().item() for b in store.before(2, 0, parameters)] == [6.0, None]
    assert store.before(2, 1, parameters) is None  # another learner id's split made it
    assert store.before(2, 0, [torch.zeros(2, 3), torch.zeros(4)]) is None  # another model: dropped
    assert store.before(2, 0, parameters) is None
    store.keep(3, -1, [torch.ones(3, 2), None])
    assert store.before(3, -1, parameters) is None  # round 3 replayed: what round 3 left is gone, nothing before it
    for round_number in range(1, 7):  # copies are written over the oldest kept: each round still keeps its own values
        store.keep(round_number, -1, [torch.full((3, 2), float(round_number)), torch.full((4,), -float(round_number))])
    assert [store.before(number, -1, parameters)[1][0].item() for number in (6, 5)] == [-5.0, -4.0]
    assert store.before(4, -1, parameters) is None  # round 3 was older than the last three rounds (4, 5, 6)


def test_a_learner_registering_again_gets_its_former_id_when_the_slot_is_free(tmp_path, channel_to):
    with running_leader(leader_config(tmp_path, learners=3)) as running:
        channel, roster = channel_to(running.address), running.leader.roster
        assert register_client(channel, former_learner_id=2).learner_id == 2  # a restarted leader: the slot is unused
        assert register_client(channel).learner_id == 0  # a newcomer: the lowest unused slot
        assert register_client(channel, former_learner_id=2).learner_id == 1  # held by a live member: the next free one
        roster.mark_absent(roster.record(0), "gone")
        roster.mark_absent(roster.record(2), "gone")
        assert register_client(channel, former_learner_id=2).learner_id == 2  # an absent member's slot, out of turn
        assert register_client(channel, former_learner_id=9).learner_id == 0  # out of range: as a newcomer
        assert [record.learner_id for record in roster.alive()] == [0, 1, 2]
