"""The lease table: which worker holds which head, since when, and the head scheduler's plan
applied to it (docs/design.md, "Leases and the head scheduler").

``scheduler.plan`` decides (a pure function of the table and ``now``); ``LeaseTable.schedule``
applies the plan: it expires silent leases, marks stragglers, takes heads back and hands free heads
out. A lease that ends (left, expired, quarantined) gives its heads back and its unmerged pushes are
taken out of the round by ``on_release`` (the ``Coordinator``'s, which owns the round).

Not thread-safe on its own: the ``Coordinator`` calls every method under its lock and passes its
condition ``changed``, notified when a lease or a head changes hands.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lte.common.wire.failure import LeaseState
from lte.common.wire.protocol import Refusal, Refused
from lte.server import scheduler
from lte.server.scheduler import HeadState, Lease, Policy, RoundTimes

_log = logging.getLogger("lte.server")

# rounds per head whose pusher is kept: a retry repeats a worker's last push of the head, and a head
# moves on by at most a few rounds before that worker hears of it
COUNTED_KEPT = 8


def worker_identity(worker: Mapping[str, Any]) -> tuple[str, str]:
    """Who a worker is, for a quarantine that outlives its lease: (the host the server saw the
    registration come from, the worker's name). The peer host alone would also shut out the honest
    workers of the same machine; the name alone (``--name``, default ``hostname:pid``) the honest
    workers of another machine that picked the same one. Not an authentication: every worker holds
    the same token, so a box that changes its name or address is a new worker (RELIABILITY.md)."""
    return str(worker.get("peer_host") or ""), str(worker.get("name") or "")


class LeaseTable:
    """The heads (``heads``: head id -> ``HeadState``) and the leases (``leases``: lease id ->
    ``Lease``, in registration order; ended leases are kept, at most ``max_ended_leases`` of them,
    so a late push gets a precise "expired" or "given back")."""

    max_ended_leases = 1_000

    def __init__(
        self,
        heads: int,
        policy: Policy,
        clock: Callable[[], float],
        changed: threading.Condition,
        on_release: Callable[[str], None],
    ) -> None:
        self.policy, self.clock, self.changed, self.on_release = policy, clock, changed, on_release
        self.heads = {h: HeadState(h, free_since=clock()) for h in range(heads)}
        self.leases: dict[str, Lease] = {}
        self.round_times = RoundTimes()  # a head's round, pull to push: the stragglers' yardstick
        self.waiting: dict[int, str] = {}  # heads not training now, and why (log and dashboard)
        self.stopping = False  # the server is stopping: waits go to the dashboard only, not the log
        self.registrations = 0
        self.heads_moved = 0  # heads taken from stragglers or moved to balance the load
        self.late_pushes_refused = 0  # pushes of heads moved away from their worker meanwhile
        # worker_identity -> why it was quarantined: such a worker may not register again in this job
        self.quarantined: dict[tuple[str, str], str] = {}

    def add(self, worker: Mapping[str, Any], room: int) -> Lease:
        """A new lease for ``worker`` (its registration fields) with room for ``room`` heads; the
        scheduler runs at once (it may get heads now, or stand by for them)."""
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
        self.schedule(now)
        return lease

    def get(self, lease_id: str) -> Lease:
        """The live lease ``lease_id``, touched (``last_seen`` = now); ``Refused`` with the precise
        reason for an unknown, expired, quarantined or ended one."""
        lease = self.leases.get(lease_id)
        if lease is None:
            raise Refused(Refusal.UNKNOWN_LEASE, f"unknown lease {lease_id[:12]!r}: register again")
        if lease.state == LeaseState.EXPIRED:
            raise Refused(
                Refusal.LEASE_EXPIRED,
                f"lease {lease_id[:12]!r} expired after {self.policy.lease_timeout_s:g} s without a "
                "heartbeat; its heads went back to the pool: register again",
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

    def heads_of(self, lease: Lease) -> list[HeadState]:
        """Copies of the heads ``lease`` holds, in its order."""
        return [HeadState(**vars(self.heads[h])) for h in lease.head_ids]

    def all_left(self) -> bool:
        return not any(lease.live for lease in self.leases.values())

    def schedule(self, now: float) -> list[str]:
        """Apply the scheduler's plan at ``now``; the leases it expired."""
        plan = scheduler.plan(self.heads, self.leases, now, self.policy, self.round_times.median)
        for lease_id in plan.expire:
            self.release(self.leases[lease_id], LeaseState.EXPIRED)
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
            self._log_waits(plan.waiting)
            self.waiting = plan.waiting
        if plan:
            self.changed.notify_all()
        return plan.expire

    def _log_waits(self, waiting: dict[int, str]) -> None:
        """One line per reason, only for heads whose reason changed; none while the server stops
        (workers leaving a stopping server are not news, and the resume line must stay the last)."""
        news: dict[str, list[int]] = {}
        for h, why in sorted(waiting.items()):
            if self.waiting.get(h) != why:
                news.setdefault(why, []).append(h)
        if not self.stopping:
            for why, ids in news.items():
                _log.info("heads %s wait: %s", ids, why)

    def release(self, lease: Lease, state: LeaseState) -> None:
        """End ``lease`` in ``state``: its unmerged pushes leave the round (``on_release``), its heads
        go back to the pool (an ended lease keeps its head ids: what it held, for the dashboard)."""
        self.on_release(lease.lease_id)
        lease.state = state
        now = self.clock()
        for h in lease.head_ids:
            head = self.heads[h]
            if head.lease_id == lease.lease_id:
                head.lease_id = None
                head.free_since = now
                head.returned += state == LeaseState.EXPIRED
        lease.epoch += 1
        ended = [l.lease_id for l in self.leases.values() if not l.live]
        for lease_id in ended[: max(0, len(ended) - self.max_ended_leases)]:  # the oldest first
            del self.leases[lease_id]
        self.changed.notify_all()

    def quarantine(self, lease_id: str, problem: str) -> Lease | None:
        """End ``lease_id`` as quarantined for ``problem`` (its pushes broke a merge or were outliers
        too often); the lease, None when it is no longer in the table."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return None
        lease.failure = problem
        self.quarantined[worker_identity(lease.worker)] = problem
        if lease.live:
            self.release(lease, LeaseState.QUARANTINED)
        return lease

    def check_not_quarantined(self, worker: Mapping[str, Any]) -> None:
        """A registration of a worker quarantined earlier in this job (``worker_identity``) is refused
        (``QUARANTINED``), logged in one line: a quarantine holds for the job, not for one lease."""
        identity = worker_identity(worker)
        problem = self.quarantined.get(identity)
        if problem is None:
            return
        host, name = identity
        _log.warning(
            "refused worker %s from %s: it was quarantined in this job (%s)", name, host or "?", problem
        )
        raise Refused(
            Refusal.QUARANTINED,
            f"worker {name!r} from {host or '?'} was quarantined in this job ({problem}); it may not rejoin it",
        )

    def check_holds(self, lease: Lease, head_ids: Iterable[int]) -> None:
        """Each head is ``lease``'s now: one it held before was moved away (``HEAD_MOVED``), one it
        never held is not its business (``HEAD_NOT_LEASED``)."""
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

    def advance(
        self, head_ids: Iterable[int], steps: int, now: float, waits: bool, pusher: tuple[str, int] = ("", 0)
    ) -> None:
        """A push of ``head_ids`` arrived: their round counts and steps move on, their round time is
        measured; ``waits``: their round is pending (a refused round waits only in sync mode).
        ``pusher``: the push's ``(lease id, push id)``, kept per round counted (the last
        ``COUNTED_KEPT``), so that only that lease's retry of it is a duplicate (``push_check.is_retry``)."""
        for h in head_ids:
            head = self.heads[h]
            self.round_times.add(now - head.waiting_since)
            head.counted_by[head.next_round] = pusher
            head.counted_by.pop(head.next_round - COUNTED_KEPT, None)
            head.next_round += 1
            head.steps_done += steps
            head.pending = waits
            head.waiting_since = now

    def rewind(self, head_ids: Iterable[int], steps: int) -> None:
        """Undo ``advance`` for a push taken back out of the round (its lease ended before the merge):
        the heads' next holder restarts that round from the last merged factors."""
        for h in head_ids:
            head = self.heads[h]
            head.next_round -= 1
            head.counted_by.pop(head.next_round, None)  # the round is the next holder's to push
            head.steps_done -= steps
            head.pending = False

    def merged(self, head_ids: Iterable[int], now: float, sync: bool) -> None:
        """The round of ``head_ids`` was merged: the server now waits for their next round (in sync
        mode, for every head's: the round closed for all)."""
        for h in head_ids:
            self.heads[h].pending = False
            self.heads[h].waiting_since = now
        if sync:
            for head in self.heads.values():
                head.waiting_since = now

    def head_rounds_done(self) -> int:
        """Head-rounds merged or refused so far, each head counted up to the planned rounds."""
        planned = self.policy.rounds_planned
        return sum(min(h.next_round - h.pending, planned) for h in self.heads.values())

    def all_pushed(self) -> bool:
        """Every head has pushed its last planned round (merged or still pending)."""
        return all(h.next_round >= self.policy.rounds_planned for h in self.heads.values())

    def none_pending(self) -> bool:
        return all(not h.pending for h in self.heads.values())
