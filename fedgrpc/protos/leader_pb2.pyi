from fedgrpc.protos import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LearnerInfo(_message.Message):
    __slots__ = ("network_addr", "callback_token", "num_examples", "version", "tls", "pooled", "task", "model_fingerprint", "former_learner_id")
    NETWORK_ADDR_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FORMER_LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    network_addr: str
    callback_token: str
    num_examples: int
    version: str
    tls: bool
    pooled: bool
    task: str
    model_fingerprint: str
    former_learner_id: int
    def __init__(self, network_addr: _Optional[str] = ..., callback_token: _Optional[str] = ..., num_examples: _Optional[int] = ..., version: _Optional[str] = ..., tls: _Optional[bool] = ..., pooled: _Optional[bool] = ..., task: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., former_learner_id: _Optional[int] = ...) -> None: ...

class TrainingPlan(_message.Message):
    __slots__ = ("model", "num_classes", "aggregation", "batch_size", "lr", "momentum", "weight_decay", "local_steps", "local_epochs", "seed", "rounds", "augment", "image_shape", "dataset", "model_fingerprint", "torch_version", "deterministic", "prox_mu", "compression", "topk_ratio", "lr_schedule", "warmup_rounds", "keep_momentum", "secure_aggregation", "task", "learners_evaluate", "share", "shared_fingerprint", "personal_steps")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TOPK_RATIO_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_EVALUATE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    SHARED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_classes: int
    aggregation: str
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    local_steps: int
    local_epochs: int
    seed: int
    rounds: int
    augment: bool
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    dataset: str
    model_fingerprint: str
    torch_version: str
    deterministic: bool
    prox_mu: float
    compression: str
    topk_ratio: float
    lr_schedule: str
    warmup_rounds: int
    keep_momentum: bool
    secure_aggregation: bool
    task: str
    learners_evaluate: bool
    share: str
    shared_fingerprint: str
    personal_steps: int
    def __init__(self, model: _Optional[str] = ..., num_classes: _Optional[int] = ..., aggregation: _Optional[str] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., local_steps: _Optional[int] = ..., local_epochs: _Optional[int] = ..., seed: _Optional[int] = ..., rounds: _Optional[int] = ..., augment: _Optional[bool] = ..., image_shape: _Optional[_Iterable[int]] = ..., dataset: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., torch_version: _Optional[str] = ..., deterministic: _Optional[bool] = ..., prox_mu: _Optional[float] = ..., compression: _Optional[str] = ..., topk_ratio: _Optional[float] = ..., lr_schedule: _Optional[str] = ..., warmup_rounds: _Optional[int] = ..., keep_momentum: _Optional[bool] = ..., secure_aggregation: _Optional[bool] = ..., task: _Optional[str] = ..., learners_evaluate: _Optional[bool] = ..., share: _Optional[str] = ..., shared_fingerprint: _Optional[str] = ..., personal_steps: _Optional[int] = ...) -> None: ...

class AckWithMetadata(_message.Message):
    __slots__ = ("success", "message", "learner_id", "max_learners", "plan", "session_token", "joins_round", "split_examples", "split_layout")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LEARNERS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    JOINS_ROUND_FIELD_NUMBER: _ClassVar[int]
    SPLIT_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    learner_id: int
    max_learners: int
    plan: TrainingPlan
    session_token: str
    joins_round: int
    split_examples: int
    split_layout: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorSpec]
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., learner_id: _Optional[int] = ..., max_learners: _Optional[int] = ..., plan: _Optional[_Union[TrainingPlan, _Mapping]] = ..., session_token: _Optional[str] = ..., joins_round: _Optional[int] = ..., split_examples: _Optional[int] = ..., split_layout: _Optional[_Iterable[_Union[_tensors_pb2.TensorSpec, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("learner_id",)
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    learner_id: int
    def __init__(self, learner_id: _Optional[int] = ...) -> None: ...

class LearnerDataRequest(_message.Message):
    __slots__ = ("learner_id",)
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    learner_id: int
    def __init__(self, learner_id: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("chunk", "manifest", "round")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    manifest: _tensors_pb2.TensorManifest
    round: int
    def __init__(self, chunk: _Optional[bytes] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., round: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("chunk", "manifest")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    manifest: _tensors_pb2.TensorManifest
    def __init__(self, chunk: _Optional[bytes] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ...) -> None: ...

class GradientData(_message.Message):
    __slots__ = ("chunk", "manifest", "learner_id", "round", "num_examples", "train_loss")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    manifest: _tensors_pb2.TensorManifest
    learner_id: int
    round: int
    num_examples: int
    train_loss: float
    def __init__(self, chunk: _Optional[bytes] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., learner_id: _Optional[int] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
