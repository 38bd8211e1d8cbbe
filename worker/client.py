"""The LTE worker: register, pull ``q(W)``, train its heads ``T`` steps, push the factors, repeat.

It never merges into W. Transient network failures are retried with exponential backoff and
jitter; a push is idempotent (its round id), so retrying one can never apply it twice. After
the server restarts or the lease expires, the worker registers again and carries on.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import fields as dataclass_fields
from functools import partial

import grpc
import torch

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
from lte.common.wire.failure import LeaseState, leave_reason, training_failure
from lte.common.wire.protocol import (
    FINGERPRINT_PROTOCOL,
    PROTOCOL_VERSION,
    PushMeta,
    Refusal,
    encode_update,
    job_from_proto,
)
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.worker.heartbeat import Heartbeat
from lte.worker.hooks import RoundHooks
from lte.worker.pulls import SnapshotPuller
from lte.worker.pushes import PushSender, round_factors_to_wire
from lte.worker.rpc import (
    Incompatible,
    JobDone,
    LeaseLost,
    ModelMismatch,
    ModelRefused,
    OutlierRefused,
    Quarantined,
    Resync,
    RpcCaller,
    refusal,
)
from lte.worker.turns import TrainerOptions, Turn, load_pulled, pushed_share, regroup_turns

EXIT_JOB_OVER = 4  # the job had finished before this worker could train a round
LEAVE_TIMEOUT_S = 5.0  # the Leave that gives the lease back (2 s was short for a loaded server)

_log = logging.getLogger("lte.worker")


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def worker_info(
    name: str, device: torch.device, max_heads: int, preferred_heads: list[int], job_fields: list[str]
) -> pb.WorkerInfo:
    """What a worker tells the server when it registers: who and where it is, its room (free
    memory, ``max_heads``), the heads it held (to keep them), and the version handshake."""
    return pb.WorkerInfo(
        name=name,
        device=str(device),
        free_memory_bytes=free_memory_bytes(device),
        max_heads=max_heads,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        lte_version=__version__,
        preferred_heads=preferred_heads,
        protocol_version=PROTOCOL_VERSION,
        job_fields=job_fields,
    )


class Worker:
    """One worker's lease and its rounds: it registers, adopts the lease's heads as turns
    (worker/turns.py), trains each turn ``T`` steps, pushes (worker/pushes.py), pulls the next
    version (worker/pulls.py) and keeps its lease alive (worker/heartbeat.py); every call goes
    through ``rpc`` (worker/rpc.py: retries, refusals as exceptions). ``run()`` is the loop."""

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
        """A worker for the server at ``server`` (host:port); ``register()`` or ``run()`` joins its job.

        ``delta_snapshots``: pull a newer version as a delta of the snapshot codes this worker
        holds (server/snapshots.py), keeping those codes (an int8 snapshot's size) in memory."""
        self.show_progress = show_progress  # the one-line display; off when logs are JSON lines
        self.server, self.device = server, torch.device(device)
        self.max_heads, self.data, self.data_dir = max_heads, data, data_dir
        self.skip_bad_images = skip_bad_images
        self.trainer_options = TrainerOptions(self.device, precision, cache_frozen, loader_workers)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.quiet = quiet
        self.hooks = hooks or RoundHooks()
        self.channel = grpc_options.make_channel(server, credentials)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.stop = threading.Event()
        self.interrupted = threading.Event()  # a stop signal arrived: leave, exit 130 (see interrupt())
        self.rpc = RpcCaller(
            metadata=metadata,
            give_up_after_s=give_up_after_s,
            stop=self.stop,
            interrupted=self.interrupted,
            parent_pid=parent_pid,
            server_address=server,
            tls_files=tls_files,
            say=self._say,
        )
        self.puller = SnapshotPuller(self.rpc, delta_snapshots=delta_snapshots, say=self._say)
        self.pusher = PushSender(self.rpc, lambda: self.stub)
        self.lease_id = ""
        self.worker_id = ""
        self.job: JobConfig | None = None
        self.turns: list[Turn] = []
        self.dataset: Dataset | TokenDataset | None = None
        self.version = -1
        self.epoch = -1  # the lease epoch whose heads the turns hold
        self.room = 1
        self.next_rounds: dict[int, int] = {}
        self.pushes = 0  # pushes acknowledged (a push of k heads counts once; head_rounds counts k)
        self.head_rounds = 0  # rounds of heads acknowledged (a push of k heads counts k)
        self.failure = ""  # why this worker could not train its lease; sent with Leave
        self.outliers_refused = 0  # pushes the server's update guard refused (their rounds discarded)
        self.known_job_fields = [f.name for f in dataclass_fields(JobConfig)]  # the version handshake
        self.state = LeaseState.STARTING
        self.samples_per_s = 0.0
        self.heartbeat = Heartbeat(self.rpc, self._heartbeat_request, lambda: self.stub)

    @property
    def trainer(self) -> LocalTrainer | None:
        """The first turn's trainer (the only one unless the worker trains heads in turns)."""
        return self.turns[0].trainer if self.turns else None

    @property
    def head_ids(self) -> list[int]:
        return [h for t in self.turns for h in t.head_ids]

    @property
    def bytes_down(self) -> int:
        """Snapshot bytes received (``SnapshotPuller.bytes_down``)."""
        return self.puller.bytes_down

    def _joined(self) -> tuple[JobConfig, Dataset | TokenDataset]:
        """The job and its data: known from ``register()`` on."""
        if self.job is None or self.dataset is None:
            raise RuntimeError("the worker has not registered yet")
        return self.job, self.dataset

    def interrupt(self) -> None:
        """What a stop signal does besides the handler's KeyboardInterrupt (``lte-worker`` calls it
        from a thread that the signal wakes, worker/cli.py ``StopWatch``): every wait of the worker
        ends (``stop``), a pull in flight is cancelled within ``STOP_POLL_S`` (worker/rpc.py), and
        the next check raises ``Interrupted``, so the worker leaves within seconds in every state
        even when the KeyboardInterrupt never reaches ``run``. Call it from any thread but not from
        a signal handler (an Event's lock may be held by the very code the handler interrupted)."""
        self.interrupted.set()
        self.stop.set()

    def _say(self, message: str) -> None:
        if not self.quiet:
            _log.info("%s: %s", self.worker_id or self.name, message, extra={"worker_id": self.worker_id})

    # -- the protocol --------------------------------------------------------------------------
    def register(self) -> None:
        info = worker_info(self.name, self.device, self.max_heads, self.head_ids, self.known_job_fields)
        reply = self.rpc.call(
            self.stub.Register, pb.RegisterRequest(worker=info), what="register", timeout=30
        )
        job = job_from_proto(reply.job)
        self.lease_id, self.worker_id = reply.lease_id, reply.worker_id
        self.puller.model = model_fingerprint(job)  # sent with every pull and push: the server checks it
        if reply.protocol_version < FINGERPRINT_PROTOCOL:  # a server that does not check: compare here
            differs = fingerprint_difference(
                (reply.model_fingerprint, reply.model_tree), self.puller.model, job.model
            )
            if differs:  # raised as the worker's failure: its Leave tells the server the same line
                raise ModelMismatch(f"this worker's model code is not the server's: {differs}")
        check_chunk_fits(job.max_chunk_bytes, grpc_options.MAX_MESSAGE_BYTES, side="worker")  # leaves
        self.heartbeat.interval_s = reply.heartbeat_interval_s
        self.heartbeat.view = None
        self.heartbeat.start()  # now: building the model and the first pull can outlast the lease timeout
        if self.dataset is None or self.job is None or self.job.dataset != job.dataset:
            self.dataset = load_job_dataset(
                job, self.data_dir, own_data=self.data, skip_bad_images=self.skip_bad_images
            )
        if self.job != job:
            self.turns = []
        self.job = job
        self.heartbeat.lease_lost.clear()
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
        """Make the turns hold exactly the lease's ``heads`` (``regroup_turns``, worker/turns.py) and
        fetch what new turns need: the base, whole, with moved heads' factors."""
        self.room = max(1, room)
        before, self.next_rounds = self.next_rounds, {h.head_id: h.next_round for h in heads}
        # a head whose round moved on at the server since our view was trained by another worker
        # (moved away and back while this one was stuck): what this worker holds of it is stale
        elsewhere = set() if fresh else {h for h, r in self.next_rounds.items() if before.get(h, r) != r}
        build = partial(self.trainer_options.build, *self._joined())  # (head ids, steps done) -> trainer
        self.turns, moved = regroup_turns(
            self.turns, heads, self.room, fresh=fresh, build=build, trained_elsewhere=elsewhere
        )
        self.epoch = epoch
        if moved is not None:
            self.version = -1  # new turns need the base: pull it whole, with moved heads' factors
            while not self.pull(wait_s=0.0, head_factors=moved):  # a failed pull backs off, gives up in time
                self.rpc.check_parent()

    def _heartbeat_request(self) -> pb.HeartbeatRequest:
        return pb.HeartbeatRequest(
            lease_id=self.lease_id,
            version=self.version,
            samples_per_s=self.samples_per_s,
            state=self.state.value,
        )

    def _sync_lease(self, force: bool = False) -> None:
        """Adopt the lease's heads as the server sees them now, when they changed (between turns only)."""
        view = self.heartbeat.lease_view(self.epoch, force=force)
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
        """Fetch a newer snapshot if there is one (``SnapshotPuller.fetch``, worker/pulls.py) and load
        it and the moved heads' factors into the turns; returns whether the base changed. Raises JobDone."""
        self.state = LeaseState.PULLING if not wait_s else LeaseState.WAITING
        pulled = self.puller.fetch(
            self.stub.PullModel,
            lease_id=self.lease_id,
            version=self.version,
            epoch=self.epoch,
            wait_s=wait_s,
            head_factors=head_factors,
            dtype=self._joined()[0].torch_dtype,
        )
        if pulled is None:
            return False  # the caller's loop pulls again
        header, weights = pulled.header, pulled.weights
        load_pulled(self.turns, weights, pulled.factors)
        if weights:
            self.version = header.version
            self.puller.hold(pulled)
        if header.done:
            raise JobDone()
        if header.lease_epoch != self.epoch and self.heartbeat.view is not None:
            self.heartbeat.view = None  # the lease changed: ask for its heads before the next turn
        return bool(weights)

    def push(self, turn: Turn, stats) -> pb.PushReply:
        """Push one turn's factors and replica deltas (idempotent: each head carries its round id)."""
        self.state = LeaseState.PUSHING
        job, _ = self._joined()
        round_factors_to_wire(turn.trainer, job)
        heads, replica = self.hooks.outgoing(self.pushes, *turn.trainer.export_update())
        encoded = list(encode_update(heads, replica, job))
        meta = PushMeta(
            lease_id=self.lease_id,
            base_version=self.version,
            head_rounds={u.head_id: self.next_rounds[u.head_id] for u in heads},
            steps=stats.steps,
            samples=stats.samples,
            train_loss=stats.train_loss,
            seconds=stats.seconds,
            num_tensors=len(encoded),
            model_fingerprint=self.puller.model[0],
        )
        return self.pusher.send(meta, encoded, job.max_chunk_bytes)

    @property
    def bytes_up(self) -> int:
        """Tensor bytes this worker put on the wire in pushes, a resent chunk counted again."""
        return self.pusher.payload_sent

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
            self.rpc.check_interrupted()  # the loops end on `stop`: an interrupt is not the job's end
            view = self.heartbeat.view
            if view is not None and view.done:  # a heartbeat brought the end first
                self._say_finished()
            return 0
        except JobDone:
            self._say_finished()
            return 0 if self.worker_id else EXIT_JOB_OVER  # refused at registration: joined too late
        except Quarantined as exc:
            print(f"lte-worker: error: the server quarantined this worker: {exc}", file=sys.stderr)
            self.lease_id = ""  # the lease is gone: nothing to give back
            return 2
        except (Incompatible, ModelRefused) as exc:  # the version handshake: the server said why
            print(f"lte-worker: error: {exc}", file=sys.stderr)
            self.lease_id = ""  # refused at registration, or the server ended the lease
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
            self.heartbeat.join()  # never close the channel under a heartbeat in flight
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
            self.rpc.check_interrupted()
            if self.heartbeat.lease_lost.is_set():
                raise LeaseLost("heartbeat refused")
            self._sync_lease()
            due = [t for t in self.turns if t.unfinished(job) and (not sync or t.last_base < self.version)]
            if not due:
                if any(t.unfinished(job) for t in self.turns):  # sync: the round closes, then train
                    self.pull(wait_s=30.0)
                else:  # standing by (no heads, or all finished): no snapshots, ask for heads each heartbeat
                    self.state = LeaseState.WAITING
                    if self.stop.wait(self.heartbeat.interval_s):
                        return
                    self._sync_lease(force=True)
                continue
            for turn in due:
                self.rpc.check_interrupted()
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
                self.rpc.check_interrupted()  # a round trained through a lost KeyboardInterrupt: not pushed
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
        heads' round ids (``next_rounds``) are the lease's no more. A push after such a move claims
        only its own heads' samples (``pushed_share``)."""
        trained = len(turn.head_ids)  # the heads ``stats`` counts
        while True:
            if turn not in self.turns:
                return None
            try:
                reply = self.push(turn, pushed_share(stats, trained, len(turn.head_ids)))
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
                metadata=self.rpc.metadata,
                timeout=LEAVE_TIMEOUT_S,
            )
        except grpc.RpcError:
            pass  # the server may already be gone; its scheduler returns the heads
        finally:
            self.lease_id = ""
            self.channel.close()  # a hang in grpcio's close after a stop signal: StopWatch's bound
