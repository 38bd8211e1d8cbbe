"""Time to accuracy over shaped links: LTE (sync, async) against DDP and DiLoCo on the same hosts.

    sudo python bench/wan/run.py --workers 2 --rates 20 100 --rtt-ms 40 --model mlp --json /tmp/wan.json

For each link rate it builds a server host and ``--workers`` worker hosts (network namespaces,
bench/wan/netns.py: tbf rate, nft loss, a transparent delay proxy on each worker host that every
TCP connection it opens goes through, for latency), runs every ``--methods`` entry
on them one after the other with the same model, data and sample budget (``--steps`` local steps
of ``--batch-size`` per worker), and tears the hosts down. Per run it records the wall time, the
bytes on each host's link from the interface counters, and accuracy against time (lte-server's
evaluations; the baselines' rank 0 evaluates on the same ``--eval-samples`` test subset).

- lte-sync / lte-async: ``lte-server`` on the server host (N = workers heads, one per worker),
  one ``lte-worker`` per worker host.
- ddp / diloco: bench/wan/baselines.py, one gloo rank per worker host (rank 0's host holds the
  store); the server host idles. Their traffic crosses the same shaped links and the same delay
  proxies (gloo's rank-to-rank connections and the store's): every method sees the same RTT.

Time to target: the target is the accuracy DDP reached at its budget minus ``--target-drop``
points; each method's time is its first evaluation at or above it (elapsed since its processes
were started, so start-up, model building and data loading count for every method).
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
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from netns import Hosts  # noqa: E402

from lte.server.run import stop_processes  # noqa: E402

BIN = Path(sys.executable).parent
PORT, STORE_PORT = 50051, 29500
# Per-model defaults: BENCHMARKS.md's tuned settings (convergence section) where they exist.
MODEL_DEFAULTS = {
    "mlp": {"rank": 128, "alpha": 8192.0, "lr_lte": 3e-4, "lr_full": 1e-3},
    "vit-micro": {"rank": 16, "alpha": 64.0, "lr_lte": 1e-3, "lr_full": 1e-3},  # issue 15's best LTE / full
}


def _start(hosts: Hosts, ns: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*hosts.exec_args(ns), "nice", "-n", "5", *argv],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def _counters(hosts: Hosts) -> dict[str, dict[str, int]]:
    return {ns: hosts.link_bytes(ns) for ns in [hosts.server, *hosts.workers]}


def _wait_port(hosts: Hosts, ns: str, host: str, port: int, timeout_s: float, proc: subprocess.Popen) -> None:
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=2).close()"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if (
            subprocess.run(
                [*hosts.exec_args(ns), sys.executable, "-c", probe], capture_output=True
            ).returncode
            == 0
        ):
            return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {host}:{port} in {ns} after {timeout_s} s")


def run_lte(hosts: Hosts, args, mode: str, work: Path) -> dict:
    d = MODEL_DEFAULTS.get(args.model, MODEL_DEFAULTS["mlp"])
    out = work / f"lte-{mode}"
    k = len(hosts.workers)
    heads, head_batch = lte_heads(args)
    server_argv = [
        str(BIN / "lte-server"), "--model", args.model, "--dataset", args.dataset,
        "--heads", str(heads), "--heads-per-worker", str(heads // k), "--rank", str(args.rank or d["rank"]),
        "--alpha", str(args.alpha or d["alpha"]), "--lr", str(args.lr_lte or d["lr_lte"]),
        "--steps", str(args.steps), "--batch-size", str(head_batch), "--merge-every", str(args.merge_every),
        "--mode", mode, "--quant", args.quant, "--uplink", args.uplink, "--seed", str(args.seed),
        "--eval-every", str(args.eval_every_rounds), "--eval-samples", str(args.eval_samples),
        "--host", hosts.server_ip, "--port", str(PORT), "--out", str(out), "--threads", "1",
        "--linger", "0", "--quiet", "--lease-timeout", "120", "--checkpoint-every", "0",
    ]  # fmt: skip
    before = _counters(hosts)
    t0 = time.monotonic()
    token = {"LTE_TOKEN": secrets.token_hex(16)}  # the server listens off loopback: it needs one
    procs = [_start(hosts, hosts.server, server_argv, work / f"lte-{mode}-server.log", env=token)]
    try:
        _wait_port(hosts, hosts.server, hosts.server_ip, PORT, 600, procs[0])
        # the server's evaluation times count from its coordinator's start, a little before it
        # listened: adding the whole wait counts the server's start-up against LTE, in full
        offset = time.monotonic() - t0
        for i, ns in enumerate(hosts.workers):
            worker = [str(BIN / "lte-worker"), "--server", f"{hosts.server_ip}:{PORT}", "--threads", "1",
                      "--max-heads", str(heads // k), "--log-format", "json", "--name", f"w{i}", "--loader-workers", "0"]  # fmt: skip
            procs.append(_start(hosts, ns, worker, work / f"lte-{mode}-worker{i}.log", env=token))
        rc = procs[0].wait(timeout=args.timeout)
        wall = time.monotonic() - t0
    finally:
        stop_processes(procs, timeout=10)
    after = _counters(hosts)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [
        {"time": e["time"] + offset, "samples": e["samples"], "acc": e["test_accuracy"]}
        for e in evals
        if e.get("eval")
    ]
    result = _result(f"lte-{mode}", rc, wall, curve, before, after, hosts)
    # what the slow-link tuning is about: leases lost and calls retried, from the workers' JSON logs
    text = "".join(log.read_text() for log in work.glob(f"lte-{mode}-worker*.log"))
    result["leases_lost"] = text.count("lease lost")
    result["retries"] = text.count("retrying in")
    return result


def lte_heads(args) -> tuple[int, int]:
    """LTE's N (``--lte-heads``, 0: one head per worker) and each head's batch: ``--batch-size`` x
    workers / N, so that LTE sees the samples DDP and DiLoCo see in the same number of steps."""
    heads = args.lte_heads or args.workers
    if heads < 1 or heads % args.workers or (args.batch_size * args.workers) % heads:
        print(
            f"run.py: error: --lte-heads {heads} must be a positive multiple of --workers {args.workers} "
            f"and divide --batch-size x workers = {args.batch_size * args.workers}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return heads, args.batch_size * args.workers // heads


def run_baseline(hosts: Hosts, args, method: str, work: Path) -> dict:
    d = MODEL_DEFAULTS.get(args.model, MODEL_DEFAULTS["mlp"])
    metrics = work / f"{method}.jsonl"
    metrics.unlink(missing_ok=True)
    before = _counters(hosts)
    t0, wall0 = time.monotonic(), time.time()
    procs = []
    try:
        for i, ns in enumerate(hosts.workers):
            argv = [
                sys.executable, str(HERE / "baselines.py"), "--method", method, "--rank", str(i),
                "--world", str(len(hosts.workers)), "--master", f"{hosts.worker_ips[0]}:{STORE_PORT}",
                "--model", args.model, "--dataset", args.dataset, "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--lr", str(args.lr_full or d["lr_full"]),
                "--inner-steps", str(args.merge_every), "--eval-every", str(args.merge_every * args.eval_every_rounds),
                "--eval-samples", str(args.eval_samples), "--seed", str(args.seed), "--out", str(metrics),
            ]  # fmt: skip
            procs.append(
                _start(hosts, ns, argv, work / f"{method}-rank{i}.log", env={"GLOO_SOCKET_IFNAME": "eth0"})
            )
        rcs = [p.wait(timeout=args.timeout) for p in procs]
        wall = time.monotonic() - t0
    finally:
        stop_processes(procs, timeout=10)
    after = _counters(hosts)
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    curve = [
        {"time": e["wall"] - wall0, "samples": e["samples"], "acc": e["test_accuracy"]}
        for e in lines
        if "step" in e
    ]
    return _result(method, max(rcs), wall, curve, before, after, hosts)


def _result(method, rc, wall, curve, before, after, hosts: Hosts) -> dict:
    links = {ns.rsplit("-", 1)[1]: {k: after[ns][k] - before[ns][k] for k in ("tx", "rx")} for ns in before}
    return {"method": method, "rc": rc, "wall_s": round(wall, 2), "curve": curve, "links": links}


def time_to(curve: list[dict], target: float) -> float | None:
    return next((c["time"] for c in curve if c["acc"] >= target), None)


def lte_line(meta: dict) -> str:
    """LTE's heads and their batch, as run (a run saved before ``--lte-heads``: one head per worker)."""
    heads, batch = meta.get("lte_heads") or (meta["workers"], meta["batch_size"])
    return f"N = {heads} heads of batch {batch}"


def render(results: list[dict], meta: dict) -> list[str]:
    scope = meta.get("rtt_scope", "LTE's gRPC only")  # runs saved before every method got the RTT
    lines = [
        f"## Over shaped links: time to accuracy, {meta['model']} (bench/wan, issue 23)",
        "",
        f"{meta['date']}, {meta['machine']}; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end (this run's own processes count in it); the seconds are this "
        "machine's, and only their ratios within one run compare.",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"{meta['workers']} worker hosts, {meta['model']} on {meta['dataset']}, {meta['steps']} local steps "
        f"of batch {meta['batch_size']} per worker ({meta['steps'] * meta['batch_size'] * meta['workers']} "
        f"samples), T = H = {meta['merge_every']}; LTE {lte_line(meta)}, {meta['quant']} snapshots, "
        f"{meta['uplink']} uplink; "
        f"RTT +{meta['rtt_ms']} ms ({scope}), loss {meta['loss'] * 100:g} %.",
        "",
    ]
    for rate in sorted({r["rate_mbit"] for r in results}):
        rows = [r for r in results if r["rate_mbit"] == rate]
        ddp = next((r for r in rows if r["method"] == "ddp" and r["curve"]), None)
        target = ddp["curve"][-1]["acc"] - meta["target_drop"] / 100 if ddp else None
        ddp_t = time_to(ddp["curve"], target) if ddp and target is not None else None
        lines += [
            f"### {rate:g} Mbit/s per worker link"
            + (
                f" (target {target * 100:.1f} %: DDP's final accuracy minus {meta['target_drop']:g} point)"
                if target
                else ""
            ),
            "",
            "| method | final acc | wall s | time to target s | DDP ÷ this | worker link up / sample | down / sample | server link rx + tx | leases lost / retries |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        samples = meta["steps"] * meta["batch_size"] * meta["workers"]
        for r in rows:
            final = r["curve"][-1]["acc"] if r["curve"] else float("nan")
            t = time_to(r["curve"], target) if target is not None else None
            workers = [v for k, v in r["links"].items() if k != "srv"]
            up = sum(v["tx"] for v in workers) / samples
            down = sum(v["rx"] for v in workers) / samples
            srv = r["links"]["srv"]["rx"] + r["links"]["srv"]["tx"]
            ratio = f"{ddp_t / t:.2f}x" if t and ddp_t else "-"
            lost = f"{r['leases_lost']} / {r['retries']}" if "leases_lost" in r else "-"
            name = r["method"] if r["rc"] == 0 else f"{r['method']} (exit {r['rc']})"
            lines.append(
                f"| {name} | {final * 100:.1f} % | {r['wall_s']:.0f} | "
                f"{'not reached' if t is None else f'{t:.0f}'} | {ratio} | {up / 1e3:.2f} kB | {down / 1e3:.2f} kB | {srv / 1e6:.1f} MB | {lost} |"
            )
        lines.append("")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="K worker hosts (2-4)")
    p.add_argument("--rates", type=float, nargs="+", default=[20.0], help="Mbit/s per worker link, each way")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="added round-trip time, every method")
    p.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped each way, e.g. 0.02")
    p.add_argument("--methods", nargs="+", default=["lte-sync", "lte-async", "ddp", "diloco"])
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--steps", type=int, default=200, help="local steps per worker")
    p.add_argument(
        "--lte-heads",
        type=int,
        default=0,
        help="LTE's N heads, spread evenly over the workers (0: one per worker); each head's batch is "
        "--batch-size x workers / N, so every method sees the same samples",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--merge-every", type=int, default=10, help="LTE's T and DiLoCo's H")
    p.add_argument(
        "--eval-every-rounds", type=int, default=2, help="evaluate every this many rounds of T steps"
    )
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--rank", type=int, default=0, help="0: the model's default")
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--lr-lte", type=float, default=0.0)
    p.add_argument("--lr-full", type=float, default=0.0, help="DDP's lr and DiLoCo's inner lr")
    p.add_argument("--quant", default="int8")
    p.add_argument("--uplink", default="fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-drop", type=float, default=0.5, help="points below DDP's final accuracy")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--work-dir", help="logs and run folders (kept) [a new temporary folder]")
    p.add_argument("--json", help="save the measurements here")
    p.add_argument("--from-json", help="render saved measurements instead of running")
    p.add_argument(
        "--out", help="write the markdown into this file (section wan-<model>-<loss>) instead of stdout"
    )
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results, meta = saved["results"], saved["meta"]
    else:
        if os.geteuid() != 0:
            print(
                "bench/wan/run.py: error: building network namespaces needs root (run it with sudo)",
                file=sys.stderr,
            )
            return 2
        load = lambda: " ".join(Path("/proc/loadavg").read_text().split()[:3])  # noqa: E731
        from mdsections import machine

        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %Y %H:%M UTC"),
            "machine": machine(),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "load_start": load(),
            "rtt_scope": "every TCP connection a worker host opens, all methods",
            **{k: getattr(args, k) for k in ("workers", "model", "dataset", "steps", "batch_size", "merge_every",
                                              "quant", "uplink", "rtt_ms", "loss", "target_drop")},
            "lte_heads": lte_heads(args),
        }  # fmt: skip
        results = []
        tmp = args.work_dir or tempfile.mkdtemp(prefix="lte-wan-")
        print(f"logs and run folders in {tmp}", flush=True)
        if True:
            for rate in args.rates:
                with Hosts(args.workers, rate_mbit=rate, loss=args.loss, rtt_ms=args.rtt_ms) as hosts:
                    for method in args.methods:
                        work = Path(tmp) / f"{rate:g}"
                        work.mkdir(parents=True, exist_ok=True)
                        print(f"[{rate:g} Mbit/s] {method} ...", flush=True)
                        if method.startswith("lte-"):
                            r = run_lte(hosts, args, method.removeprefix("lte-"), work)
                        else:
                            r = run_baseline(hosts, args, method, work)
                        r["rate_mbit"] = rate
                        results.append(r)
                        if args.json:  # after every run: a run killed later keeps what it measured
                            Path(args.json).write_text(
                                json.dumps({"meta": meta, "results": results}, indent=1)
                            )
                        print(
                            f"  rc {r['rc']}, {r['wall_s']} s, final {r['curve'][-1] if r['curve'] else None}",
                            flush=True,
                        )
                        if r["rc"] != 0:
                            logs = sorted(work.glob(f"*{method.removeprefix('lte-')}*.log"))
                            for log in logs:
                                print(f"--- {log.name}\n{log.read_text()[-2000:]}", flush=True)
        meta["load_end"] = load()
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = render(results, meta)
    if args.out:
        from mdsections import write_section

        write_section(Path(args.out), f"wan-{meta['model']}-{meta['loss']:g}", lines)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
