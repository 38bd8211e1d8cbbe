"""The parameter server's state and its one lock: the head leases and the round. No gRPC here: a
request the server will not act on raises ``Refused`` with a domain ``Refusal``
(``lte.common.wire.protocol``), which the service maps to a status code.

The ``Coordinator`` keeps the leases (``scheduler``: a pure function of state and ``now``, applied
here) and the round: pulls wait for a version, pushes are folded in (``aggregation``) and merged
into W. Around it, each in its own module: the checks of a push (``push_check``), the update guard
(``guard``), snapshots (``snapshots``), evaluations (``evaluation``), checkpoints
(``checkpoint_state``), the metrics records (``metrics_log``) and the status document
(``status``). Time comes from ``clock`` (``time.monotonic`` unless a test passes a fake one).
Decoding and validation of a push happen before the lock is taken; snapshot encoding and
evaluation happen outside it.

The gRPC service calls six methods for one pull and one push: ``begin_pull``,
``wait_for_version``, ``pull_snapshot``, ``count_sent``, ``begin_push`` and ``apply_push``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lte.common.core.layers import conv1d_class
from lte.common.core.policy import classify_model
from lte.common.job.config import JobConfig
from lte.common.job.export import export_model
from lte.common.job.fingerprint import model_fingerprint
from lte.common.job.model_check import model_summary
from lte.common.job.run_metadata import resolved_job
from lte.common.job.trainer import build_job_model, lr_at
from lte.common.wire.failure import REPORTED_STATES, LeaseState
from lte.common.wire.protocol import PushMeta, Refusal, Refused, decode_update, handshake_refusal
from lte.server import checkpoint_state, push_check, scheduler
from lte.server.aggregation import AcceptedPush, Aggregator, all_finite, staleness_discount
from lte.server.checkpoint_state import Checkpoints
from lte.server.evaluation import Evaluations
from lte.server.failures import note_worker_failure
from lte.server.guard import GuardSettings, UpdateGuard, Verdict, all_master_finite, guarded_merge
from lte.server.metrics_log import MetricsLog
from lte.server.push_check import IncomingPush, PushCheck
from lte.server.scheduler import HeadState, Lease, Policy, RoundTimes
from lte.server.snapshots import SNAPSHOT_ZSTD_LEVEL, Snapshot, SnapshotBuilder, master_for_snapshot
from lte.server.status import read_status

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

_log = logging.getLogger("lte.server")


class Coordinator:
    """The job on the server side: it leases heads to workers and folds their pushes into W."""

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
        self.resolved_job = resolved_job(job)  # effective values, not placeholders (the dashboard)
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
        self.timer = JobTimer(clock)
        self.history: list[dict[str, Any]] = []
        self.pushes_refused = 0
        self.pulls_turned_away = 0  # long-polls answered at once: no handler thread to spare
        self.heads_moved = 0  # heads taken from stragglers or moved to balance the load
        self.late_pushes_refused = 0  # pushes of heads moved away from their worker meanwhile
        self.push_log: deque[dict[str, Any]] = deque(maxlen=10_000)  # accepted pushes: staleness and weight
        self.snapshots = SnapshotBuilder(job, self.layer_names)
        self.guard = UpdateGuard(
            guard or GuardSettings(), job, transposed=transposed_layers(self.model, self.layer_names)
        )
        self.guard.remember_master(self.master)
        self.fingerprint = model_fingerprint(job)  # (fingerprint, module tree): sent with each registration
        self._trained_replicas = frozenset(n for n, _ in self.model.named_parameters()) & set(
            self.replica_names
        )
        self._refused_rounds: dict[int, int] = {}  # head -> its round the guard refused (a retried push)
        self.push_check = PushCheck(job, self.master, self.layer_names, self.replica_names)
        self.checkpoints = Checkpoints(self, checkpoint_dir, checkpoint_every, keep_checkpoints)
        self.checkpoint_health = self.checkpoints.health
        self.records = MetricsLog(metrics_path, on_error=self.checkpoint_health.metrics_failed)
        self.evaluations = Evaluations(
            job,
            dataset,
            device,
            lock=self.lock,
            load=self._load_master,
            version=lambda: self.version,
            elapsed_s=self.elapsed_s,
            log=self.records.write,
        )

    def elapsed_s(self) -> float:
        """Seconds the job has run (across resumes), by the monotonic clock; it stops at the job's end."""
        return self.timer.elapsed_s()

    def eta_s(self) -> float | None:
        """Seconds left at the head-round rate measured by this process (``JobTimer.eta_s``)."""
        done, planned = self.progress()
        return self.timer.eta_s(done, planned, self.done)

    def progress(self) -> tuple[int, int]:
        """(head-rounds done, head-rounds planned): the job's progress in one unit everywhere."""
        with self.lock:
            done = sum(min(h.next_round - h.pending, self.rounds_planned) for h in self.heads.values())
            return done, self.job.heads * self.rounds_planned

    # -- state read by tests, benchmarks, the status document and checkpoints ----------------------
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

    @property
    def evals(self) -> list[dict[str, Any]]:
        return self.evaluations.evals

    @property
    def eval_loader_workers(self) -> int:
        """DataLoader processes of a streamed evaluation (lte-server --loader-workers)."""
        return self.evaluations.loader_workers

    @eval_loader_workers.setter
    def eval_loader_workers(self, n: int) -> None:
        self.evaluations.loader_workers = n

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
        if lease.state == LeaseState.EXPIRED:
            raise Refused(
                Refusal.LEASE_EXPIRED,
                f"lease {lease_id[:12]!r} expired after {self.lease_timeout_s:g} s without a heartbeat; "
                "its heads went back to the pool: register again",
            )
        if lease.state == LeaseState.QUARANTINED:
            raise Refused(
                Refusal.QUARANTINED,
                f"worker {lease.worker_id} is quarantined: a push of it broke a merge ({lease.failure})",
            )
        if lease.state in (LeaseState.LEFT, LeaseState.FAILED):
            raise Refused(Refusal.LEASE_ENDED, f"lease {lease_id[:12]!r} was given back: register again")
        lease.last_seen = self.clock()
        return lease

    def heartbeat(self, lease_id: str, version: int, samples_per_s: float, state: str) -> tuple[int, bool]:
        with self.lock:
            lease = self.lease(lease_id)
            lease.version, lease.samples_per_s = version, samples_per_s
            if state in REPORTED_STATES:  # only a worker's own activity (REPORTED_STATES says why)
                lease.state = LeaseState(state)
            self._schedule(lease.last_seen)
            return self.version, self.done

    def leave(self, lease_id: str, reason: str = "") -> None:
        """Give a lease back. A reason starting with "failed:" marks the worker failed (log and dashboard)."""
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is None or not lease.live:
                return
            self._release(lease, LeaseState.LEFT)
            note_worker_failure(lease, reason)
            self._schedule(self.clock())

    def run_scheduler(self) -> list[str]:
        """Run the scheduler now: expire silent leases, move stragglers' heads, hand out free heads.
        Returns the leases that expired."""
        with self.lock:
            return self._schedule(self.clock())

    def _schedule(self, now: float) -> list[str]:
        """Apply the scheduler's plan (under the lock); returns the leases it expired."""
        plan = scheduler.plan(self.heads, self.leases, now, self.schedule, self.round_times.median)
        for lease_id in plan.expire:
            self._release(self.leases[lease_id], LeaseState.EXPIRED)
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

    def _release(self, lease: Lease, state: LeaseState) -> None:
        self._drop_pending(lease.lease_id)
        lease.state = state
        now = self.clock()
        for h in lease.head_ids:
            head = self.heads[h]
            if head.lease_id == lease.lease_id:
                head.lease_id = None
                head.free_since = now
                head.returned += state == LeaseState.EXPIRED
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
    def begin_pull(self, lease_id: str, head_factors: Sequence[int] = ()) -> tuple[Lease, list]:
        """The live lease of a pull and the last merged factors of ``head_factors`` (heads it holds),
        so a moved head continues exactly; ``Refused`` for another lease's or an unknown head."""
        lease, _, _ = self.lease_view(lease_id)
        if not head_factors:
            return lease, []
        with self.lock:
            self.push_check.check_head_ids(head_factors)
            wanted = {}
            for h in head_factors:
                if h not in lease.head_ids:
                    raise Refused(Refusal.HEAD_NOT_LEASED, f"head {h} is not leased to this worker")
                wanted[h] = {k: (b.clone(), a.clone()) for k, (b, a) in self.prev_factors.get(h, {}).items()}
        return lease, self.snapshots.factor_messages(wanted)

    def wait_for_version(
        self,
        have_version: int,
        timeout_s: float,
        lease: Lease | None = None,
        epoch: int = -1,
        slots: threading.BoundedSemaphore | None = None,
    ) -> tuple[int, bool, bool]:
        """Block until the version passes ``have_version``, the job ends, ``lease``'s epoch differs
        from ``epoch`` (when given), or the timeout; (version, done, turned_away).

        A wait takes one of ``slots`` (when given and ``timeout_s > 0``) while it blocks; with none
        free it returns at once, turned away (counted in ``pulls_turned_away``)."""
        slot = slots if timeout_s > 0 else None
        if slot is not None and not slot.acquire(blocking=False):
            with self.lock:
                self.pulls_turned_away += 1
                return self.version, self.done, True
        try:
            deadline = time.monotonic() + max(0.0, timeout_s)
            with self.changed:
                while self.version <= have_version and not self.done:
                    if lease is not None and epoch >= 0 and lease.epoch != epoch:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.changed.wait(left)
                return self.version, self.done, False
        finally:
            if slot is not None:
                slot.release()

    def snapshot_messages(self) -> Snapshot:
        """(version, chunk messages, payload bytes) of a snapshot at least as new as the version at
        the call, built once per version (``SnapshotBuilder``)."""

        def version_now() -> int:
            with self.lock:
                return self.version

        def copy_master() -> tuple[int, dict[str, torch.Tensor]]:
            with self.lock:  # a memcpy under the lock; quantised and compressed outside it
                return self.version, master_for_snapshot(self.master, self.layer_names, self.policy.ties)

        return self.snapshots.get(version_now, copy_master)

    def pull_snapshot(
        self, have_version: int, delta: bool, head_factors: Sequence[int] = ()
    ) -> tuple[int, list, int, int, int]:
        """(version, chunk messages, payload bytes, delta base, stream id) of the newest snapshot for a
        worker holding ``have_version``: nothing when it is current, the delta from ``have_version``
        when ``delta`` and one can be built (``SnapshotBuilder.delta``), else the full snapshot (delta
        base -1). The stream id names the chunk sequence (with the moved heads' factors
        ``head_factors``), so that a pull broken after some chunks resumes it
        (``SnapshotBuilder.stream_id``)."""
        version, messages, payload = self.snapshot_messages()
        delta_base = -1
        if version <= have_version:
            return version, [], 0, delta_base, 0
        if delta and have_version >= 0:
            found = self.snapshots.delta(version, have_version)
            if found is not None:
                messages, payload, delta_base = found[0], found[1], have_version
        return (
            version,
            messages,
            payload,
            delta_base,
            self.snapshots.stream_id(version, delta_base, head_factors),
        )

    def count_sent(self, lease: Lease, nbytes: int, version: int) -> None:
        with self.lock:
            self.bytes_down += nbytes
            lease.bytes_down += nbytes
            lease.version = version

    # -- pushes --------------------------------------------------------------------------------
    def expected_tensors(self, head_ids: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Wire name -> shape of every tensor a push of ``head_ids`` carries (``PushCheck``)."""
        return self.push_check.expected_tensors(head_ids)

    def begin_push(self, header: PushMeta) -> IncomingPush:
        """Cheap checks before any tensor is read: lease, heads, version bounds (``push_check``).
        The push to read: what it must carry and may weigh; ``Refused`` otherwise."""
        with self.lock:
            lease = self.lease(header.lease_id)
            if not header.head_rounds:
                raise Refused(Refusal.MALFORMED, "push names no heads")
            self.push_check.check_head_ids(header.head_rounds)
            self._check_holds(lease, header.head_rounds)
            self.push_check.check_fields(header, self.version)
            return self.push_check.incoming(lease, header)

    def _check_holds(self, lease: Lease, head_ids: Sequence[int] | dict[int, int]) -> None:
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

    def apply_push(
        self,
        header: PushMeta,
        tensors: dict[str, torch.Tensor],
        received: IncomingPush | None = None,
        nbytes: int = 0,
    ) -> dict[str, Any]:
        """Fold one validated push into the round (sync), the buffer, or W directly (async). ``received``
        (the ``begin_push`` result) and ``nbytes``: the bytes its stream carried, counted first."""
        if received is not None:
            with self.lock:
                self.bytes_up += nbytes
                received.lease.bytes_up += nbytes
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
            if push_check.is_retry(header.head_rounds, rounds, self._refused_rounds):
                return {
                    "applied": False,
                    "duplicate": True,
                    "version": self.version,
                    "staleness": 0,
                    "weight": 0.0,
                }
            self._check_holds(lease, header.head_rounds)
            push_check.check_rounds(header.head_rounds, rounds, self.rounds_planned)
            staleness = self.version - header.base_version
            try:
                weight = self.aggregator.weight(staleness, self.version, header.base_version)
            except Refused:
                self.pushes_refused += 1
                raise
            verdict, refuse = self._judge(lease, header, heads, replica)
            now = self.clock()
            lr_start = min(lr_at(self.heads[h].steps_done, self.job) for h in header.head_rounds)
            self._advance_heads(header, now, waits=not refuse or self.job.mode == "sync")
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
            lease.pushed(header.samples, header.seconds, header.train_loss)
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

    def _judge(self, lease: Lease, header: PushMeta, heads, replica) -> tuple[Verdict, bool]:
        """The update guard's verdict on a push (noted when it is an outlier) and whether it is refused."""
        verdict = self.guard.check(
            {u.head_id: u.factors for u in heads},
            self.prev_factors,
            replica.deltas,
            {h: self._round_lr_sum(self.heads[h].steps_done) for h in header.head_rounds},
            self._trained_replicas,
            self.guard.master_norms,
        )
        refuse = bool(verdict.outliers) and self.guard.settings.mode == "refuse"
        if verdict.outliers:
            name, ids = lease.worker.get("name", ""), sorted(header.head_rounds)
            self.records.write(
                self.guard.note_outlier(lease.worker_id, name, ids, verdict, refuse, self.version)
            )
            lease.outliers_in_row += 1
        else:
            self.guard.accept(verdict)
            lease.outliers_in_row = 0
        return verdict, refuse

    def _advance_heads(self, header: PushMeta, now: float, waits: bool) -> None:
        """The pushed heads' round counts and steps move on; ``waits``: their round is pending (a
        refused round waits only in sync mode)."""
        for h in header.head_rounds:
            head = self.heads[h]
            self.round_times.add(now - head.waiting_since)
            head.next_round += 1
            head.steps_done += header.steps
            head.pending = waits
            head.waiting_since = now

    def _round_lr_sum(self, steps_done: int) -> float:
        """The learning rates of a round starting at ``steps_done``, summed (the guard's step bound)."""
        return sum(
            lr_at(t, self.job) for t in range(steps_done, steps_done + self.job.round_steps(steps_done))
        )

    def _quarantine(self, lease_id: str, problem: str) -> None:
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        name = lease.worker.get("name", "")
        self.records.write(
            self.guard.note_quarantine(lease.worker_id, name, list(lease.head_ids), problem, self.version)
        )
        lease.failure = problem
        if lease.live:
            self._release(lease, LeaseState.QUARANTINED)

    def _merge_pending(self) -> None:
        now = self.clock()
        accepted, self.aggregator.pending = self.aggregator.pending, []
        merged_heads = [u.head_id for a in accepted for u in a.heads] + [
            h for a in accepted for h in a.skipped
        ]
        merged = guarded_merge(self.aggregator, accepted, self.guard, self._quarantine)
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
        self.records.write(record)
        if all(h.next_round >= self.rounds_planned and not h.pending for h in self.heads.values()):
            self.done = True
            self.timer.end()
        if self.eval_every and self.version % self.eval_every == 0 and not self.done:
            self.evaluations.poke()
        if self.checkpoints.every and self.version % self.checkpoints.every == 0:
            self.checkpoints.poke()
        self.changed.notify_all()

    # -- evaluation, checkpoints, export, status: each in its own module -------------------------
    def add_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """Also hand every metrics record (versions, evaluations, checkpoints) to ``sink(record)``."""
        self.records.add_sink(sink)

    def _load_master(self, model: nn.Module) -> tuple[int, int]:
        with self.lock:
            model.load_state_dict(self.master)  # a copy: training goes on meanwhile
            return self.version, self.samples

    def start_evaluator(self) -> None:
        """Evaluate in a background thread on a copy of W, so RPCs never wait for it."""
        self.evaluations.start()

    def evaluate_now(self) -> dict[str, Any]:
        """Evaluate the master now (``Evaluations.evaluate_now``)."""
        return self.evaluations.evaluate_now()

    def evaluation_failed(self, exc: Exception) -> str:
        """Log and record an evaluation that could not run (``Evaluations.failed``); the reason."""
        return self.evaluations.failed(exc)

    def save_checkpoint(self) -> Path | None:
        """A checkpoint of the newest version now (``Checkpoints.save``); None without a folder."""
        return self.checkpoints.save()

    def restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint of the same job (``checkpoint_state.restore``; another job is
        refused with ValueError, naming the differences)."""
        checkpoint_state.restore(self, state, tensors)

    def status(self) -> dict[str, Any]:
        """A consistent snapshot of the job for the status document (``status.read_status``)."""
        return read_status(self)

    def begin_stop(self) -> None:
        """The server is stopping (Ctrl+C, SIGTERM, the job's end): from now on the heads freed by
        workers leaving are not logged as waiting (the dashboard still shows them)."""
        with self.lock:
            self.stopping = True

    def stop_background(self) -> None:
        """Stop and join the background threads: an evaluation in progress is cancelled at its next
        batch (its DataLoader processes end with it), a checkpoint being written is finished."""
        self.checkpoints.health.stop()
        self.evaluations.stop()
        if self.checkpoints.task is not None:
            self.checkpoints.task.stop()

    def plain_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return {k: v.detach().clone().cpu().contiguous() for k, v in self.master.items()}

    def export(self, path: str | Path) -> Path:
        """The merged model as ``lte.common.job.export.export_model`` writes it (lte-sim writes the same).

        Raises ValueError when the master holds NaN or Inf (nothing is written)."""
        path = Path(path)
        state = self.plain_state()
        if not all_master_finite(state):
            raise ValueError(f"not exporting {path}: the master weights hold NaN or Inf")
        return export_model(path, state, self.job, self.dataset, version=self.version)

    def close(self) -> None:
        self.stop_background()
        self.records.close()


class JobTimer:
    """The job's elapsed time and its ETA, on the monotonic ``clock`` (a wall clock stepped back
    must not show a negative elapsed time, 0 merges/min, or reach a checkpoint); it spans resumes
    and stops at the job's end. Wall time is only a timestamp (``started_at``)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.started_at = time.time()
        self.before = 0.0  # seconds the job ran before this process (a resumed checkpoint)
        self.started = clock()
        self.ended: float | None = None  # the job's end: the elapsed clock stops there
        self.rounds_at_start = 0  # head-rounds done when this process started (for the ETA's rate)

    def elapsed_s(self) -> float:
        """Seconds the job has run (across resumes); it stops at the job's end."""
        end = self.ended if self.ended is not None else self.clock()
        return self.before + max(0.0, end - self.started)

    def end(self) -> None:
        self.ended = self.clock()

    def resume(self, elapsed_s: float, done: bool, rounds_done: int) -> None:
        """Continue a job that ran ``elapsed_s`` seconds and ``rounds_done`` head-rounds before."""
        self.before = elapsed_s
        self.started = self.clock()
        self.ended = self.started if done else None
        self.rounds_at_start = rounds_done

    def eta_s(self, done: int, planned: int, finished: bool) -> float | None:
        """Seconds left at the rate measured by this process (head-rounds done since it started, over
        the monotonic time since): ``(planned - done) / rate``. None before the first round, 0 at the end."""
        if finished or done >= planned:
            return 0.0
        ran = done - self.rounds_at_start
        if ran <= 0:
            return None
        return (planned - done) * (self.clock() - self.started) / ran


def transposed_layers(model: nn.Module, layer_names: list[str]) -> frozenset[str]:
    """LTE layers whose factors travel as ``(A^T, B^T)`` (transformers' ``Conv1D``, master ``[in, out]``)."""
    cls = conv1d_class()
    if cls is None:
        return frozenset()
    modules = dict(model.named_modules())
    return frozenset(n for n in layer_names if isinstance(modules.get(n.rpartition(".")[0]), cls))
