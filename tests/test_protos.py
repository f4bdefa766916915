"""The checked-in stubs are exactly what generate_protos.sh produces."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_stubs_match_generate_protos(tmp_path):
    subprocess.run(["bash", str(ROOT / "generate_protos.sh"), str(tmp_path)], check=True, cwd=ROOT)
    generated = sorted(path.name for path in (tmp_path / "protos").iterdir())
    checked_in = sorted(path.name for path in (ROOT / "protos").iterdir() if path.name.endswith((".py", ".pyi")) and path.name != "__init__.py")
    assert generated == checked_in
    for name in generated:
        assert filecmp.cmp(tmp_path / "protos" / name, ROOT / "protos" / name, shallow=False), f"protos/{name} is stale: run ./generate_protos.sh"


def test_blog_field_numbers_are_kept():
    from protos import leader_pb2, learner_pb2

    def numbers(message):
        return {field.name: field.number for field in message.DESCRIPTOR.fields}

    assert numbers(leader_pb2.LearnerInfo)["network_addr"] == 1
    assert {k: v for k, v in numbers(leader_pb2.AckWithMetadata).items() if v <= 4} == {
        "success": 1, "message": 2, "learner_id": 3, "max_learners": 4}
    for message in (leader_pb2.ModelChunk, leader_pb2.DataChunk, leader_pb2.GradientData, learner_pb2.ModelState):
        assert numbers(message)["chunk"] == 1
    for message in (leader_pb2.Ack, learner_pb2.Ack):
        assert numbers(message) == {"success": 1, "message": 2}
    service = leader_pb2.DESCRIPTOR.services_by_name["LeaderService"]
    assert [m.name for m in service.methods][:4] == ["RegisterLearner", "GetModel", "GetData", "AccumulateGradients"]
    assert [m.name for m in learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].methods] == ["StartTraining", "SyncModelState"]
