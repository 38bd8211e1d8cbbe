"""A small fault injector for the chaos tests: real kills, cut connections, delayed pushes.

Each fault is a real event on loopback, never a mock: ``kill9`` sends SIGKILL to a pid, ``fail_at``
makes a worker SIGKILL itself before its round K, ``FlakyProxy`` cuts live TCP connections under
gRPC, ``ServerProcess`` runs ``lte-server`` as a process that can be killed and restarted on the
same port. Waits poll a condition against a deadline, so a test reads as a story:

    with worker_processes(address, [fail_at(3), []]) as (doomed, healthy):
        exit_code = doomed.wait(timeout=60)          # it killed itself before its 4th push
        wait_for(coordinator, lambda c: c.done, 120, "the job to finish")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lte.common.wire.chunks import tensor_chunks
from lte.common.wire.codec import encode_tensor
from lte.proto import parameter_server_pb2 as pb
from lte.server.coordinator import Coordinator
from lte.server.guard import GuardSettings


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: equal iff the weights are bit-identical."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def master_hash(coordinator: Coordinator) -> str:
    return weights_hash(coordinator.plain_state())


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or the deadline passes (AssertionError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)  # a poll against a deadline, not a guess at how long something takes


def wait_for(coordinator: Coordinator, predicate: Callable[[Coordinator], Any], timeout_s: float, what: str):
    """Wait on the coordinator's own condition (notified on every version, lease loss and the end)."""
    with coordinator.changed:
        if not coordinator.changed.wait_for(lambda: predicate(coordinator), timeout_s):
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


# -- worker faults: flags of lte-worker, and signals to its pid ----------------------------------
def fail_at(round_index: int) -> list[str]:
    """Worker flags: after ``round_index`` acknowledged pushes, SIGKILL itself before pushing again."""
    return ["--fail-at-round", str(round_index)]


def delay_push(seconds: float) -> list[str]:
    """Worker flags: hold every push back ``seconds`` (heartbeats go on)."""
    return ["--delay-push", str(seconds)]


def group_gone(pgid: int) -> bool:
    """Whether no process of the process group ``pgid`` is left (a group leader's pid is its pgid)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def server_with_stderr(
    argv: list[str], *, cwd: Path, env: Mapping[str, str]
) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """Start ``argv`` (an ``lte-server`` command) with its stderr lines collected, as they come, into
    the returned list by the returned daemon thread (join it after the process exits to have every
    line); stdout is discarded. The caller stops the process by its pid."""
    proc = subprocess.Popen(
        argv, cwd=cwd, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    assert proc.stderr is not None
    stream = proc.stderr
    reader = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    reader.start()
    return proc, lines, reader


def kill9(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGKILL one process by its pid and reap it; returns its exit status (-9)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=timeout_s)


# -- network faults ------------------------------------------------------------------------------
class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``target`` and cuts one connection once, as a dropped link does.

    ``direction`` "down" cuts the first connection after ``cut_after`` bytes from the target (a
    pull); "up" cuts the connection that carries ``cut_after`` bytes to the target after ``arm()``
    (a push). At the cut the rest is held until ``read_enough()`` is true (the reader has what
    came), then ``on_cut`` is called and both sockets are reset; later bytes and connections pass
    untouched."""

    def __init__(
        self, target: str, cut_after: int, read_enough, on_cut=lambda: None, direction: str = "down"
    ) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.cut_after, self.read_enough, self.on_cut = cut_after, read_enough, on_cut
        self.direction = direction
        self.armed = threading.Event()
        if direction == "down":
            self.armed.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.cut = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        thread = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target, timeout=30)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            first = self.connections == 0
            self.connections += 1
            up, down = self.direction == "up", first and self.direction == "down"
            self._spawn(self._pump, client, upstream, self.cut_after if up else None)
            self._spawn(self._pump, upstream, client, self.cut_after if down else None)

    def arm(self) -> None:
        """Start counting the bytes to the cut (direction "up")."""
        self.armed.set()

    def _pump(self, src: socket.socket, dst: socket.socket, cut_after: int | None) -> None:
        moved = 0
        try:
            while data := src.recv(1 << 14):
                if cut_after is not None and self.cut.is_set():
                    cut_after = None  # one cut per proxy
                if cut_after is not None and not self.armed.is_set():
                    dst.sendall(data)
                    continue
                if cut_after is not None and moved + len(data) >= cut_after:
                    dst.sendall(data[: cut_after - moved])
                    wait_until(self.read_enough, 120, "the reader to read the bytes before the cut")
                    self.on_cut()
                    for s in (src, dst):  # a reset, as a dropped link's TCP ends: no orderly close
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    self.cut.set()
                    return
                dst.sendall(data)
                moved += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            s.close()
        for thread in self._threads:
            thread.join(timeout=30)


class FlakyProxy:
    """A TCP forwarder on 127.0.0.1 (port 0) in front of ``target_port``; ``drop()`` cuts every live
    connection at once, the way a NAT timeout or a flapping link does, so gRPC sees UNAVAILABLE."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.connections = 0
        self.drops = 0
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="flaky-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._live.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._cut(src, dst)

    def _cut(self, *socks: socket.socket) -> None:
        for s in socks:
            with self._lock:
                self._live.discard(s)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
            s.close()

    def drop(self) -> int:
        """Cut every live connection now; returns how many sockets were cut."""
        with self._lock:
            live = list(self._live)
            self.drops += 1
        self._cut(*live)
        return len(live)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            live = list(self._live)
        self._cut(*live)

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the server as a process ---------------------------------------------------------------------
SERVING = re.compile(r"serving lte\.v1\.ParameterServer on (\S+):(\d+)")


class ServerProcess:
    """``lte-server`` in its own process, so it can be killed -9 and started again on the same port.

    Its output goes to ``log_path``; ``start`` returns once the server printed the address it bound.
    """

    def __init__(self, args: list[str], log_path: Path, port: int = 0, env: dict | None = None) -> None:
        self.args, self.log_path, self.port = list(args), Path(log_path), port
        self.env = dict(os.environ, OMP_NUM_THREADS="1") if env is None else env
        self.proc: subprocess.Popen | None = None
        self._bound = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "lte.server.cli", *self.args, "--port", str(self.port)]
        self._bound.clear()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while not self._bound.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(5)
                raise AssertionError(
                    f"lte-server did not start (exit {self.proc.poll()}); its log:\n{self.log_path.read_text()}"
                )
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        with open(self.log_path, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                m = SERVING.search(line)
                if m:
                    self.port = int(m.group(2))
                    self._bound.set()

    def kill9(self) -> int:
        code = kill9(self.proc)
        self._reader.join(10)
        return code

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(10)
        return code

    def stop(self) -> None:
        """Terminate by pid, then kill what is left."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill9(self.proc)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- crafted pushes: the worker's own encoding path, so a test can corrupt one thing at a time ----
# Random factors are no optimiser's output: the update guard (server/guard.py) would rightly refuse
# them. Servers that validate such synthetic pushes run with it off.
SYNTHETIC = GuardSettings(mode="off")


def random_factors(coordinator: Coordinator, head_ids: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid, non-zero factors and replica deltas for ``head_ids``: folded in, they would change W
    (on a server whose update guard is off: ``SYNTHETIC``)."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g) * 0.01
        for name, shape in coordinator.expected_tensors(head_ids).items()
    }


def push_messages(
    lease_id: str,
    head_rounds: Mapping[int, int],
    base_version: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    codec: str = "fp16",
    zstd_level: int | None = 3,
    max_chunk_bytes: int = 1 << 20,
) -> list[pb.UpdateChunk]:
    """A push as ``lte-worker`` streams it: the PushHeader, then each tensor's chunks."""
    header = pb.PushHeader(
        lease_id=lease_id,
        base_version=base_version,
        heads=[pb.HeadRound(head_id=h, round=r) for h, r in head_rounds.items()],
        steps=10,
        samples=160,
        train_loss=1.0,
        num_tensors=len(tensors),
        seconds=0.1,
    )
    out = [pb.UpdateChunk(header=header)]
    for name, tensor in tensors.items():
        enc = encode_tensor(name, tensor, codec, zstd_level)
        out += [pb.UpdateChunk(tensor=c) for c in tensor_chunks(enc, max_chunk_bytes)]
    return out


class FakeClock:
    """A monotonic clock a test moves by hand: lease and straggler rules run without real waiting."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
