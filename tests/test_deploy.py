"""deploy/: Kubernetes manifests against the Kubernetes schemas, the compose file against the
compose-spec schema, the Dockerfile's shape, and the job configs against lte-server itself.

The schemas ship in PyPI packages (kubernetes-validate; check-jsonschema vendors compose-spec's),
so nothing here reaches the network.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lte.server import cli


def _require(module: str):
    """Skip where a validator is not installed; under CI (which installs them) fail instead."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed", allow_module_level=True)


yaml = _require("yaml")
jsonschema = _require("jsonschema")
kubernetes_validate = _require("kubernetes_validate")
_require("check_jsonschema")  # ships compose-spec's schema

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))


def k8s_documents() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in K8S_FILES for doc in yaml.safe_load_all(p.read_text()) if doc]


def k8s_object(kind: str, name: str) -> dict:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def effective_config(toml_text: str, tmp_path: Path, capsys) -> dict:
    """What ``lte-server --config FILE --print-config`` makes of a job file (it fails on unknown keys)."""
    path = tmp_path / "job.toml"
    path.write_text(toml_text)
    capsys.readouterr()
    # the deployments give the server LTE_TOKEN from a secret; its start-up checks require one off loopback
    with mock.patch.dict(os.environ, {"LTE_TOKEN": "a-deployment-token-0123456789"}):
        code = cli.main(["--config", str(path), "--print-config"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return tomllib.loads(out.out)


# -- Kubernetes ------------------------------------------------------------------------------------
def test_there_are_manifests_for_every_part():
    kinds = sorted(d["kind"] for _, d in k8s_documents())
    assert kinds == sorted(
        [
            "Namespace",
            "ConfigMap",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
            "Job",
            "Service",
            "Job",
        ]
    )


@pytest.mark.parametrize("name_doc", k8s_documents(), ids=lambda nd: f"{nd[0]}:{nd[1]['kind']}")
def test_manifest_is_valid_kubernetes(name_doc):
    _, doc = name_doc
    # strict: unknown fields (a typo such as `contianers`) are errors, not silently dropped
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.30"


def test_the_validator_is_strict_and_knows_the_kinds():
    deployment = copy.deepcopy(k8s_object("Job", "lte-server"))
    deployment["spec"]["template"]["spec"]["contianers"] = deployment["spec"]["template"]["spec"].pop(
        "containers"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Nonsense", "metadata": {}}, K8S_VERSION, strict=True
        )


def test_everything_lives_in_the_lte_namespace():
    for name, doc in k8s_documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "lte", name
    assert k8s_object("Namespace", "lte")


def test_the_configmap_job_is_accepted_by_lte_server_and_matches_the_pods(tmp_path, capsys):
    job_toml = k8s_object("ConfigMap", "lte-job")["data"]["job.toml"]
    config = effective_config(job_toml, tmp_path, capsys)
    assert config["heads"] >= 1 and config["host"] == "0.0.0.0" and config["dashboard_host"] == "0.0.0.0"

    server = k8s_object("Job", "lte-server")
    pod = server["spec"]["template"]["spec"]
    # one server at a time; restarted when it fails (it resumes), never once it has finished
    assert server["spec"]["parallelism"] == server["spec"]["completions"] == 1
    assert pod["restartPolicy"] == "OnFailure" and server["spec"]["podReplacementPolicy"] == "Failed"
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config["port"], "http": config["dashboard_port"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config["out"].startswith(mounts["runs"] + "/")
    assert config["data_dir"].startswith(mounts["data"] + "/")
    assert mounts["job"] + "/job.toml" in container["args"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["job"]["configMap"]["name"] == "lte-job"

    # the Service forwards both named ports; the workers dial it on the config's port
    service = k8s_object("Service", "lte-server")
    assert service["spec"]["selector"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    worker = k8s_object("Job", "lte-workers")["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"][worker["args"].index("--server") + 1] == f"lte-server:{config['port']}"
    assert worker["args"][worker["args"].index("--data-dir") + 1] == config["data_dir"]
    assert config["out"].startswith("/runs/") and "--resume /runs/job" in container["args"][0]


def test_server_probes_use_grpc_health_and_healthz():
    (container,) = k8s_object("Job", "lte-server")["spec"]["template"]["spec"]["containers"]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    assert container["startupProbe"]["grpc"]["port"] == grpc_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.process
def test_server_start_script_is_valid_shell():
    (container,) = k8s_object("Job", "lte-server")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "-c"]
    script = container["args"][0]
    assert "$(" not in script  # Kubernetes would try to expand $(...) as a variable reference
    sh = shutil.which("sh")
    if sh:
        subprocess.run([sh, "-n", "-c", script], check=True, timeout=30)


def test_workers_request_a_gpu_each_and_share_the_token_secret():
    job = k8s_object("Job", "lte-workers")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["lte-worker"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["parallelism"] >= 1
    assert "completions" not in job["spec"]  # work queue: parallelism stays mutable, done when one succeeds
    (server,) = k8s_object("Job", "lte-server")["spec"]["template"]["spec"]["containers"]

    def token_ref(c: dict) -> dict:
        return next(e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "LTE_TOKEN")

    assert token_ref(container) == token_ref(server) == {"name": "lte-token", "key": "token"}


def test_every_claim_a_pod_mounts_is_declared():
    claims = {d["metadata"]["name"] for _, d in k8s_documents() if d["kind"] == "PersistentVolumeClaim"}
    for kind, name in (("Job", "lte-server"), ("Job", "lte-workers")):
        pod = k8s_object(kind, name)["spec"]["template"]["spec"]
        used = {
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert used <= claims, (name, used - claims)


# -- docker compose --------------------------------------------------------------------------------
def compose_schema() -> dict:
    """compose-spec's JSON schema, as vendored by check-jsonschema (a PyPI package)."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_spec_schema(compose):
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = copy.deepcopy(compose)
    broken["services"]["server"]["portz"] = broken["services"]["server"].pop("ports")
    assert list(validator.iter_errors(broken)), "the schema must refuse unknown keys"


def test_compose_runs_a_server_and_replicated_workers_on_a_volume(compose, tmp_path, capsys):
    config = effective_config((DEPLOY / "job.toml").read_text(), tmp_path, capsys)
    services = compose["services"]
    server, worker = services["server"], services["worker"]
    assert "runs" in compose["volumes"]
    assert any(v.startswith("runs:" + str(Path(config["out"]).parent)) for v in server["volumes"])
    assert compose["configs"]["job"]["file"] == "./job.toml" and (DEPLOY / "job.toml").exists()
    published = {str(p).rsplit(":", 1)[-1] for p in server["ports"]}
    assert {str(config["port"]), str(config["dashboard_port"])} <= published
    assert worker["deploy"]["replicas"] >= 1
    assert worker["entrypoint"] == ["lte-worker"]
    assert worker["command"][worker["command"].index("--server") + 1] == f"server:{config['port']}"
    assert worker["depends_on"]["server"]["condition"] == "service_healthy"
    assert f"{config['dashboard_port']}/healthz" in " ".join(server["healthcheck"]["test"])
    assert services["worker-gpu"]["build"]["args"]["BASE"] == "cuda"
    assert (DEPLOY / compose["x-image"]["build"]["context"]).resolve() == REPO


# -- Dockerfile -----------------------------------------------------------------------------------
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and parser directives) and blank lines between instructions
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word, rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((DEPLOY / "Dockerfile").read_text())


def test_dockerfile_parses(dockerfile):
    unknown = [word for word, _ in dockerfile if word not in INSTRUCTIONS]
    assert unknown == []
    assert all(word == word.upper() for word, _ in dockerfile)
    assert dockerfile[0][0] in ("ARG", "FROM")
    for word, rest in dockerfile:
        if word in ("CMD", "ENTRYPOINT"):
            assert rest.startswith("["), f"{word} in shell form would not pass signals on: {rest}"
        if rest.startswith("["):  # exec form must be a JSON array
            assert isinstance(json.loads(rest), list), (word, rest)


def test_dockerfile_base_is_chosen_by_build_arg(dockerfile):
    args = dict(rest.partition("=")[::2] for word, rest in dockerfile if word == "ARG" and "=" in rest)
    assert args["BASE"] == "cpu"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    stages = {}
    for word, rest in dockerfile:
        if word == "FROM":
            parts = rest.split()
            stages[parts[-1] if len(parts) == 3 and parts[1].upper() == "AS" else parts[0]] = parts[0]
    assert stages["base-cpu"].startswith("python:3.11-slim")
    assert stages["base-cuda"].startswith("nvidia/cuda:")
    assert stages["image"] == "base-${BASE}"
    # CPU builds take torch from the CPU-only wheel index, pinned
    cpu_env = [rest for word, rest in dockerfile if word == "ENV" and "TORCH_INDEX_URL" in rest]
    assert any(rest.endswith("/whl/cpu") for rest in cpu_env)
    assert any('"torch==${TORCH_VERSION}"' in rest for word, rest in dockerfile if word == "RUN")


def test_dockerfile_installs_every_package_dir_and_runs_lte_server(dockerfile):
    copied = [shlex.split(rest) for word, rest in dockerfile if word == "COPY"]
    sources = {src for parts in copied for src in parts[:-1] if not src.startswith("--")}
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= sources, f"not copied into the image: {package_dirs - sources}"
    assert {"pyproject.toml", "README.md"} <= sources
    entrypoint = [json.loads(rest) for word, rest in dockerfile if word == "ENTRYPOINT"]
    assert entrypoint == [["lte-server"]]
    cmd = [json.loads(rest) for word, rest in dockerfile if word == "CMD"]
    assert cmd == [["--config", "/etc/lte/job.toml"]]
    assert ["deploy/job.toml", "/etc/lte/job.toml"] in copied
    exposed = {p for word, rest in dockerfile if word == "EXPOSE" for p in rest.split()}
    assert exposed == {"50051", "8080"}


def test_the_image_default_job_is_accepted_by_lte_server(tmp_path, capsys):
    config = effective_config((DEPLOY / "job.toml").read_text(), tmp_path, capsys)
    assert config["host"] == "0.0.0.0" and config["port"] == 50051 and config["dashboard_port"] == 8080


def test_a_config_with_an_unknown_key_is_refused(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text('model = "mlp"\nheadz = 4\n')
    assert cli.main(["--config", str(path), "--print-config"]) == 2
    assert "headz" in capsys.readouterr().err
