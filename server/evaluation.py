"""Evaluation of the master weights, in a background thread on a copy, so merges never wait for it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from torch import nn

from lte.common.data.text import evaluation_sample
from lte.common.job.config import JobConfig
from lte.common.job.trainer import build_job_model, evaluate


class BackgroundTask:
    """Runs ``fn`` in a daemon thread each time it is poked; pokes during a run coalesce into one more run."""

    def __init__(
        self, name: str, fn: Callable[[], Any], on_error: Callable[[Exception], Any] | None = None
    ) -> None:
        self.fn, self.on_error = fn, on_error  # on_error(exc): a failed run must not end the thread
        self._poked = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._poked.set()

    def _loop(self) -> None:
        while True:
            self._poked.wait()
            self._poked.clear()
            if self._stopped:
                return
            try:
                self.fn()
            except Exception as exc:
                if self._stopped:  # stopping: a cancelled run (EvaluationCancelled) is no failure
                    return
                if self.on_error is None:
                    logging.getLogger("lte.server").exception("%s failed", self._thread.name)
                else:
                    self.on_error(exc)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped = True
        self._poked.set()
        self._thread.join(timeout)


class EvaluationCancelled(Exception):
    """The server is stopping: an evaluation in progress ends at its next batch."""


class Evaluator:
    """Evaluates a copy of the master on the job's test split. ``load(model)`` copies the weights in
    under the caller's lock and returns (version, samples) of that copy.

    ``cancel()`` ends an evaluation in progress before its next forward pass (raising
    ``EvaluationCancelled`` in it), so a stopping server joins the evaluation thread in a batch's
    time instead of leaving it running native code while the interpreter exits (issue 25: a
    Ctrl+C during an evaluation ended in ``terminate called without an active exception``)."""

    def __init__(self, job: JobConfig, dataset, device: str) -> None:
        self.job, self.dataset, self.device = job, dataset, device
        self._model: nn.Module | None = None
        self._lock = threading.Lock()  # one evaluation at a time: the model copy is shared
        self._cancelled = threading.Event()

    def cancel(self, cancelled: bool = True) -> None:
        """Cancel evaluations from now on (``False``: allow them again)."""
        if cancelled:
            self._cancelled.set()
        else:
            self._cancelled.clear()

    def _check_cancelled(self, module: nn.Module, args: Any) -> None:
        if self._cancelled.is_set():
            raise EvaluationCancelled("the server is stopping")

    def run(
        self, load: Callable[[Any], tuple[int, int]], loader_workers: int = 0
    ) -> tuple[int, int, dict[str, float | str | None]]:
        with self._lock:
            model = self._model
            if model is None:
                model = self._model = build_job_model(self.job).to(self.device)
            if self._cancelled.is_set():
                raise EvaluationCancelled("the server is stopping")
            version, samples = load(model)
            hook = model.register_forward_pre_hook(self._check_cancelled)  # each batch asks first
            try:
                result: dict[str, float | str | None] = dict(
                    evaluate(model, self.dataset, device=self.device, loader_workers=loader_workers)
                )
                # language models: a short text sample from these weights (the dashboard shows it)
                result.update(evaluation_sample(model, self.dataset, seed=version, device=self.device))
            finally:
                hook.remove()
            return version, samples, result


class Evaluations:
    """The job's evaluations of the master weights: the records (``evals``), the newest failure
    (``error``, None once one succeeds) and the background thread that runs them.

    ``load(model) -> (version, samples)`` copies the master into ``model`` under the coordinator's
    lock; ``version()`` reads the version under it; ``elapsed_s()`` is the job's clock; ``log``
    writes a metrics record. An evaluation runs on a copy, so merges never wait for it.
    """

    def __init__(
        self,
        job: JobConfig,
        dataset,
        device: str,
        *,
        lock: threading.RLock,
        load: Callable[[nn.Module], tuple[int, int]],
        version: Callable[[], int],
        elapsed_s: Callable[[], float],
        log: Callable[[dict[str, Any]], None],
    ) -> None:
        self.lock, self._load, self._version, self._elapsed_s, self._log = lock, load, version, elapsed_s, log
        self.evaluator = Evaluator(job, dataset, device) if dataset is not None else None
        self.task: BackgroundTask | None = None
        self.evals: list[dict[str, Any]] = []
        self.error: str | None = None  # why the newest evaluation failed (None: it succeeded)
        self.failures = 0
        self.loader_workers = 0  # DataLoader processes of a streamed evaluation (lte-server --loader-workers)

    def start(self) -> None:
        """Evaluate in a background thread on a copy of W (``poke`` asks for one), so RPCs never wait."""
        if self.evaluator is not None and self.task is None:
            self.task = BackgroundTask("lte-eval", self.evaluate_now, on_error=self.failed)

    def poke(self) -> None:
        if self.task is not None:
            self.task.poke()

    def failed(self, exc: Exception) -> str:
        """An evaluation that could not run (its split deleted or unreadable under the job): one
        warning line, no traceback; the newest accuracy is marked stale (the status' ``eval_error``).
        Returns the reason."""
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        with self.lock:
            version, self.error = self._version(), reason
            self.failures += 1
            last = self.evals[-1]["version"] if self.evals else None
            self._log({"eval": True, "version": version, "error": reason})
        logging.getLogger("lte.server").warning(
            "evaluation at version %d failed (%s); %s",
            version,
            reason,
            f"the accuracy shown is version {last}'s (stale)"
            if last is not None
            else "no evaluation has succeeded yet",
        )
        return reason

    def evaluate_now(self) -> dict[str, Any]:
        """Evaluate the master now (in the caller's thread); the record, also logged."""
        if self.evaluator is None:
            raise RuntimeError("this coordinator has no dataset to evaluate on")
        version, samples, result = self.evaluator.run(self._load, loader_workers=self.loader_workers)
        record = {"version": version, "samples": samples, "time": round(self._elapsed_s(), 3), **result}
        with self.lock:
            self.evals.append(record)
            self.error = None
            self._log({"eval": True, **record})
        return record

    def stop(self) -> None:
        """Cancel an evaluation in progress at its next batch and join the thread; ``evaluate_now``
        still works afterwards."""
        if self.evaluator is not None:
            self.evaluator.cancel()
        if self.task is not None:
            self.task.stop()
        if self.evaluator is not None:
            self.evaluator.cancel(False)
