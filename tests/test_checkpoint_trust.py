"""A checkpoint folder is untrusted input: every kind of tampering is refused in one line, exit 2, nothing served or changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.tamper import TAMPERING, folder_state, make_run
from fedgrpc.leader import checkpoint
from fedgrpc.leader import main as leader_module
from fedgrpc.model import build_model


def resume(run_dir: Path, capsys, caplog) -> tuple[int, str]:
    """Resume the run in this process: its exit status, and what it printed and logged."""
    caplog.set_level("INFO")
    status = leader_module.main(["--resume", str(run_dir), "--join-timeout", "1", "--device", "cpu"])
    return status, capsys.readouterr().err + caplog.text


def test_an_untouched_checkpoint_resumes(tmp_path, capsys, caplog):
    make_run(tmp_path / "run")
    status, err = resume(tmp_path / "run", capsys, caplog)
    assert "resuming after round 1" in err  # the fabricated checkpoint is sound: each refusal below is the tampering's
    assert status == 1 and "only 0 of 2 learners registered" in err


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_a_tampered_checkpoint_is_refused_in_one_line_and_left_as_it_was(tmp_path, capsys, caplog, kind):
    tamper, reason = TAMPERING[kind]
    record_path = make_run(tmp_path / "run")
    tamper(record_path)
    before = folder_state(record_path.parent)
    status, err = resume(tmp_path / "run", capsys, caplog)
    assert status == 2
    (line,) = [line for line in err.splitlines() if line.startswith("leader: ")]
    assert reason in line and "round-00001" in line, line
    assert "Traceback" not in err and "serving on" not in err and "resuming after" not in err
    assert folder_state(record_path.parent) == before


def test_the_readme_loader_refuses_weights_of_another_shape(tmp_path):
    record_path = make_run(tmp_path / "run")
    model = build_model("small-cnn", 10)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"round-00001\.safetensors: tensor 'conv1.weight' is \[8, 3, 3, 3\] torch.float32, the model's is \[16, 3, 3, 3\]",
    ):
        checkpoint.load_into(model, record_path)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # nothing was taken in
    loaded = build_model("tiny-cnn", 10)
    assert checkpoint.load_into(loaded, record_path)["round"] == 1


def test_a_privacy_record_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / checkpoint.PRIVACY_RECORD)
    with pytest.raises(checkpoint.CheckpointError, match="is not a plain file"):
        checkpoint.privacy_spent(tmp_path)
