"""The head scheduler's rules (server/scheduler.py), on a fake clock: no network, no real waiting."""

from __future__ import annotations

import pytest
import torch

from lte.common.wire.protocol import PushMeta, Refusal, Refused
from lte.server import scheduler
from lte.server.coordinator import Coordinator
from lte.server.scheduler import HeadState, Lease, Policy
from tests.cluster import digits_job
from tests.faults import FakeClock

LEASE_S, HEARTBEAT_S = 30.0, 1.0


def coordinator(clock: FakeClock, **job) -> Coordinator:
    return Coordinator(
        digits_job(**job), None, lease_timeout_s=LEASE_S, heartbeat_interval_s=HEARTBEAT_S, clock=clock
    )


def push(c: Coordinator, lease_id: str, heads: list[int], base: int | None = None, steps: int = 10) -> dict:
    """A well-formed push of zero factors for ``heads`` at their next round ids."""
    tensors = {name: torch.zeros(shape) for name, shape in c.expected_tensors(heads).items()}
    rounds = {h: c.heads[h].next_round for h in heads}
    meta = PushMeta(lease_id, c.version if base is None else base, rounds, steps, 16 * steps, 1.0, 0.1)
    return c.apply_push(meta, tensors)


def held(c: Coordinator, lease_id: str) -> list[int]:
    return sorted(c.leases[lease_id].head_ids)


def test_a_freed_head_goes_at_once_to_a_live_worker_with_room_and_the_rest_to_turns_after_the_grace():
    clock = FakeClock()
    c = coordinator(clock, heads=4)
    a, _ = c.register({"max_heads": 3})
    b, _ = c.register({"max_heads": 2})
    assert held(c, a.lease_id) == [0, 1, 2] and held(c, b.lease_id) == [3]
    epoch = c.leases[b.lease_id].epoch
    c.leave(a.lease_id)  # Ctrl+C on A
    c.heartbeat(b.lease_id, 0, 0.0, "waiting")  # B's next heartbeat
    assert held(c, b.lease_id) == [0, 3]  # its one free slot is filled at once
    assert c.leases[b.lease_id].epoch > epoch  # and the worker is told (the epoch moved)
    assert set(c.status()["waiting_heads"]) == {"1", "2"}  # the log and dashboard say which wait
    clock.advance(LEASE_S - 1)
    c.heartbeat(b.lease_id, 0, 0.0, "waiting")
    assert held(c, b.lease_id) == [0, 3]  # still waiting for a worker with room
    clock.advance(2)
    c.heartbeat(b.lease_id, 0, 0.0, "waiting")
    assert held(c, b.lease_id) == [0, 1, 2, 3]  # no one else came: B trains them in turns
    assert "turns" in c.status()["waiting_heads"]["2"]
    for h in range(4):  # a sync round closes with one worker left
        push(c, b.lease_id, [h])
    assert c.version == 1


def test_a_new_worker_with_room_takes_heads_from_turns():
    clock = FakeClock()
    c = coordinator(clock, heads=4)
    a, _ = c.register({"max_heads": 2})
    clock.advance(LEASE_S + 1)
    c.heartbeat(a.lease_id, 0, 0.0, "training")
    assert held(c, a.lease_id) == [0, 1, 2, 3]
    b, _ = c.register({"max_heads": 2})
    assert held(c, a.lease_id) == [0, 1] and held(c, b.lease_id) == [2, 3]


def test_a_silent_lease_expires_on_the_clock_and_its_heads_go_to_a_live_worker():
    clock = FakeClock()
    c = coordinator(clock, heads=2)
    a, _ = c.register({"max_heads": 1})
    b, _ = c.register({"max_heads": 2})
    assert held(c, a.lease_id) == [0] and held(c, b.lease_id) == [1]
    clock.advance(LEASE_S / 2)
    c.heartbeat(b.lease_id, 0, 0.0, "training")
    assert c.run_scheduler() == []
    clock.advance(LEASE_S / 2 + 1)
    assert c.run_scheduler() == [a.lease_id]
    assert c.leases[a.lease_id].state == "expired" and held(c, b.lease_id) == [0, 1]
    with pytest.raises(Refused) as err:
        c.heartbeat(a.lease_id, 0, 0.0, "training")
    assert err.value.reason is Refusal.LEASE_EXPIRED


def test_a_live_but_stuck_worker_s_heads_move_and_its_late_push_is_refused_without_effect():
    clock = FakeClock()
    c = coordinator(clock, heads=2)
    a, _ = c.register({"max_heads": 1})
    b, _ = c.register({"max_heads": 1})
    for _ in range(3):  # rounds of 2 s each: the job's median round time
        clock.advance(2.0)
        push(c, a.lease_id, [0])
        push(c, b.lease_id, [1])
    assert c.version == 3
    push(c, b.lease_id, [1])  # B is on time; A hangs (its heartbeats go on)
    for _ in range(7):
        clock.advance(1.0)
        c.heartbeat(a.lease_id, 3, 0.0, "training")
    assert held(c, a.lease_id) == [0]  # 7 s: not yet past 4 x 2 s
    clock.advance(1.5)
    c.heartbeat(a.lease_id, 3, 0.0, "training")
    assert held(c, a.lease_id) == [] and held(c, b.lease_id) == [0, 1]  # moved to B's turns
    assert c.heads[0].moved == 1 and c.status()["heads_moved"] == 1
    before = {k: v.clone() for k, v in c.master.items()}
    with pytest.raises(Refused) as err:
        push(c, a.lease_id, [0], base=3)  # A wakes up and pushes its round
    assert err.value.reason is Refusal.HEAD_MOVED
    assert all(torch.equal(before[k], v) for k, v in c.master.items()) and c.heads[0].next_round == 3
    push(c, b.lease_id, [0])  # B trains head 0's round from its last merged factors
    assert c.version == 4


def test_a_straggler_keeps_its_heads_when_no_one_else_could_train_them():
    clock = FakeClock()
    c = coordinator(clock, heads=1)
    a, _ = c.register({})
    clock.advance(2.0)
    push(c, a.lease_id, [0])
    clock.advance(100.0)
    c.heartbeat(a.lease_id, 1, 0.0, "training")
    assert held(c, a.lease_id) == [0]


@pytest.mark.parametrize("mode", ["sync", "async", "buffered"])
def test_progress_is_counted_per_head_and_no_head_trains_past_its_rounds(mode):
    clock = FakeClock()
    c = coordinator(clock, heads=2, steps=35, mode=mode)  # T = 10: rounds of 10, 10, 10 and 5 steps
    assert c.schedule.rounds_planned == 4 and c.job.round_steps(30) == 5
    a, _ = c.register({"max_heads": 1})
    b, _ = c.register({"max_heads": 1})
    for r in range(4):
        steps = c.job.round_steps(10 * r)
        push(c, a.lease_id, [0], steps=steps)
        if mode != "sync":
            assert c.heads[0].next_round == r + 1
    assert not c.done
    if mode != "sync":  # the fast head is finished: one more push of it is refused
        with pytest.raises(Refused) as err:
            push(c, a.lease_id, [0])
        assert err.value.reason is Refusal.HEAD_FINISHED
        assert c.status()["heads"][0]["rounds_done"] == 4
    for r in range(4):
        push(c, b.lease_id, [1], steps=c.job.round_steps(10 * r))
    assert c.done and [h.steps_done for h in c.heads.values()] == [35, 35]
    assert c.progress() == (8, 8)


def test_in_async_mode_an_idle_worker_takes_the_most_behind_head_of_a_busy_one():
    clock = FakeClock()
    c = coordinator(clock, heads=3, steps=20, mode="async")
    a, _ = c.register({"max_heads": 2})
    b, _ = c.register({"max_heads": 1})
    assert held(c, a.lease_id) == [0, 1] and held(c, b.lease_id) == [2]
    push(c, b.lease_id, [2])
    push(c, a.lease_id, [0, 1])
    push(c, b.lease_id, [2])  # B has finished its head (2 rounds) while A holds two
    assert held(c, b.lease_id) == [0, 2] and held(c, a.lease_id) == [1]  # 2 stays on B, finished


def test_the_plan_is_a_pure_function_of_state_and_time():
    heads = {h: HeadState(h, free_since=0.0) for h in range(3)}
    leases = {"x": Lease("x", "w1", {}, [], registered_at=0.0, last_seen=9.0, room=2)}
    policy = Policy(rounds_planned=5, lease_timeout_s=10.0, turn_grace_s=10.0)
    first = scheduler.plan(heads, leases, 5.0, policy)
    assert first.assign == [("x", 0), ("x", 1)] and list(first.waiting) == [2]
    assert heads[0].lease_id is None and leases["x"].head_ids == []  # nothing was applied
    assert scheduler.plan(heads, leases, 5.0, policy) == first
    late = scheduler.plan(heads, leases, 11.0, policy)
    assert late.assign == [("x", 0), ("x", 1), ("x", 2)]
    assert scheduler.plan(heads, leases, 19.5, policy).expire == ["x"]


def test_a_stuck_worker_gets_no_heads_back_until_it_pushes_again():
    clock = FakeClock()
    c = coordinator(clock, heads=4)
    a, _ = c.register({"max_heads": 2})
    b, _ = c.register({"max_heads": 2})
    for _ in range(3):
        clock.advance(2.0)
        push(c, a.lease_id, [0, 1])
        push(c, b.lease_id, [2, 3])
    push(c, b.lease_id, [2, 3])  # B on time; A stuck from now on
    clock.advance(9.0)
    c.heartbeat(b.lease_id, 3, 0.0, "training")
    assert held(c, a.lease_id) == [] and held(c, b.lease_id) == [0, 1, 2, 3]
    for _ in range(5):  # A has room and no heads, but it is the stuck one: nothing bounces back
        clock.advance(1.0)
        c.heartbeat(a.lease_id, 3, 0.0, "training")
        c.heartbeat(b.lease_id, 3, 0.0, "training")
        assert held(c, a.lease_id) == [] and c.lease_table.heads_moved == 2
    with pytest.raises(Refused):
        push(c, a.lease_id, [0, 1], base=3)  # its late push: refused, and a sign of life
    c.heartbeat(a.lease_id, 3, 0.0, "training")
    assert len(held(c, a.lease_id)) == 2  # heads in B's turns move back to it


def test_a_stopping_server_says_nothing_more_about_waiting_heads(caplog):
    import logging

    clock = FakeClock()
    c = coordinator(clock, heads=2)
    a, _ = c.register({"max_heads": 1})
    b, _ = c.register({"max_heads": 1})
    with caplog.at_level(logging.INFO, logger="lte.server"):
        c.leave(a.lease_id)  # while the job runs, the log says which heads wait and why
        assert [r for r in caplog.records if "wait: " in r.getMessage()]
        caplog.clear()
        c.begin_stop()  # Ctrl+C: the resume command must stay the last line, not buried under waits
        c.leave(b.lease_id)
        c.run_scheduler()
    assert not [r for r in caplog.records if "wait: " in r.getMessage()]
    assert set(c.status()["waiting_heads"]) == {"0", "1"}  # the dashboard still shows them
