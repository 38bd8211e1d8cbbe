"""The update guard (issue 24, item 1): honest jobs never trip it and stay bit for bit equal to
``lte-sim``; poisoned pushes (x300, 1e19 over bf16, NaN, one layer) never reach W; a merge that
breaks the master is rolled back and its worker quarantined; no checkpoint or export is
non-finite. In-process through the server's push path (tests/server_path.py) and with real
worker processes."""

from __future__ import annotations

import dataclasses
import math

import grpc
import pytest
import torch
from safetensors.torch import load_file

from lte.commands.sim import run_lte
from lte.common.data.text import ByteTokenizer, load_text, write_token_files
from lte.common.job.config import JobConfig
from lte.common.job.models import MODEL_NAMES
from lte.common.wire.protocol import PROTOCOL_VERSION, Refusal, Refused, refusal_of
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.server.checkpoint import load_checkpoint
from lte.server.coordinator import Coordinator
from lte.server.guard import GuardSettings, UpdateGuard, adam_step_bound, contribution_norm
from lte.worker.client import Worker
from lte.worker.hooks import poison_factors
from tests.cluster import DIGITS, digits_job, running_server, worker_processes
from tests.server_path import run_through_server

TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good. " * 30


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# -- the pieces --------------------------------------------------------------------------------
def test_contribution_norm_equals_the_norm_of_the_product_difference():
    g = torch.Generator().manual_seed(0)
    b, a, bp, ap = (torch.randn(s, generator=g) for s in [(30, 4), (4, 20), (30, 4), (4, 20)])
    expected = float((b.double() @ a.double() - bp.double() @ ap.double()).norm())
    assert contribution_norm(b, a, bp, ap) == pytest.approx(expected, rel=1e-9)
    assert contribution_norm(b, a) == pytest.approx(float((b.double() @ a.double()).norm()), rel=1e-9)
    assert contribution_norm(b * 1e200, a * 1e200) == math.inf


def test_adam_step_bound_holds_for_adversarial_gradients():
    bound = adam_step_bound(0.9, 0.999)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.0)
    worst = 0.0
    for t in range(3001):  # a huge gradient after many small ones: about the largest step Adam takes
        before = float(p.detach())
        p.grad = torch.tensor([1e3 if t == 3000 else 1e-3])
        opt.step()
        worst = max(worst, abs(float(p.detach()) - before))
    assert 3.0 < worst <= bound, (worst, bound)  # 3.08 of the 7.27 the bound allows


def test_unknown_guard_mode_is_refused():
    with pytest.raises(ValueError, match="--update-guard must be one of refuse, clip, off"):
        GuardSettings(mode="strict")


# -- honest jobs --------------------------------------------------------------------------------
@pytest.mark.slow  # training through the server path: tens of seconds
def test_sync_through_the_server_path_equals_lte_sim_bit_for_bit_with_the_guard_on():
    job = digits_job(heads=4, steps=40, uplink="fp32", quant="none")
    c = run_through_server(job, DIGITS)
    expected = run_lte(job, DIGITS, workers=2).master
    got = c.plain_state()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert c.guard.outliers == c.guard.rollbacks == 0
    assert (
        min(len(h) for h in c.guard.history.values()) >= c.guard.settings.min_history
    )  # the median bound ran


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    write_token_files(folder, [TEXT], ByteTokenizer())
    return load_text(str(folder), eval_tokens=256)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # vit-l and gpt2-medium (300M parameters) on a loaded 2-core box
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_the_guard_never_fires_on_an_honest_job_of_any_zoo_model(model, text_data):
    """Default thresholds, default uplink (fp16: its rounding is inside the bounds too), lr 1e-2 (a
    large one: large steps), 5 rounds: the median bound is active from round 2 on."""
    small = model in ("mlp", "vit-micro", "gpt-micro")
    values = dict(model=model, heads=4 if small else 2, rank=4, alpha=16.0, merge_every=2, steps=10, lr=1e-2)
    if model.startswith("gpt"):
        job = JobConfig(dataset="text", context=8, batch_size=2, **values).with_dataset(text_data)
        data = text_data
    else:
        job = JobConfig(dataset="digits", batch_size=4, **values).with_dataset(DIGITS)
        data = DIGITS
    c = run_through_server(job, data, workers=2 if small else 1)
    assert c.version == job.rounds
    assert c.guard.outliers == c.guard.rollbacks == 0, c.guard.status()
    assert min(len(h) for h in c.guard.history.values()) >= c.guard.settings.min_history
    assert finite(c.master)


# -- a rogue worker, in process -------------------------------------------------------------------
POISONS = [("scale=300", "fp16"), ("value=1e19", "bf16"), ("layer=300", "fp16")]


@pytest.mark.slow  # training through the server path: tens of seconds
@pytest.mark.rogue
@pytest.mark.parametrize(("poison", "uplink"), POISONS)
def test_every_poisoned_push_is_refused_from_the_first_round_and_the_rogue_quarantined(poison, uplink):
    job = digits_job(heads=6, steps=60, uplink=uplink)
    refused = []
    c = run_through_server(
        job,
        DIGITS,
        workers=3,
        corrupt=lambda worker, _, heads: poison_factors(heads, poison) if worker == 2 else heads,
        on_refused=lambda worker, exc: refused.append((worker, exc.reason)),
    )
    quarantine = c.guard.settings.quarantine_after
    assert refused == [(2, Refusal.OUTLIER)] * quarantine  # each of its pushes, from round 0 on
    assert c.guard.outliers == quarantine and c.guard.rollbacks == 0
    assert [l.worker["name"] for l in c.leases.values() if l.state == "quarantined"] == ["w2"]
    assert c.version == job.rounds  # a new worker took its heads
    assert finite(c.master)


@pytest.mark.slow  # training through the server path: tens of seconds
@pytest.mark.rogue
@pytest.mark.parametrize("mode", ["async", "buffered"])
def test_poisoned_pushes_are_refused_in_async_and_buffered_modes_too(mode):
    job = digits_job(heads=6, steps=60, mode=mode)
    refused = []
    c = run_through_server(
        job,
        DIGITS,
        workers=3,
        corrupt=lambda worker, _, heads: poison_factors(heads, "scale=300") if worker == 2 else heads,
        on_refused=lambda worker, exc: refused.append((worker, exc.reason)),
    )
    # (this harness does not follow the async scheduler's head moves: honest pushes may get HEAD_MOVED)
    assert [r for r in refused if r[0] == 2] == [(2, Refusal.OUTLIER)] * c.guard.settings.quarantine_after
    assert c.guard.outliers == c.guard.settings.quarantine_after and c.guard.rollbacks == 0
    assert c.version > job.rounds and finite(c.master)


@pytest.mark.rogue
def test_clip_mode_merges_an_outlier_scaled_down_to_its_bound():
    job = digits_job(heads=4, steps=40, uplink="fp16")
    clean = run_through_server(job, DIGITS, workers=2)
    c = run_through_server(
        job,
        DIGITS,
        workers=2,
        guard=GuardSettings(mode="clip", quarantine_after=100),
        corrupt=lambda worker, r, heads: (
            poison_factors(heads, "layer=300") if worker == 1 and r == 3 else heads
        ),
    )
    assert c.guard.clipped == 1 and c.guard.outliers == 1 and c.pushes_refused == 0
    assert c.version == job.rounds and finite(c.master)
    # the layer that was not poisoned merged exactly as in the clean run up to that round; the
    # clipped one moved, but no more than the bound allows
    drift = max(float((c.master[k] - clean.master[k]).norm() / clean.master[k].norm()) for k in clean.master
                if clean.master[k].is_floating_point())  # fmt: skip
    assert drift < 0.5


@pytest.mark.rogue
def test_a_merge_that_breaks_the_master_is_rolled_back_and_its_worker_quarantined(tmp_path):
    """Bounds off but the post-merge check: a 1e19 push (finite in bf16) overflows W; the merge is
    undone, redone without it, and the worker quarantined. No checkpoint is non-finite."""
    job = digits_job(heads=4, steps=20, uplink="bf16")
    lax = GuardSettings(ratio=math.inf, step_slack=math.inf)
    c = run_through_server(
        job,
        DIGITS,
        workers=2,
        guard=lax,
        corrupt=lambda worker, r, heads: (
            poison_factors(heads, "value=1e19") if worker == 1 and r == 1 else heads
        ),
    )
    assert c.guard.rollbacks == 1 and len(c.guard.quarantined) == 1
    quarantined = [l for l in c.leases.values() if l.state == "quarantined"]
    assert [l.worker["name"] for l in quarantined] == ["w1"]  # the rogue, not the honest one
    with pytest.raises(Refused) as refusal:  # whatever it sends next
        c.lease(quarantined[0].lease_id)
    assert refusal.value.reason is Refusal.QUARANTINED
    assert finite(c.master) and c.version == job.rounds
    c.checkpoints.directory = tmp_path  # a checkpoint folder after the job: save_checkpoint writes there
    path = c.save_checkpoint()
    assert path is not None and finite(load_file(str(path / "tensors.safetensors")))
    # the quarantine holds for the worker, not for one lease: it registers again, and after a restart
    resumed = Coordinator(job, DIGITS, guard=lax)
    resumed.restore(*load_checkpoint(path))
    for server in (c, resumed):
        with pytest.raises(Refused) as again:
            server.register(dict(quarantined[0].worker))
        assert again.value.reason is Refusal.QUARANTINED, again.value
        assert "worker 'w1' from ? was quarantined in this job (merge rolled back: " in again.value.message


@pytest.mark.server
def test_a_quarantined_worker_registering_again_is_refused_and_its_host_neighbours_are_not(capsys):
    """Over gRPC: the quarantine names the worker by its name and the host the server saw it come
    from; a quarantined lte-worker that registers again (a restart policy, a modified worker) is
    refused with the reason and exits 2; another worker on the same host joins."""
    job = digits_job(heads=2, steps=20)
    fields = [f.name for f in dataclasses.fields(JobConfig)]
    with running_server(job, lease_timeout_s=600) as server, grpc.insecure_channel(server.address) as channel:
        c, stub = server.coordinator, pb_grpc.ParameterServerStub(channel)
        info = pb.WorkerInfo(name="rogue", protocol_version=PROTOCOL_VERSION, job_fields=fields)
        first = stub.Register(pb.RegisterRequest(worker=info), timeout=30)
        with c.lock:  # what the guard does after its third outlier in a row (Coordinator._quarantine)
            c.lease_table.quarantine(first.lease_id, "3 outlier pushes in a row")
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(pb.RegisterRequest(worker=info), timeout=30)
        assert refusal_of(err.value.trailing_metadata()) is Refusal.QUARANTINED
        assert "worker 'rogue' from 127.0.0.1 was quarantined in this job (3 outlier pushes in a row)" in (
            err.value.details()
        )
        assert Worker(server.address, name="rogue", give_up_after_s=30, show_progress=False).run() == 2
        assert len(c.leases) == 1  # no second lease for it
        neighbour = pb.WorkerInfo(name="honest", protocol_version=PROTOCOL_VERSION, job_fields=fields)
        assert len(stub.Register(pb.RegisterRequest(worker=neighbour), timeout=30).heads) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith(
        "lte-worker: error: the server quarantined this worker: worker 'rogue' from 127.0.0.1 was quarantined"
    ), err_lines


# -- a rogue worker process among two honest ones ---------------------------------------------------
@pytest.mark.process
@pytest.mark.server
@pytest.mark.rogue
@pytest.mark.timeout(1800)  # the lte-sim baseline and a real 3-worker job: 10 min on a loaded 2-core box
@pytest.mark.parametrize(
    ("poison", "uplink"),
    [("scale=300", "fp16"), ("value=1e19", "bf16"), ("nan", "fp16"), ("layer=300", "fp16")],
)
def test_a_rogue_worker_process_cannot_wreck_a_real_job(tmp_path, poison, uplink):
    """Two honest lte-worker processes and one whose every push is poisoned: each poisoned push is
    refused (OUTLIER, then quarantine; NaN: MALFORMED, the worker gives up), its heads go to the
    honest workers, the job ends within 1 point of the same job without the rogue, and no
    checkpoint or export holds a non-finite value."""
    job = digits_job(heads=6, steps=200, uplink=uplink)
    clean = run_lte(job, DIGITS, workers=3, eval_every=job.rounds)
    with running_server(
        job, heads_per_worker=2, turn_grace_s=1.0, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2
    ) as server:
        args = [["--quiet"], ["--quiet"], ["--quiet", "--poison-push", poison]]
        with worker_processes(server.address, args, log_dir=tmp_path) as procs:
            assert server.wait_done(timeout=600), "job did not finish in time; see worker logs"
            for p in procs:
                p.wait(timeout=120)
            codes = [p.returncode for p in procs]
        c = server.coordinator
        accuracy = c.evaluate_now()["test_accuracy"]
        export = c.export(tmp_path / "model.safetensors")
    print(  # the figure RELIABILITY.md quotes (pytest -s)
        f"rogue {poison} over {uplink}: exit codes {codes}, guard {c.guard.outliers} outliers, "
        f"{len(c.guard.quarantined)} quarantined; accuracy {accuracy:.4f} vs {clean.test_accuracy:.4f} without it"
    )
    assert codes == [0, 0, 1 if poison == "nan" else 2], codes  # NaN: a malformed push, the worker gives up
    rogue = [l for l in c.leases.values() if l.worker.get("name") == "t2"]
    assert all(l.pushes == 0 or l.state == "quarantined" for l in rogue)
    if poison == "nan":
        assert c.guard.outliers == 0 and "NaN or Inf" in (tmp_path / "worker-2.log").read_text()
    else:
        assert c.guard.outliers == c.guard.settings.quarantine_after and c.guard.quarantined
    assert accuracy >= clean.test_accuracy - 0.01, (accuracy, clean.test_accuracy)
    assert finite(load_file(str(export)))
    checkpoints = sorted((tmp_path / "ckpt").glob("*/tensors.safetensors"))
    assert checkpoints and all(finite(load_file(str(p))) for p in checkpoints)


BN_FACTORY = """from torch import nn


def make(image_size, in_channels, num_classes):
    d = image_size * image_size * in_channels
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes))
"""


def test_batch_norm_statistics_do_not_look_like_outliers_as_the_learning_rate_decays(tmp_path, monkeypatch):
    """Running statistics move by the data, not the lr: per unit of lr their deltas grew 100x as the
    cosine decayed to 0, and near the end of an honest job every push was refused and every worker
    quarantined (the job stopped at version 37 of 40)."""
    (tmp_path / "bn_model.py").write_text(BN_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    job = digits_job(model="bn_model:make", heads=2, steps=120, merge_every=5, lr=1e-3)
    c = run_through_server(job, DIGITS, workers=2)
    assert c.guard.outliers == c.guard.rollbacks == 0, c.guard.status()
    assert c.version == job.rounds


@pytest.mark.rogue
def test_a_first_round_push_that_scales_only_a_is_refused():
    """A head's first round: ``A'`` is unknown and there is no history yet, so only ``B`` was bounded.
    The first worker to push, with ``B`` honest and ``A`` x30, merged: the master's norms ended 7x
    those of the clean job (94 vs 14 on hidden.0) and an honest worker was refused afterwards."""
    from lte.common.core.merge import HeadUpdate

    def scale_a(worker, _, heads):
        if worker != 0:
            return heads
        return [HeadUpdate(u.head_id, {k: (b, a * 30) for k, (b, a) in u.factors.items()}) for u in heads]

    job = digits_job(heads=6, steps=60)
    refused = []
    c = run_through_server(
        job, DIGITS, workers=3, corrupt=scale_a, on_refused=lambda w, exc: refused.append((w, exc.reason))
    )
    assert refused[:1] == [(0, Refusal.OUTLIER)]  # its very first push
    assert c.guard.outliers == c.guard.settings.quarantine_after, c.guard.status()
    assert [l.worker["name"] for l in c.leases.values() if l.state == "quarantined"] == ["w0"]
    assert float(c.master["hidden.0.weight"].norm()) < 20  # the clean job's: 14.0


def test_an_uplink_rounding_flip_at_the_end_of_the_schedule_is_not_an_outlier():
    """Near the end of the cosine a round's learning rates sum to almost 0, but a factor entry that
    sits on an fp16 rounding boundary still flips by one ulp on the uplink: per unit of lr that
    contribution was thousands of times the median, and honest pushes of the last rounds were
    refused (a README walk-through of 2026-12-07: `--steps 4000` refused at version 394 of 400, a
    resumed job 3 times in its last 10 versions). Rounding is now a floor under the median bound."""
    job = digits_job(heads=2, rank=4, uplink="fp16")
    guard = UpdateGuard(GuardSettings(), job)
    gen = torch.Generator().manual_seed(0)
    b_prev = (0.1 * torch.randn(8, 4, generator=gen)).half().float()
    a_prev = torch.randn(4, 16, generator=gen).half().float()
    for _ in range(8):  # ordinary rounds at lr 1e-3: the median per unit of lr
        b = (b_prev + 1e-3 * torch.randn(8, 4, generator=gen)).half().float()
        verdict = guard.check({0: {"l": (b, a_prev)}}, {0: {"l": (b_prev, a_prev)}}, {}, {0: 1e-2})
        assert not verdict.outliers, verdict.describe()
        guard.accept(verdict)
    b = b_prev.clone()  # the last round: everything rounds back to B' but one entry, one ulp up
    b[0, 0] = torch.nextafter(b_prev[0, 0].half(), torch.tensor(math.inf, dtype=torch.half)).float()
    verdict = guard.check({0: {"l": (b, a_prev)}}, {0: {"l": (b_prev, a_prev)}}, {}, {0: 3e-9})
    assert not verdict.outliers, verdict.describe()
    # and a push 300 times an ordinary one at that lr is still refused
    b = b_prev + 300 * (b - b_prev) + 0.3 * torch.randn(8, 4, generator=gen)
    verdict = guard.check({0: {"l": (b.half().float(), a_prev)}}, {0: {"l": (b_prev, a_prev)}}, {}, {0: 3e-9})
    assert verdict.outliers
