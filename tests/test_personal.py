"""Partial sharing (--share): what stays personal never reaches the leader, survives rounds and restarts, and is what each
learner is evaluated with."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import join_all, leader_config, running_leader, start_learners
from fedgrpc import sharing
from fedgrpc.config.options import parse_leader_config
from fedgrpc.leader import checkpoint
from fedgrpc.learner.data import LearnerError
from fedgrpc.learner.personal import PersonalStore
from fedgrpc.task import evaluate, load_task
from fedgrpc.transport import wire

# Each site draws its rows around the same four class centres, from its own classes and shifted by its own offset: a
# label skew (FedPer's case) and a feature shift (FedBN's case). The model names its parts, so that tests can find them.
SITE_TASK = """
    import json
    from pathlib import Path

    import torch
    from torch import nn

    CENTRES = torch.randn(4, 4, generator=torch.Generator().manual_seed(7)) * 3

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)
            self.body = nn.Linear(4, 16)
            self.head = nn.Linear(16, 4)

        def forward(self, rows):
            return self.head(torch.relu(self.body(self.norm(rows))))

    def model():
        return Net()

    def _site(data_dir, offset, count):
        spec = {"classes": [0, 1, 2, 3], "shift": 0.0, "seed": 0}  # the leader's: every class, no shift
        if data_dir is not None and (Path(data_dir) / "site.json").exists():
            spec = json.loads((Path(data_dir) / "site.json").read_text())
        generator = torch.Generator().manual_seed(spec["seed"] + offset)
        classes = torch.tensor(spec["classes"])
        labels = classes[torch.randint(len(classes), (count,), generator=generator)]
        rows = CENTRES[labels] + 0.5 * torch.randn(count, 4, generator=generator) + spec["shift"]
        return torch.utils.data.TensorDataset(rows, labels)

    def train_data(data_dir):
        return _site(data_dir, 0, 256)

    def test_data(data_dir):
        return _site(data_dir, 1000, 128)
"""
HEAD = ["head.weight", "head.bias"]
NORM = ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]


def site_task(tmp_path: Path, sites: list[dict]) -> tuple[Path, list[str]]:
    """The task file and one data folder per site."""
    path = tmp_path / "sites_task.py"
    path.write_text(textwrap.dedent(SITE_TASK))
    folders = []
    for index, site in enumerate(sites):
        folder = tmp_path / f"site{index}"
        folder.mkdir()
        (folder / "site.json").write_text(json.dumps({"seed": index + 1, **site}))
        folders.append(str(folder))
    return path, folders


def federate(tmp_path: Path, task: Path, sites: list[str], learner_flags: list[list[str]] | None = None, **settings):
    """A leader and one learner per site over loopback gRPC; returns (leader, history)."""
    settings = {"local_steps": 30, **settings}
    config = leader_config(tmp_path, task=str(task), data_mode="local", aggregation="fedavg", batch_size=32, lr=0.05, **settings)
    with running_leader(config) as running:
        threads = []
        for index, site in enumerate(sites):
            extra = ["--task", str(task), "--data-dir", site, *(learner_flags[index] if learner_flags else [])]
            threads += start_learners(running.address, 1, extra)
        history = running.leader.run()
        assert join_all(threads) == [0] * len(sites)
    return running.leader, history


def saved_personal(folder: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.latest(folder))[1]


# ---- which tensors each preset shares -------------------------------------------------------------------------------


def test_each_preset_shares_what_its_recipe_names(tmp_path):
    task = load_task(str(site_task(tmp_path, [])[0]))
    model = task.model()
    everything = list(model.state_dict())
    assert sharing.shared_names(model, "all") == everything
    assert sharing.shared_names(model, "fedper") == [name for name in everything if name not in HEAD]
    assert sharing.shared_names(model, "fedbn") == [name for name in everything if name not in NORM]
    model.norm.requires_grad_(False)
    model.body.requires_grad_(False)
    assert sharing.shared_names(model, "adapters") == HEAD  # only what trains; buffers stay
    # frozen weights are every machine's alike: a learner keeps (and saves, and copies) only what its training moves
    assert sharing.personal_names(model, HEAD) == ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]


def test_an_evaluation_copy_shares_the_frozen_base_instead_of_copying_it(tmp_path):
    from fedgrpc.leader.federated_eval import LocalEvaluation

    task = load_task(str(site_task(tmp_path, [])[0]))
    model = task.model()
    model.body.requires_grad_(False)
    shared = sharing.shared_names(model, "adapters")  # the head and the norm's affine parameters
    evaluation = LocalEvaluation(task, task.test_data(None), model, torch.device("cpu"), lambda: False, loaded=shared)
    copied = dict(evaluation._model.named_parameters())
    for name, parameter in model.named_parameters():
        assert (copied[name].data_ptr() == parameter.data_ptr()) == name.startswith("body.")
    # a frozen tensor that a global model carries (--share all) is loaded into the copy, so the copy has its own
    everything = LocalEvaluation(task, task.test_data(None), model, torch.device("cpu"), lambda: False, loaded=list(model.state_dict()))
    own = dict(everything._model.named_parameters())
    assert all(own[name].data_ptr() != parameter.data_ptr() for name, parameter in model.named_parameters())


@pytest.mark.parametrize(
    ("preset", "module", "message"),
    [
        ("fedbn", nn.Linear(2, 2), "--share fedbn: this model has no normalization layers to keep local"),
        ("fedper", nn.Linear(2, 2), "--share fedper: the model's only module is its head"),
        ("adapters", nn.Linear(2, 2).requires_grad_(False), "--share adapters: no trainable parameter would be shared"),
    ],
)
def test_a_preset_that_shares_nothing_or_everything_it_should_not_is_refused(preset, module, message):
    with pytest.raises(sharing.SharingError, match=message):
        sharing.shared_names(module, preset)


def test_a_tasks_own_choice_is_checked_against_the_model(tmp_path):
    path = site_task(tmp_path, [])[0]
    path.write_text(path.read_text() + "\ndef shared(model):\n    return ['body.weight', 'body.bias', 'tail.weight']\n")
    task = load_task(str(path))
    with pytest.raises(Exception, match="shared\\(\\) names 'tail.weight', which is not in the model's state dict"):
        sharing.shared_names(task.model(), sharing.TASK_SHARE, task)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--share", "fedper", "--aggregation", "fedsgd"], "--share fedper needs local training"),
        (["--share", "fedbn", "--aggregation", "fedavg", "--recompute-bn", "100"], "--recompute-bn needs the whole model on the leader"),
    ],
)
def test_settings_that_cannot_keep_a_part_personal_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_leader_config(flags)
    assert stopped.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err.splitlines()[0]


def test_the_leader_refuses_to_evaluate_a_model_whose_head_it_never_sees(tmp_path, capsys):
    from fedgrpc.leader import main as leader_main

    task = site_task(tmp_path, [])[0]
    flags = "--share fedper --aggregation fedavg --evaluation leader --port 0 --run-dir"
    argv = ["--task", str(task), *flags.split(), str(tmp_path / "run")]
    assert leader_main.main(argv) == 2
    assert "each learner keeps part of this model (--share), so the leader holds no whole model" in capsys.readouterr().err


# ---- over real gRPC ------------------------------------------------------------------------------------------------


def test_fedper_heads_never_reach_the_leader_and_each_learner_is_evaluated_with_its_own(tmp_path, monkeypatch, caplog):
    task_path, sites = site_task(tmp_path, [{"classes": [0, 1], "shift": 0.0}, {"classes": [2, 3], "shift": 0.0}])
    seen: list[set[str]] = []  # the tensors of every stream read in this process: models learners fetch, updates the leader takes
    real_receive = wire.receive

    def recording_receive(*args, **kwargs):
        received = real_receive(*args, **kwargs)
        seen.append(set(received.tensors))
        return received

    monkeypatch.setattr(wire, "receive", recording_receive)
    untouched: list[bool] = []  # loading a global model into a learner never changes its personal part
    real_load = sharing.SharedPart.load_state_dict

    def checked_load(self, state):
        personal = sharing.personal_names(self.model, list(self.names))
        before = sharing.personal_state(self.model, personal)
        real_load(self, state)
        after = sharing.personal_state(self.model, personal)
        untouched.append(sorted(before) == sorted(HEAD) and all(torch.equal(before[name], after[name]) for name in HEAD))

    monkeypatch.setattr(sharing.SharedPart, "load_state_dict", checked_load)
    caplog.set_level(logging.DEBUG, logger="fedgrpc")
    dirs = [tmp_path / "personal0", tmp_path / "personal1"]
    leader, history = federate(tmp_path, task_path, sites, [["--personal-dir", str(folder)] for folder in dirs], share="fedper", rounds=3)

    shared = [name for name in leader.model.state_dict() if name not in HEAD]
    assert [spec.name for spec in leader.specs] == shared
    assert len(seen) >= 12 and all(names == set(shared) for names in seen)  # 3 rounds x 2 learners x (model + update)
    assert untouched and all(untouched)
    weights = saved_personal_leader = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))[1]
    assert sorted(saved_personal_leader) == sorted(shared)
    leader_lines = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("fedgrpc.leader"))
    assert "head." not in leader_lines and "head." not in json.dumps(history)
    assert history[-1]["test_loss"] is None  # auto: the learners evaluate, since the leader's head is no one's

    # each learner kept its own head (one learned classes 0-1, the other 2-3), and the federation's evaluation is of
    # the global shared part with each learner's head, on its own test data, by hand
    task = load_task(str(task_path))
    heads = [saved_personal(folder) for folder in dirs]
    assert all(sorted(head) == sorted(HEAD) for head in heads) and not torch.equal(heads[0]["head.weight"], heads[1]["head.weight"])
    accuracies = []
    for head, site in zip(heads, sites, strict=True):
        model = task.model()
        model.load_state_dict({**weights, **head})
        accuracies.append(evaluate(model, task, task.test_data(site), torch.device("cpu"), 1000)["accuracy"])
    final = history[-1]
    assert final["fed_eval_accuracy"] == pytest.approx(sum(accuracies) / 2, abs=1e-6)  # both sites hold 128 test rows
    assert final["fed_eval_accuracy_min"] == pytest.approx(min(accuracies), abs=1e-6)
    assert final["fed_eval_accuracy"] > 0.75  # chance on two classes: 0.5


def test_fedbn_keeps_each_learners_batchnorm_statistics(tmp_path):
    task_path, sites = site_task(tmp_path, [{"classes": [0, 1, 2, 3], "shift": 3.0}, {"classes": [0, 1, 2, 3], "shift": -3.0}])
    dirs = [tmp_path / "personal0", tmp_path / "personal1"]
    leader, history = federate(
        tmp_path, task_path, sites, [["--personal-dir", str(folder)] for folder in dirs], share="fedbn", rounds=2, eval_every=0
    )
    task = load_task(str(task_path))
    for folder, site in zip(dirs, sites, strict=True):
        norm = saved_personal(folder)
        assert sorted(norm) == sorted(NORM)
        data_mean = task.train_data(site).tensors[0].mean(0)  # what BatchNorm's running mean tracks: this site's, +-3
        assert torch.allclose(norm["norm.running_mean"], data_mean, atol=0.35)
    assert torch.equal(leader.model.norm.running_mean, torch.zeros(4))  # the leader never took anyone's statistics
    assert not any(name.startswith("norm.") for name in checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))[1])


def test_a_restarted_learner_gets_its_personal_part_back_from_its_folder(tmp_path, monkeypatch):
    task_path, sites = site_task(tmp_path, [{"classes": [0, 1], "shift": 0.0}, {"classes": [2, 3], "shift": 0.0}])
    folder = tmp_path / "personal0"
    flags = [["--personal-dir", str(folder)], []]
    federate(tmp_path / "first", task_path, sites, flags, share="fedper", rounds=2, eval_every=0)
    kept = saved_personal(folder)
    restored: list[dict[str, torch.Tensor]] = []
    real_restore = PersonalStore.restore

    def recording_restore(self, model, names):
        found = real_restore(self, model, names)
        if found and self.directory == folder:
            restored.append({name: model.state_dict()[name].clone() for name in names})
        return found

    monkeypatch.setattr(PersonalStore, "restore", recording_restore)
    federate(tmp_path / "second", task_path, sites, flags, share="fedper", rounds=1, eval_every=0)
    assert len(restored) == 1 and all(torch.equal(restored[0][name], kept[name]) for name in HEAD)
    assert checkpoint.latest(folder).name == "round-00003.json"  # numbered on from the restored part


def test_a_personal_folder_of_another_model_stops_the_learner_with_the_reason(tmp_path):
    folder = tmp_path / "personal"
    PersonalStore(str(folder)).keep(1, nn.Linear(3, 2), ["weight", "bias"])
    model = nn.Linear(4, 2)
    before = model.weight.clone()
    with pytest.raises(LearnerError, match=f"--personal-dir {folder}: .*move the folder away"):
        PersonalStore(str(folder)).restore(model, ["weight", "bias"])
    assert torch.equal(model.weight, before)


def test_secure_aggregation_and_dp_cover_exactly_the_shared_part(tmp_path):
    task_path, sites = site_task(
        tmp_path, [{"classes": [0, 1], "shift": 0.0}, {"classes": [1, 2], "shift": 0.0}, {"classes": [2, 3], "shift": 0.0}]
    )
    leader, history = federate(
        tmp_path,
        task_path,
        sites,
        share="fedper",
        rounds=2,
        learners=3,
        secure_aggregation=True,
        dp_noise_multiplier=0.1,
        clip_norm=5.0,
        eval_every=0,
    )
    # the masked vector: every floating-point entry of the shared part and the weight factor, no head entry
    model = leader.model
    shared_floats = sum(tensor.numel() for name, tensor in model.state_dict().items() if name not in HEAD and tensor.is_floating_point())
    assert leader.intake.update_specs[0].shape == (shared_floats + 1,)
    assert [entry["learners_reported"] for entry in history] == [3, 3]
    assert 0 < history[0]["dp_epsilon"] < history[1]["dp_epsilon"]


def test_learners_also_report_their_model_after_local_fine_tuning(tmp_path):
    task_path, sites = site_task(tmp_path, [{"classes": [0, 1], "shift": 0.0}, {"classes": [2, 3], "shift": 0.0}])
    leader, history = federate(tmp_path, task_path, sites, rounds=1, local_steps=5, personal_steps=20, evaluation="learners")
    final = history[-1]
    assert final["fed_eval_learners"] == 2
    # fine-tuned on its own two classes, each learner's model fits its own test data better than the global one
    assert final["fed_eval_personal_loss"] < final["fed_eval_loss"]
    assert final["fed_eval_personal_accuracy"] >= final["fed_eval_accuracy"]
    assert final["fed_eval_personal_accuracy_min"] <= final["fed_eval_personal_accuracy"] <= final["fed_eval_personal_accuracy_max"]


def test_a_pool_keeps_each_virtual_learners_personal_part_between_its_rounds(tmp_path, monkeypatch):
    from fedgrpc.engines.pool import PoolConfig, run_pool
    from fedgrpc.learner.training import LocalTrainer

    task_path = site_task(tmp_path, [])[0]
    heads: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (learner, round, head before training, after)
    real_train = LocalTrainer.train

    def recording_train(self, round_number):
        before = self.model.head.weight.detach().clone()
        result = real_train(self, round_number)
        heads.append((self.learner_id, round_number, before, self.model.head.weight.detach().clone()))
        return result

    monkeypatch.setattr(LocalTrainer, "train", recording_train)
    config = leader_config(tmp_path, task=str(task_path), aggregation="fedavg", share="fedper", rounds=2, local_steps=10, lr=0.05)
    with running_leader(config) as running:
        pool = run_pool(PoolConfig(leader=running.address, connect_timeout=30, task=str(task_path)), [0, 1])
        history = running.leader.run()
        assert pool.done.wait(60)
    assert [entry["learners_reported"] for entry in history] == [2, 2]
    after_first = {learner: after for learner, round_number, _, after in heads if round_number == 1}
    before_second = {learner: before for learner, round_number, before, _ in heads if round_number == 2}
    assert len(after_first) == len(before_second) == 2
    assert not torch.equal(after_first[0], after_first[1])  # two learners, two heads, in one model
    assert all(torch.equal(before_second[learner], after_first[learner]) for learner in (0, 1))


def test_a_buffer_outside_the_state_dict_never_travels_and_stays_the_models_own():
    from fedgrpc.algorithms import aggregation

    model = nn.Linear(2, 2)
    model.register_buffer("table", torch.arange(3.0), persistent=False)  # as a rotary embedding's frequencies
    update = {name: torch.ones_like(tensor) for name, tensor in model.state_dict().items()}
    weight = model.weight.detach().clone()
    aggregation.apply_update(model, torch.optim.SGD(model.parameters(), lr=0.5), update)
    assert torch.equal(model.weight, weight - 0.5) and torch.equal(model.table, torch.arange(3.0))


@pytest.mark.parametrize("chosen", ["adapters", "fedper"])
def test_under_fedsgd_a_frozen_personal_part_works_and_one_that_trains_is_refused(tmp_path, chosen, capsys):
    task_path, sites = site_task(tmp_path, [{"classes": [0, 1], "shift": 0.0}, {"classes": [2, 3], "shift": 0.0}])
    body = task_path.read_text() + f"\ndef shared(model):\n    return {chosen!r}\n"
    if chosen == "fedper":
        task_path.write_text(body)
        from fedgrpc.leader import main as leader_main

        assert leader_main.main(["--task", str(task_path), "--port", "0", "--run-dir", str(tmp_path / "run")]) == 2
        assert "trains locally: add --aggregation fedavg" in capsys.readouterr().err
        return
    # a pretrained body, frozen, without statistics: only the head trains, and the leader steps it
    frozen = "def model():\n    built = Net()\n    built.norm = nn.Identity()\n    built.body.requires_grad_(False)\n    return built\n"
    task_path.write_text(body.replace("def model():\n    return Net()\n", frozen))
    config = leader_config(tmp_path, task=str(task_path), data_mode="local", rounds=2, lr=0.1)
    with running_leader(config) as running:  # fedsgd, the default
        threads = [start_learners(running.address, 1, ["--task", str(task_path), "--data-dir", site])[0] for site in sites]
        history = running.leader.run()
        assert join_all(threads) == [0, 0]
    assert [spec.name for spec in running.leader.specs] == HEAD
    assert [entry["learners_reported"] for entry in history] == [2, 2]
    assert all(entry["test_loss"] is not None for entry in history)  # the leader evaluates: its copy is everyone's model


def test_the_round_line_shows_the_learners_accuracy_before_and_after_fine_tuning():
    from fedgrpc.leader.round_report import describe_evaluation

    metrics = {"fed_eval_learners": 10, "fed_eval_loss": 2.5, "fed_eval_loss_min": 0.5, "fed_eval_loss_max": 6.0}
    metrics |= {
        "fed_eval_accuracy": 0.231,
        "fed_eval_accuracy_min": 0.0,
        "fed_eval_accuracy_max": 0.83,
        "fed_eval_personal_accuracy": 0.811,
    }
    assert describe_evaluation(metrics) == (
        "learners' loss 2.5000 (0.5000-6.0000), accuracy 23.10% (0.00-83.00%), 81.10% after fine-tuning over 10 learners"
    )
