"""How the worker receives snapshots: one ``PullModel`` stream at a time, its chunks reassembled and
decoded, delta-coded against the snapshot codes it holds (server/snapshots.py), and resumed after
the chunks it has when the stream breaks (docs/design.md, the wire protocol).

``SnapshotPuller`` owns what outlives one pull: the codes of the snapshot the worker holds, what a
broken pull had received, the pull's backoff, and the counts of bytes, delta and resumed pulls.
Loading what it received into the worker's turns is ``Worker.pull``'s part.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
import torch

from lte.common.core.quant import QuantizedTensor
from lte.common.wire import grpc_options
from lte.common.wire.chunks import TensorAssembler
from lte.common.wire.codec import (
    CodecError,
    EncodedTensor,
    apply_byte_delta,
    codec_bytes,
    decode_tensor,
    decode_tensor_quantized,
)
from lte.common.wire.protocol import HEAD_PREFIX, QUANTIZED_SNAPSHOT_CODECS
from lte.proto import parameter_server_pb2 as pb
from lte.worker.rpc import RETRYABLE, Backoff, RpcCaller, StallWatchdog, raise_refusal

DELTA_PROTOCOL = 1  # delta-coded snapshots this worker can apply (PullRequest.delta_protocol)
PULL_STALL_S = 120.0  # a pull that receives nothing for this long is cancelled and retried
PULL_MAX_S = 6 * 3600.0  # the longest a pull may run however steadily its bytes arrive


@dataclass
class PartialPull:
    """What a pull received before its stream broke: its header, the tensors decoded so far, the
    assembler holding a tensor's first chunks, and how many chunk messages came (to resume after).
    A pull that completes returns the same record, whole."""

    have_version: int
    head_factors: tuple[int, ...]
    header: pb.ModelHeader
    assembler: TensorAssembler
    weights: dict[str, torch.Tensor | QuantizedTensor]
    factors: dict[str, torch.Tensor]
    codes: dict[str, bytes]
    deltas: int = 0
    received: int = 0


class SnapshotPuller:
    """Pulls snapshots for one worker.

    ``delta_snapshots``: pull a newer version as a delta of the snapshot codes this worker holds
    (server/snapshots.py), keeping those codes (an int8 snapshot's size) in ``codes``."""

    def __init__(self, rpc: RpcCaller, *, delta_snapshots: bool, say: Callable[[str], None]) -> None:
        self.rpc, self.say = rpc, say
        self.delta_snapshots = delta_snapshots
        self.stall_s = PULL_STALL_S
        self.codes: dict[str, bytes] = {}  # codec bytes of the snapshot of the worker's version, for deltas
        self.delta_pulls = 0  # pulls that came as deltas
        self.resumed_pulls = 0  # pulls that went on from where a broken one stopped
        self.bytes_down = 0  # chunk bytes received
        self.partial: PartialPull | None = None  # what a broken pull had received, to resume it
        self.backoff = Backoff()
        self.failing_since: float | None = None
        # (fingerprint, module tree) of the model this worker built: sent with each pull (the tree
        # only with the whole base) for the server's model check, wire protocol 4 (``Worker.register``)
        self.model: tuple[str, str] = ("", "")

    def fetch(
        self,
        pull_model: Callable,
        *,
        lease_id: str,
        version: int,
        epoch: int,
        wait_s: float,
        head_factors: list[int] | tuple[int, ...],
        dtype: torch.dtype,
    ) -> PartialPull | None:
        """One ``PullModel`` call (``pull_model``: the stub's method) for a worker holding
        ``version`` (-1: none): the whole pull, decoded (weights in ``dtype`` unless quantised), or
        None when the caller should pull again (a delta that did not apply; a stream that broke,
        after a backoff). Raises the refusals of ``rpc``, and the stream's error once the pull has
        failed for ``give_up_after_s``."""
        if version < 0:
            self.codes = {}
        partial, self.partial = self.partial, None
        if partial is not None and (
            partial.have_version != version or partial.head_factors != tuple(head_factors)
        ):
            partial = None  # a broken pull of another request: nothing to resume
        request = pb.PullRequest(
            lease_id=lease_id,
            have_version=version,
            wait_newer_s=wait_s,
            head_factors=list(head_factors),
            lease_epoch=epoch,
            delta_protocol=DELTA_PROTOCOL if self.delta_snapshots and self.codes else 0,
            resume_stream=partial.header.stream_id if partial is not None else 0,
            resume_from=partial.received if partial is not None else 0,
            model_fingerprint=self.model[0],
            model_tree=self.model[1] if version < 0 else "",  # with the whole base: names a difference
        )
        # No fixed deadline for the bytes (85 MB take 34 s at 20 Mbit/s, 340 s at 2): a pull that
        # moves nothing for stall_s is cancelled and retried; PULL_MAX_S only bounds the call.
        stream = self.rpc.call(pull_model, request, what="pull", timeout=wait_s + PULL_MAX_S)
        watchdog = StallWatchdog(
            stream, first_s=wait_s + self.stall_s, stall_s=self.stall_s, stop=self.rpc.interrupted
        )  # not rpc.stop: a heartbeat that brings the job's end sets it, and that pull ends with it
        state: PartialPull | None = None
        got = 0  # chunks this try received
        try:
            for msg in stream:
                watchdog.progress()
                if msg.HasField("header"):
                    state = self.receive_state(msg.header, partial, request)
                    continue
                if state is None:
                    raise RuntimeError("server sent a pull reply without a header")
                state.received += 1
                got += 1
                enc = state.assembler.add(msg.tensor)
                self.bytes_down += len(msg.tensor.data)
                if enc is None:
                    continue
                if enc.name.startswith(HEAD_PREFIX):
                    state.factors[enc.name] = decode_tensor(enc)
                    continue
                enc = self.undelta(enc, state.header.delta_base, version)
                state.deltas += enc.delta
                state.codes[enc.name] = enc.payload
                enc = replace(enc, delta=False)
                if enc.codec in QUANTIZED_SNAPSHOT_CODECS:
                    state.weights[enc.name] = decode_tensor_quantized(enc)
                else:
                    state.weights[enc.name] = decode_tensor(enc).to(dtype)
            if state is not None:
                state.assembler.finish()
        except CodecError as exc:
            if not request.delta_protocol:
                raise
            stream.cancel()  # a delta that does not apply: take the whole snapshot instead
            self.say(f"pull: {exc}; pulling the whole snapshot")
            self.codes = {}
            return None
        except grpc.RpcError as err:
            # errors of a server stream surface here, not in rpc.call: map them the same way
            self.rpc.check_interrupted()  # cancelled by the watchdog because the worker is stopping
            raise_refusal(err)
            if err.code() not in RETRYABLE and not watchdog.fired:
                raise
            if state is not None and state.received > 0 and state.header.stream_id:
                self.partial = state  # the next pull asks the server to go on from here
            now = time.monotonic()
            if got:
                self.failing_since = None  # chunks came in this try: the server is reachable
            self.failing_since = self.failing_since or now
            if now - self.failing_since > self.rpc.give_up_after_s:
                raise
            delay = self.backoff.next_delay()  # the server may be restarting: back off, never spin
            kept = self.partial
            going_on = f"; resuming after {kept.received} chunks" if kept is not None else ""
            self.say(
                f"pull: {err.code().name.lower()} ({err.details()}); retrying in {delay:.1f} s{going_on}"
            )
            self.rpc.stop.wait(delay)
            return None  # the caller's loop pulls again
        finally:
            watchdog.stop()
        if state is None:
            raise RuntimeError("server sent a pull reply without a header")
        self.backoff.reset()
        self.failing_since = None
        header = state.header
        if header.retry_after_s > 0 and not state.weights and not header.done:
            # the server had no thread to spare for a long-poll: ask again later, not at once
            self.rpc.stop.wait(min(header.retry_after_s, 30.0) * random.uniform(0.5, 1.5))
        return state

    def hold(self, pulled: PartialPull) -> None:
        """Keep the codes of the snapshot the worker now holds (``pulled``, loaded), for deltas."""
        self.codes = pulled.codes if self.delta_snapshots else {}
        self.delta_pulls += pulled.deltas > 0

    def receive_state(
        self, header: pb.ModelHeader, partial: PartialPull | None, request: pb.PullRequest
    ) -> PartialPull:
        """The receive state of a pull whose header is ``header``: ``partial``'s when the server
        resumed that stream after the chunks it holds, else an empty one."""
        if (
            partial is not None
            and header.stream_id == partial.header.stream_id
            and header.resumed_from == partial.received > 0
        ):
            self.resumed_pulls += 1
            self.say(
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
        return PartialPull(request.have_version, tuple(request.head_factors), header, assembler, {}, {}, {})

    def undelta(self, enc: EncodedTensor, delta_base: int, version: int) -> EncodedTensor:
        """``enc`` with its plain codec bytes as an uncompressed payload (``delta`` kept as a mark):
        a delta is added to the codes held for ``version`` (the worker's) and checked against its
        crc32. CodecError when the delta does not apply (the caller pulls the whole snapshot again)."""
        raw = codec_bytes(enc)
        if enc.delta:
            base = self.codes.get(enc.name)
            if base is None or delta_base != version:
                raise CodecError(
                    f"{enc.name!r}: a delta against version {delta_base}, but this worker holds "
                    f"version {version}" + ("" if base is not None else " without that tensor")
                )
            raw = apply_byte_delta(base, raw)
            if zlib.crc32(raw) != enc.crc32:
                raise CodecError(f"{enc.name!r}: the delta's result fails its crc32 check")
        return replace(enc, compressed=False, payload=raw)
