"""The protocol's vocabulary, in one place both sides call (docs/design.md sections 3 and 4).

- **Tensor names.** A head's factor travels as ``head/<id>/<layer>/<B|A>`` (``B``: ``[m, r]``,
  ``A``: ``[r, n]``), a replica's delta as ``replica/<name>``; checkpoints use the same head names.
- **The job's proto mapping**, both ways, by field name: a ``JobConfig`` field travels in the proto
  field of the same name, but for the few renamed in ``_RENAMED``.
- **The codec policy**: which codec each tensor role travels in (``codec_for``), and the base
  quantisation a snapshot codec stands for.
- **Updates**: a push's metadata (``PushMeta``) and its tensors, encoded and decoded whole.
- **Refusals**: why the server will not act on a request (``Refusal``). The gRPC service maps each
  to a status code and sends its name as trailing metadata (``REFUSAL_KEY``); the worker acts on the
  reason, never on the text of a message.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from lte.common.core.merge import Factors, HeadUpdate, ReplicaUpdate
from lte.common.core.quant import QuantizedTensor
from lte.common.job.config import SNAPSHOT_CODEC, JobConfig
from lte.common.job.version import __version__
from lte.common.wire import grpc_options
from lte.common.wire.chunks import TensorAssembler
from lte.common.wire.codec import EncodedTensor, decode_tensor, decode_tensor_quantized, encode_tensor
from lte.proto import parameter_server_pb2 as pb

# -- tensor names --------------------------------------------------------------------------------
HEAD_PREFIX, REPLICA_PREFIX = "head/", "replica/"
PARTS = ("B", "A")


def head_tensor_name(head_id: int, layer: str, part: str) -> str:
    """``head/<id>/<layer>/<B|A>``: one factor of one head's LTE layer ``layer`` (a master weight name)."""
    if part not in PARTS:
        raise ValueError(f"a factor is B or A, got {part!r}")
    return f"{HEAD_PREFIX}{head_id}/{layer}/{part}"


def replica_tensor_name(name: str) -> str:
    """``replica/<name>``: the delta of replica parameter ``name`` (a master state name)."""
    return REPLICA_PREFIX + name


@dataclass(frozen=True)
class TensorName:
    """A parsed wire name: ``kind`` is "head" (with ``head_id``, ``layer``, ``part``) or "replica"."""

    kind: str
    name: str  # the layer (head) or the replica parameter
    head_id: int = -1
    part: str = ""


def parse_tensor_name(name: str) -> TensorName:
    """The parts of a head or replica tensor name; ``ValueError`` naming it when it is neither."""
    if name.startswith(REPLICA_PREFIX) and len(name) > len(REPLICA_PREFIX):
        return TensorName("replica", name[len(REPLICA_PREFIX) :])
    if name.startswith(HEAD_PREFIX):
        head, _, rest = name[len(HEAD_PREFIX) :].partition("/")
        layer, _, part = rest.rpartition("/")
        if head.isdigit() and layer and part in PARTS:
            return TensorName("head", layer, int(head), part)
    raise ValueError(f"tensor name {name!r} is neither head/<id>/<layer>/<B|A> nor replica/<name>")


def group_head_factors(tensors: Mapping[str, torch.Tensor]) -> dict[int, dict[str, Factors]]:
    """``{head: {layer: (B, A)}}`` from head-factor tensors by wire name (other names are ignored)."""
    pairs: dict[int, dict[str, list]] = {}
    for name, tensor in tensors.items():
        if not name.startswith(HEAD_PREFIX):
            continue
        n = parse_tensor_name(name)
        pairs.setdefault(n.head_id, {}).setdefault(n.name, [None, None])[n.part == "A"] = tensor
    out: dict[int, dict[str, Factors]] = {}
    for head, layers in pairs.items():
        for layer, (b, a) in layers.items():
            if b is None or a is None:
                raise ValueError(f"head {head} layer {layer!r} has only one of its factors B and A")
            out.setdefault(head, {})[layer] = (b, a)
    return out


def factor_tensors(factors: Mapping[int, Mapping[str, Factors]]) -> dict[str, torch.Tensor]:
    """The inverse of ``group_head_factors``: ``{wire name: tensor}``."""
    return {
        head_tensor_name(h, layer, part): t
        for h, layers in factors.items()
        for layer, pair in layers.items()
        for part, t in zip(PARTS, pair, strict=True)
    }


# -- the codec policy ----------------------------------------------------------------------------
QUANT_OF_SNAPSHOT_CODEC = {codec: quant for quant, codec in SNAPSHOT_CODEC.items()}
QUANTIZED_SNAPSHOT_CODECS = frozenset(c for q, c in SNAPSHOT_CODEC.items() if q != "none")


class Role(enum.Enum):
    """What a tensor on the wire is; the codec it travels in follows from it and the job."""

    SNAPSHOT_LAYER = "snapshot-layer"  # an LTE layer's base W, downlink
    SNAPSHOT_OTHER = "snapshot-other"  # replicas and buffers, downlink
    HEAD_FACTOR = "head-factor"  # B or A, uplink
    REPLICA_DELTA = "replica-delta"  # uplink
    MERGED_FACTOR = "merged-factor"  # a moved head's last merged B', A', downlink


def codec_for(role: Role, job: JobConfig) -> str:
    """The codec of ``role`` in ``job``. Replicas, their deltas and merged factors stay exact (fp32):
    they are small, and a moved head must continue from exactly what the server merged."""
    if role is Role.SNAPSHOT_LAYER:
        return job.snapshot_codec
    if role is Role.HEAD_FACTOR:
        return job.uplink
    return "fp32"


def quant_of_snapshot_codec(codec: str) -> str:
    """The base quantisation (``none | int8 | nf4``) that a snapshot codec carries."""
    quant = QUANT_OF_SNAPSHOT_CODEC.get(codec)
    if quant is None:
        raise ValueError(f"unknown snapshot codec {codec!r}; known: {sorted(QUANT_OF_SNAPSHOT_CODEC)}")
    return quant


# -- the job, both ways ----------------------------------------------------------------------------
# JobConfig field -> proto field, where the names differ; every other field keeps its name.
_RENAMED = {
    "heads": "total_heads",
    "uplink": "uplink_codec",
    "steps": "total_steps",
    "dtype": "compute_dtype",
}


def _proto_job_fields():
    return pb.JobConfig.DESCRIPTOR.fields_by_name


def job_to_proto(job: JobConfig):
    """``lte.v1.JobConfig`` of ``job``; the base quantisation travels as its snapshot codec."""
    values = {
        _RENAMED.get(f.name, f.name): getattr(job, f.name) for f in fields(JobConfig) if f.name != "quant"
    }
    values["snapshot_codec"] = job.snapshot_codec
    return pb.JobConfig(**values)


def job_from_proto(message) -> JobConfig:
    """The ``JobConfig`` a worker rebuilds from the server's message (``ValueError`` if invalid).
    An empty string where the field has a non-empty default is a field an older server did not
    send: the default stands."""
    values = {}
    for f in fields(JobConfig):
        if f.name == "quant":
            continue
        value = getattr(message, _RENAMED.get(f.name, f.name))
        if value == "" and isinstance(f.default, str) and f.default:
            value = f.default
        elif not isinstance(value, (int, float, bool, str)):
            value = tuple(value)  # a repeated field
        values[f.name] = value
    values["quant"] = quant_of_snapshot_codec(message.snapshot_codec)
    return JobConfig(**values)


def unmapped_job_fields() -> list[str]:
    """JobConfig fields with no proto field of their name (a test keeps this empty)."""
    proto = _proto_job_fields()
    return [
        f.name for f in fields(JobConfig) if f.name != "quant" and _RENAMED.get(f.name, f.name) not in proto
    ]


# -- updates -------------------------------------------------------------------------------------
@dataclass
class PushMeta:
    """What a push says besides its tensors (``lte.v1.PushHeader``)."""

    lease_id: str
    base_version: int  # the snapshot version the heads trained on
    head_rounds: dict[int, int]  # head -> the round id of this push
    steps: int  # local steps of this round
    samples: int  # samples of this round, all heads
    train_loss: float  # mean over the round
    seconds: float  # wall time of the local steps
    num_tensors: int = 0
    model_fingerprint: str = ""  # of the model the worker trained (wire protocol 4; "": an older worker)
    push_id: int = 0  # the same on every retry of one push (wire protocol 3; 0: not resumable)

    def to_proto(self):
        return pb.PushHeader(
            lease_id=self.lease_id,
            base_version=self.base_version,
            heads=[pb.HeadRound(head_id=h, round=r) for h, r in self.head_rounds.items()],
            steps=self.steps,
            samples=self.samples,
            train_loss=self.train_loss,
            num_tensors=self.num_tensors,
            seconds=self.seconds,
            model_fingerprint=self.model_fingerprint,
            push_id=self.push_id,
        )

    @classmethod
    def from_proto(cls, header, max_heads: int) -> PushMeta:
        """Parse a ``PushHeader``; ``ValueError`` for repeated heads, negative rounds or too many heads."""
        if len(header.heads) > max_heads:
            raise ValueError(f"push names {len(header.heads)} heads (at most {max_heads})")
        rounds: dict[int, int] = {}
        for hr in header.heads:
            if hr.head_id in rounds:
                raise ValueError(f"head {hr.head_id} named twice in one push")
            if hr.round < 0:
                raise ValueError(f"head {hr.head_id} has negative round {hr.round}")
            rounds[hr.head_id] = hr.round
        return cls(
            header.lease_id,
            header.base_version,
            rounds,
            header.steps,
            header.samples,
            header.train_loss,
            header.seconds,
            header.num_tensors,
            header.model_fingerprint,
            header.push_id,
        )


def update_tensors(
    heads: Sequence[HeadUpdate], replica: ReplicaUpdate, job: JobConfig
) -> list[tuple[str, torch.Tensor, str]]:
    """(wire name, tensor, codec) of every tensor of one push, in the order they are sent."""
    out = [
        (head_tensor_name(u.head_id, layer, part), t, codec_for(Role.HEAD_FACTOR, job))
        for u in heads
        for layer, pair in u.factors.items()
        for part, t in zip(PARTS, pair, strict=True)
    ]
    out += [
        (replica_tensor_name(n), d, codec_for(Role.REPLICA_DELTA, job)) for n, d in replica.deltas.items()
    ]
    return out


def encode_update(
    heads: Sequence[HeadUpdate], replica: ReplicaUpdate, job: JobConfig
) -> Iterator[EncodedTensor]:
    """Every tensor of a push, encoded with the job's codec policy and zstd level."""
    level = None if job.zstd_level < 0 else job.zstd_level
    for name, tensor, codec in update_tensors(heads, replica, job):
        yield encode_tensor(name, tensor.float().cpu(), codec, level)


def decode_update(
    tensors: Mapping[str, torch.Tensor],
    head_ids: Sequence[int],
    layers: Sequence[str],
    replicas: Sequence[str],
) -> tuple[list[HeadUpdate], ReplicaUpdate]:
    """The heads (in ``head_ids`` order) and replica deltas of a validated push's tensors."""
    heads = [
        HeadUpdate(
            h,
            {
                layer: (tensors[head_tensor_name(h, layer, "B")], tensors[head_tensor_name(h, layer, "A")])
                for layer in layers
            },
        )
        for h in head_ids
    ]
    return heads, ReplicaUpdate(len(heads), {n: tensors[replica_tensor_name(n)] for n in replicas})


# -- the version handshake (issue 24, item 4) -----------------------------------------------------
# The wire protocol's version: 2 added the handshake itself (WorkerInfo.protocol_version, job_fields);
# 3 resumable pushes (PushOffset, PushHeader.push_id and resume_from: server/partial_pushes.py);
# 4 the worker's model fingerprint on its pulls and pushes, checked by the server (FINGERPRINT_PROTOCOL).
PROTOCOL_VERSION = 4
# From this wire protocol on a worker sends the fingerprint of the model it built with every pull and
# push (PullRequest/PushHeader.model_fingerprint) and the server refuses one whose fingerprint is
# missing or not its own (Refusal.MODEL_DIFFERS); an older worker compares the server's itself.
FINGERPRINT_PROTOCOL = 4
# JobConfig fields every worker has known since the first wire protocol: a worker from before the
# handshake (no job_fields) may join a job that uses no other field than these.
CORE_JOB_FIELDS = frozenset(
    [
        "model",
        "dataset",
        "image_size",
        "in_channels",
        "num_classes",
        "patch_size",
        "task",
        "heads",
        "rank",
        "alpha",
        "merge_every",
        "reset",
        "quant",
        "uplink",
        "zstd_level",
        "lr",
        "weight_decay",
        "warmup_steps",
        "steps",
        "min_lr_ratio",
        "batch_size",
        "seed",
        "mode",
        "beta1",
        "beta2",
        "eps",
        "dtype",
        "max_chunk_bytes",
        "augment",
    ]
)


def job_fields_in_use(job: JobConfig) -> list[str]:
    """JobConfig fields whose value in ``job`` is not the default: a worker must know each of them."""
    defaults = JobConfig()
    return [f.name for f in fields(JobConfig) if getattr(job, f.name) != getattr(defaults, f.name)]


def handshake_refusal(
    job: JobConfig, protocol_version: int, job_fields: Sequence[str], lte_version: str
) -> str | None:
    """Why a worker that speaks ``protocol_version`` and knows ``job_fields`` cannot train ``job``
    (None: it can). A worker from before the handshake sends neither: it knows ``CORE_JOB_FIELDS``."""
    known = set(job_fields) if protocol_version >= 2 else set(CORE_JOB_FIELDS)
    missing = [name for name in job_fields_in_use(job) if name not in known]
    if not missing:
        return None
    who = f"lte-worker {lte_version or '(version unknown)'}, wire protocol {protocol_version or 1}"
    return (
        f"{who} does not know the job field(s) {', '.join(missing)} that this job uses; it would train "
        f"as if they were unset: upgrade it to lte {__version__} (wire protocol {PROTOCOL_VERSION})"
    )


# -- refusals ------------------------------------------------------------------------------------
REFUSAL_KEY = "lte-refusal"  # trailing metadata: the Refusal's name


class Refusal(enum.Enum):
    """Why the server will not act on a request. The worker's reaction is in brackets."""

    MALFORMED = "malformed"  # a field or tensor breaks the protocol [a bug: give up]
    UNKNOWN_LEASE = "unknown-lease"  # the server does not know the lease, e.g. after a restart [register]
    LEASE_EXPIRED = "lease-expired"  # no heartbeat within the lease timeout [register]
    LEASE_ENDED = "lease-ended"  # the worker gave the lease back [register]
    HEAD_NOT_LEASED = "head-not-leased"  # a head this lease never held [register]
    HEAD_MOVED = "head-moved"  # the head was moved to another worker (a straggler's) [sync the lease]
    HEAD_FINISHED = "head-finished"  # the head has trained all its steps [sync the lease]
    OUT_OF_STEP = "out-of-step"  # round ids differ from the server's [sync the lease]
    STALE = "stale"  # trained on a version too old for the mode [pull, retrain]
    VERSION_OUT_OF_RANGE = "version-out-of-range"  # a base version the server never had [a bug: give up]
    JOB_DONE = "job-done"  # the job has ended [leave, exit 0]
    # the update guard (server/guard.py): the push's contribution is out of bounds; its heads' round
    # counts and merges nothing [roll those heads back to their last merged factors, next round]
    OUTLIER = "outlier"
    QUARANTINED = "quarantined"  # a push of this worker broke a merge; it may not take part [exit 2]
    INCOMPATIBLE = (
        "incompatible"  # the worker's protocol lacks a job field in use (version handshake) [exit 2]
    )
    # the model the worker built differs from the server's, or it sent no fingerprint though its
    # protocol has one (version handshake, FINGERPRINT_PROTOCOL); its lease is ended [exit 2]
    MODEL_DIFFERS = "model-differs"
    # a resumed push whose earlier chunks the server no longer holds (server/partial_pushes.py)
    # [send the push from its start]
    RESUME_LOST = "resume-lost"


# Refusals after which the worker registers again (its lease is gone).
REREGISTER = frozenset(
    {Refusal.UNKNOWN_LEASE, Refusal.LEASE_EXPIRED, Refusal.LEASE_ENDED, Refusal.HEAD_NOT_LEASED}
)
# Refusals after which the worker asks for its lease's current heads and carries on.
RESYNC = frozenset({Refusal.HEAD_MOVED, Refusal.HEAD_FINISHED, Refusal.OUT_OF_STEP})


class Refused(Exception):
    """A request the server will not act on: a ``Refusal`` and a message that says why, for a person."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def refusal_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> Refusal | None:
    """The ``Refusal`` named in a call's trailing metadata, if any (unknown names: None)."""
    for key, value in metadata or ():
        if key == REFUSAL_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                return Refusal(text)
            except ValueError:
                return None
    return None


def snapshot_weights(messages: Iterable, dtype: torch.dtype) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The base a worker loads from a whole snapshot's ``ModelChunk`` messages (no delta in them):
    a quantised layer as its ``QuantizedTensor`` (the codes and scales sent), every other tensor
    decoded and cast to the job's ``dtype``, exactly as ``lte-worker`` decodes a pull. The
    emulator (``lte-sim``) reads the server's snapshots through this. Raises ``WireError`` or
    ``CodecError`` for a stream over the bounds or a payload that does not decode.
    """
    assembler = TensorAssembler(  # lte-worker's bounds on a pull
        max_chunk_bytes=grpc_options.MAX_CHUNK_BYTES,
        max_tensor_bytes=grpc_options.MAX_PUSH_BYTES,
        max_total_bytes=grpc_options.MAX_PUSH_BYTES * 8,
        max_tensors=1 << 20,
    )
    weights: dict[str, torch.Tensor | QuantizedTensor] = {}
    for message in messages:
        enc = assembler.add(message.tensor)
        if enc is None:
            continue
        if enc.codec in QUANTIZED_SNAPSHOT_CODECS:
            weights[enc.name] = decode_tensor_quantized(enc)
        else:
            weights[enc.name] = decode_tensor(enc).to(dtype)
    assembler.finish()
    return weights
