"""The words a worker and the server share about a lease: its states (``LeaseState``), and why a
worker could not train it. No torch here: the dashboard imports it."""

from __future__ import annotations

import enum

FAILED_PREFIX = "failed: "  # LeaveRequest.reason of a worker that could not build or train its lease


def training_failure(exc: BaseException) -> str:
    """One line naming what went wrong: the exception's type and its message's first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no message'}"[:500]


def leave_reason(failure: str) -> str:
    """``LeaveRequest.reason``: "done", or the failure behind ``FAILED_PREFIX``."""
    return f"{FAILED_PREFIX}{failure}" if failure else "done"


class LeaseState(str, enum.Enum):
    """What a lease (one worker) is doing, as the dashboard, the log and a heartbeat spell it
    (docs/design.md section 5). A ``str`` enum: it compares equal to and serialises as its value.

    The worker reports the four states of ``REPORTED_STATES`` in its heartbeats
    (``HeartbeatRequest.state``); the server sets the rest.
    """

    STARTING = "starting"  # the worker process before it registers (the worker's own state only)
    REGISTERED = "registered"  # the server granted the lease; no heartbeat has said more yet
    PULLING = "pulling"  # downloading a snapshot
    WAITING = "waiting"  # long-polling for the next version (sync: the round is not merged yet)
    TRAINING = "training"  # training its heads for one round
    PUSHING = "pushing"  # uploading its factors
    LEFT = "left"  # the worker gave the lease back
    EXPIRED = "expired"  # no heartbeat within the lease timeout; its heads went back to the pool
    FAILED = "failed"  # the worker gave the lease back because it could not train it
    QUARANTINED = "quarantined"  # the update guard ended it: a push of it broke a merge


# what a heartbeat may set: a worker's own activity ("left" or "expired" from a client would orphan
# its heads, so the server ignores any other value)
REPORTED_STATES = frozenset({LeaseState.TRAINING, LeaseState.PUSHING, LeaseState.PULLING, LeaseState.WAITING})
# a lease in one of these holds nothing any more
ENDED_STATES = frozenset({LeaseState.LEFT, LeaseState.EXPIRED, LeaseState.FAILED, LeaseState.QUARANTINED})
# what the dashboard shows (a quarantined lease shows as "failed", its failure says why)
SHOWN_STATES = tuple(s for s in LeaseState if s is not LeaseState.QUARANTINED)
# of those, the states of a worker that is gone
GONE_STATES = (LeaseState.LEFT, LeaseState.EXPIRED, LeaseState.FAILED)
