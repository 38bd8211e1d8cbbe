"""Token auth, TLS and mutual TLS, the loopback rule, and no pickles (issue 5, item 5).

Certificates come from a CA this module generates with ``cryptography``; every connection is to
127.0.0.1 on a port the server picked (port 0).
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lte.common.wire.auth import bearer_metadata, channel_credentials, is_loopback, token_from
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.server.coordinator import Coordinator
from lte.server.grpc_server import ParameterServer
from lte.server.security import server_credentials
from lte.worker.client import Worker
from tests.cluster import DIGITS, digits_job, worker_processes
from tests.faults import SYNTHETIC, master_hash, push_messages, random_factors

TOKEN = "s3cret-token-for-tests-0123456789"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


@contextlib.contextmanager
def serving(job=None, **server_kwargs) -> Iterator[ParameterServer]:
    coordinator = Coordinator(
        job or digits_job(heads=2, steps=20), DIGITS, lease_timeout_s=600, guard=SYNTHETIC
    )
    server = ParameterServer(coordinator, host="127.0.0.1", port=0, **server_kwargs).start()
    try:
        yield server
    finally:
        server.stop(grace=0.5)


# -- a CA, a server certificate and client certificates, made here -------------------------------
def _issue(subject: str, issuer_key, issuer_name, *, ca: bool, server: bool = False, client: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def _name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(directory: Path, stem: str, key, cert) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM files: the job's CA, a server cert for localhost/127.0.0.1, a client cert, and a rogue CA
    with a client cert of its own."""
    import cryptography  # noqa: F401  a declared dev dependency (the tests make their own CA): never skipped

    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue("lte test CA", None, None, ca=True)
    rogue_key, rogue = _issue("rogue CA", None, None, ca=True)
    out = {}
    out["ca"], _ = _write(d, "ca", ca_key, ca)
    out["rogue_ca"], _ = _write(d, "rogue-ca", rogue_key, rogue)
    out["server_cert"], out["server_key"] = _write(
        d, "server", *_issue("lte-server", ca_key, ca.subject, ca=False, server=True)
    )
    out["client_cert"], out["client_key"] = _write(
        d, "client", *_issue("lte-worker", ca_key, ca.subject, ca=False, client=True)
    )
    out["rogue_cert"], out["rogue_key"] = _write(
        d, "rogue-client", *_issue("intruder", rogue_key, rogue.subject, ca=False, client=True)
    )
    return out


# -- the token ------------------------------------------------------------------------------------
def _every_rpc(channel: grpc.Channel, metadata, lease_id: str = "x") -> dict[str, object]:
    """Call each RPC of the service (and reflection) once; returns name -> reply or RpcError."""
    stub = pb_grpc.ParameterServerStub(channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    calls = {
        "Register": lambda: stub.Register(pb.RegisterRequest(), metadata=metadata, timeout=10),
        "PullModel": lambda: list(
            stub.PullModel(pb.PullRequest(lease_id=lease_id, have_version=-1), metadata=metadata, timeout=10)
        ),
        "PushUpdate": lambda: stub.PushUpdate(
            iter([pb.UpdateChunk(header=pb.PushHeader(lease_id=lease_id))]), metadata=metadata, timeout=10
        ),
        "Heartbeat": lambda: stub.Heartbeat(
            pb.HeartbeatRequest(lease_id=lease_id), metadata=metadata, timeout=10
        ),
        "PushOffset": lambda: stub.PushOffset(
            pb.PushOffsetRequest(lease_id=lease_id, push_id=1), metadata=metadata, timeout=10
        ),
        "Leave": lambda: stub.Leave(pb.LeaveRequest(lease_id=lease_id), metadata=metadata, timeout=10),
        "ServerReflectionInfo": lambda: list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=metadata,
                timeout=10,
            )
        ),
        "Unknown": lambda: channel.unary_unary("/lte.v1.ParameterServer/Nope")(
            b"", metadata=metadata, timeout=10
        ),
    }
    out = {}
    for name, call in calls.items():
        try:
            out[name] = call()
        except grpc.RpcError as err:
            out[name] = err
    return out


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong-token-wrong-token"),),
        (("authorization", TOKEN),),  # the token without the scheme
        (("authorization", f"Bearer {TOKEN} "),),
        (("authorization", f"bearer {TOKEN}"),),
        (("x-api-key", TOKEN),),
    ],
    ids=["missing", "wrong", "no-scheme", "trailing-space", "lowercase-scheme", "other-header"],
)
@pytest.mark.server
def test_every_rpc_without_the_right_token_is_unauthenticated_and_changes_nothing(metadata):
    with serving(token=TOKEN) as server, grpc.insecure_channel(server.address) as channel:
        c = server.coordinator
        before = master_hash(c)
        results = _every_rpc(channel, metadata)
        for name, result in results.items():
            assert isinstance(result, grpc.RpcError), f"{name} answered without the token: {result!r}"
            assert result.code() == grpc.StatusCode.UNAUTHENTICATED, (name, result.code(), result.details())
            assert "missing or wrong token" in result.details()
        assert c.leases == {} and master_hash(c) == before


@pytest.mark.server
def test_the_right_token_works_on_every_rpc_and_health_needs_none():
    with serving(token=TOKEN) as server, grpc.insecure_channel(server.address) as channel:
        auth = bearer_metadata(TOKEN)
        stub = pb_grpc.ParameterServerStub(channel)
        reply = stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(name="ok")), metadata=auth, timeout=10)
        c = server.coordinator
        push = push_messages(reply.lease_id, {0: 0, 1: 0}, 0, random_factors(c, [0, 1]))
        assert stub.PushUpdate(iter(push), metadata=auth, timeout=10).applied
        results = _every_rpc(channel, auth, lease_id=reply.lease_id)
        assert not isinstance(results["PullModel"], grpc.RpcError)
        assert not isinstance(results["Heartbeat"], grpc.RpcError)
        assert not isinstance(results["PushOffset"], grpc.RpcError)
        assert not isinstance(results["ServerReflectionInfo"], grpc.RpcError)
        assert results["Unknown"].code() == grpc.StatusCode.UNIMPLEMENTED  # past auth, then gRPC's own answer
        # with every head leased, a worker still joins, standing by with no heads
        assert not isinstance(results["Register"], grpc.RpcError) and not results["Register"].heads
        # probes (Kubernetes, load balancers) send no metadata: health is the one documented exemption
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lte.v1.ParameterServer"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.process
@pytest.mark.server
def test_a_worker_process_with_the_token_in_its_environment_trains_to_the_end(tmp_path, monkeypatch):
    job = digits_job(heads=2, steps=20)
    with serving(job, token=TOKEN) as server:
        monkeypatch.setenv("LTE_TOKEN", TOKEN)  # never on the command line, where ps shows it
        with worker_processes(server.address, [["--quiet"]], log_dir=tmp_path) as (proc,):
            assert server.wait_done(timeout=TIMEOUT_S), (tmp_path / "worker-0.log").read_text()
            assert proc.wait(timeout=60) == 0
        assert server.coordinator.version == job.rounds


@pytest.mark.server
def test_a_worker_with_the_wrong_token_gives_up_with_unauthenticated():
    with serving(token=TOKEN) as server:
        worker = Worker(server.address, quiet=True, metadata=bearer_metadata("x" * 20), give_up_after_s=5)
        with pytest.raises(grpc.RpcError) as info:
            worker.run()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.coordinator.leases == {}


def test_short_tokens_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="at least 16 characters"):
        token_from("short")
    monkeypatch.setenv("LTE_TOKEN", "short")
    with pytest.raises(ValueError, match="at least 16 characters"):
        token_from(None)
    monkeypatch.setenv("LTE_TOKEN", TOKEN)
    assert token_from(None) == TOKEN and token_from("flag-wins-over-env-0") == "flag-wins-over-env-0"


# -- the loopback rule ----------------------------------------------------------------------------
def _listening_sockets() -> set[str]:
    """Inodes of this process's TCP sockets in LISTEN state (from /proc, so nothing is mocked)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    listening = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in list(fh)[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in mine:
                    listening.add(cols[9])
    return listening


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.org"])
def test_a_non_loopback_address_without_a_token_is_refused_before_any_socket_opens(host):
    coordinator = Coordinator(digits_job(heads=2, steps=20), DIGITS)
    before = _listening_sockets()
    with pytest.raises(ValueError, match=f"refusing to serve on {host} without a token"):
        ParameterServer(coordinator, host=host, port=0)
    assert _listening_sockets() == before
    coordinator.close()


def test_loopback_names():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org", ""))


# -- TLS and mutual TLS ---------------------------------------------------------------------------
def _register(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            pb_grpc.ParameterServerStub(channel).Register(pb.RegisterRequest(), timeout=10)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK


@pytest.mark.server
def test_tls_a_client_must_trust_the_ca(pki):
    creds = server_credentials(pki["server_cert"], pki["server_key"], None)
    with serving(credentials=creds) as server:
        assert _register(server.address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        assert _register(server.address, channel_credentials(pki["rogue_ca"], None, None)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert _register(server.address, grpc.ssl_channel_credentials()) == grpc.StatusCode.UNAVAILABLE
        assert _register(server.address, channel_credentials(pki["ca"], None, None)) == grpc.StatusCode.OK
        assert len(server.coordinator.leases) == 1


@pytest.mark.server
def test_tls_a_worker_without_the_ca_fails_instead_of_hanging(pki):
    creds = server_credentials(pki["server_cert"], pki["server_key"], None)
    with serving(credentials=creds) as server:
        worker = Worker(server.address, quiet=True, give_up_after_s=2)  # plaintext: no CA at all
        with pytest.raises(grpc.RpcError) as info:
            worker.run()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.coordinator.leases == {}


@pytest.mark.server
def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(pki):
    creds = server_credentials(pki["server_cert"], pki["server_key"], pki["ca"])
    with serving(credentials=creds) as server:
        no_cert = channel_credentials(pki["ca"], None, None)
        rogue_cert = channel_credentials(pki["ca"], pki["rogue_cert"], pki["rogue_key"])
        good = channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
        assert _register(server.address, no_cert) == grpc.StatusCode.UNAVAILABLE
        assert _register(server.address, rogue_cert) == grpc.StatusCode.UNAVAILABLE
        assert server.coordinator.leases == {}
        assert _register(server.address, good) == grpc.StatusCode.OK


@pytest.mark.process
@pytest.mark.server
def test_a_worker_process_over_mutual_tls_with_a_token_trains_to_the_end(pki, tmp_path, monkeypatch):
    job = digits_job(heads=2, steps=20)
    creds = server_credentials(pki["server_cert"], pki["server_key"], pki["ca"])
    with serving(job, token=TOKEN, credentials=creds) as server:
        monkeypatch.setenv("LTE_TOKEN", TOKEN)
        tls = ["--tls-ca", pki["ca"], "--tls-cert", pki["client_cert"], "--tls-key", pki["client_key"]]
        with worker_processes(server.address, [["--quiet", *tls]], log_dir=tmp_path) as (proc,):
            assert server.wait_done(timeout=TIMEOUT_S), (tmp_path / "worker-0.log").read_text()
            assert proc.wait(timeout=60) == 0
        assert server.coordinator.version == job.rounds


def test_tls_settings_that_make_no_sense_are_refused(pki):
    with pytest.raises(ValueError, match="needs --tls-cert and --tls-key"):
        server_credentials(None, None, pki["ca"])
    with pytest.raises(ValueError, match="needs both --tls-cert and --tls-key"):
        server_credentials(pki["server_cert"], None, None)
    with pytest.raises(ValueError, match="needs both --tls-cert and --tls-key"):
        channel_credentials(pki["ca"], pki["client_cert"], None)


# -- no pickles: on the wire, in checkpoints, in the source ------------------------------------------
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _package_sources() -> list[Path]:
    files = []
    for folder in ("server", "worker", "common", "commands", "proto", "lte_pkg"):
        files += [p for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name]
    assert len(files) > 10, files
    return files


def test_no_module_of_the_package_can_unpickle():
    offences = []
    for path in _package_sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                offences += [
                    f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
                offences.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if fn.endswith(("torch.load", "serialization.load")) and kwargs.get("weights_only") != "True":
                    offences.append(f"{where}:{node.lineno}: {fn}(...) without weights_only=True")
                if kwargs.get("allow_pickle") not in (None, "False"):
                    offences.append(f"{where}:{node.lineno}: {fn}(..., allow_pickle=...)")
                if fn in ("eval", "exec"):
                    offences.append(f"{where}:{node.lineno}: {fn}(...)")
    assert not offences, "\n".join(offences)


def test_a_checkpoint_is_json_and_safetensors_only(tmp_path):
    from safetensors import safe_open

    coordinator = Coordinator(digits_job(heads=2, steps=20), DIGITS, checkpoint_dir=tmp_path)
    path = coordinator.save_checkpoint()
    coordinator.close()
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    state = json.loads((path / "state.json").read_text())
    assert state["version"] == 0
    with safe_open(str(path / "tensors.safetensors"), framework="pt") as fh:
        assert any(k.startswith("master/") for k in fh.keys())  # noqa: SIM118 - safe_open has no __iter__
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"
