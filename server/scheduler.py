"""Head leases and the head scheduler: a pure function of (state, now) (docs/design.md section 5).

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

from lte.common.wire.failure import ENDED_STATES, LeaseState


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
    # round id -> (lease id, push id) of the push that counted it, the last COUNTED_KEPT rounds: a
    # retry is only a push the same lease sent (``push_check.is_retry``); not kept in checkpoints
    counted_by: dict[int, tuple[str, int]] = field(default_factory=dict)


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
    state: LeaseState = LeaseState.REGISTERED
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
        return self.state not in ENDED_STATES

    def pushed(self, samples: int, seconds: float, train_loss: float) -> None:
        """An applied push of this lease: it trains (a straggler no more) at ``samples / seconds``."""
        self.pushes += 1
        self.straggler = False
        self.state = LeaseState.TRAINING
        if seconds > 0:
            self.samples_per_s = samples / seconds
        self.samples += samples
        self.last_loss = train_loss


@dataclass(frozen=True)
class Policy:
    rounds_planned: int  # rounds each head trains (ceil(steps / T))
    lease_timeout_s: float
    straggler_factor: float = 4.0  # k; 0 turns straggler detection off
    straggler_floor_s: float = 5.0  # never call a head a straggler's sooner than this
    turn_grace_s: float = 5.0  # a free head waits this long for a worker with room before it goes to turns
    mode: str = "sync"

    @classmethod
    def for_server(
        cls,
        rounds_planned: int,
        mode: str,
        lease_timeout_s: float,
        heartbeat_interval_s: float,
        straggler_factor: float,
        turn_grace_s: float | None,
    ) -> Policy:
        """The server's policy: a straggler is never called so before two missed heartbeats' worth of
        time; a free head waits for a worker with room as long as a lease waits for a heartbeat
        (unless ``turn_grace_s`` says otherwise), then goes to turns."""
        return cls(
            rounds_planned=rounds_planned,
            lease_timeout_s=lease_timeout_s,
            straggler_factor=straggler_factor,
            straggler_floor_s=2 * heartbeat_interval_s,
            turn_grace_s=lease_timeout_s if turn_grace_s is None else turn_grace_s,
            mode=mode,
        )


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


@dataclass
class _Draft:
    """The plan being built and who holds what in it, as the rules change it."""

    out: Plan
    holder: dict[int, str | None]  # head -> live lease holding it in the draft
    held: dict[str, list[int]]  # live lease -> its unfinished heads in the draft

    def revoke(self, lease_id: str, h: int, why: str) -> None:
        self.out.revoke.append((lease_id, h, why))
        self.held[lease_id].remove(h)
        self.holder[h] = None

    def give(self, lease: Lease, h: int) -> None:
        self.out.assign.append((lease.lease_id, h))
        self.held[lease.lease_id].append(h)
        self.holder[h] = lease.lease_id

    def free_room(self, lease: Lease) -> int:
        return lease.room - len(self.held[lease.lease_id])

    def least_loaded(self, leases: list[Lease]) -> Lease:
        return min(leases, key=lambda l: (len(self.held[l.lease_id]) / max(1, l.room), l.registered_at))

    def roomiest(self, leases: list[Lease]) -> Lease | None:
        """The lease with the most free room, None when none has any."""
        roomy = [l for l in leases if self.free_room(l) > 0]
        return max(roomy, key=self.free_room) if roomy else None


def expire_silent_leases(leases: Mapping[str, Lease], now: float, policy: Policy, out: Plan) -> list[Lease]:
    """Rule 1: a live lease silent past ``lease_timeout_s`` expires. Returns the leases still live."""
    live = [l for l in leases.values() if l.live]
    for lease in live:
        if now - lease.last_seen > policy.lease_timeout_s:
            out.expire.append(lease.lease_id)
    gone = set(out.expire)
    return [l for l in live if l.lease_id not in gone]


def _draft(heads: Mapping[int, HeadState], live: list[Lease], policy: Policy, out: Plan) -> _Draft:
    live_ids = {l.lease_id for l in live}
    holder = {h.head_id: h.lease_id if h.lease_id in live_ids else None for h in heads.values()}
    held: dict[str, list[int]] = {l.lease_id: [] for l in live}
    for h, lease_id in holder.items():
        if lease_id is not None and not finished(heads[h], policy):
            held[lease_id].append(h)
    return _Draft(out, holder, held)


def stuck_leases(
    draft: _Draft, heads: Mapping[int, HeadState], live: list[Lease], now: float, timeout: float | None
) -> set[str]:
    """Rule 2's test: live leases all of whose heads have waited past ``timeout`` with no push in."""
    stuck: set[str] = set()
    if timeout is None:
        return stuck
    for lease in live:
        held = draft.held[lease.lease_id]
        late = [h for h in held if not heads[h].pending and now - heads[h].waiting_since > timeout]
        if late and len(held) == len(late):
            stuck.add(lease.lease_id)
    return stuck


def able_leases(live: list[Lease], stuck: set[str]) -> list[Lease]:
    """The leases that may receive heads: not stuck, and not a past straggler that has not pushed
    since, unless such are all there is (heads moved back to a worker that is still stuck would
    bounce between the two)."""
    able = [l for l in live if l.lease_id not in stuck and not l.straggler]
    return able or [l for l in live if l.lease_id not in stuck]


def take_from_stragglers(
    draft: _Draft,
    heads: Mapping[int, HeadState],
    stuck: set[str],
    able: list[Lease],
    now: float,
    timeout: float | None,
) -> None:
    """Rule 2: a stuck lease's heads go to another able worker at once (with room, else in turns);
    with nobody to move them to, the straggler keeps them."""
    for lease_id in sorted(stuck):
        if not able:
            break
        draft.out.stragglers.append(lease_id)
        for h in list(draft.held[lease_id]):
            draft.revoke(
                lease_id, h, f"no push for {now - heads[h].waiting_since:.1f} s (limit {timeout:.1f} s)"
            )
            draft.give(draft.roomiest(able) or draft.least_loaded(able), h)


def move_turns_to_room(draft: _Draft, heads: Mapping[int, HeadState], able: list[Lease]) -> None:
    """Rule 4: heads a worker trains in turns (beyond its room, none with a push in) move to a worker
    with free room."""
    for lease in able:
        extra = len(draft.held[lease.lease_id]) - lease.room
        movable = [h for h in sorted(draft.held[lease.lease_id], reverse=True) if not heads[h].pending]
        for h in movable[: max(0, extra)]:
            target = draft.roomiest([o for o in able if o is not lease])
            if target is not None:
                draft.revoke(lease.lease_id, h, "moved from turns to a worker with room")
                draft.give(target, h)


def assign_free_heads(
    draft: _Draft, heads: Mapping[int, HeadState], able: list[Lease], now: float, policy: Policy
) -> None:
    """Rule 3: free unfinished heads (fewest rounds first) go first to a worker that trained them
    before (its optimiser state is theirs), then to the one with the most free room; when nobody has
    room for ``turn_grace_s``, to the least loaded as a turn."""
    free = sorted(
        (h for h in heads.values() if draft.holder[h.head_id] is None and not finished(h, policy)),
        key=lambda h: (h.next_round, h.head_id),
    )
    for lease in able:
        for head in free:
            if head.head_id in (lease.worker.get("preferred_heads") or ()) and draft.free_room(lease) > 0:
                draft.give(lease, head.head_id)
    for head in [h for h in free if draft.holder[h.head_id] is None]:
        if not able:
            draft.out.waiting[head.head_id] = "no live worker holds it: waiting for a worker to join"
            continue
        target = draft.roomiest(able)
        if target is not None:
            draft.give(target, head.head_id)
        elif now - head.free_since < policy.turn_grace_s:
            draft.out.waiting[head.head_id] = (
                f"waiting up to {policy.turn_grace_s:g} s for a worker with room, then turns"
            )
        else:
            draft.give(draft.least_loaded(able), head.head_id)


def balance_idle_workers(
    draft: _Draft, heads: Mapping[int, HeadState], able: list[Lease], policy: Policy
) -> None:
    """Rule 4, async and buffered: a worker with nothing left to train takes the most-behind head
    (no push in) of a worker that holds several."""
    if policy.mode == "sync":
        return
    for idle in [l for l in able if not draft.held[l.lease_id]]:
        candidates = [
            (heads[h].next_round, h, l.lease_id)
            for l in able
            if len(draft.held[l.lease_id]) > 1
            for h in draft.held[l.lease_id]
            if not heads[h].pending
        ]
        if candidates:
            _, h, owner = min(candidates)  # h is unique: the lease id never breaks a tie
            draft.revoke(owner, h, "moved to an idle worker")
            draft.give(idle, h)


def note_turns(draft: _Draft, able: list[Lease]) -> None:
    """Why a held head beyond its lease's room is not training now: it waits for its turn."""
    for lease in able:
        held = draft.held[lease.lease_id]
        for h in held[lease.room :]:
            draft.out.waiting[h] = (
                f"trained in turns by {lease.worker_id} ({len(held)} heads, room {lease.room})"
            )


def plan(
    heads: Mapping[int, HeadState],
    leases: Mapping[str, Lease],
    now: float,
    policy: Policy,
    median_round_s: float | None = None,
) -> Plan:
    """What the scheduler would change now: the rules above, in order. Reads its arguments only;
    applies nothing."""
    out = Plan()
    live = expire_silent_leases(leases, now, policy, out)
    draft = _draft(heads, live, policy, out)
    timeout = straggler_timeout(policy, median_round_s)
    stuck = stuck_leases(draft, heads, live, now, timeout)
    able = able_leases(live, stuck)
    take_from_stragglers(draft, heads, stuck, able, now, timeout)
    move_turns_to_room(draft, heads, able)
    assign_free_heads(draft, heads, able, now, policy)
    balance_idle_workers(draft, heads, able, policy)
    note_turns(draft, able)
    return out
