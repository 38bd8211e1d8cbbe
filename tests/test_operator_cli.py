"""Bad input through the real commands: one clear line naming the option, exit code 2, nothing left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lte.common.wire.auth import TOKEN_ENV

TOKEN = "a-token-of-sufficient-length-0123"


def run(tool: str, *argv: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120):
    """Run the installed ``lte-<tool>`` command as a user would, without any LTE_TOKEN of the caller."""
    command = Path(sys.executable).parent / f"lte-{tool}"  # the console script next to this interpreter
    full_env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [str(command), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=full_env,
    )


def assert_refused(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit code 2, one line on stderr, no traceback, every phrase in it."""
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(err.splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    return err


SERVER_CASES = {
    "negative port": (["--port", "-5"], ["--port -5", "[0, 65535]"]),
    "port above range": (["--port", "70000"], ["--port 70000", "[0, 65535]"]),
    "negative heads per worker": (["--heads-per-worker", "-2"], ["--heads-per-worker -2", ">= 0"]),
    "zero alpha": (["--alpha", "0"], ["alpha must be > 0", "got 0.0"]),
    "unknown zoo model": (["--model", "vit-xl"], ["--model 'vit-xl'", "unknown model", "vit-b"]),
    "factory that does not import": (
        ["--model", "nosuch.module:factory"],
        ["--model 'nosuch.module:factory'", "cannot import module 'nosuch.module'", "PYTHONPATH"],
    ),
    "heartbeat slower than the lease": (
        ["--heartbeat-interval", "40", "--lease-timeout", "30"],
        ["--heartbeat-interval 40", "below --lease-timeout 30"],
    ),
    "off loopback without a token": (["--host", "0.0.0.0"], ["--host 0.0.0.0", "--token or LTE_TOKEN"]),
    "short token": (["--token", "short"], ["--token", "at least 16 characters", "got 5"]),
    "token gRPC metadata cannot carry": (
        ["--token", "a token with spaces in it"],
        ["--token", "visible ASCII", "gRPC metadata"],
    ),
    "buffer larger than the job": (["--heads", "4", "--buffer-size", "9"], ["--buffer-size 9", "[0, 4]"]),
    "negative straggler factor": (["--straggler-factor", "-1"], ["--straggler-factor -1.0", ">= 0"]),
    "straggler factor not a number": (["--straggler-factor", "nan"], ["--straggler-factor nan", "finite"]),
    "infinite learning rate": (["--lr", "inf"], ["lr must be a finite number", "got inf"]),
    "negative RandAugment ops": (["--randaugment-ops", "-1"], ["--randaugment-ops -1", "[0, 14]"]),
    "RandAugment magnitude above 30": (
        ["--randaugment-ops", "2", "--randaugment-magnitude", "31"],
        ["--randaugment-magnitude 31", "[0, 30]"],
    ),
}


@pytest.mark.process
@pytest.mark.parametrize("argv, phrases", SERVER_CASES.values(), ids=SERVER_CASES.keys())
def test_server_refuses_bad_flags_by_name_and_leaves_no_run_folder(tmp_path, argv, phrases):
    assert_refused(run("server", *argv, "--dashboard-port", "-1", cwd=tmp_path), *phrases)
    assert list(tmp_path.iterdir()) == []  # no runs/<time>/ of a start that never happened


@pytest.mark.process
def test_config_file_values_of_the_wrong_type_name_the_key_and_the_file(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text('heads = "8"\n')
    assert_refused(
        run("server", "--config", str(config), "--print-config"),
        str(config),
        "key 'heads' must be an integer",
        "'8' (a string)",
    )
    config.write_text("[server]\nlease_timeout = true\n")
    assert_refused(
        run("server", "--config", str(config), "--print-config"), "key 'lease_timeout' must be a number"
    )


@pytest.mark.process
def test_a_config_key_set_twice_in_two_spellings_or_tables_is_refused(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text("merge-every = 5\nmerge_every = 10\n")  # TOML itself sees two keys
    assert_refused(
        run("server", "--config", str(config), "--print-config"),
        str(config),
        "merge-every and merge_every set the same option merge_every; keep one",
    )
    config.write_text("[job]\nheads = 4\n[server]\nheads = 8\n")
    assert_refused(run("sim", "--config", str(config)), "job.heads and server.heads")
    config.write_text("merge_evrey = 5\n")  # a typo: the server names the file and the key
    assert_refused(
        run("server", "--config", str(config), "--print-config"),
        f"--config {config}: unknown key(s) ['merge_evrey']",
    )
    config.write_text("merge-every = 5\n")  # one spelling alone is fine
    result = run("server", "--config", str(config), "--print-config")
    assert result.returncode == 0 and "merge_every = 5" in result.stdout, result.stderr


@pytest.mark.process
def test_lte_sim_refuses_unknown_config_keys_but_runs_a_server_run_s_config(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text("rand_augment_ops = 2\n")  # a typo: training without it would be silent
    assert_refused(run("sim", "--config", str(config)), str(config), "unknown key(s) ['rand_augment_ops']")
    config.write_text("randaugment_ops = {a = 1}\n")  # a table where a value belongs
    assert_refused(
        run("server", "--config", str(config), "--print-config"), "key 'randaugment_ops' holds a table"
    )
    assert_refused(run("sim", "--config", str(config)), "key 'randaugment_ops' holds a table")
    # what lte-server writes as a run's config.toml (job keys and server settings) runs in lte-sim
    written = run(
        "server", "--model", "mlp", "--dataset", "digits", "--heads", "2", "--steps", "4", "--print-config"
    )
    assert written.returncode == 0, written.stderr
    config.write_text(written.stdout)
    result = run("sim", "--config", str(config), "--json", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 4


@pytest.mark.process
def test_lte_sim_refuses_its_own_flags_in_a_config_file_where_they_would_be_ignored(tmp_path):
    """lte-sim reads --full, --workers, --export ... from the command line only: in a file they
    were accepted and silently ignored (an LTE run where full training was asked, no export)."""
    config = tmp_path / "job.toml"
    config.write_text('model = "mlp"\ndataset = "digits"\nsteps = 2\nfull = true\nexport = "m.safetensors"\n')
    assert_refused(
        run("sim", "--config", str(config), "--quiet", cwd=tmp_path),
        str(config),
        "['export', 'full'] are lte-sim flags",
        "--export --full",
    )
    assert not (tmp_path / "m.safetensors").exists()
    config.write_text("workers = 2\n")
    assert_refused(run("sim", "--config", str(config)), "['workers'] are lte-sim flags")
    # a server setting's value is checked as lte-server checks it (data_dir = 5 was a TypeError, exit 1)
    config.write_text('model = "mlp"\ndataset = "imagefolder"\ndata_dir = 5\n')
    assert_refused(run("sim", "--config", str(config)), "key 'data_dir' must be a string, got 5")


def test_every_server_setting_has_a_flag_a_checked_file_type_and_its_help():
    from dataclasses import fields

    from lte.common.job.config import SERVER_TYPES, ServerSettings
    from lte.server.cli import build_parser

    actions = {a.dest: a for a in build_parser()._actions}
    for f in fields(ServerSettings):
        assert f.name in SERVER_TYPES and isinstance(f.default, (SERVER_TYPES[f.name], type(None))), f.name
        action = actions[f.name]
        assert action.default is None and action.help == f.metadata["help"], f.name
        assert action.option_strings == ["--" + f.name.replace("_", "-")], f.name


@pytest.mark.process
def test_config_file_range_errors_are_caught_like_flags(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text("[server]\nport = -5\n")
    assert_refused(run("server", "--config", str(config), "--print-config"), "--port -5", "[0, 65535]")


@pytest.mark.process
def test_a_config_file_with_bad_syntax_or_missing_is_named(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text("heads = = 8\n")
    assert_refused(run("server", "--config", str(config)), f"--config {config}: not valid TOML", "line 1")
    missing = tmp_path / "nowhere.toml"
    assert_refused(run("sim", "--config", str(missing)), f"--config {missing}: no such file")


@pytest.mark.process
def test_a_chunk_bigger_than_the_grpc_message_limit_is_refused_at_start_up(tmp_path):
    result = run(
        "server", "--print-config", env={"LTE_GRPC_MAX_MESSAGE_BYTES": str(256 * 1024)}, cwd=tmp_path
    )
    assert_refused(
        result, "max_chunk_bytes 1048576", "gRPC message limit of 262144", "LTE_GRPC_MAX_MESSAGE_BYTES"
    )


@pytest.mark.process
def test_credential_files_are_checked_before_serving(tmp_path):
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("<html>not a certificate</html>\n")
    assert_refused(
        run("server", "--tls-cert", str(not_pem), "--tls-key", str(not_pem), cwd=tmp_path),
        f"--tls-cert {not_pem}: not a PEM file holding a certificate",
    )
    assert_refused(
        run("worker", "--server", "127.0.0.1:1", "--tls-ca", str(tmp_path / "none.pem")),
        "--tls-ca",
        "no such file",
    )


@pytest.mark.process
def test_an_unwritable_run_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run(
        "server", "--out", str(blocker / "run"), "--port", "0", "--dashboard-port", "-1", cwd=tmp_path
    )
    assert_refused(result, f"--out {blocker / 'run'}", "not writable")


@pytest.mark.process
def test_a_failed_bind_leaves_no_run_folder(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("server", "--port", str(port), "--dashboard-port", "-1", "--quiet", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))


@pytest.mark.process
def test_an_unexpected_error_prints_one_line_and_where_the_trace_is(tmp_path):
    (tmp_path / "exploding.py").write_text(
        "def factory(**kwargs):\n    raise RuntimeError('the factory exploded')\n"
    )
    result = run(
        "sim",
        "--model",
        "exploding:factory",
        "--steps",
        "10",
        "--quiet",
        env={"PYTHONPATH": str(tmp_path), "LTE_TRACE_DIR": str(tmp_path)},
    )
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "unexpected RuntimeError: the factory exploded (full trace: " in line
    trace = Path(line.rsplit("full trace: ", 1)[1].rstrip(")"))
    assert trace.parent == tmp_path and "Traceback" in trace.read_text()
    assert "the factory exploded" in trace.read_text()


WORKER_CASES = {
    "server without a port": (["--server", "127.0.0.1"], ["--server '127.0.0.1'", "needs host:port"]),
    "port out of range": (["--server", "host:99999"], ["--server 'host:99999'", "[1, 65535]"]),
    "bare IPv6": (["--server", "::1:50051"], ["IPv6 address in brackets"]),
    "negative max heads": (["--server", "h:1", "--max-heads", "-1"], ["--max-heads -1", ">= 0"]),
    "zero give-up": (["--server", "h:1", "--give-up-after", "0"], ["--give-up-after 0", "> 0"]),
    "missing data folder": (
        ["--server", "h:1", "--data", "/nonexistent/images"],
        ["--data /nonexistent/images: no such folder"],
    ),
    "half a client certificate": (["--server", "h:1", "--tls-cert", "c.pem"], ["--tls-cert and --tls-key"]),
}


@pytest.mark.process
@pytest.mark.parametrize("argv, phrases", WORKER_CASES.values(), ids=WORKER_CASES.keys())
def test_worker_refuses_bad_flags_by_name(argv, phrases):
    assert_refused(run("worker", *argv), *phrases)


@pytest.mark.process
def test_worker_names_the_environment_variable_of_a_bad_token():
    result = run("worker", "--server", "127.0.0.1:1", env={TOKEN_ENV: "too-short"})
    assert_refused(result, "LTE_TOKEN: the token must be at least 16 characters long (got 9)")


@pytest.mark.process
def test_sim_refuses_modes_it_does_not_emulate():
    for mode in ("async", "buffered"):
        assert_refused(run("sim", "--mode", mode), f"--mode {mode}", "sync aggregation only", "lte-server")


@pytest.mark.process
def test_sim_refuses_randaugment_on_data_that_is_not_image_files():
    assert_refused(
        run("sim", "--dataset", "digits", "--randaugment-ops", "2"),
        "--randaugment-ops 2",
        "RandAugment applies to image folders and shards, not to digits",
    )


@pytest.mark.process
def test_sim_refuses_more_workers_than_heads():
    assert_refused(run("sim", "--heads", "4", "--workers", "5"), "--workers 5", "[1, 4]")


def test_bytes_and_rates_read_as_on_the_dashboard():
    from lte.common.job.progress import format_bytes, format_count

    assert [format_bytes(n) for n in (0, 1023, 1024, 27044826, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "25.8 MiB",
        "3.0 GiB",
    ]
    assert [format_count(x) for x in (12.0, 950.4, 12430.0, 124300.0, 3.1e6)] == [
        "12",
        "950.4",
        "12k",
        "124k",
        "3.1M",
    ]


@pytest.mark.process
@pytest.mark.parametrize("tool", ["server", "worker", "sim", "eval"])
def test_help_fits_an_80_column_terminal(tool):
    result = run(tool, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    long = [line for line in result.stdout.splitlines() if len(line) > 80]
    assert long == [], long  # no example wraps in the middle of a flag
