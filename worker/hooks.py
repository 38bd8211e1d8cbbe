"""The one seam where a test, a benchmark or a fault drill steps into a worker's rounds.

``Worker`` calls its ``RoundHooks`` at two points of every round and knows nothing else about
them; the default does nothing. ``FaultInjection`` is what ``lte-worker``'s hidden flags
(``--slow-down``, ``--fail-at-round``, ``--delay-push``) build, for the chaos tests that run real
worker processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass


class RoundHooks:
    """Called by the worker: ``after_training`` once a turn's local steps are done, ``before_push``
    just before it pushes (return False to skip the push and stop)."""

    def after_training(self, rounds_pushed: int, seconds: float) -> None:
        return None

    def before_push(self, rounds_pushed: int, stop: threading.Event) -> bool:
        return True


@dataclass
class FaultInjection(RoundHooks):
    """A slow worker (a fixed sleep per turn, or ``slow_factor`` x its own training time), a crash
    before push K (SIGKILL itself: no Leave, no cleanup), or pushes held back (heartbeats go on)."""

    slow_down_s: float = 0.0
    fail_at_round: int | None = None
    delay_push_s: float = 0.0
    slow_factor: float = 1.0

    def after_training(self, rounds_pushed: int, seconds: float) -> None:
        # plays a slow GPU: the wall time is the fault itself
        delay = self.slow_down_s + max(0.0, self.slow_factor - 1.0) * seconds
        if delay:
            time.sleep(delay)

    def before_push(self, rounds_pushed: int, stop: threading.Event) -> bool:
        if self.fail_at_round is not None and rounds_pushed >= self.fail_at_round:
            os.kill(os.getpid(), signal.SIGKILL)  # die like a crashed machine
        return not (self.delay_push_s and stop.wait(self.delay_push_s))

    @property
    def active(self) -> bool:
        return bool(
            self.slow_down_s or self.fail_at_round is not None or self.delay_push_s or self.slow_factor != 1
        )
