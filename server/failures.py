"""A worker that cannot train its lease says why when it gives the lease back: one line in the
server's log, and the dashboard shows the worker as failed with that reason."""

from __future__ import annotations

import logging

from lte.common.wire.failure import FAILED_PREFIX

_log = logging.getLogger("lte.server")


def note_worker_failure(lease, reason: str) -> None:
    """Record and log a failure reason given with a Leave (other reasons, e.g. "done", are ignored)."""
    if not reason.startswith(FAILED_PREFIX):
        return
    lease.failure = reason[len(FAILED_PREFIX) :][:500]  # one line, bounded: it comes off the wire
    lease.failure = " ".join(lease.failure.split())
    _log.warning(
        "worker %s (%s) could not train heads %s and gave them back: %s",
        lease.worker_id,
        lease.worker.get("name", ""),
        list(lease.head_ids),
        lease.failure,
    )
