"""Head leases and the head scheduler: a pure function of (state, now) (DESIGN.md section 5).

``plan(heads, leases, now, policy)`` reads the heads and leases and returns what should change;
``Coordinator`` applies it under its lock. Nothing here reads a clock, takes a lock or touches a
tensor, so every rule is tested on a fake clock (tests/test_scheduler.py). The rules:

1. A lease silent for longer than ``lease_timeout_s`` expires; its heads return to the pool.
2. A head whose worker is alive but makes no progress (the server has waited for its push more
   than ``straggler_factor`` x the median round time, and at least ``straggler_floor_s``) is a
   straggler's: it is revoked when another live worker could take it. A head whose push already
   sits in the open round is never revoked.
3. Every free, unfinished head goes to a live worker at once: first one that trained it before,
   then the one with the most free room. When no worker has room for ``turn_grace_s``, the least
   loaded live worker takes it as an extra *turn* (it trains its heads ``room`` at a time), so a
   job never stalls while one live worker remains.
4. Heads a worker trains in turns move to a worker with free room when one appears; in async and
   buffered modes a worker whose heads have all finished takes the most-behind head of a worker
   that holds several.
5. A head has finished when it has trained its planned rounds (``rounds_planned``); finished heads
   are never assigned, and the job ends when every head has finished.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENDED = ("left", "expired", "failed", "quarantined")  # states of a lease that holds nothing any more


@dataclass
class HeadState:
    head_id: int
    lease_id: str | None = None
    next_round: int = 0  # rounds merged (or accepted into the open round): the id its next push carries
    steps_done: int = 0  # local steps merged so far (the data position of a resumed or moved head)
    returned: int = 0  # times it came back to the pool from a lost lease
    moved: int = 0  # times it was taken from a straggler or moved to balance the load
    waiting_since: float = 0.0  # when the server began waiting for this head's next push
    free_since: float = 0.0  # when it last became free (turns wait a grace period for a worker with room)
    pending: bool = False  # its push sits in the open round (sync) or the buffer


@dataclass
class Lease:
    lease_id: str
    worker_id: str
    worker: dict[str, Any]
    head_ids: list[int]
    registered_at: float
    last_seen: float
    room: int = 1  # heads it trains at once (its --max-heads, capped by the server's per-worker cap)
    epoch: int = 0  # bumped on every change of head_ids: the worker adopts the new set
    version: int = -1
    state: str = "registered"
    pushes: int = 0
    samples: int = 0
    samples_per_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    last_loss: float = float("nan")
    failure: str = ""  # why the worker could not train this lease (it gave the lease back)
    held_before: set[int] = field(default_factory=set)  # every head it ever held: a late push is "moved"
    straggler: bool = False  # its heads were taken for want of progress: it gets none until it pushes again
    outliers_in_row: int = 0  # pushes the update guard refused or clipped since its last clean one

    @property
    def live(self) -> bool:
        return self.state not in ENDED


@dataclass(frozen=True)
class Policy:
    rounds_planned: int  # rounds each head trains (ceil(steps / T))
    lease_timeout_s: float
    straggler_factor: float = 4.0  # k; 0 turns straggler detection off
    straggler_floor_s: float = 5.0  # never call a head a straggler's sooner than this
    turn_grace_s: float = 5.0  # a free head waits this long for a worker with room before it goes to turns
    mode: str = "sync"


@dataclass
class Plan:
    expire: list[str] = field(default_factory=list)  # leases silent past the timeout
    revoke: list[tuple[str, int, str]] = field(default_factory=list)  # (lease, head, why)
    assign: list[tuple[str, int]] = field(default_factory=list)  # (lease, head)
    waiting: dict[int, str] = field(default_factory=dict)  # head -> why it is not training now
    stragglers: list[str] = field(default_factory=list)  # leases whose heads were taken as stuck

    def __bool__(self) -> bool:
        return bool(self.expire or self.revoke or self.assign)


class RoundTimes:
    """The median of recent waits for a head's push (seconds): what 'a round' takes in this job."""

    def __init__(self, window: int = 200) -> None:
        self._times: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        if seconds >= 0:
            self._times.append(seconds)

    @property
    def median(self) -> float | None:
        return statistics.median(self._times) if self._times else None


def finished(head: HeadState, policy: Policy) -> bool:
    return head.next_round >= policy.rounds_planned


def straggler_timeout(policy: Policy, median_round_s: float | None) -> float | None:
    """Seconds without a push after which a head is a straggler's; None while no round was timed."""
    if policy.straggler_factor <= 0 or median_round_s is None:
        return None
    return max(policy.straggler_factor * median_round_s, policy.straggler_floor_s)


def plan(
    heads: Mapping[int, HeadState],
    leases: Mapping[str, Lease],
    now: float,
    policy: Policy,
    median_round_s: float | None = None,
) -> Plan:
    """What the scheduler would change now. Reads its arguments only; applies nothing."""
    out = Plan()
    live = [l for l in leases.values() if l.live]
    for lease in live:
        if now - lease.last_seen > policy.lease_timeout_s:
            out.expire.append(lease.lease_id)
    gone = set(out.expire)
    live = [l for l in live if l.lease_id not in gone]
    holder = {
        h.head_id: h.lease_id if h.lease_id in {l.lease_id for l in live} else None for h in heads.values()
    }
    held: dict[str, list[int]] = {l.lease_id: [] for l in live}
    for h, lease_id in holder.items():
        if lease_id is not None and not finished(heads[h], policy):
            held[lease_id].append(h)

    def revoke(lease_id: str, h: int, why: str) -> None:
        out.revoke.append((lease_id, h, why))
        held[lease_id].remove(h)
        holder[h] = None

    def free_room(lease: Lease) -> int:
        return lease.room - len(held[lease.lease_id])

    def give(lease: Lease, h: int) -> None:
        out.assign.append((lease.lease_id, h))
        held[lease.lease_id].append(h)
        holder[h] = lease.lease_id

    def least_loaded(leases: list[Lease]) -> Lease:
        return min(leases, key=lambda l: (len(held[l.lease_id]) / max(1, l.room), l.registered_at))

    # rule 2: stragglers' heads go to another live worker at once (with room, else in turns)
    timeout = straggler_timeout(policy, median_round_s)
    stuck: set[str] = set()
    if timeout is not None:
        for lease in live:
            late = [
                h
                for h in held[lease.lease_id]
                if not heads[h].pending and now - heads[h].waiting_since > timeout
            ]
            if late and len(held[lease.lease_id]) == len(late):
                stuck.add(lease.lease_id)
    # a lease that was a straggler receives no heads until it shows progress (a push), unless it is
    # all there is: heads moved back to a worker that is still stuck would bounce between the two
    able = [l for l in live if l.lease_id not in stuck and not l.straggler]
    if not able:
        able = [l for l in live if l.lease_id not in stuck]
    for lease_id in sorted(stuck):
        if not able:
            break  # nobody to move them to: the straggler is all there is
        out.stragglers.append(lease_id)
        for h in list(held[lease_id]):
            revoke(lease_id, h, f"no push for {now - heads[h].waiting_since:.1f} s (limit {timeout:.1f} s)")
            roomy = [l for l in able if free_room(l) > 0]
            give(max(roomy, key=free_room) if roomy else least_loaded(able), h)

    # rule 4: heads in turns move to free room
    for lease in able:
        extra = len(held[lease.lease_id]) - lease.room
        movable = [h for h in sorted(held[lease.lease_id], reverse=True) if not heads[h].pending]
        for h in movable[: max(0, extra)]:
            roomy = [o for o in able if o is not lease and free_room(o) > 0]
            if roomy:
                revoke(lease.lease_id, h, "moved from turns to a worker with room")
                give(max(roomy, key=free_room), h)

    # rule 3: free heads to live workers, with room first, in turns when nobody has room
    free = sorted(
        (h for h in heads.values() if holder[h.head_id] is None and not finished(h, policy)),
        key=lambda h: (h.next_round, h.head_id),
    )
    for lease in able:  # first the heads a worker trained before: its optimiser state is theirs
        for head in free:
            if head.head_id in (lease.worker.get("preferred_heads") or ()) and free_room(lease) > 0:
                give(lease, head.head_id)
    free = [h for h in free if holder[h.head_id] is None]
    for head in free:
        if not able:
            out.waiting[head.head_id] = "no live worker holds it: waiting for a worker to join"
            continue
        roomy = [l for l in able if free_room(l) > 0]
        if roomy:
            give(max(roomy, key=free_room), head.head_id)
        elif now - head.free_since < policy.turn_grace_s:
            out.waiting[head.head_id] = (
                f"waiting up to {policy.turn_grace_s:g} s for a worker with room, then turns"
            )
        else:
            give(least_loaded(able), head.head_id)
    # rule 4, async and buffered: a worker with nothing left to train takes a behind head of a busy one
    if policy.mode != "sync":
        for idle in [l for l in able if not held[l.lease_id]]:
            candidates = [
                (heads[h].next_round, h, l.lease_id)
                for l in able
                if len(held[l.lease_id]) > 1
                for h in held[l.lease_id]
                if not heads[h].pending
            ]
            if candidates:
                _, h, owner = min(candidates)  # h is unique: the lease id never breaks a tie
                revoke(owner, h, "moved to an idle worker")
                give(idle, h)
    for lease in able:
        for h in held[lease.lease_id][lease.room :]:
            out.waiting[h] = (
                f"trained in turns by {lease.worker_id} ({len(held[lease.lease_id])} heads, room {lease.room})"
            )
    return out
