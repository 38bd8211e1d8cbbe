"""A worker's join pull over a slow, lossy, long link, whole and with its connection dropped half-way.

    sudo python bench/wan/drop_pull.py --rate 5 --loss 0.02 --rtt-ms 40 --model vit-tiny --json /tmp/drop.json

One server host and one worker host (bench/wan/netns.py: tbf rate, nft loss, the delay proxy for
RTT). ``lte-server`` runs on the server host; then, ``--repeats`` times each:

- whole: an ``lte-worker`` joins (Register + the whole int8 snapshot); the join ends at its
  "registered" log line;
- dropped: the same, but once the worker's link has received ``--cut-at`` of the whole join's
  bytes, an nft rule on the server host drops every packet to the gRPC port for
  ``--cut-s`` seconds and the gRPC connections of both hosts are destroyed (``ss -K``), then
  the rule goes.

Each join's time and the bytes received on the worker's link are recorded, and the worker's
retries and resumes from its JSON log. Run it with this checkout's Python (resumable pulls) and
with an older checkout's (``/path/to/old/.venv/bin/python bench/wan/drop_pull.py ...``): the
``lte-*`` commands come from the running Python's environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from netns import Hosts, _run  # noqa: E402

from lte.server.run import stop_processes  # noqa: E402

BIN = Path(sys.executable).parent
PORT = 50051


def _wait_log(log: Path, needle: str, timeout_s: float, proc: subprocess.Popen) -> float:
    """Seconds (monotonic) when ``needle`` first appears in ``log``; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return time.monotonic()
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: exited {proc.returncode} before {needle!r}")
        time.sleep(0.05)
    raise TimeoutError(f"{log.name}: no {needle!r} in {timeout_s} s")


def _cut(hosts: Hosts, seconds: float) -> None:
    """An outage of ``seconds``: the server host drops every packet to the gRPC port, and the TCP
    connections of the port on both hosts are destroyed at its start (``ss -K``: each end is reset,
    as when a NAT or a middlebox on the way forgets the connection)."""
    rules = (
        "table inet lwancut {\n"
        f"  chain in {{ type filter hook input priority -10; tcp dport {PORT} drop; }}\n"
        "}\n"
    )
    _run(*hosts.exec_args(hosts.server), "nft", "-f", "-", input=rules)
    _run(*hosts.exec_args(hosts.server), "ss", "-K", "sport", "=", f":{PORT}")
    _run(*hosts.exec_args(hosts.workers[0]), "ss", "-K", "dport", "=", f":{PORT}")
    time.sleep(seconds)  # the outage's length is the experiment's parameter, not a wait for a condition
    _run(*hosts.exec_args(hosts.server), "nft", "delete", "table", "inet", "lwancut")


def add_drop_args(p: argparse.ArgumentParser) -> None:
    """The link, the cut and the output: the options drop_pull.py and drop_push.py share."""
    p.add_argument("--rate", type=float, default=5.0, help="Mbit/s each way on the worker's link")
    p.add_argument("--loss", type=float, default=0.02, help="fraction of packets dropped each way")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time added to the link")
    p.add_argument("--model", default="vit-tiny")
    p.add_argument("--quant", default="int8", help="the snapshot's codec")
    p.add_argument("--repeats", type=int, default=1, help="undisturbed and dropped runs of each")
    p.add_argument("--cut-at", type=float, default=0.5, help="fraction of the undisturbed transfer's bytes")
    p.add_argument("--cut-s", type=float, default=1.0, help="seconds of the outage")
    p.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    p.add_argument("--json", required=True, help="where to write the results")


def needs_root(prog: str) -> bool:
    """True (and one line on stderr) when this process cannot build namespaces."""
    if os.geteuid() != 0:
        print(f"{prog}: error: network namespaces need root (run it with sudo)", file=sys.stderr)
        return True
    return False


def pairs(args: argparse.Namespace, run, measure: str) -> list[dict]:
    """``--repeats`` times an undisturbed ``run(name, None)``, then ``run(name, cut)`` with the cut
    at ``--cut-at`` of the undisturbed run's ``measure`` (its bytes); every result printed."""
    results = []
    for i in range(args.repeats):
        whole = run(f"whole{i}", None)
        print(whole, flush=True)
        dropped = run(f"dropped{i}", int(whole[measure] * args.cut_at))
        print(dropped, flush=True)
        results += [whole, dropped]
    return results


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_meta(args: argparse.Namespace) -> dict:
    """When, how and under what load a bench run ran (its JSON's ``meta``)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %Y %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "python": sys.executable,
        "load_start": load_average(),
        **vars(args),
    }


def start_server(
    hosts: Hosts, work: Path, env: dict, job_args: list[str], name: str = "run"
) -> subprocess.Popen:
    """``lte-server`` with ``job_args`` on the server host (run folder ``work/name``, log
    ``work/name.server.log``), once it listens."""
    server = subprocess.Popen(
        [*hosts.exec_args(hosts.server), "nice", "-n", "5", str(BIN / "lte-server"), *job_args,
         "--host", hosts.server_ip, "--port", str(PORT), "--out", str(work / name), "--threads", "1",
         "--linger", "0", "--quiet", "--dashboard-port", "-1", "--lease-timeout", "600",
         "--checkpoint-every", "0"],
        stdout=(work / f"{name}.server.log").open("w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    probe = f"import socket; socket.create_connection(({hosts.server_ip!r}, {PORT}), timeout=2).close()"
    deadline = time.monotonic() + 600
    while subprocess.run(
        [*hosts.exec_args(hosts.server), sys.executable, "-c", probe], capture_output=True
    ).returncode:
        if time.monotonic() > deadline or server.poll() is not None:
            stop_processes([server], timeout=30)
            raise RuntimeError(
                f"the server did not listen: {(work / f'{name}.server.log').read_text()[-2000:]}"
            )
        time.sleep(0.5)  # a poll against a deadline
    return server


def join(hosts: Hosts, work: Path, name: str, env: dict, cut_bytes: int | None, args) -> dict:
    log = work / f"{name}.log"
    ns = hosts.workers[0]
    rx0 = hosts.link_bytes(ns)["rx"]
    t0 = time.monotonic()
    worker = subprocess.Popen(
        [*hosts.exec_args(ns), "nice", "-n", "5", str(BIN / "lte-worker"), "--server",
         f"{hosts.server_ip}:{PORT}", "--threads", "1", "--max-heads", "1", "--log-format", "json",
         "--name", name, "--loader-workers", "0"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    cut_at = None
    try:
        if cut_bytes is not None:
            deadline = time.monotonic() + args.timeout
            while hosts.link_bytes(ns)["rx"] - rx0 < cut_bytes:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"{name}: the join never reached {cut_bytes} bytes")
                time.sleep(0.05)
            cut_at = time.monotonic() - t0
            _cut(hosts, args.cut_s)
        done = _wait_log(log, "registered:", args.timeout, worker)
    finally:
        stop_processes([worker], timeout=30)
    text = log.read_text(errors="replace")
    return {
        "run": name,
        "dropped": cut_bytes is not None,
        "cut_at_s": cut_at,
        "join_s": round(done - t0, 2),
        "rx_bytes": hosts.link_bytes(ns)["rx"] - rx0,
        "retries": text.count("retrying in"),
        "resumed": text.count("resumed after chunk"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_drop_args(p)
    args = p.parse_args()
    if needs_root("bench/wan/drop_pull.py"):
        return 2
    work = Path(tempfile.mkdtemp(prefix="lte-drop-"))
    env = {**os.environ, "LTE_TOKEN": secrets.token_hex(16)}
    meta = run_meta(args)
    with Hosts(1, rate_mbit=args.rate, loss=args.loss, rtt_ms=args.rtt_ms) as hosts:
        server = start_server(
            hosts, work, env,
            ["--model", args.model, "--dataset", "fashion-mnist", "--heads", str(2 * args.repeats + 1),
             "--heads-per-worker", "1", "--steps", "100000", "--quant", args.quant],
        )  # fmt: skip
        try:
            results = pairs(args, lambda name, cut: join(hosts, work, name, env, cut, args), "rx_bytes")
        finally:
            stop_processes([server], timeout=30)
    meta["load_end"] = load_average()
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
