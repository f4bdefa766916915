from fedgrpc.protos import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvaluateResult(_message.Message):
    __slots__ = ("round", "num_examples", "loss", "metrics", "personalized", "personal_loss", "personal_metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PersonalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZED_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_examples: int
    loss: float
    metrics: _containers.ScalarMap[str, float]
    personalized: bool
    personal_loss: float
    personal_metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., personalized: _Optional[bool] = ..., personal_loss: _Optional[float] = ..., personal_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

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

class SecAggSetup(_message.Message):
    __slots__ = ("round", "learner_id", "cohort_size", "threshold", "bound", "weight_cap")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    round: int
    learner_id: int
    cohort_size: int
    threshold: int
    bound: float
    weight_cap: float
    def __init__(self, round: _Optional[int] = ..., learner_id: _Optional[int] = ..., cohort_size: _Optional[int] = ..., threshold: _Optional[int] = ..., bound: _Optional[float] = ..., weight_cap: _Optional[float] = ...) -> None: ...

class SecAggPublicKeys(_message.Message):
    __slots__ = ("mask_key", "share_key")
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEY_FIELD_NUMBER: _ClassVar[int]
    mask_key: bytes
    share_key: bytes
    def __init__(self, mask_key: _Optional[bytes] = ..., share_key: _Optional[bytes] = ...) -> None: ...

class NeighbourKeys(_message.Message):
    __slots__ = ("learner_id", "mask_key", "share_key")
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEY_FIELD_NUMBER: _ClassVar[int]
    learner_id: int
    mask_key: bytes
    share_key: bytes
    def __init__(self, learner_id: _Optional[int] = ..., mask_key: _Optional[bytes] = ..., share_key: _Optional[bytes] = ...) -> None: ...

class SecAggNeighbourKeys(_message.Message):
    __slots__ = ("round", "neighbours")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    round: int
    neighbours: _containers.RepeatedCompositeFieldContainer[NeighbourKeys]
    def __init__(self, round: _Optional[int] = ..., neighbours: _Optional[_Iterable[_Union[NeighbourKeys, _Mapping]]] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("learner_id", "ciphertext")
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    learner_id: int
    ciphertext: bytes
    def __init__(self, learner_id: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class SecAggCollection(_message.Message):
    __slots__ = ("round", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("round", "survivors", "dropped")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    round: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("learner_id", "self_seed", "value")
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_SEED_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    learner_id: int
    self_seed: bool
    value: bytes
    def __init__(self, learner_id: _Optional[int] = ..., self_seed: _Optional[bool] = ..., value: _Optional[bytes] = ...) -> None: ...

class SecAggRevealedShares(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...
