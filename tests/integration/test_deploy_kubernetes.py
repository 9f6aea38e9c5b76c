"""deploy/kubernetes/ and the Dockerfile: schema validation, lint, and numbers that must agree.

- `kubernetes-validate --strict` (its schemas ship inside the package: no network) passes for
  deploy/kubernetes/*.yaml against the oldest and the newest Kubernetes release we claim, and
  fails on a misspelt field, so --strict really rejects unknown properties;
- the InferencePool (a CRD the validator has no schema for) gets a structural check of the
  fields its v1 API requires, and its endpoint picker's metric flags name metrics that
  /metrics really exports;
- the Deployment's flags parse with the real `serve` parser, and agree with the rest:
  terminationGracePeriodSeconds > drain delay + shutdown grace, CPU request == --workers,
  the probes' paths answer as the probes expect (200 when ready; during the drain delay
  readiness 503 and liveness 200), ports, labels, /dev/shm size, the numba cache mount;
- `hadolint Dockerfile` passes, and the Dockerfile's user and port are the manifests'.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from http_fixtures import (
    FakeEngine,
    KVUsageEngine,
    get,
    raw_request,
    running_server,
    split_response,
)
from tinyllm_trio.cli import build_parser
from tinyllm_trio.config import ServerConfig
from tinyllm_trio.ipc.pool import (
    REQUEST_SLOT_SIZE,
    REQUEST_SLOTS,
    RESPONSE_SLOT_SIZE,
    RESPONSE_SLOTS,
)

ROOT = Path(__file__).parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBE.glob("*.yaml"))
# The oldest Kubernetes release the manifests use nothing newer than (PDB
# unhealthyPodEvictionPolicy is GA in 1.31), and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")


def _tool(name: str) -> str:
    """A console script of this environment (pip installed it), else one on PATH."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is needed: pip install -e '.[test]'"
    return found


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((KUBE / name).read_text())


def _container() -> dict[str, Any]:
    (container,) = _load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    return container


def _serve_config() -> ServerConfig:
    """The container's command line through the real `tinyllm-trio` parser (an unknown or
    misspelt flag fails here, as it would fail the pod)."""
    container = _container()
    assert container["command"] == ["tinyllm-trio"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    return ServerConfig.from_args(args, env={})


def _quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units[unit]


# ---- schema and lint ------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_strictly_against_the_kubernetes_schema(version: str) -> None:
    assert {p.name for p in MANIFESTS} == {
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "hpa.yaml",
    }
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "-k", version, *map(str, MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(MANIFESTS), result.stdout


def test_strict_validation_rejects_a_misspelt_field(tmp_path: Path) -> None:
    text = (KUBE / "deployment.yaml").read_text()
    bad = tmp_path / "deployment.yaml"
    bad.write_text(text.replace("readinessProbe:", "readynessProbe:", 1))
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSIONS[-1], str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "readynessProbe" in result.stdout + result.stderr


def test_dockerfile_passes_hadolint_and_matches_the_manifests() -> None:
    dockerfile = ROOT / "Dockerfile"
    result = subprocess.run(
        [_tool("hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert 'CMD ["tinyllm-trio", "serve", "--host", "0.0.0.0"]' in text  # exec form: PID 1
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert user, "the image runs as a numeric non-root user"
    pod = _load("deployment.yaml")["spec"]["template"]["spec"]["securityContext"]
    assert (int(user[1]), int(user[2])) == (pod["runAsUser"], pod["runAsGroup"])
    assert pod["runAsUser"] != 0 and pod["runAsNonRoot"] is True
    env = dict(re.findall(r"(NUMBA_CACHE_DIR)=(\S+)", text))
    assert env["NUMBA_CACHE_DIR"] == _env(_container())["NUMBA_CACHE_DIR"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


# ---- the numbers agree ----------------------------------------------------------------------


def test_termination_period_outlasts_drain_delay_and_grace() -> None:
    config = _serve_config()
    spec = _load("deployment.yaml")["spec"]["template"]["spec"]
    pre_stop = _container().get("lifecycle", {}).get("preStop", {})
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)  # a preStop sleep counts too
    assert config.drain_delay > 0  # readiness turns false before the listener closes
    need = sleep + config.drain_delay + config.shutdown_grace
    assert spec["terminationGracePeriodSeconds"] > need
    # the readiness probe notices the 503 within the drain delay
    readiness = _container()["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < config.drain_delay


def test_cpu_request_matches_workers_and_pinning_is_off() -> None:
    config = _serve_config()
    resources = _container()["resources"]
    assert config.workers is not None
    assert _quantity(resources["requests"]["cpu"]) == config.workers
    assert not config.pin_workers  # no exclusive cpuset: pods would pin to the same cores
    assert "cpu" not in resources.get("limits", {})  # no CFS throttling mid-stream


def test_ports_labels_and_volumes_agree() -> None:
    config = _serve_config()
    container = _container()
    (port,) = container["ports"]
    assert port["containerPort"] == config.port == 8080 and config.host == "0.0.0.0"
    deployment = _load("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _load("service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert _load("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # /dev/shm: a memory-backed emptyDir with room for every worker's rings, twice over
    # (a replacement worker's rings exist before the dead one's are gone)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    ring_bytes = REQUEST_SLOTS * REQUEST_SLOT_SIZE + RESPONSE_SLOTS * RESPONSE_SLOT_SIZE
    assert _quantity(shm["sizeLimit"]) >= 2 * config.workers * ring_bytes
    # read-only root: numba's cache is a mounted emptyDir
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "emptyDir" in volumes[mounts[_env(container)["NUMBA_CACHE_DIR"]]]


async def test_probe_paths_answer_as_the_probes_expect() -> None:
    """Against the real HTTP server with the manifest's flags: the probes' paths are 200 when
    ready; during the drain delay readiness gets 503 while liveness still gets 200."""
    container = _container()
    startup, readiness, liveness = (
        container[probe]["httpGet"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    assert startup["port"] == readiness["port"] == liveness["port"] == "http"
    config = replace(_serve_config(), host="127.0.0.1", port=0, access_log=False)
    async with running_server(FakeEngine(), **vars(config)) as (server, port):

        async def status(path: str) -> int:
            return split_response(await raw_request(port, get(path)))[0]

        for probe in (startup, readiness, liveness):
            assert await status(probe["path"]) == 200, probe
        server.shutdown()  # what SIGTERM does: the drain delay starts
        assert await status(readiness["path"]) == 503
        assert await status(liveness["path"]) == 200
        assert not server.app.draining  # still serving: the delay is 10 s


# ---- what the routers read ------------------------------------------------------------------


async def _exported_metrics(config: ServerConfig) -> set[str]:
    config = replace(config, host="127.0.0.1", port=0, access_log=False)
    engine = KVUsageEngine()  # a fake engine with KV-cache stats
    async with running_server(engine, **vars(config)) as (_, port):
        status, _, body = split_response(await raw_request(port, get("/metrics")))
    assert status == 200
    return {
        line.split("{")[0].split(" ")[0]
        for line in body.decode().splitlines()
        if line and not line.startswith("#")
    }


async def test_hpa_and_the_endpoint_picker_read_metrics_the_server_exports() -> None:
    config = _serve_config()
    exported = await _exported_metrics(config)
    hpa = _load("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": _load("deployment.yaml")["metadata"]["name"],
    }
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name in exported
    assert f"seriesQuery: '{name}{{" in (KUBE / "hpa.yaml").read_text()  # the adapter rule
    assert hpa["minReplicas"] > _load("pdb.yaml")["spec"]["maxUnavailable"]
    flags = yaml.safe_load((KUBE / "gateway-api" / "epp-values.yaml").read_text())[
        "inferenceExtension"
    ]["flags"]
    for flag in (
        "total-queued-requests-metric",
        "total-running-requests-metric",
        "kv-cache-usage-percentage-metric",
    ):
        assert flags[flag] in exported, flag
    # the Deployment also exports vLLM's names, the picker's defaults
    assert config.metrics_compat == "vllm"
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= exported


def test_inferencepool_has_the_v1_shape_and_selects_the_deployment() -> None:
    """kubernetes-validate has no schema for a CRD: check the v1 API's required fields."""
    pool = yaml.safe_load((KUBE / "gateway-api" / "inferencepool.yaml").read_text())
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["kind"] == "InferencePool"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", pool["metadata"]["name"])
    spec = pool["spec"]
    assert set(spec) <= {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}
    labels = _load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert set(spec["selector"]) == {"matchLabels"}
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (target,) = spec["targetPorts"]
    assert target == {"number": _container()["ports"][0]["containerPort"]}
    picker = spec["endpointPickerRef"]
    assert set(picker) <= {"group", "kind", "name", "port", "failureMode"}
    assert picker["name"] and set(picker["port"]) == {"number"}
    assert 1 <= picker["port"]["number"] <= 65535
    assert picker.get("failureMode", "FailClose") in ("FailOpen", "FailClose")
    values = yaml.safe_load((KUBE / "gateway-api" / "epp-values.yaml").read_text())
    assert values["inferencePool"]["targetPorts"] == spec["targetPorts"]
    assert values["inferencePool"]["modelServers"]["matchLabels"] == spec["selector"]["matchLabels"]
