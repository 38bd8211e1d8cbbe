"""The version handshake (issue 24, item 4): a worker that does not know a job field the job uses
is refused at registration, and a worker whose model code differs from the server's (a ReLU where
the server's factory has GELU, same shapes) is refused by the server at its first pull or push
(wire protocol 4: the worker sends the fingerprint of the model it built); one line on each side
names what differs."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from lte.common.job.config import JobConfig
from lte.common.job.fingerprint import fingerprint_difference, model_fingerprint
from lte.common.wire.failure import LeaseState
from lte.common.wire.protocol import CORE_JOB_FIELDS, PROTOCOL_VERSION, Refusal, handshake_refusal, refusal_of
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.server import service as service_module
from lte.worker.client import Worker
from tests.cluster import digits_job, running_server
from tests.faults import SYNTHETIC, master_hash, push_messages, random_factors

FACTORY = """from torch import nn


def make(image_size, in_channels, num_classes, **_):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(image_size * image_size * in_channels, 32), nn.{act}(), nn.Linear(32, num_classes)
    )
"""


def test_a_worker_from_before_the_handshake_may_join_only_jobs_of_core_fields():
    assert handshake_refusal(digits_job(), 0, (), "0.0.9") is None
    why = handshake_refusal(digits_job(randaugment_ops=2), 0, (), "0.0.9")
    assert why is not None and "randaugment_ops" in why and "lte-worker 0.0.9, wire protocol 1" in why
    assert "randaugment_ops" not in CORE_JOB_FIELDS


def test_a_worker_that_does_not_know_reset_optimizer_is_refused_only_by_a_job_that_sets_it():
    """A wire-protocol-2 worker from before ``reset_optimizer`` (its job_fields lack it) would keep
    its AdamW state across merges: refused by name where the job clears it, taken where it does not."""
    older = [f for f in JobConfig.__dataclass_fields__ if f != "reset_optimizer"]
    why = handshake_refusal(digits_job(reset_optimizer=True), 2, older, "0.9")
    assert why is not None and "does not know the job field(s) reset_optimizer" in why
    assert handshake_refusal(digits_job(), 2, older, "0.9") is None
    assert handshake_refusal(digits_job(reset_optimizer=True), 2, [*older, "reset_optimizer"], "1") is None


@pytest.mark.server
def test_an_older_worker_that_does_not_know_randaugment_is_refused_in_one_line(capsys, caplog):
    job = digits_job(heads=2, steps=20, randaugment_ops=2)
    with running_server(job) as server, caplog.at_level(logging.WARNING, logger="lte.server"):
        worker = Worker(server.address, quiet=True, give_up_after_s=30)
        worker.known_job_fields = [f for f in worker.known_job_fields if not f.startswith("randaugment")]
        assert worker.run() == 2
        assert server.coordinator.leases == {}  # refused before any lease
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lte-worker: error: the server refused this worker: "), err
    assert "does not know the job field(s) randaugment_ops" in err[0] and "upgrade it" in err[0]
    server_lines = [r.getMessage() for r in caplog.records if "refused worker" in r.getMessage()]
    assert len(server_lines) == 1 and "randaugment_ops" in server_lines[0]


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """The same module name on two paths: GELU for the server (this process's path), ReLU for the
    worker process."""
    gelu, relu = tmp_path / "server", tmp_path / "worker"
    for folder, act in ((gelu, "GELU"), (relu, "ReLU")):
        folder.mkdir()
        (folder / "act_model.py").write_text(FACTORY.replace("{act}", act))
    monkeypatch.syspath_prepend(str(gelu))
    sys.modules.pop("act_model", None)
    yield gelu, relu
    sys.modules.pop("act_model", None)


def test_the_fingerprint_names_the_module_that_differs(factories):
    job = JobConfig(model="act_model:make", image_size=8, in_channels=1, num_classes=10)
    gelu = model_fingerprint(job)
    tree = gelu[1].replace("activation.GELU", "activation.ReLU")
    why = fingerprint_difference(gelu, ("tree 0 factory 1", tree), job.model)
    assert why == (
        "the model differs: the server has 'module 2 torch.nn.modules.activation.GELU', "
        "this worker 'module 2 torch.nn.modules.activation.ReLU'"
    )
    assert fingerprint_difference(gelu, gelu, job.model) is None
    assert fingerprint_difference(("", ""), gelu, job.model) is None  # an older server sends none


@pytest.mark.process
@pytest.mark.server
def test_a_worker_process_with_relu_where_the_server_has_gelu_is_refused_on_both_sides(
    factories, tmp_path, caplog
):
    _, relu = factories
    job = digits_job(model="act_model:make", heads=2, steps=20)
    with running_server(job) as server, caplog.at_level(logging.WARNING, logger="lte.server"):
        env = {k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}
        env.update(PYTHONPATH=str(relu), OMP_NUM_THREADS="1")
        worker = subprocess.run(
            [str(Path(sys.executable).parent / "lte-worker"), "--server", server.address, "--quiet"],
            capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert server.coordinator.version == 0
        (lease,) = server.coordinator.leases.values()
        assert lease.state == LeaseState.FAILED and not any(
            h.lease_id for h in server.coordinator.heads.values()
        )
    err = worker.stderr.strip().splitlines()
    assert worker.returncode == 2, worker.stderr
    # the server refused it (wire protocol 4: the worker sends its fingerprint and leaves the check to it)
    assert len(err) == 1 and err[0].startswith("lte-worker: error: the server refused this worker: "), err
    assert "model is not the server's: the model differs: the server has " in err[0], err
    assert "activation.GELU" in err[0] and "the worker 'module 2 torch.nn.modules.activation.ReLU'" in err[0]
    server_lines = [
        r.getMessage() for r in caplog.records if r.name == "lte.server" and r.levelno >= logging.WARNING
    ]
    assert len(server_lines) == 1 and server_lines[0].startswith(f"refused worker {lease.worker_id} "), (
        server_lines
    )
    assert "activation.GELU" in server_lines[0] and "activation.ReLU" in server_lines[0]


def _raw_worker(stub, protocol: int, name: str):
    """Register as a worker of wire protocol ``protocol`` that knows every job field; the reply."""
    fields = [f.name for f in dataclasses.fields(JobConfig)]
    info = pb.WorkerInfo(name=name, protocol_version=protocol, job_fields=fields)
    return stub.Register(pb.RegisterRequest(worker=info), timeout=30)


def _refusal(call) -> tuple[grpc.StatusCode, str, Refusal | None]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details(), refusal_of(err.value.trailing_metadata())


@pytest.mark.server
def test_a_client_that_skips_the_workers_own_check_is_refused_by_the_server_before_anything_merges(caplog):
    """A worker of wire protocol 4 that does not compare fingerprints itself (a modified lte-worker;
    here a raw gRPC client) is refused by the server: a pull with another model's fingerprint, a push
    with none, each before anything is sent or merged, its lease ended. The same push with the
    server's fingerprint merges (the control); a protocol-3 worker (older, it compared itself) is
    still served without one."""
    job = digits_job(heads=2, steps=20)
    with (
        running_server(job, lease_timeout_s=600, guard=SYNTHETIC) as server,
        grpc.insecure_channel(server.address) as channel,
        caplog.at_level(logging.WARNING, logger="lte.server"),
    ):
        c, stub = server.coordinator, pb_grpc.ParameterServerStub(channel)
        before = master_hash(c)
        fingerprint, _ = c.fingerprint
        reply = _raw_worker(stub, PROTOCOL_VERSION, "liar")
        assert reply.protocol_version == PROTOCOL_VERSION and len(reply.heads) == 2
        other = fingerprint.rsplit(" code ", 1)[0] + " code 0123456789abcdef"  # another forward
        pull = pb.PullRequest(lease_id=reply.lease_id, have_version=-1, model_fingerprint=other)
        code, details, reason = _refusal(lambda: list(stub.PullModel(pull, timeout=30)))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, Refusal.MODEL_DIFFERS), details
        assert (
            "the code of the model's modules differs" in details
            and "the worker code 0123456789abcdef" in details
        )
        assert c.leases[reply.lease_id].state == LeaseState.FAILED and c.bytes_down == 0

        reply = _raw_worker(stub, PROTOCOL_VERSION, "liar")  # again, and push without a fingerprint
        assert len(reply.heads) == 2
        push = push_messages(reply.lease_id, {0: 0, 1: 0}, 0, random_factors(c, [0, 1]))
        code, details, reason = _refusal(lambda: stub.PushUpdate(iter(push), timeout=30))
        assert reason is Refusal.MODEL_DIFFERS and "sent no model fingerprint" in details, details
        assert c.version == 0 and master_hash(c) == before and c.bytes_up == 0  # refused before any tensor
        assert c.models_refused == 2

        reply = _raw_worker(stub, PROTOCOL_VERSION, "honest")  # the control: the server's fingerprint
        push = push_messages(reply.lease_id, {0: 0, 1: 0}, 0, random_factors(c, [0, 1]))
        push[0].header.model_fingerprint = fingerprint
        assert stub.PushUpdate(iter(push), timeout=30).applied and c.version == 1
        older = _raw_worker(stub, 3, "older")  # compared the server's fingerprint itself: not asked for one
        header = next(
            iter(stub.PullModel(pb.PullRequest(lease_id=older.lease_id, have_version=1), timeout=30))
        )
        assert header.header.version == 1
    lines = [
        r.getMessage() for r in caplog.records if r.name == "lte.server" and r.levelno >= logging.WARNING
    ]
    assert len(lines) == 2 and all(
        line.startswith("refused worker ") and "(liar)" in line for line in lines
    ), lines


@pytest.mark.server
def test_against_a_server_that_does_not_check_fingerprints_the_worker_compares_itself(monkeypatch, capsys):
    """A server of wire protocol 3 sends its fingerprint but does not check the workers': the worker
    refuses a model that differs itself, naming the first difference, as before protocol 4."""
    monkeypatch.setattr(service_module, "PROTOCOL_VERSION", 3)
    job = digits_job(heads=2, steps=20)
    with running_server(job) as server:
        fingerprint, tree = server.coordinator.fingerprint
        server.coordinator.fingerprint = (
            "tree 0" + fingerprint[len("tree ") + 16 :],
            "module <root> other.Net",
        )
        worker = Worker(server.address, quiet=True, give_up_after_s=30)
        assert worker.run() == 2
        assert server.coordinator.version == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this worker's model code is not the server's: the model differs" in err[0], err
    assert "the server has 'module <root> other.Net'" in err[0]


BLOCK = """import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    \"\"\"{doc}\"\"\"

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):  # {doc}
        return F.{act}(self.fc(x))
"""
BLOCK_FACTORY = """from torch import nn
from block_mod import Block


def make(image_size, in_channels, num_classes, **_):
    d = image_size * image_size * in_channels
    return nn.Sequential(nn.Flatten(), Block(d), nn.Linear(d, num_classes))
"""


def test_a_functional_activation_in_another_file_than_the_factory_is_part_of_the_fingerprint(
    tmp_path, monkeypatch
):
    """Same module tree, same factory file; the block the factory imports calls F.gelu on one side
    and F.relu on the other (as lte's zoo models do): the fingerprint tells them apart, and a
    docstring or comment alone changes nothing."""
    job = JobConfig(model="fac_mod:make", image_size=4, in_channels=1, num_classes=3)
    prints = {}
    for name, act, doc in (("gelu", "gelu", "one"), ("gelu-doc", "gelu", "two"), ("relu", "relu", "one")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "block_mod.py").write_text(BLOCK.replace("{act}", act).replace("{doc}", doc))
        (folder / "fac_mod.py").write_text(BLOCK_FACTORY)
        with monkeypatch.context() as m:
            m.syspath_prepend(str(folder))
            for mod in ("block_mod", "fac_mod"):
                sys.modules.pop(mod, None)
            prints[name] = model_fingerprint(job)
            for mod in ("block_mod", "fac_mod"):
                sys.modules.pop(mod, None)
    assert prints["gelu"][1] == prints["relu"][1]  # the trees are equal
    assert fingerprint_difference(prints["gelu"], prints["gelu-doc"], job.model) is None
    why = fingerprint_difference(prints["gelu"], prints["relu"], job.model)
    assert why is not None and why.startswith("the code of the model's modules differs"), why
    old_server = (prints["gelu"][0].rsplit(" code ", 1)[0], prints["gelu"][1])  # sends no code part
    assert fingerprint_difference(old_server, prints["relu"], job.model) is None


def test_model_fingerprints_computed_by_threads_at_once_agree_and_never_fail():
    """In-process workers joining together fingerprint their models at the same moment; the class
    sources are parsed once, under a lock (CPython 3.11's ast recursion count is shared by threads:
    `make test` saw "SystemError: AST constructor recursion depth mismatch" kill a worker)."""
    import threading

    from lte.common.job import fingerprint

    job = JobConfig(model="vit-micro", image_size=8, patch_size=2, in_channels=1, num_classes=10)
    results, errors = [], []
    for _ in range(5):
        fingerprint.clear_code_cache()
        start = threading.Barrier(6)

        def one(start=start):
            start.wait()
            try:
                results.append(model_fingerprint(job)[0])
            except Exception as exc:  # the test's point: none may fail
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 30 and len(set(results)) == 1
