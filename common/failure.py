"""The words a worker and the server share about a lease the worker could not train."""

from __future__ import annotations

FAILED_PREFIX = "failed: "  # LeaveRequest.reason of a worker that could not build or train its lease


def training_failure(exc: BaseException) -> str:
    """One line naming what went wrong: the exception's type and its message's first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no message'}"[:500]


def leave_reason(failure: str) -> str:
    """``LeaveRequest.reason``: "done", or the failure behind ``FAILED_PREFIX``."""
    return f"{FAILED_PREFIX}{failure}" if failure else "done"
