"""The checked-in stubs are exactly what generate_protos.sh produces."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_stubs_match_generate_protos(tmp_path):
    # the interpreter running the tests, as from a virtual environment that is not activated: the script must use
    # $PYTHON, for no python is on its PATH
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / "generate_protos.sh"), str(out)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "PATH": str(bin_dir)},
    )
    tmp_path = out
    generated = sorted(path.name for path in (tmp_path / "fedgrpc" / "protos").iterdir())
    checked_in = sorted(
        path.name for path in (ROOT / "fedgrpc" / "protos").iterdir() if path.name.endswith((".py", ".pyi")) and path.name != "__init__.py"
    )
    assert generated == checked_in
    for name in generated:
        assert filecmp.cmp(tmp_path / "fedgrpc" / "protos" / name, ROOT / "fedgrpc" / "protos" / name, shallow=False), (
            f"fedgrpc/protos/{name} is stale: run ./generate_protos.sh"
        )


def test_blog_field_numbers_are_kept():
    from fedgrpc.protos import leader_pb2, learner_pb2

    def numbers(message):
        return {field.name: field.number for field in message.DESCRIPTOR.fields}

    assert numbers(leader_pb2.LearnerInfo)["network_addr"] == 1
    assert {k: v for k, v in numbers(leader_pb2.AckWithMetadata).items() if v <= 4} == {
        "success": 1,
        "message": 2,
        "learner_id": 3,
        "max_learners": 4,
    }
    for message in (leader_pb2.ModelChunk, leader_pb2.DataChunk, leader_pb2.GradientData, learner_pb2.ModelState):
        assert numbers(message)["chunk"] == 1
    for message in (leader_pb2.Ack, learner_pb2.Ack):
        assert numbers(message) == {"success": 1, "message": 2}
    service = leader_pb2.DESCRIPTOR.services_by_name["LeaderService"]
    assert [m.name for m in service.methods][:4] == ["RegisterLearner", "GetModel", "GetData", "AccumulateGradients"]
    # the blog's two first; secure aggregation's four stages after them, then federated evaluation
    assert [m.name for m in learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].methods] == [
        "StartTraining",
        "SyncModelState",
        "AdvertiseKeys",
        "ShareKeys",
        "CollectMasked",
        "Unmask",
        "Evaluate",
    ]


def test_a_model_chunk_and_a_model_state_are_the_same_bytes_so_the_leader_frames_a_model_once():
    from fedgrpc.protos import leader_pb2, learner_pb2, tensors_pb2

    manifest = tensors_pb2.TensorManifest(tensors=[tensors_pb2.TensorSpec(name="fc.weight", dtype="float32", shape=[2, 3])])
    chunk = leader_pb2.ModelChunk(chunk=bytes(range(24)), manifest=manifest, round=7).SerializeToString()
    assert learner_pb2.ModelState(chunk=bytes(range(24)), manifest=manifest, round=7).SerializeToString() == chunk
    state = learner_pb2.ModelState.FromString(chunk)
    assert (state.round, state.chunk, state.fetch, state.stop) == (7, bytes(range(24)), False, False)
