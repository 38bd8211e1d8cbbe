"""The server's push ingest (decompress + validate + merge) against raw gRPC and a plain GEMM.

    python bench/server_throughput.py --pushers 1 8 32 --out BENCHMARKS.md

A real ``ParameterServer`` (``mode="async"``, so every push merges at once, and a staleness bound
no push reaches) serves a vit-b job on 127.0.0.1. Each pusher is a thread with its own channel
and lease (``Register`` through the stub) that sends a push stream built once: the factors of one
head (fp16 + zstd, the default uplink) and the replica deltas (fp32 + zstd), encoded with
``encode_tensor`` and cut with ``tensor_chunks``; only the header (round id, base version)
changes between pushes. A head's first push is sent before the clock starts, so every timed
merge also subtracts the head's previous factors, as in steady state.

In the same run, at each concurrency:

- transport only: the same pushes through the same service with decoding, validation and
  ``apply_push`` replaced by no-ops (gRPC, protobuf, chunk assembly and the service loop remain);
- raw: the same serialised messages as plain bytes through a minimal stream-unary service
  (``grpc.method_handlers_generic_handler``, no (de)serialisers) on the same server options;
- stage times inside the real run, from wrappers around ``decode_tensor`` (zstd + fp16 -> fp32),
  ``push_check.check_tensor`` (names, shapes, codecs, the finite check), ``Coordinator.apply_push`` (lock wait +
  merge) and ``Coordinator._merge_pending`` (the merge), and each stage alone, uncontended;
- a plain ``torch.mm`` of the merge's shapes (per layer ``[m, 2r] x [2r, n]``) on the server's device.

Snapshot pull: a ``PullModel`` of a new version (the server quantises and compresses it, then
streams it) and of the same version again (cached), against the same serialised messages as
raw bytes through a unary-stream method of the raw service.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import datetime
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mdsections import machine, write_section

import lte.server.push_check as push_check_module  # noqa: E402
import lte.server.service as service_module  # noqa: E402
from lte.common.core.merge import HeadUpdate, ReplicaUpdate, apply_updates  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.wire import grpc_options  # noqa: E402
from lte.common.wire.chunks import tensor_chunks  # noqa: E402
from lte.common.wire.codec import decode_tensor, encode_tensor  # noqa: E402
from lte.proto import parameter_server_pb2 as pb  # noqa: E402
from lte.proto import parameter_server_pb2_grpc as pb_grpc  # noqa: E402
from lte.server.coordinator import Coordinator  # noqa: E402
from lte.server.grpc_server import ParameterServer  # noqa: E402
from lte.server.service import ParameterServerService  # noqa: E402

SECTION = "server"
RAW_SERVICE = "ltebench.Raw"
# A worker's round on this CPU (vit-b, 1 head, T 10, batch 8): BENCHMARKS.md "One vit-b round over gRPC".
CPU_WORKER_ROUND_S = (51.0, 87.2)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- stage timers -------------------------------------------------------------------------------
class Stages:
    """Seconds spent in each instrumented stage, summed over threads, and call counts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.profiler: cProfile.Profile | None = None
        self.profiled = 0
        with self.lock:
            self.seconds: dict[str, float] = {}
            self.calls: dict[str, int] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.calls[stage] = self.calls.get(stage, 0) + 1

    def wrap(self, stage: str, fn, device: torch.device | None = None):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if device is not None:
                    sync(device)
                self.add(stage, time.perf_counter() - t)

        return timed


def instrument(c: Coordinator, stages: Stages, device: torch.device, move_to_device: bool) -> dict:
    """Wrap the stages of a push; returns the originals, to stub them out and put them back."""
    originals = {
        "decode": service_module.decode_tensor,
        "validate": push_check_module.check_tensor,
        "apply": c.apply_push,
        "merge": c._merge_pending,
        "handler": ParameterServerService.PushUpdate,
    }
    apply = originals["apply"]
    if move_to_device:  # see the report: the server leaves decoded pushes on the CPU

        def apply(header, tensors, *received, _apply=originals["apply"]):
            t = time.perf_counter()
            moved = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
            sync(device)
            stages.add("to_device", time.perf_counter() - t)
            return _apply(header, moved, *received)

    service_module.decode_tensor = stages.wrap("decode", originals["decode"])
    push_check_module.check_tensor = stages.wrap("validate", originals["validate"], device)
    c.apply_push = stages.wrap("apply", apply)
    c._merge_pending = stages.wrap("merge", originals["merge"], device)
    handler = originals["handler"]

    def push_update(self, request_iterator, context):
        t = time.perf_counter()
        prof = stages.profiler  # set only while one pusher runs: cProfile follows this thread alone
        try:
            if prof is not None:
                stages.profiled += 1
                return prof.runcall(handler, self, request_iterator, context)
            return handler(self, request_iterator, context)
        finally:
            stages.add("handler", time.perf_counter() - t)

    ParameterServerService.PushUpdate = push_update
    return originals


@contextlib.contextmanager
def transport_only(c: Coordinator, stages: Stages):
    """Decode, validation and apply_push become no-ops: what is left is the transport path."""
    saved = (service_module.decode_tensor, push_check_module.check_tensor, c.apply_push)
    zeros: dict[tuple[int, ...], torch.Tensor] = {}

    def fake_decode(enc, **_):
        t = zeros.get(enc.shape)
        if t is None:
            t = zeros[enc.shape] = torch.zeros(enc.shape)
        return t

    def fake_apply(header, tensors, *received):
        return {"applied": True, "duplicate": False, "version": c.version, "staleness": 0, "weight": 0.0}

    service_module.decode_tensor = fake_decode
    push_check_module.check_tensor = lambda *a, **k: None
    c.apply_push = fake_apply
    try:
        yield
    finally:
        service_module.decode_tensor, push_check_module.check_tensor, c.apply_push = saved


# -- the raw bytes service ----------------------------------------------------------------------
class RawServer:
    """Stream-unary ``Push`` that only counts the bytes, unary-stream ``Pull`` that replays bytes."""

    def __init__(self, pull_messages: list[bytes]) -> None:
        self.pull_messages = pull_messages
        threads = grpc_options.SERVER_THREADS
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="raw-rpc"),
            options=grpc_options.server_options(),
            maximum_concurrent_rpcs=threads * 4,
        )
        handlers = {
            "Push": grpc.stream_unary_rpc_method_handler(self.push),
            "Pull": grpc.unary_stream_rpc_method_handler(self.pull),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def push(self, request_iterator, context) -> bytes:
        n = 0
        for message in request_iterator:
            n += len(message)
        return n.to_bytes(8, "little")

    def pull(self, request: bytes, context):
        yield from self.pull_messages

    def stop(self) -> None:
        self.server.stop(1).wait()


# -- pushers ------------------------------------------------------------------------------------
def encode_head(c: Coordinator, seed: int) -> list[tuple[str, object]]:
    """One head's push, encoded once: (name suffix, EncodedTensor) for factors and replica deltas."""
    job = c.job
    gen = torch.Generator().manual_seed(seed)
    level = None if job.zstd_level < 0 else job.zstd_level
    out = []
    for name, shape in c.expected_tensors([0]).items():
        if name.startswith("head/0/"):
            suffix, codec, std = name.removeprefix("head/0/"), job.uplink, 0.02
        else:
            suffix, codec, std = name, "fp32", 1e-3  # replicas travel in fp32, as the worker sends them
        tensor = torch.randn(shape, generator=gen) * std
        out.append((suffix, encode_tensor(name, tensor, codec, level)))
    return out


def head_messages(encoded, head_id: int, max_chunk_bytes: int) -> list[pb.UpdateChunk]:
    messages = []
    for suffix, enc in encoded:
        name = suffix if suffix.startswith("replica/") else f"head/{head_id}/{suffix}"
        renamed = dataclasses.replace(enc, name=name)
        messages += [pb.UpdateChunk(tensor=ch) for ch in tensor_chunks(renamed, max_chunk_bytes)]
    return messages


class Pusher:
    """A fake worker: one channel, one lease, one head, a push stream built once."""

    def __init__(self, address: str, index: int, encoded, max_chunk_bytes: int) -> None:
        self.channel = grpc.insecure_channel(address, grpc_options.channel_options())
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        reply = self.stub.Register(
            pb.RegisterRequest(worker=pb.WorkerInfo(name=f"pusher-{index}", max_heads=1)), timeout=60
        )
        head = reply.heads[0]
        self.lease_id, self.head_id, self.round = reply.lease_id, head.head_id, head.next_round
        self.merged_before = head.has_factors
        self.version = reply.version
        self.messages = head_messages(encoded, self.head_id, max_chunk_bytes)
        self.num_tensors = len(encoded)
        self.payload = sum(len(m.tensor.data) for m in self.messages)
        self.latencies: list[float] = []

    def header(self) -> pb.UpdateChunk:
        return pb.UpdateChunk(
            header=pb.PushHeader(
                lease_id=self.lease_id,
                base_version=self.version,
                heads=[pb.HeadRound(head_id=self.head_id, round=self.round)],
                steps=10,
                samples=80,
                train_loss=1.0,
                num_tensors=self.num_tensors,
                seconds=1.0,
            )
        )

    def push(self, real: bool = True) -> None:
        t = time.perf_counter()
        reply = self.stub.PushUpdate(iter([self.header(), *self.messages]), timeout=900)
        self.latencies.append(time.perf_counter() - t)
        if not reply.applied:
            raise RuntimeError(f"push of head {self.head_id} not applied: {reply}")
        if real:
            self.round += 1
            self.version = reply.version

    def wire_bytes(self) -> list[bytes]:
        return [m.SerializeToString() for m in [self.header(), *self.messages]]

    def close(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.stub.Leave(pb.LeaveRequest(lease_id=self.lease_id, reason="bench"), timeout=10)
        self.channel.close()


def run_parallel(count: int, fn) -> float:
    """Run ``fn(i)`` in ``count`` threads released together; wall seconds until the last one ends."""
    barrier = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            fn(i)
        except BaseException as err:  # re-raised below, in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def raw_push_pass(port: int, wire: list[bytes], count: int, per: int) -> float:
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", grpc_options.channel_options()) for _ in range(count)
    ]
    calls = [ch.stream_unary(f"/{RAW_SERVICE}/Push") for ch in channels]
    expected = sum(len(m) for m in wire)
    for call in calls:  # connect first, as the pushers' channels already are
        call(iter(wire[:1]), timeout=60)

    def body(i: int) -> None:
        for _ in range(per):
            got = int.from_bytes(calls[i](iter(wire), timeout=900), "little")
            if got != expected:
                raise RuntimeError(f"raw push delivered {got} of {expected} bytes")

    try:
        return run_parallel(count, body)
    finally:
        for ch in channels:
            ch.close()


# -- stages alone ---------------------------------------------------------------------------------
class Alone:
    """Each stage of one push on its own, outside gRPC (median seconds), and the plain GEMM."""

    def __init__(self, c: Coordinator, encoded, device: torch.device, validate) -> None:
        job = c.job
        self.device = device
        expected = c.expected_tensors([0])
        encs = [
            dataclasses.replace(enc, name=f"head/0/{s}" if not s.startswith("replica/") else s)
            for s, enc in encoded
        ]

        def decode_all():
            return {e.name: decode_tensor(e, max_elements=math.prod(expected[e.name])).float() for e in encs}

        tensors = decode_all()

        def validate_all():
            for e in encs:
                validate(e.name, tensors[e.name], e.codec, expected)

        moved = {k: v.to(device) for k, v in tensors.items()}
        master = {k: torch.randn_like(v) for k, v in c.master.items()}
        factors = {n: (moved[f"head/0/{n}/B"], moved[f"head/0/{n}/A"]) for n in c.layer_names}
        prev = {0: {n: (b.clone(), a.clone()) for n, (b, a) in factors.items()}}
        replica = ReplicaUpdate(1, {n: moved[f"replica/{n}"] for n in c.replica_names})

        def merge():
            apply_updates(
                master,
                prev,
                [HeadUpdate(0, factors)],
                [1.0 / job.heads],
                [(1.0 / job.heads, replica)],
                scale=job.scale,
            )

        r = job.rank
        shapes = [tuple(c.master[n].shape) for n in c.layer_names]
        lefts = [torch.randn(m, 2 * r, device=device) for m, _ in shapes]
        rights = [torch.randn(2 * r, n, device=device) for _, n in shapes]
        outs = [torch.empty(m, n, device=device) for m, n in shapes]

        def gemm():
            for a, b, o in zip(lefts, rights, outs, strict=True):
                torch.mm(a, b, out=o)

        self.fns = {"decode": decode_all, "validate": validate_all, "merge": merge, "gemm": gemm}
        self.flops = sum(2 * m * n * 2 * r for m, n in shapes)

    def measure(self, repeat: int) -> dict[str, float]:
        """Median over ``repeat`` rounds that run every stage once, interleaved, so drift hits all alike."""
        times: dict[str, list[float]] = {name: [] for name in self.fns}
        for fn in self.fns.values():  # warm up
            fn()
        sync(self.device)
        for _ in range(repeat):
            for name, fn in self.fns.items():
                t = time.perf_counter()
                fn()
                sync(self.device)
                times[name].append(time.perf_counter() - t)
        return {name: statistics.median(v) for name, v in times.items()}


def top_functions(prof: cProfile.Profile, calls: int, limit: int) -> list[dict]:
    """The ``limit`` functions with the most own time, per profiled call."""
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(file).name}:{line}" if file != "~" else "built-in"
        rows.append(
            {
                "function": func,
                "where": where,
                "ms": tottime / calls * 1e3,
                "cum_ms": cumtime / calls * 1e3,
                "calls": ncalls / calls,
            }
        )
    rows.sort(key=lambda r: -r["ms"])
    return rows[:limit]


# -- pulls --------------------------------------------------------------------------------------
def pull_pass(address: str, lease_id: str, count: int) -> tuple[float, int]:
    channels = [grpc.insecure_channel(address, grpc_options.channel_options()) for _ in range(count)]
    stubs = [pb_grpc.ParameterServerStub(ch) for ch in channels]
    for stub in stubs:  # connect
        stub.Heartbeat(pb.HeartbeatRequest(lease_id=lease_id, state="waiting"), timeout=60)
    got = [0] * count

    def body(i: int) -> None:
        request = pb.PullRequest(lease_id=lease_id, have_version=-1, wait_newer_s=0.0)
        for msg in stubs[i].PullModel(request, timeout=900):
            got[i] += len(msg.tensor.data)

    try:
        wall = run_parallel(count, body)
    finally:
        for ch in channels:
            ch.close()
    return wall, sum(got)


def raw_pull_pass(port: int, count: int) -> tuple[float, int]:
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", grpc_options.channel_options()) for _ in range(count)
    ]
    calls = [ch.unary_stream(f"/{RAW_SERVICE}/Pull") for ch in channels]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=60)
    got = [0] * count

    def body(i: int) -> None:
        for message in calls[i](b"", timeout=900):
            got[i] += len(message)

    try:
        wall = run_parallel(count, body)
    finally:
        for ch in channels:
            ch.close()
    return wall, sum(got)


# -- the run ------------------------------------------------------------------------------------
def run(args) -> dict:
    device = torch.device(args.device)
    levels = sorted(set(args.pushers))
    job = JobConfig(
        model=args.model,
        dataset="fashion-mnist",
        image_size=args.image_size,
        in_channels=1,
        num_classes=10,
        patch_size=args.patch_size,
        task="classification",
        heads=max(levels) + 1,  # one more lease for the pullers
        rank=args.rank,
        alpha=args.alpha,
        merge_every=10,
        quant=args.quant,
        uplink=args.uplink,
        mode="async",
        steps=10**9,
    )
    c = Coordinator(
        job, None, device=args.device, heads_per_worker=1, max_staleness=10**9, lease_timeout_s=3600.0
    )
    stages = Stages()
    move = device.type != "cpu" and args.move_to_device
    originals = instrument(c, stages, device, move)
    encoded = encode_head(c, seed=0)
    alone = Alone(c, encoded, device, originals["validate"])
    out: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "rank": args.rank,
        "quant": args.quant,
        "uplink": args.uplink,
        "layers": len(c.layer_names),
        "merged_weights": sum(c.master[n].numel() for n in c.layer_names),
        "moved_to_device": move,
        "flops": alone.flops,
        "levels": [],
        "load": [],
    }
    pushers: list[Pusher] = []
    try:
        with ParameterServer(c, host="127.0.0.1", port=0) as server:
            print(f"server on {server.address}, {job.model} r {job.rank}, device {device}", flush=True)
            raw = None
            for level in levels:
                while len(pushers) < level:
                    pushers.append(Pusher(server.address, len(pushers), encoded, job.max_chunk_bytes))
                active = pushers[:level]
                per = max(1, math.ceil(args.pushes / level))
                warm = [p for p in active if not p.merged_before]
                run_parallel(len(warm), lambda i, warm=warm: warm[i].push())  # first merges: not timed
                for p in warm:
                    p.merged_before = True
                if raw is None:
                    raw = RawServer([])
                wire = active[0].wire_bytes()
                row: dict = {"pushers": level, "pushes": level * per, "push_payload": active[0].payload}
                row["push_wire"] = sum(len(m) + 5 for m in wire)
                # the real ingest
                for p in active:
                    p.latencies = []
                stages.reset()
                profile = args.profile and level == 1
                if profile:
                    stages.profiler = cProfile.Profile()
                v0 = c.version
                row["wall_s"] = run_parallel(
                    level, lambda i, a=active, per=per: [a[i].push() for _ in range(per)]
                )
                if profile:
                    row["profile"] = top_functions(stages.profiler, stages.profiled, args.profile)
                    stages.profiler, stages.profiled = cProfile.Profile(), 0
                if c.version - v0 != level * per:
                    raise RuntimeError(f"expected {level * per} merges, the version moved {c.version - v0}")
                row["latency_s"] = sorted(x for p in active for x in p.latencies)
                row["stages_s"] = dict(stages.seconds)
                row["stage_calls"] = dict(stages.calls)
                # transport only and raw gRPC, interleaved, median wall time of a few passes
                transport, raws = [], []
                for rep in range(args.transport_repeat):
                    with transport_only(c, stages):
                        transport.append(
                            run_parallel(
                                level,
                                lambda i, a=active, per=per: [a[i].push(real=False) for _ in range(per)],
                            )
                        )
                    if profile and rep == 0:
                        row["transport_profile"] = top_functions(
                            stages.profiler, stages.profiled, args.profile
                        )
                        stages.profiler = None
                    raws.append(raw_push_pass(raw.port, wire, level, per))
                row["transport_wall_s"], row["raw_wall_s"] = (
                    statistics.median(transport),
                    statistics.median(raws),
                )
                row["transport_walls_s"], row["raw_walls_s"] = transport, raws
                # each stage alone, right after, under the same load
                row["alone"] = alone.measure(args.repeat)
                out["levels"].append(row)
                out["load"].append(uptime())
                mb = row["pushes"] * row["push_payload"] / 1e6
                print(
                    f"{level:3d} pushers: {row['pushes']} pushes in {row['wall_s']:.1f} s "
                    f"({mb / row['wall_s']:.0f} MB/s), transport only {mb / row['transport_wall_s']:.0f} MB/s, "
                    f"raw {mb / row['raw_wall_s']:.0f} MB/s; {uptime()}",
                    flush=True,
                )
            # snapshot pulls
            puller = Pusher(server.address, 10_000, encoded[:0], job.max_chunk_bytes)
            pulls = []
            for count in sorted(set(args.pullers)):
                pushers[0].push()
                t = time.perf_counter()
                version, messages, payload = c.snapshot_messages()
                build_s = time.perf_counter() - t  # quantise + zstd of the new version, once
                c.snapshots.invalidate()  # drop it again: the timed pull below builds it, as a real one does
                new_wall, new_bytes = pull_pass(server.address, puller.lease_id, count)
                cached_wall, cached_bytes = pull_pass(server.address, puller.lease_id, count)
                version, messages, payload = c.snapshot_messages()
                raw.pull_messages = [m.SerializeToString() for m in messages]
                raw_wall, raw_bytes = raw_pull_pass(raw.port, count)
                pulls.append(
                    {
                        "pullers": count,
                        "snapshot_payload": payload,
                        "snapshot_wire": sum(len(m) + 5 for m in raw.pull_messages),
                        "build_s": build_s,
                        "new_wall_s": new_wall,
                        "new_bytes": new_bytes,
                        "cached_wall_s": cached_wall,
                        "cached_bytes": cached_bytes,
                        "raw_wall_s": raw_wall,
                        "raw_bytes": raw_bytes,
                    }
                )
                print(
                    f"{count} puller(s): snapshot {payload / 1e6:.1f} MB, build {build_s:.2f} s, "
                    f"new {new_bytes / new_wall / 1e6:.0f} MB/s, cached {cached_bytes / cached_wall / 1e6:.0f} MB/s, "
                    f"raw {raw_bytes / raw_wall / 1e6:.0f} MB/s",
                    flush=True,
                )
            out["pulls"] = pulls
            out["load"].append(uptime())
            raw.stop()
            for p in [*pushers, puller]:
                p.close()
    finally:
        ParameterServerService.PushUpdate = originals["handler"]
        service_module.decode_tensor = originals["decode"]
        push_check_module.check_tensor = originals["validate"]
    return out


# -- tables -------------------------------------------------------------------------------------
def render(res: dict, meta: dict) -> list[str]:
    mb = 1e6
    dev = res["device"] + (f" ({res['device_name']})" if res["device_name"] else "")
    first = res["levels"][0]
    lines = [
        "## Server ingest: pushes against raw gRPC and a plain GEMM (issue 6, item 4)",
        "",
        f"Generated by `bench/server_throughput.py` on {meta['date']}; machine: {meta['machine']}; "
        f"torch {meta['torch']} ({res['torch_threads']} threads), grpcio {meta['grpcio']}; server device: {dev}. "
        f"Command ({meta['minutes']:.1f} min):",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Load (`uptime`) at start: `{meta['load_start']}`; after each level and at the end: "
        + "; ".join(f"`{x.split('load average:')[-1].strip()}`" for x in res["load"])
        + "."
        + (
            f" Tables written from the saved measurements with `{meta['rendered']}`."
            if meta.get("rendered")
            else ""
        ),
        "",
        f"{res['model']}, r {res['rank']}, {res['layers']} LTE layers ({res['merged_weights'] / 1e6:.1f}M merged "
        f"weights); one push = one head's factors ({res['uplink']} + zstd) and the replica deltas (fp32 + zstd): "
        f"{first['push_payload'] / mb:.1f} MB of payload, {first['push_wire'] / mb:.1f} MB on the wire. Server and "
        "pushers share this machine's CPUs. MB/s counts push payload bytes; transport only = the same service with "
        "decode, validation and `apply_push` stubbed out; raw = the same serialised messages as bytes through a "
        "bare stream-unary method.",
        "",
        "| pushers | pushes | pushes/s | ingest MB/s | transport-only MB/s | raw gRPC MB/s | transport ÷ raw | ingest ÷ raw | push latency p50 / max s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in res["levels"]:
        data = row["pushes"] * row["push_payload"]
        ingest, transport, raw = (
            data / row["wall_s"],
            data / row["transport_wall_s"],
            data / row["raw_wall_s"],
        )
        lat = row["latency_s"]
        lines.append(
            f"| {row['pushers']} | {row['pushes']} | {row['pushes'] / row['wall_s']:.2f} | {ingest / mb:.0f} "
            f"| {transport / mb:.0f} | {raw / mb:.0f} | **{transport / raw:.2f}** | {ingest / raw:.2f} "
            f"| {statistics.median(lat):.2f} / {max(lat):.2f} |"
        )
    moved = res["moved_to_device"]
    lines += [
        "",
        "Where a push's time goes, ms per push. In the run: summed over the server's threads and divided by the "
        "pushes (with several pushers the stages overlap, so a row can exceed the wall time per push); "
        "`handler` is `PushUpdate` from its first to its last line; `rest` = handler - decode - validate - apply "
        "= waiting for and parsing chunks, assembling tensors. Alone: the same stage on its own right after the "
        f"level (median of {meta['repeat']}).",
        "",
        "| pushers | handler | decode (zstd + fp16→fp32) | validate (shape, finite) | apply: lock wait | merge | rest | "
        + ("to device | " if moved else "")
        + "alone: decode / validate / merge |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if moved else "") + "---: |",
    ]
    for row in res["levels"]:
        n = row["pushes"]
        ms = {k: v / n * 1e3 for k, v in row["stages_s"].items()}
        wait = ms.get("apply", 0) - ms.get("merge", 0) - ms.get("to_device", 0)
        rest = ms["handler"] - ms["decode"] - ms["validate"] - ms["apply"]
        a = row["alone"]
        lines.append(
            f"| {row['pushers']} | {ms['handler']:.0f} | {ms['decode']:.0f} | {ms['validate']:.0f} | {wait:.0f} "
            f"| {ms['merge']:.0f} | {rest:.0f} | "
            + (f"{ms.get('to_device', 0):.0f} | " if moved else "")
            + f"{a['decode'] * 1e3:.0f} / {a['validate'] * 1e3:.0f} / {a['merge'] * 1e3:.0f} |"
        )
    flops = res["flops"]
    lines += [
        "",
        f"Merge against a plain GEMM of the same shapes on {dev}: per layer `[m, 2r] x [2r, n]` into a preallocated "
        f"output, {flops / 1e9:.1f} GFLOP per push, timed right after each level. Merge = `_merge_pending` in the "
        "run (two rank-r `addmm_` per layer, the copy of the factors kept as B', A', the replica deltas), or "
        "`apply_updates` alone.",
        "",
        "| after level | plain GEMM ms | GFLOP/s | merge alone ms | GEMM ÷ merge alone | merge in the run ms | GEMM ÷ merge in the run |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in res["levels"]:
        a = row["alone"]
        m = row["stages_s"]["merge"] / row["stage_calls"]["merge"]
        lines.append(
            f"| {row['pushers']} | {a['gemm'] * 1e3:.0f} | {flops / a['gemm'] / 1e9:.0f} | {a['merge'] * 1e3:.0f} "
            f"| **{a['gemm'] / a['merge']:.2f}** | {m * 1e3:.0f} | {a['gemm'] / m:.2f} |"
        )
    lines += [
        "",
        "Snapshot pull (`PullModel`, `have_version = -1`; new = the first pull of a new version, which quantises "
        "and compresses it (`build`) before streaming; cached = the same version again; raw = the same serialised "
        "messages as bytes through a bare unary-stream method; MB/s of snapshot payload, all pullers together):",
        "",
        "| pullers | snapshot payload | build s | new MB/s | cached MB/s | raw MB/s | cached ÷ raw | new ÷ raw |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in res["pulls"]:
        new = p["new_bytes"] / p["new_wall_s"]
        cached = p["cached_bytes"] / p["cached_wall_s"]
        raw = p["raw_bytes"] / p["raw_wall_s"] * p["snapshot_payload"] / p["snapshot_wire"]
        lines.append(
            f"| {p['pullers']} | {p['snapshot_payload'] / mb:.1f} MB | {p['build_s']:.2f} | {new / mb:.0f} "
            f"| {cached / mb:.0f} | {raw / mb:.0f} | **{cached / raw:.2f}** | {new / raw:.2f} |"
        )
    for key, title in (
        ("profile", "real pushes"),
        ("transport_profile", "transport only"),
    ):
        prof = first.get(key)
        if prof:
            lines += [
                "",
                f"cProfile of the server's `PushUpdate` thread, 1 pusher, {title} (own time per push, top {len(prof)}):",
                "",
                "| function | where | own ms / push | cumulative ms / push | calls / push |",
                "| --- | --- | ---: | ---: | ---: |",
            ]
            lines += [
                f"| `{r['function']}` | {r['where']} | {r['ms']:.1f} | {r['cum_ms']:.1f} | {r['calls']:.0f} |"
                for r in prof
            ]
    lines += ["", *conclusions(res), ""]
    return lines


def conclusions(res: dict) -> list[str]:
    rows = res["levels"]
    best = max(rows, key=lambda r: r["pushes"] / r["wall_s"])
    rate = best["pushes"] / best["wall_s"]
    first = rows[0]
    n = first["pushes"]
    per_push = {
        "transport (transport-only wall)": first["transport_wall_s"] / n,
        "decode": first["stages_s"]["decode"] / n,
        "validate": first["stages_s"]["validate"] / n,
        "merge": first["stages_s"]["merge"] / n,
    }
    bound = max(per_push, key=per_push.get)
    transport_ratios = [r["raw_wall_s"] / r["transport_wall_s"] for r in rows]
    merge_ratios = [r["alone"]["gemm"] / r["alone"]["merge"] for r in rows]
    build = statistics.median(p["build_s"] for p in res["pulls"]) if res["pulls"] else float("nan")
    lines = [
        f"- Transport ≥ 0.5 of raw: {'met' if min(transport_ratios) >= 0.5 else 'missed'} "
        f"({', '.join(f'{r:.2f}' for r in transport_ratios)} at {', '.join(str(r['pushers']) for r in rows)} pushers).",
        f"- Merge ≥ 0.7 of plain GEMM: {'met' if min(merge_ratios) >= 0.7 else 'missed'} "
        f"({', '.join(f'{r:.2f}' for r in merge_ratios)}, alone, after each level).",
        "- What bounds a push (1 pusher, ms per push): "
        + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in per_push.items())
        + f": **{bound}**.",
    ]
    lo, hi = CPU_WORKER_ROUND_S
    server_s = 1 / rate
    lines.append(
        f"- Keeping up: best {rate:.2f} pushes/s ({best['pushers']} pushers), {server_s:.2f} s of server time per push. "
        f"A one-head vit-b worker on this CPU pushes every {lo:.0f}-{hi:.0f} s, so one server keeps up with about "
        f"{lo * rate:.0f}-{hi * rate:.0f} such workers when a snapshot is built once per round (sync: one "
        f"{build:.1f} s build shared by all), and about {lo / (server_s + build):.0f}-{hi / (server_s + build):.0f} "
        "when every push makes a version that some worker then pulls (async: one build per push)."
    )
    return lines


# -- BENCHMARKS.md -------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-b")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=4096.0)
    p.add_argument("--quant", default="int8", help="snapshot quantisation (the pull's codec)")
    p.add_argument("--uplink", default="fp16")
    p.add_argument("--pushers", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    p.add_argument("--pushes", type=int, default=8, help="timed pushes per level, at least one per pusher")
    p.add_argument("--pullers", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeat", type=int, default=3, help="repeats of each stage alone (median)")
    p.add_argument(
        "--transport-repeat", type=int, default=3, help="transport-only and raw passes per level (median)"
    )
    p.add_argument("--device", default="cpu", help="the server's device (Coordinator(device=...))")
    p.add_argument(
        "--no-move-to-device",
        dest="move_to_device",
        action="store_false",
        help="do not move decoded pushes to --device before apply_push (the server does not; see BENCHMARKS.md)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads")
    p.add_argument(
        "--profile",
        type=int,
        default=12,
        help="cProfile the server's push handler at 1 pusher; keep this many functions (0: off)",
    )
    p.add_argument("--json", help="save the measurements here")
    p.add_argument("--from-json", help="render saved measurements instead of running")
    p.add_argument("--out", help="write the tables into this markdown file (the server section)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        res, meta = saved["result"], saved["meta"]
        meta["rendered"] = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    else:
        t0 = time.perf_counter()
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %Y %H:%M UTC"),
            "machine": machine(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "load_start": uptime(),
            "repeat": args.repeat,
        }
        res = run(args)
        meta["minutes"] = (time.perf_counter() - t0) / 60
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "result": res}, indent=1))
    lines = render(res, meta)
    print("\n".join(lines))
    if args.out:
        write_section(Path(args.out), SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
