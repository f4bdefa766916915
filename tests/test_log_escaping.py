"""Logs cannot be forged: whatever text a peer chooses reaches a log line escaped, one record per line."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from conftest import leader_config, register_client, run_until_stopped, running_leader, wait_until
from fedgrpc.console import MAX_LOGGED_CHARS, EscapingFormatter
from fedgrpc.protos import leader_pb2, learner_pb2_grpc
from fedgrpc.transport import rpc, wire

ROOT = Path(__file__).resolve().parent.parent
FORMAT = "%(asctime)s leader %(levelname)s %(message)s"
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} leader [A-Z]+ ")
FORGED = "2026-12-07 00:00:00,000 leader INFO round 9/9: 1 learners, test accuracy 100.00% (forged)"
# every way text can break a line or move a terminal's cursor: newline, carriage return, escape sequences, NUL, the
# C1 next-line, Unicode's line and paragraph separators, a vertical tab, a form feed
BREAKS = ["\n", "\r", "\r\n", "\x1b[2K\r", "\x00", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c"]


@pytest.fixture
def leader_log():
    """What the leader's handlers write, through the formatter setup_logging gives them."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(EscapingFormatter(FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(level)


def assert_not_forged(text: str) -> None:
    """Every line is a record of ours; the forged record shows only inside one, escaped."""
    lines = text.splitlines()  # splits at every break above, as a log viewer would
    assert lines and all(RECORD.match(line) for line in lines), lines
    assert "round 9/9" in text  # the peer's text was logged (a refusal may cut a long name), so it passed the formatter
    assert not any(line.startswith(FORGED) for line in lines)
    assert all(character.isprintable() for character in text.replace("\n", ""))


@pytest.mark.parametrize("brk", BREAKS, ids=[repr(brk) for brk in BREAKS])
def test_a_message_holding_a_line_break_stays_one_record(leader_log, brk):
    logging.getLogger("test").warning("learner 3 at %s marked absent: %s", f"10.0.0.1:5{brk}{FORGED}", f"boom{brk}{FORGED}")
    assert_not_forged(leader_log.getvalue())


def test_a_huge_message_is_cut(leader_log):
    logging.getLogger("test").warning("refused: %s", "x" * (10 * MAX_LOGGED_CHARS) + "(forged)")
    (line,) = leader_log.getvalue().splitlines()
    assert len(line) < MAX_LOGGED_CHARS + 100 and line.endswith("...")


def test_a_tensor_name_in_an_update_is_logged_escaped(tmp_path, channel_to, leader_log):
    with running_leader(leader_config(tmp_path, learners=2)) as running:
        client = register_client(channel_to(running.address))
        running.leader.open_round(1)
        tensors = {name: tensor.clone() for name, tensor in running.leader.model.state_dict().items()}
        tensors[f"conv.weight\n{FORGED}"] = tensors[next(iter(tensors))]
        manifest, payload = wire.encode(tensors)
        messages = wire.stream(leader_pb2.GradientData, manifest, payload, learner_id=client.learner_id, round=1, num_examples=10)
        with pytest.raises(grpc.RpcError) as refused:
            client.stub.AccumulateGradients(messages, timeout=10, metadata=client.metadata())
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused an update from learner 0" in leader_log.getvalue()
    assert_not_forged(leader_log.getvalue())


class AnswersWithAForgedRecord(learner_pb2_grpc.LearnerServiceServicer):
    """A learner whose answer to StartTraining carries a forged log record."""

    def StartTraining(self, request, context):
        return leader_pb2.Ack(success=False, message=f"busy\r\n{FORGED}\x1b[0m")


def test_a_learners_answer_to_start_training_is_logged_escaped(tmp_path, channel_to, leader_log):
    server, port, _ = rpc.create_server(
        lambda server: learner_pb2_grpc.add_LearnerServiceServicer_to_server(AnswersWithAForgedRecord(), server),
        "127.0.0.1",
        0,
        max_workers=4,
        health_services=[rpc.LEARNER_SERVICE],
    )
    try:
        with running_leader(leader_config(tmp_path, learners=1, min_learners=1)) as running:
            runner, _ = run_until_stopped(running.leader)
            register_client(channel_to(running.address), address=f"127.0.0.1:{port}")
            wait_until(lambda: "marked absent" in leader_log.getvalue())
            running.leader.stop_event.set()
            runner.join(timeout=60)
    finally:
        server.stop(grace=None)
    assert_not_forged(leader_log.getvalue())


PEER_TEXT = f"name\n{FORGED}\x1b[0m"


def log_in_a_process(tmp_path: Path, log_format: str) -> tuple[str, str]:
    """What a process set up as the commands are (setup_logging) writes to its log file and stderr for one record
    holding a peer's forged text."""
    script = (
        "import logging, sys; from pathlib import Path; from fedgrpc.console import setup_logging; "
        f"setup_logging('leader', False, log_file=Path(sys.argv[1]), log_format={log_format!r}); "
        f"logging.getLogger('fedgrpc.x').warning('from a peer: %s', {PEER_TEXT!r})"
    )
    log_file = tmp_path / "leader.log"
    result = subprocess.run([sys.executable, "-c", script, str(log_file)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return log_file.read_text(), result.stderr


def test_the_commands_log_through_the_escaping_formatter(tmp_path):
    for text in log_in_a_process(tmp_path, "text"):
        assert_not_forged(text)


def test_json_logs_hold_one_object_per_line_whatever_a_peer_sent(tmp_path):
    for text in log_in_a_process(tmp_path, "json"):
        (line,) = text.splitlines()
        entry = json.loads(line)
        assert entry["role"] == "leader" and entry["level"] == "WARNING" and entry["logger"] == "fedgrpc.x"
        assert entry["message"] == f"from a peer: {PEER_TEXT}"  # the peer's text whole, inside one string
