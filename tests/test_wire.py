"""The tensor wire format: round trips, chunking and every refusal, without a network."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from fedgrpc.protos import leader_pb2
from fedgrpc.transport import wire


def sample() -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(6, dtype=torch.float32).view(2, 3),
        "half": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "bf": torch.tensor([0.25], dtype=torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64),
        "pixels": torch.tensor([[0, 255]], dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
    }


def messages(tensors, chunk_bytes=wire.CHUNK_BYTES, **header):
    manifest, payload = wire.encode(tensors)
    return list(wire.stream(leader_pb2.GradientData, manifest, payload, chunk_bytes, **header))


def test_round_trip_keeps_names_dtypes_shapes_and_values_over_many_chunks():
    tensors = sample()
    stream = messages(tensors, chunk_bytes=5, round=4)
    manifest, payload = wire.encode(tensors)
    assert manifest.total_bytes == 6 * 4 + 2 * 2 + 2 + 8 + 2 + 0 == len(payload)
    assert len(stream) == -(-len(payload) // 5)
    assert all(not m.HasField("manifest") for m in stream[1:])
    received = wire.receive(stream, max_bytes=1000, expected=wire.specs_of(tensors))
    assert received.header.round == 4
    assert list(received.tensors) == list(tensors)
    for name, tensor in tensors.items():
        assert received.tensors[name].dtype == tensor.dtype
        assert torch.equal(received.tensors[name], tensor)


def test_layout_is_little_endian_raw_bytes_in_manifest_order():
    _, payload = wire.encode({"a": torch.tensor([1.0], dtype=torch.float32), "b": torch.tensor([258], dtype=torch.int32)})
    assert bytes(payload) == b"\x00\x00\x80\x3f" + b"\x02\x01\x00\x00"


def test_a_single_message_carrying_manifest_and_bytes_is_a_valid_stream():
    manifest, payload = wire.encode(sample())
    single = leader_pb2.GradientData(chunk=bytes(payload), manifest=manifest)
    assert torch.equal(wire.receive([single], max_bytes=1000).tensors["w"], sample()["w"])


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda m: m.tensors[0].__setattr__("dtype", "object"), "unknown dtype"),
        (lambda m: m.tensors[1].__setattr__("name", "w"), "appears twice"),
        (lambda m: m.tensors[0].shape.__setitem__(0, -2), "negative dimension"),
        (lambda m: m.__setattr__("total_bytes", m.total_bytes + 1), "manifest says"),
    ],
)
def test_malformed_manifests_are_refused(mutate, reason):
    stream = messages(sample())
    mutate(stream[0].manifest)
    with pytest.raises(wire.WireError, match=reason):
        wire.receive(stream, max_bytes=1000)


def test_stream_refusals():
    tensors = sample()
    expected = wire.specs_of(tensors)
    with pytest.raises(wire.WireError, match="empty stream"):
        wire.receive([], max_bytes=1000)
    with pytest.raises(wire.WireError, match="no tensor manifest"):
        wire.receive([leader_pb2.GradientData(chunk=b"\x80\x04pickle")], max_bytes=1000)
    with pytest.raises(wire.WireError, match="exceeds the 10-byte limit"):
        wire.receive(messages(tensors), max_bytes=10)
    truncated = messages(tensors, chunk_bytes=8)[:-1]
    with pytest.raises(wire.WireError, match="truncated"):
        wire.receive(truncated, max_bytes=1000)
    padded = messages(tensors, chunk_bytes=8) + [leader_pb2.GradientData(chunk=b"x")]
    with pytest.raises(wire.WireError, match="longer than"):
        wire.receive(padded, max_bytes=1000)
    second_manifest = messages(tensors, chunk_bytes=8)
    second_manifest[1].manifest.CopyFrom(second_manifest[0].manifest)
    with pytest.raises(wire.WireError, match="only the first"):
        wire.receive(second_manifest, max_bytes=1000)
    manifest, _ = wire.encode(tensors)
    oversized_chunk = leader_pb2.GradientData(chunk=b"\0" * (wire.MAX_CHUNK_BYTES + 1), manifest=manifest)
    with pytest.raises(wire.WireError, match="chunk of"):
        wire.receive([oversized_chunk], max_bytes=1 << 30)
    nan = dict(tensors, w=torch.tensor([[0.0, float("nan"), 0.0]] * 2))
    with pytest.raises(wire.WireError, match="NaN or infinite"):
        wire.receive(messages(nan), max_bytes=1000, expected=expected)


def test_expected_specs_catch_missing_extra_retyped_and_reshaped_tensors():
    tensors = sample()
    expected = wire.specs_of(tensors)
    cases = {
        "missing tensors: bf": {k: v for k, v in tensors.items() if k != "bf"},
        "unexpected tensors: x": dict(tensors, x=torch.zeros(1)),
        "dtype float64, expected float32": dict(tensors, w=tensors["w"].double()),
        r"shape \[3, 2\], expected \[2, 3\]": dict(tensors, w=tensors["w"].view(3, 2)),
    }
    for reason, changed in cases.items():
        with pytest.raises(wire.WireError, match=reason):
            wire.receive(messages(changed), max_bytes=1000, expected=expected)


def test_check_header_runs_before_bulk_bytes_are_read():
    seen = []

    def chunks():
        for message in messages(sample(), chunk_bytes=4):
            seen.append(message)
            yield message

    def refuse(header):
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        wire.receive(chunks(), max_bytes=1000, check_header=refuse)
    assert len(seen) == 1


def test_finite_check_catches_nan_and_inf_and_keeps_huge_finite_values():
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensors = {"w": torch.tensor([1.0, bad, 2.0])}
        with pytest.raises(wire.WireError, match="NaN or infinite"):
            wire.decode(wire.specs_of(tensors), wire.encode(tensors)[1])
    opposite = {"w": torch.tensor([float("inf"), float("-inf")], dtype=torch.float16)}  # sums to NaN, not to a finite value
    with pytest.raises(wire.WireError):
        wire.decode(wire.specs_of(opposite), wire.encode(opposite)[1])
    huge = {"w": torch.tensor([1e308, 1e308], dtype=torch.float64)}  # finite, though their sum overflows float64
    assert torch.equal(wire.decode(wire.specs_of(huge), wire.encode(huge)[1])["w"], huge["w"])


def test_chunk_deserializer_views_bare_chunks_and_leaves_every_other_message_to_protobuf():
    deserialize = wire.chunk_deserializer(leader_pb2.GradientData)
    body = bytes(range(256)) * 1000  # long enough for a three-byte varint length
    data = leader_pb2.GradientData(chunk=body).SerializeToString()
    bare = deserialize(data)
    assert isinstance(bare, wire.ChunkOnly) and bytes(bare.chunk) == body
    assert bare.chunk.obj is data  # a view of the received buffer, not a copy
    assert not bare.HasField("manifest")
    manifest, _ = wire.encode(sample())
    for message in (
        leader_pb2.GradientData(chunk=b"abc", manifest=manifest, round=3, num_examples=7),  # a stream's first message
        leader_pb2.GradientData(chunk=b"abc", round=3),  # a chunk followed by another field
        leader_pb2.GradientData(),  # an empty chunk: nothing on the wire
    ):
        parsed = deserialize(message.SerializeToString())
        assert isinstance(parsed, leader_pb2.GradientData) and parsed == message
    with pytest.raises(DecodeError):
        deserialize(b"\x0a\x05abc")  # a length past the end is protobuf's to refuse, as before


def test_a_stream_read_through_the_chunk_deserializer_reassembles_the_same_payload():
    deserialize = wire.chunk_deserializer(leader_pb2.GradientData)
    manifest, payload = wire.encode(sample())
    sent = wire.stream(leader_pb2.GradientData, manifest, payload, chunk_bytes=7, round=1)
    arrived = [deserialize(message.SerializeToString()) for message in sent]
    assert len(arrived) > 2 and all(isinstance(message, wire.ChunkOnly) for message in arrived[1:])
    received = wire.receive(arrived, len(payload), wire.specs_of(sample()))
    assert received.payload == payload and received.header.round == 1
    assert torch.equal(received.tensors["w"], sample()["w"])


def test_buffer_pool_hands_back_kept_buffers_of_its_size_up_to_its_cap():
    pool = wire.BufferPool(8, keep=1)
    first, second = pool.take(8), pool.take(8)
    assert first is not second and len(first) == 8
    pool.give(first)
    pool.give(second)  # over the cap: dropped
    assert pool.kept == 1
    assert pool.take(8) is first
    assert pool.take(8) is not second
    other = pool.take(4)
    assert len(other) == 4
    pool.give(other)  # another size is never kept
    assert pool.kept == 0


def test_a_non_finite_tensor_is_refused_as_soon_as_its_bytes_are_in():
    tensors = {"bad": torch.tensor([1.0, float("nan")]), "rest": torch.zeros(1000)}
    sent = messages(tensors, chunk_bytes=8)  # the first message completes "bad"; 500 more carry "rest"
    read = []

    def arriving():
        for message in sent:
            read.append(message)
            yield message

    with pytest.raises(wire.WireError, match="'bad' holds NaN"):
        wire.receive(arriving(), max_bytes=10_000)
    assert len(read) == 1 < len(sent)


def test_norms_from_the_finite_check_match_float64_for_every_float_dtype_and_for_squares_beyond_float32():
    tensors = {
        "w": torch.tensor([[3.0, 4.0]]),  # 5 by hand
        "huge": torch.tensor([3e30, 4e30]),  # finite, though its squares overflow float32: 5e30
        "half": torch.tensor([300.0, 400.0], dtype=torch.float16),  # squares overflow float16: 500
        "bf": torch.tensor([0.5], dtype=torch.bfloat16),
        "double": torch.tensor([1e150, 1e150], dtype=torch.float64),
        "count": torch.tensor(7),
    }
    received = wire.receive(messages(tensors, chunk_bytes=7), max_bytes=1000)
    assert set(received.norms) == {"w", "huge", "half", "bf", "double"}  # floating-point tensors only
    expected = {"w": 5.0, "huge": 5e30, "half": 500.0, "bf": 0.5, "double": 2**0.5 * 1e150}
    for name, norm in expected.items():
        assert received.norms[name] == pytest.approx(norm, rel=1e-6), name


def test_frames_are_the_bytes_protobuf_would_send_and_the_receiver_reads_them_back():
    tensors = sample()
    manifest, payload = wire.encode(tensors)
    for chunk_bytes in (5, wire.CHUNK_BYTES):  # many chunks, and one
        framed = list(wire.frames(leader_pb2.GradientData, manifest, payload, chunk_bytes, round=3, learner_id=1))
        sent = [
            message.SerializeToString()
            for message in wire.stream(leader_pb2.GradientData, manifest, payload, chunk_bytes, round=3, learner_id=1)
        ]
        assert framed == sent
    big = {"w": torch.arange(100_000, dtype=torch.float32)}  # 400,000 bytes: 300-byte chunks need a two-byte length
    manifest, payload = wire.encode(big)
    framed = list(wire.frames(leader_pb2.GradientData, manifest, payload, 300, round=2))
    assert framed == [m.SerializeToString() for m in wire.stream(leader_pb2.GradientData, manifest, payload, 300, round=2)]
    deserialize = wire.chunk_deserializer(leader_pb2.GradientData)
    received = wire.receive((deserialize(frame) for frame in framed), max_bytes=len(payload))
    assert received.header.round == 2 and torch.equal(received.tensors["w"], big["w"])
    assert wire.serialize(framed[1]) is framed[1]
    assert wire.serialize(leader_pb2.Ack(success=True)) == leader_pb2.Ack(success=True).SerializeToString()
    empty = list(wire.frames(leader_pb2.GradientData, *wire.encode({}), round=1))
    assert empty == [leader_pb2.GradientData(round=1, manifest=wire.encode({})[0]).SerializeToString()]


def test_encoding_into_a_reused_buffer_writes_every_byte():
    tensors = sample()
    _, fresh = wire.encode(tensors)
    dirty = bytearray(b"\xff" * len(fresh))  # a kept buffer still holds the last payload
    _, reused = wire.encode(tensors, allocate=lambda size: dirty)
    assert reused is dirty and reused == fresh
