"""TLS certificates and time (issue 24, item 6's TLS part): an expired or not-yet-valid certificate
is refused at start-up in one line naming the date, and a worker whose handshake fails names the
certificate's problem instead of blaming the address (real lte-server / lte-worker processes)."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lte.common.job.checks import ConfigError, check_certificate_dates
from lte.server.security import server_credentials
from tests.test_operator_cli import assert_refused, run
from tests.test_security import _write, serving

UTC = datetime.timezone.utc


def _certificate(tmp: Path, stem: str, start: datetime.datetime, end: datetime.datetime, ca=None):
    """A certificate for localhost/127.0.0.1 valid from ``start`` to ``end`` (self-signed when no
    ``ca`` (key, cert) is given), written as PEM: (cert path, key path)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca[1].subject if ca else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    )
    cert = builder.sign(ca[0] if ca else key, hashes.SHA256())
    paths = _write(tmp, stem, key, cert)
    return paths, (key, cert)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dates")
    now = datetime.datetime.now(UTC)
    day = datetime.timedelta(days=1)
    out = {}
    (out["ca"], _), ca = _certificate(d, "ca", now - day, now + 30 * day)
    out["expired"], _ = _certificate(d, "expired", now - 30 * day, now - day, ca)
    out["future"], _ = _certificate(d, "future", now + day, now + 30 * day, ca)
    out["expired_end"] = (now - day).strftime("%Y-%m-%d")
    out["future_start"] = (now + day).strftime("%Y-%m-%d")
    return out


def test_the_date_check_names_the_certificate_and_its_date(certs):
    text = Path(certs["expired"][0]).read_bytes()
    with pytest.raises(ConfigError, match=f"certificate CN=expired expired on {certs['expired_end']}"):
        check_certificate_dates("tls_cert", certs["expired"][0], text)
    later = datetime.datetime.now(UTC) + datetime.timedelta(days=2)  # the future one is valid then
    check_certificate_dates("tls_cert", certs["future"][0], Path(certs["future"][0]).read_bytes(), later)


@pytest.mark.process
def test_lte_server_refuses_an_expired_or_not_yet_valid_certificate_in_one_line(certs, tmp_path):
    for which, phrase in (
        ("expired", f"expired on {certs['expired_end']}"),
        ("future", "is not valid before"),
    ):
        cert, key = certs[which]
        result = run("server", "--tls-cert", cert, "--tls-key", key, "--port", "0", cwd=tmp_path)
        assert_refused(result, f"--tls-cert {cert}", phrase)
        if which == "future":
            assert certs["future_start"] in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.process
def test_lte_worker_refuses_an_expired_certificate_before_dialling(certs):
    cert, key = certs["expired"]
    result = run(
        "worker", "--server", "127.0.0.1:1", "--tls-ca", certs["ca"], "--tls-cert", cert, "--tls-key", key
    )
    assert_refused(result, f"--tls-cert {cert}", f"expired on {certs['expired_end']}")


@pytest.mark.server
def test_a_worker_names_the_servers_expired_certificate_instead_of_the_address(certs):
    """The server (started in-process: the start-up check would refuse its certificate) presents an
    expired one: the worker process stops at once, naming the certificate problem and its dates."""
    creds = server_credentials(*certs["expired"], None)
    with serving(credentials=creds) as server:
        start = time.monotonic()
        worker = subprocess.run(
            [str(Path(sys.executable).parent / "lte-worker"), "--server", server.address, "--tls-ca",
             certs["ca"], "--quiet"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        seconds = time.monotonic() - start
    err = worker.stderr.strip()
    assert worker.returncode == 2, err
    assert "certificate has expired" in err and f"to {certs['expired_end']}" in err, err
    assert "is lte-server running" not in err
    assert seconds < 60  # no 5 minutes of retries
