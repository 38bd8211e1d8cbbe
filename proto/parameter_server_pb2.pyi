from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfo(_message.Message):
    __slots__ = ("name", "device", "free_memory_bytes", "max_heads", "hostname", "pid", "lte_version", "preferred_heads", "protocol_version", "job_fields")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_HEADS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LTE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_HEADS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    free_memory_bytes: int
    max_heads: int
    hostname: str
    pid: int
    lte_version: str
    preferred_heads: _containers.RepeatedScalarFieldContainer[int]
    protocol_version: int
    job_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., free_memory_bytes: _Optional[int] = ..., max_heads: _Optional[int] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., lte_version: _Optional[str] = ..., preferred_heads: _Optional[_Iterable[int]] = ..., protocol_version: _Optional[int] = ..., job_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class JobConfig(_message.Message):
    __slots__ = ("model", "image_size", "in_channels", "num_classes", "patch_size", "dataset", "task", "total_heads", "rank", "alpha", "merge_every", "reset", "a_init", "a_init_gain", "snapshot_codec", "uplink_codec", "lr", "weight_decay", "warmup_steps", "total_steps", "min_lr_ratio", "batch_size", "seed", "mode", "max_chunk_bytes", "beta1", "beta2", "eps", "compute_dtype", "zstd_level", "precision", "classes", "augment", "label_smoothing", "mixup", "cutmix", "randaugment_ops", "randaugment_magnitude", "context", "embedding_heads", "tokenizer", "head_data", "reset_optimizer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_HEADS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    MERGE_EVERY_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    A_INIT_FIELD_NUMBER: _ClassVar[int]
    A_INIT_GAIN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_CODEC_FIELD_NUMBER: _ClassVar[int]
    UPLINK_CODEC_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ZSTD_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    MIXUP_FIELD_NUMBER: _ClassVar[int]
    CUTMIX_FIELD_NUMBER: _ClassVar[int]
    RANDAUGMENT_OPS_FIELD_NUMBER: _ClassVar[int]
    RANDAUGMENT_MAGNITUDE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_HEADS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    HEAD_DATA_FIELD_NUMBER: _ClassVar[int]
    RESET_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    model: str
    image_size: int
    in_channels: int
    num_classes: int
    patch_size: int
    dataset: str
    task: str
    total_heads: int
    rank: int
    alpha: float
    merge_every: int
    reset: bool
    a_init: str
    a_init_gain: float
    snapshot_codec: str
    uplink_codec: str
    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    batch_size: int
    seed: int
    mode: str
    max_chunk_bytes: int
    beta1: float
    beta2: float
    eps: float
    compute_dtype: str
    zstd_level: int
    precision: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    augment: str
    label_smoothing: float
    mixup: float
    cutmix: float
    randaugment_ops: int
    randaugment_magnitude: int
    context: int
    embedding_heads: bool
    tokenizer: str
    head_data: str
    reset_optimizer: bool
    def __init__(self, model: _Optional[str] = ..., image_size: _Optional[int] = ..., in_channels: _Optional[int] = ..., num_classes: _Optional[int] = ..., patch_size: _Optional[int] = ..., dataset: _Optional[str] = ..., task: _Optional[str] = ..., total_heads: _Optional[int] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., merge_every: _Optional[int] = ..., reset: _Optional[bool] = ..., a_init: _Optional[str] = ..., a_init_gain: _Optional[float] = ..., snapshot_codec: _Optional[str] = ..., uplink_codec: _Optional[str] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., mode: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., compute_dtype: _Optional[str] = ..., zstd_level: _Optional[int] = ..., precision: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., augment: _Optional[str] = ..., label_smoothing: _Optional[float] = ..., mixup: _Optional[float] = ..., cutmix: _Optional[float] = ..., randaugment_ops: _Optional[int] = ..., randaugment_magnitude: _Optional[int] = ..., context: _Optional[int] = ..., embedding_heads: _Optional[bool] = ..., tokenizer: _Optional[str] = ..., head_data: _Optional[str] = ..., reset_optimizer: _Optional[bool] = ...) -> None: ...

class HeadAssignment(_message.Message):
    __slots__ = ("head_id", "next_round", "steps_done", "has_factors")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    HAS_FACTORS_FIELD_NUMBER: _ClassVar[int]
    head_id: int
    next_round: int
    steps_done: int
    has_factors: bool
    def __init__(self, head_id: _Optional[int] = ..., next_round: _Optional[int] = ..., steps_done: _Optional[int] = ..., has_factors: _Optional[bool] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("worker_id", "lease_id", "heads", "job", "heartbeat_interval_s", "lease_timeout_s", "version", "room", "lease_epoch", "model_fingerprint", "model_tree", "protocol_version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TREE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_id: str
    heads: _containers.RepeatedCompositeFieldContainer[HeadAssignment]
    job: JobConfig
    heartbeat_interval_s: float
    lease_timeout_s: float
    version: int
    room: int
    lease_epoch: int
    model_fingerprint: str
    model_tree: str
    protocol_version: int
    def __init__(self, worker_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., heads: _Optional[_Iterable[_Union[HeadAssignment, _Mapping]]] = ..., job: _Optional[_Union[JobConfig, _Mapping]] = ..., heartbeat_interval_s: _Optional[float] = ..., lease_timeout_s: _Optional[float] = ..., version: _Optional[int] = ..., room: _Optional[int] = ..., lease_epoch: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., model_tree: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("lease_id", "have_version", "wait_newer_s", "head_factors", "lease_epoch", "delta_protocol", "resume_stream", "resume_from", "model_fingerprint", "model_tree")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_NEWER_S_FIELD_NUMBER: _ClassVar[int]
    HEAD_FACTORS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DELTA_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    RESUME_STREAM_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TREE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    have_version: int
    wait_newer_s: float
    head_factors: _containers.RepeatedScalarFieldContainer[int]
    lease_epoch: int
    delta_protocol: int
    resume_stream: int
    resume_from: int
    model_fingerprint: str
    model_tree: str
    def __init__(self, lease_id: _Optional[str] = ..., have_version: _Optional[int] = ..., wait_newer_s: _Optional[float] = ..., head_factors: _Optional[_Iterable[int]] = ..., lease_epoch: _Optional[int] = ..., delta_protocol: _Optional[int] = ..., resume_stream: _Optional[int] = ..., resume_from: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., model_tree: _Optional[str] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "codec", "zstd", "raw_nbytes", "payload_nbytes", "delta", "raw_crc32")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ZSTD_FIELD_NUMBER: _ClassVar[int]
    RAW_NBYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_NBYTES_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RAW_CRC32_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    zstd: bool
    raw_nbytes: int
    payload_nbytes: int
    delta: bool
    raw_crc32: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., zstd: _Optional[bool] = ..., raw_nbytes: _Optional[int] = ..., payload_nbytes: _Optional[int] = ..., delta: _Optional[bool] = ..., raw_crc32: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("version", "current", "done", "num_tensors", "total_payload_bytes", "retry_after_s", "lease_epoch", "delta_base", "stream_id", "resumed_from", "num_chunks")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    version: int
    current: bool
    done: bool
    num_tensors: int
    total_payload_bytes: int
    retry_after_s: float
    lease_epoch: int
    delta_base: int
    stream_id: int
    resumed_from: int
    num_chunks: int
    def __init__(self, version: _Optional[int] = ..., current: _Optional[bool] = ..., done: _Optional[bool] = ..., num_tensors: _Optional[int] = ..., total_payload_bytes: _Optional[int] = ..., retry_after_s: _Optional[float] = ..., lease_epoch: _Optional[int] = ..., delta_base: _Optional[int] = ..., stream_id: _Optional[int] = ..., resumed_from: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    tensor: TensorChunk
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class HeadRound(_message.Message):
    __slots__ = ("head_id", "round")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    head_id: int
    round: int
    def __init__(self, head_id: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("lease_id", "base_version", "heads", "steps", "samples", "train_loss", "num_tensors", "seconds", "push_id", "resume_from", "model_fingerprint")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    base_version: int
    heads: _containers.RepeatedCompositeFieldContainer[HeadRound]
    steps: int
    samples: int
    train_loss: float
    num_tensors: int
    seconds: float
    push_id: int
    resume_from: int
    model_fingerprint: str
    def __init__(self, lease_id: _Optional[str] = ..., base_version: _Optional[int] = ..., heads: _Optional[_Iterable[_Union[HeadRound, _Mapping]]] = ..., steps: _Optional[int] = ..., samples: _Optional[int] = ..., train_loss: _Optional[float] = ..., num_tensors: _Optional[int] = ..., seconds: _Optional[float] = ..., push_id: _Optional[int] = ..., resume_from: _Optional[int] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    tensor: TensorChunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("applied", "duplicate", "version", "staleness", "weight", "done")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    duplicate: bool
    version: int
    staleness: int
    weight: float
    done: bool
    def __init__(self, applied: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., version: _Optional[int] = ..., staleness: _Optional[int] = ..., weight: _Optional[float] = ..., done: _Optional[bool] = ...) -> None: ...

class PushOffsetRequest(_message.Message):
    __slots__ = ("lease_id", "push_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    push_id: int
    def __init__(self, lease_id: _Optional[str] = ..., push_id: _Optional[int] = ...) -> None: ...

class PushOffsetReply(_message.Message):
    __slots__ = ("chunks_received", "bytes_received")
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    chunks_received: int
    bytes_received: int
    def __init__(self, chunks_received: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("lease_id", "version", "samples_per_s", "state")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    version: int
    samples_per_s: float
    state: str
    def __init__(self, lease_id: _Optional[str] = ..., version: _Optional[int] = ..., samples_per_s: _Optional[float] = ..., state: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("version", "done", "lease_epoch", "heads", "room")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    version: int
    done: bool
    lease_epoch: int
    heads: _containers.RepeatedCompositeFieldContainer[HeadAssignment]
    room: int
    def __init__(self, version: _Optional[int] = ..., done: _Optional[bool] = ..., lease_epoch: _Optional[int] = ..., heads: _Optional[_Iterable[_Union[HeadAssignment, _Mapping]]] = ..., room: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
