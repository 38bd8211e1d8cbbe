"""Hosts on shaped links, built from Linux network namespaces (root only), torn down on exit.

``Hosts(k, ...)`` makes a server host and ``k`` worker hosts, each a network namespace with one
veth link (``eth0``) to a hub namespace that bridges them: a star, as hosts behind their own
access links around a switch. Every name carries a random run suffix, the addresses are one
private /24 that exists only inside these namespaces, and ``close()`` (also at exit and on
SIGTERM) deletes every namespace it made, which removes their links; it never touches anything
it did not create.

Each worker link is shaped, in both directions:

- rate: ``tc qdisc tbf`` on the host's ``eth0`` (uplink) and on the hub's end (downlink);
- loss: an ``nft`` rule ``numgen random mod 10000 < p`` dropping packets in and out of ``eth0``;
- latency (``rtt_ms``): this kernel has no ``netem``; an nft ``redirect`` on the host sends every
  TCP connection it opens to another host of the run through ``delay_proxy.py --transparent``,
  started on the host, which holds each byte ``rtt_ms / 2`` each way: LTE's gRPC, gloo's
  rank-to-rank links and the rendezvous store all see the same added RTT.

The server's link is not shaped unless ``shape_server``: a data-centre host.
"""

from __future__ import annotations

import atexit
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.77.0"  # inside the run's namespaces only
PROXY_PORT = 7001  # each worker host's delay proxy, on the host's own stack
PROXY = Path(__file__).resolve().parent / "delay_proxy.py"


class NetnsUnavailable(RuntimeError):
    """This machine (or user) cannot create network namespaces, links or qdiscs."""


def _run(*cmd: str, input: str | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=30)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def available() -> str | None:
    """None when namespaces, veth links, tbf and nft work here; else why not (one line)."""
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        with Hosts(1, rate_mbit=100, loss=0.01, rtt_ms=2):
            pass
    except NetnsUnavailable as exc:
        return f"cannot build network namespaces here: {exc}"
    return None


class Hosts:
    def __init__(
        self,
        workers: int,
        *,
        rate_mbit: float = 20.0,
        loss: float = 0.0,
        rtt_ms: float = 0.0,
        shape_server: bool = False,
    ) -> None:
        """``workers`` worker hosts; ``rate_mbit`` each way on each worker link; ``loss`` a fraction
        of packets dropped each way on it (0.02: 2 %); ``rtt_ms`` added to the round-trip time of
        every TCP connection a worker host opens (0: none). NetnsUnavailable if anything fails."""
        self.suffix = secrets.token_hex(3)
        self.hub = f"lwan{self.suffix}-hub"
        self.server = f"lwan{self.suffix}-srv"
        self.workers = [f"lwan{self.suffix}-w{i}" for i in range(workers)]
        self.server_ip = f"{SUBNET}.1"
        self.worker_ips = [f"{SUBNET}.{10 + i}" for i in range(workers)]
        self.rate_mbit, self.loss, self.rtt_ms = rate_mbit, loss, rtt_ms
        self._made: list[str] = []
        self._proxies: list[subprocess.Popen] = []
        atexit.register(self.close)
        self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        try:
            self._build(shape_server)
        except BaseException:
            self.close()
            raise

    def _on_term(self, signum, frame) -> None:
        self.close()
        sys.exit(128 + signum)

    def _netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self, shape_server: bool) -> None:
        self._netns(self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        hosts = [(self.server, self.server_ip, shape_server)] + [
            (w, ip, True) for w, ip in zip(self.workers, self.worker_ips, strict=True)
        ]
        for i, (ns, ip, shaped) in enumerate(hosts):
            self._netns(ns)
            port = f"p{i}"
            _run(
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.hub,
            )
            _run("ip", "-n", self.hub, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.hub, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            if shaped:
                self._shape(ns, "eth0")
                self._shape(self.hub, port)
                if self.loss > 0:
                    self._drop(ns)
        if self.rtt_ms > 0:
            for ns, ip in zip(self.workers, self.worker_ips, strict=True):
                self._delay(ns, ip)

    def _delay(self, ns: str, own_ip: str) -> None:
        """Every TCP connection ``ns`` opens to another host of the run goes through a delay proxy."""
        proxy = subprocess.Popen(
            [*self.exec_args(ns), "nice", "-n", "-10", sys.executable, str(PROXY), "--listen", f"0.0.0.0:{PROXY_PORT}",
             "--transparent", "--delay-ms", str(self.rtt_ms / 2)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._proxies.append(proxy)
        mark = 0x4C54  # delay_proxy.MARK: the proxy's own upstream connections
        rules = (
            "table ip lwannat {\n"
            "  chain out { type nat hook output priority -100;\n"
            f"    meta mark {mark} return; ip daddr != {SUBNET}.0/24 return; ip daddr {own_ip} return;\n"
            f"    meta l4proto tcp redirect to :{PROXY_PORT}; }}\n"
            "}\n"
        )
        _run("ip", "netns", "exec", ns, "nft", "-f", "-", input=rules)
        probe = f"import socket; socket.create_connection(('127.0.0.1', {PROXY_PORT}), timeout=2).close()"
        deadline = time.monotonic() + 60
        while True:
            if proxy.poll() is not None:
                raise NetnsUnavailable(f"the delay proxy in {ns} exited with {proxy.returncode}")
            ok = subprocess.run([*self.exec_args(ns), sys.executable, "-c", probe], capture_output=True)
            if ok.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise NetnsUnavailable(f"the delay proxy in {ns} did not listen in 60 s")
            time.sleep(0.2)

    def _shape(self, ns: str, dev: str) -> None:
        rate_bps = self.rate_mbit * 1e6
        burst = max(16 << 10, int(rate_bps / 8 / 100))  # 10 ms of the rate, at least 16 KiB
        _run(
            "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{rate_bps:.0f}bit", "burst", str(burst), "latency", "200ms",
        )  # fmt: skip

    def _drop(self, ns: str) -> None:
        per10k = round(self.loss * 10000)
        rules = (
            "table inet lwan {\n"
            f'  chain in {{ type filter hook input priority 0; iifname "eth0" numgen random mod 10000 < {per10k} drop; }}\n'
            f'  chain out {{ type filter hook output priority 0; oifname "eth0" numgen random mod 10000 < {per10k} drop; }}\n'
            "}\n"
        )
        _run("ip", "netns", "exec", ns, "nft", "-f", "-", input=rules)

    def exec_args(self, ns: str) -> list[str]:
        """The argv prefix that runs a command inside host ``ns``."""
        return ["ip", "netns", "exec", ns]

    def link_bytes(self, ns: str) -> dict[str, int]:
        """``{"tx": bytes sent, "rx": bytes received}`` on host ``ns``'s link, from its counters."""
        info = json.loads(_run("ip", "-n", ns, "-s", "-j", "link", "show", "eth0"))[0]
        stats = info.get("stats64") or info["stats"]
        return {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}

    def close(self) -> None:
        while self._proxies:
            proxy = self._proxies.pop()
            if proxy.poll() is None:
                proxy.terminate()
                try:
                    proxy.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    proxy.wait(timeout=10)
        while self._made:
            name = self._made.pop()
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        atexit.unregister(self.close)
        if signal.getsignal(signal.SIGTERM) == self._on_term:
            signal.signal(signal.SIGTERM, self._old_term)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
