"""How long a worker retries (``--give-up-after``): counted from the first failure, and started again
whenever the server answered a part of the call since (issue 23, item 4: long transfers over links
that drop now and then). Before, the window ran from the call's start, so a push that broke after
more than ``give_up_after_s`` of sending (17 MB of vit-b factors take 140 s at 1 Mbit/s) was never
retried and the worker exited. All on a fake clock: the backoff's waits advance it."""

from __future__ import annotations

import threading

import grpc
import pytest

from lte.worker.rpc import RpcCaller


class _Failed(grpc.RpcError):
    def __init__(self, code=grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "the test's link dropped"

    def trailing_metadata(self):
        return ()


class _FakeStop(threading.Event):
    """The worker's stop event, whose backoff waits pass on the fake clock at once."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout=None) -> bool:
        self.clock[0] += timeout or 0.0
        return False


def _caller(clock: list[float], give_up_after_s: float = 300.0) -> RpcCaller:
    rpc = RpcCaller(
        metadata=(),
        give_up_after_s=give_up_after_s,
        stop=_FakeStop(clock),
        interrupted=threading.Event(),
        parent_pid=None,
        server_address="127.0.0.1:1",
        tls_files=(None, None, None),
        say=lambda message: None,
    )
    rpc.clock = lambda: clock[0]
    return rpc


def test_a_call_that_broke_after_longer_than_the_window_is_still_retried():
    clock = [0.0]
    tries: list[float] = []

    def push(metadata):
        tries.append(clock[0])
        if len(tries) == 1:
            clock[0] += 600.0  # ten minutes of sending, then the link dropped
            raise _Failed()
        return "applied"

    assert _caller(clock).call(push, what="push") == "applied"
    assert len(tries) == 2


def test_an_unreachable_server_is_given_up_on_the_window_after_the_first_failure():
    clock = [0.0]
    tries: list[float] = []

    def connect(metadata):
        tries.append(clock[0])
        clock[0] += 20.0  # each try waits out a connect timeout
        raise _Failed()

    with pytest.raises(grpc.RpcError):
        _caller(clock).call(connect, what="register")
    first_failure = tries[0] + 20.0
    assert clock[0] - first_failure > 300.0  # the whole window was retried
    assert clock[0] - first_failure < 300.0 + 20.0 + 0.1  # and no longer: one last try at the window's end


def test_a_link_that_drops_every_ten_minutes_is_retried_while_the_server_answers_between():
    clock = [0.0]
    answered = [float("-inf")]
    tries = 0

    def push(metadata):
        nonlocal tries
        tries += 1
        if tries > 1:
            answered[0] = clock[0]  # the retry's PushOffset was answered
        if tries < 5:
            clock[0] += 500.0  # sends for a while, then the link drops again
            raise _Failed()
        return "applied"

    rpc = _caller(clock)
    assert rpc.call(push, what="push", answered=lambda: answered[0]) == "applied"
    assert tries == 5
    # without the answers the same drops end the call at the second failure (500 s after the first)
    clock[0], tries, answered[0] = 0.0, 0, float("-inf")
    with pytest.raises(grpc.RpcError):
        rpc.call(push, what="push")
    assert tries == 2


def test_an_error_that_is_not_transient_is_raised_at_once():
    clock = [0.0]
    tries = 0

    def call(metadata):
        nonlocal tries
        tries += 1
        raise _Failed(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(grpc.RpcError):
        _caller(clock).call(call, what="push")
    assert tries == 1
