"""The dashboard: a read-only FastAPI app over ``Coordinator.status()``, served by uvicorn in a thread.

Routes: ``/`` (a live page, assets from ``static/``), ``/api/status`` (JSON, schema in
``/openapi.json``), ``/metrics`` (Prometheus text) and ``/healthz``. Every handler calls the status
function once and works on the dict it returns; nothing here ever sees a tensor. Handlers are plain
``def`` so FastAPI runs them in its thread pool: the status lock never stalls the event loop.
"""

from __future__ import annotations

import hmac
import math
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, Field

STATIC_DIR = Path(__file__).parent / "static"
RATE_WINDOW_S = 60.0  # merges per minute and samples/s are measured over this much recent time
MAX_CURVE_POINTS = 500  # longer eval curves are thinned evenly, so a poll stays small in long runs
WORKER_STATES = (
    "starting", "registered", "pulling", "waiting", "training", "pushing", "left", "expired", "failed",
)  # fmt: skip
GONE_STATES = ("left", "expired", "failed")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

StatusFn = Callable[[], dict[str, Any]]


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
    state: str = Field(description="one of: " + ", ".join(WORKER_STATES))
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
        description="lte-server's settings (ServerSettings, common/config.py), placeholders resolved, "
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


class Health(BaseModel):
    status: str = "ok"


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


def job_status(st: dict[str, Any]) -> JobStatus:
    """The /api/status document for one status() snapshot."""
    merges_per_minute, samples_per_s = recent_rates(st)
    history, evals = st.get("history") or [], st.get("evals") or []
    accuracies = [e["test_accuracy"] for e in evals if e.get("test_accuracy") is not None]
    samples = [e for e in evals if isinstance(e.get("sample"), str)]
    target = int(st.get("target_head_rounds") or 0)
    applied = int(st.get("head_rounds_applied") or 0)
    done_rounds = int(st.get("head_rounds_done", applied) or 0)
    guard = st.get("guard") or {}
    events = guard.get("events") or []
    last = events[-1] if events else None
    guard_last = f"{last['action']} a push of worker {last['worker_id']}: {last['what']}" if last else None
    return JobStatus(
        job=st.get("job") or {},
        server=st.get("server") or {},
        model=st.get("model") or {},
        version=st["version"],
        done=bool(st.get("done")),
        samples=st.get("samples", 0),
        bytes_up=st.get("bytes_up", 0),
        bytes_down=st.get("bytes_down", 0),
        head_rounds_applied=applied,
        head_rounds_done=done_rounds,
        target_head_rounds=target,
        rounds_planned=int(st.get("rounds_planned") or 0),
        progress=min(1.0, done_rounds / target) if target else 0.0,
        heads_moved=st.get("heads_moved", 0),
        waiting_heads=dict(st.get("waiting_heads") or {}),
        elapsed_s=st.get("elapsed_s", 0.0),
        eta_s=st.get("eta_s"),
        pushes_refused=st.get("pushes_refused", 0),
        guard_mode=guard.get("mode", "refuse"),
        guard_outliers=guard.get("outliers", 0),
        guard_clipped=guard.get("clipped", 0),
        guard_rollbacks=guard.get("rollbacks", 0),
        guard_quarantined=list(guard.get("quarantined", [])),
        guard_last=guard_last,
        checkpoint_warning=st.get("checkpoint_warning"),
        snapshot_builds=st.get("snapshot_builds", 0),
        pulls_turned_away=st.get("pulls_turned_away", 0),
        merges_per_minute=round(merges_per_minute, 3),
        samples_per_s=round(samples_per_s, 3),
        workers_active=sum(w.get("state") not in GONE_STATES for w in st.get("workers", [])),
        train_loss=finite(history[-1].get("train_loss")) if history else None,
        test_loss=finite(evals[-1].get("test_loss")) if evals else None,
        test_accuracy=finite(accuracies[-1]) if accuracies else None,
        task=str((st.get("job") or {}).get("task") or ""),
        perplexity=finite(evals[-1].get("perplexity")) if evals else None,
        bits_per_byte=finite(evals[-1].get("bits_per_byte")) if evals else None,
        text_sample=samples[-1]["sample"] if samples else None,
        text_sample_version=samples[-1]["version"] if samples else None,
        text_sample_prompt=samples[-1].get("sample_prompt") if samples else None,
        workers=[
            WorkerStatus(
                **{
                    **w,
                    "samples_per_s": finite(w.get("samples_per_s")) or 0.0,
                    "train_loss": finite(w.get("train_loss")),
                }
            )
            for w in st.get("workers", [])
        ],
        free_heads=st.get("free_heads", []),
        history=[HistoryPoint(**{**r, "train_loss": finite(r.get("train_loss"))}) for r in history],
        evals=[
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
    )


# -- /metrics --------------------------------------------------------------------------------------
class StatusCollector:
    """Prometheus metrics computed from one status() call per scrape."""

    def __init__(self, status: StatusFn) -> None:
        self.status = status

    def describe(self) -> list[Metric]:
        return []  # names are not known before a scrape; registering must not call status()

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        doc = job_status(st)
        nan = float("nan")

        def gauge(name: str, doc_: str, value: float | None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc_, value=nan if value is None else value)

        yield gauge("lte_version", "Merges applied to the master weights.", doc.version)
        yield gauge("lte_done", "1 once the job has trained its last round.", float(doc.done))
        yield gauge("lte_progress_ratio", "Per-head rounds done over rounds planned.", doc.progress)
        yield gauge("lte_elapsed_seconds", "Seconds since the server started.", doc.elapsed_s)
        yield CounterMetricFamily("lte_samples", "Samples trained in the whole job.", value=doc.samples)
        yield CounterMetricFamily("lte_bytes_up", "Bytes received from workers.", value=doc.bytes_up)
        yield CounterMetricFamily("lte_bytes_down", "Bytes sent to workers.", value=doc.bytes_down)
        yield CounterMetricFamily(
            "lte_pushes_refused", "Async pushes refused as staler than the bound.", value=doc.pushes_refused
        )
        yield CounterMetricFamily(
            "lte_guard_outliers", "Pushes the update guard found out of bounds.", value=doc.guard_outliers
        )
        yield CounterMetricFamily(
            "lte_guard_clipped", "Outlier pushes merged clipped to the bound.", value=doc.guard_clipped
        )
        yield CounterMetricFamily(
            "lte_guard_rollbacks",
            "Merges rolled back: the master left its bounds.",
            value=doc.guard_rollbacks,
        )
        yield gauge(
            "lte_guard_quarantined", "Workers quarantined by the update guard.", len(doc.guard_quarantined)
        )
        yield CounterMetricFamily(
            "lte_snapshot_builds", "Snapshots quantised and compressed for pulls.", value=doc.snapshot_builds
        )
        yield CounterMetricFamily(
            "lte_pulls_turned_away",
            "Long-polls answered at once: no thread free.",
            value=doc.pulls_turned_away,
        )
        yield gauge(
            "lte_merges_per_minute", "Merges per minute over the recent window.", doc.merges_per_minute
        )
        yield gauge("lte_samples_per_second", "Samples per second over the recent window.", doc.samples_per_s)
        yield gauge("lte_train_loss", "Training loss of the newest merge.", doc.train_loss)
        yield gauge("lte_test_loss", "Test loss of the newest evaluation.", doc.test_loss)
        yield gauge("lte_test_accuracy", "Test accuracy of the newest evaluation.", doc.test_accuracy)
        yield gauge("lte_perplexity", "Language models: perplexity of the newest evaluation.", doc.perplexity)
        yield gauge(
            "lte_bits_per_byte", "Language models: bits per byte of the newest evaluation.", doc.bits_per_byte
        )
        yield gauge("lte_free_heads", "Heads no worker holds.", len(doc.free_heads))

        states = Counter(w.state for w in doc.workers)
        workers = GaugeMetricFamily("lte_workers", "Workers by lease state.", labels=["state"])
        for state in sorted(set(WORKER_STATES) | set(states)):
            workers.add_metric([state], states.get(state, 0))
        yield workers

        labels = ["worker_id", "name", "device"]
        per_worker: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "heads": GaugeMetricFamily("lte_worker_heads", "Heads leased to the worker.", labels=labels),
            "last_seen": GaugeMetricFamily(
                "lte_worker_last_seen_seconds", "Seconds since the worker's last RPC.", labels=labels
            ),
            "staleness": GaugeMetricFamily(
                "lte_worker_staleness",
                "Versions the server is ahead of the worker's snapshot.",
                labels=labels,
            ),
            "rate": GaugeMetricFamily(
                "lte_worker_samples_per_second", "Throughput the worker reported.", labels=labels
            ),
            "loss": GaugeMetricFamily(
                "lte_worker_train_loss", "Loss of the worker's last push.", labels=labels
            ),
            "up": GaugeMetricFamily("lte_worker_up", "1 while the worker holds a live lease.", labels=labels),
            "samples": CounterMetricFamily("lte_worker_samples", "Samples in applied pushes.", labels=labels),
            "pushes": CounterMetricFamily("lte_worker_pushes", "Pushes applied.", labels=labels),
            "bytes_up": CounterMetricFamily("lte_worker_bytes_up", "Bytes the worker sent.", labels=labels),
            "bytes_down": CounterMetricFamily(
                "lte_worker_bytes_down", "Bytes the worker received.", labels=labels
            ),
        }
        for w in doc.workers:
            key = [w.worker_id, w.name, w.device]
            values = {
                "heads": len(w.heads),
                "last_seen": w.last_seen_s,
                "staleness": nan if w.staleness is None else w.staleness,
                "rate": w.samples_per_s,
                "loss": nan if w.train_loss is None else w.train_loss,
                "up": float(w.state not in GONE_STATES),
                "samples": w.samples,
                "pushes": w.pushes,
                "bytes_up": w.bytes_up,
                "bytes_down": w.bytes_down,
            }
            for name, family in per_worker.items():
                family.add_metric(key, values[name])
        yield from per_worker.values()


# -- the app ---------------------------------------------------------------------------------------
def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query_params.get("token")


def create_app(status: StatusFn, *, token: str | None = None) -> FastAPI:
    """The dashboard app over ``status`` (``Coordinator.status``); with ``token``, every route but
    /healthz wants ``Authorization: Bearer <token>`` or ``?token=<token>``."""
    app = FastAPI(
        title="LTE parameter server dashboard",
        description="Read-only view of an LTE training job: status, Prometheus metrics and a live page.",
        version="1",
        docs_url=None,  # Swagger UI and ReDoc load their assets from a CDN: /openapi.json is the doc
        redoc_url=None,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    assets = {
        name: (STATIC_DIR / name).read_text(encoding="utf-8")
        for name in ("index.html", "dashboard.js", "dashboard.css")
    }
    expected = token.encode() if token else None

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if expected is not None and request.url.path != "/healthz":
            given = _bearer(request)
            if given is None or not hmac.compare_digest(given.encode(), expected):
                return JSONResponse(
                    {"detail": "a valid token is required: Authorization: Bearer <token> or ?token=<token>"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        given = _bearer(request) if expected is not None else None
        query = f"?token={quote(given, safe='')}" if given else ""
        html = assets["index.html"].replace("__ASSET_QUERY__", query)
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"})

    @app.get("/static/dashboard.js", include_in_schema=False)
    def script() -> Response:
        return Response(assets["dashboard.js"], media_type="text/javascript; charset=utf-8")

    @app.get("/static/dashboard.css", include_in_schema=False)
    def stylesheet() -> Response:
        return Response(assets["dashboard.css"], media_type="text/css; charset=utf-8")

    @app.get("/api/status", response_model=JobStatus, summary="The job's status, workers and curves")
    def api_status() -> JobStatus:
        return job_status(status())

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_model=Health, summary="Liveness: always ok while the server runs")
    def healthz() -> Health:
        return Health()

    return app


class _Server(uvicorn.Server):
    """uvicorn.Server that tells a waiting thread when it is listening."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


class DashboardServer:
    """Serves ``create_app(status)`` with uvicorn in a daemon thread on ``host:port`` (0: any free port)."""

    def __init__(
        self, status: StatusFn, host: str = "127.0.0.1", port: int = 0, token: str | None = None
    ) -> None:
        self.app = create_app(status, token=token)
        self.host, self.requested_port, self.token = host, port, token
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """Where a browser on this machine finds the page (a wildcard address means loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> DashboardServer:
        # bind here, so a port in use is an OSError in the caller and not a sys.exit in the thread
        family, kind, proto, _, address = socket.getaddrinfo(
            self.host, self.requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise OSError(f"dashboard cannot listen on {self.host}:{self.requested_port}: {exc}") from None
        sock.set_inheritable(False)
        config = uvicorn.Config(
            self.app,
            log_config=None,  # leave the process's logging configuration alone
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = server = _Server(config)
        self._thread = threading.Thread(
            target=self._run, args=(server, sock), name="lte-dashboard", daemon=True
        )
        self._thread.start()
        if not server.ready.wait(timeout) or not server.started:
            self.stop()
            raise OSError(f"dashboard did not start on {self.host}:{self.requested_port}: {self._error!r}")
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def _run(self, server: _Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - uvicorn exits with SystemExit on a failed start
            self._error = exc
        finally:
            server.ready.set()
            sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
