"""Secure aggregation (SecAgg+): the protocol's arithmetic by hand, the learner's refusals over a real socket, and whole
rounds with real leaders and learners that end where plain averaging does while the leader sees only masked updates."""

from __future__ import annotations

import copy
import math

import grpc
import numpy as np
import pytest
import torch
from test_round import LR, MOMENTUM, SEED, WEIGHT_DECAY, train_locally

from conftest import join_all, leader_config, refusal, running_leader, start_learners
from fedgrpc.algorithms import aggregation, secagg
from fedgrpc.config.options import parse_leader_config
from fedgrpc.data import load_dataset, normalize, split_iid
from fedgrpc.leader import secure_rounds
from fedgrpc.learner.main import Learner, LearnerConfig, create_server
from fedgrpc.learner.secagg_party import SecAggParty
from fedgrpc.protos import learner_pb2, learner_pb2_grpc
from fedgrpc.transport import rpc, wire

BOUND = 4.0
LENGTH = 5000


def set_up(members: list[int], round_number: int = 1, neighbours: int = 0, bound: float = BOUND):
    """A round's protocol objects after stages 1-3: the leader's and each learner's."""
    k, t = secagg.round_parameters(len(members), neighbours)
    leader = secagg.LeaderRound(round_number, secagg.neighbour_graph(members, k, seed=7), t)
    learners = {member: secagg.LearnerRound(round_number, member, len(members), t, bound) for member in members}
    for member, learner in learners.items():
        leader.add_keys(member, *learner.public_keys())
    for member, learner in learners.items():
        leader.add_shares(member, learner.share_keys(leader.neighbour_keys(member)))
    for member, learner in learners.items():
        learner.collect(*leader.collection_for(member))
        leader.included.add(member)
    return leader, learners


def unmask(leader, learners, updates, senders, answering):
    """Stages 3-4: the senders' masked sum, the shares of those `answering`, and the unmasked sum as floats."""
    total = np.zeros(LENGTH, dtype=np.uint32)
    for member in senders:
        np.add(total, learners[member].mask(updates[member].copy()), out=total)
    for member in answering:
        survivors, dropped = leader.unmask_request(member, set(senders))
        leader.add_revealed(member, learners[member].reveal(survivors, dropped), survivors, dropped)
    leader.unmask(total, set(senders))
    return secagg.dequantize(total, secagg.fixed_point_scale(BOUND, leader.cohort))


def random_updates(members: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    generator = np.random.default_rng(seed)
    return {member: generator.uniform(-BOUND, BOUND, LENGTH) for member in members}


# ---- the protocol's arithmetic ------------------------------------------------------------------------------------


def test_the_unmasked_sum_equals_the_plain_sum_within_the_quantization_step():
    members = list(range(12))
    leader, learners = set_up(members)
    updates = random_updates(members)
    step = 1 / secagg.fixed_point_scale(BOUND, len(members))
    got = unmask(leader, learners, updates, members, members)
    plain = sum(updates.values())
    assert np.abs(got - plain).max() <= len(members) * step / 2  # each learner's rounding is at most half a step
    assert step < 1e-5


def test_learners_that_drop_before_or_after_sending_are_both_unmasked():
    members = list(range(12))
    leader, learners = set_up(members)
    updates = random_updates(members, seed=1)
    dropped_before = {3}  # shared its keys, then sent no update: its pairwise masks in the others' updates are removed
    dropped_after = {8}  # sent its update, then never answered the unmasking: its self mask is rebuilt from its neighbours
    senders = [member for member in members if member not in dropped_before]
    answering = [member for member in senders if member not in dropped_after]
    got = unmask(leader, learners, updates, senders, answering)
    plain = sum(updates[member] for member in senders)
    step = 1 / secagg.fixed_point_scale(BOUND, len(members))
    assert np.abs(got - plain).max() <= len(senders) * step / 2
    assert leader.revealed_keys.keys() == dropped_before  # only the learner that sent nothing has its mask key rebuilt


def test_what_the_leader_receives_from_one_learner_is_indistinguishable_from_uniform():
    members = list(range(6))
    _, learners = set_up(members)
    zeros = np.zeros(LENGTH)  # the most structured update there is
    masked = learners[0].mask(zeros)

    def chi_square(values: np.ndarray) -> float:
        counts = np.bincount((values >> 24).astype(np.int64), minlength=256)  # the top byte of each entry
        expected = values.size / 256
        return float(((counts - expected) ** 2 / expected).sum())

    # 255 degrees of freedom: above 400 has a probability of about 1e-8 for uniform bytes
    assert chi_square(masked) < 400
    assert chi_square(secagg.quantize(zeros, 1.0)) > 100_000  # the same test sees the unmasked update at once
    assert abs(float(masked.mean()) / 2**32 - 0.5) < 0.02


def test_fewer_than_the_threshold_aborts_the_unmasking():
    members = list(range(6))
    leader, learners = set_up(members)
    updates = random_updates(members, seed=2)
    t = leader.threshold
    senders = set(members[: t - 1])
    survivors, dropped = leader.unmask_request(0, senders)
    with pytest.raises(secagg.RevealRefused, match="are needed"):  # a learner will not help unmask so small a sum
        learners[0].reveal(survivors, dropped)
    with pytest.raises(secagg.SecAggError, match="threshold"):  # nor will the leader try
        leader.unmask(np.zeros(LENGTH, dtype=np.uint32), senders)
    leader, learners = set_up(members)
    with pytest.raises(secagg.SecAggError, match="shares of learner"):  # everyone sent, too few came back with shares
        unmask(leader, learners, updates, members, members[: t - 1])


def test_an_honest_learner_never_reveals_both_secrets_of_a_peer():
    members = list(range(6))
    leader, learners = set_up(members)
    learner = learners[0]
    peers = leader.collection_for(0)[0]
    with pytest.raises(secagg.RevealRefused, match="both"):
        learner.reveal([0, *peers], [peers[0]])
    answer = learner.reveal([0, *peers[1:]], [peers[0]])
    # one share per peer: the self-mask seed's of those that sent, the mask key's of the one that dropped
    assert sorted((owner, is_seed) for owner, is_seed, _ in answer) == sorted([(peers[0], False)] + [(peer, True) for peer in peers[1:]])
    with pytest.raises(secagg.RevealRefused, match="once"):  # a second request, even the complementary one, is refused
        learner.reveal([0, peers[0]], peers[1:])


def test_shares_of_the_wrong_size_or_replayed_from_another_round_are_refused():
    members = list(range(5))
    leader, _ = set_up(members, round_number=1)
    later, learners = set_up(members, round_number=2)
    old_shares = {sender: shares for sender, shares in leader.shares.items()}

    fresh = secagg.LeaderRound(3, later.graph, later.threshold)
    keyed = {member: secagg.LearnerRound(3, member, 5, later.threshold, BOUND) for member in members}
    for member, learner in keyed.items():
        fresh.add_keys(member, *learner.public_keys())
    encrypted = keyed[0].share_keys(fresh.neighbour_keys(0))
    short = {peer: share[:-1] for peer, share in encrypted.items()}
    with pytest.raises(secagg.SecAggError, match="bytes"):
        fresh.add_shares(0, short)
    fresh.add_shares(0, encrypted)
    with pytest.raises(secagg.SecAggError, match="already"):
        fresh.add_shares(0, encrypted)

    receiver = 1
    peers, shares = later.collection_for(receiver)
    fresh_learner = secagg.LearnerRound(2, receiver, 5, later.threshold, BOUND)
    fresh_learner.neighbours = learners[receiver].neighbours
    replayed = {peer: old_shares[peer][receiver] for peer in peers}  # round 1's shares, sent again in round 2
    with pytest.raises(secagg.SecAggError, match="replayed"):
        fresh_learner.collect(peers, replayed)
    with pytest.raises(secagg.SecAggError, match="bytes"):
        fresh_learner.collect(peers, {peer: share + b"x" for peer, share in shares.items()})


def test_the_neighbour_graph_is_k_regular_and_symmetric_and_the_defaults_grow_with_log_n():
    graph = secagg.neighbour_graph(list(range(100)), 20, seed=3)
    assert all(len(peers) == 20 and member not in peers for member, peers in graph.items())
    assert all(member in graph[peer] for member, peers in graph.items() for peer in peers)
    assert secagg.round_parameters(100) == (20, 11)
    assert secagg.round_parameters(1000) == (30, 16)
    assert secagg.round_parameters(4) == (3, 2)  # a small round: everyone is everyone's neighbour


def test_an_update_is_clipped_weighted_and_decoded_to_the_weighted_mean():
    state = {"w": torch.zeros(2), "bn.running_mean": torch.tensor([1.0]), "bn.num_batches_tracked": torch.tensor(5)}
    first = {"w": torch.tensor([3.0, 4.0]), "bn.running_mean": torch.tensor([2.0]), "bn.num_batches_tracked": torch.tensor(9)}
    second = {"w": torch.tensor([1.0, 0.0]), "bn.running_mean": torch.tensor([0.0]), "bn.num_batches_tracked": torch.tensor(9)}
    # norm 5 is clipped to 2.5: (1.5, 2); the buffer is sent as its change from the round's model, +1 and -1
    encoded_first = secagg.encode_update(first, state, ["w"], 2.5, 0.5)
    np.testing.assert_allclose(encoded_first, [0.75, 1.0, 0.5, 0.5])
    encoded_second = secagg.encode_update(second, state, ["w"], 2.5, 1.0)
    np.testing.assert_allclose(encoded_second, [1.0, 0.0, -1.0, 1.0])
    mean = secagg.decode_mean(encoded_first + encoded_second, state, ["w"])
    torch.testing.assert_close(mean["w"], torch.tensor([(0.5 * 1.5 + 1.0) / 1.5, (0.5 * 2.0) / 1.5]))
    torch.testing.assert_close(mean["bn.running_mean"], torch.tensor([1.0 + (0.5 - 1.0) / 1.5]))
    assert int(mean["bn.num_batches_tracked"]) == 5  # integer counters are not aggregated: the round's model keeps its own


# ---- the learner's stage calls over a real socket --------------------------------------------------------------


@pytest.fixture
def learner_server(channel_to):
    learner = Learner(LearnerConfig(leader="127.0.0.1:1", device="cpu"))
    learner.learner_id = 0
    server, port, _ = create_server(learner, "127.0.0.1", 0)
    try:
        yield learner, learner_pb2_grpc.LearnerServiceStub(channel_to(f"127.0.0.1:{port}"))
    finally:
        server.stop(None)


def refused(call, *args, token: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=10, metadata=rpc.token_metadata(token))
    return caught.value.code()


def test_a_learner_refuses_stage_calls_that_do_not_fit(learner_server):
    learner, stub = learner_server
    token = learner.callback_token
    metadata = rpc.token_metadata(token)
    members = [0, 1, 2, 3]
    setup = learner_pb2.SecAggSetup(round=4, learner_id=0, cohort_size=4, threshold=2, bound=BOUND, weight_cap=0)
    assert refused(
        stub.AdvertiseKeys, learner_pb2.SecAggSetup(round=4, learner_id=1, cohort_size=4, threshold=2, bound=BOUND), token=token
    ) == (grpc.StatusCode.PERMISSION_DENIED)
    assert refused(stub.ShareKeys, learner_pb2.SecAggNeighbourKeys(round=4), token=token) == grpc.StatusCode.FAILED_PRECONDITION
    keys = stub.AdvertiseKeys(setup, timeout=10, metadata=metadata)
    assert len(keys.mask_key) == len(keys.share_key) == secagg.KEY_BYTES

    others = {member: secagg.LearnerRound(4, member, 4, 2, BOUND) for member in members[1:]}
    neighbours = [
        learner_pb2.NeighbourKeys(learner_id=member, mask_key=other.public_keys()[0], share_key=other.public_keys()[1])
        for member, other in others.items()
    ]
    assert refused(stub.ShareKeys, learner_pb2.SecAggNeighbourKeys(round=5, neighbours=neighbours), token=token) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    shares = stub.ShareKeys(learner_pb2.SecAggNeighbourKeys(round=4, neighbours=neighbours), timeout=10, metadata=metadata)
    assert sorted(share.learner_id for share in shares.shares) == [1, 2, 3]
    assert all(len(share.ciphertext) == secagg.ENCRYPTED_SHARE_BYTES for share in shares.shares)

    own = {0: (keys.mask_key, keys.share_key)}
    party_round = learner.secagg._round
    # each neighbour's encrypted share for learner 0
    for_zero = {}
    for member, other in others.items():
        for_zero[member] = other.share_keys({**own, **{m: o.public_keys() for m, o in others.items() if m != member}})[0]
    wrong_size = learner_pb2.SecAggCollection(
        round=4, shares=[learner_pb2.EncryptedShare(learner_id=m, ciphertext=c[:-3]) for m, c in for_zero.items()]
    )
    assert refused(stub.CollectMasked, wrong_size, token=token) == grpc.StatusCode.INVALID_ARGUMENT
    assert party_round.included is None  # nothing was taken in
    good = learner_pb2.SecAggCollection(
        round=4, shares=[learner_pb2.EncryptedShare(learner_id=m, ciphertext=c) for m, c in for_zero.items()]
    )
    assert stub.CollectMasked(good, timeout=10, metadata=metadata).success
    assert party_round.included == [1, 2, 3]

    both = learner_pb2.SecAggUnmaskRequest(round=4, survivors=[0, 1, 2], dropped=[2, 3])
    assert refused(stub.Unmask, both, token=token) == grpc.StatusCode.FAILED_PRECONDITION
    ask = learner_pb2.SecAggUnmaskRequest(round=4, survivors=[0, 1, 2], dropped=[3])
    revealed = stub.Unmask(ask, timeout=10, metadata=metadata)
    assert sorted((share.learner_id, share.self_seed) for share in revealed.shares) == [(1, True), (2, True), (3, False)]
    assert refused(stub.Unmask, ask, token=token) == grpc.StatusCode.FAILED_PRECONDITION  # once per round


def test_a_share_replayed_from_an_earlier_round_is_refused_over_the_wire(learner_server):
    learner, stub = learner_server
    metadata = rpc.token_metadata(learner.callback_token)
    captured = {}
    peers = {}
    for round_number in (1, 2):
        keys = stub.AdvertiseKeys(
            learner_pb2.SecAggSetup(round=round_number, learner_id=0, cohort_size=4, threshold=2, bound=BOUND),
            timeout=10,
            metadata=metadata,
        )
        peers = {member: secagg.LearnerRound(round_number, member, 4, 2, BOUND) for member in (1, 2, 3)}
        neighbours = [
            learner_pb2.NeighbourKeys(learner_id=member, mask_key=peer.public_keys()[0], share_key=peer.public_keys()[1])
            for member, peer in peers.items()
        ]
        stub.ShareKeys(learner_pb2.SecAggNeighbourKeys(round=round_number, neighbours=neighbours), timeout=10, metadata=metadata)
        captured[round_number] = {}
        for member, peer in peers.items():
            others = {m: p.public_keys() for m, p in peers.items() if m != member}
            captured[round_number][member] = peer.share_keys({0: (keys.mask_key, keys.share_key), **others})[0]
    replay = learner_pb2.SecAggCollection(
        round=2, shares=[learner_pb2.EncryptedShare(learner_id=m, ciphertext=c) for m, c in captured[1].items()]
    )
    assert refused(stub.CollectMasked, replay, token=learner.callback_token) == grpc.StatusCode.INVALID_ARGUMENT
    good = learner_pb2.SecAggCollection(
        round=2, shares=[learner_pb2.EncryptedShare(learner_id=m, ciphertext=c) for m, c in captured[2].items()]
    )
    assert stub.CollectMasked(good, timeout=10, metadata=metadata).success


# ---- whole rounds -------------------------------------------------------------------------------------------------

SHARD = 1000  # batch size: each learner's batch is its whole shard


def test_a_secure_fedavg_round_equals_the_weighted_average_and_the_leader_sees_only_masked_updates(tmp_path, monkeypatch):
    received: list[np.ndarray] = []
    add = secure_rounds.SecureRound.add

    def recording_add(self, learner_id, masked):
        received.append(masked.copy())
        add(self, learner_id, masked)

    def never(*args, **kwargs):
        raise AssertionError("an update reached a plain sum: the leader held it unmasked")

    monkeypatch.setattr(secure_rounds.SecureRound, "add", recording_add)
    monkeypatch.setattr(aggregation.RunningMean, "add", never)
    monkeypatch.setattr(aggregation.UpdateList, "add", never)
    steps, count = 3, 3
    config = leader_config(
        tmp_path,
        seed=SEED,
        learners=count,
        batch_size=SHARD,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        aggregation="fedavg",
        local_steps=steps,
        secure_aggregation=True,
        max_norm_ratio=0.0,
    )
    with running_leader(config) as running:
        initial = copy.deepcopy(running.leader.model.state_dict())
        learners = start_learners(running.address, count)
        history = running.leader.run()
        final = {name: tensor.clone() for name, tensor in running.leader.model.state_dict().items()}
    assert join_all(learners) == [0] * count

    data = load_dataset("synthetic", None, train=True, seed=SEED)
    parts = split_iid(len(data), count, SEED)
    trained = [train_locally(initial, normalize(data.images[part]), data.labels[part], steps) for part in parts]
    sizes = [len(part) for part in parts]
    assert history[0]["learners_reported"] == count
    for name in initial:
        expected = sum(size * model[name] for size, model in zip(sizes, trained, strict=True)) / sum(sizes)
        torch.testing.assert_close(final[name], expected, atol=1e-5, rtol=0)
        assert not torch.allclose(final[name], initial[name]), f"{name} did not move"

    assert len(received) == count
    for masked in received:
        counts = np.bincount((masked >> 24).astype(np.int64), minlength=256)
        expected = masked.size / 256
        assert float(((counts - expected) ** 2 / expected).sum()) < 400  # uniform top bytes (255 degrees of freedom)
    model_bytes = wire.payload_bytes(wire.specs_of(initial))
    assert history[0]["bytes_in"] < 1.2 * count * model_bytes  # masked updates are float32-sized; the key stages add little


def test_fedsgd_with_a_server_optimizer_sampling_and_central_dp_runs_securely(tmp_path):
    config = leader_config(
        tmp_path,
        learners=4,
        rounds=2,
        aggregation="fedsgd",
        server_opt="adam",
        server_lr=0.01,
        fraction=0.75,
        clip_norm=1.0,
        dp_noise_multiplier=0.5,
        secure_aggregation=True,
        max_norm_ratio=0.0,
    )
    with running_leader(config) as running:
        initial = copy.deepcopy(running.leader.model.state_dict())
        learners = start_learners(running.address, 4)
        history = running.leader.run()
        final = running.leader.model.state_dict()
    assert join_all(learners) == [0] * 4
    assert [entry["learners_reported"] for entry in history] == [3, 3]
    assert all(entry["dp_epsilon"] > 0 for entry in history)
    assert any(not torch.equal(final[name], initial[name]) for name in initial)


def test_too_few_shares_at_unmasking_abort_the_round_and_keep_the_model(tmp_path, monkeypatch):
    unmask_call = SecAggParty.unmask

    def gone_in_round_two(self, request):
        if request.round == 2 and self._round.learner_id != 0:  # two of three vanish after sending their round-2 updates
            raise rpc.RequestRefused(grpc.StatusCode.UNAVAILABLE, "gone")
        return unmask_call(self, request)

    monkeypatch.setattr(SecAggParty, "unmask", gone_in_round_two)
    config = leader_config(
        tmp_path, learners=3, rounds=3, aggregation="fedavg", local_steps=1, secure_aggregation=True, max_norm_ratio=0.0, checkpoint_every=1
    )
    with running_leader(config) as running:
        learners = start_learners(running.address, 3)
        with pytest.raises(Exception, match="round 2: .*shares of learner .* came back; 2 are needed; the model is unchanged"):
            running.leader.run()
        after_round_one = copy.deepcopy(running.leader.history[0])
        model = {name: tensor.clone() for name, tensor in running.leader.model.state_dict().items()}
        published = running.leader.published().state(running.leader.specs)
        running.leader.stop_learners("test over")
    join_all(learners)
    assert after_round_one["round"] == 1 and len(running.leader.history) == 1
    for name, tensor in published.items():  # the model learners were sent for round 2 is the one the leader still holds
        assert torch.equal(model[name], tensor), name


def test_a_learner_that_vanishes_after_sending_still_counts_once_its_neighbours_reveal_its_seed(tmp_path, monkeypatch):
    unmask_call = SecAggParty.unmask
    vanished: list[int] = []

    def one_gone_in_round_two(self, request):
        if request.round == 2 and self._round.learner_id == 4:  # sent its round-2 update, then never answers
            vanished.append(4)
            raise rpc.RequestRefused(grpc.StatusCode.UNAVAILABLE, "gone")
        return unmask_call(self, request)

    monkeypatch.setattr(SecAggParty, "unmask", one_gone_in_round_two)
    config = leader_config(tmp_path, learners=5, rounds=2, aggregation="fedavg", local_steps=1, secure_aggregation=True, max_norm_ratio=0.0)
    with running_leader(config) as running:
        learners = start_learners(running.address, 5)
        history = running.leader.run()
    join_all(learners)
    assert vanished == [4]
    # its update is in round 2's sum: its self mask was rebuilt from its 4 neighbours' shares (3 are needed)
    assert [entry["learners_reported"] for entry in history] == [5, 5]
    assert all(math.isfinite(entry["train_loss"]) for entry in history)


# ---- the command line -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rule", "median"], "--rule median needs every update"),
        (["--max-update-norm", "5"], "--max-update-norm and --max-norm-ratio check each update's norm"),
        (["--max-norm-ratio", "3"], "--max-update-norm and --max-norm-ratio check each update's norm"),
        (["--compression", "int8"], "--compression int8 does not apply"),
        (["--learners", "2"], "needs 3 or more learners per round"),
    ],
)
def test_secure_aggregation_refuses_what_needs_each_update_in_one_line(capsys, flags, message):
    assert message in refusal(parse_leader_config, ["--secure-aggregation", "--learners", "4", *flags, "--run-dir", "unused"], capsys)


def test_secure_aggregation_turns_the_default_norm_check_off(tmp_path):
    config, _, _ = parse_leader_config(["--secure-aggregation", "--learners", "3", "--run-dir", str(tmp_path / "run")])
    assert config.secure_aggregation and config.max_norm_ratio == 0
    assert parse_leader_config(["--learners", "3", "--run-dir", str(tmp_path / "other")])[0].max_norm_ratio == 10.0
