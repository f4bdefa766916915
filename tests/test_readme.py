"""Every command in the README runs: the quickstart as written, the rest shrunk to synthetic data and one or two rounds."""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, refusal
from fedgrpc.config.options import parse_leader_config
from fedgrpc.engines.launcher import free_port
from fedgrpc.engines.launcher import main as launcher_main
from fedgrpc.leader.main import main as leader_main
from fedgrpc.learner.main import main as learner_main

README = (ROOT / "README.md").read_text()
# Appended to commands that would train on CIFAR-10 for many rounds: later flags win, so the command is the
# README's, on synthetic data, for one round of two local steps.
SMALL = ["--dataset", "synthetic", "--rounds", "1", "--local-steps", "2", "--device", "cpu"]
RUN_TIMEOUT_S = 600


def fenced(language: str) -> list[str]:
    """The bodies of the README's fenced blocks in `language`."""
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    """Every line of the README's sh blocks."""
    return [line.strip() for block in fenced("sh") for line in block.splitlines() if line.strip()]


def run(args: list[str], cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, **kwargs)


def python_command(command: str) -> list[str]:
    """A README command line as arguments for this interpreter (`python` is the one running the tests)."""
    args = shlex.split(command)
    assert args[0] == "python", command
    return [sys.executable, *args[1:]]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_readme_command_is_one_this_file_runs():
    known = {
        "pip install -r requirements.txt && python local_federation.py --model resnet20 --aggregation fedavg --batch-size 64 --lr 0.05 --rounds 5",
        "pip install -r requirements.txt && python -m pytest",  # .ci/run runs exactly this
        "python local_federation.py --dataset synthetic --model tiny-cnn --aggregation fedavg --local-steps 20 --rounds 5",
        "python local_federation.py --task examples/sequence.py --aggregation fedavg --local-steps 50 --rounds 6 --lr 0.1",
        "python examples/tabular_sites.py sites --sites 2",
        "python local_federation.py --task examples/tabular.py --data-mode local --learner-data-dir sites/site0 --learner-data-dir "
        "sites/site1 --aggregation fedavg --local-steps 60 --rounds 5 --lr 0.05",
        "python local_federation.py --dataset synthetic --model tiny-cnn --aggregation fedavg --local-steps 20 --rounds 5 --learners 4 "
        "--secure-aggregation",
        "python local_federation.py --dataset synthetic --model tiny-cnn --aggregation fedbuff --local-steps 20 --rounds 10 --learners 4",
        "python leader.py --learners 2 --model resnet20 --aggregation fedavg --rounds 20",
        "python learner.py --leader LEADER_HOST:10134",
        "python local_federation.py --resume runs/RUN --rounds 40",
        "python -m examples.lora_task BASE_DIR",
        "FEDGRPC_BASE_MODEL=BASE_DIR python local_federation.py --task examples/lora_task.py --aggregation fedavg --local-steps 20 "
        "--rounds 5 --lr 0.2",
        "python local_federation.py --engine ray --learners 1000 --fraction 0.01 --dataset synthetic --data-mode local --model small-cnn "
        "--aggregation fedavg --batch-size 10 --local-steps 5 --momentum 0 --rounds 3",
        "RAY_AUTH_MODE=token ray start --head --port 6379",
        "ray get-auth-token",
        "python -m fedgrpc.provision federation --leader leader.example.org --learner site-a=10.0.0.5 --learner site-b=site-b.example.org",
        "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=TOKEN ray start --address HEAD_HOST:6379",
        "RAY_AUTH_MODE=token python local_federation.py --engine ray --ray-address HEAD_HOST:6379 --learners 100 --fraction 0.1 "
        "--model resnet20 --aggregation fedavg --partition dirichlet --alpha 0.3 --rounds 50",
    }
    assert set(commands()) == known
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_the_offline_quickstart_learns(tmp_path):
    (command,) = [
        line
        for line in commands()
        if line.endswith("--dataset synthetic --model tiny-cnn --aggregation fedavg --local-steps 20 --rounds 5")
    ]
    result = run([*python_command(command), "--run-dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(tmp_path / "run")[-1]["test_accuracy"] > 0.9


def test_the_client_api_diff_is_the_examples_own():
    (block,) = fenced("diff")
    plain = (ROOT / "examples" / "plain_training.py").read_text().splitlines()
    federated = (ROOT / "examples" / "federated_training.py").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(plain, federated, lineterm="") if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert block.splitlines() == changed


@pytest.mark.slow
def test_the_sequence_task_example_learns_as_written(tmp_path):
    (command,) = [line for line in commands() if "--task examples/sequence.py" in line]
    result = run([*python_command(command), "--device", "cpu", "--run-dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    final = metrics(tmp_path / "run")[-1]
    assert final["test_accuracy"] > 0.3  # next-token accuracy; the trivial predictor's is 1/16


def test_the_tabular_task_example_learns_on_data_that_stays_on_the_sites(tmp_path):
    (make_sites,) = [line for line in commands() if line.startswith("python examples/tabular_sites.py")]
    (command,) = [line for line in commands() if "--task examples/tabular.py" in line]

    def from_here(line: str) -> list[str]:  # run in tmp_path, where sites/ is written: the repository's files by full path
        return [str(ROOT / arg) if arg.endswith(".py") else arg for arg in python_command(line)]

    assert run(from_here(make_sites), cwd=tmp_path).returncode == 0
    result = run([*from_here(command), "--device", "cpu", "--run-dir", str(tmp_path / "run")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    final = metrics(tmp_path / "run")[-1]
    assert final["test_loss"] is None and final["fed_eval_learners"] == 2  # the learners evaluated, the leader could not
    assert final["fed_eval_mse"] < 0.5  # the targets' variance (the mean predictor's error) is about 2


def test_the_secure_aggregation_example_learns_while_the_leader_sees_only_sums(tmp_path):
    (command,) = [line for line in commands() if line.endswith("--secure-aggregation")]
    result = run([*python_command(command), "--run-dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    history = metrics(tmp_path / "run")
    assert history[-1]["test_accuracy"] > 0.9
    assert all(entry["learners_reported"] == 4 and entry["update_norm_mean"] is None for entry in history)  # no update was read


def test_the_fedbuff_example_learns_with_its_defaults(tmp_path):
    (command,) = [line for line in commands() if "--aggregation fedbuff" in line]
    result = run([*python_command(command), "--run-dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    history = metrics(tmp_path / "run")
    assert [entry["round"] for entry in history] == list(range(1, 11))
    assert all(entry["updates_buffered"] == 4 for entry in history)  # the default buffer: one per learner training
    assert history[-1]["test_accuracy"] > 0.9
    assert len(list((tmp_path / "run" / "checkpoints").glob("round-*.json"))) == 3  # one per aggregation, the last 3 kept


def test_the_main_job_runs_on_a_small_data_set(tmp_path):
    (command,) = [line for line in commands() if "--model resnet20 --aggregation fedavg --batch-size 64" in line]
    main_job = command.split("&& ", 1)[1]
    result = run([*python_command(main_job), *SMALL, "--run-dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [entry["learners_reported"] for entry in metrics(tmp_path / "run")] == [2]


def test_the_across_machines_commands_run_on_loopback(tmp_path):
    (leader_command,) = [line for line in commands() if line.startswith("python leader.py")]
    (learner_command,) = [line for line in commands() if line.startswith("python learner.py")]
    port = free_port()
    leader = subprocess.Popen(
        [*python_command(leader_command), *SMALL, "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(tmp_path / "run")],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    learner_args = python_command(learner_command.replace("LEADER_HOST:10134", f"127.0.0.1:{port}"))
    learners = [
        subprocess.Popen([*learner_args, "--host", "127.0.0.1", "--device", "cpu"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        _, err = leader.communicate(timeout=RUN_TIMEOUT_S)
        assert leader.returncode == 0, err[-3000:]
        for learner in learners:
            _, learner_err = learner.communicate(timeout=60)
            assert learner.returncode == 0, learner_err[-3000:]
        assert [entry["learners_reported"] for entry in metrics(tmp_path / "run")] == [2]
    finally:
        for process in [leader, *learners]:
            if process.poll() is None:
                process.kill()


def test_resume_and_the_checkpoint_snippet_work_from_the_readme(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "RUN"
    first = run(
        [
            sys.executable,
            "local_federation.py",
            "--dataset",
            "synthetic",
            "--model",
            "tiny-cnn",
            "--aggregation",
            "fedavg",
            "--local-steps",
            "2",
            "--rounds",
            "1",
            "--device",
            "cpu",
            "--run-dir",
            str(run_dir),
        ]
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (command,) = [line for line in commands() if "--resume" in line]
    resumed = run(python_command(command.replace("runs/RUN", str(run_dir)).replace("--rounds 40", "--rounds 2")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after round 1" in resumed.stderr
    assert [entry["round"] for entry in metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "round-00002.json").is_file()
    done = run([sys.executable, "leader.py", "--resume", str(run_dir)])
    assert done.returncode == 2 and "already finished all 2 rounds; pass --rounds N (N > 2)" in done.stderr
    assert "no config.json there" in refusal(parse_leader_config, ["--resume", str(run_dir / "nope")], capsys)

    (snippet,) = [block for block in fenced("python") if "safetensors" in block or "checkpoint" in block]
    script = tmp_path / "elsewhere" / "load.py"
    script.parent.mkdir()
    script.write_text(snippet.replace("/path/to/runs/RUN", str(run_dir)) + "print(sum(p.numel() for p in model.parameters()))\n")
    loaded = run([sys.executable, str(script)], cwd=script.parent, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert int(loaded.stdout.split()[-1]) == 11642  # tiny-cnn's parameters


def test_the_lora_example_fine_tunes_as_written(tmp_path):
    make_base, command = [line for line in commands() if "lora_task" in line]
    values = {"BASE_DIR": str(tmp_path / "base")}
    assert run_line(make_base, values).returncode == 0
    result = run_line(command, values, "--device", "cpu", "--rounds", "2", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = metrics(tmp_path / "run")
    assert last["test_loss"] < first["test_loss"] and last["bytes_in"] == first["bytes_in"] == 2 * 3584  # two updates of adapters


def test_the_ray_simulation_runs_as_written(tmp_path):
    (command,) = [line for line in commands() if "--engine ray --learners 1000" in line]
    result = run([*python_command(command), "--run-dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [entry["learners_reported"] for entry in metrics(tmp_path / "run")] == [10, 10, 10]


def with_environment(command: str, values: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A README line that may start with VAR=VALUE settings: (its arguments, the environment it runs in), placeholders filled."""
    for placeholder, value in values.items():
        command = command.replace(placeholder, value)
    args = shlex.split(command)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    while "=" in args[0]:
        name, value = args.pop(0).split("=", 1)
        env[name] = value
    tools = {"ray": str(Path(sys.executable).parent / "ray"), "python": sys.executable}  # the ones beside this interpreter
    return [tools.get(args[0], args[0]), *args[1:]], env


def run_line(line: str, values: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """Run a README line (with its VAR=VALUE settings and placeholders filled), extra arguments appended."""
    args, env = with_environment(line, values)
    return run([*args, *extra], env=env)


def test_the_ray_cluster_commands_run_on_this_machine(tmp_path):
    import ray

    cluster_lines = [line for line in commands() if line.split()[0].startswith("RAY_AUTH_MODE") or line.startswith("ray ")]
    start_head, print_token, join, launch = cluster_lines
    port = str(free_port())
    values = {"HEAD_HOST:6379": f"{ray.util.get_node_ip_address()}:{port}", "--port 6379": f"--port {port}"}
    try:
        started = run_line(start_head, values)
        assert started.returncode == 0, started.stderr[-3000:]
        token = run_line(print_token, values)
        assert token.returncode == 0, token.stderr[-3000:]
        values["TOKEN"] = token.stdout.split()[-1]
        joined = run_line(join, values)
        assert joined.returncode == 0, joined.stderr[-3000:]
        result = run_line(launch, values, *SMALL, "--run-dir", str(tmp_path / "run"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert [entry["learners_reported"] for entry in metrics(tmp_path / "run")] == [10]
    finally:
        run([str(Path(sys.executable).parent / "ray"), "stop", "--force"])


@pytest.mark.parametrize("door", [leader_main, learner_main, launcher_main])
def test_help_lists_the_flags_in_groups(capsys, door):
    with pytest.raises(SystemExit) as caught:
        door(["--help"])
    assert caught.value.code == 0
    printed = capsys.readouterr().out
    for group in ("federation:", "faults and timeouts:", "security:", "output:"):
        assert f"\n{group}\n" in printed, (door.__module__, group)


def test_the_provisioning_command_runs_as_written(tmp_path):
    (command,) = [line for line in commands() if "fedgrpc.provision" in line]
    result = run(python_command(command), cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    for machine in ("leader", "site-a", "site-b"):
        assert sorted(path.name for path in (tmp_path / "federation" / machine).iterdir()) == [
            "ca.pem",
            "cert.pem",
            "enrolment.token",
            "key.pem",
        ]
    printed = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].split() for line in result.stdout.splitlines() if line.startswith("  ")}
    assert printed["leader"][:2] == ["python", "leader.py"] and "leader/key.pem" in printed["leader"]
    assert printed["site-a"][printed["site-a"].index("--leader") + 1] == "leader.example.org:10134"
    assert printed["site-b"][printed["site-b"].index("--advertise-address") + 1] == "site-b.example.org:10135"
