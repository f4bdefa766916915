"""What a run leaves behind and how it is configured: metrics.jsonl, plots, config files, reflection, version checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import join_all, leader_config, refusal, register_client, running_leader, start_learners
from fedgrpc.leader import main as leader_module
from fedgrpc.leader import plots
from fedgrpc.leader.recorder import Recorder, TensorBoardMissing
from fedgrpc.learner import main as learner_module
from fedgrpc.task import builtin_task
from fedgrpc.transport import rpc

ROOT = Path(__file__).resolve().parent.parent
TINY_CNN_BYTES = 11_642 * 4  # float32 parameters of tiny-cnn, its whole state
METRIC_FIELDS = {
    "round",
    "wall_time",
    "learners_selected",
    "learners_reported",
    "learners_dropped",
    "bytes_in",
    "bytes_out",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "update_norm_mean",
    "update_norm_max",
    "updates_rejected",
    "updates_clipped",
    "model_rejected",
    "aggregate_norm",
    "round_seconds",
    "elapsed_seconds",
}


def test_each_round_appends_one_metrics_line_with_exact_byte_counts(tmp_path):
    config = leader_config(tmp_path, aggregation="fedavg", local_steps=2, rounds=3)
    recorder = Recorder(Path(config.run_dir), {"rounds": 3})
    with running_leader(config) as running:
        learners = start_learners(running.address, 2)
        running.leader.run(recorder)
    assert join_all(learners) == [0, 0]
    assert recorder.close() == Path(config.run_dir) / "metrics.png"

    lines = (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["round"] for record in records] == [1, 2, 3]
    for record in records:
        assert set(record) == METRIC_FIELDS
        assert record["learners_reported"] == 2 and record["learners_dropped"] == 0
        # two updates in; two GetModel streams (round 1) or two SyncModelState pushes out
        assert record["bytes_in"] == 2 * TINY_CNN_BYTES
        assert record["bytes_out"] == 2 * TINY_CNN_BYTES
        assert 0 < record["aggregate_norm"] <= record["update_norm_max"] + 1e-9
        assert record["update_norm_mean"] <= record["update_norm_max"]
    assert json.loads((Path(config.run_dir) / "config.json").read_text()) == {"rounds": 3}
    assert (Path(config.run_dir) / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_every_skips_evaluation_but_always_evaluates_the_last_round_and_plots_what_it_has(tmp_path):
    config = leader_config(tmp_path, aggregation="fedavg", local_steps=2, rounds=4, eval_every=3)
    recorder = Recorder(Path(config.run_dir), {"rounds": 4})
    with running_leader(config) as running:
        learners = start_learners(running.address, 2)
        history = running.leader.run(recorder)
    assert join_all(learners) == [0, 0]
    assert [entry["test_accuracy"] is None for entry in history] == [True, True, False, False]
    assert [entry["test_loss"] is None for entry in history] == [True, True, False, False]
    assert recorder.close().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_every_writes_every_nth_round_and_the_last(tmp_path):
    config = leader_config(tmp_path, aggregation="fedavg", local_steps=1, rounds=5, checkpoint_every=2, keep_checkpoints=5)
    with running_leader(config) as running:
        learners = start_learners(running.address, 2)
        running.leader.run()
    assert join_all(learners) == [0, 0]
    written = sorted(path.name for path in Path(config.checkpoint_dir).glob("round-*.json"))
    assert written == ["round-00002.json", "round-00004.json", "round-00005.json"]


def write_metrics(run_dir: Path, accuracies: list[float]) -> None:
    run_dir.mkdir(parents=True)
    lines = [
        json.dumps({"round": r + 1, "test_accuracy": a, "test_loss": 1 - a, "train_loss": 1.5 - a, "bytes_in": 10, "bytes_out": 20})
        for r, a in enumerate(accuracies)
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"round": 4, "test_acc')  # torn last line


def test_plot_command_draws_one_or_several_runs(tmp_path):
    write_metrics(tmp_path / "a", [0.2, 0.4, 0.5])
    write_metrics(tmp_path / "b", [0.3, 0.35, 0.6])
    assert len(plots.read_metrics(tmp_path / "a")) == 3
    result = subprocess.run(
        [sys.executable, "-m", "fedgrpc.leader.plots", str(tmp_path / "a")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "both.png"
    result = subprocess.run(
        [sys.executable, "-m", "fedgrpc.leader.plots", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and out.read_bytes()[:4] == b"\x89PNG"
    result = subprocess.run(
        [sys.executable, "-m", "fedgrpc.leader.plots", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert (
        result.returncode == 1
        and result.stderr.strip() == f"plots: no metrics.jsonl in {tmp_path}: is it a run directory written by leader.py?"
    )


def test_config_file_values_apply_and_flags_win(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "resnet20"\nrounds = 7\nbatch-size = 16\naugment = false\nlr = 0.2\n')
    config, _, _ = leader_module.parse_leader_config(["--config", str(toml), "--rounds", "3", "--run-dir", str(tmp_path)])
    assert (config.model, config.rounds, config.batch_size, config.augment, config.lr) == ("resnet20", 3, 16, False, 0.2)
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"aggregation": "fedavg", "learners": 4, "quiet": True, "tls_cert": None}))
    config, _, _ = leader_module.parse_leader_config([f"--config={as_json}", "--run-dir", str(tmp_path)])
    assert (config.aggregation, config.learners, config.quiet, config.tls_cert) == ("fedavg", 4, True, None)
    assert config.checkpoint_dir == str(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    "content, message",
    [
        ("rounds = 3\nbogus = 1\n", "unknown setting 'bogus'"),
        ('rounds = "many"\n', "--rounds: invalid positive_int value: 'many'"),
        ('model = "gpt"\n', "invalid choice: 'gpt'"),
        ("rounds = \n", "is not valid TOML"),
    ],
)
def test_bad_config_files_get_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert message in refusal(leader_module.parse_leader_config, ["--config", str(path)], capsys)


def test_leader_serves_reflection_only_when_asked_and_health_always(tmp_path, channel_to):
    with running_leader(leader_config(tmp_path, reflection=True)) as running:
        database = ProtoReflectionDescriptorDatabase(channel_to(running.address))
        services = set(database.get_services())
        assert {"leader.LeaderService", "grpc.health.v1.Health"} <= services
        method = database.FindFileContainingSymbol("leader.LeaderService")
        assert method.name == "fedgrpc/protos/leader.proto"
    with running_leader(leader_config(tmp_path)) as running:
        channel = channel_to(running.address)
        assert rpc.is_serving(channel)
        with pytest.raises(grpc.RpcError) as caught:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_learner_with_a_different_model_build_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        learner_module, "builtin_task", lambda name, dataset, num_classes, seed: builtin_task(name, dataset, num_classes + 1, seed)
    )
    with running_leader(leader_config(tmp_path, learners=1, join_timeout=5)) as running:
        (thread,) = start_learners(running.address, 1)
        assert join_all([thread]) == [1]
    assert "builds a different tiny-cnn than the leader's: install the same release on both" in capsys.readouterr().err


def test_tensorboard_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail as if not installed
    with pytest.raises(TensorBoardMissing, match="pip install tensorboard"):
        Recorder(tmp_path, {}, tensorboard=True)


def test_learner_refused_by_a_full_federation_waits_for_a_slot_then_exits_with_the_reason(tmp_path, channel_to, capsys):
    with running_leader(leader_config(tmp_path, learners=1)) as running:
        register_client(channel_to(running.address))  # a member that answers its health checks: the slot stays taken
        assert join_all(start_learners(running.address, 1, ["--connect-timeout", "4"])) == [1]
    err = capsys.readouterr().err
    assert "no slot for this learner within 4s (--connect-timeout): the federation is full (1 of 1 learners)" in err


def test_status_line_is_silent_off_a_terminal_and_rewrites_in_place_on_one():
    import io

    from fedgrpc.console import StatusLine

    piped = io.StringIO()
    line = StatusLine(piped)  # StringIO is not a terminal
    line.show("round 1/5: 0/2 learners reported")
    assert piped.getvalue() == ""
    terminal = io.StringIO()
    line = StatusLine(terminal, enabled=True)
    line.show("round 1/5: 0/2 learners reported")
    line.show("round 1/5: 1/2")
    line.clear()
    assert terminal.getvalue() == ("\rround 1/5: 0/2 learners reported" + "\rround 1/5: 1/2" + " " * 18 + "\r" + " " * 14 + "\r")


def test_a_log_line_clears_the_status_line_before_it_prints(monkeypatch):
    import io
    import logging

    from fedgrpc.console import StatusLine

    terminal = io.StringIO()
    line = StatusLine(terminal, enabled=True)
    handler = logging.StreamHandler(terminal)
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    line.keep_logs_apart()
    line.show("round 1/5: 0/2")
    logging.getLogger("status-line-test").warning("learner 1 marked absent")
    assert terminal.getvalue() == "\rround 1/5: 0/2" + "\r" + " " * 14 + "\r" + "learner 1 marked absent\n"
