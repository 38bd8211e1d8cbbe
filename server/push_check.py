"""The checks a push passes before it touches the round (docs/design.md section 4).

``Coordinator.begin_push`` checks the header against the lease and the job (``PushCheck``: the
heads exist, the base version is one the server had, the numbers are finite) and returns an
``IncomingPush``: the tensors the push must carry (wire name -> shape) and the byte limits of its
stream. The service checks each tensor as it arrives (``IncomingPush.check_tensor``: name, shape,
codec, finite values) before ``Coordinator.apply_push`` folds the push in, where the round ids are
checked under the lock (``is_retry``, ``check_rounds``). Everything here raises ``Refused`` with
a ``Refusal`` reason and a message naming the head, tensor or field; nothing here changes state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lte.common.job.config import UPLINK_CODECS, JobConfig
from lte.common.job.fingerprint import fingerprint_difference
from lte.common.wire.protocol import (
    FINGERPRINT_PROTOCOL,
    PushMeta,
    Refusal,
    Refused,
    handshake_refusal,
    head_tensor_name,
    replica_tensor_name,
)
from lte.server.aggregation import all_finite
from lte.server.leases import LeaseTable
from lte.server.scheduler import HeadState, Lease

_log = logging.getLogger("lte.server")


class PushCheck:
    """What a push of this job may carry: per head, B ``[m, r]`` and A ``[r, n]`` of every LTE layer
    (a conv kernel's master flattened to ``[m, n]``), and a delta of every replica parameter."""

    def __init__(
        self,
        job: JobConfig,
        master: Mapping[str, torch.Tensor],
        layer_names: list[str],
        replica_names: list[str],
    ) -> None:
        self.job = job
        self.layer_shapes = {name: tuple(master[name].flatten(1).shape) for name in layer_names}
        self.replica_shapes = {name: tuple(master[name].shape) for name in replica_names}

    def expected_tensors(self, head_ids: Iterable[int]) -> dict[str, tuple[int, ...]]:
        """Wire name -> shape of every tensor a push of ``head_ids`` carries."""
        r = self.job.rank
        out: dict[str, tuple[int, ...]] = {}
        for h in head_ids:
            for layer, (m, n) in self.layer_shapes.items():
                out[head_tensor_name(h, layer, "B")] = (m, r)
                out[head_tensor_name(h, layer, "A")] = (r, n)
        out.update({replica_tensor_name(n): shape for n, shape in self.replica_shapes.items()})
        return out

    def max_push_bytes(self, num_heads: int) -> int:
        """Bytes a push of ``num_heads`` heads may carry: fp32 with slack for zstd's worst case."""
        r = self.job.rank
        elems = sum(m * r + r * n for m, n in self.layer_shapes.values()) * num_heads
        elems += sum(math.prod(shape) for shape in self.replica_shapes.values())
        return int(elems * 4 * 1.01) + (1 << 16)

    def check_head_ids(self, head_ids: Iterable[int]) -> None:
        """Head ids the job does not have are a malformed request, not a lease question."""
        unknown = sorted(h for h in head_ids if not 0 <= h < self.job.heads)
        if unknown:
            raise Refused(
                Refusal.MALFORMED, f"heads {unknown} do not exist: this job has heads 0..{self.job.heads - 1}"
            )

    @staticmethod
    def check_fields(header: PushMeta, version: int) -> None:
        """The header's numbers: a base version in ``[0, version]``, finite loss and seconds, counts >= 0."""
        if header.base_version < 0 or header.base_version > version:
            raise Refused(
                Refusal.VERSION_OUT_OF_RANGE,
                f"base_version {header.base_version} is outside [0, {version}] (the server's newest)",
            )
        for value, what in ((header.train_loss, "train_loss"), (header.seconds, "seconds")):
            if not math.isfinite(value):
                raise Refused(Refusal.MALFORMED, f"{what} is {value}")
        if header.steps < 0 or header.samples < 0:
            raise Refused(Refusal.MALFORMED, "steps and samples must be >= 0")

    def begin(self, header: PushMeta, leases: LeaseTable, version: int) -> IncomingPush:
        """Cheap checks before any tensor is read (under the coordinator's lock): the lease, the heads
        (named, in range, held by it), the version bounds; the push to read, ``Refused`` otherwise.
        A retry of a push already counted (``is_retry``) need not hold its heads any more: its reply
        was lost, and a head moved away since must not turn "applied" into "refused"."""
        lease = leases.get(header.lease_id)
        if not header.head_rounds:
            raise Refused(Refusal.MALFORMED, "push names no heads")
        self.check_head_ids(header.head_rounds)
        if not counted_by(header.head_rounds, leases.heads, (lease.lease_id, header.push_id)):
            leases.check_holds(lease, header.head_rounds)
        self.check_fields(header, version)
        return self.incoming(lease, header)

    def incoming(self, lease: Lease, header: PushMeta) -> IncomingPush:
        """The checked header's push: what its stream must carry and may weigh."""
        return IncomingPush(
            lease=lease,
            header=header,
            expected=self.expected_tensors(sorted(header.head_rounds)),
            max_chunk_bytes=self.job.max_chunk_bytes,
            max_tensor_bytes=self.max_push_bytes(1),
            max_total_bytes=self.max_push_bytes(len(header.head_rounds)),
        )


def check_tensor(
    name: str, tensor: torch.Tensor, codec: str, expected: Mapping[str, tuple[int, ...]]
) -> None:
    """One decoded tensor of a push: an expected name and shape, an uplink codec, finite values."""
    if name not in expected:
        raise Refused(Refusal.MALFORMED, f"unexpected tensor {name!r} in this push")
    if tuple(tensor.shape) != expected[name]:
        raise Refused(
            Refusal.MALFORMED,
            f"tensor {name!r} has shape {tuple(tensor.shape)}, the job expects {expected[name]}",
        )
    if codec not in UPLINK_CODECS:
        raise Refused(
            Refusal.MALFORMED, f"tensor {name!r} uses codec {codec!r}; uplink codecs: {UPLINK_CODECS}"
        )
    if not all_finite(tensor):
        raise Refused(Refusal.MALFORMED, f"tensor {name!r} holds NaN or Inf")


@dataclass(frozen=True)
class IncomingPush:
    """A push whose header passed: its lease, what its stream must carry (wire name -> shape) and
    the limits of that stream in bytes (``lte.common.wire.chunks.TensorAssembler``)."""

    lease: Lease
    header: PushMeta
    expected: dict[str, tuple[int, ...]]
    max_chunk_bytes: int
    max_tensor_bytes: int
    max_total_bytes: int

    def check_tensor(self, name: str, tensor: torch.Tensor, codec: str) -> None:
        """``check_tensor`` against this push's expected tensors; raises ``Refused`` (MALFORMED)."""
        check_tensor(name, tensor, codec, self.expected)


def counted_by(
    head_rounds: Mapping[int, int], heads: Mapping[int, HeadState], pusher: tuple[str, int]
) -> bool:
    """Whether every head's round of the push was counted by ``pusher`` (lease id, push id)."""
    return all(heads[h].counted_by.get(r) == pusher for h, r in head_rounds.items())


def is_retry(
    head_rounds: Mapping[int, int],
    heads: Mapping[int, HeadState],
    pusher: tuple[str, int],
    refused: Mapping[int, tuple[int, tuple[str, int]]],
) -> bool:
    """Whether the push is one the server has already counted: every head's round id is counted,
    each by this very push (``pusher``: lease id and push id, ``HeadState.counted_by``). The reply
    is "duplicate", nothing is applied, and the worker goes on as if its push had been applied. A
    round counted from another worker's push (the head moved away, was trained there and moved
    back) is not a retry: ``check_rounds`` refuses it as out of step and the worker takes the
    server's view. A retry of a push the update guard refused gets the same answer again
    (``Refusal.OUTLIER``; ``refused``: head -> the round id and pusher of its last refused round)."""
    if not counted_by(head_rounds, heads, pusher):
        return False
    again = [h for h in head_rounds if refused.get(h) == (head_rounds[h], pusher)]
    if again:
        raise Refused(Refusal.OUTLIER, f"heads {again}: this round was refused as an outlier")
    return True


def check_rounds(head_rounds: Mapping[int, int], next_rounds: Mapping[int, int], rounds_planned: int) -> None:
    """Each head's round id is the one the server expects next, and the head has rounds left."""
    wrong = {h: (head_rounds[h], next_rounds[h]) for h in next_rounds if head_rounds[h] != next_rounds[h]}
    if wrong:
        raise Refused(
            Refusal.OUT_OF_STEP,
            "round ids out of step (head: sent, expected): "
            + ", ".join(f"{h}: {s}, {e}" for h, (s, e) in wrong.items()),
        )
    finished = sorted(h for h in head_rounds if next_rounds[h] >= rounds_planned)
    if finished:
        raise Refused(
            Refusal.HEAD_FINISHED, f"heads {finished} have trained all {rounds_planned} of their rounds"
        )


def check_handshake(job: JobConfig, worker: Mapping[str, Any]) -> None:
    """A registering worker's protocol version, the job fields it knows and its lte version allow it
    to train this job (``protocol.handshake_refusal``); ``Refused(INCOMPATIBLE)`` otherwise, logged."""
    why = handshake_refusal(
        job,
        int(worker.get("protocol_version") or 0),
        worker.get("job_fields") or (),
        str(worker.get("lte_version") or ""),
    )
    if why is not None:
        _log.warning("refused worker %s on %s: %s", worker.get("name", ""), worker.get("hostname", ""), why)
        raise Refused(Refusal.INCOMPATIBLE, why)


MAX_FINGERPRINT_CHARS = (
    512  # a fingerprint is ~60 characters ("tree <16 hex> factory <16 hex> code <16 hex>")
)
MAX_TREE_CHARS = 8 << 20  # a module tree: one short line per module and tensor


def model_refusal(
    worker: Mapping[str, Any], server: tuple[str, str], fingerprint: str, tree: str, spec: str
) -> str | None:
    """Why the worker (its registration fields ``worker``) may not pull or push for this job, whose
    model the server fingerprinted as ``server`` (fingerprint, tree): it speaks wire protocol
    ``FINGERPRINT_PROTOCOL`` or later and sent no ``fingerprint``, or one that is not exactly the
    server's. ``tree`` (sent with a pull of the whole base) lets the reason name the first module
    that differs. None for a worker of an older protocol (it compared the server's fingerprint
    itself) or an equal fingerprint. ``Refused(MALFORMED)`` for a fingerprint or tree over the bounds.

    Not an authentication: a worker that echoes the server's fingerprint (RegisterReply) passes
    whatever it trains; this catches other model code by mistake, the update guard a hostile push."""
    if len(fingerprint) > MAX_FINGERPRINT_CHARS or len(tree) > MAX_TREE_CHARS:
        raise Refused(
            Refusal.MALFORMED,
            f"model_fingerprint or model_tree is longer than {MAX_FINGERPRINT_CHARS} or {MAX_TREE_CHARS} characters",
        )
    protocol = int(worker.get("protocol_version") or 0)
    if protocol < FINGERPRINT_PROTOCOL or fingerprint == server[0]:
        return None
    if not fingerprint:
        return (
            f"it sent no model fingerprint, though its wire protocol {protocol} carries one "
            "(a modified or broken lte-worker)"
        )
    why = fingerprint_difference(server, (fingerprint, tree), spec, who="the worker")
    return why or f"the model fingerprint differs (server {server[0]!r}, the worker {fingerprint[:200]!r})"
