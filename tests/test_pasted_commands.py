"""Every command the product prints for a user to paste is shell-quoted (issue 24, item 7), and the
"start workers with:" line of a TLS server with a token is a command that works as pasted: it
carries ``--tls-ca`` and says that the token goes in ``LTE_TOKEN`` (it never prints the token)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lte.commands.sim import build_parser, check_sim_args
from lte.common.job.checks import ConfigError
from lte.common.job.config import JobConfig, ServerSettings
from lte.server.checkpoint import save_checkpoint
from lte.server.runlock import check_reused_out
from lte.server.startup import program, worker_hint
from tests.faults import server_with_stderr, wait_until

BIN = Path(sys.executable).parent
TOKEN = "pasted-command-token-0123456789"


def test_the_resume_advice_for_a_reused_out_with_a_space_pastes_as_one_argument(tmp_path):
    out = tmp_path / "my runs" / "run 1"
    save_checkpoint(out / "checkpoints", 7, {"version": 7}, {})
    with pytest.raises(ConfigError) as err:
        check_reused_out(out, overwrite=False, resume=False)
    advice = re.search(r"add (.*) to continue that job", str(err.value))
    assert advice is not None, err.value
    assert shlex.split(advice.group(1)) == ["--resume", str(out)], advice.group(1)


def test_the_resume_advice_names_the_folder_absolute_so_a_leading_dash_is_no_option(tmp_path, monkeypatch):
    """A review: ``--out ./-x`` was advised as ``--resume -x``, which argparse reads as an option."""
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "-x" / "checkpoints", 3, {"version": 3}, {})
    with pytest.raises(ConfigError) as err:
        check_reused_out(Path("./-x"), overwrite=False, resume=False)
    advice = re.search(r"add (.*) to continue that job", str(err.value))
    assert advice is not None and shlex.split(advice.group(1)) == ["--resume", str(tmp_path / "-x")], (
        err.value
    )


def test_a_printed_program_is_its_bare_name_only_where_the_path_finds_this_one(monkeypatch):
    """``start workers with:`` followed ``continue with:``'s rule only for lte-server: under ``make
    cluster`` (.venv/bin off the PATH) it printed a bare ``lte-worker`` that the shell did not find."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert program("lte-worker") == str(BIN / "lte-worker")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}/usr/bin:/bin")
    assert program("lte-worker") == "lte-worker"
    assert program("no-such-lte-command") == "no-such-lte-command"


def test_lte_sims_advice_for_another_mode_is_a_quoted_command():
    args = build_parser().parse_args([])
    with pytest.raises(ConfigError) as err:
        check_sim_args(args, JobConfig(mode="async"))
    command = re.search(r"\(e\.g\. (.*)\)$", str(err.value)).group(1)
    assert shlex.split(command) == ["lte-server", "--mode", "async", "--local-workers", "2"]


def _command(line: str) -> list[str]:
    return shlex.split(line.split(" with: ", 1)[1])


def test_the_start_workers_line_carries_the_ca_quoted_and_names_what_it_cannot_carry(tmp_path):
    folder = tmp_path / "certs dir"
    plain = worker_hint("h:1", ServerSettings(), None)
    assert plain == f"start workers with: {shlex.join([program('lte-worker'), '--server', 'h:1'])}"
    tls = worker_hint("h:1", ServerSettings(tls_cert=str(folder / "s.pem"), tls_key="k.pem"), TOKEN)
    assert tls.startswith("start workers (they need the server's token in LTE_TOKEN) with: "), tls
    assert _command(tls) == [program("lte-worker"), "--server", "h:1", "--tls-ca", str(folder / "s.pem")]
    assert TOKEN not in tls
    mutual = ServerSettings(tls_cert=str(folder / "s.pem"), tls_key="k.pem", tls_ca=str(folder / "ca.pem"))
    line = worker_hint("h:1", mutual, None)
    assert "they need --tls-cert and --tls-key of a client certificate" in line
    assert _command(line)[-2:] == ["--tls-ca", str(folder / "ca.pem")]


def _self_signed(folder: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost (what ``openssl req -x509`` makes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lte-server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True)
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


@pytest.mark.process
@pytest.mark.timeout(900)
def test_the_start_workers_line_of_a_tls_server_with_a_token_works_as_pasted(tmp_path):
    """lte-server over TLS (its certificate in a folder with a space) with the token in LTE_TOKEN
    prints the line; its command, run as a shell would split it in a shell that has LTE_TOKEN,
    trains the job to its end. Before, it had no --tls-ca: the worker could not verify the server."""
    cert, key = _self_signed(tmp_path / "tls files")
    env = {**os.environ, "LTE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    job = ["--dataset", "digits", "--heads", "2", "--rank", "4", "--steps", "4", "--merge-every", "2",
           "--batch-size", "4"]  # fmt: skip
    server, lines, reader = server_with_stderr(
        [str(BIN / "lte-server"), *job, "--host", "127.0.0.1", "--port", "0", "--dashboard-port", "-1",
         "--tls-cert", cert, "--tls-key", key, "--out", str(tmp_path / "run"), "--linger", "0"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    worker = None
    try:
        hint = wait_until(
            lambda: next((ln for ln in lines if "start workers" in ln), None) or server.poll() is not None,
            300,
            "the start workers line",
        )
        assert server.poll() is None, "".join(lines)
        assert "(they need the server's token in LTE_TOKEN) with: " in hint and TOKEN not in hint
        argv = _command(hint.strip())
        assert argv[argv.index("--tls-ca") + 1] == cert, argv
        # the bare name where the server's PATH finds this venv's lte-worker, else its absolute path
        assert argv[0] in ("lte-worker", str(BIN / "lte-worker")), argv
        argv[0] = str(BIN / "lte-worker")  # as a shell with the venv activated runs the bare name
        worker = subprocess.run(
            [*argv, "--quiet", "--threads", "1"], env=env, capture_output=True, text=True, timeout=600
        )
        assert worker.returncode == 0, worker.stderr
        assert server.wait(timeout=300) == 0, "".join(lines)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    reader.join(timeout=30)
