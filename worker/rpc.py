"""How the worker calls the server: transient failures retried with backoff, the server's refusals
turned into what the worker does next, a stop signal or a vanished parent checked before each try.

A refusal is a ``Refusal`` reason in the call's trailing metadata (``lte.common.wire.protocol``);
:func:`raise_refusal` maps it to one of the exceptions below, which ``Worker`` acts on (register
again, adopt the server's view of the lease, end, discard a round). A streaming call that stops
moving is cancelled by a :class:`StallWatchdog`: its deadline grows with the bytes that do move.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from lte.common.wire.protocol import REREGISTER, RESYNC, Refusal, refusal_of
from lte.worker.startup import TLSProblem, tls_problem

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
STOP_POLL_S = 0.25  # how soon a pull in flight is cancelled once the worker is stopping


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl+C, SIGTERM, SIGHUP) reached the worker: it leaves the job.

    Raised again at the worker's next check when the handler's own KeyboardInterrupt was lost, as it
    is when the signal lands while Python runs a ``__del__`` or a callback (gRPC's call objects are
    finalised on the main thread after every pull): Python prints "Exception ignored in" and carries
    on. Before this check the worker then trained on to the job's end, deaf to every later signal
    (the handler ignores them once the first arrived): the likely cause of a CI run where a worker
    did not exit within 60 s of SIGINT (tests/test_fleet.py)."""


class LeaseLost(Exception):
    """The server no longer knows this lease (restart, expiry): register again."""


class JobDone(Exception):
    """The server says the job has ended."""


class Resync(Exception):
    """The server moved or finished some of this worker's heads: adopt its view of the lease."""


class ModelMismatch(ValueError):
    """The job's model built here differs from the server's (the version handshake's fingerprint)."""


class Incompatible(ValueError):
    """The server refused this worker: its protocol lacks a job field the job uses."""


class ModelRefused(ValueError):
    """The server refused this worker's pull or push: the model it built is not the server's (the
    version handshake's fingerprint, wire protocol 4); the server ended its lease."""


class OutlierRefused(Exception):
    """The server's update guard refused the push: its round is discarded, the heads go on."""


class Quarantined(Exception):
    """A push of this worker broke a merge on the server, which will not take any more from it."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter, reset after every success."""

    initial_s: float = 0.2
    max_s: float = 10.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * (2**self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


def refusal(err: grpc.RpcError) -> Refusal | None:
    """The server's domain reason for refusing a call (trailing metadata), if it gave one."""
    try:
        return refusal_of(err.trailing_metadata())
    except Exception:  # a channel-level error (no server answered) has no metadata to read
        return None


def raise_refusal(err: grpc.RpcError) -> None:
    """Turn the server's reason into what the worker does next; other errors pass through.

    Raises LeaseLost, Resync, JobDone, OutlierRefused, Quarantined, Incompatible or ModelRefused."""
    reason = refusal(err)
    if reason in REREGISTER:
        raise LeaseLost(err.details()) from None
    if reason in RESYNC:
        raise Resync(err.details()) from None
    if reason is Refusal.JOB_DONE:
        raise JobDone() from None
    if reason is Refusal.OUTLIER:
        raise OutlierRefused(err.details()) from None
    if reason is Refusal.QUARANTINED:
        raise Quarantined(err.details()) from None
    if reason is Refusal.INCOMPATIBLE:
        raise Incompatible(f"the server refused this worker: {err.details()}") from None
    if reason is Refusal.MODEL_DIFFERS:
        raise ModelRefused(f"the server refused this worker: {err.details()}") from None


class StallWatchdog:
    """Cancels a streaming call when no message arrived for ``stall_s`` (``first_s`` before the
    first one, which a long-poll may hold back): a deadline that grows with the bytes that do move.
    It also cancels the call at once (within ``STOP_POLL_S``) when ``stop`` is set (the worker's
    ``interrupted``): a stopped worker does not sit out a 30 s long-poll or a slow transfer."""

    def __init__(self, call, *, first_s: float, stall_s: float, stop: threading.Event | None = None) -> None:
        self.call, self.stall_s = call, stall_s
        self.stopping = stop or threading.Event()
        self.fired = False
        self._due = time.monotonic() + first_s
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="lte-pull-watchdog", daemon=True)
        self.thread.start()

    def progress(self) -> None:
        self._due = time.monotonic() + self.stall_s

    def _watch(self) -> None:
        while not self._done.wait(min(STOP_POLL_S, self.stall_s)):
            if self.stopping.is_set():  # not a stall: the caller sees its interrupt, not a retry
                self.call.cancel()
                return
            if time.monotonic() > self._due:
                self.fired = True
                self.call.cancel()
                return

    def stop(self) -> None:
        self._done.set()


class RpcCaller:
    """Runs the worker's unary calls and opens its streams: the call metadata (token), retries with
    backoff for ``give_up_after_s`` seconds, refusals raised as the exceptions above, a failed TLS
    handshake named by its certificate's cause (``TLSProblem``), and the checks every wait makes:
    ``interrupted`` (a stop signal: ``Interrupted``) and ``parent_pid`` (a local worker whose
    server is gone exits). ``stop`` ends every wait early; the worker owns both events."""

    def __init__(
        self,
        *,
        metadata: tuple[tuple[str, str], ...],
        give_up_after_s: float,
        stop: threading.Event,
        interrupted: threading.Event,
        parent_pid: int | None,
        server_address: str,
        tls_files: tuple[str | None, str | None, str | None],
        say: Callable[[str], None],
    ) -> None:
        self.metadata, self.give_up_after_s = metadata, give_up_after_s
        self.stop, self.interrupted, self.parent_pid = stop, interrupted, parent_pid
        self.server_address = server_address
        self.tls_files = tls_files  # (CA, client certificate, key): to name a failed handshake's cause
        self.say = say
        self.clock: Callable[[], float] = time.monotonic  # tests put a fake clock here

    def call(
        self, fn: Callable, *args, what: str, answered: Callable[[], float] | None = None, **kwargs
    ) -> Any:
        """Run one RPC, retrying transient failures with backoff for ``give_up_after_s`` after the
        first failure. ``answered``: when the server last answered a part of this call (monotonic
        seconds; a resumable push's ``PushOffset``): a failure after that starts the window again,
        so a long transfer over a link that drops now and then is retried for as long as each try
        reaches the server, and an unreachable server is still given up on."""
        backoff = Backoff()
        failing_since: float | None = None
        while True:
            self.check_parent()
            try:
                return fn(*args, metadata=self.metadata, **kwargs)
            except grpc.RpcError as err:
                self.check_interrupted()  # a call cut short by the stop: the interrupt, not an error
                raise_refusal(err)
                code = err.code()
                self.check_tls(err)
                now = self.clock()
                if failing_since is None or (answered is not None and answered() > failing_since):
                    failing_since = now  # the first failure, or the server answered since the last one
                if code not in RETRYABLE or now - failing_since > self.give_up_after_s or self.stop.is_set():
                    raise
                # the last wait ends with the window: one more try, then give up on time
                delay = min(backoff.next_delay(), failing_since + self.give_up_after_s - now + 0.01)
                self.say(f"{what}: {code.name.lower()} ({err.details()}); retrying in {delay:.1f} s")
                if self.stop.wait(delay):
                    raise

    def check_tls(self, err: grpc.RpcError) -> None:
        """A TLS handshake that fails for a certificate's reason is not retried: ``TLSProblem`` names
        the cause (expired, not yet valid, another CA, another host name) instead of the address."""
        details = (err.details() or "").lower()
        if err.code() != grpc.StatusCode.UNAVAILABLE or not any(self.tls_files):
            return
        if not any(word in details for word in ("ssl", "handshake", "tsi", "certificate")):
            return
        problem = tls_problem(self.server_address, *self.tls_files)
        if problem:
            raise TLSProblem(problem)

    def check_interrupted(self) -> None:
        """Raises ``Interrupted`` once a stop signal arrived (``Worker.interrupt``)."""
        if self.interrupted.is_set():
            raise Interrupted()

    def check_parent(self) -> None:
        """``check_interrupted``, and SystemExit when the server process that started this worker is gone."""
        self.check_interrupted()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            raise SystemExit("lte-worker: the server process that started this worker is gone; exiting")
