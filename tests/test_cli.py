"""lte-server's configuration, logging and metrics sinks, through its real command line."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lte.common.job.config import JobConfig
from lte.server.cli import main


def print_config(capsys, *argv: str) -> dict:
    assert main(["--print-config", *argv]) == 0
    return tomllib.loads(capsys.readouterr().out)


def test_print_config_shows_defaults_and_masks_the_token(capsys):
    cfg = print_config(capsys, "--token", "a-secret-of-sufficient-length")
    assert cfg["model"] == "mlp" and cfg["heads"] == 8 and cfg["port"] == 50051
    assert cfg["token"] == "<set>"


def test_flags_win_over_the_file_and_the_file_over_defaults(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('model = "vit-tiny"\nheads = 32\nrank = 8\n[server]\nport = 6000\n')
    cfg = print_config(capsys, "--config", str(job), "--heads", "4")
    assert (cfg["model"], cfg["heads"], cfg["rank"], cfg["port"]) == ("vit-tiny", 4, 8, 6000)
    assert cfg["alpha"] == JobConfig().alpha == 64.0  # untouched default


def test_unknown_config_keys_are_errors_that_name_them(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text("heads = 4\nmerge_evry = 3\n")
    assert main(["--config", str(job), "--print-config"]) == 2
    assert "merge_evry" in capsys.readouterr().err


def test_rpc_threads_reach_the_server_and_too_few_are_refused(tmp_path, capsys):
    assert print_config(capsys, "--rpc-threads", "16")["rpc_threads"] == 16
    code = main(["--rpc-threads", "1", "--dashboard-port", "-1", "--port", "0", "--out", str(tmp_path)])
    assert code == 2
    assert "at least 2 handler threads" in capsys.readouterr().err


@contextlib.contextmanager
def _a_taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.server
def test_a_dashboard_port_in_use_is_one_line_naming_the_option_and_the_way_out(tmp_path, capsys):
    """A second `make cluster` while the first one's dashboard lingers on 8080: the line named the
    dashboard twice ("dashboard: dashboard cannot listen ...") and not the flag, nor how to pass
    another one through make."""
    with _a_taken_port() as port:
        code = main(["--dashboard-port", str(port), "--port", "0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"lte-server: error: --dashboard-port {port}: dashboard cannot listen on "), err
    assert "0 for a free one" in err and 'ARGS="--dashboard-port 0"' in err, err
    assert not (tmp_path / "run").exists()  # a refused start leaves no run folder


@pytest.mark.server
def test_a_grpc_port_in_use_is_one_line_naming_the_option_before_the_model_is_built(tmp_path, capfd):
    """The README walk-through: a taken --port printed gRPC's native `E1207 ... add_port.cc` line
    before lte-server's, and no way out."""
    with _a_taken_port() as port:
        code = main(["--port", str(port), "--dashboard-port", "-1", "--out", str(tmp_path / "run")])
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"lte-server: error: --port {port}: cannot listen on 127.0.0.1:{port} "), err
    assert "0 for a free one" in err, err
    assert not (tmp_path / "run").exists()


def test_a_host_this_machine_does_not_have_is_named_as_the_host_not_the_port(tmp_path, capsys, monkeypatch):
    """The taken-port check first blamed --port for `--host nosuch.invalid` (review of the change)."""
    monkeypatch.setenv("LTE_TOKEN", "a-secret-of-sufficient-length")
    code = main(["--host", "nosuch.invalid", "--dashboard-port", "-1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("lte-server: error: --host nosuch.invalid: cannot listen on "), err
    assert not (tmp_path / "run").exists()


def test_a_relative_data_dir_is_resolved_absolute_so_the_config_starts_from_any_folder(
    tmp_path, monkeypatch, capsys
):
    """README: the resume command printed at Ctrl+C pastes "from any folder", with the run's
    config.toml (what --print-config prints). A job started with `--data-dir data/kjv` wrote that
    relative path, and the command failed from elsewhere: "data/kjv/meta.json: missing"."""
    from lte.common.data.text import ByteTokenizer, write_token_files

    project = tmp_path / "project"
    write_token_files(
        project / "data" / "kjv", ["In the beginning God created the heaven. " * 40], ByteTokenizer()
    )
    monkeypatch.chdir(project)
    job = ["--model", "gpt-micro", "--dataset", "text", "--data-dir", "data/kjv", "--context", "16"]
    assert main([*job, "--print-config"]) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text)["data_dir"] == str(project / "data" / "kjv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.toml").write_text(text)
    monkeypatch.chdir(elsewhere)
    assert print_config(capsys, "--config", "config.toml") == tomllib.loads(text)


def test_invalid_values_are_refused_with_the_reason(capsys):
    assert main(["--heads", "0", "--print-config"]) == 2
    assert "heads must be >= 1" in capsys.readouterr().err


@pytest.mark.process
def test_json_logs_and_tensorboard_scalars_of_a_real_local_cluster(tmp_path):
    import tensorboard  # noqa: F401  a declared dev dependency: missing, the test fails

    cmd = [
        sys.executable, "-m", "lte.server.cli", "--model", "mlp", "--dataset", "digits", "--heads", "2",
        "--steps", "20", "--local-workers", "1", "--port", "0", "--dashboard-port", "-1", "--out", str(tmp_path / "run"),
        "--log-format", "json", "--tensorboard", str(tmp_path / "tb"), "--eval-every", "1",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]
    assert {r["level"] for r in records} <= {"info", "warning"}
    assert any(r["msg"].startswith("serving lte.v1.ParameterServer") and "address" in r for r in records)
    assert any("summary" in r for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/train_loss" in tags and "eval/test_accuracy" in tags
    assert len(events.Scalars("train/train_loss")) == 2  # one per version: 20 steps / T 10


@pytest.mark.process
@pytest.mark.parametrize(
    ("module", "argv", "names"),
    [
        ("lte.server.cli", ["--mode", "foo"], "argument --mode: invalid choice: 'foo'"),
        ("lte.worker.cli", ["--server", "127.0.0.1:1", "--bogus"], "unrecognized arguments: --bogus"),
        ("lte.commands.sim", ["--steps"], "argument --steps: expected one argument"),
        ("lte.commands.eval", ["--bogus"], "the following arguments are required: RUN_OR_MODEL"),
        ("lte.commands.generate", ["--bogus"], "the following arguments are required: --model"),
        ("lte.commands.prepare_text", ["--bogus"], "the following arguments are required: inputs, --out"),
    ],
)
def test_a_command_line_argparse_refuses_is_one_line_and_exit_2(module, argv, names):
    """argparse's own errors printed the whole usage first (41 lines for `lte-server --mode foo`)."""
    run = subprocess.run(
        [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "--help" in lines[0], run.stderr
