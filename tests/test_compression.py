"""Update compression: hand-computed round trips, error feedback, payload sizes and every refusal."""

from __future__ import annotations

import pytest
import torch

from fedgrpc import model
from fedgrpc.transport import compression, wire
from fedgrpc.transport.compression import compress, compressed_bytes, decompress, wire_specs


def test_fp16_round_trip_is_exact_for_representable_values():
    update = {"w": torch.tensor([1.0, 0.5, 3.0])}
    packed = compress(update, "fp16")
    assert packed["w"].dtype == torch.float16
    restored = decompress(packed, wire.specs_of(update), "fp16")
    assert restored["w"].dtype == torch.float32
    assert torch.equal(restored["w"], update["w"])


def test_int8_levels_scale_and_round_trip_by_hand():
    update = {"w": torch.tensor([1.0, -0.5, 0.25])}
    packed = compress(update, "int8")
    assert list(packed) == ["w", "w.scale"]
    scale = torch.tensor([1.0 / 127], dtype=torch.float32)  # max|x| / 127
    assert torch.equal(packed["w.scale"], scale)
    # -63.5 rounds to -64 (ties to even, and
    # float32's 1/127 is a hair small, so -0.5 / scale is just below -63.5 anyway); 31.75 rounds to 32
    assert packed["w"].dtype == torch.int8
    assert packed["w"].view(torch.int8).tolist() == [127, -64, 32]
    restored = decompress(packed, wire.specs_of(update), "int8")["w"]
    assert torch.allclose(restored, torch.tensor([127, -64, 32]) / 127.0)
    assert float((restored - update["w"]).abs().max()) <= float(scale) / 2


def test_int8_zero_tensor_gets_scale_zero_and_comes_back_zero():
    update = {"w": torch.zeros(5)}
    packed = compress(update, "int8")
    assert packed["w.scale"].tolist() == [0.0]
    assert packed["w"].view(torch.int8).tolist() == [0] * 5
    assert torch.equal(decompress(packed, wire.specs_of(update), "int8")["w"], torch.zeros(5))


def test_topk_keeps_the_largest_magnitudes_and_decompresses_dense():
    update = {"w": torch.tensor([[0.1, -5.0], [3.0, 0.2]])}
    packed = compress(update, "topk", topk_ratio=0.5)  # k = ceil(0.5 * 4) = 2
    assert list(packed) == ["w.indices", "w.values"]
    assert packed["w.indices"].dtype == torch.int32
    assert packed["w.indices"].tolist() == [1, 2]  # flat indices, ascending
    assert packed["w.values"].tolist() == [-5.0, 3.0]
    restored = decompress(packed, wire.specs_of(update), "topk")["w"]
    assert torch.equal(restored, torch.tensor([[0.0, -5.0], [3.0, 0.0]]))


def test_error_feedback_sends_what_earlier_rounds_left_behind():
    residual: dict[str, torch.Tensor] = {}
    first = torch.tensor([0.1, -5.0, 3.0, 0.2])
    sent = compress({"w": first}, "topk", topk_ratio=0.5, residual=residual)
    assert sent["w.values"].tolist() == [-5.0, 3.0]
    assert torch.allclose(residual["w"], torch.tensor([0.1, 0.0, 0.0, 0.2]))
    assert torch.equal(first, torch.tensor([0.1, -5.0, 3.0, 0.2]))  # the update itself is left alone
    sent = compress({"w": torch.zeros(4)}, "topk", topk_ratio=0.5, residual=residual)
    assert sent["w.indices"].tolist() == [0, 3]
    assert torch.allclose(sent["w.values"], torch.tensor([0.1, 0.2]))
    assert torch.equal(residual["w"], torch.zeros(4))


def test_without_residual_topk_forgets_what_it_dropped():
    compress({"w": torch.tensor([0.1, -5.0, 3.0, 0.2])}, "topk", topk_ratio=0.5)
    sent = compress({"w": torch.zeros(4)}, "topk", topk_ratio=0.5)
    assert sent["w.values"].tolist() == [0.0, 0.0]


def test_payload_sizes_for_a_million_element_tensor():
    specs = [wire.TensorSpec("w", "float32", (1000, 1000))]
    dense = 4_000_000
    assert compressed_bytes(specs, "none", 0.01) == dense
    assert compressed_bytes(specs, "fp16", 0.01) == 2_000_000
    assert compressed_bytes(specs, "int8", 0.01) == 1_000_000 + 4  # one byte a value plus the float32 scale
    assert dense / compressed_bytes(specs, "int8", 0.01) > 3.9
    # k = 10_000 entries, each an int32 index and a float32 value
    assert compressed_bytes(specs, "topk", 0.01) == 10_000 * (4 + 4)
    assert dense / compressed_bytes(specs, "topk", 0.01) == 50


def test_topk_count_rounds_up_and_keeps_at_least_one():
    assert compression.topk_count(150, 0.01) == 2  # ceil(1.5)
    assert compression.topk_count(10, 1e-6) == 1
    assert compression.topk_count(10, 1.0) == 10
    assert wire_specs([wire.TensorSpec("w", "float32", (3, 50))], "topk", 0.01)[0].shape == (2,)


@pytest.mark.parametrize("mode", compression.MODES)
def test_integer_and_empty_tensors_pass_through(mode):
    update = {
        "count": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "w": torch.tensor([2.0, -1.0]),
    }
    packed = compress(update, mode, topk_ratio=0.5)
    assert packed["count"].dtype == torch.int64 and packed["count"].item() == 7
    assert packed["empty"].shape == (0, 3) and packed["empty"].dtype == torch.float32
    restored = decompress(packed, wire.specs_of(update), mode)
    assert wire.specs_of(restored) == wire.specs_of(update)
    assert restored["count"].item() == 7


def test_topk_leaves_tensors_outside_sparse_names_dense():
    update = {"weight": torch.tensor([1.0, 0.0, 0.0, 0.0]), "running_var": torch.tensor([0.5, 0.25, 2.0, 1.0])}
    packed = compress(update, "topk", topk_ratio=0.25, sparse_names={"weight"})
    assert list(packed) == ["weight.indices", "weight.values", "running_var"]
    assert torch.equal(packed["running_var"], update["running_var"])
    restored = decompress(packed, wire.specs_of(update), "topk")
    assert torch.equal(restored["weight"], update["weight"])
    assert torch.equal(restored["running_var"], update["running_var"])


def test_sparse_names_do_not_limit_int8_or_fp16():
    specs = [wire.TensorSpec("weight", "float32", (4,)), wire.TensorSpec("running_var", "float32", (4,))]
    assert [s.dtype for s in wire_specs(specs, "fp16", sparse_names={"weight"})] == ["float16", "float16"]
    assert len(wire_specs(specs, "int8", sparse_names={"weight"})) == 4


@pytest.mark.parametrize("mode", compression.MODES)
def test_resnet20_layout_matches_compress_output_and_survives_the_wire(mode):
    net = model.build_model("resnet20", 10)
    update = net.state_dict()
    specs = wire.specs_of(update)
    parameters = {name for name, _ in net.named_parameters()}
    expected = wire_specs(specs, mode, 0.01, parameters)
    packed = compress(update, mode, 0.01, parameters, residual={})
    assert wire.specs_of(packed) == expected
    manifest, payload = wire.encode(packed)
    assert len(payload) == compressed_bytes(specs, mode, 0.01, parameters)
    received = wire.decode(wire.read_manifest(manifest), payload)
    restored = decompress(received, specs, mode)
    assert wire.specs_of(restored) == specs
    if mode == "none":
        assert all(torch.equal(restored[name], update[name]) for name in specs_names(specs))
    if mode == "topk":  # BatchNorm statistics arrive untouched
        buffers = [name for name in specs_names(specs) if name not in parameters]
        assert buffers and all(torch.equal(restored[name], update[name]) for name in buffers)


def specs_names(specs):
    return [spec.name for spec in specs]


def test_colliding_names_are_refused():
    specs = [wire.TensorSpec("a", "float32", (2,)), wire.TensorSpec("a.scale", "int64", (1,))]
    with pytest.raises(ValueError, match="a.scale"):
        wire_specs(specs, "int8", 0.01)
    with pytest.raises(ValueError, match="same name"):
        compress({"a": torch.ones(2), "a.values": torch.ones(1, dtype=torch.int64)}, "topk")


def test_unknown_mode_and_bad_ratio_are_refused():
    specs = [wire.TensorSpec("w", "float32", (4,))]
    with pytest.raises(ValueError, match="unknown compression mode"):
        wire_specs(specs, "int4", 0.01)
    with pytest.raises(ValueError, match="ratio"):
        wire_specs(specs, "topk", 0.0)
    with pytest.raises(ValueError, match="ratio"):
        compress({"w": torch.ones(4)}, "topk", topk_ratio=1.5)


def test_fp16_overflow_is_refused_at_the_sender():
    with pytest.raises(ValueError, match="float16"):
        compress({"w": torch.tensor([1e6])}, "fp16")


SPECS4 = [wire.TensorSpec("w", "float32", (4,))]


def topk_payload(indices, values):
    return {"w.indices": torch.tensor(indices, dtype=torch.int32), "w.values": torch.tensor(values, dtype=torch.float32)}


@pytest.mark.parametrize(
    ("indices", "reason"),
    [([1, 4], "out of range"), ([-1, 2], "out of range"), ([2, 2], "repeat")],
)
def test_decompress_refuses_bad_topk_indices(indices, reason):
    with pytest.raises(ValueError, match=reason):
        decompress(topk_payload(indices, [1.0, 2.0]), SPECS4, "topk")


def test_decompress_refuses_mismatched_or_too_many_topk_entries():
    with pytest.raises(ValueError, match="one length"):
        decompress(topk_payload([0, 1], [1.0]), SPECS4, "topk")
    with pytest.raises(ValueError, match="5 top-k entries"):
        decompress(topk_payload([0, 1, 2, 3, 0], [1.0] * 5), SPECS4, "topk")


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), 3e38])
def test_decompress_refuses_bad_int8_scales(scale):
    packed = {"w": torch.zeros(4, dtype=torch.int8), "w.scale": torch.tensor([scale])}
    with pytest.raises(ValueError, match="scale"):
        decompress(packed, SPECS4, "int8")


def test_decompress_refuses_level_minus_128():
    levels = torch.tensor([-128, 0, 1, 2], dtype=torch.int8)
    with pytest.raises(ValueError, match="-128"):
        decompress({"w": levels, "w.scale": torch.tensor([0.1])}, SPECS4, "int8")


def test_decompress_refuses_missing_extra_and_mistyped_tensors():
    good = compress({"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, "int8")
    with pytest.raises(ValueError, match="lacks tensor 'w.scale'"):
        decompress({"w": good["w"]}, SPECS4, "int8")
    with pytest.raises(ValueError, match="unexpected tensors in compressed update: extra"):
        decompress({**good, "extra": torch.zeros(1)}, SPECS4, "int8")
    with pytest.raises(ValueError, match="dtype float32, expected int8"):
        decompress({**good, "w": good["w"].float()}, SPECS4, "int8")
    with pytest.raises(ValueError, match="unknown compression mode"):
        decompress(good, SPECS4, "int4")
