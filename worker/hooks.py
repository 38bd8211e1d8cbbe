"""The one seam where a test, a benchmark or a fault drill steps into a worker's rounds.

``Worker`` calls its ``RoundHooks`` at three points of every round and knows nothing else about
them; the default does nothing. ``FaultInjection`` is what ``lte-worker``'s hidden flags
(``--slow-down``, ``--fail-at-round``, ``--delay-push``, ``--poison-push``) build, for the chaos
tests that run real worker processes: ``--poison-push`` makes a rogue worker whose pushes are
corrupted on the way out (its own training stays honest), for the server's update guard.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import torch

from lte.common.core.merge import HeadUpdate, ReplicaUpdate

# What --poison-push does to the factors a rogue worker sends (B and A of every head and layer):
#   scale=K   every B times K (the contribution B A - B' A' grows about K-fold)
#   value=X   every B and A entry set to X (1e19 stays finite over a bf16 uplink)
#   nan       one entry of the first layer's B set to NaN
#   layer=K   only the first layer's B times K
POISONS = ("scale", "value", "nan", "layer")


def poison_factors(heads: list[HeadUpdate], poison: str) -> list[HeadUpdate]:
    """Copies of ``heads`` corrupted as ``poison`` says (``ValueError`` for an unknown kind)."""
    kind, _, arg = poison.partition("=")
    if kind not in POISONS:
        raise ValueError(
            f"--poison-push must be one of {POISONS} (with =number where needed), got {poison!r}"
        )
    out = []
    for u in heads:
        factors = {}
        for i, (layer, (b, a)) in enumerate(u.factors.items()):
            if kind == "scale" or (kind == "layer" and i == 0):
                b = b * float(arg)
            elif kind == "value":
                b, a = torch.full_like(b, float(arg)), torch.full_like(a, float(arg))
            elif kind == "nan" and i == 0:
                b = b.clone()
                b.view(-1)[0] = float("nan")
            factors[layer] = (b, a)
        out.append(HeadUpdate(u.head_id, factors))
    return out


class RoundHooks:
    """Called by the worker: ``after_training`` once a turn's local steps are done, ``before_push``
    just before it pushes (return False to skip the push and stop)."""

    def after_training(self, pushes: int, seconds: float) -> None:
        return None

    def before_push(self, pushes: int, stop: threading.Event) -> bool:
        return True

    def outgoing(
        self, pushes: int, heads: list[HeadUpdate], replica: ReplicaUpdate
    ) -> tuple[list[HeadUpdate], ReplicaUpdate]:
        """What a push sends: the heads' factors and replica deltas (a rogue worker alters them)."""
        return heads, replica


@dataclass
class FaultInjection(RoundHooks):
    """A slow worker (a fixed sleep per turn, or ``slow_factor`` x its own training time), a crash
    before push K (SIGKILL itself: no Leave, no cleanup), or pushes held back (heartbeats go on)."""

    slow_down_s: float = 0.0
    fail_at_round: int | None = None
    delay_push_s: float = 0.0
    slow_factor: float = 1.0
    poison: str = ""  # a rogue worker: POISONS
    poison_from: int = 0  # the first push (0-based) it corrupts
    poisoned: int = 0  # pushes corrupted so far (tries of one push count each)

    def after_training(self, pushes: int, seconds: float) -> None:
        # plays a slow GPU: the wall time is the fault itself
        delay = self.slow_down_s + max(0.0, self.slow_factor - 1.0) * seconds
        if delay:
            time.sleep(delay)

    def before_push(self, pushes: int, stop: threading.Event) -> bool:
        if self.fail_at_round is not None and pushes >= self.fail_at_round:
            os.kill(os.getpid(), signal.SIGKILL)  # die like a crashed machine
        return not (self.delay_push_s and stop.wait(self.delay_push_s))

    def outgoing(
        self, pushes: int, heads: list[HeadUpdate], replica: ReplicaUpdate
    ) -> tuple[list[HeadUpdate], ReplicaUpdate]:
        if not self.poison or pushes < self.poison_from:
            return heads, replica
        self.poisoned += 1
        return poison_factors(heads, self.poison), replica

    @property
    def active(self) -> bool:
        return bool(
            self.slow_down_s
            or self.fail_at_round is not None
            or self.delay_push_s
            or self.slow_factor != 1
            or self.poison
        )
