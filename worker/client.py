"""The LTE worker: register, pull ``q(W)``, train its heads ``T`` steps, push the factors, repeat.

It never merges into W. Transient network failures are retried with exponential backoff and
jitter; a push is idempotent (its round id), so retrying one can never apply it twice. After
the server restarts or the lease expires, the worker registers again and carries on.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields

import grpc
import torch

from lte.common.core.model_state import lte_layers
from lte.common.core.quant import QuantizedTensor
from lte.common.data.datasets import Dataset, load_job_dataset
from lte.common.data.images import BadImageError
from lte.common.data.text import TokenDataset
from lte.common.job.checks import check_chunk_fits
from lte.common.job.config import JobConfig
from lte.common.job.fingerprint import fingerprint_difference, model_fingerprint
from lte.common.job.progress import Progress, format_bytes
from lte.common.job.trainer import LocalTrainer
from lte.common.job.version import __version__
from lte.common.wire import grpc_options
from lte.common.wire.chunks import TensorAssembler, tensor_chunks
from lte.common.wire.codec import (
    CodecError,
    EncodedTensor,
    apply_byte_delta,
    codec_bytes,
    decode_tensor,
    decode_tensor_quantized,
    get_codec,
)
from lte.common.wire.failure import LeaseState, leave_reason, training_failure
from lte.common.wire.protocol import (
    HEAD_PREFIX,
    PROTOCOL_VERSION,
    QUANTIZED_SNAPSHOT_CODECS,
    REREGISTER,
    RESYNC,
    PushMeta,
    Refusal,
    Role,
    codec_for,
    encode_update,
    group_head_factors,
    job_from_proto,
    refusal_of,
)
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.worker.hooks import RoundHooks
from lte.worker.startup import TLSProblem, tls_problem

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXIT_JOB_OVER = 4  # the job had finished before this worker could train a round
DELTA_PROTOCOL = 1  # delta-coded snapshots this worker can apply (PullRequest.delta_protocol)
PULL_STALL_S = 120.0  # a pull that receives nothing for this long is cancelled and retried
PULL_MAX_S = 6 * 3600.0  # the longest a pull may run however steadily its bytes arrive
STOP_POLL_S = 0.25  # how soon a pull in flight is cancelled once the worker is stopping
LEAVE_TIMEOUT_S = 5.0  # the Leave that gives the lease back (2 s was short for a loaded server)
# A push's deadline grows with its bytes: PUSH_BASE_S plus their time at PUSH_FLOOR_BPS (a fixed
# 600 s failed every push of more than 75 MB on a 1 Mbit/s uplink, and retried it from the start)
PUSH_BASE_S = 600.0
PUSH_FLOOR_BPS = 1e6


def push_deadline_s(payload_bytes: int) -> float:
    """Seconds a push of ``payload_bytes`` may take: ``PUSH_BASE_S`` + the bytes at ``PUSH_FLOOR_BPS``
    (17 MB of vit-b fp16 factors: 736 s; 150 MB: 1800 s)."""
    return PUSH_BASE_S + 8.0 * payload_bytes / PUSH_FLOOR_BPS


class _StallWatchdog:
    """Cancels a streaming call when no message arrived for ``stall_s`` (``first_s`` before the
    first one, which a long-poll may hold back): a deadline that grows with the bytes that do move.
    It also cancels the call at once (within ``STOP_POLL_S``) when ``stop`` is set (the worker's
    ``interrupted``): a stopped worker does not sit out a 30 s long-poll or a slow transfer."""

    def __init__(self, call, *, first_s: float, stall_s: float, stop: threading.Event | None = None) -> None:
        self.call, self.stall_s = call, stall_s
        self.stopping = stop or threading.Event()
        self.fired = False
        self._due = time.monotonic() + first_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lte-pull-watchdog", daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self._due = time.monotonic() + self.stall_s

    def _watch(self) -> None:
        while not self._done.wait(min(STOP_POLL_S, self.stall_s)):
            if self.stopping.is_set():  # not a stall: the caller sees its interrupt, not a retry
                self.call.cancel()
                return
            if time.monotonic() > self._due:
                self.fired = True
                self.call.cancel()
                return

    def stop(self) -> None:
        self._done.set()


def refusal(err: grpc.RpcError) -> Refusal | None:
    """The server's domain reason for refusing a call (trailing metadata), if it gave one."""
    try:
        return refusal_of(err.trailing_metadata())
    except Exception:  # a channel-level error (no server answered) has no metadata to read
        return None


_log = logging.getLogger("lte.worker")


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl+C, SIGTERM, SIGHUP) reached the worker: it leaves the job.

    Raised again at the worker's next check when the handler's own KeyboardInterrupt was lost, as it
    is when the signal lands while Python runs a ``__del__`` or a callback (gRPC's call objects are
    finalised on the main thread after every pull): Python prints "Exception ignored in" and carries
    on. Before this check the worker then trained on to the job's end, deaf to every later signal
    (the handler ignores them once the first arrived): the likely cause of a CI run where a worker
    did not exit within 60 s of SIGINT (tests/test_fleet.py)."""


class LeaseLost(Exception):
    """The server no longer knows this lease (restart, expiry): register again."""


class JobDone(Exception):
    """The server says the job has ended."""


class Resync(Exception):
    """The server moved or finished some of this worker's heads: adopt its view of the lease."""


class ModelMismatch(ValueError):
    """The job's model built here differs from the server's (the version handshake's fingerprint)."""


class Incompatible(ValueError):
    """The server refused this worker: its protocol lacks a job field the job uses."""


class OutlierRefused(Exception):
    """The server's update guard refused the push: its round is discarded, the heads go on."""


class Quarantined(Exception):
    """A push of this worker broke a merge on the server, which will not take any more from it."""


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


def turn_groups(head_ids: list[int], room: int) -> list[list[int]]:
    """Heads in groups of at most ``room``, trained one group after the other."""
    return [head_ids[i : i + room] for i in range(0, len(head_ids), max(1, room))]


@dataclass
class Turn:
    """Heads this worker trains together (at most its room), vectorised in one ``LocalTrainer``.
    A worker holding more heads than its room trains its turns one after the other."""

    trainer: LocalTrainer
    last_base: int = -1  # the version its last accepted push trained on (sync: one push per version)

    @property
    def head_ids(self) -> list[int]:
        return self.trainer.head_ids

    def unfinished(self, job: JobConfig) -> bool:
        return job.round_steps(self.trainer.steps_done[0]) > 0


@dataclass
class _PartialPull:
    """What a pull received before its stream broke: its header, the tensors decoded so far, the
    assembler holding a tensor's first chunks, and how many chunk messages came (to resume after)."""

    have_version: int
    head_factors: tuple[int, ...]
    header: pb.ModelHeader
    assembler: TensorAssembler
    weights: dict[str, torch.Tensor | QuantizedTensor]
    factors: dict[str, torch.Tensor]
    codes: dict[str, bytes]
    deltas: int = 0
    received: int = 0


class Worker:
    def __init__(
        self,
        server: str,
        *,
        device: str = "cpu",
        max_heads: int = 0,
        data: str | None = None,
        data_dir: str | None = None,
        skip_bad_images: bool = False,
        loader_workers: int = 0,
        name: str = "",
        quiet: bool = False,
        give_up_after_s: float = 300.0,
        parent_pid: int | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls_files: tuple[str | None, str | None, str | None] = (None, None, None),
        metadata: tuple[tuple[str, str], ...] = (),
        hooks: RoundHooks | None = None,
        show_progress: bool = True,
        precision: str | None = None,
        cache_frozen: bool | None = None,
        delta_snapshots: bool = True,
    ) -> None:
        """``delta_snapshots``: pull a newer version as a delta of the snapshot codes this worker
        holds (server/snapshots.py), keeping those codes (an int8 snapshot's size) in memory."""
        self.delta_snapshots = delta_snapshots
        self.pull_stall_s = PULL_STALL_S
        self._codes: dict[str, bytes] = {}  # codec bytes of the snapshot of self.version, for deltas
        self.delta_pulls = 0  # pulls that came as deltas
        self.resumed_pulls = 0  # pulls that went on from where a broken one stopped
        self._partial: _PartialPull | None = None  # what a broken pull had received, to resume it
        self.precision, self.cache_frozen = precision, cache_frozen  # None: the job's / CUDA only
        self.show_progress = show_progress  # the one-line display; off when logs are JSON lines
        self.server, self.device = server, torch.device(device)
        self.max_heads, self.data, self.data_dir = max_heads, data, data_dir
        self.skip_bad_images, self.loader_workers = skip_bad_images, loader_workers
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.quiet, self.give_up_after_s, self.parent_pid = quiet, give_up_after_s, parent_pid
        self.metadata = metadata
        self.hooks = hooks or RoundHooks()
        self.channel = grpc_options.make_channel(server, credentials)
        self.server_address = server
        self.tls_files = tls_files  # (CA, client certificate, key): to name a failed handshake's cause
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.stop = threading.Event()
        self.interrupted = threading.Event()  # a stop signal arrived: leave, exit 130 (see interrupt())
        self.lease_id = ""
        self.worker_id = ""
        self.job: JobConfig | None = None
        self.turns: list[Turn] = []
        self.dataset: Dataset | TokenDataset | None = None
        self.version = -1
        self.epoch = -1  # the lease epoch whose heads the turns hold
        self.room = 1
        self.next_rounds: dict[int, int] = {}
        self.bytes_up = self.bytes_down = 0
        self.pushes = 0  # pushes acknowledged (a push of k heads counts once; head_rounds counts k)
        self.head_rounds = 0  # rounds of heads acknowledged (a push of k heads counts k)
        self.failure = ""  # why this worker could not train its lease; sent with Leave
        self.outliers_refused = 0  # pushes the server's update guard refused (their rounds discarded)
        self.known_job_fields = [f.name for f in dataclass_fields(JobConfig)]  # the version handshake
        self.state = LeaseState.STARTING
        self.samples_per_s = 0.0
        self.heartbeat_interval_s = 5.0
        self._heartbeat: threading.Thread | None = None
        self.lease_lost = threading.Event()
        self._view: pb.HeartbeatReply | None = None  # the newest lease view a heartbeat brought
        self._pull_backoff = Backoff()
        self._pull_failing_since: float | None = None

    @property
    def trainer(self) -> LocalTrainer | None:
        """The first turn's trainer (the only one unless the worker trains heads in turns)."""
        return self.turns[0].trainer if self.turns else None

    @property
    def head_ids(self) -> list[int]:
        return [h for t in self.turns for h in t.head_ids]

    def _joined(self) -> tuple[JobConfig, Dataset | TokenDataset]:
        """The job and its data: known from ``register()`` on."""
        if self.job is None or self.dataset is None:
            raise RuntimeError("the worker has not registered yet")
        return self.job, self.dataset

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
                self._check_interrupted()  # a call cut short by the stop: the interrupt, not an error
                self._raise_refusal(err)
                code = err.code()
                self._check_tls(err)
                if code not in RETRYABLE or time.monotonic() > deadline or self.stop.is_set():
                    raise
                delay = backoff.next_delay()
                self._say(f"{what}: {code.name.lower()} ({err.details()}); retrying in {delay:.1f} s")
                if self.stop.wait(delay):
                    raise

    def _check_tls(self, err: grpc.RpcError) -> None:
        """A TLS handshake that fails for a certificate's reason is not retried: ``TLSProblem`` names
        the cause (expired, not yet valid, another CA, another host name) instead of the address."""
        details = (err.details() or "").lower()
        if err.code() != grpc.StatusCode.UNAVAILABLE or not any(self.tls_files):
            return
        if not any(word in details for word in ("ssl", "handshake", "tsi", "certificate")):
            return
        problem = tls_problem(self.server_address, *self.tls_files)
        if problem:
            raise TLSProblem(problem)

    @staticmethod
    def _raise_refusal(err: grpc.RpcError) -> None:
        """Turn the server's reason into what the worker does next; other errors pass through."""
        reason = refusal(err)
        if reason in REREGISTER:
            raise LeaseLost(err.details()) from None
        if reason in RESYNC:
            raise Resync(err.details()) from None
        if reason is Refusal.JOB_DONE:
            raise JobDone() from None
        if reason is Refusal.OUTLIER:
            raise OutlierRefused(err.details()) from None
        if reason is Refusal.QUARANTINED:
            raise Quarantined(err.details()) from None
        if reason is Refusal.INCOMPATIBLE:
            raise Incompatible(f"the server refused this worker: {err.details()}") from None

    def interrupt(self) -> None:
        """What a stop signal does besides the handler's KeyboardInterrupt (``lte-worker`` calls it
        from a thread that the signal wakes, worker/cli.py ``StopWatch``): every wait of the worker
        ends (``stop``), a pull in flight is cancelled within ``STOP_POLL_S``, and the next check
        raises ``Interrupted``, so the worker leaves within seconds in every state even when the
        KeyboardInterrupt never reaches ``run``. Call it from any thread but not from a signal
        handler (an Event's lock may be held by the very code the handler interrupted)."""
        self.interrupted.set()
        self.stop.set()

    def _check_interrupted(self) -> None:
        if self.interrupted.is_set():
            raise Interrupted()

    def _check_parent(self) -> None:
        self._check_interrupted()
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
            preferred_heads=self.head_ids,
            protocol_version=PROTOCOL_VERSION,
            job_fields=self.known_job_fields,
        )
        reply = self._call(self.stub.Register, pb.RegisterRequest(worker=info), what="register", timeout=30)
        job = job_from_proto(reply.job)
        self.lease_id, self.worker_id = reply.lease_id, reply.worker_id
        differs = fingerprint_difference(
            (reply.model_fingerprint, reply.model_tree), model_fingerprint(job), job.model
        )
        if differs:  # raised as the worker's failure: its Leave tells the server the same line
            raise ModelMismatch(f"this worker's model code is not the server's: {differs}")
        check_chunk_fits(job.max_chunk_bytes, grpc_options.MAX_MESSAGE_BYTES, side="worker")  # leaves
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        self._view = None
        self._start_heartbeat()  # now: building the model and the first pull can outlast the lease timeout
        if self.dataset is None or self.job is None or self.job.dataset != job.dataset:
            self.dataset = load_job_dataset(
                job, self.data_dir, own_data=self.data, skip_bad_images=self.skip_bad_images
            )
        if self.job != job:
            self.turns = []
        self.job = job
        self.lease_lost.clear()
        self.epoch = -1
        self._adopt(list(reply.heads), reply.room, reply.lease_epoch, fresh=True)
        ids = self.head_ids
        self._say(
            f"registered: heads {ids} of {job.heads}, {job.model} on {self.device}, mode {job.mode}, "
            f"precision {self.turns[0].trainer.precision.precision}"  # ids: the turns hold heads
            + (f", in {len(self.turns)} turns of at most {self.room}" if len(self.turns) > 1 else "")
            if ids
            else f"the job is full: all {job.heads} heads are leased; standing by for a head that frees up"
        )

    def _adopt(self, heads: list[pb.HeadAssignment], room: int, epoch: int, *, fresh: bool = False) -> None:
        """Make the turns hold exactly the lease's ``heads``: drop the heads moved away (the others
        keep their state exactly), add turns for new ones, and fetch what they need."""
        self.room = max(1, room)
        held = {h.head_id: h for h in heads}
        self.next_rounds = {h.head_id: h.next_round for h in heads}
        kept: list[Turn] = []
        for turn in self.turns:
            stay = [i for i, h in enumerate(turn.head_ids) if h in held]
            if not stay:
                continue
            if len(stay) < len(turn.head_ids):
                turn.trainer.keep_heads(stay)
            if fresh:  # a new lease on the same heads (server restart, expiry): the server's view wins
                turn.trainer.steps_done = [held[h].steps_done for h in turn.head_ids]
                turn.trainer.forget_merges(
                    [i for i, h in enumerate(turn.head_ids) if not held[h].has_factors]
                )
                turn.last_base = -1
            kept.append(turn)
        known = {h for t in kept for h in t.head_ids}
        new = [h for h in heads if h.head_id not in known]
        # heads at the same step train together (one lr schedule per turn), at most `room` at a time
        by_step: dict[int, list[pb.HeadAssignment]] = {}
        for h in new:
            by_step.setdefault(h.steps_done, []).append(h)
        for group in by_step.values():
            for ids in turn_groups([h.head_id for h in group], self.room):
                job, dataset = self._joined()
                trainer = LocalTrainer(
                    job,
                    ids,
                    dataset,
                    device=self.device,
                    steps_done=[held[h].steps_done for h in ids],
                    wire_rounded=True,  # push() rounds the factors to the uplink codec before each commit
                    base_from_snapshot=True,  # the pull below brings the base: never build an fp32 copy
                    precision=self.precision,
                    cache_frozen=self.cache_frozen,
                    loader_workers=self.loader_workers,
                )
                kept.append(Turn(trainer))
        self.turns = kept
        self.epoch = epoch
        if new or fresh:
            self.version = -1  # new turns need the base: pull it whole, with moved heads' factors
            moved = [h.head_id for h in new if h.has_factors] + (
                [h for h in known if held[h].has_factors] if fresh else []
            )
            while not self.pull(wait_s=0.0, head_factors=moved):  # a failed pull backs off, gives up in time
                self._check_parent()

    def _sync_lease(self, force: bool = False) -> None:
        """Adopt the lease's heads as the server sees them now, when they changed (between turns only)."""
        view = self._view
        if force or view is None or view.lease_epoch != self.epoch:
            view = self._call(
                self.stub.Heartbeat,
                pb.HeartbeatRequest(
                    lease_id=self.lease_id,
                    version=self.version,
                    samples_per_s=self.samples_per_s,
                    state=self.state.value,
                ),
                what="heartbeat",
                timeout=30,
            )
        if view.done:
            raise JobDone()
        if view.lease_epoch != self.epoch:
            before = set(self.head_ids)
            self._adopt(list(view.heads), view.room, view.lease_epoch)
            after = set(self.head_ids)
            if before != after:
                self._say(
                    f"heads now {sorted(after)} (gained {sorted(after - before)}, lost {sorted(before - after)})"
                )

    def pull(self, wait_s: float, head_factors: list[int] | tuple[int, ...] = ()) -> bool:
        """Fetch a newer snapshot if there is one; returns whether the base changed. Raises JobDone."""
        self.state = LeaseState.PULLING if not wait_s else LeaseState.WAITING
        if self.version < 0:
            self._codes = {}
        partial, self._partial = self._partial, None
        if partial is not None and (
            partial.have_version != self.version or partial.head_factors != tuple(head_factors)
        ):
            partial = None  # a broken pull of another request: nothing to resume
        request = pb.PullRequest(
            lease_id=self.lease_id,
            have_version=self.version,
            wait_newer_s=wait_s,
            head_factors=list(head_factors),
            lease_epoch=self.epoch,
            delta_protocol=DELTA_PROTOCOL if self.delta_snapshots and self._codes else 0,
            resume_stream=partial.header.stream_id if partial is not None else 0,
            resume_from=partial.received if partial is not None else 0,
        )
        # No fixed deadline for the bytes (85 MB take 34 s at 20 Mbit/s, 340 s at 2): a pull that
        # moves nothing for pull_stall_s is cancelled and retried; PULL_MAX_S only bounds the call.
        stream = self._call(self.stub.PullModel, request, what="pull", timeout=wait_s + PULL_MAX_S)
        watchdog = _StallWatchdog(
            stream, first_s=wait_s + self.pull_stall_s, stall_s=self.pull_stall_s, stop=self.interrupted
        )  # not self.stop: a heartbeat that brings the job's end sets it, and that pull ends with it
        state: _PartialPull | None = None
        try:
            for msg in stream:
                watchdog.progress()
                if msg.HasField("header"):
                    state = self._pull_state(msg.header, partial, request)
                    continue
                if state is None:
                    raise RuntimeError("server sent a pull reply without a header")
                state.received += 1
                enc = state.assembler.add(msg.tensor)
                self.bytes_down += len(msg.tensor.data)
                if enc is None:
                    continue
                if enc.name.startswith(HEAD_PREFIX):
                    state.factors[enc.name] = decode_tensor(enc)
                    continue
                enc = self._undelta(enc, state.header.delta_base)
                state.deltas += enc.delta
                state.codes[enc.name] = enc.payload
                enc = replace(enc, delta=False)
                if enc.codec in QUANTIZED_SNAPSHOT_CODECS:
                    state.weights[enc.name] = decode_tensor_quantized(enc)
                else:
                    state.weights[enc.name] = decode_tensor(enc).to(self._joined()[0].torch_dtype)
            if state is not None:
                state.assembler.finish()
        except CodecError as exc:
            if not request.delta_protocol:
                raise
            stream.cancel()  # a delta that does not apply: take the whole snapshot instead
            self._say(f"pull: {exc}; pulling the whole snapshot")
            self._codes = {}
            return False
        except grpc.RpcError as err:
            # errors of a server stream surface here, not in _call: map them the same way
            self._check_interrupted()  # cancelled by the watchdog because the worker is stopping
            self._raise_refusal(err)
            if err.code() not in RETRYABLE and not watchdog.fired:
                raise
            if state is not None and state.received > 0 and state.header.stream_id:
                self._partial = state  # the next pull asks the server to go on from here
            now = time.monotonic()
            self._pull_failing_since = self._pull_failing_since or now
            if now - self._pull_failing_since > self.give_up_after_s:
                raise
            delay = self._pull_backoff.next_delay()  # the server may be restarting: back off, never spin
            kept = self._partial
            got = f"; resuming after {kept.received} chunks" if kept is not None else ""
            self._say(f"pull: {err.code().name.lower()} ({err.details()}); retrying in {delay:.1f} s{got}")
            self.stop.wait(delay)
            return False  # the caller's loop pulls again
        finally:
            watchdog.stop()
        if state is None:
            raise RuntimeError("server sent a pull reply without a header")
        header, weights, factors, codes, deltas = (
            state.header,
            state.weights,
            state.factors,
            state.codes,
            state.deltas,
        )
        self._pull_backoff.reset()
        self._pull_failing_since = None
        if header.retry_after_s > 0 and not weights and not header.done:
            # the server had no thread to spare for a long-poll: ask again later, not at once
            self.stop.wait(min(header.retry_after_s, 30.0) * random.uniform(0.5, 1.5))
        if weights:
            for turn in self.turns:
                turn.trainer.load_snapshot(weights)
            self.version = header.version
            self._codes = codes if self.delta_snapshots else {}
            self.delta_pulls += deltas > 0
        for h, layers in group_head_factors(factors).items():
            for turn in self.turns:
                if h in turn.head_ids:
                    turn.trainer.load_head(turn.head_ids.index(h), layers)
        if header.done:
            raise JobDone()
        if header.lease_epoch != self.epoch and self._view is not None:
            self._view = None  # the lease changed: ask for its heads before the next turn
        return bool(weights)

    def _pull_state(
        self, header: pb.ModelHeader, partial: _PartialPull | None, request: pb.PullRequest
    ) -> _PartialPull:
        """The receive state of a pull whose header is ``header``: ``partial``'s when the server
        resumed that stream after the chunks it holds, else an empty one."""
        if (
            partial is not None
            and header.stream_id == partial.header.stream_id
            and header.resumed_from == partial.received > 0
        ):
            self.resumed_pulls += 1
            self._say(
                f"pull: version {header.version} resumed after chunk {partial.received} of {header.num_chunks}"
            )
            partial.header = header  # the same stream; its done and lease_epoch are now's
            return partial
        assembler = TensorAssembler(
            max_chunk_bytes=grpc_options.MAX_CHUNK_BYTES,
            max_tensor_bytes=grpc_options.MAX_PUSH_BYTES,
            max_total_bytes=grpc_options.MAX_PUSH_BYTES * 8,
            max_tensors=1 << 20,
        )
        return _PartialPull(request.have_version, tuple(request.head_factors), header, assembler, {}, {}, {})

    def _undelta(self, enc: EncodedTensor, delta_base: int) -> EncodedTensor:
        """``enc`` with its plain codec bytes as an uncompressed payload (``delta`` kept as a mark):
        a delta is added to the codes this worker holds and checked against its crc32.
        CodecError when the delta does not apply (the caller pulls the whole snapshot again)."""
        raw = codec_bytes(enc)
        if enc.delta:
            base = self._codes.get(enc.name)
            if base is None or delta_base != self.version:
                raise CodecError(
                    f"{enc.name!r}: a delta against version {delta_base}, but this worker holds "
                    f"version {self.version}" + ("" if base is not None else " without that tensor")
                )
            raw = apply_byte_delta(base, raw)
            if zlib.crc32(raw) != enc.crc32:
                raise CodecError(f"{enc.name!r}: the delta's result fails its crc32 check")
        return replace(enc, compressed=False, payload=raw)

    def _round_factors_to_wire(self, trainer: LocalTrainer) -> None:
        """Make the live factors exactly what the server will hold, so both sides agree on B', A'."""
        job, _ = self._joined()
        codec = get_codec(codec_for(Role.HEAD_FACTOR, job))
        if job.uplink == "fp32" and job.dtype == "float32":
            return
        with torch.no_grad():
            for layer in lte_layers(trainer.model).values():
                for p in (layer.lora_A, layer.lora_B):
                    value = p.detach().float().cpu()
                    if layer.transposed:  # its factors travel transposed (LTEConv1D.wire_factors)
                        value = value.mT.contiguous()
                    sent = codec.decode(codec.encode(value), tuple(value.shape))
                    p.copy_((sent.mT if layer.transposed else sent).to(p.device, p.dtype))

    def _push_messages(self, meta: PushMeta, encoded: list) -> Iterator[pb.UpdateChunk]:
        job, _ = self._joined()
        yield pb.UpdateChunk(header=meta.to_proto())
        for enc in encoded:
            for chunk in tensor_chunks(enc, job.max_chunk_bytes):
                yield pb.UpdateChunk(tensor=chunk)

    def push(self, turn: Turn, stats) -> pb.PushReply:
        """Push one turn's factors and replica deltas (idempotent: each head carries its round id)."""
        self.state = LeaseState.PUSHING
        self._round_factors_to_wire(turn.trainer)
        heads, replica = self.hooks.outgoing(self.pushes, *turn.trainer.export_update())
        encoded = list(encode_update(heads, replica, self._joined()[0]))
        meta = PushMeta(
            lease_id=self.lease_id,
            base_version=self.version,
            head_rounds={u.head_id: self.next_rounds[u.head_id] for u in heads},
            steps=stats.steps,
            samples=stats.samples,
            train_loss=stats.train_loss,
            seconds=stats.seconds,
            num_tensors=len(encoded),
        )
        timeout = push_deadline_s(sum(len(e.payload) for e in encoded))
        reply = self._call(
            lambda metadata: self.stub.PushUpdate(
                self._push_messages(meta, encoded), metadata=metadata, timeout=timeout
            ),
            what="push",
        )
        self.bytes_up += sum(len(e.payload) for e in encoded)
        return reply

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
                        state=self.state.value,
                    ),
                    metadata=self.metadata,
                    timeout=max(1.0, self.heartbeat_interval_s),
                )
                self._view = reply
                if reply.done:
                    self.stop.set()
            except grpc.RpcError as err:
                if refusal(err) in REREGISTER:
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
                try:
                    self._train_loop(progress)
                except LeaseLost as exc:
                    self._say(f"lease lost ({exc}); registering again")
                    continue
            self._check_interrupted()  # the loops end on `stop`: an interrupt is not the job's end
            if self._view is not None and self._view.done:  # a heartbeat brought the end first
                self._say_finished()
            return 0
        except JobDone:
            self._say_finished()
            return 0 if self.worker_id else EXIT_JOB_OVER  # refused at registration: joined too late
        except Quarantined as exc:
            print(f"lte-worker: error: the server quarantined this worker: {exc}", file=sys.stderr)
            self.lease_id = ""  # the lease is gone: nothing to give back
            return 2
        except grpc.RpcError:
            raise
        except Exception as exc:  # cannot build or train this lease: give it back (leave, below), say why
            self.failure = training_failure(exc)
            if isinstance(exc, (ValueError, FileNotFoundError, BadImageError)) and not self.head_ids:
                # the worker's own data or options do not fit the job: the message says what to fix
                print(f"lte-worker: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            else:
                print(
                    f"lte-worker: error: cannot train heads {self.head_ids}: {self.failure}", file=sys.stderr
                )
            return 2
        finally:
            self.stop.set()
            if progress:
                progress.close()
            if self._heartbeat is not None:  # never close the channel under a heartbeat in flight
                self._heartbeat.join(timeout=max(1.0, self.heartbeat_interval_s) + 1.0)
            self.leave()

    def _say_finished(self) -> None:
        self._say(
            f"job finished: {self.head_rounds} head-rounds in {self.pushes} pushes; "
            f"up {format_bytes(self.bytes_up)}, down {format_bytes(self.bytes_down)}"
        )

    def _train_loop(self, progress: Progress | None) -> None:
        started = time.perf_counter()
        samples = 0
        job, _ = self._joined()
        sync = job.mode == "sync"
        while not self.stop.is_set():
            self._check_interrupted()
            if self.lease_lost.is_set():
                raise LeaseLost("heartbeat refused")
            self._sync_lease()
            due = [t for t in self.turns if t.unfinished(job) and (not sync or t.last_base < self.version)]
            if not due:
                if any(t.unfinished(job) for t in self.turns):  # sync: the round closes, then train
                    self.pull(wait_s=30.0)
                else:  # standing by (no heads, or all finished): no snapshots, ask for heads each heartbeat
                    self.state = LeaseState.WAITING
                    if self.stop.wait(self.heartbeat_interval_s):
                        return
                    self._sync_lease(force=True)
                continue
            for turn in due:
                self._check_interrupted()
                if self.stop.is_set():
                    return
                if turn not in self.turns:  # an earlier turn's push adopted a lease without its heads
                    continue
                self.state = LeaseState.TRAINING
                stats = turn.trainer.train_round()
                if self.pushes == 0 and stats.frozen_cache_bytes:
                    self._say(
                        f"frozen-weight cache: {stats.frozen_cache_bytes / 2**20:.1f} MiB (--no-frozen-cache)"
                    )
                self.hooks.after_training(self.pushes, stats.seconds)
                samples += stats.samples
                self.samples_per_s = samples / max(1e-9, time.perf_counter() - started)
                self._check_interrupted()  # a round trained through a lost KeyboardInterrupt: not pushed
                if not self.hooks.before_push(self.pushes, self.stop):
                    return
                base = self.version
                reply = self._push_turn(turn, stats)
                if reply is None:
                    continue
                turn.last_base = base
                if progress:
                    progress.update(
                        self.head_rounds,
                        version=reply.version,
                        loss=stats.train_loss,
                        **{"samples/s": self.samples_per_s},
                        bytes_up=float(self.bytes_up),
                        bytes_down=float(self.bytes_down),
                    )
            if not sync:
                self.pull(wait_s=0.0)

    def _push_turn(self, turn: Turn, stats) -> pb.PushReply | None:
        """Push a trained turn; adopt the server's view when it moved or finished some of its heads
        and push the rest. None when nothing of the turn was applied (or the lease no longer holds it).

        ``_adopt`` may drop a turn between its training and its push (a head move racing the round:
        another turn's refused push took the server's view); such a turn is never pushed, since its
        heads' round ids (``next_rounds``) are the lease's no more."""
        while True:
            if turn not in self.turns:
                return None
            try:
                reply = self.push(turn, stats)
            except Resync as exc:
                self._say(
                    f"push of heads {turn.head_ids} refused ({exc}); taking the server's view of the lease"
                )
                self._sync_lease(force=True)
                continue
            except OutlierRefused as exc:
                # the server counted the round and merged nothing: go back to what it holds, go on
                self._say(f"push of heads {turn.head_ids} refused: {exc}")
                turn.trainer.discard_round()
                for h in turn.head_ids:
                    self.next_rounds[h] += 1
                turn.last_base = self.version
                self.pushes += 1
                self.outliers_refused += 1
                return None
            except grpc.RpcError as err:
                if refusal(err) is Refusal.STALE:  # keep the factors, take the newest base
                    self._say(f"push not applied: {err.details()}")
                    self.pull(wait_s=0.0)
                    return None
                raise
            if reply.applied or reply.duplicate:
                turn.trainer.commit()
                for h in turn.head_ids:
                    self.next_rounds[h] += 1
                self.pushes += 1
                self.head_rounds += len(turn.head_ids)
                if reply.done:  # this push finished the job
                    raise JobDone()
                return reply
            return None

    def leave(self) -> None:
        if not self.lease_id:
            return
        try:
            self.stub.Leave(
                pb.LeaveRequest(lease_id=self.lease_id, reason=leave_reason(self.failure)),
                metadata=self.metadata,
                timeout=LEAVE_TIMEOUT_S,
            )
        except grpc.RpcError:
            pass  # the server may already be gone; its scheduler returns the heads
        finally:
            self.lease_id = ""
            self.channel.close()  # a hang in grpcio's close after a stop signal: StopWatch's bound
