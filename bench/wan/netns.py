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
- latency: this kernel has no ``netem``; ``delay_proxy.py`` adds it to TCP connections made
  through it (bench/wan/run.py routes the workers' gRPC traffic that way).

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

SUBNET = "10.77.0"  # inside the run's namespaces only


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
        with Hosts(1, rate_mbit=100, loss=0.01):
            pass
    except NetnsUnavailable as exc:
        return f"cannot build network namespaces here: {exc}"
    return None


class Hosts:
    def __init__(
        self, workers: int, *, rate_mbit: float = 20.0, loss: float = 0.0, shape_server: bool = False
    ) -> None:
        """``workers`` worker hosts; ``rate_mbit`` each way on each worker link; ``loss`` a fraction
        of packets dropped each way on it (0.02: 2 %). NetnsUnavailable if anything fails."""
        self.suffix = secrets.token_hex(3)
        self.hub = f"lwan{self.suffix}-hub"
        self.server = f"lwan{self.suffix}-srv"
        self.workers = [f"lwan{self.suffix}-w{i}" for i in range(workers)]
        self.server_ip = f"{SUBNET}.1"
        self.worker_ips = [f"{SUBNET}.{10 + i}" for i in range(workers)]
        self.rate_mbit, self.loss = rate_mbit, loss
        self._made: list[str] = []
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
