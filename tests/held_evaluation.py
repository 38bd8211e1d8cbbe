"""``lte-server`` whose evaluations are held open: a test's way to stop the server while an
evaluation surely runs (issue 25: Ctrl+C during an evaluation ended in ``terminate called without
an active exception``, exit 134). Run as ``python -m tests.held_evaluation MARKER LTE-SERVER-ARGS``.

Everything is the real server (``lte.server.cli.main``): its model, data, loader processes,
workers, gRPC and shutdown. One fault is injected, as the workers' ``--slow-down`` hooks do: at
each evaluation's first forward pass (the loader processes of a streamed split are running then)
the evaluation thread writes ``evaluating`` to MARKER and waits there until the server cancels
its evaluations (``Evaluator.cancel``, which a stopping server calls) or 120 s pass. It then
appends ``released by the server's cancel`` (or ``released by the bound``), the forward pass goes
on natively while the server stops, and the next batch meets the server's own cancellation check.
At the interpreter's exit it appends ``evaluation thread alive at exit`` if the server left its
evaluation thread running (it must join it before).
"""

from __future__ import annotations

import atexit
import sys
import threading
from pathlib import Path

from lte.server import evaluation
from lte.server.cli import main

HOLD_BOUND_S = 120.0


def install(marker: Path) -> None:
    cancelled = threading.Event()
    real_cancel, real_evaluate = evaluation.Evaluator.cancel, evaluation.evaluate

    def cancel(self, cancel: bool = True) -> None:
        if cancel:
            cancelled.set()
        real_cancel(self, cancel)

    def evaluate(model, *args, **kwargs):
        held: list[bool] = []

        def hold(module, inputs) -> None:
            if held:
                return
            held.append(True)
            with marker.open("a") as f:
                f.write("evaluating\n")
            released = cancelled.wait(HOLD_BOUND_S)
            with marker.open("a") as f:
                f.write("released by the server's cancel\n" if released else "released by the bound\n")

        handle = model.register_forward_pre_hook(hold)
        try:
            return real_evaluate(model, *args, **kwargs)
        finally:
            handle.remove()

    def at_exit() -> None:
        if any(t.name == "lte-eval" and t.is_alive() for t in threading.enumerate()):
            with marker.open("a") as f:
                f.write("evaluation thread alive at exit\n")

    evaluation.Evaluator.cancel = cancel  # type: ignore[method-assign]
    evaluation.evaluate = evaluate
    atexit.register(at_exit)


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
