from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfo(_message.Message):
    __slots__ = ("name", "device", "free_memory_bytes", "max_heads", "hostname", "pid", "lte_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_HEADS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LTE_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    free_memory_bytes: int
    max_heads: int
    hostname: str
    pid: int
    lte_version: str
    def __init__(
        self,
        name: str | None = ...,
        device: str | None = ...,
        free_memory_bytes: int | None = ...,
        max_heads: int | None = ...,
        hostname: str | None = ...,
        pid: int | None = ...,
        lte_version: str | None = ...,
    ) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: WorkerInfo | _Mapping | None = ...) -> None: ...

class JobConfig(_message.Message):
    __slots__ = (
        "model",
        "image_size",
        "in_channels",
        "num_classes",
        "patch_size",
        "dataset",
        "task",
        "total_heads",
        "rank",
        "alpha",
        "merge_every",
        "reset",
        "a_init",
        "a_init_gain",
        "snapshot_codec",
        "uplink_codec",
        "lr",
        "weight_decay",
        "warmup_steps",
        "total_steps",
        "min_lr_ratio",
        "batch_size",
        "seed",
        "mode",
        "max_chunk_bytes",
        "beta1",
        "beta2",
        "eps",
        "compute_dtype",
        "zstd_level",
    )
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
    def __init__(
        self,
        model: str | None = ...,
        image_size: int | None = ...,
        in_channels: int | None = ...,
        num_classes: int | None = ...,
        patch_size: int | None = ...,
        dataset: str | None = ...,
        task: str | None = ...,
        total_heads: int | None = ...,
        rank: int | None = ...,
        alpha: float | None = ...,
        merge_every: int | None = ...,
        reset: bool | None = ...,
        a_init: str | None = ...,
        a_init_gain: float | None = ...,
        snapshot_codec: str | None = ...,
        uplink_codec: str | None = ...,
        lr: float | None = ...,
        weight_decay: float | None = ...,
        warmup_steps: int | None = ...,
        total_steps: int | None = ...,
        min_lr_ratio: float | None = ...,
        batch_size: int | None = ...,
        seed: int | None = ...,
        mode: str | None = ...,
        max_chunk_bytes: int | None = ...,
        beta1: float | None = ...,
        beta2: float | None = ...,
        eps: float | None = ...,
        compute_dtype: str | None = ...,
        zstd_level: int | None = ...,
    ) -> None: ...

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
    def __init__(
        self,
        head_id: int | None = ...,
        next_round: int | None = ...,
        steps_done: int | None = ...,
        has_factors: bool | None = ...,
    ) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = (
        "worker_id",
        "lease_id",
        "heads",
        "job",
        "heartbeat_interval_s",
        "lease_timeout_s",
        "version",
    )
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_id: str
    heads: _containers.RepeatedCompositeFieldContainer[HeadAssignment]
    job: JobConfig
    heartbeat_interval_s: float
    lease_timeout_s: float
    version: int
    def __init__(
        self,
        worker_id: str | None = ...,
        lease_id: str | None = ...,
        heads: _Iterable[HeadAssignment | _Mapping] | None = ...,
        job: JobConfig | _Mapping | None = ...,
        heartbeat_interval_s: float | None = ...,
        lease_timeout_s: float | None = ...,
        version: int | None = ...,
    ) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("lease_id", "have_version", "wait_newer_s", "head_factors")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_NEWER_S_FIELD_NUMBER: _ClassVar[int]
    HEAD_FACTORS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    have_version: int
    wait_newer_s: float
    head_factors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(
        self,
        lease_id: str | None = ...,
        have_version: int | None = ...,
        wait_newer_s: float | None = ...,
        head_factors: _Iterable[int] | None = ...,
    ) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "codec", "zstd", "raw_nbytes", "payload_nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ZSTD_FIELD_NUMBER: _ClassVar[int]
    RAW_NBYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    zstd: bool
    raw_nbytes: int
    payload_nbytes: int
    def __init__(
        self,
        name: str | None = ...,
        dtype: str | None = ...,
        shape: _Iterable[int] | None = ...,
        codec: str | None = ...,
        zstd: bool | None = ...,
        raw_nbytes: int | None = ...,
        payload_nbytes: int | None = ...,
    ) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    data: bytes
    def __init__(self, header: TensorHeader | _Mapping | None = ..., data: bytes | None = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("version", "current", "done", "num_tensors", "total_payload_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    current: bool
    done: bool
    num_tensors: int
    total_payload_bytes: int
    def __init__(
        self,
        version: int | None = ...,
        current: bool | None = ...,
        done: bool | None = ...,
        num_tensors: int | None = ...,
        total_payload_bytes: int | None = ...,
    ) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    tensor: TensorChunk
    def __init__(
        self, header: ModelHeader | _Mapping | None = ..., tensor: TensorChunk | _Mapping | None = ...
    ) -> None: ...

class HeadRound(_message.Message):
    __slots__ = ("head_id", "round")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    head_id: int
    round: int
    def __init__(self, head_id: int | None = ..., round: int | None = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = (
        "lease_id",
        "base_version",
        "heads",
        "steps",
        "samples",
        "train_loss",
        "num_tensors",
        "seconds",
    )
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    base_version: int
    heads: _containers.RepeatedCompositeFieldContainer[HeadRound]
    steps: int
    samples: int
    train_loss: float
    num_tensors: int
    seconds: float
    def __init__(
        self,
        lease_id: str | None = ...,
        base_version: int | None = ...,
        heads: _Iterable[HeadRound | _Mapping] | None = ...,
        steps: int | None = ...,
        samples: int | None = ...,
        train_loss: float | None = ...,
        num_tensors: int | None = ...,
        seconds: float | None = ...,
    ) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    tensor: TensorChunk
    def __init__(
        self, header: PushHeader | _Mapping | None = ..., tensor: TensorChunk | _Mapping | None = ...
    ) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("applied", "duplicate", "version", "staleness", "weight")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    duplicate: bool
    version: int
    staleness: int
    weight: float
    def __init__(
        self,
        applied: bool | None = ...,
        duplicate: bool | None = ...,
        version: int | None = ...,
        staleness: int | None = ...,
        weight: float | None = ...,
    ) -> None: ...

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
    def __init__(
        self,
        lease_id: str | None = ...,
        version: int | None = ...,
        samples_per_s: float | None = ...,
        state: str | None = ...,
    ) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("version", "done")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    version: int
    done: bool
    def __init__(self, version: int | None = ..., done: bool | None = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: str | None = ..., reason: str | None = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
