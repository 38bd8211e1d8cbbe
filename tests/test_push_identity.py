"""Which push a "duplicate" reply answers: only the very push the server counted (the same lease and
``push_id``), retried after its reply was lost. Found by a review of the head-move fix (d51159d):

- a worker trained round r of a head and had not pushed it; the head moved to another worker,
  which trained and merged round r; the head moved back. The stale push of round r was answered
  "duplicate" (its round id was below the server's), the worker took its own factors for the
  merged ones, and its next push silently replaced the other worker's round in W;
- a worker's push was applied but the reply lost; the round merged and one of its heads moved away
  before the retry, which was refused as "head moved": the worker took its own applied round for
  one trained elsewhere and rebuilt its other heads (their optimiser state lost).

Each test drives real ``Worker`` objects against a real in-process server, step by step, and moves
heads as the scheduler's revoke and assign do, so the interleaving happens on every run."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from lte.common.core.model_state import lte_layers
from lte.common.wire.protocol import PushMeta, Refusal, Refused
from lte.server import push_check
from lte.server.coordinator import Coordinator
from lte.server.grpc_server import ParameterServer
from lte.server.leases import COUNTED_KEPT, LeaseTable
from lte.server.scheduler import HeadState, Lease, Policy
from lte.worker.client import Worker
from lte.worker.turns import Turn
from tests.cluster import DIGITS, digits_job, move_heads
from tests.faults import FakeClock


def test_only_the_push_that_counted_a_round_is_its_retry():
    heads = {
        0: HeadState(0, next_round=3, counted_by={1: ("L1", 6), 2: ("L1", 7)}),
        1: HeadState(1, next_round=1),
    }
    assert push_check.is_retry({0: 2}, heads, ("L1", 7), {})
    assert push_check.is_retry({0: 1}, heads, ("L1", 6), {})  # an older push of the same lease
    assert not push_check.is_retry({0: 2}, heads, ("L1", 8), {})  # another push of that lease
    assert not push_check.is_retry({0: 2}, heads, ("L2", 7), {})  # another lease's
    assert not push_check.is_retry({0: 3}, heads, ("L1", 7), {})  # the round the server waits for
    assert not push_check.is_retry({0: 0}, heads, ("L1", 7), {})  # a round whose pusher is not kept
    assert not push_check.is_retry({0: 2, 1: 0}, heads, ("L1", 7), {})  # every head must be counted by it
    with pytest.raises(Refused) as refused:  # the update guard refused that round: the same answer again
        push_check.is_retry({0: 2}, heads, ("L1", 7), {0: (2, ("L1", 7))})
    assert refused.value.reason is Refusal.OUTLIER
    # the guard refused another lease's push of that round (since taken back): this one is a retry
    assert push_check.is_retry({0: 2}, heads, ("L1", 7), {0: (2, ("L0", 3))})


def test_the_lease_table_keeps_each_rounds_pusher_and_forgets_a_round_taken_back():
    policy = Policy(rounds_planned=100, lease_timeout_s=60.0)
    table = LeaseTable(1, policy, lambda: 0.0, threading.Condition(), lambda lease_id: None)
    for r in range(COUNTED_KEPT + 3):
        table.advance([0], 10, 0.0, waits=False, pusher=("L1", r + 1))
    head = table.heads[0]
    assert head.next_round == COUNTED_KEPT + 3
    assert sorted(head.counted_by) == list(range(3, COUNTED_KEPT + 3))  # the last COUNTED_KEPT rounds
    assert head.counted_by[COUNTED_KEPT + 2] == ("L1", COUNTED_KEPT + 3)
    table.rewind([0], 10)  # the lease ended before its round merged: the next holder pushes it
    assert head.next_round == COUNTED_KEPT + 2 and COUNTED_KEPT + 2 not in head.counted_by


def _workers(c: Coordinator, server: ParameterServer) -> tuple[Worker, Worker]:
    a = Worker(server.address, quiet=True, show_progress=False, name="a")
    b = Worker(server.address, quiet=True, show_progress=False, name="b")
    a.register()
    b.register()
    return a, b


def _train_and_push(worker: Worker) -> None:
    for turn in list(worker.turns):
        if turn in worker.turns:  # a push may regroup the turns
            reply = worker._push_turn(turn, turn.trainer.train_round())
            assert reply is not None and reply.applied, reply


def _out_of_step(worker: Worker, c: Coordinator) -> float:
    """The largest difference between the worker's last merged factors (B', A') of its heads and the
    server's: 0 when they are in step."""
    worst = 0.0
    for turn in worker.turns:
        for local, h in enumerate(turn.head_ids):
            for name, layer in lte_layers(turn.trainer.model).items():
                b, a = c.prev_factors[h][name]
                worst = max(
                    worst,
                    float((layer.lora_B_prev[local].float().cpu() - b.float().cpu()).abs().max()),
                    float((layer.lora_A_prev[local].float().cpu() - a.float().cpu()).abs().max()),
                )
    return worst


def _leave(*workers: Worker) -> None:
    for w in workers:
        w.stop.set()
        w.leave()


@pytest.mark.server
@pytest.mark.parametrize("mode,heads", [("async", 1), ("sync", 2)])  # (buffered: the retry test below)
def test_a_stale_push_of_a_round_merged_from_another_workers_push_is_refused_not_a_duplicate(mode, heads):
    job = digits_job(heads=heads, steps=200, merge_every=10, mode=mode)
    c = Coordinator(job, DIGITS, heads_per_worker=heads, straggler_factor=0, lease_timeout_s=600)
    with ParameterServer(c, host="127.0.0.1", port=0) as server:
        a, b = _workers(c, server)
        try:
            assert a.head_ids == list(range(heads)) and b.head_ids == []
            _train_and_push(a)  # round 0
            a.pull(wait_s=0.0)
            stale: Turn = a.turns[0]
            stats = stale.trainer.train_round()  # round 1, not pushed yet: the worker is stuck
            move_heads(c, list(range(heads)), a.lease_id, b.lease_id)
            b._sync_lease(force=True)
            _train_and_push(b)  # round 1, trained and merged by the other worker
            assert {h: c.heads[h].next_round for h in range(heads)} == dict.fromkeys(range(heads), 2)
            move_heads(c, list(range(heads)), b.lease_id, a.lease_id)
            b._sync_lease(force=True)
            merged = {h: c.prev_factors[h] for h in range(heads)}

            reply = a._push_turn(stale, stats)  # the stuck worker wakes up and pushes round 1

            assert reply is None, "a stale push was answered as if it had been applied"
            assert stale not in a.turns  # dropped, rebuilt from the server's factors
            assert a.next_rounds == dict.fromkeys(range(heads), 2)
            assert {h: c.prev_factors[h] for h in range(heads)} == merged  # nothing of it reached W
            assert _out_of_step(a, c) == 0.0
            _train_and_push(a)  # round 2 goes on from the other worker's round 1
            assert {h: c.heads[h].next_round for h in range(heads)} == dict.fromkeys(range(heads), 3)
        finally:
            _leave(a, b)


class _ReplyLost(grpc.RpcError):
    """The connection reset after the server applied the push: the worker never hears its reply."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset (the test's, after the server applied the push)"

    def trailing_metadata(self) -> tuple:
        return ()


class _LoseFirstPushReply:
    """The worker's stub, whose first ``PushUpdate`` reaches the server and is applied; then ``meanwhile``
    runs (a head moves) and the reply is lost."""

    def __init__(self, real, meanwhile) -> None:
        self.real, self.meanwhile = real, meanwhile

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def PushUpdate(self, *args, **kwargs):
        reply = self.real.PushUpdate(*args, **kwargs)
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
            raise _ReplyLost()
        return reply


@pytest.mark.server
@pytest.mark.parametrize("mode", ["sync", "buffered", "async"])
def test_a_retried_push_whose_reply_was_lost_is_acknowledged_after_one_of_its_heads_moved_away(mode):
    job = digits_job(heads=3, steps=200, merge_every=10, mode=mode)
    extra = {"buffer_size": 2} if mode == "buffered" else {}
    c = Coordinator(job, DIGITS, heads_per_worker=2, straggler_factor=0, lease_timeout_s=600, **extra)
    with ParameterServer(c, host="127.0.0.1", port=0) as server:
        a, b = _workers(c, server)
        try:
            assert a.head_ids == [0, 1] and b.head_ids == [2]
            _train_and_push(a)  # round 0
            _train_and_push(b)
            a.pull(wait_s=0.0)
            b.pull(wait_s=0.0)
            per_head_round = job.merge_every * job.batch_size
            assert c.samples == 3 * per_head_round
            turn: Turn = a.turns[0]
            stats = turn.trainer.train_round()  # round 1 of heads 0 and 1

            def meanwhile() -> (
                None
            ):  # the round merges, then head 1 moves (the scheduler moves no pending head)
                _train_and_push(b)  # head 2's round 1: the sync round closes, the buffer fills
                assert not c.aggregator.pending
                move_heads(c, [1], a.lease_id, b.lease_id)

            a.stub = _LoseFirstPushReply(a.stub, meanwhile)

            reply = a._push_turn(turn, stats)

            assert reply is not None and reply.duplicate and not reply.applied, reply
            assert turn in a.turns and a.next_rounds == {0: 2, 1: 2}  # kept, as pushed
            assert {h: c.heads[h].next_round for h in range(3)} == {0: 2, 1: 2, 2: 2}  # counted once
            assert c.samples == 6 * per_head_round and c.version == (4 if mode == "async" else 2)
            a._sync_lease()
            assert a.head_ids == [0] and turn in a.turns  # head 1 left; head 0's state carries over
            a.pull(wait_s=0.0)
            assert _out_of_step(a, c) == 0.0  # its B', A' are the round the server merged
        finally:
            _leave(a, b)


@pytest.mark.rogue
@pytest.mark.parametrize("end", ["leave", "expire", "quarantine"])
def test_a_round_refused_by_the_guard_and_taken_back_does_not_refuse_the_next_holders_retry(end):
    """Sync mode: a refused push waits in the open round; when its lease ends the round is taken back
    and the head's next holder pushes it. A retry of that honest push (its reply lost) used to be
    refused as the outlier's, and the worker rolled back a round the server had merged."""
    clock = FakeClock()
    c = Coordinator(
        digits_job(heads=2, mode="sync"), None, lease_timeout_s=30, heartbeat_interval_s=1, clock=clock
    )
    rogue, _ = c.register({"name": "rogue", "max_heads": 1, "peer_host": "h1"})
    other, _ = c.register({"name": "other", "max_heads": 1, "peer_host": "h2"})
    push_ids = iter(range(1, 1000))

    def push(lease: Lease, value: float) -> tuple[PushMeta, dict[str, torch.Tensor]]:
        rounds = {h: c.heads[h].next_round for h in lease.head_ids}
        meta = PushMeta(lease.lease_id, c.version, rounds, 10, 160, 1.0, 0.1, push_id=next(push_ids))
        return meta, {n: torch.full(s, value) for n, s in c.expected_tensors(list(rounds)).items()}

    head = rogue.head_ids[0]
    refusals = c.guard.settings.quarantine_after if end == "quarantine" else 1
    for i in range(refusals):
        with pytest.raises(Refused) as refused:
            c.apply_push(*push(rogue, 1e3))
        assert refused.value.reason is Refusal.OUTLIER
        if i < refusals - 1:
            c.apply_push(*push(other, 0.0))  # the other head's round: the sync round closes
    if end == "leave":
        c.leave(rogue.lease_id)
    elif end == "expire":
        clock.advance(20)
        c.heartbeat(other.lease_id, c.version, 0.0, "waiting")
        clock.advance(11)  # the rogue's lease is 31 s silent, the other's 11 s
        c.run_scheduler()
    assert not rogue.live and other.live
    assert c.heads[head].next_round == refusals - 1  # the refused round was taken back
    if c.heads[head].lease_id is None:
        c.register({"name": "honest", "max_heads": 1, "peer_host": "h3"})
    holder = c.leases[c.heads[head].lease_id]  # the head's next holder: a new worker, or the other
    assert holder is not rogue and head in holder.head_ids
    meta, tensors = push(holder, 0.0)
    assert c.apply_push(meta, tensors)["applied"]
    again = c.apply_push(meta, tensors)  # its reply was lost: the retry
    assert again["duplicate"] and not again["applied"]
