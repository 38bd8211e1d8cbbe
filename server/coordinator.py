"""The parameter server's state and its one lock: the head leases and the round. No gRPC here: a
request the server will not act on raises ``Refused`` with a domain ``Refusal``
(``lte.common.wire.protocol``), which the service maps to a status code.

The ``Coordinator`` keeps the leases (a ``LeaseTable``, ``leases``: the ``scheduler``'s plan, a pure
function of state and ``now``, applied to it) and the round: pulls wait for a version (``pulls``),
pushes are folded in (``aggregation``) and merged into W. Around it, each in its own module: the
checks of a push and of a registration (``push_check``), the update guard
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
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lte.common.core.layers import conv1d_class
from lte.common.core.policy import ModelPolicy, classify_model
from lte.common.job.config import JobConfig
from lte.common.job.export import export_model
from lte.common.job.fingerprint import model_fingerprint
from lte.common.job.model_check import model_summary
from lte.common.job.run_metadata import resolved_job
from lte.common.job.trainer import build_job_model, lr_at
from lte.common.wire.failure import REPORTED_STATES, LeaseState
from lte.common.wire.protocol import PushMeta, Refusal, Refused, decode_update
from lte.server import checkpoint_state, push_check
from lte.server.aggregation import Aggregator, all_finite, staleness_discount
from lte.server.checkpoint_state import Checkpoints
from lte.server.evaluation import Evaluations
from lte.server.failures import note_worker_failure
from lte.server.guard import (
    GuardSettings,
    UpdateGuard,
    all_master_finite,
    guarded_merge,
    round_lr_sum,
    screened_push,
)
from lte.server.leases import LeaseTable
from lte.server.metrics_log import MetricsLog, version_record
from lte.server.pulls import LongPolls, newest_snapshot
from lte.server.push_check import IncomingPush, PushCheck
from lte.server.scheduler import HeadState, Lease, Policy
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

    # A job runs for days: per-version records (all of them are in metrics.jsonl) are bounded in
    # memory, as ended leases are (``LeaseTable.max_ended_leases``).
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
        self.model, self.policy = master_model(job, device)
        self.master: dict[str, torch.Tensor] = dict(self.model.state_dict())  # W: the model's own tensors
        self.layer_names = self.policy.head_names
        self.replica_names = self.policy.uplink_names
        self.heads_per_worker = heads_per_worker or job.heads
        self.model_summary = model_summary(self.policy, job, self.heads_per_worker)  # for the dashboard
        self.resolved_job = resolved_job(job)  # effective values, not placeholders (the dashboard)
        self.lease_timeout_s, self.heartbeat_interval_s = lease_timeout_s, heartbeat_interval_s
        self.schedule = Policy.for_server(
            job.rounds, job.mode, lease_timeout_s, heartbeat_interval_s, straggler_factor, turn_grace_s
        )
        self.eval_every = eval_every
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified on a new version, a lease change, the end
        self.version = 0
        self.aggregator = Aggregator(job, self.master, max_staleness=max_staleness, buffer_size=buffer_size)
        self.lease_table = LeaseTable(job.heads, self.schedule, clock, self.changed, self._drop_pending)
        self.heads, self.leases = self.lease_table.heads, self.lease_table.leases  # the same dicts
        self.head_rounds_applied = 0
        self.samples = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.done = False
        self.timer = JobTimer(clock)
        self.history: list[dict[str, Any]] = []
        self.pushes_refused = 0
        self.long_polls = LongPolls(self.changed, lambda: (self.version, self.done))
        self.push_log: deque[dict[str, Any]] = deque(maxlen=10_000)  # accepted pushes: staleness and weight
        self.snapshots = SnapshotBuilder(job, self.layer_names)
        self.guard = UpdateGuard(
            guard or GuardSettings(), job, transposed=transposed_layers(self.model, self.layer_names)
        )
        self.guard.remember_master(self.master)
        # (fingerprint, module tree): sent with each registration; a worker of wire protocol 4 or later
        # sends its own with every pull and push, checked by ``check_model``
        self.fingerprint = model_fingerprint(job)
        self.models_refused = 0  # leases ended because the worker's model was not the server's
        self._trained_replicas = frozenset(n for n, _ in self.model.named_parameters()) & set(
            self.replica_names
        )
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
            return self.lease_table.head_rounds_done(), self.job.heads * self.schedule.rounds_planned

    # -- state read by tests, benchmarks, the status document and checkpoints ----------------------
    @property
    def prev_factors(self) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        return self.aggregator.prev_factors

    @property
    def evals(self) -> list[dict[str, Any]]:
        return self.evaluations.evals

    # -- leases and the head scheduler ------------------------------------------------------------
    def register(self, worker: dict[str, Any]) -> tuple[Lease, list[HeadState]]:
        """A new lease; the scheduler gives it free heads (maybe none yet: it stands by for them).
        ``Refused``: the worker's protocol cannot train the job (INCOMPATIBLE), it was quarantined
        earlier in this job (QUARANTINED, ``LeaseTable.check_not_quarantined``), the job is over."""
        room = min(int(worker.get("max_heads") or 0) or self.heads_per_worker, self.heads_per_worker)
        push_check.check_handshake(self.job, worker)
        with self.lock:
            self.lease_table.check_not_quarantined(worker)  # told so even after the job's end
            if self.done:
                raise Refused(Refusal.JOB_DONE, "the job has finished; nothing left to train")
            lease = self.lease_table.add(worker, room)
            return lease, self.lease_table.heads_of(lease)

    def lease(self, lease_id: str) -> Lease:
        """The live lease ``lease_id`` (touched), or a precise refusal (``LeaseTable.get``)."""
        with self.lock:
            return self.lease_table.get(lease_id)

    def heartbeat(self, lease_id: str, version: int, samples_per_s: float, state: str) -> tuple[int, bool]:
        with self.lock:
            lease = self.lease(lease_id)
            lease.version, lease.samples_per_s = version, samples_per_s
            if state in REPORTED_STATES:  # only a worker's own activity (REPORTED_STATES says why)
                lease.state = LeaseState(state)
            self.lease_table.schedule(lease.last_seen)
            return self.version, self.done

    def leave(self, lease_id: str, reason: str = "") -> None:
        """Give a lease back. A reason starting with "failed:" marks the worker failed (log and dashboard)."""
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is None or not lease.live:
                return
            self.lease_table.release(lease, LeaseState.LEFT)
            note_worker_failure(lease, reason)
            self.lease_table.schedule(self.clock())

    def run_scheduler(self) -> list[str]:
        """Run the scheduler now: expire silent leases, move stragglers' heads, hand out free heads.
        Returns the leases that expired."""
        with self.lock:
            return self.lease_table.schedule(self.clock())

    def _drop_pending(self, lease_id: str) -> None:
        """Take a gone lease's unmerged pushes back out of the round, so its heads restart it cleanly.

        The head's next holder continues from the last merged factors; keeping a dead worker's
        half-round would leave the new holder's B', A' out of step with the server's.
        """
        for a in self.aggregator.drop(lease_id):
            self.samples -= a.samples
            self.lease_table.rewind([u.head_id for u in a.heads] + a.skipped, a.steps)

    def wait_for_workers_to_leave(self, timeout_s: float) -> bool:
        """After the job: block until every live lease has left (they see "done" on their next
        heartbeat or pull), or the timeout; whether they all did."""
        with self.changed:
            return self.changed.wait_for(self.lease_table.all_left, timeout_s)

    def lease_view(self, lease_id: str) -> tuple[Lease, list[HeadState], dict[int, bool]]:
        """The lease, copies of its heads, and which of them the server holds merged factors for."""
        with self.lock:
            lease = self.lease_table.get(lease_id)
            has_factors = {h: h in self.prev_factors for h in lease.head_ids}
            return lease, self.lease_table.heads_of(lease), has_factors

    # -- pulls ---------------------------------------------------------------------------------
    def check_model(self, lease: Lease, fingerprint: str, tree: str = "") -> None:
        """The version handshake's model check, before a pull or a push touches anything: a worker
        of wire protocol 4 or later must send the fingerprint of the model it built, equal to the
        server's (``push_check.model_refusal``). Else its lease ends (failed, its heads back to the
        pool), one line is logged naming the worker and what differs, and ``Refused(MODEL_DIFFERS)``."""
        why = push_check.model_refusal(lease.worker, self.fingerprint, fingerprint, tree, self.job.model)
        if why is None:
            return
        with self.lock:
            if lease.live:
                lease.failure = f"its model is not the server's: {why}"
                self.lease_table.release(lease, LeaseState.FAILED)
                self.lease_table.schedule(self.clock())
                self.models_refused += 1
                _log.warning(
                    "refused worker %s (%s) on %s: %s",
                    lease.worker_id,
                    lease.worker.get("name", ""),
                    lease.worker.get("hostname", "") or lease.worker.get("peer", ""),
                    lease.failure,
                )
        raise Refused(Refusal.MODEL_DIFFERS, f"this worker's model is not the server's: {why}")

    def begin_pull(
        self, lease_id: str, head_factors: Sequence[int] = (), model: tuple[str, str] = ("", "")
    ) -> tuple[Lease, list]:
        """The live lease of a pull and the last merged factors of ``head_factors`` (heads it holds),
        so a moved head continues exactly; ``Refused`` for another lease's or an unknown head, or a
        worker whose ``model`` (fingerprint, tree: ``check_model``) is not the server's."""
        lease, _, _ = self.lease_view(lease_id)
        self.check_model(lease, *model)
        if not head_factors:
            return lease, []
        with self.lock:
            self.push_check.check_head_ids(head_factors)
            other = [h for h in head_factors if h not in lease.head_ids]
            if other:
                raise Refused(Refusal.HEAD_NOT_LEASED, f"head {other[0]} is not leased to this worker")
            wanted = self.aggregator.merged_factors(head_factors)
        return lease, self.snapshots.factor_messages(wanted)

    def wait_for_version(
        self,
        have_version: int,
        timeout_s: float,
        lease: Lease | None = None,
        epoch: int = -1,
        slots: threading.BoundedSemaphore | None = None,
    ) -> tuple[int, bool, bool]:
        """The long-poll: (version, done, turned_away) once the version passes ``have_version``
        (``LongPolls.wait``)."""
        return self.long_polls.wait(have_version, timeout_s, lease, epoch, slots)

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
        """The newest snapshot for a worker holding ``have_version`` (``pulls.newest_snapshot``)."""
        return newest_snapshot(self.snapshot_messages, self.snapshots, have_version, delta, head_factors)

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
            self.check_model(self.lease_table.get(header.lease_id), header.model_fingerprint)
            return self.push_check.begin(header, self.lease_table, self.version)

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
            pusher = (lease.lease_id, header.push_id)
            if push_check.is_retry(header.head_rounds, self.heads, pusher, self.guard.refused_rounds):
                return self._reply(False, 0, 0.0)
            self.lease_table.check_holds(lease, header.head_rounds)
            push_check.check_rounds(header.head_rounds, rounds, self.schedule.rounds_planned)
            staleness = self.version - header.base_version
            try:
                weight = self.aggregator.weight(staleness, self.version, header.base_version)
            except Refused:
                self.pushes_refused += 1
                raise
            lr_sums = {h: round_lr_sum(self.job, self.heads[h].steps_done) for h in header.head_rounds}
            verdict, refuse, outlier = self.guard.judge(
                lease, heads, replica.deltas, self.prev_factors, lr_sums, self._trained_replicas, self.version
            )
            if outlier is not None:
                self.records.write(outlier)
            now = self.clock()
            lr_start = min(lr_at(self.heads[h].steps_done, self.job) for h in header.head_rounds)
            self.lease_table.advance(
                header.head_rounds,
                header.steps,
                now,
                waits=not refuse or self.job.mode == "sync",
                pusher=pusher,
            )
            push = screened_push(lease.lease_id, header, heads, replica, weight, lr_start, verdict, refuse)
            ready = (not refuse or self.job.mode == "sync") and self.aggregator.add(push)
            log = {"worker_id": lease.worker_id, "base_version": header.base_version, "staleness": staleness}
            self.push_log.append({**log, "weight": weight})
            lease.pushed(header.samples, header.seconds, header.train_loss)
            if not refuse:
                self.samples += header.samples
            # the last pushes of a job merge even when a buffer is not full
            if ready or self.lease_table.all_pushed():
                if self.aggregator.pending:
                    self._merge_pending()
                elif self.lease_table.none_pending():
                    self.done = True  # the last round was refused: nothing left to merge
                    self.changed.notify_all()
            if lease.outliers_in_row >= self.guard.settings.quarantine_after:
                self._quarantine(lease.lease_id, f"{lease.outliers_in_row} outlier pushes in a row")
            self.lease_table.schedule(now)
            if refuse:
                raise self.guard.refusal(header.head_rounds, verdict, pusher)
            return self._reply(True, staleness, weight)

    def _reply(self, applied: bool, staleness: int, weight: float) -> dict[str, Any]:
        """A push's reply (``PushReply``'s fields): not applied is a retried push (a duplicate)."""
        return {
            "applied": applied,
            "duplicate": not applied,
            "version": self.version,
            "staleness": staleness,
            "weight": weight,
            "done": self.done,
        }

    def _quarantine(self, lease_id: str, problem: str) -> None:
        lease = self.lease_table.quarantine(lease_id, problem)
        if lease is not None:
            name, heads = lease.worker.get("name", ""), list(lease.head_ids)
            self.records.write(
                self.guard.note_quarantine(lease.worker_id, name, heads, problem, self.version)
            )

    def _merge_pending(self) -> None:
        now = self.clock()
        accepted, self.aggregator.pending = self.aggregator.pending, []
        merged_heads = [u.head_id for a in accepted for u in a.heads] + [
            h for a in accepted for h in a.skipped
        ]
        merged = guarded_merge(self.aggregator, accepted, self.guard, self._quarantine)
        self.lease_table.merged(merged_heads, now, sync=self.job.mode == "sync")
        self.version += 1
        self.head_rounds_applied += merged.heads
        totals = {"samples": self.samples, "head_rounds": self.head_rounds_applied}
        totals.update(bytes_up=self.bytes_up, bytes_down=self.bytes_down)
        record = version_record(self.version, round(self.elapsed_s(), 3), merged, totals)
        self.history.append(record)
        if len(self.history) > 2 * self.max_history:  # trimmed in batches: amortised O(1) per version
            del self.history[: -self.max_history]
        self.records.write(record)
        if self.lease_table.all_pushed() and self.lease_table.none_pending():
            self.done = True
            self.timer.end()
        if self.eval_every and self.version % self.eval_every == 0 and not self.done:
            self.evaluations.poke()
        if self.checkpoints.every and self.version % self.checkpoints.every == 0:
            self.checkpoints.poke()
        self.changed.notify_all()

    # -- evaluation, checkpoints, export, status: each in its own module -------------------------
    def _load_master(self, model: nn.Module) -> tuple[int, int]:
        with self.lock:
            model.load_state_dict(self.master)  # a copy: training goes on meanwhile
            return self.version, self.samples

    def evaluate_now(self) -> dict[str, Any]:
        """Evaluate the master now (``Evaluations.evaluate_now``)."""
        return self.evaluations.evaluate_now()

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
            self.lease_table.stopping = True

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


def master_model(job: JobConfig, device: str) -> tuple[nn.Module, ModelPolicy]:
    """The server's model (a plain zoo or user model, frozen: its tensors are W) and the workers'
    state policy, classified before freezing: what a push carries."""
    model = build_job_model(job).to(device)
    policy = classify_model(model, embeddings=job.embedding_heads)
    model.requires_grad_(False)
    return model, policy


def transposed_layers(model: nn.Module, layer_names: list[str]) -> frozenset[str]:
    """LTE layers whose factors travel as ``(A^T, B^T)`` (transformers' ``Conv1D``, master ``[in, out]``)."""
    cls = conv1d_class()
    if cls is None:
        return frozenset()
    modules = dict(model.named_modules())
    return frozenset(n for n in layer_names if isinstance(modules.get(n.rpartition(".")[0]), cls))
