"""A fleet that changes under a running job, with real worker processes on loopback: a worker leaves,
freezes (SIGSTOP), or runs 3x slower. The scheduler's rules themselves are pinned on a fake clock in
test_scheduler.py; here the whole path (server, gRPC, worker turns and lease changes) carries them."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch

from lte.commands.sim import run_lte
from lte.common.data.datasets import load_dataset
from lte.common.job.config import JobConfig
from tests.cluster import DIGITS, digits_job, running_server, worker_processes
from tests.faults import wait_for, wait_until

pytestmark = [pytest.mark.process, pytest.mark.server]  # tier: see tests/conftest.py

TIMEOUT_S = 240


def lease_of(c, proc):
    """The newest lease of a worker process (by pid)."""
    with c.lock:
        leases = [l for l in c.leases.values() if l.worker.get("pid") == proc.pid]
        return leases[-1] if leases else None


def test_a_worker_leaving_mid_round_its_heads_go_to_the_one_left_and_the_sync_job_finishes(tmp_path):
    job = digits_job(heads=4, steps=100)  # 10 sync rounds
    heartbeat = 0.5
    # turns after 15 s: long enough to look at the moment after A left, short enough for the test
    with running_server(job, heartbeat_interval_s=heartbeat, turn_grace_s=15.0) as server:
        c = server.coordinator
        with worker_processes(server.address, [["--quiet", "--max-heads", "3"]], log_dir=tmp_path) as (a,):
            wait_until(
                lambda: (l := lease_of(c, a)) and sorted(l.head_ids)[:3] == [0, 1, 2], 120, "A's lease"
            )
            (tmp_path / "b").mkdir()
            with worker_processes(
                server.address, [["--quiet", "--max-heads", "2"]], log_dir=tmp_path / "b"
            ) as (b,):
                wait_until(lambda: (l := lease_of(c, b)) and l.head_ids == [3], 120, "B to take head 3")
                wait_for(c, lambda c: c.version >= 4, TIMEOUT_S, "version 4")
                lease_a, lease_b = lease_of(c, a), lease_of(c, b)
                os.kill(a.pid, signal.SIGINT)  # Ctrl+C on A, mid-job
                # A's Leave ran the scheduler: B, with room for one more, holds a freed head already.
                # Looked at as soon as the lease is given back, not after A's process has exited: its
                # interpreter shutdown alone took 5-10 s on the loaded 2-core machine, and B's turns
                # start turn_grace_s after the Leave
                wait_until(lambda: lease_a.state == "left", 60, "A's lease to be given back")
                with c.lock:
                    assert len(lease_b.head_ids) == 2 and set(lease_b.head_ids) & {0, 1, 2}
                    waiting = dict(c.lease_table.waiting)
                assert len(waiting) == 2, waiting  # the other two wait for room, then B's turns
                assert a.wait(timeout=60) == 130
                assert server.wait_done(timeout=TIMEOUT_S), "the job stalled after A left"
                assert b.wait(timeout=60) == 0
        assert sorted(lease_b.head_ids) == [0, 1, 2, 3]  # trained in turns of 2 at the end
        assert c.version == job.rounds and {h.steps_done for h in c.heads.values()} == {job.steps}
        assert c.evaluate_now()["test_accuracy"] >= 0.85


def test_a_frozen_worker_s_heads_move_and_its_late_push_is_refused_after_sigcont(tmp_path):
    job = digits_job(heads=4, steps=200)
    with running_server(
        job, heartbeat_interval_s=0.5, lease_timeout_s=120.0, straggler_factor=3.0, turn_grace_s=2.0
    ) as server:
        c = server.coordinator
        slow = ["--quiet", "--max-heads", "2", "--delay-push", "1.0"]  # A holds every push back a second
        with worker_processes(server.address, [slow, ["--quiet", "--max-heads", "2"]], log_dir=tmp_path) as (
            a,
            b,
        ):
            wait_for(c, lambda c: c.version >= 3, TIMEOUT_S, "version 3")

            def a_is_between_training_and_pushing() -> bool:
                la, lb = lease_of(c, a), lease_of(c, b)
                with c.lock:
                    pushed = {u.head_id for p in c.aggregator.pending for u in p.heads}
                    return bool(la.head_ids) and set(lb.head_ids) <= pushed and not set(la.head_ids) & pushed

            wait_until(a_is_between_training_and_pushing, TIMEOUT_S, "B's push in, A's not yet")
            frozen_heads = sorted(lease_of(c, a).head_ids)
            os.kill(a.pid, signal.SIGSTOP)
            try:
                wait_for(
                    c,
                    lambda c: (
                        not lease_of(c, a).head_ids and set(frozen_heads) <= set(lease_of(c, b).head_ids)
                    ),
                    60,
                    "the frozen worker's heads to move to B",
                )
                assert lease_of(c, a).state != "expired"  # alive by its lease, only stuck
                version_at_move = c.version
            finally:
                os.kill(a.pid, signal.SIGCONT)
            wait_for(c, lambda c: c.lease_table.late_pushes_refused >= 1, 60, "A's late push to be refused")
            assert server.wait_done(timeout=TIMEOUT_S)
            assert a.wait(timeout=60) == 0 and b.wait(timeout=60) == 0
    assert c.lease_table.heads_moved >= len(frozen_heads) and c.version > version_at_move
    assert {h.steps_done for h in c.heads.values()} == {job.steps}
    assert c.evaluate_now()["test_accuracy"] >= 0.85


def test_async_with_a_3x_slower_worker_every_head_trains_exactly_its_steps_and_none_past_its_schedule(
    tmp_path,
):
    # Fashion-MNIST: its 10,000 test images resolve 0.01 points (digits' 359 resolve 0.28)
    data = load_dataset("fashion-mnist", seed=0)
    base = {"model": "mlp", "dataset": "fashion-mnist", "heads": 4, "rank": 16, "alpha": 64.0, "lr": 1e-2}
    base.update(steps=200, merge_every=10, batch_size=32, seed=0)
    sync_job = JobConfig(**base).with_dataset(data)
    with running_server(sync_job, data) as server:
        with worker_processes(server.address, [["--quiet", "--max-heads", "2"]] * 2, log_dir=tmp_path):
            assert server.wait_done(timeout=TIMEOUT_S)
        sync_accuracy = server.coordinator.evaluate_now()["test_accuracy"]

    job = dataclasses.replace(sync_job, mode="async")
    metrics = tmp_path / "metrics.jsonl"
    (tmp_path / "async").mkdir()
    with running_server(job, data, max_staleness=50, metrics_path=metrics) as server:
        c = server.coordinator
        args = [["--quiet", "--max-heads", "2"], ["--quiet", "--max-heads", "2", "--slow-factor", "3"]]
        with worker_processes(server.address, args, log_dir=tmp_path / "async") as procs:
            assert server.wait_done(timeout=TIMEOUT_S)
            assert [p.wait(timeout=60) for p in procs] == [0, 0]
        accuracy = c.evaluate_now()["test_accuracy"]
    assert {h.steps_done for h in c.heads.values()} == {job.steps}  # exactly --steps, every head
    assert {h.next_round for h in c.heads.values()} == {job.rounds}
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rounds = [r for r in records if "lr" in r]
    assert sum(r["heads"] for r in rounds) == job.heads * job.rounds
    assert min(r["lr"] for r in rounds) > 0  # no round started past its head's cosine schedule
    print(
        f"\nasync, one worker 3x slower: accuracy {accuracy:.4f} vs sync {sync_accuracy:.4f}; "
        f"{c.lease_table.heads_moved} head moves"
    )
    assert abs(accuracy - sync_accuracy) <= 0.01


@pytest.mark.parametrize("room", [1, 2])
def test_one_worker_with_room_for_fewer_heads_trains_them_in_turns_exactly_as_the_emulator(tmp_path, room):
    job = digits_job(heads=4, steps=30, uplink="fp32", quant="none")
    expected = run_lte(job, DIGITS, workers=4 // room).master  # each turn is one emulated worker
    threads = ["--threads", str(torch.get_num_threads())]  # GEMMs sum in per-thread blocks
    with running_server(job, turn_grace_s=0.0, straggler_factor=0.0) as server:
        args = [["--quiet", "--max-heads", str(room), *threads]]
        with worker_processes(server.address, args, log_dir=tmp_path):
            assert server.wait_done(timeout=TIMEOUT_S)
        got = server.coordinator.plain_state()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
