"""A disk that refuses writes: checkpoints warn and retry, the last good one survives, the model finds a fallback."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lte.server import checkpoint as ckpt
from lte.server.coordinator import Coordinator
from lte.server.disk import WRITE_ERRORS, export_with_fallback, final_checkpoint
from tests.cluster import DIGITS, digits_job


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG in this process, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_failed_background_checkpoint_warns_and_is_retried_until_it_succeeds(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the checkpoint folder should be")
    coordinator = Coordinator(digits_job(heads=2), DIGITS, checkpoint_dir=blocker, checkpoint_every=1)
    coordinator.checkpoint_health.first_retry_s = coordinator.checkpoint_health._next_wait = 0.2
    try:
        coordinator.checkpoints.poke()
        wait_for(lambda: coordinator.status()["checkpoint_warning"] is not None)
        warning = coordinator.status()["checkpoint_warning"]
        assert warning.startswith("checkpoint failed (") and "training goes on, none saved yet" in warning
        assert coordinator.checkpoints.task._thread.is_alive()  # the writer thread survived the failure
        blocker.unlink()  # the operator frees the path: the retry, not a new version, writes it
        wait_for(lambda: coordinator.status()["checkpoint_warning"] is None)
        assert coordinator.checkpoint_health.failures >= 1
        assert ckpt.latest_checkpoint(blocker) == coordinator.checkpoint_health.last_good
    finally:
        coordinator.stop_background()


def test_a_write_that_fails_midway_keeps_the_last_good_checkpoint_and_leaves_no_temp(tmp_path):
    coordinator = Coordinator(digits_job(heads=2), DIGITS, checkpoint_dir=tmp_path, keep_checkpoints=1)
    try:
        good = coordinator.save_checkpoint()
        before = load_file(str(good / "tensors.safetensors"))
        with coordinator.lock:
            coordinator.version += 1  # a newer version, so a success would prune the old one
        with file_size_limit(4096), pytest.raises(WRITE_ERRORS, match="File too large"):
            coordinator.save_checkpoint()
        assert ckpt.list_checkpoints(tmp_path) == [good]
        assert [p.name for p in tmp_path.iterdir()] == [good.name]  # no half-written temp folder
        after = load_file(str(good / "tensors.safetensors"))
        assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
    finally:
        coordinator.stop_background()


def test_the_final_model_goes_to_a_named_fallback_when_the_run_folder_refuses_it(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("LTE_FALLBACK_DIR", str(tmp_path / "fallback"))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    coordinator = Coordinator(digits_job(heads=2), DIGITS)
    with caplog.at_level("WARNING", logger="lte.server"):
        path = export_with_fallback(coordinator.export, blocked / "run")
    assert path.parent == tmp_path / "fallback" and path.suffix == ".safetensors"
    assert set(load_file(str(path))) == set(coordinator.plain_state())
    assert f"exporting to {path} instead" in caplog.text


@pytest.mark.process
def test_a_real_server_whose_checkpoints_fail_still_trains_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")  # every checkpoint save fails
    cmd = [
        str(Path(sys.executable).parent / "lte-server"),
        *("--model", "mlp", "--dataset", "digits", "--heads", "2", "--steps", "40", "--local-workers", "1"),
        *("--checkpoint-every", "1", "--port", "0", "--dashboard-port", "-1", "--out", str(run_dir)),
    ]
    env = {k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1")
    )
    assert result.returncode == 0, result.stderr
    assert "lte-server: warning: checkpoint failed (" in result.stderr
    assert "training goes on" in result.stderr
    assert (run_dir / "model.safetensors").is_file()


def test_on_exit_a_refused_checkpoint_still_leaves_the_weights_in_a_fallback(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LTE_FALLBACK_DIR", str(tmp_path / "fallback"))
    blocker = tmp_path / "run"
    blocker.write_text("")  # neither the checkpoint folder nor the model can go under it
    coordinator = Coordinator(digits_job(heads=2), DIGITS, checkpoint_dir=blocker / "checkpoints")
    try:
        with caplog.at_level("WARNING", logger="lte.server"):
            assert final_checkpoint(coordinator.save_checkpoint, coordinator.export, blocker) is None
    finally:
        coordinator.stop_background()
    saved = list((tmp_path / "fallback").glob("lte-model-run-*.safetensors"))
    assert len(saved) == 1 and set(load_file(str(saved[0]))) == set(coordinator.plain_state())
    assert "the checkpoint on exit failed" in caplog.text
    assert f"the merged weights are saved in {saved[0]}" in caplog.text


def test_when_every_path_refuses_the_model_the_error_names_both(tmp_path, monkeypatch):
    monkeypatch.setenv("LTE_FALLBACK_DIR", str(tmp_path / "fallback"))
    coordinator = Coordinator(digits_job(heads=2), DIGITS)
    with file_size_limit(4096), pytest.raises(OSError, match="cannot export the model: .*model.safetensors"):
        export_with_fallback(coordinator.export, tmp_path / "run")


def test_a_metrics_file_that_cannot_grow_does_not_stop_merges_nor_the_end_of_the_job(tmp_path, caplog):
    import torch

    from lte.server.coordinator import PushMeta

    job = digits_job(heads=1, steps=30)  # 3 rounds
    coordinator = Coordinator(job, DIGITS, metrics_path=tmp_path / "metrics.jsonl")
    try:
        lease, _ = coordinator.register({"max_heads": 1})
        tensors = {n: torch.zeros(s) for n, s in coordinator.expected_tensors([0]).items()}
        with caplog.at_level("WARNING", logger="lte.server"), file_size_limit(1):  # not one record fits
            for r in range(3):
                header = PushMeta(lease.lease_id, coordinator.version, {0: r}, 10, 160, 1.0, 0.5)
                assert coordinator.apply_push(header, tensors)["applied"]
        assert coordinator.version == 3 and coordinator.done
        assert caplog.text.count("cannot append to metrics.jsonl") == 1  # warned once, not per merge
    finally:
        coordinator.close()
