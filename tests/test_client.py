"""The client API (client.py): a script's own loop in a federation, against learner.py on the same task."""

from __future__ import annotations

import difflib
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from conftest import ROOT, leader_config, running_leader, start_learners, wait_until
from fedgrpc import client
from fedgrpc.leader import checkpoint
from fedgrpc.task import load_task

EXAMPLES = ROOT / "examples"
RUN_TIMEOUT_S = 600

SITE_TASK = """
    from pathlib import Path

    import torch
    from torch import nn

    def model():
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def _site(data_dir, count):
        generator = torch.Generator().manual_seed(int(Path(data_dir).name[-1]) + count)
        rows = torch.randn(count, 4, generator=generator)
        return torch.utils.data.TensorDataset(rows, torch.sin(rows[:, 0]) + rows[:, 1] * rows[:, 2])

    def train_data(data_dir):
        return _site(data_dir, 40)

    def test_data(data_dir):
        return _site(data_dir, 10)

    def loss(outputs, targets):
        return ((outputs.squeeze(-1) - targets) ** 2).mean()
"""


def test_the_federated_script_adds_at_most_five_lines_to_the_plain_one():
    plain = (EXAMPLES / "plain_training.py").read_text().splitlines()
    federated = (EXAMPLES / "federated_training.py").read_text().splitlines()
    added = [line for line in difflib.unified_diff(plain, federated, lineterm="") if line.startswith("+") and not line.startswith("+++")]
    assert 0 < len(added) <= 5, added
    assert any("fedgrpc.join(" in line for line in added) and any("federation.send(" in line for line in added)


def test_send_outside_a_round_says_how_to_use_it():
    federation = client.Federation.__new__(client.Federation)  # no leader needed to misuse it
    federation._round = 0
    with pytest.raises(client.ClientError, match=r"send\(\) outside a round: call it inside `for round_number in federation.rounds\(\):`"):
        federation.send(loss=1.0)


def test_two_plain_scripts_joined_with_the_client_api_federate_and_learn(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLES / "tabular_sites.py"), str(tmp_path / "sites"), "--sites", "2"], check=True, timeout=60)
    config = leader_config(tmp_path, task=str(EXAMPLES / "tabular.py"), data_mode="local", aggregation="fedavg", rounds=3)
    with running_leader(config) as running:
        scripts = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "examples.federated_training",
                    "--site",
                    str(tmp_path / "sites" / f"site{index}"),
                    "--leader",
                    running.address,
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for index in range(2)
        ]
        try:
            history = running.leader.run()
            outputs = [script.communicate(timeout=RUN_TIMEOUT_S) for script in scripts]
        finally:
            for script in scripts:
                if script.poll() is None:
                    script.kill()
    assert [script.returncode for script in scripts] == [0, 0], [err[-2000:] for _, err in outputs]
    assert all("epoch 3: test" in out for out, _ in outputs)  # each script ran its own loop for the leader's 3 rounds
    assert [entry["learners_reported"] for entry in history] == [2, 2, 2]
    final = history[-1]
    assert final["fed_eval_learners"] == 2  # the scripts answered the leader's evaluation calls on their own test sets
    assert final["fed_eval_loss"] < 0.5  # the MSE; the targets' variance (the mean predictor's) is about 2


def test_the_client_api_and_learner_py_end_a_deterministic_run_with_identical_weights(tmp_path):
    task_file = tmp_path / "sites_task.py"
    task_file.write_text(textwrap.dedent(SITE_TASK))
    sites = [tmp_path / "site0", tmp_path / "site1"]
    settings = dict(task=str(task_file), data_mode="local", aggregation="fedavg", rounds=2, local_steps=3, batch_size=8, lr=0.05)
    settings.update(deterministic=True, eval_every=0)

    def learner_py(address: str, site: Path) -> threading.Thread:
        (thread,) = start_learners(address, 1, ["--task", str(task_file), "--data-dir", str(site)])
        return thread

    def client_script(address: str, site: Path) -> threading.Thread:
        task = load_task(str(task_file))
        model = task.model()
        data = task.train_data(str(site))
        inputs, targets = data.tensors

        def run() -> None:
            federation = client.join(model, str(task_file), address, num_examples=len(data), host="127.0.0.1")
            plan = federation.plan
            assert plan.keep_momentum  # fedavg's default: learner.py keeps its momentum, as an optimizer made once does
            optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
            for _ in federation.rounds():
                batches = federation.batches(len(data))
                for indices in batches:
                    optimizer.zero_grad()
                    loss = task.loss(model(inputs[indices]), targets[indices])
                    loss.backward()
                    optimizer.step()
                federation.send(loss=loss.item(), num_examples=sum(len(indices) for indices in batches))  # as learner.py weighs it

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    finals = []
    for name, start in (("learner.py", learner_py), ("client", client_script)):
        config = leader_config(tmp_path / name, **settings)
        with running_leader(config) as running:
            threads = []
            for count, site in enumerate(sites, start=1):  # one at a time: learner ids follow the sites in both runs
                threads.append(start(running.address, site))
                wait_until(lambda: len(running.leader.roster.alive()) == count)
            running.leader.run()
            for thread in threads:
                thread.join(60)
            assert not any(thread.is_alive() for thread in threads), name
        finals.append(checkpoint.load(checkpoint.latest(Path(config.checkpoint_dir)))[1])
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key
    torch.manual_seed(0)  # the leader's initial model: both runs trained away from it
    initial = load_task(str(task_file)).model().state_dict()
    assert all(not torch.equal(finals[0][key], initial[key]) for key in initial)


def test_join_refuses_a_script_without_examples():
    with pytest.raises(client.ClientError, match="num_examples must be the number of training examples"):
        client.join(torch.nn.Linear(2, 1), "task", "127.0.0.1:1", num_examples=0)
