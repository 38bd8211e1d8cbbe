"""What a checkpoint holds of the coordinator, and how a restarted server takes it back.

The files themselves (atomic, pickle-free folders) are ``server/checkpoint.py``; this module
decides their content: the master weights, the heads' last merged factors, the torch RNG, and
as JSON the job, each head's round and steps, the counters, the merge history and evaluations.
A checkpoint is written in a background thread (``Checkpoints.poke``) every ``every`` versions,
and by ``Checkpoints.save`` when the server stops.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lte.common.job.model_check import checkpoint_mismatch
from lte.common.wire.protocol import HEAD_PREFIX, factor_tensors, group_head_factors
from lte.server import checkpoint as ckpt
from lte.server.disk import CheckpointHealth
from lte.server.evaluation import BackgroundTask
from lte.server.guard import all_master_finite

if TYPE_CHECKING:
    from lte.server.coordinator import Coordinator

_log = logging.getLogger("lte.server")


class Checkpoints:
    """The checkpoints of ``coordinator`` in ``directory`` (None: none are written), the newest
    ``keep`` kept; ``health`` says whether the newest attempt failed and retries it."""

    def __init__(self, coordinator: Coordinator, directory: str | Path | None, every: int, keep: int) -> None:
        self.c = coordinator
        self.directory = Path(directory) if directory else None
        self.every, self.keep = every, keep
        self._lock = threading.Lock()  # one writer at a time
        self.health = CheckpointHealth(retry=self.poke)
        self.task = (
            BackgroundTask("lte-checkpoint", self.save, on_error=self.health.failed)
            if self.directory
            else None
        )

    def poke(self) -> None:
        """Ask the background writer for a checkpoint of the newest version."""
        if self.task is not None:
            self.task.poke()

    def save(self) -> Path | None:
        """Write the state that lets a restarted server continue: atomic, pickle-free (server/checkpoint.py).

        Unmerged pushes of an open round are not saved: their heads' round ids are rolled back
        with them, so workers redo that round after a restart and nothing is applied twice.
        """
        if self.directory is None:
            return None
        c = self.c
        with self._lock:
            with c.lock:
                pending_heads = {u.head_id: a.steps for a in c.aggregator.pending for u in a.heads}
                tensors = {f"master/{k}": v.detach().clone() for k, v in c.master.items()}
                tensors.update({name: t.clone() for name, t in factor_tensors(c.prev_factors).items()})
                tensors["rng/torch"] = torch.get_rng_state()
                state = {
                    "format": 1,
                    "version": c.version,
                    "job": c.job.to_dict(),
                    "heads": {
                        str(h.head_id): {
                            "next_round": h.next_round - (h.head_id in pending_heads),
                            "steps_done": h.steps_done - pending_heads.get(h.head_id, 0),
                        }
                        for h in c.heads.values()
                    },
                    "samples": c.samples - sum(a.samples for a in c.aggregator.pending),
                    "bytes_up": c.bytes_up,
                    "bytes_down": c.bytes_down,
                    "head_rounds_applied": c.head_rounds_applied,
                    "elapsed_s": c.elapsed_s(),
                    "history": c.history,
                    "evals": c.evals,
                    "done": c.done,
                    # [peer host, name, problem]: a quarantine holds for the job, across restarts
                    "quarantined": [[*identity, why] for identity, why in c.lease_table.quarantined.items()],
                }
                version = c.version
            if not all_master_finite(tensors):
                _log.error("checkpoint of version %d not written: the master weights are not finite", version)
                return None
            path = ckpt.save_checkpoint(self.directory, version, state, tensors, self.keep)
        self.health.saved(path)
        c.records.write({"checkpoint": str(path), "version": version})
        return path

    def stop(self) -> None:
        """Stop retrying; finish a checkpoint being written and join the writer."""
        self.health.stop()
        if self.task is not None:
            self.task.stop()


def restore(c: Coordinator, state: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Continue ``c`` from a checkpoint of the same job; ``ValueError`` naming the differing settings
    (another job) or the mismatching tensor."""
    difference = ckpt.job_difference(state.get("job", {}), c.job.to_dict())
    if difference:
        raise ValueError(difference)
    mismatch = checkpoint_mismatch(c.master, tensors)
    if mismatch:
        raise ValueError(mismatch)
    with c.lock:
        for name in c.master:
            key = f"master/{name}"
            if key not in tensors:
                raise ValueError(f"checkpoint lacks {key}")
            c.master[name].copy_(tensors[key])
        factors = group_head_factors(
            {
                HEAD_PREFIX + k[len("factors/") :] if k.startswith("factors/") else k: v
                for k, v in tensors.items()
            }
        )  # checkpoints before the protocol module named factors "factors/<head>/<layer>/<B|A>"
        c.prev_factors.clear()
        for h, layers in factors.items():
            c.prev_factors[h] = {k: (b.to(c.device), a.to(c.device)) for k, (b, a) in layers.items()}
        if "rng/torch" in tensors:
            torch.set_rng_state(tensors["rng/torch"])
        for h, values in state["heads"].items():
            head = c.heads[int(h)]
            head.next_round, head.steps_done = int(values["next_round"]), int(values["steps_done"])
        c.version = int(state["version"])
        c.samples = int(state["samples"])
        c.bytes_up, c.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
        c.head_rounds_applied = int(state["head_rounds_applied"])
        c.history, c.evaluations.evals = list(state["history"]), list(state["evals"])
        elapsed = float(state.get("elapsed_s", 0.0))  # an old server's wall-clock value may be < 0
        c.done = bool(state.get("done", False))
        for entry in state.get("quarantined", []):  # [peer host, name, problem]; none before issue 24
            if isinstance(entry, list) and len(entry) == 3:
                c.lease_table.quarantined[(str(entry[0]), str(entry[1]))] = str(entry[2])
        c.timer.resume(elapsed if math.isfinite(elapsed) and elapsed > 0 else 0.0, c.done, c.progress()[0])
        c.snapshots.invalidate()
        c.guard.remember_master(c.master)
        c.changed.notify_all()
