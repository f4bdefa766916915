"""Property-based fuzzing of the parsers of untrusted input: every input is taken, or refused with the parser's own one-line error.

The rule each property holds a parser to: whatever it is given, it accepts it or refuses it with its own error (a
WireError, LearnerError, ConfigFileError, argparse's error, or a gRPC status with a reason) whose message is one line;
never another exception, never a hang, and never an allocation beyond its declared bound. Examples are drawn the same
way on every machine (derandomize) and nothing is saved between runs (no database).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import configuration, example, given, settings
from hypothesis import strategies as st

from conftest import callback_address, leader_config, register_client, running_leader
from fedgrpc.config.files import ConfigFileError, parse_with_config, read_config_file
from fedgrpc.config.options import LeaderConfig, build_leader_parser
from fedgrpc.leader.roster import check_learner_info
from fedgrpc.learner.data import MAX_DATA_BYTES, MAX_SPLIT_EXAMPLES, LearnerError, check_data, fetch_split, layout_specs, split_specs
from fedgrpc.learner.options import build_learner_parser
from fedgrpc.protos import leader_pb2, leader_pb2_grpc, tensors_pb2
from fedgrpc.transport import rpc, wire

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TORCH_DIMS = 64  # torch refuses tensors of more dimensions
LARGEST_SENT_SPLIT = 64 << 10  # the stand-in leader sends splits up to this size in full, larger ones not at all
REFUSAL_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}


# Hypothesis caches the constants it finds in the package's source under its home directory, from the moment tests are
# collected: a temporary one, removed at exit, so that a test run leaves the checkout as it found it.
HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="hypothesis-")
configuration.set_hypothesis_home_dir(HYPOTHESIS_HOME.name)


def fuzz(examples: int) -> settings:
    """One property's settings: `examples` inputs, drawn the same way on every machine, nothing saved between runs."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None)


def assert_one_line(message: str) -> None:
    """A refusal's reason: some text, on one line, with no line break anywhere (a trailing one included)."""
    assert message and message.splitlines() == [message], f"not a one-line reason: {message[:400]!r}"


def tensor_can_exist(shape: tuple[int, ...]) -> bool:
    """Whether torch can make a tensor of this shape: no negative size, at most 64 dimensions, strides within int64."""
    return len(shape) <= MAX_TORCH_DIMS and all(dim >= 0 for dim in shape) and math.prod(max(dim, 1) for dim in shape) <= INT64_MAX


# ---- what a peer may put in a manifest ------------------------------------------------------------------------------

INT64 = st.integers(INT64_MIN, INT64_MAX)
# small dimensions, negative ones, and sizes past any memory and past int64 strides
DIMS = st.one_of(st.integers(0, 3), st.integers(-2, -1), st.sampled_from([2**31, 2**32 + 1, 2**62, INT64_MAX, INT64_MIN]), INT64)
# many dimensions, drawn as a count rather than one by one (a zero-size tensor of them needs no bytes)
MANY_DIMS = st.builds(lambda ones, zero: [1] * ones + [0] * zero, st.integers(MAX_TORCH_DIMS - 2, MAX_TORCH_DIMS + 4), st.integers(0, 1))
SHAPES = st.one_of(st.lists(DIMS, max_size=4), MANY_DIMS)
NAMES = st.one_of(st.sampled_from(["w", "b", "", "w\nx", "\u2028", "x" * 300]), st.text(max_size=8))
DTYPES = st.one_of(
    st.sampled_from(list(wire.DTYPES)), st.sampled_from(["float", "complex64", "object", "Float32", "int8\n"]), st.text(max_size=8)
)


def declared_bytes(manifest: tensors_pb2.TensorManifest) -> int | None:
    """What a manifest's tensors add up to, when every dtype is known and the sum fits its total_bytes field."""
    if any(entry.dtype not in wire.DTYPES for entry in manifest.tensors):
        return None
    total = sum(math.prod(entry.shape) * wire.DTYPES[entry.dtype].itemsize for entry in manifest.tensors)
    return total if INT64_MIN <= total <= INT64_MAX else None


@st.composite
def manifests(draw: Any) -> tensors_pb2.TensorManifest:
    """A manifest of any names, dtypes and shapes; its total_bytes adds up, or is any int64."""
    manifest = tensors_pb2.TensorManifest()
    for _ in range(draw(st.integers(0, 4))):
        manifest.tensors.add(name=draw(NAMES), dtype=draw(DTYPES), shape=draw(SHAPES))
    total = declared_bytes(manifest)
    manifest.total_bytes = draw(st.one_of(st.just(total if total is not None else 0), st.integers(0, 64), INT64))
    return manifest


@st.composite
def small_specs(draw: Any) -> list[wire.TensorSpec]:
    """A well-formed payload layout of a few small tensors."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    dtypes = st.sampled_from(list(wire.DTYPES))
    return [wire.TensorSpec(name, draw(dtypes), tuple(draw(st.lists(st.integers(0, 3), max_size=3)))) for name in names]


# ---- the tensor wire format ------------------------------------------------------------------------------------------


@fuzz(1000)
@given(manifest=manifests())
def test_a_manifest_is_read_into_specs_that_add_up_or_refused_with_a_wire_error(manifest):
    """read_manifest either returns specs of known dtypes, unique names and shapes torch can hold, whose bytes add up to
    the declared total, or raises a one-line WireError: never IndexError, OverflowError or a torch error."""
    try:
        specs = wire.read_manifest(manifest)
    except wire.WireError as error:
        assert_one_line(str(error))
        return
    assert wire.payload_bytes(specs) == manifest.total_bytes
    assert len({spec.name for spec in specs}) == len(specs)
    assert all(spec.dtype in wire.DTYPES and tensor_can_exist(spec.shape) for spec in specs)


class Allocations:
    """The allocator a receiver passes to wire.receive, recording every size it is asked for."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, size: int) -> bytearray:
        assert 0 <= size <= self.limit, f"asked for {size} bytes, beyond the {self.limit}-byte limit"
        self.sizes.append(size)
        return bytearray(size)


@dataclass
class Stream:
    """One fuzzed update stream as a receiver gets it, with what the receiver expects."""

    messages: list[Any]
    expected: list[wire.TensorSpec] | None
    max_bytes: int
    mutation: str  # "none": a well-formed stream of the expected tensors, within the limits


MUTATIONS = [
    "none",
    "dtype",
    "shape",
    "name",
    "total",
    "drop tensor",
    "extra tensor",
    "truncate",
    "extend",
    "second manifest",
    "no manifest",
    "oversized",
    "empty",
    "limit",
]


@st.composite
def mutated_streams(draw: Any) -> Stream:
    """A well-formed stream of a few tensors (any bytes, NaN included), framed and deserialized as gRPC does it, with one
    field or one message changed."""
    specs = draw(small_specs())
    total = wire.payload_bytes(specs)
    payload = draw(st.binary(min_size=total, max_size=total))
    mutation = draw(st.sampled_from(MUTATIONS))
    manifest = wire.manifest_of(specs)
    entry = manifest.tensors[draw(st.integers(0, len(specs) - 1))]
    if mutation == "dtype":
        entry.dtype = draw(DTYPES)
    elif mutation == "shape":
        entry.ClearField("shape")
        entry.shape.extend(draw(SHAPES))
    elif mutation == "name":
        entry.name = draw(NAMES)
    elif mutation == "total":
        manifest.total_bytes = draw(st.one_of(st.integers(-2, total + 2), INT64))
    elif mutation == "drop tensor":
        manifest.tensors.remove(entry)
    elif mutation == "extra tensor":
        manifest.tensors.add(name=draw(NAMES), dtype=draw(DTYPES), shape=draw(SHAPES))
    frames = list(wire.frames(leader_pb2.GradientData, manifest, payload, draw(st.integers(1, total + 2)), round=1, num_examples=5))
    if mutation == "truncate":
        if len(frames) > 1 and draw(st.booleans()):
            del frames[draw(st.integers(1, len(frames) - 1))]
        else:
            frames[-1] = frames[-1][: draw(st.integers(0, max(len(frames[-1]) - 1, 0)))]
    elif mutation == "extend":
        frames.insert(draw(st.integers(1, len(frames))), leader_pb2.GradientData(chunk=draw(st.binary(max_size=8))).SerializeToString())
    elif mutation == "second manifest":
        frames.insert(draw(st.integers(1, len(frames))), leader_pb2.GradientData(manifest=manifest).SerializeToString())
    elif mutation == "no manifest":
        frames[0] = leader_pb2.GradientData(chunk=payload[: len(frames[0])]).SerializeToString()
    elif mutation == "empty":
        frames = []
    limit = wire.first_message_limit(specs)
    if mutation == "oversized":
        limit = draw(st.integers(0, max(len(frames[0]) - 1, 0)))
    deserialize = wire.chunk_deserializer(leader_pb2.GradientData, limit)
    try:
        messages = [deserialize(frame) for frame in frames]
    except DecodeError:  # a cut frame protobuf itself refuses: gRPC answers it before any handler runs
        messages = [leader_pb2.GradientData()]
    max_bytes = draw(st.integers(0, total - 1)) if mutation == "limit" and total else total
    return Stream(messages, draw(st.sampled_from([specs, None])), max_bytes, mutation if mutation != "limit" or total else "none")


@st.composite
def random_streams(draw: Any) -> Stream:
    """A stream whose first message carries any manifest, followed by any chunks, bare or not."""
    first = leader_pb2.GradientData(manifest=draw(manifests()), chunk=draw(st.binary(max_size=64)))
    rest = [
        wire.ChunkOnly(memoryview(chunk)) if bare else leader_pb2.GradientData(chunk=chunk)
        for chunk, bare in draw(st.lists(st.tuples(st.binary(max_size=64), st.booleans()), max_size=4))
    ]
    expected = draw(st.one_of(st.none(), small_specs()))
    return Stream([first, *rest], expected, draw(st.integers(0, 4096)), "random")


def manifest_passes(first: Any, expected: list[wire.TensorSpec] | None, max_bytes: int) -> bool:
    """Whether a stream's first message declares a payload the receiver may allocate: a manifest that reads, matches and fits."""
    if not isinstance(first, leader_pb2.GradientData) or not first.HasField("manifest"):
        return False
    try:
        specs = wire.read_manifest(first.manifest)
        if expected is not None:
            wire.check_specs(specs, expected)
    except wire.WireError:
        return False
    return first.manifest.total_bytes <= max_bytes


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor holds only finite values."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors.values() if tensor.dtype.is_floating_point)


@fuzz(1000)
@given(stream=st.one_of(mutated_streams(), mutated_streams(), random_streams()))
def test_a_tensor_stream_is_received_or_refused_before_anything_is_allocated(stream):
    """wire.receive either assembles exactly the bytes sent, as the tensors the manifest names, or raises a one-line
    WireError; it allocates once, the declared size, and only after the manifest has read, matched the expected tensors
    and fitted the limit; a well-formed stream is refused only for a NaN or an infinity."""
    allocations = Allocations(max(stream.max_bytes, 0))
    try:
        received = wire.receive(stream.messages, stream.max_bytes, stream.expected, allocate=allocations)
    except wire.WireError as error:
        assert_one_line(str(error))
        received = None
    first = stream.messages[0] if stream.messages else None
    assert allocations.sizes == ([first.manifest.total_bytes] if manifest_passes(first, stream.expected, stream.max_bytes) else [])
    if received is not None:
        assert bytes(received.payload) == b"".join(bytes(message.chunk) for message in stream.messages)
        specs = wire.read_manifest(first.manifest)
        assert [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in received.tensors.items()] == [
            (spec.name, wire.DTYPES[spec.dtype], spec.shape) for spec in specs
        ]
    if stream.mutation == "none":
        expected = stream.expected or wire.read_manifest(first.manifest)
        payload = bytearray(b"".join(bytes(message.chunk) for message in stream.messages))
        assert (received is not None) == all_finite(wire.decode(expected, payload, require_finite=False))


@st.composite
def frames_like_chunks(draw: Any) -> bytes:
    """Bytes that look like a bare chunk message: its tag, a varint length (perhaps padded or off by a few) and bytes."""
    chunk = draw(st.binary(max_size=16))
    length = max(0, len(chunk) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**35])))
    varint = bytearray()
    while True:
        varint.append(length & 0x7F | (0x80 if length >= 0x80 else 0))
        length >>= 7
        if not length:
            break
    padding = draw(st.integers(0, 10 - len(varint)))  # a varint may be padded to 10 bytes; protobuf reads a length of 5 at most
    if padding:
        varint[-1] |= 0x80
        varint += b"\x80" * (padding - 1) + b"\x00"
    tail = draw(st.one_of(st.just(b""), st.binary(max_size=6)))
    return bytes([wire.CHUNK_TAG]) + bytes(varint) + chunk + tail


@fuzz(3000)
@given(data=st.one_of(st.binary(max_size=40), frames_like_chunks()), limit=st.one_of(st.none(), st.integers(0, 48)))
def test_the_chunk_deserializer_reads_every_message_as_protobuf_does(data, limit):
    """chunk_deserializer agrees with protobuf on any bytes: a ChunkOnly only where protobuf reads a message of nothing but
    those chunk bytes, an Oversized only past the limit, else protobuf's own message or its DecodeError."""
    deserialize = wire.chunk_deserializer(leader_pb2.GradientData, limit)
    try:
        parsed = leader_pb2.GradientData.FromString(data)
    except DecodeError:
        parsed = None
    try:
        got = deserialize(data)
    except DecodeError:
        assert parsed is None
        assert limit is None or len(data) <= limit
        return
    if isinstance(got, wire.ChunkOnly):
        assert parsed == leader_pb2.GradientData(chunk=bytes(got.chunk))
    elif isinstance(got, wire.Oversized):
        assert limit is not None and got.size == len(data) > limit
    else:
        assert got == parsed


# ---- a learner's data split ------------------------------------------------------------------------------------------

LAYOUT_SHAPES = st.one_of(st.lists(st.integers(0, 4), max_size=3), SHAPES)
COUNTS = st.one_of(st.integers(0, 6), st.integers(-3, -1), st.sampled_from([2**31, 2**62, INT64_MAX]), INT64)


@st.composite
def layouts(draw: Any) -> list[tensors_pb2.TensorSpec]:
    """A data split's announced layout: an image and a label, or any list of named, typed and shaped tensors."""
    images = tensors_pb2.TensorSpec(name="images", dtype="uint8", shape=draw(LAYOUT_SHAPES))
    labels = tensors_pb2.TensorSpec(name="labels", dtype=draw(st.sampled_from(["int64", "uint8", "bool", "float32"])), shape=[])
    entries = st.builds(tensors_pb2.TensorSpec, name=NAMES, dtype=DTYPES, shape=LAYOUT_SHAPES)
    return draw(st.one_of(st.just([images, labels]), st.lists(entries, max_size=20)))


class StandInLeader:
    """GetData as the leader that announced `layout` and `count` answers it: the whole split when it is small, else nothing."""

    def __init__(self, count: int, layout: list[wire.TensorSpec], pattern: bytes) -> None:
        self.specs = split_specs(count, layout)
        self.pattern = pattern
        self.calls = 0

    def GetData(self, request: leader_pb2.LearnerDataRequest, timeout: float, metadata: Any) -> list[leader_pb2.DataChunk]:  # noqa: N802 - the stub method it stands in for
        self.calls += 1
        size = wire.payload_bytes(self.specs)
        if not 0 <= size <= LARGEST_SENT_SPLIT or not all(tensor_can_exist(spec.shape) for spec in self.specs):
            return []
        payload = (self.pattern * size)[:size]
        return list(wire.stream(leader_pb2.DataChunk, wire.manifest_of(self.specs), payload, chunk_bytes=4096))


@fuzz(1200)
@given(
    entries=layouts(),
    count=COUNTS,
    pattern=st.binary(min_size=1, max_size=4),
    num_classes=st.integers(-(2**31), 2**31 - 1),
    image_shape=st.one_of(st.just([]), st.lists(st.integers(0, 4), max_size=3), st.lists(INT64, max_size=3)),
)
def test_a_data_split_is_asked_for_only_when_it_can_exist_and_checked_before_training(entries, count, pattern, num_classes, image_shape):
    """A learner refuses a leader's split layout with a one-line LearnerError, or asks GetData for it only when every
    tensor of `count` examples can exist within MAX_DATA_BYTES; what it receives has exactly that layout, and check_data
    takes it or refuses it with a one-line LearnerError."""
    try:
        layout = layout_specs(entries)
    except LearnerError as error:
        assert_one_line(str(error))
        return
    leader = StandInLeader(count, layout, pattern)
    plan = leader_pb2.TrainingPlan(num_classes=num_classes, image_shape=image_shape)
    try:
        data, nbytes = fetch_split(leader, 0, count, layout, plan, ())
    except LearnerError as error:
        assert_one_line(str(error))
        data = None
    if leader.calls:
        assert 0 <= count <= MAX_SPLIT_EXAMPLES and all(tensor_can_exist(spec.shape) for spec in leader.specs)
        assert wire.payload_bytes(leader.specs) <= MAX_DATA_BYTES
    if data is None:
        return
    assert leader.calls == 1 and len(data) == count and nbytes == wire.payload_bytes(leader.specs)
    assert [(tuple(tensor.shape), tensor.dtype) for tensor in data.tensors] == [
        (spec.shape, wire.DTYPES[spec.dtype]) for spec in leader.specs
    ]
    try:
        check_data(data, plan)
    except LearnerError as error:
        assert_one_line(str(error))


# ---- config files ---------------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["-1", "0", " 1", "1\n", "0\n", "-1\n", "nan", "1e999", "--rounds", "-", "True", "fedavg", "127.0.0.1:1"]),
)
VALUES = st.recursive(
    st.one_of(st.none(), SCALARS),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=2)),
    max_leaves=5,
)


def toml_value(value: Any) -> str | None:
    """A value as TOML, or None for one TOML cannot write (null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        items = [toml_value(item) for item in value]
        return None if None in items else f"[{', '.join(items)}]"
    items = [(json.dumps(key, ensure_ascii=False), toml_value(item)) for key, item in value.items()]
    return None if any(item is None for _, item in items) else "{" + ", ".join(f"{key} = {item}" for key, item in items) + "}"


def toml_document(settings: dict[str, Any]) -> str:
    """Settings as a TOML document, leaving out those TOML cannot write."""
    lines = [(json.dumps(key, ensure_ascii=False), toml_value(value)) for key, value in settings.items()]
    return "".join(f"{key} = {value}\n" for key, value in lines if value is not None)


def flag_names(parser: Any) -> list[str]:
    """Every long flag of a parser, as a config key."""
    return sorted({option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")})


SETTING_KEYS = st.one_of(
    st.sampled_from(flag_names(build_leader_parser()) + flag_names(build_learner_parser())).map(lambda key: key.replace("-", "_")),
    st.sampled_from(flag_names(build_leader_parser())),
    st.sampled_from(["help", "config", "compress", "--rounds", "", "rounds\n"]),
    st.text(max_size=8),
)
SETTINGS = st.dictionaries(SETTING_KEYS, VALUES, max_size=4)


@st.composite
def config_texts(draw: Any) -> str | bytes:
    """A config file's contents: TOML or JSON of any settings, one of them cut or spliced, or any text or bytes."""
    settings = draw(SETTINGS)
    document = draw(st.sampled_from([toml_document(settings), json.dumps(settings)]))
    cut = draw(st.integers(0, len(document)))
    nested = draw(st.integers(1, 5000))
    return draw(
        st.one_of(
            st.just(document),
            st.just(document[:cut] + draw(st.text(max_size=3)) + document[cut:]),
            st.just(document[:cut]),
            st.text(max_size=40),
            st.binary(max_size=40),
            st.sampled_from(
                [
                    "[" * nested,
                    "a = " + "[" * nested,
                    "a = " + "{a = " * nested,
                    "a = " + "9" * (nested + 4300),
                    '{"a": ' + "9" * (nested + 4300) + "}",
                    "\ufeff{}",
                    "[]",
                    '"rounds"',
                    "null",
                    b"\xff\xfe\x00",
                    b"rounds = 1\n\x80",
                ]
            ),
        )
    )


def write_config(directory: str, suffix: str, text: str | bytes) -> str:
    """A config file of these contents in `directory`; its path."""
    path = Path(directory) / f"settings{suffix}"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return str(path)


@fuzz(1000)
@given(text=config_texts(), suffix=st.sampled_from([".toml", ".json", ".JSON", ".cfg", ""]))
def test_a_config_file_is_read_as_a_table_or_refused_with_a_config_file_error(text, suffix):
    """read_config_file returns a table of settings from any TOML or JSON file, or raises a one-line ConfigFileError:
    never UnicodeDecodeError, RecursionError or ValueError for bytes that are not UTF-8, deep nesting or huge integers."""
    with tempfile.TemporaryDirectory() as directory:
        path = write_config(directory, suffix, text)
        try:
            values = read_config_file(path)
        except ConfigFileError as error:
            assert_one_line(str(error))
            return
    assert isinstance(values, dict)


class ParserRefused(Exception):
    """What argparse's error() raises in these tests, instead of printing and exiting."""


@fuzz(500)
@given(settings_=SETTINGS, as_json=st.booleans(), role=st.sampled_from(["leader", "learner"]))
@example(settings_={"round_timeout": "-1\n"}, as_json=True, role="leader")  # a refusal once echoed the raw text, newline and all
def test_config_settings_become_flags_or_a_one_line_parser_error(settings_, as_json, role):
    """parse_with_config turns any settings of a config file into the command's settings, or refuses them through the
    parser's own one-line error: an unknown key, a value of the wrong type or out of its range."""
    parser = build_leader_parser() if role == "leader" else build_learner_parser()

    def refuse(message: str) -> None:
        raise ParserRefused(message)

    parser.error = refuse
    text = json.dumps(settings_) if as_json else toml_document(settings_)
    with tempfile.TemporaryDirectory() as directory:
        path = write_config(directory, ".json" if as_json else ".toml", text)
        try:
            parse_with_config(parser, ["--config", path])
        except ParserRefused as error:
            assert_one_line(str(error))


# ---- registration --------------------------------------------------------------------------------------------------

ADDRESSES = st.one_of(
    st.sampled_from(
        [
            "127.0.0.1:1",
            "localhost:1",
            "[::1]:1",
            "10.1.2.3:5000",
            "169.254.169.254:80",
            "0.0.0.0:1",
            "224.0.0.1:1",
            "[fe80::1]:1",
            "[::ffff:169.254.169.254]:80",
            "255.255.255.255:1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:99999",
            "127.0.0.1",
            "",
            ":1",
            "a" * 64 + ":1",
            "a." * 130 + "b:1",
            "host\n:1",
            "[::1:1",
        ]
    ),
    st.text(max_size=24),
    st.builds("{}:{}".format, st.text(max_size=10), st.integers(-1, 70000)),
)
URL_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
TOKENS = st.one_of(st.text(URL_SAFE, min_size=43, max_size=43), st.text(max_size=20), st.text(min_size=16, max_size=24))
VERSIONS = st.one_of(
    st.just(rpc.PROTOCOL_VERSION), st.just(rpc.PROTOCOL_VERSION), st.sampled_from(["", "5", "6\n", "6" * 40]), st.text(max_size=20)
)
TASKS = st.one_of(st.just(""), st.just(""), st.sampled_from(["seq", "seq\nx", "x" * 200]), st.text(max_size=12))
EXAMPLE_COUNTS = st.one_of(st.just(0), st.just(0), st.sampled_from([1, 10**9, 10**9 + 1, -1]), INT64)


def learner_infos(addresses: Any) -> Any:
    """LearnerInfo messages whose every field is often what a learner sends, and otherwise anything."""
    return st.builds(
        leader_pb2.LearnerInfo,
        network_addr=addresses,
        callback_token=TOKENS,
        num_examples=EXAMPLE_COUNTS,
        version=VERSIONS,
        tls=st.one_of(st.just(False), st.booleans()),
        pooled=st.booleans(),
        task=TASKS,
        model_fingerprint=st.one_of(st.just(""), st.just("f" * 64), st.text(max_size=70)),
    )


PEERS = st.one_of(
    st.sampled_from(
        ["ipv4:127.0.0.1:50000", "ipv6:[::1]:50000", "ipv4:10.1.2.3:4", "unix:/tmp/leader.sock", "ipv6:[::ffff:10.1.2.3]:4", ""]
    ),
    st.text(max_size=20),
)


@fuzz(1500)
@given(
    info=learner_infos(ADDRESSES),
    peer=PEERS,
    data_mode=st.sampled_from(["split", "local"]),
    aggregation=st.sampled_from(["fedavg", "fedbuff"]),
    expected_task=st.sampled_from([("", ""), ("seq", "f" * 64)]),
    tls_on=st.booleans(),
    trusted=st.booleans(),
)
def test_registration_fields_are_admitted_or_refused_with_a_status_and_a_reason(
    info, peer, data_mode, aggregation, expected_task, tls_on, trusted
):
    """check_learner_info admits a LearnerInfo or refuses it with INVALID_ARGUMENT or FAILED_PRECONDITION and a one-line
    reason (the peer's own text escaped), whatever its address, secret, version, task, sizes and flags and whichever the
    leader's data mode, rule, task, TLS and trust; what it admits has the leader's protocol, task and TLS, a secret of
    16 characters or more and an address the leader may call."""
    config = LeaderConfig(data_mode=data_mode, aggregation=aggregation)
    try:
        check_learner_info(info, peer, config, expected_task, tls_on, trusted)
    except rpc.RequestRefused as error:
        assert error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert_one_line(str(error))
        return
    assert info.version == rpc.PROTOCOL_VERSION and info.task == expected_task[0] and info.tls == tls_on
    assert len(info.callback_token) >= 16 and rpc.callback_problem(info.network_addr, peer, trusted) is None


@pytest.fixture(scope="module")
def fuzzed_leader(tmp_path_factory):
    """One leader for every fuzzed registration, with room for all of them, and a channel to it."""
    with running_leader(leader_config(tmp_path_factory.mktemp("fuzz"), learners=400)) as running:
        channel = rpc.channel(running.address)
        yield running, channel
        channel.close()


def test_register_learner_answers_ok_or_a_refusal_and_the_leader_serves_on(fuzzed_leader):
    """RegisterLearner answers any LearnerInfo over a real socket with a registration or a refusal status with a one-line
    reason, never UNKNOWN or INTERNAL; the roster holds exactly the learners it admitted, and the leader still admits a
    well-formed learner afterwards."""
    running, channel = fuzzed_leader
    stub = leader_pb2_grpc.LeaderServiceStub(channel)
    own = {"callback": callback_address(), "leader": running.address}
    admitted: set[int] = set()

    @fuzz(300)
    @given(info=learner_infos(st.one_of(st.sampled_from(["callback", "callback", "leader"]), ADDRESSES)))
    def register(info):
        info.network_addr = own.get(info.network_addr, info.network_addr)
        try:
            reply = stub.RegisterLearner(info, timeout=10)
        except grpc.RpcError as error:
            assert error.code() in REFUSAL_CODES, f"{error.code().name}: {error.details()}"
            assert_one_line(error.details())
            return
        assert reply.success and reply.session_token
        admitted.add(reply.learner_id)

    register()
    assert admitted, "no fuzzed registration was well formed enough to be admitted"
    assert running.leader.roster.alive_count() == len(admitted)
    client = register_client(channel)
    assert client.learner_id not in admitted and running.leader.roster.alive_count() == len(admitted) + 1


# ---- checkpoint records and files -----------------------------------------------------------------------------------

CHECKPOINT_MODEL = {"w": ((2, 3), torch.float32), "step": ((), torch.int64)}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
RECORD_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "round": JSON_VALUES | st.integers(-5, 5),
        "weights": JSON_VALUES | st.sampled_from(["w.safetensors", "../w.safetensors", "/etc/passwd", ".w.safetensors", "w\n.safetensors"]),
        "weights_crc32": JSON_VALUES | st.sampled_from(["0" * 8, "zz" * 4, "0" * 64]),
        "optimizer": JSON_VALUES,
        "config": JSON_VALUES | st.just({"model": "tiny-cnn", "task": None}),
        "num_classes": JSON_VALUES,
        "metrics": JSON_VALUES,
    },
)


def sound_safetensors() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(3)})


@fuzz(1000)
@given(
    cut=st.integers(0, 200),
    flips=st.lists(st.tuples(st.integers(0, 199), st.integers(1, 255)), max_size=4),
    header=st.one_of(st.none(), st.binary(max_size=40), JSON_VALUES.map(lambda value: json.dumps(value).encode())),
)
def test_safetensors_bytes_load_checked_or_are_refused_in_one_line(cut, flips, header):
    """A weights file truncated, with bytes flipped or with any header: tensors that match the model and are finite, or CheckpointError."""
    from fedgrpc.leader.checkpoint import CheckpointError, parse_safetensors

    data = bytearray(sound_safetensors())
    if header is not None:
        data = bytearray(len(header).to_bytes(8, "little") + header + data[8 + int.from_bytes(data[:8], "little") :])
    for position, mask in flips:
        if position < len(data):
            data[position] ^= mask
    data = data[: max(0, len(data) - cut)] if cut < 100 else data
    try:
        tensors = parse_safetensors(data, CHECKPOINT_MODEL)
    except CheckpointError as error:
        assert_one_line(str(error))
        return
    assert {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()} == CHECKPOINT_MODEL
    assert bool(torch.isfinite(tensors["w"]).all())


@fuzz(1000)
@given(record=RECORD_FIELDS, as_text=st.one_of(st.none(), st.binary(max_size=30)))
def test_checkpoint_records_are_read_checked_or_refused_in_one_line(record, as_text):
    """A record of any fields and values (or any bytes): a round from 1 and plain file names in its folder, or one CheckpointError line."""
    from fedgrpc.leader.checkpoint import CheckpointError, read_run_record

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "round-00001.json"
        path.write_bytes(as_text if as_text is not None else json.dumps(record).encode())
        try:
            read = read_run_record(path)
        except CheckpointError as error:
            assert_one_line(str(error))
            return
    assert type(read["round"]) is int and read["round"] >= 1
    assert "/" not in read["weights"] and not read["weights"].startswith(".")
    assert isinstance(read["config"], dict) and isinstance(read["metrics"], dict)
