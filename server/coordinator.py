"""The parameter server's state: master weights, versions, head leases and the aggregator.

Everything here is plain Python over tensors (no gRPC), so it can be driven by the service, by
tests, or by a benchmark. One lock guards the state; decoding and validation of a push happen
before it is taken, and snapshot encoding and evaluation happen outside it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from lte.common.codec import encode_tensor
from lte.common.config import UPLINK_CODECS, JobConfig
from lte.common.lte import HeadUpdate, ReplicaUpdate, apply_updates
from lte.common.run_metadata import export_metadata, resolved_job
from lte.common.trainer import build_job_model, evaluate, linear_weight_names
from lte.common.wire import tensor_chunks
from lte.proto import parameter_server_pb2 as pb
from lte.server import checkpoint as ckpt
from lte.server.disk import CheckpointHealth

WORKER_STATES = ("training", "pushing", "pulling", "waiting")  # what a heartbeat may report


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. A NaN or Inf anywhere makes the sum non-finite (Inf - Inf is NaN),
    so a finite sum settles it in one reduction without a bool temporary: 4-6x faster than
    ``isfinite(t).all()`` on a vit-b push (bench/finite_check.py). Only a sum that overflowed,
    or a tensor that really is non-finite, takes the exact check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


# zstd level of what the server sends. Level 1 compresses fp32, int8 and nf4 snapshots as well as
# level 3 (within 0.003 of the ratio, at init and with heavy-tailed weights) and builds fp32 and
# int8 snapshots 27-39 % faster; every new version's snapshot pays it (bench/snapshot_build.py).
SNAPSHOT_ZSTD_LEVEL = 1


class Refused(Exception):
    """A request the server will not act on: a gRPC status code and a message that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class HeadState:
    head_id: int
    lease_id: str | None = None
    next_round: int = 0  # the round id its next push must carry
    steps_done: int = 0  # local steps merged so far (the data position of a resumed head)
    returned: int = 0  # times it came back to the pool from a lost lease


@dataclass
class Lease:
    lease_id: str
    worker_id: str
    worker: dict[str, Any]
    head_ids: list[int]
    registered_at: float
    last_seen: float
    version: int = -1
    state: str = "registered"
    pushes: int = 0
    samples: int = 0
    samples_per_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    last_loss: float = float("nan")


@dataclass
class PushHeaderInfo:
    lease_id: str
    base_version: int
    head_rounds: dict[int, int]
    steps: int
    samples: int
    train_loss: float
    seconds: float


@dataclass
class _AcceptedPush:
    """A push taken into the open round or buffer, kept whole so it can be merged or dropped."""

    lease_id: str
    heads: list[HeadUpdate]
    weight: float  # per head, after the staleness discount
    replica: ReplicaUpdate
    steps: int
    samples: int
    train_loss: float


class BackgroundTask:
    """Runs ``fn`` in a daemon thread each time it is poked; pokes during a run coalesce into one more run."""

    def __init__(self, name: str, fn, on_error=None) -> None:
        self.fn, self.on_error = fn, on_error  # on_error(exc): a failed run must not end the thread
        self._poked = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._poked.set()

    def _loop(self) -> None:
        while True:
            self._poked.wait()
            self._poked.clear()
            if self._stopped:
                return
            try:
                self.fn()
            except Exception as exc:
                if self.on_error is None:
                    logging.getLogger("lte.server").exception("%s failed", self._thread.name)
                else:
                    self.on_error(exc)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped = True
        self._poked.set()
        self._thread.join(timeout)


def staleness_discount(staleness: int) -> float:
    """Async weight factor for a push trained ``staleness`` versions ago: 1 / sqrt(1 + staleness)."""
    return 1.0 / math.sqrt(1.0 + staleness)


class Coordinator:
    """The job on the server side: it registers workers, hands out heads and folds pushes into W."""

    # A job runs for days: ended leases (kept so a late push gets a precise "expired" or "given
    # back") and per-version records (all of them are in metrics.jsonl) are bounded in memory.
    max_ended_leases = 1_000
    max_history = 10_000

    def __init__(
        self,
        job: JobConfig,
        dataset=None,
        *,
        device: str = "cpu",
        heads_per_worker: int = 0,
        lease_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 5.0,
        max_staleness: int = 8,
        buffer_size: int = 0,
        eval_every: int = 0,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 0,
        keep_checkpoints: int = 3,
        metrics_path: str | Path | None = None,
    ) -> None:
        self.job, self.dataset, self.device = job, dataset, device
        self.model = build_job_model(job).to(device)  # the master: a plain zoo model
        self.model.requires_grad_(False)
        self.master: dict[str, torch.Tensor] = dict(self.model.state_dict())
        self.layer_names = linear_weight_names(self.model)
        self.replica_names = [n for n in self.master if n not in set(self.layer_names)]
        self.heads_per_worker = heads_per_worker or job.heads
        self.lease_timeout_s, self.heartbeat_interval_s = lease_timeout_s, heartbeat_interval_s
        self.max_staleness = max_staleness
        self.buffer_size = buffer_size or max(1, job.heads // 4)
        self.eval_every = eval_every
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified on every new version and at the end
        self.version = 0
        self.prev_factors: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.heads = {h: HeadState(h) for h in range(job.heads)}
        self.leases: dict[str, Lease] = {}  # insertion order = registration order
        self.registrations = 0
        self.pending: list[_AcceptedPush] = []  # sync: the open round; buffered: the buffer
        self.head_rounds_applied = 0
        self.samples = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.done = False
        self.started_at = time.time()
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.pushes_refused = 0
        self.pulls_turned_away = 0  # long-polls answered at once: no handler thread to spare
        self.push_log: deque[dict[str, Any]] = deque(maxlen=10_000)  # accepted pushes: staleness and weight
        self._metrics_file = open(metrics_path, "a", buffering=1) if metrics_path else None  # noqa: SIM115
        self._sinks: list = []
        self._snapshot_lock = threading.Lock()
        self._snapshot: tuple[int, list[pb.ModelChunk], int] | None = None
        self.snapshot_builds = 0
        self._expected = self._expected_push_shapes()
        self._eval_model = None
        self._evaluator: BackgroundTask | None = None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self._checkpoint_lock = threading.Lock()  # one writer at a time
        self.checkpoint_health = CheckpointHealth(retry=self._poke_checkpointer)
        self._checkpointer = (
            BackgroundTask("lte-checkpoint", self.save_checkpoint, on_error=self.checkpoint_health.failed)
            if self.checkpoint_dir
            else None
        )

    # -- registration and leases ---------------------------------------------------------------
    def register(self, worker: dict[str, Any]) -> tuple[Lease, list[HeadState]]:
        max_heads = int(worker.get("max_heads") or 0) or self.heads_per_worker
        with self.lock:
            if self.done:
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION, "the job has finished; nothing left to train"
                )
            free = [h for h in self.heads.values() if h.lease_id is None]
            if not free:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"all {self.job.heads} heads are leased; retry later (a head returns when its worker leaves or times out)",
                )
            # heads this worker trained before come back to it first: its optimiser state is theirs
            preferred = set(worker.get("preferred_heads") or ())
            free.sort(key=lambda h: (h.head_id not in preferred, h.head_id))
            take = free[: min(max_heads, self.heads_per_worker, len(free))]
            now = time.monotonic()
            lease = Lease(
                lease_id=uuid.uuid4().hex,
                worker_id=f"w{self.registrations + 1}-{uuid.uuid4().hex[:6]}",
                worker=dict(worker),
                head_ids=[h.head_id for h in take],
                registered_at=now,
                last_seen=now,
            )
            for h in take:
                h.lease_id = lease.lease_id
            self.leases[lease.lease_id] = lease
            self.registrations += 1
            return lease, [HeadState(**vars(h)) for h in take]

    def lease(self, lease_id: str) -> Lease:
        """The live lease ``lease_id`` (touched), or a precise refusal."""
        lease = self.leases.get(lease_id)
        if lease is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"unknown lease {lease_id[:12]!r}: register again")
        if lease.state == "expired":
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease {lease_id[:12]!r} expired after {self.lease_timeout_s:g} s without a heartbeat; "
                "its heads went back to the pool: register again",
            )
        if lease.state == "left":
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, f"lease {lease_id[:12]!r} was given back: register again"
            )
        lease.last_seen = time.monotonic()
        return lease

    def heartbeat(self, lease_id: str, version: int, samples_per_s: float, state: str) -> tuple[int, bool]:
        with self.lock:
            lease = self.lease(lease_id)
            lease.version, lease.samples_per_s = version, samples_per_s
            # only a worker's own activity: "left" or "expired" from a client would orphan its heads
            if state in WORKER_STATES:
                lease.state = state
            return self.version, self.done

    def leave(self, lease_id: str) -> None:
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is None or lease.state in ("left", "expired"):
                return
            self._release(lease, "left")

    def expire_leases(self) -> list[str]:
        """Return the heads of leases silent for longer than the timeout to the pool."""
        now = time.monotonic()
        with self.lock:
            gone = [
                l
                for l in self.leases.values()
                if l.state not in ("left", "expired") and now - l.last_seen > self.lease_timeout_s
            ]
            for lease in gone:
                self._release(lease, "expired")
            return [l.lease_id for l in gone]

    def _release(self, lease: Lease, state: str) -> None:
        self._drop_pending(lease.lease_id)
        lease.state = state
        for h in lease.head_ids:
            head = self.heads[h]
            if head.lease_id == lease.lease_id:
                head.lease_id = None
                head.returned += state == "expired"
        ended = [l.lease_id for l in self.leases.values() if l.state in ("left", "expired")]
        for lease_id in ended[: max(0, len(ended) - self.max_ended_leases)]:  # the oldest first
            del self.leases[lease_id]
        self.changed.notify_all()

    def _drop_pending(self, lease_id: str) -> None:
        """Take a gone lease's unmerged pushes back out of the round, so its heads restart it cleanly.

        The head's next holder continues from the last merged factors; keeping a dead worker's
        half-round would leave the new holder's B', A' out of step with the server's.
        """
        dropped = [a for a in self.pending if a.lease_id == lease_id]
        if not dropped:
            return
        self.pending = [a for a in self.pending if a.lease_id != lease_id]
        for a in dropped:
            self.samples -= a.samples
            for update in a.heads:
                head = self.heads[update.head_id]
                head.next_round -= 1
                head.steps_done -= a.steps

    # -- pulls ---------------------------------------------------------------------------------
    def wait_for_version(self, have_version: int, timeout_s: float) -> tuple[int, bool]:
        """Block until the version passes ``have_version`` (or the job ends, or the timeout)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self.changed:
            while self.version <= have_version and not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            return self.version, self.done

    def snapshot_messages(self) -> tuple[int, list[pb.ModelChunk], int]:
        """(version, chunk messages, payload bytes) of a snapshot at least as new as the version at
        the call, built once per version.

        Builds are single-flight: pullers that arrive while a build runs wait for it and share a
        build started after they asked, instead of each building the version that the pushes
        (async mode: one per push) made meanwhile, back to back.
        """
        with self.lock:
            asked = self.version
        with self._snapshot_lock:
            with self.lock:
                version = self.version
                if self._snapshot is not None and self._snapshot[0] >= asked:
                    return self._snapshot
                master = {
                    name: t.detach().clone() for name, t in self.master.items()
                }  # memcpy under the lock
            layers = set(self.layer_names)
            messages: list[pb.ModelChunk] = []
            total = 0
            for name, tensor in master.items():  # quantise and compress outside the state lock
                codec = self.job.snapshot_codec if name in layers else "fp32"
                enc = encode_tensor(name, tensor.float().cpu(), codec, SNAPSHOT_ZSTD_LEVEL)
                total += len(enc.payload)
                messages += [pb.ModelChunk(tensor=c) for c in tensor_chunks(enc, self.job.max_chunk_bytes)]
            self._snapshot = (version, messages, total)
            self.snapshot_builds += 1
            return self._snapshot

    def head_factor_messages(self, lease: Lease, head_ids: Sequence[int]) -> list[pb.ModelChunk]:
        """The last merged factors of heads this lease holds, so a moved head continues exactly."""
        with self.lock:
            wanted = {}
            self._check_head_ids(head_ids)
            for h in head_ids:
                if h not in lease.head_ids:
                    raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"head {h} is not leased to this worker")
                wanted[h] = {k: (b.clone(), a.clone()) for k, (b, a) in self.prev_factors.get(h, {}).items()}
        out = []
        for h, layers in wanted.items():
            for layer, (b, a) in layers.items():
                for part, t in (("B", b), ("A", a)):
                    enc = encode_tensor(
                        f"head/{h}/{layer}/{part}", t.float().cpu(), "fp32", SNAPSHOT_ZSTD_LEVEL
                    )
                    out += [pb.ModelChunk(tensor=c) for c in tensor_chunks(enc, self.job.max_chunk_bytes)]
        return out

    # -- pushes --------------------------------------------------------------------------------
    def _expected_push_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-head layer shapes (B: m x r, A: r x n) and replica shapes a push must carry."""
        r = self.job.rank
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.layer_names:
            m, n = self.master[name].shape
            shapes[f"{name}/B"] = (m, r)
            shapes[f"{name}/A"] = (r, n)
        return shapes

    def expected_tensors(self, head_ids: Sequence[int]) -> dict[str, tuple[int, ...]]:
        out = {f"head/{h}/{k}": s for h in head_ids for k, s in self._expected.items()}
        out.update({f"replica/{n}": tuple(self.master[n].shape) for n in self.replica_names})
        return out

    def max_push_bytes(self, num_heads: int) -> int:
        """Bytes a push of ``num_heads`` heads may carry: fp32 with slack for zstd's worst case."""
        elems = sum(math.prod(s) for s in self._expected.values()) * num_heads
        elems += sum(self.master[n].numel() for n in self.replica_names)
        return int(elems * 4 * 1.01) + (1 << 16)

    def _check_head_ids(self, head_ids: Iterable[int]) -> None:
        """Head ids the job does not have are a malformed request, not a lease question."""
        unknown = sorted(h for h in head_ids if not 0 <= h < self.job.heads)
        if unknown:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"heads {unknown} do not exist: this job has heads 0..{self.job.heads - 1}",
            )

    def check_push_header(self, header: PushHeaderInfo) -> Lease:
        """Cheap checks before any tensor is read: lease, heads, rounds, version bounds."""
        with self.lock:
            lease = self.lease(header.lease_id)
            if not header.head_rounds:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "push names no heads")
            self._check_head_ids(header.head_rounds)
            foreign = sorted(set(header.head_rounds) - set(lease.head_ids))
            if foreign:
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED, f"heads {foreign} are not leased to this worker"
                )
            if header.base_version < 0 or header.base_version > self.version:
                raise Refused(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"base_version {header.base_version} is outside [0, {self.version}] (the server's newest)",
                )
            for value, what in ((header.train_loss, "train_loss"), (header.seconds, "seconds")):
                if not math.isfinite(value):
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is {value}")
            if header.steps < 0 or header.samples < 0:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "steps and samples must be >= 0")
            return lease

    def validate_tensor(
        self, name: str, tensor: torch.Tensor, codec: str, expected: Mapping[str, tuple[int, ...]]
    ) -> None:
        if name not in expected:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected tensor {name!r} in this push")
        if tuple(tensor.shape) != expected[name]:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the job expects {expected[name]}",
            )
        if codec not in UPLINK_CODECS:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {name!r} uses codec {codec!r}; uplink codecs: {UPLINK_CODECS}",
            )
        if not all_finite(tensor):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"tensor {name!r} holds NaN or Inf")

    def apply_push(self, header: PushHeaderInfo, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Fold one validated push into the round (sync), the buffer, or W directly (async)."""
        # decoded on the CPU; the merge runs where the master weights live (--device)
        tensors = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        heads = [
            HeadUpdate(
                h,
                {
                    layer: (tensors[f"head/{h}/{layer}/B"], tensors[f"head/{h}/{layer}/A"])
                    for layer in self.layer_names
                },
            )
            for h in sorted(header.head_rounds)
        ]
        replica = ReplicaUpdate(len(heads), {n: tensors[f"replica/{n}"] for n in self.replica_names})
        with self.lock:
            lease = self.lease(header.lease_id)
            if self.done:
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION, "the job has finished; the push was not applied"
                )
            rounds = {h: self.heads[h].next_round for h in header.head_rounds}
            if all(header.head_rounds[h] < rounds[h] for h in rounds):
                return {
                    "applied": False,
                    "duplicate": True,
                    "version": self.version,
                    "staleness": 0,
                    "weight": 0.0,
                }
            wrong = {
                h: (header.head_rounds[h], rounds[h]) for h in rounds if header.head_rounds[h] != rounds[h]
            }
            if wrong:
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "round ids out of step (head: sent, expected): "
                    + ", ".join(f"{h}: {s}, {e}" for h, (s, e) in wrong.items()),
                )
            for h in header.head_rounds:
                if self.heads[h].lease_id != lease.lease_id:
                    raise Refused(
                        grpc.StatusCode.FAILED_PRECONDITION, f"head {h} is no longer leased to this worker"
                    )
            staleness = self.version - header.base_version
            if self.job.mode == "sync":
                if staleness:
                    raise Refused(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"sync round {self.version} is open; this push trained on version {header.base_version}: pull and retrain",
                    )
                weight = 1.0 / self.job.heads
            else:
                if staleness > self.max_staleness:
                    self.pushes_refused += 1
                    raise Refused(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"push trained on version {header.base_version} is {staleness} versions stale "
                        f"(limit {self.max_staleness}): pull the newest snapshot and push again",
                    )
                weight = staleness_discount(staleness) / self.job.heads
            for h in header.head_rounds:
                head = self.heads[h]
                head.next_round += 1
                head.steps_done += header.steps
            self.pending.append(
                _AcceptedPush(
                    lease.lease_id, heads, weight, replica, header.steps, header.samples, header.train_loss
                )
            )
            self.push_log.append(
                {
                    "worker_id": lease.worker_id,
                    "base_version": header.base_version,
                    "staleness": staleness,
                    "weight": weight,
                }
            )
            lease.pushes += 1
            lease.state = "training"
            if header.seconds > 0:
                lease.samples_per_s = header.samples / header.seconds
            lease.samples += header.samples
            lease.last_loss = header.train_loss
            self.samples += header.samples
            if self.job.mode == "sync":
                ready = sum(len(a.heads) for a in self.pending) == self.job.heads
            elif self.job.mode == "buffered":
                ready = len(self.pending) >= self.buffer_size
            else:
                ready = True
            if ready:
                self._merge_pending()
            return {
                "applied": True,
                "duplicate": False,
                "version": self.version,
                "staleness": staleness,
                "weight": weight,
            }

    def _merge_pending(self) -> None:
        accepted, self.pending = self.pending, []
        # in head order, not arrival order: float sums are not associative, and a round must merge
        # to the same bits however the network ordered its pushes (the emulator merges so too)
        accepted.sort(key=lambda a: min(u.head_id for u in a.heads))
        heads = [h for a in accepted for h in a.heads]
        apply_updates(
            self.master,
            self.prev_factors,
            heads,
            [a.weight for a in accepted for _ in a.heads],
            [(a.weight * len(a.heads), a.replica) for a in accepted],
            scale=self.job.scale,
            reset=self.job.reset,
        )
        self.version += 1
        self.head_rounds_applied += len(heads)
        samples = sum(a.samples for a in accepted)
        loss = sum(a.train_loss * a.samples for a in accepted) / samples if samples else float("nan")
        record = {
            "version": self.version,
            "time": round(time.time() - self.started_at, 3),
            "samples": self.samples,
            "train_loss": loss,
            "pushes": len(accepted),
            "heads": len(heads),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }
        self.history.append(record)
        if len(self.history) > 2 * self.max_history:  # trimmed in batches: amortised O(1) per version
            del self.history[: -self.max_history]
        self._log(record)
        if self.head_rounds_applied >= self.job.heads * self.job.rounds:
            self.done = True
        if self.eval_every and self.version % self.eval_every == 0 and not self.done and self._evaluator:
            self._evaluator.poke()
        if self._checkpointer and self.checkpoint_every and self.version % self.checkpoint_every == 0:
            self._checkpointer.poke()
        self.changed.notify_all()

    # -- evaluation, metrics, export -----------------------------------------------------------
    def add_sink(self, sink) -> None:
        """Also hand every metrics record (versions, evaluations, checkpoints) to ``sink(record)``."""
        self._sinks.append(sink)

    def _log(self, record: dict[str, Any]) -> None:
        if self._metrics_file:
            try:
                self._metrics_file.write(json.dumps(record) + "\n")
            except OSError as exc:  # a full disk must not stop a merge (nor the job's end)
                self.checkpoint_health.metrics_failed(exc)
        for sink in self._sinks:
            sink(record)

    def start_evaluator(self) -> None:
        """Evaluate in a background thread on a copy of W, so RPCs never wait for it."""
        if self.dataset is not None and self._evaluator is None:
            self._evaluator = BackgroundTask("lte-eval", self.evaluate_now)

    def evaluate_now(self) -> dict[str, Any]:
        if self._eval_model is None:
            self._eval_model = build_job_model(self.job).to(self.device)
        with self.lock:
            version, samples = self.version, self.samples
            self._eval_model.load_state_dict(self.master)  # a copy: training goes on meanwhile
        result = evaluate(self._eval_model, self.dataset, device=self.device)
        record = {
            "version": version,
            "samples": samples,
            "time": round(time.time() - self.started_at, 3),
            **result,
        }
        with self.lock:
            self.evals.append(record)
            self._log({"eval": True, **record})
        return record

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write the state that lets a restarted server continue: atomic, pickle-free (server/checkpoint.py).

        Unmerged pushes of an open round are not saved: their heads' round ids are rolled back
        with them, so workers redo that round after a restart and nothing is applied twice.
        """
        if self.checkpoint_dir is None:
            return None
        with self._checkpoint_lock:
            with self.lock:
                pending_heads = {u.head_id: a.steps for a in self.pending for u in a.heads}
                tensors = {f"master/{k}": v.detach().clone() for k, v in self.master.items()}
                for h, layers in self.prev_factors.items():
                    for layer, (b, a) in layers.items():
                        tensors[f"factors/{h}/{layer}/B"] = b.clone()
                        tensors[f"factors/{h}/{layer}/A"] = a.clone()
                tensors["rng/torch"] = torch.get_rng_state()
                state = {
                    "format": 1,
                    "version": self.version,
                    "job": self.job.to_dict(),
                    "heads": {
                        str(h.head_id): {
                            "next_round": h.next_round - (h.head_id in pending_heads),
                            "steps_done": h.steps_done - pending_heads.get(h.head_id, 0),
                        }
                        for h in self.heads.values()
                    },
                    "samples": self.samples - sum(a.samples for a in self.pending),
                    "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down,
                    "head_rounds_applied": self.head_rounds_applied,
                    "elapsed_s": time.time() - self.started_at,
                    "history": self.history,
                    "evals": self.evals,
                    "done": self.done,
                }
                version = self.version
            path = ckpt.save_checkpoint(self.checkpoint_dir, version, state, tensors, self.keep_checkpoints)
        self.checkpoint_health.saved(path)
        self._log({"checkpoint": str(path), "version": version})
        return path

    def restore(self, state: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Continue from a checkpoint of the same job (a different job is refused, naming the differences)."""
        saved = state.get("job", {})
        diff = sorted(k for k, v in self.job.to_dict().items() if k in saved and saved[k] != v)
        if diff:
            raise ValueError(
                "the checkpoint belongs to another job; differing settings: "
                + ", ".join(f"{k} (checkpoint {saved[k]!r}, now {getattr(self.job, k)!r})" for k in diff)
            )
        with self.lock:
            for name in self.master:
                key = f"master/{name}"
                if key not in tensors:
                    raise ValueError(f"checkpoint lacks {key}")
                self.master[name].copy_(tensors[key])
            self.prev_factors = {}
            for key, value in tensors.items():
                if key.startswith("factors/"):
                    _, h, rest = key.split("/", 2)
                    layer, part = rest.rsplit("/", 1)
                    pair = self.prev_factors.setdefault(int(h), {}).setdefault(layer, [None, None])
                    pair[part == "A"] = value.to(self.device)
            self.prev_factors = {
                h: {k: (v[0], v[1]) for k, v in layers.items()} for h, layers in self.prev_factors.items()
            }
            if "rng/torch" in tensors:
                torch.set_rng_state(tensors["rng/torch"])
            for h, values in state["heads"].items():
                head = self.heads[int(h)]
                head.next_round, head.steps_done = int(values["next_round"]), int(values["steps_done"])
            self.version = int(state["version"])
            self.samples = int(state["samples"])
            self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
            self.head_rounds_applied = int(state["head_rounds_applied"])
            self.history, self.evals = list(state["history"]), list(state["evals"])
            self.started_at = time.time() - float(state.get("elapsed_s", 0.0))
            self.done = bool(state.get("done", False))
            self._snapshot = None
            self.changed.notify_all()

    def _poke_checkpointer(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.poke()

    def stop_background(self) -> None:
        self.checkpoint_health.stop()
        for task in (self._evaluator, self._checkpointer):
            if task is not None:
                task.stop()

    def plain_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return {k: v.detach().clone().cpu().contiguous() for k, v in self.master.items()}

    def export(self, path: str | Path) -> Path:
        """The merged model as a plain safetensors state_dict that loads into the zoo model."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            self.plain_state(),
            str(path),
            metadata=export_metadata(self.job, self.dataset, self.version),  # resolved job, preprocessing
        )
        return path

    def status(self) -> dict[str, Any]:
        """A consistent snapshot of the job for the dashboard and the CLI (no tensors)."""
        now = time.monotonic()
        with self.lock:
            return {
                "job": resolved_job(self.job),  # effective values, not placeholders
                "version": self.version,
                "done": self.done,
                "samples": self.samples,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "head_rounds_applied": self.head_rounds_applied,
                "target_head_rounds": self.job.heads * self.job.rounds,
                "elapsed_s": round(time.time() - self.started_at, 3),
                "pushes_refused": self.pushes_refused,
                "checkpoint_warning": self.checkpoint_health.warning,
                "snapshot_builds": self.snapshot_builds,
                "pulls_turned_away": self.pulls_turned_away,
                "workers": [
                    {
                        "worker_id": l.worker_id,
                        "name": l.worker.get("name", ""),
                        "device": l.worker.get("device", ""),
                        "heads": list(l.head_ids),
                        "last_seen_s": round(now - l.last_seen, 3),
                        "staleness": max(0, self.version - l.version) if l.version >= 0 else None,
                        "samples_per_s": l.samples_per_s,
                        "samples": l.samples,
                        "pushes": l.pushes,
                        "bytes_up": l.bytes_up,
                        "bytes_down": l.bytes_down,
                        "state": l.state,
                        "train_loss": l.last_loss,
                    }
                    for l in self.leases.values()
                ],
                "free_heads": [h.head_id for h in self.heads.values() if h.lease_id is None],
                "history": list(self.history[-500:]),
                "evals": list(self.evals),
            }

    def close(self) -> None:
        self.stop_background()
        if self._metrics_file:
            self._metrics_file.close()
            self._metrics_file = None
