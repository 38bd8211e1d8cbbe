"""A server host and a worker host on a rate-limited link (bench/wan/netns.py's network namespaces).

Skipped, with the reason, where this machine or user cannot create network namespaces (root,
``ip``, ``tc``, ``nft``): the suite's skip policy (tests/conftest.py) counts that skip like any
other, so under LTE_NO_SKIPS=1 it fails and names what was missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lte.server.run import stop_processes
from tests.faults import wait_until

TIMEOUT_S = 240
NETNS_PATH = Path(__file__).resolve().parent.parent / "bench" / "wan" / "netns.py"


def _netns():
    spec = importlib.util.spec_from_file_location("lte_bench_wan_netns", NETNS_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.process
def test_a_worker_behind_a_rate_limited_link_trains_mlp_rounds(tmp_path):
    netns = _netns()
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    env = {**os.environ, "LTE_TOKEN": secrets.token_hex(16)}  # the server listens off loopback
    rounds = 4
    with netns.Hosts(1, rate_mbit=8) as hosts:
        server_cmd = [
            *hosts.exec_args(hosts.server), sys.executable, "-m", "lte.server.cli", "--model", "mlp",
            "--dataset", "digits", "--heads", "1", "--steps", str(10 * rounds), "--merge-every", "10",
            "--quant", "int8", "--host", hosts.server_ip, "--port", "0", "--dashboard-port", "-1",
            "--out", str(tmp_path / "run"), "--log-format", "json", "--linger", "0", "--checkpoint-every", "0",
            "--threads", "1",
        ]  # fmt: skip
        server = subprocess.Popen(
            server_cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        procs = [server]
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(server.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        try:

            def address() -> str | None:
                assert server.poll() is None, "".join(lines)
                for line in list(lines):
                    if line.startswith("{") and '"address"' in line:
                        return json.loads(line)["address"]
                return None

            addr = wait_until(address, TIMEOUT_S, "the server to listen")
            assert addr.startswith(hosts.server_ip + ":")
            log = (tmp_path / "worker.log").open("w")
            worker_cmd = [
                *hosts.exec_args(hosts.workers[0]), sys.executable, "-m", "lte.worker.cli", "--server", addr,
                "--threads", "1", "--quiet", "--loader-workers", "0",
            ]  # fmt: skip
            procs.append(subprocess.Popen(worker_cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            assert server.wait(timeout=TIMEOUT_S) == 0, "".join(lines)
            assert procs[1].wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()
            link = hosts.link_bytes(hosts.workers[0])
            qdisc = subprocess.run(
                [*hosts.exec_args(hosts.workers[0]), "tc", "-s", "qdisc", "show", "dev", "eth0"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
        finally:
            stop_processes(procs, timeout=20)
            reader.join(timeout=20)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["version"] == rounds
    assert summary["test_accuracy"] > 0.5, summary
    # every byte the server counted crossed the worker's link (plus TCP, TLS-less HTTP/2 framing)
    assert link["rx"] >= summary["bytes_down"] > 0 and link["tx"] >= summary["bytes_up"] > 0
    assert "tbf" in qdisc and "rate 8Mbit" in qdisc, qdisc  # the link was shaped
    assert netns_gone(hosts)


_ECHO = """
import socket
s = socket.socket()
s.bind(("0.0.0.0", 9000))
s.listen()
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while d := c.recv(16):
        c.sendall(d)
    c.close()
"""
_PING = """
import socket, sys, time
# The echo host may still be starting. Through the delay proxy a connection is accepted at once and
# closed when the echo host does not listen yet (recv gives b""): retry until one echoes, bounded.
deadline = time.monotonic() + 120
while True:
    try:
        c = socket.create_connection((sys.argv[1], 9000), timeout=30)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(b"x")
        if c.recv(16) == b"x":
            break
        c.close()
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("no echo from " + sys.argv[1] + " within 120 s")
    time.sleep(0.1)
rtts = []
for _ in range(5):
    t = time.monotonic()
    c.sendall(b"x")
    assert c.recv(16) == b"x"
    rtts.append(time.monotonic() - t)
print(min(rtts) * 1000)
"""


@pytest.mark.process
def test_every_tcp_connection_a_worker_host_opens_gets_the_added_rtt_the_server_and_a_peer_alike():
    """bench/wan's fairness: LTE's connection to the server and a baseline's rank-to-rank one go
    through the same delay proxy (an nft redirect), so both see at least the added RTT."""
    netns = _netns()
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    rtt_ms = 60.0
    with netns.Hosts(2, rate_mbit=50, rtt_ms=rtt_ms) as hosts:
        echoes = [
            subprocess.Popen([*hosts.exec_args(ns), sys.executable, "-c", _ECHO])
            for ns in (hosts.server, hosts.workers[1])
        ]
        try:
            measured = {}
            for ip in (hosts.server_ip, hosts.worker_ips[1]):
                out = subprocess.run(
                    [*hosts.exec_args(hosts.workers[0]), sys.executable, "-c", _PING, ip],
                    capture_output=True, text=True, timeout=TIMEOUT_S,
                )  # fmt: skip
                assert out.returncode == 0, out.stderr
                measured[ip] = float(out.stdout)
        finally:
            stop_processes(echoes, timeout=20)
    # the proxy holds each byte rtt/2 each way: no round trip is shorter (without it: ~0.1 ms)
    assert all(v >= rtt_ms for v in measured.values()), measured
    assert netns_gone(hosts)


def netns_gone(hosts) -> bool:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return not any(ns in names for ns in (hosts.hub, hosts.server, *hosts.workers))


class _Call:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def test_a_pull_is_cancelled_only_when_its_bytes_stop_moving_not_after_a_fixed_deadline():
    from lte.worker.rpc import StallWatchdog

    call = _Call()
    dog = StallWatchdog(call, first_s=0.5, stall_s=0.5)
    try:
        # a slow pull that keeps moving outlasts the stall bound many times over
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            dog.progress()
            assert not call.cancelled.wait(0.05)
        assert not dog.fired
        assert call.cancelled.wait(30), "a stalled pull was never cancelled"  # then the bytes stop
        assert dog.fired
    finally:
        dog.stop()
    idle = _Call()
    stopped = StallWatchdog(idle, first_s=0.2, stall_s=0.2)
    stopped.stop()  # a pull that finished: its watchdog never cancels it
    stopped.thread.join(timeout=30)
    assert not idle.cancelled.is_set() and not stopped.fired


def test_a_push_deadline_grows_with_its_bytes():
    from lte.worker.pushes import PUSH_BASE_S, PUSH_FLOOR_BPS, push_deadline_s

    assert push_deadline_s(0) == PUSH_BASE_S
    # 100 MB at the floor rate take 800 s: the deadline leaves them that time beyond the base
    assert push_deadline_s(100_000_000) == pytest.approx(PUSH_BASE_S + 8e8 / PUSH_FLOOR_BPS)
    assert push_deadline_s(100_000_000) > 8e8 / PUSH_FLOOR_BPS + 60
