"""Delta-coded snapshots (issue 23): a worker holding version v pulls v -> v' as a byte delta of the
snapshot's codec bytes, and ends up with the full snapshot's q(W) bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from lte.common.wire.chunks import TensorAssembler
from lte.common.wire.codec import (
    CodecError,
    apply_byte_delta,
    byte_delta,
    codec_bytes,
    decode_tensor_quantized,
)
from lte.server.snapshots import SnapshotBuilder
from lte.worker.client import Worker
from tests.cluster import digits_job, run_in_thread, running_server

TIMEOUT_S = 240


def test_a_byte_delta_applied_to_its_base_gives_the_new_bytes_exactly():
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (4099,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    new = torch.randint(0, 256, (4099,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    delta = byte_delta(new, base)
    assert delta != new and len(delta) == len(new)
    assert apply_byte_delta(base, delta) == new
    assert byte_delta(new, new) == bytes(len(new))
    with pytest.raises(ValueError, match="equal lengths"):
        byte_delta(new, base[:-1])
    with pytest.raises(CodecError, match="cannot apply"):
        apply_byte_delta(base[:-1], delta)


def _tensors(messages) -> dict:
    assembler = TensorAssembler(
        max_chunk_bytes=1 << 20, max_tensor_bytes=1 << 30, max_total_bytes=1 << 31, max_tensors=99
    )
    out = {}
    for m in messages:
        enc = assembler.add(m.tensor)
        if enc is not None:
            out[enc.name] = enc
    assembler.finish()
    return out


def _master(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"fc1.weight": torch.randn(256, 512, generator=gen), "fc1.bias": torch.randn(256, generator=gen)}


def _merged(
    master: dict[str, torch.Tensor], gen: torch.Generator, scale: float = 1e-3
) -> dict[str, torch.Tensor]:
    """``master`` after a rank-8 merge of a small update, as one LTE round makes."""
    b, a = torch.randn(256, 8, generator=gen), torch.randn(8, 512, generator=gen)
    out = dict(master)
    out["fc1.weight"] = master["fc1.weight"] + scale * b @ a
    out["fc1.bias"] = master["fc1.bias"] + scale * torch.randn(256, generator=gen)
    return out


@pytest.mark.parametrize("codec", ["int8-row", "nf4", "fp32"])
def test_a_delta_snapshot_rebuilds_the_full_snapshots_codes_bit_for_bit(codec):
    job = digits_job(quant={"int8-row": "int8", "nf4": "nf4", "fp32": "none"}[codec])
    builder = SnapshotBuilder(job, ["fc1.weight"], delta_history=2)
    gen = torch.Generator().manual_seed(1)
    masters = [_master(gen)]
    for _ in range(3):
        masters.append(_merged(masters[-1], gen))
    held: dict[str, bytes] = {}
    for version, master in enumerate(masters):
        _, full_msgs, full_bytes = builder.get(lambda v=version: v, lambda v=version, m=master: (v, dict(m)))
        full = _tensors(full_msgs)
        if version == 0:
            held = {n: codec_bytes(e) for n, e in full.items()}
            assert builder.delta(0, -1) is None
            continue
        got = builder.delta(version, version - 1)
        assert got is not None
        messages, delta_bytes = got
        assert builder.delta(version, version - 1) is got  # built once, shared by every worker at v - 1
        deltas = _tensors(messages)
        if codec == "int8-row":  # the weight's codes barely move: its delta is far smaller
            assert deltas["fc1.weight"].delta
            assert len(deltas["fc1.weight"].payload) < 0.7 * len(full["fc1.weight"].payload)
        assert delta_bytes <= full_bytes
        for name, enc in deltas.items():
            want = codec_bytes(full[name])
            got_bytes = apply_byte_delta(held[name], codec_bytes(enc)) if enc.delta else codec_bytes(enc)
            assert got_bytes == want, name
            if enc.codec != "fp32":
                q_delta = decode_tensor_quantized(
                    type(enc)(**{**enc.__dict__, "payload": got_bytes, "compressed": False, "delta": False})
                )
                q_full = decode_tensor_quantized(full[name])
                assert torch.equal(q_delta.codes, q_full.codes) and torch.equal(q_delta.scale, q_full.scale)
            held[name] = got_bytes
    # version 0 fell out of a 2-version history (versions 1 and 2 kept beside the current 3)
    assert builder.delta(3, 0) is None and builder.delta(3, 1) is not None
    assert builder.delta(2, 1) is None  # only deltas to the current snapshot
    builder.invalidate()
    assert builder.delta(3, 2) is None


def test_a_delta_tensor_is_refused_where_codes_are_expected():
    job = digits_job(quant="int8")
    builder = SnapshotBuilder(job, ["fc1.weight"], delta_history=1)
    gen = torch.Generator().manual_seed(2)
    m0 = _master(gen)
    builder.get(lambda: 0, lambda: (0, dict(m0)))
    builder.get(lambda: 1, lambda: (1, _merged(m0, gen)))
    got = builder.delta(1, 0)
    assert got is not None
    enc = _tensors(got[0])["fc1.weight"]
    assert enc.delta
    with pytest.raises(CodecError, match="is a delta"):
        decode_tensor_quantized(enc)


def _run_worker(job, *, delta_worker: bool, delta_server: bool):
    with running_server(job, turn_grace_s=600, straggler_factor=0) as server:
        if not delta_server:  # a server without the delta protocol (an older one) sends full snapshots
            server.coordinator.snapshots.delta_history = 0
        worker = Worker(server.address, quiet=True, delta_snapshots=delta_worker)
        thread, out = run_in_thread(worker.run)
        assert server.wait_done(timeout=TIMEOUT_S)
        thread.join(timeout=60)
        assert out.get("result") == 0, out
        state = server.coordinator.plain_state()
        bytes_down = server.coordinator.bytes_down
    return worker, state, bytes_down


@pytest.mark.server
def test_sync_training_with_delta_snapshots_is_bit_identical_and_pulls_fewer_bytes():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    job = digits_job(heads=2, steps=60, quant="int8", uplink="fp32")
    full_worker, full_state, full_down = _run_worker(job, delta_worker=False, delta_server=True)
    delta_worker, delta_state, delta_down = _run_worker(job, delta_worker=True, delta_server=True)
    old_server_worker, old_server_state, _ = _run_worker(job, delta_worker=True, delta_server=False)
    assert full_worker.puller.delta_pulls == old_server_worker.puller.delta_pulls == 0
    assert delta_worker.puller.delta_pulls == job.rounds - 1  # every pull after the first one
    # a q(W) that differed in any round would change the factors trained on it, hence W
    for name, value in full_state.items():
        assert torch.equal(delta_state[name], value), name
        assert torch.equal(old_server_state[name], value), name
    assert delta_worker.bytes_down == delta_down < 0.9 * full_down  # 0.80 measured (digits MLP, lr 1e-2)


def test_a_worker_refuses_a_delta_against_codes_it_does_not_hold():
    """The worker checks the delta's base version and the result's crc32; the pull then falls back
    to the whole snapshot (worker/pulls.py, ``SnapshotPuller.fetch``'s CodecError branch)."""
    job = digits_job(quant="int8")
    builder = SnapshotBuilder(job, ["fc1.weight"], delta_history=1)
    gen = torch.Generator().manual_seed(3)
    m0 = _master(gen)
    _, full0, _ = builder.get(lambda: 0, lambda: (0, dict(m0)))
    builder.get(lambda: 1, lambda: (1, _merged(m0, gen)))
    got = builder.delta(1, 0)
    assert got is not None
    enc = _tensors(got[0])["fc1.weight"]
    held = codec_bytes(_tensors(full0)["fc1.weight"])
    worker = Worker("127.0.0.1:1", quiet=True)  # no call is made: the channel connects lazily
    try:
        puller = worker.puller
        puller.codes = {"fc1.weight": held}
        assert puller.undelta(enc, 0, version=0).payload != held  # the right base: it applies
        with pytest.raises(CodecError, match="against version 0, but this worker holds version 5"):
            puller.undelta(enc, 0, version=5)
        puller.codes = {"fc1.weight": bytes(len(held))}  # codes that are not version 0's
        with pytest.raises(CodecError, match="crc32"):
            puller.undelta(enc, 0, version=0)
    finally:
        worker.channel.close()


@pytest.mark.server
def test_lte_worker_no_delta_snapshots_pulls_whole_snapshots_and_deltas_are_on_by_default():
    import signal

    from lte.worker.cli import STOP_SIGNALS, main

    job = digits_job(heads=1, steps=30, quant="int8", uplink="fp32")
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    builds = {}
    try:
        for flags in ([], ["--no-delta-snapshots"]):
            with running_server(job, turn_grace_s=600, straggler_factor=0) as server:
                argv = ["--server", server.address, "--quiet", "--threads", "1", "--loader-workers", "0"]
                assert main([*argv, *flags]) == 0
                assert server.wait_done(timeout=TIMEOUT_S)
                builds[tuple(flags)] = server.coordinator.snapshots.delta_builds
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert builds[()] == job.rounds - 1  # every pull after the join was a delta
    assert builds[("--no-delta-snapshots",)] == 0
