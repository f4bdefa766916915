"""Users' own tasks (--task): the contract, one-line errors, data of any shape over GetData, the task check at
registration, federated evaluation, and the examples federating and learning."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
import torch

from conftest import ROOT, join_all, leader_config, register_client, running_leader, start_learners
from fedgrpc.leader import checkpoint, federated_eval
from fedgrpc.leader import main as leader_module
from fedgrpc.learner import main as learner_module
from fedgrpc.protos import leader_pb2, learner_pb2
from fedgrpc.task import TaskError, as_examples, default_loss, default_metrics, evaluate, load_task
from fedgrpc.transport import rpc, wire

EXAMPLES = ROOT / "examples"
RUN_TIMEOUT_S = 600


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_task(tmp_path: Path, body: str, name: str = "mytask.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


FLOAT_TASK = """
    import torch
    from torch import nn

    def model():
        return nn.Linear(3, 1)

    def _data(count, seed):
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randn(count, 3, generator=generator)
        return torch.utils.data.TensorDataset(rows, rows @ torch.tensor([1.0, -2.0, 0.5]))

    def train_data(data_dir):
        return _data(40, 1)

    def test_data(data_dir):
        return _data(10, 2)

    def loss(outputs, targets):
        return ((outputs.squeeze(-1) - targets) ** 2).mean()
"""


VALID_TEST_DATA = "def test_data(d): return torch.utils.data.TensorDataset(torch.ones(4, 2), torch.zeros(4))\n"
VALID_DATA = "import torch\ndef train_data(d): return torch.utils.data.TensorDataset(torch.ones(4, 2), torch.zeros(4))\n" + VALID_TEST_DATA


# ---- the contract ---------------------------------------------------------------------------------------------------


def test_a_dataset_of_tuples_becomes_whole_tensors_with_the_target_last():
    items = [(torch.tensor([float(i), 2.0 * i]), torch.tensor(i % 3)) for i in range(5)]
    examples = as_examples(items, "here")
    assert [tuple(tensor.shape) for tensor in examples.tensors] == [(5, 2), (5,)]
    assert examples.targets.tolist() == [0, 1, 2, 0, 1] and examples.num_classes == 3
    assert examples.tensor_names() == ("input0", "target")
    floats = as_examples(torch.utils.data.TensorDataset(torch.ones(4, 3), torch.full((4,), 0.5)), "here")
    assert floats.num_classes == 0  # float targets: regression, no classes


def test_the_default_loss_and_accuracy_work_over_the_last_dimension_for_sequences():
    outputs = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[0.0, 1.0], [5.0, 0.0]]])  # [batch 2, positions 2, classes 2]
    targets = torch.tensor([[0, 0], [1, 0]])
    assert default_metrics(outputs, targets) == {"accuracy": 0.75}  # three of four positions right
    expected = torch.nn.functional.cross_entropy(outputs.reshape(4, 2), targets.reshape(4))
    assert torch.equal(default_loss(outputs, targets), expected)
    assert default_metrics(torch.zeros(3, 1), torch.zeros(3)) == {}  # float targets: no accuracy


def test_evaluate_weighs_each_batch_by_its_examples(tmp_path):
    task = load_task(str(write_task(tmp_path, FLOAT_TASK)))
    model = task.model()
    data = task.test_data(None)
    values = evaluate(model, task, data, torch.device("cpu"), batch_size=3)  # batches of 3, 3, 3 and 1
    with torch.no_grad():
        by_hand = ((model(data.tensors[0]).squeeze(-1) - data.targets) ** 2).mean().item()
    assert values == {"loss": pytest.approx(by_hand, rel=1e-5)}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def train_data(d): pass\ndef test_data(d): pass\n", "--task {path}: no model() function; a task defines model(), "),
        ("raise ImportError('no such thing')\n", "--task {path}: importing it raised ImportError: no such thing"),
        ("def model(): raise RuntimeError('boom')\n" + VALID_DATA, "{path}: model() raised RuntimeError: boom"),
        ("def model(): return 3\n" + VALID_DATA, "{path}: model() returned an int, not a torch.nn.Module"),
        (
            "import torch\ndef model(): return torch.nn.Linear(2, 1)\ndef train_data(d): pass\ndef test_data(d): pass\n",
            "{path}: test_data() returned a NoneType, not a torch.utils.data.Dataset",
        ),
        (
            "import torch\ndef model(): return torch.nn.Linear(2, 1)\n"
            "def train_data(d): return torch.utils.data.TensorDataset(torch.ones(0, 2), torch.ones(0))\n" + VALID_TEST_DATA,
            "{path}: train_data() returned an empty data set",
        ),
        (
            "import torch\ndef model(): return torch.nn.Linear(2, 1)\ndef train_data(d): return [1, 2, 3]\n" + VALID_TEST_DATA,
            "{path}: train_data(): each item must be a tuple (inputs..., target), got an int",
        ),
    ],
)
def test_a_broken_task_file_stops_the_leader_with_one_line_naming_the_file_and_function(tmp_path, body, message, capsys):
    path = write_task(tmp_path, body)
    assert leader_module.main(["--task", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("leader: " + message.format(path=path)), err[-2000:]
    assert "Traceback" not in err


def test_a_task_whose_loss_returns_no_scalar_is_named_in_one_line(tmp_path):
    task = load_task(
        str(write_task(tmp_path, FLOAT_TASK.replace("return ((outputs", "return (outputs").replace(") ** 2).mean()", ") ** 2")))
    )
    with pytest.raises(TaskError, match=r"mytask.py: loss\(\) returned a tensor of shape \[4\] \(float32\), not a scalar"):
        task.loss(torch.zeros(4, 1), torch.zeros(4))


def test_a_tasks_metrics_are_checked_as_the_leader_checks_a_learners_report(tmp_path):
    body = FLOAT_TASK + "\n    def metrics(outputs, targets):\n        return {'mae': float('nan')}\n"
    task = load_task(str(write_task(tmp_path, body)))
    with pytest.raises(TaskError, match=r"mytask.py: metrics\(\): mae is not finite"):
        task.metrics(torch.zeros(2, 1), torch.zeros(2))


# ---- over the wire --------------------------------------------------------------------------------------------------


def test_float_rows_and_int64_tokens_travel_getdata_exactly(tmp_path, channel_to):
    for path in (write_task(tmp_path, FLOAT_TASK), EXAMPLES / "sequence.py"):
        config = leader_config(tmp_path, task=str(path))
        with running_leader(config) as running:
            leader = running.leader
            client = register_client(channel_to(running.address), task=leader.plan.task, fingerprint=leader.plan.model_fingerprint)
            responses = client.stub.GetData(
                leader_pb2.LearnerDataRequest(learner_id=client.learner_id), timeout=10, metadata=client.metadata()
            )
            layout = learner_module.layout_specs(client.reply.split_layout)  # as registration announced it
            received = wire.receive(responses, max_bytes=1 << 30, expected=learner_module.split_specs(client.reply.split_examples, layout))
            shard = leader.splits.data_for(0)
            for name, tensor in zip(shard.tensor_names(), shard.tensors, strict=True):
                assert received.tensors[name].dtype == tensor.dtype and torch.equal(received.tensors[name], tensor)
        dtypes = [spec.dtype for spec in layout]
        assert dtypes == (["float32", "float32"] if path.name == "mytask.py" else ["int64", "int64"])


def test_a_learner_with_another_task_is_refused_at_registration_in_one_line(tmp_path, capsys):
    with running_leader(leader_config(tmp_path, learners=1, task=str(EXAMPLES / "sequence.py"), join_timeout=5)) as running:
        fingerprint = running.leader.plan.model_fingerprint[:12]
        assert join_all(start_learners(running.address, 1, ["--task", str(write_task(tmp_path, FLOAT_TASK))])) == [1]
        assert join_all(start_learners(running.address, 1)) == [1]  # no --task at all
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("learner:")]
    assert lines[0].startswith("learner: the leader refused registration: this learner holds the task 'mytask' (model manifest ")
    assert lines[0].endswith(f"this leader trains 'sequence' (model manifest {fingerprint}): give both the same task file")
    assert lines[1] == (
        f"learner: the leader refused registration: this leader trains the task 'sequence' (model manifest {fingerprint}): "
        "start the learner with --task and the same task file"
    )


# ---- federated evaluation -------------------------------------------------------------------------------------------


def test_summaries_are_the_example_weighted_mean_and_spread_by_hand():
    reports = [
        federated_eval.Report(0, 100, {"loss": 1.0, "accuracy": 0.5}),
        federated_eval.Report(1, 300, {"loss": 2.0, "accuracy": 0.9}),
        federated_eval.Report(2, 100, {"loss": 4.0, "accuracy": 0.7}),
    ]
    summary = federated_eval.summarize(reports)
    assert summary["fed_eval_learners"] == 3 and summary["fed_eval_examples"] == 500
    assert summary["fed_eval_loss"] == pytest.approx((100 * 1 + 300 * 2 + 100 * 4) / 500)  # 2.2
    assert summary["fed_eval_accuracy"] == pytest.approx((50 + 270 + 70) / 500)  # 0.78
    assert (summary["fed_eval_loss_min"], summary["fed_eval_loss_median"], summary["fed_eval_loss_max"]) == (1.0, 2.0, 4.0)


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (learner_pb2.EvaluateResult(round=2, num_examples=10, loss=1.0), "the result is for round 2, not 1"),
        (learner_pb2.EvaluateResult(round=1, num_examples=0, loss=1.0), "num_examples must be in 1.."),
        (learner_pb2.EvaluateResult(round=1, num_examples=10, loss=float("nan")), "loss is not finite"),
        (learner_pb2.EvaluateResult(round=1, num_examples=10, loss=1.0, metrics={"a\nb": 1.0}), "metric names must be identifiers"),
        (learner_pb2.EvaluateResult(round=1, num_examples=10, loss=1.0, metrics={"x": float("inf")}), "x is not finite"),
    ],
)
def test_an_evaluation_result_that_cannot_count_is_refused_with_the_reason(result, why):
    with pytest.raises(ValueError, match=why):
        federated_eval.check_result(result, 1)


def test_tabular_example_in_local_mode_evaluates_on_the_learners_and_no_training_data_leaves_them(tmp_path, monkeypatch):
    subprocess.run([sys.executable, str(EXAMPLES / "tabular_sites.py"), str(tmp_path / "sites"), "--sites", "2"], check=True, timeout=60)
    sites = [str(tmp_path / "sites" / f"site{index}") for index in range(2)]
    sent: list[int] = []
    real_send = learner_module.send_update

    def counting_send(stub, manifest, payload, *args, **kwargs):
        sent.append(len(payload))
        return real_send(stub, manifest, payload, *args, **kwargs)

    monkeypatch.setattr(learner_module, "send_update", counting_send)
    calls: list[str] = []
    real_channel = rpc.channel

    def counting_channel(address, tls=None):  # every call a learner makes, with its request's size
        channel = real_channel(address, tls)
        return grpc.intercept_channel(channel, RequestSizes(calls))

    monkeypatch.setattr(rpc, "channel", counting_channel)
    config = leader_config(
        tmp_path,
        task=str(EXAMPLES / "tabular.py"),
        data_mode="local",
        aggregation="fedavg",
        rounds=5,
        local_steps=60,
        lr=0.05,
        batch_size=32,
    )
    with running_leader(config) as running:
        threads = [start_learners(running.address, 1, ["--task", str(EXAMPLES / "tabular.py"), "--data-dir", site])[0] for site in sites]
        history = running.leader.run()
        assert join_all(threads) == [0, 0]
        model_bytes = running.leader.model_bytes
    assert sent == [model_bytes] * 10  # each learner's five updates, nothing more
    from_learners = [(method, size) for method, size in calls if method in LEARNER_CALLS]
    assert {method for method, _ in from_learners} >= {"RegisterLearner", "GetModel", "AccumulateGradients", "Evaluate:result"}
    # every other message a learner sent is small: its 2,000 training rows (72 kB) never left it
    assert all(size <= 1024 for method, size in from_learners if method != "AccumulateGradients")
    final = history[-1]
    assert final["test_loss"] is None and final["fed_eval_learners"] == 2  # the leader has no test set: the learners evaluate

    # the mean and spread are those of each learner's own evaluation of the final model, by hand
    record, weights = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))
    task = load_task(str(EXAMPLES / "tabular.py"))
    model = task.model()
    model.load_state_dict(weights)
    by_hand = [(len(data), evaluate(model, task, data, torch.device("cpu"), 1000)) for data in (task.test_data(site) for site in sites)]
    total = sum(count for count, _ in by_hand)
    mse = sum(count * values["mse"] for count, values in by_hand) / total
    assert final["fed_eval_mse"] == pytest.approx(mse, rel=1e-5)
    assert final["fed_eval_mse_min"] == pytest.approx(min(values["mse"] for _, values in by_hand), rel=1e-5)
    assert final["fed_eval_mse_max"] == pytest.approx(max(values["mse"] for _, values in by_hand), rel=1e-5)
    assert final["fed_eval_loss_median"] == pytest.approx(statistics.median(values["loss"] for _, values in by_hand), rel=1e-5)
    # and it learned: far below the trivial predictor's error (the targets' variance)
    variance = torch.cat([task.test_data(site).targets for site in sites]).var().item()
    assert final["fed_eval_mse"] < 0.25 * variance


# what a learner sends: its calls to the leader, and its answers to the leader's Evaluate calls
LEARNER_CALLS = {"RegisterLearner", "GetModel", "GetData", "AccumulateGradients", "Heartbeat", "Evaluate:result"}


class RequestSizes(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Records (method, largest request message) for every call through a channel."""

    def __init__(self, calls: list[tuple[str, int]]) -> None:
        self.calls = calls

    def intercept_unary_unary(self, continuation, details, request):
        self.calls.append((details.method.rsplit("/", 1)[-1], request.ByteSize()))
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):
        self.calls.append((details.method.rsplit("/", 1)[-1], request.ByteSize()))
        return continuation(details, request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        method = details.method.rsplit("/", 1)[-1]

        def counted():
            for message in request_iterator:
                self.calls.append((method, len(message) if isinstance(message, bytes) else message.ByteSize()))
                yield message

        outcome = continuation(details, counted())
        if method == "Evaluate":
            self.calls.append(("Evaluate:result", outcome.result().ByteSize()))
        return outcome


# ---- a user's task with the rest of the system ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(aggregation="fedavg", secure_aggregation=True, dp_noise_multiplier=0.1, clip_norm=5.0, learners=3),
        dict(aggregation="fedbuff", learners=2, compression="int8"),
    ],
    ids=["secure-aggregation-and-dp", "fedbuff-int8"],
)
def test_a_user_task_runs_with_secure_aggregation_dp_and_fedbuff(tmp_path, settings):
    path = write_task(tmp_path, FLOAT_TASK)
    # lr 0.01: momentum 0.9 kept across rounds (the default), as centralized SGD keeps it, overshoots this quadratic at 0.05
    config = leader_config(tmp_path, task=str(path), rounds=3, local_steps=5, batch_size=8, lr=0.01, **settings)
    with running_leader(config) as running:
        threads = start_learners(running.address, config.learners, ["--task", str(path)])
        history = running.leader.run()
        assert join_all(threads) == [0] * config.learners
    assert [entry["round"] for entry in history] == [1, 2, 3]
    if config.secure_aggregation:
        assert all(entry["learners_reported"] == 3 and entry["update_norm_mean"] is None for entry in history)  # sums only
        assert history[0]["dp_epsilon"] < history[-1]["dp_epsilon"]
    else:
        assert all(entry["updates_buffered"] == 2 for entry in history)  # fedbuff's default buffer: both learners
    assert history[-1]["test_loss"] < history[0]["test_loss"]  # it learns through either path
