"""The LTE worker: register, pull ``q(W)``, train its heads ``T`` steps, push the factors, repeat.

It never merges into W. Transient network failures are retried with exponential backoff and
jitter; a push is idempotent (its round id), so retrying one can never apply it twice. After
the server restarts or the lease expires, the worker registers again and carries on.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from lte import __version__
from lte.common import grpc_options
from lte.common.codec import decode_tensor, decode_tensor_quantized, encode_tensor, get_codec
from lte.common.config import JobConfig
from lte.common.data import Dataset, load_dataset
from lte.common.lte import lte_layers
from lte.common.progress import Progress
from lte.common.trainer import LocalTrainer
from lte.common.wire import TensorAssembler, tensor_chunks
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
REREGISTER = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED}


def lease_refused(err: grpc.RpcError) -> bool:
    """The server no longer knows or honours this lease (a restart, an expiry): register again."""
    code = err.code()
    return code in REREGISTER or (
        code == grpc.StatusCode.FAILED_PRECONDITION and "lease" in (err.details() or "")
    )


_log = logging.getLogger("lte.worker")


class LeaseLost(Exception):
    """The server no longer knows this lease (restart, expiry): register again."""


class JobDone(Exception):
    """The server says the job has ended."""


def job_from_proto(j: pb.JobConfig) -> JobConfig:
    quant = {"fp32": "none", "int8-row": "int8", "nf4": "nf4"}.get(j.snapshot_codec)
    if quant is None:
        raise ValueError(f"server sent unknown snapshot codec {j.snapshot_codec!r}")
    return JobConfig(
        model=j.model,
        dataset=j.dataset,
        image_size=j.image_size,
        in_channels=j.in_channels,
        num_classes=j.num_classes,
        patch_size=j.patch_size,
        task=j.task,
        heads=j.total_heads,
        rank=j.rank,
        alpha=j.alpha,
        merge_every=j.merge_every,
        reset=j.reset,
        a_init=j.a_init,
        a_init_gain=j.a_init_gain,
        quant=quant,
        uplink=j.uplink_codec,
        zstd_level=j.zstd_level,
        lr=j.lr,
        weight_decay=j.weight_decay,
        warmup_steps=j.warmup_steps,
        steps=j.total_steps,
        min_lr_ratio=j.min_lr_ratio,
        batch_size=j.batch_size,
        seed=j.seed,
        mode=j.mode,
        beta1=j.beta1,
        beta2=j.beta2,
        eps=j.eps,
        dtype=j.compute_dtype,
        max_chunk_bytes=j.max_chunk_bytes,
    )


@dataclass
class Backoff:
    """Exponential backoff with full jitter, reset after every success."""

    initial_s: float = 0.2
    max_s: float = 10.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * (2**self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class Worker:
    def __init__(
        self,
        server: str,
        *,
        device: str = "cpu",
        max_heads: int = 0,
        data: str | None = None,
        data_dir: str | None = None,
        name: str = "",
        quiet: bool = False,
        give_up_after_s: float = 300.0,
        parent_pid: int | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        slow_down_s: float = 0.0,
        fail_at_round: int | None = None,
        delay_push_s: float = 0.0,
        show_progress: bool = True,
    ) -> None:
        self.show_progress = show_progress  # the one-line display; off when logs are JSON lines
        self.server, self.device = server, torch.device(device)
        self.max_heads, self.data, self.data_dir = max_heads, data, data_dir
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.quiet, self.give_up_after_s, self.parent_pid = quiet, give_up_after_s, parent_pid
        self.metadata = metadata
        self.slow_down_s = slow_down_s  # test hook: sleep per round to play a slow worker
        self.fail_at_round = fail_at_round  # test hook: SIGKILL itself before pushing its round K
        self.delay_push_s = delay_push_s  # test hook: hold every push back this long
        opts = grpc_options.channel_options()
        self.channel = (
            grpc.secure_channel(server, credentials, opts)
            if credentials
            else grpc.insecure_channel(server, opts)
        )
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.stop = threading.Event()
        self.lease_id = ""
        self.worker_id = ""
        self.job: JobConfig | None = None
        self.trainer: LocalTrainer | None = None
        self.dataset: Dataset | None = None
        self.version = -1
        self.next_rounds: dict[int, int] = {}
        self.bytes_up = self.bytes_down = 0
        self.rounds = 0
        self.state = "starting"
        self.samples_per_s = 0.0
        self._heartbeat: threading.Thread | None = None
        self.lease_lost = threading.Event()
        self._pull_backoff = Backoff()
        self._pull_failing_since: float | None = None

    # -- network plumbing ----------------------------------------------------------------------
    def _call(self, fn: Callable, *args, what: str, **kwargs):
        """Run one RPC, retrying transient failures with backoff until ``give_up_after_s``."""
        backoff = Backoff()
        deadline = time.monotonic() + self.give_up_after_s
        while True:
            self._check_parent()
            try:
                return fn(*args, metadata=self.metadata, **kwargs)
            except grpc.RpcError as err:
                code = err.code()
                if lease_refused(err):
                    raise LeaseLost(err.details()) from None
                if code not in RETRYABLE or time.monotonic() > deadline or self.stop.is_set():
                    raise
                delay = backoff.next_delay()
                self._say(f"{what}: {code.name.lower()} ({err.details()}); retrying in {delay:.1f} s")
                if self.stop.wait(delay):
                    raise

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            raise SystemExit("lte-worker: the server process that started this worker is gone; exiting")

    def _say(self, message: str) -> None:
        if not self.quiet:
            _log.info("%s: %s", self.worker_id or self.name, message, extra={"worker_id": self.worker_id})

    # -- the protocol --------------------------------------------------------------------------
    def register(self) -> None:
        info = pb.WorkerInfo(
            name=self.name,
            device=str(self.device),
            free_memory_bytes=free_memory_bytes(self.device),
            max_heads=self.max_heads,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            lte_version=__version__,
            preferred_heads=self.trainer.head_ids if self.trainer is not None else [],
        )
        reply = self._call(self.stub.Register, pb.RegisterRequest(worker=info), what="register", timeout=30)
        job = job_from_proto(reply.job)
        head_ids = [h.head_id for h in reply.heads]
        self.lease_id, self.worker_id = reply.lease_id, reply.worker_id
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        self.next_rounds = {h.head_id: h.next_round for h in reply.heads}
        self._start_heartbeat()  # now: building the model and the first pull can outlast the lease timeout
        if self.dataset is None or self.job is None or self.job.dataset != job.dataset:
            self.dataset = (
                _user_data(self.data, job)
                if self.data
                else load_dataset(job.dataset, self.data_dir, seed=job.seed)
            )
        same = self.trainer is not None and self.trainer.head_ids == head_ids and self.job == job
        self.job = job
        if not same:
            self.trainer = LocalTrainer(
                job,
                head_ids,
                self.dataset,
                device=self.device,
                steps_done=[h.steps_done for h in reply.heads],
                wire_rounded=True,  # push() rounds the factors to the uplink codec before each commit
                base_from_snapshot=True,  # the pull below brings the base: never build an fp32 copy
            )
        else:  # same heads again (a server restart, an expired lease): take the server's view of them
            self.trainer.steps_done = [h.steps_done for h in reply.heads]
            self.trainer.forget_merges([i for i, h in enumerate(reply.heads) if not h.has_factors])
        self.version = -1
        self.lease_lost.clear()
        self._say(
            f"registered: heads {head_ids} of {job.heads}, {job.model} on {self.device}, mode {job.mode}"
        )
        # heads the server holds factors for continue from them exactly (current = last merged)
        moved = [h.head_id for h in reply.heads if h.has_factors]
        while not self.pull(wait_s=0.0, head_factors=moved):  # a failed pull backs off and gives up in time
            self._check_parent()

    def pull(self, wait_s: float, head_factors: list[int] | tuple[int, ...] = ()) -> bool:
        """Fetch a newer snapshot if there is one; returns whether the base changed. Raises JobDone."""
        self.state = "pulling" if not wait_s else "waiting"
        request = pb.PullRequest(
            lease_id=self.lease_id,
            have_version=self.version,
            wait_newer_s=wait_s,
            head_factors=list(head_factors),
        )
        stream = self._call(self.stub.PullModel, request, what="pull", timeout=wait_s + 300)
        header = None
        weights: dict[str, object] = {}
        factors: dict[int, dict[str, list]] = {}
        assembler = TensorAssembler(
            max_chunk_bytes=grpc_options.MAX_CHUNK_BYTES,
            max_tensor_bytes=grpc_options.MAX_PUSH_BYTES,
            max_total_bytes=grpc_options.MAX_PUSH_BYTES * 8,
            max_tensors=1 << 20,
        )
        try:
            for msg in stream:
                if msg.HasField("header"):
                    header = msg.header
                    continue
                enc = assembler.add(msg.tensor)
                self.bytes_down += len(msg.tensor.data)
                if enc is None:
                    continue
                if enc.name.startswith("head/"):
                    _, h, rest = enc.name.split("/", 2)
                    layer, part = rest.rsplit("/", 1)
                    factors.setdefault(int(h), {}).setdefault(layer, [None, None])[part == "A"] = (
                        decode_tensor(enc)
                    )
                elif enc.codec in ("int8-row", "nf4"):
                    weights[enc.name] = decode_tensor_quantized(enc)
                else:
                    weights[enc.name] = decode_tensor(enc).to(self.job.torch_dtype)
            assembler.finish()
        except grpc.RpcError as err:
            # errors of a server stream surface here, not in _call: map them the same way
            if lease_refused(err):
                raise LeaseLost(err.details()) from None
            if err.code() not in RETRYABLE:
                raise
            now = time.monotonic()
            self._pull_failing_since = self._pull_failing_since or now
            if now - self._pull_failing_since > self.give_up_after_s:
                raise
            delay = self._pull_backoff.next_delay()  # the server may be restarting: back off, never spin
            self._say(f"pull: {err.code().name.lower()} ({err.details()}); retrying in {delay:.1f} s")
            self.stop.wait(delay)
            return False  # the caller's loop pulls again
        self._pull_backoff.reset()
        self._pull_failing_since = None
        if header is None:
            raise RuntimeError("server sent a pull reply without a header")
        if header.retry_after_s > 0 and not weights and not header.done:
            # the server had no thread to spare for a long-poll: ask again later, not at once
            self.stop.wait(min(header.retry_after_s, 30.0) * random.uniform(0.5, 1.5))
        if weights:
            self.trainer.load_snapshot(weights)
            self.version = header.version
        for h, layers in factors.items():
            local = self.trainer.head_ids.index(h)
            self.trainer.load_head(local, {k: (v[0], v[1]) for k, v in layers.items()})
        if header.done:
            raise JobDone()
        return bool(weights)

    def _push_messages(self, stats, heads, replica) -> Iterator[pb.UpdateChunk]:
        job = self.job
        names = []
        for update in heads:
            for layer, (b, a) in update.factors.items():
                names += [
                    (f"head/{update.head_id}/{layer}/B", b, job.uplink),
                    (f"head/{update.head_id}/{layer}/A", a, job.uplink),
                ]
        names += [(f"replica/{n}", d, "fp32") for n, d in replica.deltas.items()]  # small: keep them exact
        yield pb.UpdateChunk(
            header=pb.PushHeader(
                lease_id=self.lease_id,
                base_version=self.version,
                heads=[pb.HeadRound(head_id=u.head_id, round=self.next_rounds[u.head_id]) for u in heads],
                steps=stats.steps,
                samples=stats.samples,
                train_loss=stats.train_loss,
                num_tensors=len(names),
                seconds=stats.seconds,
            )
        )
        level = None if job.zstd_level < 0 else job.zstd_level
        for name, tensor, codec in names:
            enc = encode_tensor(name, tensor.float().cpu(), codec, level)
            self._push_bytes += len(enc.payload)
            for chunk in tensor_chunks(enc, job.max_chunk_bytes):
                yield pb.UpdateChunk(tensor=chunk)

    def _round_factors_to_wire(self) -> None:
        """Make the live factors exactly what the server will hold, so both sides agree on B', A'."""
        codec = get_codec(self.job.uplink)
        if self.job.uplink == "fp32" and self.job.dtype == "float32":
            return
        with torch.no_grad():
            for layer in lte_layers(self.trainer.model).values():
                for p in (layer.lora_A, layer.lora_B):
                    sent = codec.decode(codec.encode(p.detach().float().cpu()), tuple(p.shape))
                    p.copy_(sent.to(p.device, p.dtype))

    def push(self, stats) -> pb.PushReply:
        self.state = "pushing"
        self._round_factors_to_wire()
        heads, replica = self.trainer.export_update()
        self._push_bytes = 0  # the retry loop re-sends the whole stream; count the one that landed
        reply = self._call(self._push_once, heads, replica, stats, what="push")
        self.bytes_up += self._push_bytes
        return reply

    def _push_once(self, heads, replica, stats, metadata=()) -> pb.PushReply:
        self._push_bytes = 0
        return self.stub.PushUpdate(
            self._push_messages(stats, heads, replica), metadata=metadata, timeout=600
        )

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="lte-heartbeat", daemon=True)
            self._heartbeat.start()

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(self.heartbeat_interval_s):
            try:
                reply = self.stub.Heartbeat(
                    pb.HeartbeatRequest(
                        lease_id=self.lease_id,
                        version=self.version,
                        samples_per_s=self.samples_per_s,
                        state=self.state,
                    ),
                    metadata=self.metadata,
                    timeout=max(1.0, self.heartbeat_interval_s),
                )
                if reply.done:
                    self.stop.set()
            except grpc.RpcError as err:
                if err.code() in REREGISTER or err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self.lease_lost.set()

    def run(self) -> int:
        """Train until the job ends. Returns a process exit code."""
        progress = None if self.quiet or not self.show_progress else Progress(None, "lte-worker")
        try:
            while not self.stop.is_set():
                try:
                    self.register()
                except LeaseLost as exc:  # lost before its first heartbeat, e.g. a slow start
                    self._say(f"lease lost while joining ({exc}); registering again")
                    continue
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        self._say(f"server refused registration: {err.details()}")
                        return 0 if "finished" in (err.details() or "") else 1
                    raise
                try:
                    self._train_loop(progress)
                except LeaseLost as exc:
                    self._say(f"lease lost ({exc}); registering again")
                    continue
            return 0
        except JobDone:
            self._say(
                f"job finished after {self.rounds} rounds; up {self.bytes_up} B, down {self.bytes_down} B"
            )
            return 0
        finally:
            self.stop.set()
            if progress:
                progress.close()
            self.leave()

    def _train_loop(self, progress: Progress | None) -> None:
        started = time.perf_counter()
        samples = 0
        while not self.stop.is_set():
            if self.lease_lost.is_set():
                raise LeaseLost("heartbeat refused")
            self.state = "training"
            stats = self.trainer.train_round()
            if self.slow_down_s:
                time.sleep(self.slow_down_s)
            samples += stats.samples
            self.samples_per_s = samples / max(1e-9, time.perf_counter() - started)
            base = self.version
            if self.fail_at_round is not None and self.rounds >= self.fail_at_round:
                os.kill(os.getpid(), signal.SIGKILL)  # die like a crashed machine: no Leave, no cleanup
            if self.delay_push_s and self.stop.wait(self.delay_push_s):
                return
            try:
                reply = self.push(stats)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    if "finished" in (err.details() or ""):
                        raise JobDone() from None
                    self._say(
                        f"push not applied: {err.details()}"
                    )  # stale: keep the factors, take the newest base
                    self.pull(wait_s=0.0)
                    continue
                raise
            if reply.applied or reply.duplicate:
                self.trainer.commit()
                for h in self.next_rounds:
                    self.next_rounds[h] += 1
                self.rounds += 1
            if progress:
                progress.update(
                    self.rounds,
                    version=reply.version,
                    loss=stats.train_loss,
                    **{"samples/s": self.samples_per_s},
                    bytes_up=float(self.bytes_up),
                    bytes_down=float(self.bytes_down),
                )
            wait = 30.0 if self.job.mode == "sync" else 0.0
            while not self.pull(wait_s=wait) and self.job.mode == "sync" and self.version <= base:
                if self.stop.is_set():
                    return

    def leave(self) -> None:
        if not self.lease_id:
            return
        try:
            self.stub.Leave(
                pb.LeaveRequest(lease_id=self.lease_id, reason="done"), metadata=self.metadata, timeout=2
            )
        except grpc.RpcError:
            pass  # the server may already be gone; its reaper returns the heads
        finally:
            self.lease_id = ""
            self.channel.close()


def _user_data(path: str, job: JobConfig) -> Dataset:
    """A worker's own data: an image folder, or Fashion-MNIST-style IDX files in a folder."""
    from pathlib import Path

    p = Path(path)
    if any(p.glob("*idx3-ubyte*")):
        return load_dataset("fashion-mnist", str(p), seed=job.seed)
    return load_dataset("imagefolder", str(p), seed=job.seed, image_size=job.image_size)
