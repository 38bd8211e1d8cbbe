"""A worker's push over a slow, lossy, long link, whole and with its connection dropped half-way.

    sudo python bench/wan/drop_push.py --rate 5 --loss 0.02 --rtt-ms 40 --model vit-tiny --rank 64 --json /tmp/drop-push.json

One server host and one worker host (bench/wan/netns.py), as ``drop_pull.py``. Each run starts a
fresh ``lte-server`` holding a one-round job (one head, ``--steps`` local steps, merged once: the
push that ends the round ends the job); an ``lte-worker`` joins it, trains the round, pushes its
factors, hears that the job is done and exits. ``--repeats`` times each:

- whole: undisturbed;
- dropped: once the worker's link has sent ``--cut-at`` of the whole run's bytes after the
  worker's "registered" line (its push, and a few heartbeats), the gRPC port is dropped for
  ``--cut-s`` seconds and both ends' connections destroyed (``drop_pull._cut``).

Each run records the bytes the worker's link sent after "registered" (the push, every retry of
it included) and the seconds to the worker's exit, and the worker's retries and resumed pushes
from its JSON log. Run it with this checkout's Python (resumable pushes, wire protocol 3) and with
an older checkout's: the ``lte-*`` commands come from the running Python's environment.
"""

from __future__ import annotations

import argparse
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

from drop_pull import (  # noqa: E402
    BIN,
    PORT,
    _cut,
    _wait_log,
    add_drop_args,
    load_average,
    needs_root,
    pairs,
    run_meta,
    start_server,
)
from netns import Hosts  # noqa: E402

from lte.server.run import stop_processes  # noqa: E402


def push_run(hosts: Hosts, work: Path, name: str, env: dict, cut_bytes: int | None, args) -> dict:
    """One fresh one-round job and one worker; the cut (``cut_bytes`` sent after joining) if given."""
    server = start_server(
        hosts, work, env,
        ["--model", args.model, "--dataset", "fashion-mnist", "--heads", "1", "--heads-per-worker", "1",
         "--steps", str(args.steps), "--merge-every", str(args.steps), "--rank", str(args.rank),
         "--quant", args.quant, "--eval-every", "0", "--eval-samples", "200"],
        name=f"{name}.run",
    )  # fmt: skip
    log = work / f"{name}.log"
    ns = hosts.workers[0]
    worker = subprocess.Popen(
        [*hosts.exec_args(ns), "nice", "-n", "5", str(BIN / "lte-worker"), "--server",
         f"{hosts.server_ip}:{PORT}", "--threads", "1", "--max-heads", "1", "--log-format", "json",
         "--name", name, "--loader-workers", "0"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    cut_at = None
    try:
        joined = _wait_log(log, "registered:", args.timeout, worker)
        tx0 = hosts.link_bytes(ns)["tx"]
        if cut_bytes is not None:
            deadline = time.monotonic() + args.timeout
            while hosts.link_bytes(ns)["tx"] - tx0 < cut_bytes:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"{name}: the push never reached {cut_bytes} bytes")
                time.sleep(0.02)  # a poll of the link's counter
            cut_at = time.monotonic() - joined
            _cut(hosts, args.cut_s)
        rc = worker.wait(timeout=args.timeout)
        ended = time.monotonic()
    finally:
        stop_processes([worker, server], timeout=30)
    text = log.read_text(errors="replace")
    return {
        "run": name,
        "dropped": cut_bytes is not None,
        "exit": rc,
        "cut_at_s": cut_at,
        "after_join_s": round(ended - joined, 2),
        "tx_bytes": hosts.link_bytes(ns)["tx"] - tx0,
        "retries": text.count("retrying in"),
        "resumed": text.count("sending the rest"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_drop_args(p)
    p.add_argument("--rank", type=int, default=64, help="LTE rank: the push's size")
    p.add_argument("--steps", type=int, default=2, help="local steps of the one round")
    args = p.parse_args()
    if needs_root("bench/wan/drop_push.py"):
        return 2
    work = Path(tempfile.mkdtemp(prefix="lte-drop-push-"))
    env = {**os.environ, "LTE_TOKEN": secrets.token_hex(16)}
    meta = run_meta(args)
    with Hosts(1, rate_mbit=args.rate, loss=args.loss, rtt_ms=args.rtt_ms) as hosts:
        results = pairs(args, lambda name, cut: push_run(hosts, work, name, env, cut, args), "tx_bytes")
    meta["load_end"] = load_average()
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
