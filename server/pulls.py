"""The pull side of the round: a worker's long-poll for a newer version, and which snapshot answers
it (nothing, a delta of the quantised codes from the version it holds, or the full snapshot;
docs/design.md, "Snapshots and deltas"). The ``Coordinator`` owns one ``LongPolls`` and calls
``newest_snapshot`` with its own snapshot source.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from lte.server.scheduler import Lease
from lte.server.snapshots import Snapshot, SnapshotBuilder


class LongPolls:
    """Pulls waiting for a version past the one they hold, on the coordinator's condition ``changed``
    (notified on every new version, lease change and the job's end); ``state()`` reads (version,
    done) and is called with the condition's lock held."""

    def __init__(self, changed: threading.Condition, state: Callable[[], tuple[int, bool]]) -> None:
        self.changed, self.state = changed, state
        self.turned_away = 0  # long-polls answered at once: no handler thread to spare

    def wait(
        self,
        have_version: int,
        timeout_s: float,
        lease: Lease | None = None,
        epoch: int = -1,
        slots: threading.BoundedSemaphore | None = None,
    ) -> tuple[int, bool, bool]:
        """Block until the version passes ``have_version``, the job ends, ``lease``'s epoch differs
        from ``epoch`` (when given), or ``timeout_s`` seconds; (version, done, turned_away).

        A wait takes one of ``slots`` (when given and ``timeout_s > 0``) while it blocks; with none
        free it returns at once, turned away (counted in ``turned_away``)."""
        slot = slots if timeout_s > 0 else None
        if slot is not None and not slot.acquire(blocking=False):
            with self.changed:
                self.turned_away += 1
                return (*self.state(), True)
        try:
            deadline = time.monotonic() + max(0.0, timeout_s)
            with self.changed:
                while True:
                    version, done = self.state()
                    if version > have_version or done:
                        break
                    if lease is not None and epoch >= 0 and lease.epoch != epoch:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.changed.wait(left)
                return version, done, False
        finally:
            if slot is not None:
                slot.release()


def newest_snapshot(
    snapshot: Callable[[], Snapshot],
    builder: SnapshotBuilder,
    have_version: int,
    delta: bool,
    head_factors: Sequence[int] = (),
) -> tuple[int, list, int, int, int]:
    """(version, chunk messages, payload bytes, delta base, stream id) of the newest snapshot
    (``snapshot()``) for a worker holding ``have_version``: nothing when it is current, the delta from
    ``have_version`` when ``delta`` and ``builder`` can build one (``SnapshotBuilder.delta``), else
    the full snapshot (delta base -1). The stream id names the chunk sequence (with the moved heads'
    factors ``head_factors``), so that a pull broken after some chunks resumes it
    (``SnapshotBuilder.stream_id``)."""
    version, messages, payload = snapshot()
    delta_base = -1
    if version <= have_version:
        return version, [], 0, delta_base, 0
    if delta and have_version >= 0:
        found = builder.delta(version, have_version)
        if found is not None:
            messages, payload, delta_base = found[0], found[1], have_version
    return version, messages, payload, delta_base, builder.stream_id(version, delta_base, head_factors)
