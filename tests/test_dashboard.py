"""The dashboard app without a browser: routes, schema, metrics, auth, and the uvicorn thread."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from lte.server.dashboard import STATIC_DIR, DashboardServer, create_app
from lte.server.status import (
    MAX_CURVE_POINTS,
    EvalPoint,
    HistoryPoint,
    JobStatus,
    WorkerStatus,
    recent_rates,
    thin,
)

NAN = float("nan")


def fake_status(**overrides) -> dict:
    """A status() dict shaped like Coordinator.status() during a run: two workers, one gone."""
    history = [
        {
            "version": v,
            "time": 2.0 * v,
            "samples": 320 * v,
            "train_loss": 2.3 / v,
            "pushes": 2,
            "heads": 4,
            "bytes_up": 50_000 * v,
            "bytes_down": 200_000 * v,
        }
        for v in range(1, 11)
    ]
    evals = [
        {
            "version": v,
            "samples": 320 * v,
            "time": 2.0 * v + 0.1,
            "test_loss": 1.0 / v,
            "test_accuracy": 0.6 + 0.03 * v,
        }
        for v in (2, 4, 6, 8, 10)
    ]
    workers = [
        {
            "worker_id": "w1-0a1b2c",
            "name": "gpu-box:123",
            "device": "cuda:0",
            "heads": [0, 1],
            "last_seen_s": 0.4,
            "staleness": 0,
            "samples_per_s": 410.5,
            "samples": 1600,
            "pushes": 10,
            "bytes_up": 250_000,
            "bytes_down": 1_000_000,
            "state": "training",
            "train_loss": 0.25,
        },
        {
            "worker_id": "w2-3d4e5f",
            "name": "laptop",
            "device": "cpu",
            "heads": [2, 3],
            "last_seen_s": 31.2,
            "staleness": None,
            "samples_per_s": 0.0,
            "samples": 0,
            "pushes": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "state": "expired",
            "train_loss": NAN,  # no push yet: the coordinator keeps NaN
        },
    ]
    status = {
        "job": {
            "model": "mlp",
            "dataset": "digits",
            "heads": 4,
            "rank": 16,
            "alpha": 64.0,
            "reset": False,
            "mode": "sync",
        },
        "version": 10,
        "done": False,
        "samples": 3300,
        "bytes_up": 500_000,
        "bytes_down": 2_000_000,
        "pushes_refused": 2,
        "snapshot_builds": 9,
        "pulls_turned_away": 5,
        "head_rounds_applied": 40,
        "target_head_rounds": 160,
        "elapsed_s": 21.0,
        "workers": workers,
        "free_heads": [2, 3],
        "history": history,
        "evals": evals,
    }
    status.update(overrides)
    return status


class CountingStatus:
    """A status function that counts its calls."""

    def __init__(self, status: dict | None = None) -> None:
        self.status, self.calls = status or fake_status(), 0

    def __call__(self) -> dict:
        self.calls += 1
        return self.status


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(fake_status))


# -- /api/status -----------------------------------------------------------------------------------
def test_api_status_follows_the_documented_schema(client):
    response = client.get("/api/status")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    doc = JobStatus.model_validate(body)  # the declared model reads back what was served
    assert doc.version == 10 and doc.samples == 3300 and doc.done is False
    assert doc.job["model"] == "mlp" and doc.job["heads"] == 4
    assert [w.worker_id for w in doc.workers] == ["w1-0a1b2c", "w2-3d4e5f"]
    assert body["workers"][1]["train_loss"] is None  # NaN is not JSON: it becomes null
    assert body["workers"][1]["staleness"] is None
    assert len(doc.history) == 10 and len(doc.evals) == 5
    assert doc.workers_active == 1
    assert doc.train_loss == pytest.approx(0.23)
    assert doc.test_accuracy == pytest.approx(0.9)
    assert doc.test_loss == pytest.approx(0.1)
    assert doc.progress == pytest.approx(0.25)
    # 10 merges and 3300 samples in the 21 s the job has run (all inside the 60 s window)
    assert doc.merges_per_minute == pytest.approx(10 / 21 * 60, rel=1e-3)
    assert doc.samples_per_s == pytest.approx(3300 / 21, rel=1e-3)
    assert set(body) == set(JobStatus.model_fields)


def test_api_status_carries_the_server_settings_with_the_token_masked():
    from lte.common.job.config import ServerSettings

    shown = ServerSettings(token="a-secret-of-sufficient-length", lease_timeout=12.0).public()
    body = TestClient(create_app(lambda: fake_status(server=shown))).get("/api/status").json()
    assert body["server"]["lease_timeout"] == 12.0 and body["server"]["port"] == 50051
    assert body["server"]["token"] == "<set>" and "a-secret" not in str(body)


def test_api_status_calls_status_once_per_request():
    status = CountingStatus()
    client = TestClient(create_app(status))
    assert status.calls == 0  # building the app (and its metrics registry) reads nothing
    client.get("/api/status")
    assert status.calls == 1
    client.get("/metrics")
    assert status.calls == 2
    client.get("/healthz")
    client.get("/")
    assert status.calls == 2


def test_api_status_of_a_job_that_has_not_started():
    empty = fake_status(
        version=0, samples=0, workers=[], history=[], evals=[], head_rounds_applied=0, elapsed_s=0.5
    )
    body = TestClient(create_app(lambda: empty)).get("/api/status").json()
    assert body["merges_per_minute"] == 0.0 and body["samples_per_s"] == 0.0
    assert body["train_loss"] is None and body["test_accuracy"] is None
    assert body["workers"] == [] and body["workers_active"] == 0


def test_openapi_documents_the_status_schema_and_no_cdn_docs(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for model in (JobStatus, WorkerStatus, HistoryPoint, EvalPoint):
        assert model.__name__ in schemas
    ok = spec["paths"]["/api/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/JobStatus"}
    assert "merges_per_minute" in schemas["JobStatus"]["properties"]
    assert {"/api/status", "/metrics", "/healthz"} <= set(spec["paths"])
    # Swagger UI and ReDoc would pull their scripts from a CDN
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404


def test_recent_rates_use_the_last_minute_and_the_whole_run_once_done():
    history = [{"version": v, "time": 10.0 * v, "samples": 100 * v} for v in range(1, 21)]  # 200 s of merges
    # the window [140, 200]: the last record before it is version 13 (t=130)
    per_min, per_s = recent_rates({"history": history, "elapsed_s": 200.0, "samples": 2000}, window_s=60.0)
    assert per_min == pytest.approx((20 - 13) / 60 * 60)
    assert per_s == pytest.approx((2000 - 1300) / 60)
    # a stalled job: nothing merged for a long while, the rate falls
    per_min, _ = recent_rates({"history": history, "elapsed_s": 1000.0, "samples": 2000}, window_s=60.0)
    assert per_min == 0.0
    # done: averages over the whole run, up to the last merge
    per_min, per_s = recent_rates({"history": history, "elapsed_s": 1000.0, "samples": 2000, "done": True})
    assert per_min == pytest.approx(20 / 200 * 60)
    assert per_s == pytest.approx(2000 / 200)
    # a history truncated to its newest records inside the window: measured from its oldest one
    tail = history[-3:]  # versions 18..20, t=180..200
    per_min, _ = recent_rates({"history": tail, "elapsed_s": 200.0, "samples": 2000}, window_s=60.0)
    assert per_min == pytest.approx(2 / 20 * 60)
    assert recent_rates({"history": [], "elapsed_s": 5.0, "samples": 0}) == (0.0, 0.0)


def test_long_eval_curves_are_thinned_evenly():
    evals = [
        {"version": v, "samples": 10 * v, "time": float(v), "test_loss": 1.0, "test_accuracy": 0.5}
        for v in range(1, 5001)
    ]
    body = TestClient(create_app(lambda: fake_status(evals=evals))).get("/api/status").json()
    versions = [e["version"] for e in body["evals"]]
    assert len(versions) == MAX_CURVE_POINTS
    assert versions[0] == 1 and versions[-1] == 5000 and versions == sorted(set(versions))
    assert thin(list(range(10)), 4) == [0, 3, 6, 9]


# -- /metrics ----------------------------------------------------------------------------------------
def _metrics(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_as_prometheus_text(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = _metrics(response.text)
    value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1}
    assert value["lte_model_version"] == 10
    assert families["lte_samples"].type == "counter"
    assert families["lte_samples"].samples[0].name == "lte_samples_total"
    assert value["lte_samples"] == 3300
    assert value["lte_bytes_up"] == 500_000 and value["lte_bytes_down"] == 2_000_000
    assert (value["lte_pushes_refused"], value["lte_snapshot_builds"], value["lte_pulls_turned_away"]) == (
        2,
        9,
        5,
    )
    assert families["lte_snapshot_builds"].samples[0].name == "lte_snapshot_builds_total"
    assert value["lte_train_loss"] == pytest.approx(0.23)
    assert value["lte_test_accuracy"] == pytest.approx(0.9)
    states = {s.labels["state"]: s.value for s in families["lte_workers"].samples}
    assert states["training"] == 1 and states["expired"] == 1 and states["pushing"] == 0
    by_worker = {s.labels["worker_id"]: s for s in families["lte_worker_samples_per_second"].samples}
    assert by_worker["w1-0a1b2c"].value == pytest.approx(410.5)
    assert by_worker["w1-0a1b2c"].labels["device"] == "cuda:0"
    up = {s.labels["worker_id"]: s.value for s in families["lte_worker_up"].samples}
    assert up == {"w1-0a1b2c": 1.0, "w2-3d4e5f": 0.0}
    pushes = {s.labels["worker_id"]: s.value for s in families["lte_worker_pushes"].samples}
    assert pushes == {"w1-0a1b2c": 10, "w2-3d4e5f": 0}


def test_metrics_use_their_own_registry():
    TestClient(create_app(fake_status)).get("/metrics")
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("lte_")]
    # two apps in one process register nothing globally, so they cannot collide
    a, b = TestClient(create_app(fake_status)), TestClient(create_app(lambda: fake_status(version=3)))
    assert _metrics(a.get("/metrics").text)["lte_model_version"].samples[0].value == 10
    assert _metrics(b.get("/metrics").text)["lte_model_version"].samples[0].value == 3


# -- page, health, read-only -------------------------------------------------------------------------
def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_page_and_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert 'src="static/dashboard.js"' in html and 'href="static/dashboard.css"' in html
    for chart in ("loss-version", "loss-samples", "accuracy-version", "accuracy-samples", "bytes-time"):
        assert f'id="chart-{chart}" data-points="0"' in html
    assert '<table id="workers">' in html and "<tbody></tbody>" in html
    js = client.get("/static/dashboard.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.text == (STATIC_DIR / "dashboard.js").read_text()
    css = client.get("/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_assets_name_no_external_host():
    """Every asset ships in the package: no CDN, no web font, no remote script."""
    url = re.compile(r"(?:https?:)?//([A-Za-z0-9.\-\[\]:]+)")
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        hosts = {h for h in url.findall(text) if "." in h or ":" in h}  # skips // comments in JS and CSS
        assert not {h for h in hosts if not h.startswith(("127.0.0.1", "localhost", "[::1]"))}, (path, hosts)
        assert "@import" not in text and "url(http" not in text, path


def test_the_app_is_read_only(client):
    methods = {m for route in client.app.routes for m in getattr(route, "methods", ())}
    assert methods <= {"GET", "HEAD"}
    for path in ("/api/status", "/metrics", "/healthz", "/"):
        assert client.post(path).status_code == 405
        assert client.delete(path).status_code == 405


# -- token ---------------------------------------------------------------------------------------
TOKEN = "tok-9f8e7d"
PROTECTED = ["/", "/api/status", "/metrics", "/openapi.json", "/static/dashboard.js", "/static/dashboard.css"]


@pytest.mark.parametrize("path", PROTECTED)
def test_token_is_required_on_every_route_but_healthz(path):
    client = TestClient(create_app(fake_status, token=TOKEN))
    assert client.get(path).status_code == 401
    assert client.get(path).headers["www-authenticate"] == "Bearer"
    assert client.get(path, params={"token": "wrong"}).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get(path, params={"token": TOKEN}).status_code == 200


def test_healthz_needs_no_token_and_the_page_passes_its_token_on():
    client = TestClient(create_app(fake_status, token=TOKEN))
    assert client.get("/healthz").status_code == 200
    html = client.get("/", params={"token": TOKEN}).text
    assert f'src="static/dashboard.js?token={TOKEN}"' in html
    assert f'href="static/dashboard.css?token={TOKEN}"' in html
    assert "__ASSET_QUERY__" not in html
    # the script sends the token it was opened with as a bearer header on its fetches
    js = (STATIC_DIR / "dashboard.js").read_text()
    assert 'get("token")' in js and '"Bearer " + token' in js


def test_a_token_with_odd_characters_is_quoted_into_the_page():
    odd = 'a"b<c>&d e'
    client = TestClient(create_app(fake_status, token=odd))
    html = client.get("/", headers={"Authorization": f"Bearer {odd}"}).text
    assert odd not in html and "a%22b%3Cc%3E%26d%20e" in html


# -- with the real coordinator -------------------------------------------------------------------
def test_the_real_coordinator_status_fits_the_schema():
    from lte.common.data.datasets import load_dataset
    from lte.common.job.config import JobConfig
    from lte.server.coordinator import Coordinator

    dataset = load_dataset("digits", seed=0)
    job = JobConfig(model="mlp", dataset="digits", heads=4, steps=20).with_dataset(dataset)
    coordinator = Coordinator(job, dataset)
    try:
        coordinator.register({"name": "t0", "device": "cpu", "max_heads": 2})
        client = TestClient(create_app(coordinator.status))
        doc = JobStatus.model_validate(client.get("/api/status").json())
        assert doc.version == 0 and len(doc.workers) == 1 and doc.workers[0].name == "t0"
        assert doc.workers[0].train_loss is None and doc.job["heads"] == 4
        assert len(doc.free_heads) == 2
        assert _metrics(client.get("/metrics").text)["lte_workers"].samples
    finally:
        coordinator.close()


def test_the_real_coordinator_status_after_merges_and_an_evaluation_fits_the_schema():
    """Not a hand-written status and not version 0: merges, a worker's progress, an evaluation."""
    import torch

    from lte.common.data.datasets import load_dataset
    from lte.common.job.config import JobConfig
    from lte.server.coordinator import Coordinator, PushMeta

    dataset = load_dataset("digits", seed=0)
    job = JobConfig(model="mlp", dataset="digits", heads=2, steps=30).with_dataset(dataset)
    coordinator = Coordinator(job, dataset)
    try:
        lease, _ = coordinator.register({"name": "t0", "device": "cpu", "max_heads": 2})
        coordinator.heartbeat(lease.lease_id, version=0, samples_per_s=1234.5, state="training")
        tensors = {n: 1e-3 * torch.randn(s) for n, s in coordinator.expected_tensors([0, 1]).items()}
        for r in range(3):
            header = PushMeta(lease.lease_id, coordinator.version, {0: r, 1: r}, 10, 320, 2.0 - r, 0.5)
            assert coordinator.apply_push(header, tensors)["applied"]
        coordinator.evaluate_now()
        client = TestClient(create_app(coordinator.status))
        body = client.get("/api/status").json()
        doc = JobStatus.model_validate(body)
        assert set(body) == set(JobStatus.model_fields)
        assert doc.version == 3 and doc.done and doc.progress == 1.0
        assert [h.version for h in doc.history] == [1, 2, 3] and doc.train_loss == pytest.approx(0.0)
        assert len(doc.evals) == 1 and doc.test_accuracy is not None
        assert doc.samples == 3 * 320 and doc.bytes_up == 0  # in-process pushes carry no wire bytes
        assert doc.job["warmup_steps"] == 1 and "patch_size" not in doc.job  # effective, not placeholders
        assert doc.checkpoint_warning is None
        assert doc.workers[0].samples_per_s > 0 and doc.workers[0].state == "training"
    finally:
        coordinator.close()


@pytest.mark.process
def test_importing_the_dashboard_loads_no_torch():
    code = "import sys, lte.server.dashboard; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"


# -- the uvicorn thread --------------------------------------------------------------------------
@pytest.mark.server
def test_dashboard_server_binds_port_zero_and_stops():
    with DashboardServer(fake_status, host="127.0.0.1", port=0) as dashboard:
        assert dashboard.port > 0
        assert dashboard.url == f"http://127.0.0.1:{dashboard.port}/"
        response = httpx.get(dashboard.url + "healthz", timeout=10)
        assert response.json() == {"status": "ok"}
        assert httpx.get(dashboard.url + "api/status", timeout=10).json()["version"] == 10
        thread = dashboard._thread
    assert not thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{dashboard.port}/healthz", timeout=2)


def test_dashboard_url_on_a_wildcard_address_points_at_loopback():
    # not started: tests listen on 127.0.0.1 only
    for host, url in (
        ("0.0.0.0", "http://127.0.0.1:8080/"),
        ("::", "http://[::1]:8080/"),
        ("10.1.2.3", "http://10.1.2.3:8080/"),
    ):
        dashboard = DashboardServer(fake_status, host=host, port=8080)
        dashboard.port = 8080
        assert dashboard.url == url


def test_dashboard_server_reports_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="dashboard cannot listen"):
            DashboardServer(fake_status, port=taken.getsockname()[1]).start()


@pytest.mark.server
def test_a_slow_status_does_not_block_other_requests():
    """Handlers run in a thread pool: a status() waiting on the coordinator's lock stalls only its caller."""
    release, entered = threading.Event(), threading.Event()

    def slow_status() -> dict:
        entered.set()
        assert release.wait(30)
        return fake_status()

    with DashboardServer(slow_status) as dashboard:
        results: dict = {}
        reader = threading.Thread(
            target=lambda: results.update(r=httpx.get(dashboard.url + "api/status", timeout=30)), daemon=True
        )
        reader.start()
        try:
            assert entered.wait(30)
            assert httpx.get(dashboard.url + "healthz", timeout=10).status_code == 200
            assert httpx.get(dashboard.url, timeout=10).status_code == 200
        finally:
            release.set()
            reader.join(30)
        assert results["r"].status_code == 200


def test_the_update_guard_shows_in_api_status_and_metrics():
    guard = {
        "mode": "refuse",
        "outliers": 3,
        "clipped": 0,
        "rollbacks": 1,
        "quarantined": ["w3-abc"],
        "events": [
            {"worker_id": "w3-abc", "action": "refused", "what": "head 4 layer fc.weight: 650 > bound 18"}
        ],
    }
    client = TestClient(create_app(lambda: fake_status(guard=guard)))
    doc = client.get("/api/status").json()
    assert (doc["guard_outliers"], doc["guard_rollbacks"], doc["guard_quarantined"]) == (3, 1, ["w3-abc"])
    assert doc["guard_last"] == "refused a push of worker w3-abc: head 4 layer fc.weight: 650 > bound 18"
    families = _metrics(client.get("/metrics").text)
    value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1}
    assert (value["lte_guard_outliers"], value["lte_guard_rollbacks"], value["lte_guard_quarantined"]) == (
        3,
        1,
        1,
    )
    assert families["lte_guard_outliers"].samples[0].name == "lte_guard_outliers_total"
