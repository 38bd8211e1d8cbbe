"""The job's status document, built in one place: ``read_status(coordinator)`` takes a consistent
snapshot under the coordinator's lock (plain values, no tensors) and ``job_status(snapshot)`` turns
it into the ``JobStatus`` document, with the rates derived from the merge history. The dashboard's
page, ``/api/status`` and ``/metrics`` (``server/dashboard.py``), and ``lte-server``'s progress line
(``server/run.py``) all read this one document.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from lte.common.wire.failure import GONE_STATES, SHOWN_STATES, LeaseState

if TYPE_CHECKING:
    from lte.server.coordinator import Coordinator

RATE_WINDOW_S = 60.0  # merges per minute and samples/s are measured over this much recent time
MAX_CURVE_POINTS = 500  # longer eval curves are thinned evenly, so a poll stays small in long runs


# -- the /api/status schema ------------------------------------------------------------------------
class WorkerStatus(BaseModel):
    """One lease: a worker process and the heads it trains."""

    worker_id: str = Field(description="id the server gave the worker at registration")
    name: str = Field("", description="label the worker chose (--name), hostname:pid by default")
    device: str = Field("", description="torch device the worker trains on")
    heads: list[int] = Field(description="ids of the LoRA heads leased to it")
    room: int = Field(1, description="heads it trains at once; it trains more than this in turns")
    last_seen_s: float = Field(description="seconds since its last RPC")
    staleness: int | None = Field(
        None, description="versions the server is ahead of the worker's snapshot; null before its first pull"
    )
    samples_per_s: float = Field(0.0, description="training throughput the worker reported")
    samples: int = Field(0, description="samples in its applied pushes")
    pushes: int = Field(0, description="pushes applied")
    bytes_up: int = Field(0, description="bytes it sent (factors)")
    bytes_down: int = Field(0, description="bytes it received (snapshots)")
    state: str = Field(description="one of: " + ", ".join(s.value for s in SHOWN_STATES))
    train_loss: float | None = Field(None, description="training loss of its last push; null before one")
    failure: str = Field("", description="failed: why the worker could not train its lease (it gave it back)")


class HistoryPoint(BaseModel):
    """One merge: the version it produced and the job's counters right after it."""

    version: int
    time: float = Field(description="seconds the job had run (monotonic clock, across resumes)")
    samples: int = Field(description="samples trained in the whole job so far")
    train_loss: float | None = Field(description="sample-weighted training loss of the merged pushes")
    pushes: int = Field(description="pushes folded into this merge")
    heads: int = Field(description="head updates folded into this merge")
    bytes_up: int
    bytes_down: int


class EvalPoint(BaseModel):
    """One evaluation of the master weights on the test split."""

    version: int
    samples: int
    time: float = Field(description="seconds the job had run (monotonic clock, across resumes)")
    test_loss: float | None = None
    test_accuracy: float | None = Field(None, description="absent for regression tasks")
    perplexity: float | None = Field(None, description="language models: exp(test_loss)")
    bits_per_byte: float | None = Field(
        None, description="language models: test_loss / ln 2 / bytes per token"
    )


class JobStatus(BaseModel):
    """A consistent snapshot of the job, plus rates derived from its merge history."""

    job: dict[str, str | int | float | bool | list[str] | None] = Field(
        description="the job's configuration (JobConfig)"
    )
    server: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict,
        description="lte-server's settings (ServerSettings, common/job/config.py), placeholders resolved, "
        "the token masked",
    )
    version: int = Field(description="merges applied to the master weights")
    done: bool
    samples: int = Field(description="samples trained in the whole job")
    bytes_up: int = Field(description="bytes received from workers")
    bytes_down: int = Field(description="bytes sent to workers")
    head_rounds_applied: int = Field(0, description="head rounds merged into the master weights")
    head_rounds_done: int = Field(0, description="per-head rounds done, summed over heads (the progress)")
    target_head_rounds: int = Field(0, description="heads x rounds planned per head")
    rounds_planned: int = Field(0, description="rounds each head trains: ceil(steps / T)")
    progress: float = Field(0.0, description="head rounds done / planned, in [0, 1]")
    heads_moved: int = Field(0, description="heads taken from stragglers or moved to balance the load")
    waiting_heads: dict[str, str] = Field(
        default_factory=dict, description="heads not training now (by id), and why"
    )
    elapsed_s: float = Field(
        0.0, description="seconds the job has run (monotonic clock, across resumes); stops at its end"
    )
    eta_s: float | None = Field(
        None,
        description="seconds left at the head-round rate measured since the server started; "
        "null before the first round, 0 once done",
    )
    pushes_refused: int = Field(0, description="async pushes refused as staler than the bound")
    guard_mode: str = Field("refuse", description="the update guard: refuse | clip | off (--update-guard)")
    guard_outliers: int = Field(
        0, description="pushes the update guard found out of bounds (refused or clipped)"
    )
    guard_clipped: int = Field(0, description="of those, pushes merged clipped to the bound (clip mode)")
    guard_rollbacks: int = Field(0, description="merges rolled back because the master left its bounds")
    guard_quarantined: list[str] = Field(default_factory=list, description="workers quarantined by the guard")
    guard_last: str | None = Field(
        None, description="the guard's newest event: worker, action, layer and norm"
    )
    eval_error: str | None = Field(
        None,
        description="why the newest evaluation failed (its score is then an older version's); null once one succeeds",
    )
    checkpoint_warning: str | None = Field(
        None, description="why the newest checkpoint failed (a full disk...); null once one succeeds"
    )
    snapshot_builds: int = Field(
        0, description="snapshots quantised and compressed (one per version pulled, at most)"
    )
    pulls_turned_away: int = Field(
        0, description="long-polls answered at once because no handler thread was free for them"
    )
    merges_per_minute: float = Field(
        description=f"over the last {RATE_WINDOW_S:g} s (the whole run once done)"
    )
    samples_per_s: float = Field(description=f"over the last {RATE_WINDOW_S:g} s (the whole run once done)")
    workers_active: int = Field(description="workers not left or expired")
    train_loss: float | None = Field(None, description="of the newest merge")
    test_loss: float | None = Field(None, description="of the newest evaluation")
    test_accuracy: float | None = Field(None, description="of the newest evaluation that has one")
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="how the model trains (as --explain-model): entries per kind, a worker's memory, "
        "bytes per round up and per version down, the full-rank share of the uplink, warnings",
    )
    task: str = Field("", description='"classification" | "regression" | "lm"')
    perplexity: float | None = Field(None, description="language models: of the newest evaluation")
    bits_per_byte: float | None = Field(None, description="language models: of the newest evaluation")
    text_sample: str | None = Field(
        None, description="language models: text generated at the newest evaluation"
    )
    text_sample_version: int | None = Field(None, description="the version that generated text_sample")
    text_sample_prompt: str | None = Field(
        None, description="the prompt text_sample starts with (tokens of val.bin); the rest is generated"
    )
    workers: list[WorkerStatus]
    free_heads: list[int] = Field(default_factory=list, description="heads no worker holds")
    history: list[HistoryPoint] = Field(description="the newest merges, oldest first")
    evals: list[EvalPoint] = Field(
        description=f"evaluations, oldest first; thinned evenly to {MAX_CURVE_POINTS}"
    )


# -- derived values ------------------------------------------------------------------------------
def finite(value: Any) -> float | None:
    """A float for JSON, or None for NaN, Inf and missing values."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def thin(points: list, limit: int = MAX_CURVE_POINTS) -> list:
    """At most ``limit`` evenly spaced items of ``points``, always with the first and the last."""
    if len(points) <= limit:
        return list(points)
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def recent_rates(st: dict[str, Any], window_s: float = RATE_WINDOW_S) -> tuple[float, float]:
    """(merges per minute, samples per second) over the last ``window_s`` seconds of the job.

    Once the job is done the window is the whole run, so the page keeps the run's averages.
    """
    history = st.get("history") or []
    if not history:
        return 0.0, 0.0
    end = float(history[-1]["time"]) if st.get("done") else float(st.get("elapsed_s", history[-1]["time"]))
    start = 0.0 if st.get("done") else max(0.0, end - window_s)
    before = [r for r in history if r["time"] < start]
    if before:
        base_t, base_version, base_samples = start, before[-1]["version"], before[-1]["samples"]
    elif history[0]["version"] <= 1:  # the whole run is in view: it began at version 0
        base_t, base_version, base_samples = start, 0, 0
    else:  # the history was truncated inside the window: measure from its oldest record
        base_t, base_version, base_samples = history[0]["time"], history[0]["version"], history[0]["samples"]
    span = end - base_t
    if span <= 0:
        return 0.0, 0.0
    merges = history[-1]["version"] - base_version
    samples = history[-1]["samples"] if st.get("done") else st.get("samples", history[-1]["samples"])
    return merges / span * 60.0, max(0, samples - base_samples) / span


def read_status(c: Coordinator) -> dict[str, Any]:
    """A consistent snapshot of the job (under the coordinator's lock; no tensors): the input of
    ``job_status``. Keys as ``JobStatus``' fields, plus ``guard`` (``UpdateGuard.status()``),
    ``heads`` (per head: rounds and steps done, its worker, why it waits) and ``eval_error``."""
    now = c.clock()
    with c.lock:
        done, planned = c.progress()
        return {
            "job": c.resolved_job,  # effective values, not placeholders
            "model": c.model_summary,
            "version": c.version,
            "done": c.done,
            "samples": c.samples,
            "bytes_up": c.bytes_up,
            "bytes_down": c.bytes_down,
            "head_rounds_applied": c.head_rounds_applied,
            "target_head_rounds": planned,
            "head_rounds_done": done,
            "rounds_planned": c.schedule.rounds_planned,
            "elapsed_s": round(c.elapsed_s(), 3),
            "eta_s": None if (eta := c.eta_s()) is None else round(eta, 1),
            "pushes_refused": c.pushes_refused,
            "checkpoint_warning": c.checkpoint_health.warning,
            "snapshot_builds": c.snapshots.builds,
            "pulls_turned_away": c.long_polls.turned_away,
            "heads_moved": c.lease_table.heads_moved,
            "late_pushes_refused": c.lease_table.late_pushes_refused,
            "guard": c.guard.status(),
            "eval_error": c.evaluations.error,
            "heads": [
                {
                    "head_id": h.head_id,
                    "rounds_done": h.next_round - h.pending,
                    "steps_done": h.steps_done,
                    "worker_id": c.leases[h.lease_id].worker_id if h.lease_id in c.leases else None,
                    "waiting": c.lease_table.waiting.get(h.head_id),
                }
                for h in c.heads.values()
            ],
            "workers": [
                {
                    "worker_id": l.worker_id,
                    "name": l.worker.get("name", ""),
                    "device": l.worker.get("device", ""),
                    "heads": list(l.head_ids),
                    "room": l.room,
                    "last_seen_s": round(now - l.last_seen, 3),
                    "staleness": max(0, c.version - l.version) if l.version >= 0 else None,
                    "samples_per_s": l.samples_per_s,
                    "samples": l.samples,
                    "pushes": l.pushes,
                    "bytes_up": l.bytes_up,
                    "bytes_down": l.bytes_down,
                    "state": (LeaseState.FAILED if l.failure else l.state).value,
                    "failure": l.failure,
                    "train_loss": l.last_loss,
                }
                for l in c.leases.values()
            ],
            "free_heads": [h.head_id for h in c.heads.values() if h.lease_id is None],
            "waiting_heads": {str(h): why for h, why in sorted(c.lease_table.waiting.items())},
            "history": list(c.history[-500:]),
            "evals": list(c.evaluations.evals),
        }


def _guard_fields(guard: dict[str, Any]) -> dict[str, Any]:
    """The update guard's counters and its newest event, one line (``UpdateGuard.status()``)."""
    events = guard.get("events") or []
    last = events[-1] if events else None
    return {
        "guard_mode": guard.get("mode", "refuse"),
        "guard_outliers": guard.get("outliers", 0),
        "guard_clipped": guard.get("clipped", 0),
        "guard_rollbacks": guard.get("rollbacks", 0),
        "guard_quarantined": list(guard.get("quarantined", [])),
        "guard_last": f"{last['action']} a push of worker {last['worker_id']}: {last['what']}"
        if last
        else None,
    }


def _progress_fields(st: dict[str, Any]) -> dict[str, Any]:
    """Head-rounds applied, done and planned, and their ratio in [0, 1]."""
    target = int(st.get("target_head_rounds") or 0)
    applied = int(st.get("head_rounds_applied") or 0)
    done_rounds = int(st.get("head_rounds_done", applied) or 0)
    return {
        "head_rounds_applied": applied,
        "head_rounds_done": done_rounds,
        "target_head_rounds": target,
        "rounds_planned": int(st.get("rounds_planned") or 0),
        "progress": min(1.0, done_rounds / target) if target else 0.0,
    }


def _newest_scores(history: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest merge's training loss and the newest evaluation's scores (and text sample)."""
    newest = evals[-1] if evals else {}
    accuracies = [e["test_accuracy"] for e in evals if e.get("test_accuracy") is not None]
    samples = [e for e in evals if isinstance(e.get("sample"), str)]
    sample = samples[-1] if samples else {}
    return {
        "train_loss": finite(history[-1].get("train_loss")) if history else None,
        "test_loss": finite(newest.get("test_loss")),
        "test_accuracy": finite(accuracies[-1]) if accuracies else None,
        "perplexity": finite(newest.get("perplexity")),
        "bits_per_byte": finite(newest.get("bits_per_byte")),
        "text_sample": sample.get("sample"),
        "text_sample_version": sample.get("version"),
        "text_sample_prompt": sample.get("sample_prompt"),
    }


def _curves(history: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The merge history and the evaluations (thinned to ``MAX_CURVE_POINTS``), NaN and Inf as null."""
    return {
        "history": [HistoryPoint(**{**r, "train_loss": finite(r.get("train_loss"))}) for r in history],
        "evals": [
            EvalPoint(
                version=e["version"],
                samples=e["samples"],
                time=e["time"],
                test_loss=finite(e.get("test_loss")),
                test_accuracy=finite(e.get("test_accuracy")),
                perplexity=finite(e.get("perplexity")),
                bits_per_byte=finite(e.get("bits_per_byte")),
            )
            for e in thin(evals)
        ],
    }


def _workers(st: dict[str, Any]) -> list[WorkerStatus]:
    return [
        WorkerStatus(
            **{
                **w,
                "samples_per_s": finite(w.get("samples_per_s")) or 0.0,
                "train_loss": finite(w.get("train_loss")),
            }
        )
        for w in st.get("workers", [])
    ]


def job_status(st: dict[str, Any]) -> JobStatus:
    """The status document (``/api/status``) of one ``read_status`` snapshot."""
    merges_per_minute, samples_per_s = recent_rates(st)
    history, evals = st.get("history") or [], st.get("evals") or []
    workers = _workers(st)
    return JobStatus(
        job=st.get("job") or {},
        server=st.get("server") or {},
        model=st.get("model") or {},
        version=st["version"],
        done=bool(st.get("done")),
        samples=st.get("samples", 0),
        bytes_up=st.get("bytes_up", 0),
        bytes_down=st.get("bytes_down", 0),
        **_progress_fields(st),
        heads_moved=st.get("heads_moved", 0),
        waiting_heads=dict(st.get("waiting_heads") or {}),
        elapsed_s=st.get("elapsed_s", 0.0),
        eta_s=st.get("eta_s"),
        pushes_refused=st.get("pushes_refused", 0),
        **_guard_fields(st.get("guard") or {}),
        eval_error=st.get("eval_error"),
        checkpoint_warning=st.get("checkpoint_warning"),
        snapshot_builds=st.get("snapshot_builds", 0),
        pulls_turned_away=st.get("pulls_turned_away", 0),
        merges_per_minute=round(merges_per_minute, 3),
        samples_per_s=round(samples_per_s, 3),
        workers_active=sum(w.state not in GONE_STATES for w in workers),
        task=str((st.get("job") or {}).get("task") or ""),
        **_newest_scores(history, evals),
        workers=workers,
        free_heads=st.get("free_heads", []),
        **_curves(history, evals),
    )


def status_document(c: Coordinator) -> JobStatus:
    """The status document of the coordinator now: ``job_status(read_status(c))``."""
    return job_status(read_status(c))
