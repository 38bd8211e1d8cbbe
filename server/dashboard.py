"""The dashboard: a read-only FastAPI app over the job's status document, served by uvicorn in a thread.

Routes: ``/`` (a live page, assets from ``static/``), ``/api/status`` (JSON, schema in
``/openapi.json``), ``/metrics`` (Prometheus text) and ``/healthz``. Every handler calls the status
function once (a ``read_status`` snapshot, ``Coordinator.status()``) and works on the document
``server/status.py`` builds from it (``job_status``); nothing here ever sees a tensor. Handlers are
plain ``def`` so FastAPI runs them in its thread pool: the status lock never stalls the event loop.
"""

from __future__ import annotations

import hmac
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
from pydantic import BaseModel

from lte.common.wire.failure import GONE_STATES, SHOWN_STATES
from lte.server.status import JobStatus, job_status

STATIC_DIR = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

StatusFn = Callable[[], dict[str, Any]]


class Health(BaseModel):
    status: str = "ok"


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

        yield gauge(
            "lte_model_version", "The model version: merges applied to the master weights.", doc.version
        )
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
        for state in sorted({s.value for s in SHOWN_STATES} | set(states)):
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
