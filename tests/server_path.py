"""Sync LTE jobs run through the parameter server's push path in one process, no network: each
simulated worker is a ``LocalTrainer`` over the heads its lease holds, and every push goes through
``Coordinator.begin_push``, ``IncomingPush.check_tensor`` and ``Coordinator.apply_push`` as the gRPC service calls
them. Cheap enough to run every zoo model, and bit for bit equal to ``lte-sim`` with an fp32 uplink."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch

from lte.common.job.config import JobConfig
from lte.common.job.trainer import LocalTrainer, make_snapshot
from lte.common.wire.codec import decode_tensor
from lte.common.wire.protocol import PROTOCOL_VERSION, PushMeta, Refused, encode_update
from lte.server.coordinator import Coordinator
from lte.server.guard import GuardSettings


def run_through_server(
    job: JobConfig,
    dataset,
    *,
    workers: int = 2,
    guard: GuardSettings | None = None,
    corrupt: Callable[[int, int, list], list] | None = None,
    on_refused: Callable[[int, Exception], None] | None = None,
) -> Coordinator:
    """Run ``job`` to its end through a ``Coordinator``; returns it (its master, guard counts).

    ``corrupt(worker, round, heads)`` may replace what a worker sends; a refused push is handed to
    ``on_refused(worker, exc)`` and the worker rolls its heads back as ``lte-worker`` does."""
    c = Coordinator(
        job, None, heads_per_worker=job.heads // workers, straggler_factor=0, guard=guard, clock=lambda: 0.0
    )  # a stopped clock: no lease expires, no head moves
    crew = [_join(c, job, dataset, f"w{i}") for i in range(workers)]
    for r in range(job.rounds):
        with c.lock:
            snapshot = make_snapshot(c.master, c.layer_names, job.quant)
            version = c.version
        for i, (lease, t) in enumerate(crew):
            if not lease.live:
                continue
            t.load_snapshot(snapshot)
            stats = t.train_round()
            heads, replica = t.export_update()
            if corrupt is not None:
                heads = corrupt(i, r, heads)
            tensors = {e.name: decode_tensor(e).float() for e in encode_update(heads, replica, job)}
            rounds = {h: c.heads[h].next_round for h in t.head_ids}  # an honest worker's ids agree
            meta = PushMeta(lease.lease_id, version, rounds, stats.steps, stats.samples, stats.train_loss,
                            1.0, len(tensors), c.fingerprint[0])  # fmt: skip
            try:
                push = c.begin_push(meta)
                for name, tensor in tensors.items():
                    push.check_tensor(name, tensor, job.uplink)
                c.apply_push(meta, tensors, push)
                _round_to_wire(t, job)
                t.commit()
            except Refused as exc:
                if on_refused is None:
                    raise
                on_refused(i, exc)
                t.discard_round()
        if any(h.lease_id is None for h in c.heads.values()) and not c.done:
            crew.append(_join(c, job, dataset, f"w{len(crew)}"))  # a quarantined worker's heads: a new one
    return c


def _join(c: Coordinator, job: JobConfig, dataset, name: str) -> tuple:
    """Register a worker; its trainer continues each head it gets from the server's merged factors."""
    lease, heads = c.register(
        {
            "name": name,
            "max_heads": c.heads_per_worker,
            "protocol_version": PROTOCOL_VERSION,
            "job_fields": [f.name for f in fields(JobConfig)],
        }
    )
    t = LocalTrainer(
        job,
        list(lease.head_ids),
        dataset,
        steps_done=[h.steps_done for h in heads],
        wire_rounded=job.uplink != "fp32",
    )
    for i, h in enumerate(lease.head_ids):
        if h in c.prev_factors:
            t.load_head(i, c.prev_factors[h])
    return lease, t


def _round_to_wire(trainer: LocalTrainer, job: JobConfig) -> None:
    """What ``lte-worker`` does before it commits: its live factors become what the server holds."""
    if job.uplink == "fp32":
        return
    from lte.common.core.model_state import lte_layers
    from lte.common.wire.codec import get_codec

    codec = get_codec(job.uplink)
    with torch.no_grad():
        for layer in lte_layers(trainer.model).values():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(codec.decode(codec.encode(p.detach().float()), tuple(p.shape)).to(p.dtype))
