from protos import tensors_pb2 as _tensors_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelState(_message.Message):
    __slots__ = ("chunk", "manifest", "round", "stop", "reason", "fetch")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    manifest: _tensors_pb2.TensorManifest
    round: int
    stop: bool
    reason: str
    fetch: bool
    def __init__(self, chunk: _Optional[bytes] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., round: _Optional[int] = ..., stop: _Optional[bool] = ..., reason: _Optional[str] = ..., fetch: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
