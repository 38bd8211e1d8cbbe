"""Bytes on the wire per training sample: LTE over real gRPC, DDP over real gloo, DiLoCo by arithmetic.

    python bench/comm.py --models vit-tiny vit-b --out BENCHMARKS.md

LTE: a real ``ParameterServer`` (async mode, so every push makes a new version) and a real
``Worker`` in this process on 127.0.0.1. A gRPC client interceptor on the worker's channel counts
every message each way: its serialised protobuf size plus the 5-byte gRPC length prefix (HTTP/2
frame headers, about 9 bytes per 16 KiB frame, are not counted), and, apart, the tensor payload
bytes. The worker joins (register + first pull, reported apart), then each round trains T steps,
pushes its heads' factors and pulls the new snapshot. Per sample = bytes per round / samples the
worker trained in it (T x batch x heads per worker). The heads of one worker share its snapshot.

DDP: ``torch.multiprocessing`` spawns W processes, each a gloo rank on tcp://127.0.0.1 with the
same model and per-replica batch as an LTE head, wrapped in DistributedDataParallel. A comm hook
records the bytes of every bucket it all-reduces, then runs the default all-reduce. A ring
all-reduce of G bytes sends 2 (W-1)/W x G per rank and receives as much. As a cross-check the
loopback counters of /proc/net/dev are read around the timed steps (they count every process on
this machine, and each byte once: sent = received on ``lo``).

DiLoCo-style averaging every H = T steps: arithmetic from the parameter count (fp32 model per
sync, each way), for a ring all-reduce among W replicas and for a parameter server.

Options that differ per model take ``model=value`` items (``--rank vit-tiny=16 vit-b=64``); a bare
value applies to every model. ``--json`` saves the measurements, ``--from-json`` re-renders them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mdsections import machine, write_section

from lte.common.data.datasets import HeadBatches, load_dataset  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.models import count_parameters  # noqa: E402
from lte.common.job.trainer import build_job_model, linear_weight_names, loss_fn, make_optimizer  # noqa: E402
from lte.proto import parameter_server_pb2 as pb  # noqa: E402
from lte.proto import parameter_server_pb2_grpc as pb_grpc  # noqa: E402
from lte.server.coordinator import Coordinator  # noqa: E402
from lte.server.grpc_server import ParameterServer  # noqa: E402
from lte.worker.client import JobDone, Worker  # noqa: E402

SECTION = "comm"
GRPC_PREFIX = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes
TENSOR_MESSAGES = (pb.UpdateChunk, pb.ModelChunk)


# -- helpers ------------------------------------------------------------------------------------
def per_model(items: list[str], model: str, default: str | None = None) -> str | None:
    """The value of ``model=value`` for this model, else the last bare value, else ``default``."""
    bare, named = default, None
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            bare = item
        elif key == model:
            named = value
    return named if named is not None else bare


def loopback_bytes() -> int | None:
    """Bytes sent on ``lo`` so far (each loopback byte is counted once as sent, once as received)."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, sep, rest = line.partition(":")
                if sep and name.strip() == "lo":
                    return int(rest.split()[8])
    except (OSError, ValueError, IndexError):
        return None
    return None


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- LTE: bytes counted by a client interceptor ---------------------------------------------------
class ByteCounter(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Counts every message a channel sends and receives: wire bytes and tensor payload bytes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[tuple[str, str], list[int]] = {}  # (method, "up"|"down") -> [wire, payload, msgs]

    def add(self, method: str, direction: str, msg) -> None:
        wire = msg.ByteSize() + GRPC_PREFIX
        payload = len(msg.tensor.data) if isinstance(msg, TENSOR_MESSAGES) and msg.HasField("tensor") else 0
        key = (method.rsplit("/", 1)[-1], direction)
        with self.lock:
            row = self.totals.setdefault(key, [0, 0, 0])
            row[0] += wire
            row[1] += payload
            row[2] += 1

    def snapshot(self) -> dict[tuple[str, str], list[int]]:
        with self.lock:
            return {k: list(v) for k, v in self.totals.items()}

    def _unary_reply(self, method: str, outcome):
        with contextlib.suppress(grpc.RpcError):
            self.add(method, "down", outcome.result())
        return outcome

    def intercept_unary_unary(self, continuation, details, request):
        self.add(details.method, "up", request)
        return self._unary_reply(details.method, continuation(details, request))

    def intercept_stream_unary(self, continuation, details, request_iterator):
        def counted():
            for msg in request_iterator:
                self.add(details.method, "up", msg)
                yield msg

        return self._unary_reply(details.method, continuation(details, counted()))

    def intercept_unary_stream(self, continuation, details, request):
        self.add(details.method, "up", request)
        return _CountedStream(continuation(details, request), self, details.method)


class _CountedStream:
    """A server stream that counts each message as the caller reads it; everything else delegates."""

    def __init__(self, call, counter: ByteCounter, method: str) -> None:
        self._call, self._counter, self._method = call, counter, method

    def __iter__(self):
        return self

    def __next__(self):
        msg = next(self._call)
        self._counter.add(self._method, "down", msg)
        return msg

    def __getattr__(self, name):
        return getattr(self._call, name)


def diff(after: dict, before: dict) -> dict[str, dict[str, int]]:
    """Per direction: wire bytes, payload bytes, messages, and the wire bytes per RPC method."""
    out: dict[str, dict[str, int]] = {
        d: {"wire": 0, "payload": 0, "messages": 0, "by_method": {}} for d in ("up", "down")
    }
    for (method, direction), (wire, payload, msgs) in after.items():
        w0, p0, m0 = before.get((method, direction), (0, 0, 0))
        d = out[direction]
        d["wire"] += wire - w0
        d["payload"] += payload - p0
        d["messages"] += msgs - m0
        if wire - w0:
            d["by_method"][method] = d["by_method"].get(method, 0) + wire - w0
    return out


def lte_job(model: str, args, ds, rank: int, quant: str, uplink: str) -> JobConfig:
    return JobConfig(
        model=model,
        dataset="fashion-mnist",
        image_size=args.image_size,
        patch_size=args.patch_size,
        heads=args.heads,
        rank=rank,
        alpha=args.scale * rank,
        merge_every=args.merge_every,
        batch_size=args.batch_size,
        quant=quant,
        uplink=uplink,
        mode="async",
        steps=args.merge_every * 1000,
    ).with_dataset(ds)


def measure_lte(model: str, args, ds, rank: int, quant: str, hpw: int, uplink: str, rounds: int) -> dict:
    """One real server and one real worker holding ``hpw`` heads: bytes per round at the gRPC layer."""
    job = lte_job(model, args, ds, rank, quant, uplink)
    # A long lease: the worker's heartbeat starts after its join (model build + first pull), which
    # can outlast the default 30 s for vit-b with 4 heads on a loaded CPU.
    coordinator = Coordinator(job, None, heads_per_worker=hpw, max_staleness=10**6, lease_timeout_s=3600.0)
    counter = ByteCounter()
    out: dict = {"quant": quant, "uplink": uplink, "heads_per_worker": hpw, "rounds": []}
    with ParameterServer(coordinator, host="127.0.0.1", port=0) as server:
        worker = Worker(server.address, max_heads=hpw, quiet=True)
        worker.channel = grpc.intercept_channel(worker.channel, counter)
        worker.stub = pb_grpc.ParameterServerStub(worker.channel)
        lo0, t0 = loopback_bytes(), time.perf_counter()
        worker.register()  # Register + the first PullModel (the whole snapshot)
        lo1 = loopback_bytes()
        join = diff(counter.snapshot(), {})
        out["join"] = {**join, "seconds": time.perf_counter() - t0, "lo": _lo(lo0, lo1)}
        threading.Thread(target=worker.heartbeat.loop, daemon=True).start()
        for _ in range(rounds):
            before, lo0 = counter.snapshot(), loopback_bytes()
            t = time.perf_counter()
            turn = worker.turns[0]  # one turn: the worker holds no more heads than its room
            stats = turn.trainer.train_round()
            t_train = time.perf_counter() - t
            reply = worker.push(turn, stats)
            if not reply.applied:
                raise RuntimeError(f"push not applied: {reply}")
            turn.trainer.commit()
            for h in worker.next_rounds:
                worker.next_rounds[h] += 1
            t_push = time.perf_counter() - t - t_train
            with contextlib.suppress(JobDone):
                pulled = worker.pull(wait_s=0.0)
            if not pulled:
                raise RuntimeError("the worker did not pull a new snapshot after its push")
            t_total = time.perf_counter() - t
            lo1 = loopback_bytes()
            out["rounds"].append(
                {
                    **diff(counter.snapshot(), before),
                    "samples": stats.samples,
                    "train_s": t_train,
                    "push_s": t_push,
                    "pull_s": t_total - t_train - t_push,
                    "lo": _lo(lo0, lo1),
                }
            )
        worker.stop.set()
        worker.leave()
    return out


def _lo(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


# -- DDP: a real gloo run on loopback -------------------------------------------------------------
def _ddp_rank(rank: int, world: int, port: int, job_dict: dict, steps: int, threads: int, queue) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=_timeout()
    )
    try:
        job = JobConfig(**job_dict)
        ds = load_dataset(job.dataset, seed=job.seed)
        model = build_job_model(job)
        ddp = DistributedDataParallel(model)  # broadcasts rank 0's weights once (not counted)
        buckets: list[int] = []

        def hook(state, bucket):
            buf = bucket.buffer()
            buckets.append(buf.numel() * buf.element_size())
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, hook)
        opt = make_optimizer(ddp.parameters(), job)
        stream = HeadBatches(ds.train_x, ds.train_y, rank, world, job.batch_size, job.seed)
        per_step, times, lo = [], [], None
        for step in range(steps + 1):  # step 0 warms up (DDP may rebuild its buckets after it)
            dist.barrier()
            if step == 1 and rank == 0:
                lo = loopback_bytes()
            x, y = stream.batch(step)
            n0, t = len(buckets), time.perf_counter()
            loss = loss_fn(ds.task, ddp(x.to(job.torch_dtype)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step:
                times.append(time.perf_counter() - t)
            per_step.append(buckets[n0:])
        dist.barrier()
        lo_after = loopback_bytes() if rank == 0 else None
        queue.put(
            {
                "rank": rank,
                "buckets_per_step": [len(b) for b in per_step[1:]],
                "bucket_bytes_per_step": [sum(b) for b in per_step[1:]],
                "warmup_bucket_bytes": sum(per_step[0]),
                "step_s": times,
                "lo": _lo(lo, lo_after) if rank == 0 else None,
            }
        )
    finally:
        dist.destroy_process_group()


def _timeout():
    return datetime.timedelta(seconds=1800)


def measure_ddp(job: JobConfig, world: int, steps: int, batch: int) -> dict:
    job_dict = {**job.to_dict(), "batch_size": batch}
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    threads = max(1, (os.cpu_count() or 1) // world)
    t = time.perf_counter()
    mp.spawn(_ddp_rank, args=(world, free_port(), job_dict, steps, threads, queue), nprocs=world, join=True)
    wall = time.perf_counter() - t
    ranks = sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])
    g = ranks[0]["bucket_bytes_per_step"]
    if any(r["bucket_bytes_per_step"] != g for r in ranks):
        raise RuntimeError("ranks disagree on the bytes they all-reduced")
    return {
        "world": world,
        "batch": batch,
        "steps": steps,
        "buckets_per_step": ranks[0]["buckets_per_step"],
        "bucket_bytes_per_step": g,
        "warmup_bucket_bytes": ranks[0]["warmup_bucket_bytes"],
        "step_s": [max(r["step_s"][i] for r in ranks) for i in range(steps)],
        "lo": ranks[0]["lo"],
        "wall_s": wall,
        "threads_per_rank": threads,
    }


def ring(world: int) -> float:
    return 2 * (world - 1) / world


# -- one model ----------------------------------------------------------------------------------
def run_model(model: str, args, save=lambda result: None) -> dict:
    rank = int(per_model(args.rank, model, "64"))
    rounds = int(per_model(args.rounds, model, "2"))
    variants = per_model(args.variants, model, "int8:1,nf4:1,int8:4,nf4:4").split(",")
    worlds = [int(w) for w in per_model(args.ddp_world, model, "2").split(",") if w]
    ddp_batch = int(per_model(args.ddp_batch, model, str(args.batch_size)))
    ds = load_dataset("fashion-mnist", seed=0)
    job = lte_job(model, args, ds, rank, "int8", "fp16")
    plain = build_job_model(job)
    params = count_parameters(plain)
    linear = sum(plain.get_parameter(n).numel() for n in linear_weight_names(plain))
    factor_params = sum(
        rank * sum(plain.get_parameter(n).shape) for n in linear_weight_names(plain)
    )  # r (m + n) per layer
    del plain
    result = {
        "model": model,
        "params": params,
        "linear_params": linear,
        "factor_params_per_head": factor_params,
        "rank": rank,
        "T": args.merge_every,
        "batch": args.batch_size,
        "heads": args.heads,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "lte": [],
        "ddp": [],
        "load": [],
    }
    for spec in variants:
        parts = spec.split(":")
        quant, hpw = parts[0], int(parts[1])
        uplink = parts[2] if len(parts) > 2 else "fp16"
        t = time.perf_counter()
        print(f"[{model}] LTE {quant} snapshot, {uplink} uplink, {hpw} heads/worker ...", flush=True)
        r = measure_lte(model, args, ds, rank, quant, hpw, uplink, rounds)
        r["seconds"] = time.perf_counter() - t
        result["lte"].append(r)
        result["load"].append(uptime())
        save(result)
        print(f"  done in {r['seconds']:.0f} s; {uptime()}", flush=True)
    for world in worlds:
        t = time.perf_counter()
        print(f"[{model}] DDP gloo, {world} ranks, batch {ddp_batch}, {args.ddp_steps} steps ...", flush=True)
        result["ddp"].append(measure_ddp(job, world, args.ddp_steps, ddp_batch))
        result["load"].append(uptime())
        save(result)
        print(f"  done in {time.perf_counter() - t:.0f} s; {uptime()}", flush=True)
    return result


# -- tables -------------------------------------------------------------------------------------
def lte_per_sample(r: dict) -> tuple[float, float, float]:
    """(uplink, downlink, samples) per round, averaged over the measured rounds, per worker."""
    n = len(r["rounds"])
    up = sum(x["up"]["wire"] for x in r["rounds"]) / n
    down = sum(x["down"]["wire"] for x in r["rounds"]) / n
    samples = sum(x["samples"] for x in r["rounds"]) / n
    return up, down, samples


def render(results: list[dict], meta: dict) -> list[str]:
    lines = [
        "## Communication per training sample: LTE vs DDP vs DiLoCo-style (issue 6, item 1)",
        "",
        f"Generated by `bench/comm.py` on {meta['date']}; machine: {meta['machine']}; "
        f"torch {meta['torch']}, grpcio {meta['grpcio']}. Command ({meta.get('minutes', float('nan')):.1f} min):",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Load (`uptime`) at start: `{meta['load_start']}`; at end: `{meta.get('load_end', '')}`.",
        "",
    ]
    if meta.get("rendered"):
        lines += [f"Tables written from the saved measurements with `{meta['rendered']}`.", ""]
    for res in results:
        lines += render_model(res, meta)
    return lines


def render_model(res: dict, meta: dict) -> list[str]:
    model, T, b, n_heads = res["model"], res["T"], res["batch"], res["heads"]
    params = res["params"]
    who = "this run only (private network namespace)" if meta.get("private_lo") else "all processes"
    grad = None
    for d in res["ddp"]:
        grad = d["bucket_bytes_per_step"][-1]
    if grad is None:
        grad = params * 4
    ref_w = n_heads
    ddp_ref = ring(ref_w) * grad / b  # per sample, each way, at W = N (one replica per head)
    out = [
        f"### {model}",
        "",
        f"{params / 1e6:.1f}M parameters ({res['linear_params'] / 1e6:.1f}M in LTE layers), "
        f"{res['image_size']}x{res['image_size']} / patch {res['patch_size']}, r {res['rank']}, "
        f"T {T}, batch {b} per head and per DDP replica, N {n_heads} heads; factors per head "
        f"{res['factor_params_per_head'] / 1e6:.2f}M values. Bytes per training sample, per worker; "
        f"ratios against DDP with W = N = {ref_w} replicas (one per head, the same global batch).",
        "",
        *load_line(res["load"]),
        f"| method | how counted | uplink / sample | downlink / sample | up + down / sample | DDP(W={ref_w}) ÷ this, uplink | DDP(W={ref_w}) ÷ this, up + down |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["lte"]:
        up, down, samples = lte_per_sample(r)
        u, d = up / samples, down / samples
        out.append(
            f"| LTE, {r['quant']} snapshot, {r['uplink']} uplink, {r['heads_per_worker']} head(s)/worker "
            f"| gRPC, {len(r['rounds'])} round(s) | {human(u)} | {human(d)} | {human(u + d)} "
            f"| **{ddp_ref / u:.0f}x** | **{2 * ddp_ref / (u + d):.0f}x** |"
        )
    for dd in res["ddp"]:
        w = dd["world"]
        g = dd["bucket_bytes_per_step"][-1]
        per = ring(w) * g / dd["batch"]
        out.append(
            f"| DDP, W = {w} | gloo run, comm hook, {dd['steps']} steps | {human(per)} | {human(per)} "
            f"| {human(2 * per)} | {ddp_ref / per:.2f}x | {ddp_ref / per:.2f}x |"
        )
    out.append(
        f"| DDP, W = {ref_w} | ring arithmetic on the hook's {human(grad)} per step | {human(ddp_ref)} "
        f"| {human(ddp_ref)} | {human(2 * ddp_ref)} | 1.00x | 1.00x |"
    )
    model_bytes = params * 4
    dil_ring = ring(ref_w) * model_bytes / (T * b)
    dil_ps = model_bytes / (T * b)
    out.append(
        f"| DiLoCo-style, H = T = {T}, ring W = {ref_w} | arithmetic: {ring(ref_w):.3g} x fp32 model per sync, each way "
        f"| {human(dil_ring)} | {human(dil_ring)} | {human(2 * dil_ring)} | {ddp_ref / dil_ring:.1f}x | {ddp_ref / dil_ring:.1f}x |"
    )
    out.append(
        f"| DiLoCo-style, H = T = {T}, parameter server | arithmetic: fp32 model up and down per sync "
        f"| {human(dil_ps)} | {human(dil_ps)} | {human(2 * dil_ps)} | {ddp_ref / dil_ps:.1f}x | {ddp_ref / dil_ps:.1f}x |"
    )
    out += [
        "",
        "LTE per round and worker (means over the measured rounds; wire = protobuf bytes + 5-byte gRPC prefix per message; "
        f"payload = tensor bytes; `lo` = loopback bytes from /proc/net/dev over the round, {who}):",
        "",
        "| LTE variant | samples / round | push wire (payload) | pull wire (payload) | control msgs up+down | lo ÷ counted | first pull (join) | train / push / pull s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in res["lte"]:
        n = len(r["rounds"])

        def mean(key, direction, field, rounds=r["rounds"], n=n):
            if key is None:
                return sum(x[direction][field] for x in rounds) / n
            return sum(x[direction]["by_method"].get(key, 0) for x in rounds) / n

        push_w = mean("PushUpdate", "up", None)
        push_p = sum(x["up"]["payload"] for x in r["rounds"]) / n
        pull_w = mean("PullModel", "down", None)
        pull_p = sum(x["down"]["payload"] for x in r["rounds"]) / n
        total = mean(None, "up", "wire") + mean(None, "down", "wire")
        control = total - push_w - pull_w
        los = [x["lo"] for x in r["rounds"] if x["lo"] is not None]
        lo = f"{sum(los) / len(los) / total:.3f}" if los else "n/a"
        times = " / ".join(
            "-".join(
                f"{v:.1f}" for v in sorted({min(x[k] for x in r["rounds"]), max(x[k] for x in r["rounds"])})
            )
            for k in ("train_s", "push_s", "pull_s")
        )
        out.append(
            f"| {r['quant']}, {r['uplink']}, {r['heads_per_worker']} head(s) | {r['rounds'][0]['samples']} "
            f"| {human(push_w)} ({human(push_p)}) | {human(pull_w)} ({human(pull_p)}) | {human(control)} | {lo} "
            f"| {human(r['join']['down']['wire'])} in {r['join']['seconds']:.1f} s | {times} |"
        )
    if res["ddp"]:
        out += [
            "",
            "DDP (gloo, 127.0.0.1, one process per rank; the hook sees each bucket before its all-reduce; "
            f"`lo` = loopback bytes over the timed steps, {who}, divided by W: what one rank sent):",
            "",
            "| W | batch / replica | buckets / step | hook bytes / step | fp32 parameter bytes | ring sent / rank / step | lo / W / step | lo ÷ ring | s / step |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for dd in res["ddp"]:
            w, g = dd["world"], dd["bucket_bytes_per_step"][-1]
            sent = ring(w) * g
            lo = dd["lo"] / w / dd["steps"] if dd["lo"] is not None else None
            out.append(
                f"| {w} | {dd['batch']} | {dd['buckets_per_step'][-1]} | {human(g)} | {human(params * 4)} "
                f"| {human(sent)} | {human(lo) if lo is not None else 'n/a'} "
                f"| {(lo / sent) if lo is not None else float('nan'):.3f} | {sum(dd['step_s']) / len(dd['step_s']):.1f} |"
            )
    out += ["", *notes(res, ddp_ref, grad), ""]
    return out


def smallest_world(per_sample_g: float, lte: float, target: float, limit: int = 4096) -> int | None:
    """The fewest DDP replicas W at which ring bytes per sample / ``lte`` reach ``target``."""
    for w in range(2, limit + 1):
        if ring(w) * per_sample_g / lte >= target:
            return w
    return None


def load_line(loads: list[str]) -> list[str]:
    """The 1-minute load averages `uptime` gave after each measurement of a model."""
    values = [x.split("load average:")[-1].split(",")[0].strip() for x in loads]
    return (
        [f"Load (1-minute average from `uptime`) after each measurement: {', '.join(values)}.", ""]
        if values
        else []
    )


def notes(res: dict, ddp_ref: float, grad: float) -> list[str]:
    lines = []
    model, n_heads, b, T = res["model"], res["heads"], res["batch"], res["T"]
    g_per_sample = grad / b  # fp32 gradient bytes per sample; the ring sends ring(W) x this each way
    dil = ring(n_heads) * res["params"] * 4 / (T * b)
    measured = [d["world"] for d in res["ddp"]]
    for r in res["lte"]:
        up, down, samples = lte_per_sample(r)
        u, d = up / samples, down / samples
        ratio_up, ratio_total = ddp_ref / u, 2 * ddp_ref / (u + d)
        tag = ""
        if model == "vit-b" and res["rank"] == 64 and T == 10 and r["uplink"] == "fp16":
            w_up = smallest_world(g_per_sample, u, 300)
            w_total = smallest_world(2 * g_per_sample, u + d, 100)
            tag = (
                f" **Targets** (uplink ≥ 300x, total ≥ 100x) against DDP at W = {n_heads}: uplink "
                f"{'met' if ratio_up >= 300 else 'missed'}, total {'met' if ratio_total >= 100 else 'missed'}; "
                f"they hold against DDP from W = {w_up} (uplink) and W = {w_total} (total) replicas"
            )
            if measured:
                w = min(measured)
                tag += (
                    f"; against the measured W = {w} run: uplink {ring(w) * g_per_sample / u:.0f}x, "
                    f"total {2 * ring(w) * g_per_sample / (u + d):.0f}x"
                )
            tag += "."
        lines.append(
            f"- {model}, LTE {r['quant']} snapshot, {r['heads_per_worker']} head(s)/worker: uplink "
            f"{ratio_up:.0f}x and up + down {ratio_total:.0f}x smaller than DDP at W = {n_heads}, "
            f"{dil / u:.0f}x and {2 * dil / (u + d):.1f}x smaller than DiLoCo-style averaging (ring, W = "
            f"{n_heads}); the snapshot (downlink) is {100 * d / (u + d):.0f}% of LTE's bytes.{tag}"
        )
    for dd in res["ddp"]:
        w = dd["world"]
        g = dd["bucket_bytes_per_step"][-1]
        lines.append(
            f"- DDP W = {w} (measured): the hook all-reduced {human(g)} per step "
            f"({g / (res['params'] * 4):.4f} x the fp32 parameter bytes); at this W a rank sends "
            f"{ring(w):.2f} x that per step, so LTE's ratios against this run are "
            f"{ring(w) / ring(n_heads):.2f} x the W = {n_heads} ones above."
        )
    return lines


def merge_results(results: list[dict]) -> list[dict]:
    """One entry per model: the LTE and DDP measurements of several saved runs, concatenated."""
    by_model: dict[str, dict] = {}
    for r in results:
        if r["model"] not in by_model:
            by_model[r["model"]] = {
                **r,
                "lte": list(r["lte"]),
                "ddp": list(r["ddp"]),
                "load": list(r["load"]),
            }
        else:
            m = by_model[r["model"]]
            m["lte"] += r["lte"]
            m["ddp"] += r["ddp"]
            m["load"] += r["load"]
    return list(by_model.values())


# -- BENCHMARKS.md -------------------------------------------------------------------------------
NETNS_ENV = "LTE_BENCH_PRIVATE_LO"


def enter_private_loopback() -> None:
    """Re-run this command in a new network namespace whose only interface is its own loopback."""
    argv = [sys.executable, *sys.argv]
    script = 'ip link set lo up && exec "$@"'
    os.environ[NETNS_ENV] = "1"
    try:
        os.execvp("unshare", ["unshare", "-rn", "sh", "-c", script, "sh", *argv])
    except OSError as err:
        print(f"--private-lo: cannot unshare the network namespace ({err}); using the shared one")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit-tiny", "vit-b"])
    p.add_argument("--rank", nargs="+", default=["vit-tiny=16", "vit-b=64"])
    p.add_argument("--scale", type=float, default=64.0, help="s = alpha / r")
    p.add_argument("--heads", type=int, default=32, help="N, heads in the job (and DDP's reference W)")
    p.add_argument("--merge-every", type=int, default=10, help="T")
    p.add_argument("--batch-size", type=int, default=8, help="per head and per DDP replica")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["int8:1,nf4:1,int8:4,nf4:4"],
        help="LTE runs, comma-separated quant:heads_per_worker[:uplink]",
    )
    p.add_argument("--rounds", nargs="+", default=["vit-tiny=3", "vit-b=1"])
    p.add_argument("--ddp-world", nargs="+", default=["vit-tiny=2,3,4", "vit-b=2"])
    p.add_argument("--ddp-batch", nargs="+", default=[], help="per-replica batch (default --batch-size)")
    p.add_argument("--ddp-steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the LTE worker and server")
    p.add_argument("--json", help="save the measurements here")
    p.add_argument("--from-json", nargs="+", help="render saved measurements instead of running")
    p.add_argument("--out", help="write the table into this markdown file (the comm section)")
    p.add_argument(
        "--private-lo",
        action="store_true",
        help="run in a private network namespace (unshare -rn) so /proc/net/dev counts only this run",
    )
    args = p.parse_args()
    if args.private_lo and not os.environ.get(NETNS_ENV):
        enter_private_loopback()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        saved = [json.loads(Path(f).read_text()) for f in args.from_json]
        results = merge_results([r for s in saved for r in s["results"]])
        meta = saved[0]["meta"]
        meta["rendered"] = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        if len(saved) > 1:
            meta["command"] = "\n".join(s["meta"]["command"] for s in saved)
            meta["minutes"] = sum(s["meta"].get("minutes", 0.0) for s in saved)
            meta["load_end"] = saved[-1]["meta"].get("load_end", "")
    else:
        t0 = time.perf_counter()
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %Y %H:%M UTC"),
            "machine": machine(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "private_lo": bool(os.environ.get(NETNS_ENV)),
            "load_start": uptime(),
        }
        results: list[dict] = []

        def save(current: dict | None = None) -> None:
            if args.json:
                done = results + ([current] if current is not None else [])
                Path(args.json).write_text(json.dumps({"meta": meta, "results": done}, indent=1))

        for m in args.models:
            results.append(run_model(m, args, save))
        meta["load_end"] = uptime()
        meta["minutes"] = (time.perf_counter() - t0) / 60
        save()
    lines = render(results, meta)
    print("\n".join(lines))
    if args.out:
        write_section(Path(args.out), SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
