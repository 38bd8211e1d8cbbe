"""Load: many real workers against one parameter server on loopback, for a bounded time.

    python bench/load.py                          # 32 workers, 60 s, async (the published run)
    python bench/load.py --workers 8 --duration 20 --mode sync

The server runs in its own process (this script with ``--serve``: a ``Coordinator`` and a
``ParameterServer`` on 127.0.0.1 port 0), so its memory is its own: it samples its VmRSS from
/proc/self/status, its CPU time and its counters every ``--sample-every`` seconds and prints
them as JSON lines. The workers are real ``lte.worker.client.Worker`` objects, one thread each
in this process (32 processes would measure process start-up on a small machine, not the
server). The model is tiny (an MLP on digits, T = 1, rank 4) so that the server is what gets
exercised: every push is decoded, validated and merged, and every pull of a new version gets a
freshly encoded snapshot.

Errors are everything a worker did not expect: an exception out of ``run()``, a non-zero exit,
a retried RPC, a refused push, a lost lease. The run passes with zero of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def serve(args: argparse.Namespace) -> int:
    """The server process: serve the job, report a sample line every ``--sample-every`` s, stop on stdin EOF."""
    import torch

    from lte.common.data.datasets import load_dataset
    from lte.common.job.config import JobConfig
    from lte.server.coordinator import Coordinator
    from lte.server.grpc_server import ParameterServer

    torch.set_num_threads(1)
    dataset = load_dataset("digits", seed=0)
    job = JobConfig(
        model="mlp",
        dataset="digits",
        heads=args.workers,
        rank=4,
        alpha=16.0,
        merge_every=1,
        batch_size=8,
        steps=10_000_000,  # never ends by itself: the bench stops it
        mode=args.mode,
        lr=1e-3,
    ).with_dataset(dataset)
    coordinator = Coordinator(
        job, dataset, heads_per_worker=1, max_staleness=1_000_000, lease_timeout_s=60, eval_every=0
    )
    server = ParameterServer(coordinator, host="127.0.0.1", port=0).start()
    print(json.dumps({"port": server.port, "pid": os.getpid()}), flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    clock = os.sysconf("SC_CLK_TCK")
    started = time.monotonic()
    while True:
        with open("/proc/self/stat") as fh:
            utime, stime = (int(x) for x in fh.read().rsplit(")", 1)[1].split()[11:13])
        c = coordinator
        with c.lock:
            sample = {
                "t": round(time.monotonic() - started, 2),
                "rss_kb": _proc_status_kb("VmRSS"),
                "hwm_kb": _proc_status_kb("VmHWM"),
                "threads": threading.active_count(),
                "cpu_s": (utime + stime) / clock,
                "version": c.version,
                "head_rounds": c.head_rounds_applied,
                "refused": c.pushes_refused,
                "snapshot_builds": c.snapshots.builds,
                "live_leases": sum(l.state not in ("left", "expired") for l in c.leases.values()),
                "leases": len(c.leases),
                "history": len(c.history),
                "bytes_up": c.bytes_up,
                "bytes_down": c.bytes_down,
            }
        print(json.dumps(sample), flush=True)
        if stop.is_set():
            break
        stop.wait(args.sample_every)
    server.stop(grace=2.0)
    return 0


def drive(args: argparse.Namespace) -> int:
    import torch

    from lte.worker.client import Worker

    torch.set_num_threads(1)

    class CountingWorker(Worker):
        """A real worker that also counts what it says: every message it prints is a deviation."""

        said: Counter = Counter()
        lock = threading.Lock()

        def _say(self, message: str) -> None:
            kind = (
                "retry"
                if "retrying" in message
                else "refused push"
                if "not applied" in message
                else "lease lost"
                if "lease lost" in message
                else None
            )
            if kind:
                with self.lock:
                    self.said[kind] += 1

    cmd = [
        sys.executable,
        __file__,
        "--serve",
        "--workers",
        str(args.workers),
        "--mode",
        args.mode,
        "--sample-every",
        str(args.sample_every),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    samples: list[dict] = []
    try:
        hello = json.loads(server.stdout.readline())
        address = f"127.0.0.1:{hello['port']}"

        def read() -> None:
            for line in server.stdout:
                samples.append(json.loads(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        workers = [
            CountingWorker(address, quiet=True, name=f"load-{i}", give_up_after_s=30)
            for i in range(args.workers)
        ]
        results: list[dict] = [{} for _ in workers]

        def run(i: int) -> None:
            try:
                results[i]["code"] = workers[i].run()
            except BaseException as exc:  # counted as an error below
                results[i]["error"] = repr(exc)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(args.workers)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.duration)  # the load runs for exactly this long
        for w in workers:
            w.stop.set()
        for t in threads:
            t.join(timeout=60)
        wall = time.monotonic() - t0
        hung = sum(t.is_alive() for t in threads)
        server.stdin.close()  # the server takes a last sample and stops
        server.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    errors = Counter(CountingWorker.said)
    errors["exception"] = sum("error" in r for r in results)
    errors["non-zero exit"] = sum(r.get("code", 0) not in (0, None) for r in results)
    errors["hung worker"] = hung
    errors["refused push (server)"] = samples[-1]["refused"] if samples else 0
    pushes = sum(w.pushes for w in workers)
    print_report(args, samples, errors, pushes, wall, [r["error"] for r in results if "error" in r])
    return 0 if not sum(errors.values()) else 1


def print_report(
    args, samples: list[dict], errors: Counter, pushes: int, wall: float, messages: list[str]
) -> None:
    print(
        f"lte load bench: {args.workers} workers (threads), mlp on digits, N={args.workers} r=4 T=1, "
        f"mode {args.mode}, {args.duration:g} s on 127.0.0.1"
    )
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"
    )
    print()
    print("|  t (s) | server RSS (MiB) | heads merged | pushes/s | server CPU (%) | live leases | threads |")
    print("|-------:|-----------------:|-------------:|---------:|---------------:|------------:|--------:|")
    prev = None
    for s in samples:
        rate = cpu = ""
        if prev is not None and s["t"] > prev["t"]:
            dt = s["t"] - prev["t"]
            rate = f"{(s['head_rounds'] - prev['head_rounds']) / dt:.0f}"
            cpu = f"{100 * (s['cpu_s'] - prev['cpu_s']) / dt:.0f}"
        print(
            f"| {s['t']:6.1f} | {s['rss_kb'] / 1024:16.1f} | {s['head_rounds']:12d} | {rate:>8} | {cpu:>14} "
            f"| {s['live_leases']:11d} | {s['threads']:7d} |"
        )
        prev = s
    print()
    # steady state: from the first sample after every worker has pushed, to the last with all leases live
    busy = [s for s in samples if s["live_leases"] == args.workers and s["head_rounds"] >= args.workers]
    if len(busy) >= 2:
        first, last = busy[0], busy[-1]
        half = busy[len(busy) // 2]
        minutes = max(1e-9, last["t"] - half["t"]) / 60
        rate = (last["head_rounds"] - first["head_rounds"]) / max(1e-9, last["t"] - first["t"])
        cpu = 100 * (last["cpu_s"] - first["cpu_s"]) / max(1e-9, last["t"] - first["t"])
        print(
            f"steady state {first['t']:.0f}-{last['t']:.0f} s: {rate:.1f} pushes/s, server CPU {cpu:.0f} % of one core"
        )
        print(
            f"server RSS: {first['rss_kb'] / 1024:.1f} MiB at {first['t']:.0f} s, {half['rss_kb'] / 1024:.1f} MiB at "
            f"{half['t']:.0f} s, {last['rss_kb'] / 1024:.1f} MiB at {last['t']:.0f} s; second half "
            f"{(last['rss_kb'] - half['rss_kb']) / 1024 / minutes:+.1f} MiB/min; "
            f"peak {max(s['hwm_kb'] for s in samples) / 1024:.1f} MiB"
        )
    if samples:
        s = samples[-1]
        print(
            f"totals: {pushes} pushes acknowledged in {wall:.1f} s ({pushes / wall:.1f}/s), "
            f"{s['head_rounds']} heads merged, up {s['bytes_up'] / 1e6:.1f} MB, down {s['bytes_down'] / 1e6:.1f} MB"
        )
        print(
            f"snapshots built: {s['snapshot_builds']} for {s['version']} versions "
            f"({s['snapshot_builds'] / max(1, s['version']):.2f} per version)"
        )
    print(
        "errors: " + ", ".join(f"{k} {errors[k]}" for k in sorted(errors)) + f"; total {sum(errors.values())}"
    )
    for m in messages[:5]:
        print("  " + m)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=32, help="concurrent workers, one head each [32]")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load [60]")
    p.add_argument("--mode", choices=("async", "sync", "buffered"), default="async")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between server samples [5]")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    return serve(args) if args.serve else drive(args)


if __name__ == "__main__":
    sys.exit(main())
