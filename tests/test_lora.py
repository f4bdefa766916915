"""A PEFT LoRA task (examples/lora_task.py) federated with --share adapters: only the adapters travel, are averaged and
are saved, and they learn."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT, join_all, leader_config, running_leader, start_learners, wait_until
from examples.lora_task import BASE_MODEL_ENV, LORA_RANK, make_tiny_base
from fedgrpc.leader import checkpoint
from fedgrpc.learner import main as learner_module
from fedgrpc.task import evaluate, load_task
from fedgrpc.transport import wire

TASK = str(ROOT / "examples" / "lora_task.py")
HIDDEN = 32
LAYERS = 2
HEADS, KV_HEADS = 4, 2  # make_tiny_base's attention: v_proj maps HIDDEN to KV_HEADS * (HIDDEN / HEADS)
FLOAT32_BYTES = 4


def adapter_bytes_by_hand() -> int:
    """LoRA on a Linear of in -> out adds A [rank, in] and B [out, rank]; the task targets q_proj and v_proj in each layer."""
    head_dim = HIDDEN // HEADS
    targeted = [(HIDDEN, HIDDEN), (HIDDEN, KV_HEADS * head_dim)]  # (in, out) of q_proj, v_proj
    entries = LAYERS * sum(LORA_RANK * fan_in + fan_out * LORA_RANK for fan_in, fan_out in targeted)
    return entries * FLOAT32_BYTES  # 2 * (4*32 + 32*4 + 4*32 + 16*4) * 4 = 3,584


def test_only_lora_adapters_travel_and_are_checkpointed_and_the_model_learns(tmp_path, monkeypatch):
    base = make_tiny_base(tmp_path / "base", hidden=HIDDEN, layers=LAYERS)
    monkeypatch.setenv(BASE_MODEL_ENV, str(base))
    sent: list[tuple[list[str], int]] = []
    real_send = learner_module.send_update

    def counting_send(stub, manifest, payload, *args, **kwargs):
        sent.append(([spec.name for spec in wire.read_manifest(manifest)], len(payload)))
        return real_send(stub, manifest, payload, *args, **kwargs)

    monkeypatch.setattr(learner_module, "send_update", counting_send)
    config = leader_config(tmp_path, task=TASK, aggregation="fedavg", rounds=2, local_steps=15, batch_size=32, lr=0.2)
    with running_leader(config) as running:
        threads = []
        for count in (1, 2):  # one at a time: from_pretrained is not thread-safe (it patches torch globally while it loads)
            threads += start_learners(running.address, 1, ["--task", TASK])
            wait_until(lambda: len(running.leader.roster.records()) == count)
        history = running.leader.run()
        assert join_all(threads) == [0, 0]
        model_bytes = running.leader.model_bytes

    expected = adapter_bytes_by_hand()
    assert model_bytes == expected
    assert [size for _, size in sent] == [expected] * 4  # two learners, two rounds, each update the adapters alone
    assert all(names and all("lora_" in name for name in names) for names, _ in sent)
    task = load_task(TASK)
    model = task.model()
    full_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    assert expected * 10 < full_bytes

    # the leader's checkpoint holds the adapters and nothing of the base; with the base each machine has, they are the model
    _, weights = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))
    assert weights and all("lora_" in name for name in weights)
    untrained = evaluate(model, task, task.test_data(None), torch.device("cpu"), 256)["loss"]
    assert model.load_state_dict(weights, strict=False).unexpected_keys == []
    trained = evaluate(model, task, task.test_data(None), torch.device("cpu"), 256)["loss"]
    assert trained == pytest.approx(history[-1]["test_loss"], rel=1e-5)
    assert trained < history[0]["test_loss"] < untrained
