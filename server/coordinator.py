"""The parameter server's state and its one lock: the core that the gRPC service, the CLI, tests and
benchmarks drive. No gRPC here: a request the server will not act on raises ``Refused`` with a
domain ``Refusal`` (``lte.common.protocol``), which the service maps to a status code.

The work is split by job, each in its own module: head leases and scheduling (``scheduler``, a pure
function of state and ``now``), aggregation (``aggregation``), snapshots (``snapshots``),
evaluation (``evaluation``) and checkpoint files (``checkpoint``). Time comes from ``clock``
(``time.monotonic`` unless a test passes a fake one). Decoding and validation of a push happen
before the lock is taken; snapshot encoding and evaluation happen outside it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lte.common.config import UPLINK_CODECS, JobConfig
from lte.common.export import export_model
from lte.common.fingerprint import model_fingerprint
from lte.common.lte import conv1d_class
from lte.common.model_check import checkpoint_mismatch, model_summary
from lte.common.policy import classify_model
from lte.common.protocol import (
    HEAD_PREFIX,
    PushMeta,
    Refusal,
    Refused,
    decode_update,
    factor_tensors,
    group_head_factors,
    handshake_refusal,
    head_tensor_name,
    replica_tensor_name,
)
from lte.common.run_metadata import resolved_job
from lte.common.trainer import build_job_model, lr_at
from lte.server import checkpoint as ckpt
from lte.server import scheduler
from lte.server.aggregation import AcceptedPush, Aggregator, all_finite, staleness_discount
from lte.server.disk import CheckpointHealth
from lte.server.evaluation import BackgroundTask, Evaluator
from lte.server.failures import note_worker_failure
from lte.server.guard import GuardSettings, UpdateGuard, all_master_finite, merge_within_bounds, tensor_norms
from lte.server.scheduler import HeadState, Lease, Policy, RoundTimes
from lte.server.snapshots import SNAPSHOT_ZSTD_LEVEL, Snapshot, SnapshotBuilder

__all__ = [
    "SNAPSHOT_ZSTD_LEVEL",
    "Coordinator",
    "HeadState",
    "Lease",
    "PushMeta",
    "Refused",
    "all_finite",
    "staleness_discount",
]

WORKER_STATES = ("training", "pushing", "pulling", "waiting")  # what a heartbeat may report
_log = logging.getLogger("lte.server")


class Coordinator:
    """The job on the server side: it leases heads to workers and folds their pushes into W."""

    # A job runs for days: ended leases (kept so a late push gets a precise "expired" or "given
    # back") and per-version records (all of them are in metrics.jsonl) are bounded in memory.
    max_ended_leases = 1_000
    max_history = 10_000
    eval_loader_workers = 0  # DataLoader processes of a streamed evaluation (lte-server --loader-workers)

    def __init__(
        self,
        job: JobConfig,
        dataset=None,
        *,
        device: str = "cpu",
        heads_per_worker: int = 0,
        lease_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 5.0,
        straggler_factor: float = 4.0,
        turn_grace_s: float | None = None,
        max_staleness: int = 8,
        buffer_size: int = 0,
        eval_every: int = 0,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 0,
        keep_checkpoints: int = 3,
        metrics_path: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        guard: GuardSettings | None = None,
    ) -> None:
        self.job, self.dataset, self.device = job, dataset, device
        self.clock = clock
        self.model = build_job_model(job).to(device)  # the master: a plain zoo model
        # the workers' policy (before freezing): what a push carries
        self.policy = classify_model(self.model, embeddings=job.embedding_heads)
        self.model.requires_grad_(False)
        self.master: dict[str, torch.Tensor] = dict(self.model.state_dict())
        self.layer_names = self.policy.head_names
        self.replica_names = self.policy.uplink_names
        self.heads_per_worker = heads_per_worker or job.heads
        self.model_summary = model_summary(self.policy, job, self.heads_per_worker)  # for the dashboard
        self.lease_timeout_s, self.heartbeat_interval_s = lease_timeout_s, heartbeat_interval_s
        # A straggler is never called so before two missed heartbeats' worth of time. A free head
        # waits for a worker with room as long as a lease waits for a heartbeat, then goes to turns.
        self.schedule = Policy(
            rounds_planned=job.rounds,
            lease_timeout_s=lease_timeout_s,
            straggler_factor=straggler_factor,
            straggler_floor_s=2 * heartbeat_interval_s,
            turn_grace_s=lease_timeout_s if turn_grace_s is None else turn_grace_s,
            mode=job.mode,
        )
        self.eval_every = eval_every
        self.lock = threading.RLock()
        self.changed = threading.Condition(
            self.lock
        )  # notified on every new version, lease change and the end
        self.version = 0
        self.aggregator = Aggregator(job, self.master, max_staleness=max_staleness, buffer_size=buffer_size)
        self.heads = {h: HeadState(h, free_since=clock()) for h in range(job.heads)}
        self.leases: dict[str, Lease] = {}  # insertion order = registration order
        self.round_times = RoundTimes()
        self.waiting: dict[int, str] = {}  # heads not training now, and why (log and dashboard)
        self.stopping = False  # the server is stopping: waits go to the dashboard only, not the log
        self.registrations = 0
        self.head_rounds_applied = 0
        self.samples = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.done = False
        # durations come from ``clock``, monotonic (a wall clock stepped back by NTP or by hand must
        # not show a negative elapsed time, 0 merges/min, or reach a checkpoint); wall time is only
        # a timestamp (started_at)
        self.started_at = time.time()
        self._elapsed_before = 0.0  # seconds the job ran before this process (a resumed checkpoint)
        self._started_mono = clock()
        self._ended_mono: float | None = None  # the job's end: the elapsed clock stops there
        self._rounds_at_start = 0  # head-rounds done when this process started (for the ETA's rate)
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.pushes_refused = 0
        self.pulls_turned_away = 0  # long-polls answered at once: no handler thread to spare
        self.heads_moved = 0  # heads taken from stragglers or moved to balance the load
        self.late_pushes_refused = 0  # pushes of heads moved away from their worker meanwhile
        self.push_log: deque[dict[str, Any]] = deque(maxlen=10_000)  # accepted pushes: staleness and weight
        self._metrics_file = open(metrics_path, "a", buffering=1) if metrics_path else None  # noqa: SIM115
        self._sinks: list = []
        self.snapshots = SnapshotBuilder(job, self.layer_names)
        self.guard = UpdateGuard(
            guard or GuardSettings(), job, transposed=transposed_layers(self.model, self.layer_names)
        )
        self.fingerprint = model_fingerprint(job)  # (fingerprint, module tree): sent with each registration
        self._trained_replicas = frozenset(n for n, _ in self.model.named_parameters()) & set(
            self.replica_names
        )
        # ||W|| per tensor before the next merge: its growth bound (guard on only)
        self._master_norms = tensor_norms(self.master) if self.guard.settings.on else {}
        self._refused_rounds: dict[int, int] = {}  # head -> its round the guard refused (a retried push)
        self._expected = self._expected_push_shapes()
        self._evaluation = Evaluator(job, dataset, device) if dataset is not None else None
        self._evaluator: BackgroundTask | None = None
        self.eval_error: str | None = None  # why the newest evaluation failed (None: it succeeded)
        self.eval_failures = 0
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self._checkpoint_lock = threading.Lock()  # one writer at a time
        self.checkpoint_health = CheckpointHealth(retry=self._poke_checkpointer)
        self._checkpointer = (
            BackgroundTask("lte-checkpoint", self.save_checkpoint, on_error=self.checkpoint_health.failed)
            if self.checkpoint_dir
            else None
        )

    def elapsed_s(self) -> float:
        """Seconds the job has run (across resumes), by the monotonic clock; it stops at the job's end."""
        end = self._ended_mono if self._ended_mono is not None else self.clock()
        return self._elapsed_before + max(0.0, end - self._started_mono)

    def eta_s(self) -> float | None:
        """Seconds left at the rate measured by this process (head-rounds done since it started, over
        the monotonic time since): ``(planned - done) / rate``. None before the first round, 0 at the end."""
        done, planned = self.progress()
        if self.done or done >= planned:
            return 0.0
        ran = done - self._rounds_at_start
        if ran <= 0:
            return None
        return (planned - done) * (self.clock() - self._started_mono) / ran

    # -- the aggregator's state, read by tests, benchmarks and the service --------------------------
    @property
    def max_staleness(self) -> int:
        return self.aggregator.max_staleness

    @property
    def buffer_size(self) -> int:
        return self.aggregator.buffer_size

    @property
    def pending(self) -> list[AcceptedPush]:
        return self.aggregator.pending

    @property
    def prev_factors(self) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        return self.aggregator.prev_factors

    @property
    def snapshot_builds(self) -> int:
        return self.snapshots.builds

    @property
    def rounds_planned(self) -> int:
        return self.schedule.rounds_planned

    # -- leases and the head scheduler ------------------------------------------------------------
    def register(self, worker: dict[str, Any]) -> tuple[Lease, list[HeadState]]:
        """A new lease; the scheduler gives it free heads (maybe none yet: it stands by for them)."""
        room = min(int(worker.get("max_heads") or 0) or self.heads_per_worker, self.heads_per_worker)
        why = handshake_refusal(
            self.job,
            int(worker.get("protocol_version") or 0),
            worker.get("job_fields") or (),
            str(worker.get("lte_version") or ""),
        )
        if why is not None:
            _log.warning(
                "refused worker %s on %s: %s", worker.get("name", ""), worker.get("hostname", ""), why
            )
            raise Refused(Refusal.INCOMPATIBLE, why)
        with self.lock:
            if self.done:
                raise Refused(Refusal.JOB_DONE, "the job has finished; nothing left to train")
            now = self.clock()
            lease = Lease(
                lease_id=uuid.uuid4().hex,
                worker_id=f"w{self.registrations + 1}-{uuid.uuid4().hex[:6]}",
                worker=dict(worker),
                head_ids=[],
                registered_at=now,
                last_seen=now,
                room=max(1, room),
            )
            self.leases[lease.lease_id] = lease
            self.registrations += 1
            self._schedule(now)
            return lease, self.lease_heads(lease)

    def lease_heads(self, lease: Lease) -> list[HeadState]:
        """Copies of the heads ``lease`` holds, in its order (under the lock)."""
        return [HeadState(**vars(self.heads[h])) for h in lease.head_ids]

    def lease(self, lease_id: str) -> Lease:
        """The live lease ``lease_id`` (touched), or a precise refusal."""
        lease = self.leases.get(lease_id)
        if lease is None:
            raise Refused(Refusal.UNKNOWN_LEASE, f"unknown lease {lease_id[:12]!r}: register again")
        if lease.state == "expired":
            raise Refused(
                Refusal.LEASE_EXPIRED,
                f"lease {lease_id[:12]!r} expired after {self.lease_timeout_s:g} s without a heartbeat; "
                "its heads went back to the pool: register again",
            )
        if lease.state == "quarantined":
            raise Refused(
                Refusal.QUARANTINED,
                f"worker {lease.worker_id} is quarantined: a push of it broke a merge ({lease.failure})",
            )
        if lease.state in ("left", "failed"):
            raise Refused(Refusal.LEASE_ENDED, f"lease {lease_id[:12]!r} was given back: register again")
        lease.last_seen = self.clock()
        return lease

    def heartbeat(self, lease_id: str, version: int, samples_per_s: float, state: str) -> tuple[int, bool]:
        with self.lock:
            lease = self.lease(lease_id)
            lease.version, lease.samples_per_s = version, samples_per_s
            # only a worker's own activity: "left" or "expired" from a client would orphan its heads
            if state in WORKER_STATES:
                lease.state = state
            self._schedule(lease.last_seen)
            return self.version, self.done

    def leave(self, lease_id: str, reason: str = "") -> None:
        """Give a lease back. A reason starting with "failed:" marks the worker failed (log and dashboard)."""
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is None or not lease.live:
                return
            self._release(lease, "left")
            note_worker_failure(lease, reason)
            self._schedule(self.clock())

    def expire_leases(self) -> list[str]:
        """Run the scheduler now: expire silent leases, move stragglers' heads, hand out free heads.
        Returns the leases that expired."""
        with self.lock:
            return self._schedule(self.clock())

    def _schedule(self, now: float) -> list[str]:
        """Apply the scheduler's plan (under the lock); returns the leases it expired."""
        plan = scheduler.plan(self.heads, self.leases, now, self.schedule, self.round_times.median)
        for lease_id in plan.expire:
            self._release(self.leases[lease_id], "expired")
        for lease_id in plan.stragglers:
            self.leases[lease_id].straggler = True
        for lease_id, h, why in plan.revoke:
            lease = self.leases[lease_id]
            lease.head_ids.remove(h)
            lease.epoch += 1
            self.heads[h].lease_id = None
            self.heads[h].free_since = now
            self.heads[h].moved += 1
            self.heads_moved += 1
            _log.info("head %d taken from %s: %s", h, lease.worker_id, why)  # routine scheduling
        for lease_id, h in plan.assign:
            lease = self.leases[lease_id]
            lease.head_ids.append(h)
            lease.held_before.add(h)
            lease.epoch += 1
            self.heads[h].lease_id = lease_id
            self.heads[h].waiting_since = now
        if plan.waiting != self.waiting:
            news: dict[str, list[int]] = {}
            for h, why in sorted(plan.waiting.items()):
                if self.waiting.get(h) != why:
                    news.setdefault(why, []).append(h)
            for why, ids in news.items():  # one line per reason, only when something changed
                if not self.stopping:  # workers leaving a stopping server: not news, and the
                    _log.info("heads %s wait: %s", ids, why)  # resume line must stay the last
            self.waiting = plan.waiting
        if plan:
            self.changed.notify_all()
        return plan.expire

    def _release(self, lease: Lease, state: str) -> None:
        self._drop_pending(lease.lease_id)
        lease.state = state
        now = self.clock()
        for h in lease.head_ids:
            head = self.heads[h]
            if head.lease_id == lease.lease_id:
                head.lease_id = None
                head.free_since = now
                head.returned += state == "expired"
        # an ended lease keeps its head ids: what it held when it ended (the dashboard shows it)
        lease.epoch += 1
        ended = [l.lease_id for l in self.leases.values() if not l.live]
        for lease_id in ended[: max(0, len(ended) - self.max_ended_leases)]:  # the oldest first
            del self.leases[lease_id]
        self.changed.notify_all()

    def _drop_pending(self, lease_id: str) -> None:
        """Take a gone lease's unmerged pushes back out of the round, so its heads restart it cleanly.

        The head's next holder continues from the last merged factors; keeping a dead worker's
        half-round would leave the new holder's B', A' out of step with the server's.
        """
        for a in self.aggregator.drop(lease_id):
            self.samples -= a.samples
            for h in [u.head_id for u in a.heads] + a.skipped:
                head = self.heads[h]
                head.next_round -= 1
                head.steps_done -= a.steps
                head.pending = False

    def wait_for_workers_to_leave(self, timeout_s: float) -> bool:
        """After the job: block until every live lease has left (they see "done" on their next
        heartbeat or pull), or the timeout; whether they all did."""
        with self.changed:
            return self.changed.wait_for(lambda: not any(l.live for l in self.leases.values()), timeout_s)

    def lease_view(self, lease_id: str) -> tuple[Lease, list[HeadState], dict[int, bool]]:
        """The lease, copies of its heads, and which of them the server holds merged factors for."""
        with self.lock:
            lease = self.lease(lease_id)
            return lease, self.lease_heads(lease), {h: h in self.prev_factors for h in lease.head_ids}

    # -- pulls ---------------------------------------------------------------------------------
    def wait_for_version(
        self, have_version: int, timeout_s: float, lease: Lease | None = None, epoch: int = -1
    ) -> tuple[int, bool]:
        """Block until the version passes ``have_version``, the job ends, ``lease``'s epoch differs
        from ``epoch`` (when given), or the timeout."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self.changed:
            while self.version <= have_version and not self.done:
                if lease is not None and epoch >= 0 and lease.epoch != epoch:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            return self.version, self.done

    def snapshot_messages(self) -> Snapshot:
        """(version, chunk messages, payload bytes) of a snapshot at least as new as the version at
        the call, built once per version (``SnapshotBuilder``)."""

        def version_now() -> int:
            with self.lock:
                return self.version

        def copy_master() -> tuple[int, dict[str, torch.Tensor]]:
            with self.lock:
                layers = set(self.layer_names)
                return self.version, {  # a memcpy under the lock; quantised and compressed outside it
                    name: (t.flatten(1) if name in layers else t).detach().clone()  # a conv kernel as [m, n]
                    for name, t in self.master.items()
                    if name not in self.policy.ties  # a tied alias: its owner carries the value
                }

        return self.snapshots.get(version_now, copy_master)

    def snapshot_delta(self, to_version: int, from_version: int) -> tuple[list, int] | None:
        """(chunk messages, payload bytes) of the delta ``from_version -> to_version`` (the snapshot
        ``snapshot_messages`` returned), or None: send the full snapshot (``SnapshotBuilder.delta``)."""
        return self.snapshots.delta(to_version, from_version)

    def snapshot_stream_id(self, version: int, delta_base: int, head_factors) -> int:
        """The name of a pull's chunk sequence, for resuming it (``SnapshotBuilder.stream_id``)."""
        return self.snapshots.stream_id(version, delta_base, head_factors)

    def head_factor_messages(self, lease: Lease, head_ids: Sequence[int]) -> list:
        """The last merged factors of heads this lease holds, so a moved head continues exactly."""
        with self.lock:
            self._check_head_ids(head_ids)
            wanted = {}
            for h in head_ids:
                if h not in lease.head_ids:
                    raise Refused(Refusal.HEAD_NOT_LEASED, f"head {h} is not leased to this worker")
                wanted[h] = {k: (b.clone(), a.clone()) for k, (b, a) in self.prev_factors.get(h, {}).items()}
        return self.snapshots.factor_messages(wanted)

    def count_sent(self, lease: Lease, nbytes: int, version: int) -> None:
        with self.lock:
            self.bytes_down += nbytes
            lease.bytes_down += nbytes
            lease.version = version

    def count_received(self, lease: Lease, nbytes: int) -> None:
        with self.lock:
            self.bytes_up += nbytes
            lease.bytes_up += nbytes

    def count_turned_away(self) -> None:
        with self.lock:
            self.pulls_turned_away += 1

    # -- pushes --------------------------------------------------------------------------------
    def _expected_push_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-head layer shapes (B: m x r, A: r x n), keyed ``<layer>/<B|A>``."""
        r = self.job.rank
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.layer_names:
            m, n = self.master[name].flatten(1).shape
            shapes[f"{name}/B"] = (m, r)
            shapes[f"{name}/A"] = (r, n)
        return shapes

    def expected_tensors(self, head_ids: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Wire name -> shape of every tensor a push of ``head_ids`` carries."""
        out: dict[str, tuple[int, ...]] = {}
        for h in head_ids:
            for layer in self.layer_names:
                m, n = self.master[layer].flatten(1).shape
                out[head_tensor_name(h, layer, "B")] = (m, self.job.rank)
                out[head_tensor_name(h, layer, "A")] = (self.job.rank, n)
        out.update({replica_tensor_name(n): tuple(self.master[n].shape) for n in self.replica_names})
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
                Refusal.MALFORMED, f"heads {unknown} do not exist: this job has heads 0..{self.job.heads - 1}"
            )

    def check_push_header(self, header: PushMeta) -> Lease:
        """Cheap checks before any tensor is read: lease, heads, rounds, version bounds."""
        with self.lock:
            lease = self.lease(header.lease_id)
            if not header.head_rounds:
                raise Refused(Refusal.MALFORMED, "push names no heads")
            self._check_head_ids(header.head_rounds)
            self._check_holds(lease, header.head_rounds)
            if header.base_version < 0 or header.base_version > self.version:
                raise Refused(
                    Refusal.VERSION_OUT_OF_RANGE,
                    f"base_version {header.base_version} is outside [0, {self.version}] (the server's newest)",
                )
            for value, what in ((header.train_loss, "train_loss"), (header.seconds, "seconds")):
                if not math.isfinite(value):
                    raise Refused(Refusal.MALFORMED, f"{what} is {value}")
            if header.steps < 0 or header.samples < 0:
                raise Refused(Refusal.MALFORMED, "steps and samples must be >= 0")
            return lease

    def _check_holds(self, lease: Lease, head_ids: Iterable[int]) -> None:
        """Each head is this lease's now: one it held before was moved away (HEAD_MOVED), one it never
        held is not its business (HEAD_NOT_LEASED)."""
        other = sorted(h for h in head_ids if self.heads[h].lease_id != lease.lease_id)
        moved = [h for h in other if h in lease.held_before]
        if moved:
            self.late_pushes_refused += 1
            lease.straggler = False  # it is making progress again: it may take heads
            raise Refused(
                Refusal.HEAD_MOVED, f"heads {moved} were moved to another worker; this push is not applied"
            )
        if other:
            raise Refused(Refusal.HEAD_NOT_LEASED, f"heads {other} are not leased to this worker")

    def validate_tensor(
        self, name: str, tensor: torch.Tensor, codec: str, expected: Mapping[str, tuple[int, ...]]
    ) -> None:
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

    def apply_push(self, header: PushMeta, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Fold one validated push into the round (sync), the buffer, or W directly (async)."""
        # decoded on the CPU; the merge runs where the master weights live (--device)
        tensors = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        heads, replica = decode_update(
            tensors, sorted(header.head_rounds), self.layer_names, self.replica_names
        )
        with self.lock:
            lease = self.lease(header.lease_id)
            if self.done:
                raise Refused(Refusal.JOB_DONE, "the job has finished; the push was not applied")
            rounds = {h: self.heads[h].next_round for h in header.head_rounds}
            if all(header.head_rounds[h] < rounds[h] for h in rounds):
                refused = [h for h in rounds if self._refused_rounds.get(h) == header.head_rounds[h]]
                if refused:  # a retry of a push the guard refused: the same answer
                    raise Refused(Refusal.OUTLIER, f"heads {refused}: this round was refused as an outlier")
                return {
                    "applied": False,
                    "duplicate": True,
                    "version": self.version,
                    "staleness": 0,
                    "weight": 0.0,
                }
            self._check_holds(lease, header.head_rounds)
            wrong = {
                h: (header.head_rounds[h], rounds[h]) for h in rounds if header.head_rounds[h] != rounds[h]
            }
            if wrong:
                raise Refused(
                    Refusal.OUT_OF_STEP,
                    "round ids out of step (head: sent, expected): "
                    + ", ".join(f"{h}: {s}, {e}" for h, (s, e) in wrong.items()),
                )
            finished = sorted(h for h in header.head_rounds if rounds[h] >= self.rounds_planned)
            if finished:
                raise Refused(
                    Refusal.HEAD_FINISHED,
                    f"heads {finished} have trained all {self.rounds_planned} of their rounds",
                )
            staleness = self.version - header.base_version
            try:
                weight = self.aggregator.weight(staleness, self.version, header.base_version)
            except Refused:
                self.pushes_refused += 1
                raise
            verdict = self.guard.check(
                {u.head_id: u.factors for u in heads},
                self.prev_factors,
                replica.deltas,
                {h: self._round_lr_sum(self.heads[h].steps_done) for h in header.head_rounds},
                self._trained_replicas,
                self._master_norms,
            )
            refuse = bool(verdict.outliers) and self.guard.settings.mode == "refuse"
            if verdict.outliers:
                self._note_outlier(lease, header, verdict, refuse)
                lease.outliers_in_row += 1
            else:
                self.guard.accept(verdict)
                lease.outliers_in_row = 0
            now = self.clock()
            lr_start = min(lr_at(self.heads[h].steps_done, self.job) for h in header.head_rounds)
            for h in header.head_rounds:
                head = self.heads[h]
                self.round_times.add(now - head.waiting_since)
                head.next_round += 1
                head.steps_done += header.steps
                head.pending = not refuse or self.job.mode == "sync"  # a refused round waits only in sync
                head.waiting_since = now
            push = AcceptedPush(
                lease.lease_id,
                [] if refuse else heads,
                weight,
                replica,
                header.steps,
                0 if refuse else header.samples,
                header.train_loss,
                lr_start,
                skipped=sorted(header.head_rounds) if refuse else [],
                clip=dict(verdict.clip) if verdict.outliers else {},
                guard_ratio=verdict.worst_ratio,
                impact=verdict.impact,
            )
            ready = (not refuse or self.job.mode == "sync") and self.aggregator.add(push)
            self.push_log.append(
                {
                    "worker_id": lease.worker_id,
                    "base_version": header.base_version,
                    "staleness": staleness,
                    "weight": weight,
                }
            )
            lease.pushes += 1
            lease.straggler = False
            lease.state = "training"
            if header.seconds > 0:
                lease.samples_per_s = header.samples / header.seconds
            lease.samples += header.samples
            lease.last_loss = header.train_loss
            if not refuse:
                self.samples += header.samples
            # the last pushes of a job merge even when a buffer is not full
            if ready or all(h.next_round >= self.rounds_planned for h in self.heads.values()):
                if self.pending:
                    self._merge_pending()
                elif all(not h.pending for h in self.heads.values()):
                    self.done = True  # the last round was refused: nothing left to merge
                    self.changed.notify_all()
            if lease.outliers_in_row >= self.guard.settings.quarantine_after:
                self._quarantine(lease.lease_id, f"{lease.outliers_in_row} outlier pushes in a row")
            self._schedule(now)
            if refuse:
                for h, r in header.head_rounds.items():
                    self._refused_rounds[h] = r
                raise Refused(
                    Refusal.OUTLIER,
                    f"push of heads {sorted(header.head_rounds)} refused by the update guard: "
                    f"{verdict.describe()}; the round is discarded: roll these heads back and go on",
                )
            return {
                "applied": True,
                "duplicate": False,
                "version": self.version,
                "staleness": staleness,
                "weight": weight,
                "done": self.done,
            }

    def _round_lr_sum(self, steps_done: int) -> float:
        """The learning rates of a round starting at ``steps_done``, summed (the guard's step bound)."""
        return sum(
            lr_at(t, self.job) for t in range(steps_done, steps_done + self.job.round_steps(steps_done))
        )

    def _note_outlier(self, lease: Lease, header: PushMeta, verdict, refuse: bool) -> None:
        """Count and log an outlier push (under the lock)."""
        self.guard.outliers += 1
        self.guard.clipped += not refuse
        action = "refused" if refuse else "clipped"
        _log.warning(
            "update guard: push of heads %s from worker %s (%s) %s: %s",
            sorted(header.head_rounds),
            lease.worker_id,
            lease.worker.get("name", ""),
            action,
            verdict.describe(),
        )
        self.guard.fired(
            {
                "version": self.version,
                "worker_id": lease.worker_id,
                "action": action,
                "what": verdict.describe(),
            }
        )
        self._log(
            {
                "guard": action,
                "worker_id": lease.worker_id,
                "version": self.version,
                "what": verdict.describe(),
            }
        )

    def _merge_guarded(self, accepted: list[AcceptedPush]):
        """Merge ``accepted``; with the guard on, check the master after it and roll a bad merge back
        (the pre-merge W and merged factors restored), then merge again without the push that most
        exceeded its bounds, whose worker is quarantined."""
        if not self.guard.settings.on:
            return self.aggregator.merge_pushes(accepted)
        backup = {k: v.detach().clone() for k, v in self.master.items()}
        prev_backup = {h: dict(layers) for h, layers in self.prev_factors.items()}
        while True:
            merged = self.aggregator.merge_pushes(accepted)
            problem, norms = merge_within_bounds(self.master, self._master_norms, self.guard.settings)
            if problem is None:
                self._master_norms = norms
                return merged
            for k, v in backup.items():
                self.master[k].copy_(v)
            self.prev_factors.clear()
            self.prev_factors.update({h: dict(layers) for h, layers in prev_backup.items()})
            self.guard.rollbacks += 1
            culprits = [a for a in accepted if a.heads]
            if not culprits:
                _log.error("update guard: the master is out of bounds with nothing merged: %s", problem)
                return self.aggregator.merge_pushes(accepted)
            culprit = max(culprits, key=lambda a: (a.guard_ratio, a.impact))
            culprit.skipped = sorted([u.head_id for u in culprit.heads] + culprit.skipped)
            culprit.heads, culprit.samples = [], 0
            self._quarantine(culprit.lease_id, f"merge rolled back: {problem}")

    def _quarantine(self, lease_id: str, problem: str) -> None:
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        _log.error(
            "update guard: %s; worker %s (%s) quarantined, its heads %s go back to the pool",
            problem,
            lease.worker_id,
            lease.worker.get("name", ""),
            list(lease.head_ids),
        )
        self.guard.quarantined.append(lease.worker_id)
        self.guard.fired(
            {"version": self.version, "worker_id": lease.worker_id, "action": "quarantined", "what": problem}
        )
        self._log(
            {"guard": "quarantined", "worker_id": lease.worker_id, "version": self.version, "what": problem}
        )
        lease.failure = problem
        if lease.live:
            self._release(lease, "quarantined")

    def _merge_pending(self) -> None:
        now = self.clock()
        accepted, self.aggregator.pending = self.aggregator.pending, []
        merged_heads = [u.head_id for a in accepted for u in a.heads] + [
            h for a in accepted for h in a.skipped
        ]
        merged = self._merge_guarded(accepted)
        for h in merged_heads:
            self.heads[h].pending = False
            self.heads[h].waiting_since = now  # the server now waits for this head's next round
        if self.job.mode == "sync":  # the round closed: every head's next wait starts now
            for head in self.heads.values():
                head.waiting_since = now
        self.version += 1
        self.head_rounds_applied += merged.heads
        record = {
            "version": self.version,
            "time": round(self.elapsed_s(), 3),
            "samples": self.samples,
            "train_loss": merged.train_loss,
            "pushes": merged.pushes,
            "heads": merged.heads,
            "head_rounds": self.head_rounds_applied,
            "lr": merged.lr_start,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }
        self.history.append(record)
        if len(self.history) > 2 * self.max_history:  # trimmed in batches: amortised O(1) per version
            del self.history[: -self.max_history]
        self._log(record)
        if all(h.next_round >= self.rounds_planned and not h.pending for h in self.heads.values()):
            self.done = True
            self._ended_mono = self.clock()
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
        if self._evaluation is not None and self._evaluator is None:
            self._evaluator = BackgroundTask("lte-eval", self.evaluate_now, on_error=self.evaluation_failed)

    def evaluation_failed(self, exc: Exception) -> str:
        """An evaluation that could not run (its split deleted or unreadable under the job): one
        warning line, no traceback; the newest accuracy is marked stale (``status()["eval_error"]``).
        Returns the reason."""
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        with self.lock:
            version, self.eval_error = self.version, reason
            self.eval_failures += 1
            last = self.evals[-1]["version"] if self.evals else None
            self._log({"eval": True, "version": version, "error": reason})
        _log.warning(
            "evaluation at version %d failed (%s); %s",
            version,
            reason,
            f"the accuracy shown is version {last}'s (stale)"
            if last is not None
            else "no evaluation has succeeded yet",
        )
        return reason

    def evaluate_now(self) -> dict[str, Any]:
        if self._evaluation is None:
            raise RuntimeError("this coordinator has no dataset to evaluate on")

        def load(model) -> tuple[int, int]:
            with self.lock:
                model.load_state_dict(self.master)  # a copy: training goes on meanwhile
                return self.version, self.samples

        version, samples, result = self._evaluation.run(load, loader_workers=self.eval_loader_workers)
        record = {
            "version": version,
            "samples": samples,
            "time": round(self.elapsed_s(), 3),
            **result,
        }
        with self.lock:
            self.evals.append(record)
            self.eval_error = None
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
                tensors.update({name: t.clone() for name, t in factor_tensors(self.prev_factors).items()})
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
                    "elapsed_s": self.elapsed_s(),
                    "history": self.history,
                    "evals": self.evals,
                    "done": self.done,
                }
                version = self.version
            if not all_master_finite(tensors):
                _log.error("checkpoint of version %d not written: the master weights are not finite", version)
                return None
            path = ckpt.save_checkpoint(self.checkpoint_dir, version, state, tensors, self.keep_checkpoints)
        self.checkpoint_health.saved(path)
        self._log({"checkpoint": str(path), "version": version})
        return path

    def restore(self, state: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Continue from a checkpoint of the same job (a different job is refused, naming the differences)."""
        saved, now = _effective(state.get("job", {})), _effective(self.job.to_dict())
        # a run's own config.toml holds resolved values (warmup 300 for the -1 the checkpoint kept)
        diff = sorted(k for k, v in now.items() if k in saved and saved[k] != v)
        if diff:
            raise ValueError(
                "the checkpoint belongs to another job; differing settings: "
                + ", ".join(f"{k} (checkpoint {saved[k]!r}, now {now[k]!r})" for k in diff)
            )
        mismatch = checkpoint_mismatch(self.master, tensors)
        if mismatch:
            raise ValueError(mismatch)
        with self.lock:
            for name in self.master:
                key = f"master/{name}"
                if key not in tensors:
                    raise ValueError(f"checkpoint lacks {key}")
                self.master[name].copy_(tensors[key])
            factors = group_head_factors(
                {
                    HEAD_PREFIX + k[len("factors/") :] if k.startswith("factors/") else k: v
                    for k, v in tensors.items()
                }
            )  # checkpoints before the protocol module named factors "factors/<head>/<layer>/<B|A>"
            self.prev_factors.clear()
            for h, layers in factors.items():
                self.prev_factors[h] = {
                    k: (b.to(self.device), a.to(self.device)) for k, (b, a) in layers.items()
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
            elapsed = float(state.get("elapsed_s", 0.0))  # an old server's wall-clock value may be < 0
            self._elapsed_before = elapsed if math.isfinite(elapsed) and elapsed > 0 else 0.0
            self._started_mono = self.clock()
            self.done = bool(state.get("done", False))
            self._ended_mono = self._started_mono if self.done else None
            self._rounds_at_start = self.progress()[0]
            self.snapshots.invalidate()
            self._master_norms = tensor_norms(self.master) if self.guard.settings.on else {}
            self.changed.notify_all()

    def _poke_checkpointer(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.poke()

    def begin_stop(self) -> None:
        """The server is stopping (Ctrl+C, SIGTERM, the job's end): from now on the heads freed by
        workers leaving are not logged as waiting (the dashboard still shows them)."""
        with self.lock:
            self.stopping = True

    def stop_background(self) -> None:
        """Stop and join the background threads: an evaluation in progress is cancelled at its next
        batch (its DataLoader processes end with it), a checkpoint being written is finished."""
        self.checkpoint_health.stop()
        if self._evaluation is not None:
            self._evaluation.cancel()
        for task in (self._evaluator, self._checkpointer):
            if task is not None:
                task.stop()
        if self._evaluation is not None:
            self._evaluation.cancel(False)  # evaluate_now() on the stopped coordinator still works

    def plain_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return {k: v.detach().clone().cpu().contiguous() for k, v in self.master.items()}

    def export(self, path: str | Path) -> Path:
        """The merged model as ``lte.common.export.export_model`` writes it (lte-sim writes the same).

        Raises ValueError when the master holds NaN or Inf (nothing is written)."""
        path = Path(path)
        state = self.plain_state()
        if not all_master_finite(state):
            raise ValueError(f"not exporting {path}: the master weights hold NaN or Inf")
        return export_model(path, state, self.job, self.dataset, version=self.version)

    def progress(self) -> tuple[int, int]:
        """(head-rounds done, head-rounds planned): the job's progress in one unit everywhere."""
        with self.lock:
            done = sum(min(h.next_round - h.pending, self.rounds_planned) for h in self.heads.values())
            return done, self.job.heads * self.rounds_planned

    def status(self) -> dict[str, Any]:
        """A consistent snapshot of the job for the dashboard and the CLI (no tensors)."""
        now = self.clock()
        with self.lock:
            done, planned = self.progress()
            return {
                "job": resolved_job(self.job),  # effective values, not placeholders
                "model": self.model_summary,
                "version": self.version,
                "done": self.done,
                "samples": self.samples,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "head_rounds_applied": self.head_rounds_applied,
                "target_head_rounds": planned,
                "head_rounds_done": done,
                "rounds_planned": self.rounds_planned,
                "elapsed_s": round(self.elapsed_s(), 3),
                "eta_s": None if (eta := self.eta_s()) is None else round(eta, 1),
                "pushes_refused": self.pushes_refused,
                "checkpoint_warning": self.checkpoint_health.warning,
                "snapshot_builds": self.snapshot_builds,
                "pulls_turned_away": self.pulls_turned_away,
                "heads_moved": self.heads_moved,
                "late_pushes_refused": self.late_pushes_refused,
                "guard": self.guard.status(),
                "eval_error": self.eval_error,
                "heads": [
                    {
                        "head_id": h.head_id,
                        "rounds_done": h.next_round - h.pending,
                        "steps_done": h.steps_done,
                        "worker_id": self.leases[h.lease_id].worker_id if h.lease_id in self.leases else None,
                        "waiting": self.waiting.get(h.head_id),
                    }
                    for h in self.heads.values()
                ],
                "workers": [
                    {
                        "worker_id": l.worker_id,
                        "name": l.worker.get("name", ""),
                        "device": l.worker.get("device", ""),
                        "heads": list(l.head_ids),
                        "room": l.room,
                        "last_seen_s": round(now - l.last_seen, 3),
                        "staleness": max(0, self.version - l.version) if l.version >= 0 else None,
                        "samples_per_s": l.samples_per_s,
                        "samples": l.samples,
                        "pushes": l.pushes,
                        "bytes_up": l.bytes_up,
                        "bytes_down": l.bytes_down,
                        "state": "failed" if l.failure else l.state,
                        "failure": l.failure,
                        "train_loss": l.last_loss,
                    }
                    for l in self.leases.values()
                ],
                "free_heads": [h.head_id for h in self.heads.values() if h.lease_id is None],
                "waiting_heads": {str(h): why for h, why in sorted(self.waiting.items())},
                "history": list(self.history[-500:]),
                "evals": list(self.evals),
            }

    def close(self) -> None:
        self.stop_background()
        if self._metrics_file:
            self._metrics_file.close()
            self._metrics_file = None


def _effective(job: Mapping[str, Any]) -> dict[str, Any]:
    """Job settings with placeholders resolved, as lists where the TOML and JSON have lists.

    A checkpoint of an older server holds ``patch_size = 0`` and ``warmup_steps = -1`` where a run's
    config.toml (and a server now) holds the values they stand for: both sides compare resolved.
    """
    from lte.common.models import VIT_PRESETS, default_patch_size

    out: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in job.items()}
    if out.get("warmup_steps", -1) == -1 and "steps" in out:
        out["warmup_steps"] = max(1, int(out["steps"]) // 20)  # JobConfig.warmup's rule
    is_vit = str(out.get("model", "")).lower().replace("_", "-") in VIT_PRESETS
    if is_vit and not out.get("patch_size") and out.get("image_size"):
        out["patch_size"] = default_patch_size(int(out["image_size"]))  # the zoo's rule, as built
    return out


def transposed_layers(model: nn.Module, layer_names: list[str]) -> frozenset[str]:
    """LTE layers whose factors travel as ``(A^T, B^T)`` (transformers' ``Conv1D``, master ``[in, out]``)."""
    cls = conv1d_class()
    if cls is None:
        return frozenset()
    modules = dict(model.named_modules())
    return frozenset(n for n in layer_names if isinstance(modules.get(n.rpartition(".")[0]), cls))
