"""The Helm chart (deploy/helm/mailbox), the Dockerfile and values.schema.json.

Helm itself does the rendering, through `helm-sdkpy` (a wheel that bundles Helm v4's Go
library; no helm binary, no Docker, no cluster):

- `helm_sdkpy.Lint(config).run(chart)` lints the chart (Helm's lint renders every template
  with the default values and checks them against values.schema.json, but in lint mode
  Helm turns `fail` into a log line, so it cannot show the grace-period check).
- helm-sdkpy has no `template` action. Its `Install(config).run(release, chart, values=...)`
  is `helm install`: it merges the values, validates them against values.schema.json,
  renders with Helm's engine (templates, `fail`, NOTES.txt) and then applies the manifest.
  We point it at a fake Kubernetes API on 127.0.0.1 (discovery documents for the kinds the
  chart uses, plus an in-memory object store) and at Helm's in-memory release driver
  (HELM_DRIVER=memory). The release it returns carries the rendered `manifest` and `notes`,
  which the tests parse with PyYAML. Nothing leaves the loopback interface.

The helm-sdkpy calls run in a child Python process (this file run as a script with
`--helm-worker`): the Go runtime reads HELM_DRIVER and the HELM_*_HOME paths once, when the
shared library loads, so the child gets a clean, controlled environment and the pytest
process's environment stays untouched.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "mailbox"
NAMESPACE = "mailbox-test"

CREDS = """-----BEGIN NATS USER JWT-----
eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.fake.fake
------END NATS USER JWT------

-----BEGIN USER NKEY SEED-----
SUAFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKE
------END USER NKEY SEED------
"""

# --------------------------------------------------------------------------------------
# Render scenarios: release name -> values passed to Install (merged over values.yaml).
# --------------------------------------------------------------------------------------

FULL = {  # HPA + ServiceMonitor + a chart-created credentials Secret
    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12, "targetCPUUtilizationPercentage": 65},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "nats": {"credsSecret": {"create": True, "creds": CREDS, "user": "svc", "password": "s3cret"}},
}
KEDA = {  # KEDA + ServiceMonitor + an existing Secret, on another prefix
    "config": {"MAILBOX_PREFIX": "acme"},
    "keda": {
        "enabled": True,
        "lagThreshold": 250,
        "natsServerMonitoringEndpoint": "nats-headless.nats.svc.cluster.local:8222",
    },
    "metrics": {"serviceMonitor": {"enabled": True}},
    "nats": {"existingSecret": "corp-nats", "existingSecretKeys": {"creds": "user.creds", "token": "tok"}},
}
INSTALLS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "full": FULL,
    "keda": KEDA,
    "grace-31": {"terminationGracePeriodSeconds": 31},  # 31 s > 30,000 ms: just enough
    # must fail
    "grace-30": {"terminationGracePeriodSeconds": 30},  # == drain timeout
    "grace-10": {"terminationGracePeriodSeconds": 10},
    "drain-90s": {"config": {"MAILBOX_DRAIN_TIMEOUT_MS": "90000"}},  # grace stays 60
    "hpa-and-keda": {"autoscaling": {"enabled": True}, "keda": {"enabled": True}},
    "replicas-0": {"replicaCount": 0},
    "replicas-str": {"replicaCount": "3"},
    "both-secrets": {"nats": {"existingSecret": "x", "credsSecret": {"create": True, "token": "t"}}},
}


# --------------------------------------------------------------------------------------
# A fake Kubernetes API server on 127.0.0.1: discovery + an in-memory object store.
# --------------------------------------------------------------------------------------


def _resource(plural: str, kind: str, namespaced: bool = True) -> dict[str, Any]:
    return {
        "name": plural,
        "singularName": kind.lower(),
        "namespaced": namespaced,
        "kind": kind,
        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
    }


_CORE_V1 = [
    _resource("configmaps", "ConfigMap"),
    _resource("secrets", "Secret"),
    _resource("services", "Service"),
    _resource("serviceaccounts", "ServiceAccount"),
    _resource("pods", "Pod"),
    _resource("namespaces", "Namespace", namespaced=False),
]
_GROUPS = {
    ("apps", "v1"): [_resource("deployments", "Deployment"), _resource("replicasets", "ReplicaSet")],
    ("policy", "v1"): [_resource("poddisruptionbudgets", "PodDisruptionBudget")],
    ("autoscaling", "v2"): [_resource("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    ("monitoring.coreos.com", "v1"): [_resource("servicemonitors", "ServiceMonitor")],
    ("keda.sh", "v1alpha1"): [_resource("scaledobjects", "ScaledObject")],
}
_OBJECT_PATH = re.compile(r"/(?:api/v1|apis/[^/]+/[^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?")


class _KubeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _KubeServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}
        self._send(code, body)

    def _discovery(self, path: str) -> dict[str, Any] | None:
        if path == "/version":
            return {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
            }
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for group, version in _GROUPS:
                groups.setdefault(group, []).append(version)
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                        "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                    }
                    for g, vs in groups.items()
                ],
            }
        if path == "/api/v1":
            return {"kind": "APIResourceList", "groupVersion": "v1", "resources": _CORE_V1}
        m = re.fullmatch(r"/apis/([^/]+)/([^/]+)", path)
        if m and (m[1], m[2]) in _GROUPS:
            gv = f"{m[1]}/{m[2]}"
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": _GROUPS[(m[1], m[2])]}
        return None

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if method == "GET" and (doc := self._discovery(path)) is not None:
            return self._send(200, doc)
        m = _OBJECT_PATH.fullmatch(path)
        if not m:
            return self._status(404, "NotFound", f"the fake API serves no {method} {path}")
        ns, resource, name = m[1], m[2], m[3]
        objects = self.server.objects
        with self.server.lock:
            if method == "GET" and name:
                obj = objects.get((ns, resource, name))
                return self._send(200, obj) if obj else self._status(404, "NotFound", f'{resource} "{name}" not found')
            if method == "GET":
                selector = parse_qs(url.query).get("labelSelector", [""])[0]
                wanted = dict(p.split("=", 1) for p in selector.split(",") if "=" in p)
                items = [
                    o
                    for (n, r, _), o in objects.items()
                    if n == ns and r == resource
                    and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
                ]
                return self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
            if method in ("POST", "PUT"):
                if "json" not in (self.headers.get("Content-Type") or ""):
                    return self._status(415, "UnsupportedMediaType", "the fake API only speaks JSON")
                obj = json.loads(raw)
                key = (ns, resource, obj["metadata"]["name"])
                if method == "POST" and key in objects:
                    return self._status(409, "AlreadyExists", f'{resource} "{key[2]}" already exists')
                obj["metadata"].setdefault("namespace", ns)
                obj["metadata"]["resourceVersion"] = str(len(self.server.created) + 1)
                obj["metadata"].setdefault("uid", f"uid-{len(self.server.created) + 1}")
                objects[key] = obj
                if method == "POST":
                    self.server.created.append(obj)
                return self._send(201 if method == "POST" else 200, obj)
            if method == "DELETE" and name and objects.pop((ns, resource, name), None) is not None:
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        return self._status(405, "MethodNotAllowed", f"the fake API does not support {method} {path}")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class _KubeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KubeHandler)
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []

    def kubeconfig(self) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.server_address[1]}"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
                "current-context": "fake",
            }
        )


# --------------------------------------------------------------------------------------
# The helm-sdkpy worker (child process) and its driver.
# --------------------------------------------------------------------------------------


def _helm_worker(spec_path: str, out_path: str) -> None:
    """Run lint/install jobs with helm-sdkpy; write {job: {ok, result | error}} as JSON."""
    import asyncio

    import helm_sdkpy

    spec = json.loads(Path(spec_path).read_text())

    async def run(job: dict[str, Any]) -> Any:
        # A fresh Configuration per job: its own in-memory release store.
        config = helm_sdkpy.Configuration(namespace=spec["namespace"], kubeconfig=spec["kubeconfig"])
        if job["op"] == "lint":
            return await helm_sdkpy.Lint(config).run(job["chart"])
        return await helm_sdkpy.Install(config).run(
            job["release"],
            job["chart"],
            values=job["values"],
            wait=False,  # nothing runs behind the fake API
            timeout=60,
            skip_schema_validation=False,
        )

    results: dict[str, Any] = {"helm_sdkpy": helm_sdkpy.__version__}
    for name, job in spec["jobs"].items():
        try:
            results[name] = {"ok": True, "result": asyncio.run(run(job))}
        except helm_sdkpy.HelmError as exc:
            results[name] = {"ok": False, "error": str(exc), "type": type(exc).__name__}
    Path(out_path).write_text(json.dumps(results))


@dataclass
class HelmRuns:
    results: dict[str, Any]
    created: list[dict[str, Any]] = field(default_factory=list)

    def ok(self, name: str) -> dict[str, Any]:
        res = self.results[name]
        assert res["ok"], f"{name}: {res.get('type')}: {res.get('error')}"
        return res["result"]

    def error(self, name: str) -> str:
        res = self.results[name]
        assert not res["ok"], f"{name} rendered but should have failed"
        return res["error"]

    def manifest(self, name: str) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.ok(name)["manifest"]) if d]

    def one(self, name: str, kind: str) -> dict[str, Any]:
        found = [d for d in self.manifest(name) if d["kind"] == kind]
        assert len(found) == 1, f"{name}: expected one {kind}, got {len(found)}"
        return found[0]

    def applied(self, release: str) -> list[dict[str, Any]]:
        """Objects Helm created through the fake API for this release."""
        return [o for o in self.created if o["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == release]


def _subprocess_env(work: Path) -> dict[str, str]:
    drop = {"http_proxy", "https_proxy", "all_proxy", "kubeconfig", "kubernetes_service_host", "kubernetes_service_port"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in drop and not k.startswith("HELM_")}
    for sub in ("home", "cache", "config", "data"):
        (work / sub).mkdir(exist_ok=True)
    env.update(
        HELM_DRIVER="memory",
        HELM_CACHE_HOME=str(work / "cache"),
        HELM_CONFIG_HOME=str(work / "config"),
        HELM_DATA_HOME=str(work / "data"),
        HOME=str(work / "home"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HelmRuns]:
    if importlib.util.find_spec("helm_sdkpy") is None:
        if os.environ.get("CI"):
            pytest.fail("helm-sdkpy is not installed (it is in the [test] extra of pyproject.toml)")
        pytest.skip("helm-sdkpy is not installed (pip install -e '.[test]')")
    work = tmp_path_factory.mktemp("helm")

    # A copy of the chart whose own values.yaml breaks the schema: lint must flag it.
    bad_chart = work / "chart-bad-values" / "mailbox"
    shutil.copytree(CHART, bad_chart)
    values = (bad_chart / "values.yaml").read_text()
    assert "\nreplicaCount: 3\n" in values
    (bad_chart / "values.yaml").write_text(values.replace("\nreplicaCount: 3\n", "\nreplicaCount: 0\n"))

    jobs: dict[str, dict[str, Any]] = {
        "lint": {"op": "lint", "chart": str(CHART)},
        "lint-bad-values": {"op": "lint", "chart": str(bad_chart)},
    }
    for release, vals in INSTALLS.items():
        jobs[release] = {"op": "install", "release": release, "chart": str(CHART), "values": vals}

    server = _KubeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        spec = work / "jobs.json"
        out = work / "results.json"
        spec.write_text(json.dumps({"namespace": NAMESPACE, "kubeconfig": server.kubeconfig(), "jobs": jobs}))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--helm-worker", str(spec), str(out)],
            env=_subprocess_env(work),
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0 and out.exists(), f"helm worker failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        yield HelmRuns(json.loads(out.read_text()), list(server.created))
    finally:
        server.shutdown()
        server.server_close()


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# --------------------------------------------------------------------------------------
# (a) Lint and render with Helm (helm-sdkpy)
# --------------------------------------------------------------------------------------

WARNING_SEV = 2  # Helm's lint severities: 1 info, 2 warning, 3 error


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "mailbox"
    assert str(chart["appVersion"]) == "0.1.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert str(chart["appVersion"]) == project["version"], "chart appVersion follows the package version"
    for name in ("_helpers.tpl", "NOTES.txt", "deployment.yaml", "configmap.yaml", "secret.yaml", "service.yaml",
                 "servicemonitor.yaml", "pdb.yaml", "hpa.yaml", "scaledobject.yaml"):
        assert (CHART / "templates" / name).is_file(), name


def test_lint_is_clean(helm: HelmRuns) -> None:
    lint = helm.ok("lint")
    assert lint["TotalChartsLinted"] == 1
    bad = [m for m in lint["Messages"] if m["Severity"] >= WARNING_SEV]
    assert not bad, f"helm lint reported warnings/errors: {bad}"
    assert not lint["Errors"]


def test_lint_catches_values_that_break_the_schema(helm: HelmRuns) -> None:
    lint = helm.ok("lint-bad-values")
    errors = [m for m in lint["Messages"] if m["Severity"] > WARNING_SEV]
    assert any(m["Path"] == "values.yaml" for m in errors), lint["Messages"]
    assert lint["Errors"]


def test_default_render_objects(helm: HelmRuns) -> None:
    docs = helm.manifest("default")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    for doc in docs:
        assert doc["metadata"]["name"] == "default-mailbox"
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "mailbox"
        assert labels["app.kubernetes.io/instance"] == "default"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
    # Helm applied exactly what it rendered (through the fake API's REST mapping).
    assert sorted(o["kind"] for o in helm.applied("default")) == kinds
    release = helm.ok("default")
    assert release["info"]["status"] == "deployed"
    assert release["namespace"] == NAMESPACE


def test_deployment_runs_mailbox_serve_with_probes_and_ports(helm: HelmRuns) -> None:
    dep = helm.one("default", "Deployment")
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    assert c["image"] == "mailbox:0.1.0"
    assert c["command"] + c["args"] == ["mailbox", "serve"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9464, "health": 8081}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["envFrom"] == [{"configMapRef": {"name": "default-mailbox"}}]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # no credentials configured: nothing from a Secret
    env = {e["name"] for e in c.get("env", [])}
    assert not env & {"MAILBOX_NATS_CREDS", "MAILBOX_NATS_USER", "MAILBOX_NATS_PASSWORD", "MAILBOX_NATS_TOKEN"}
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    # selector matches the pod template
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # pods roll when the config changes
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]


def test_deployment_security_context(helm: HelmRuns) -> None:
    dep = helm.one("default", "Deployment")
    pod = dep["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = _container(dep)["securityContext"]
    assert csc["runAsNonRoot"] is True
    assert csc["runAsUser"] == 10001
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # the read-only root filesystem gets a writable /tmp
    (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in _container(dep)["volumeMounts"]


def test_grace_period_is_longer_than_drain_timeout(helm: HelmRuns) -> None:
    dep = helm.one("default", "Deployment")
    cm = helm.one("default", "ConfigMap")
    grace_s = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain_ms = int(cm["data"]["MAILBOX_DRAIN_TIMEOUT_MS"])
    assert grace_s == 60 and drain_ms == 30_000
    assert grace_s * 1000 > drain_ms


def test_pdb_min_available_1(helm: HelmRuns) -> None:
    pdb = helm.one("default", "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = helm.one("default", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_service_exposes_metrics(helm: HelmRuns) -> None:
    svc = helm.one("default", "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = helm.one("default", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_configmap_carries_the_config_values(helm: HelmRuns) -> None:
    data = helm.one("default", "ConfigMap")["data"]
    assert data == {k: str(v) for k, v in _values()["config"].items()}
    assert data["MAILBOX_NATS_URL"] == "nats://nats:4222"
    assert data["MAILBOX_PREFIX"] == "mailbox"
    assert data["MAILBOX_REPLICAS"] == "3"
    assert data["MAILBOX_HANDLER"] == "echo"
    assert data["MAILBOX_CONCURRENCY"] == "16"
    assert data["MAILBOX_METRICS_PORT"] == "9464"
    assert data["MAILBOX_HEALTH_PORT"] == "8081"
    assert data["MAILBOX_LOG_LEVEL"] == "info"
    assert {"MAILBOX_LEASE_MS", "MAILBOX_SUSPENDED_LEASE_MS"} <= data.keys()


def test_config_defaults_are_accepted_by_the_service() -> None:
    """The chart's config map is a valid service configuration (service/config.py)."""
    config = pytest.importorskip("service.config")
    settings = config.from_mapping(_values()["config"])
    assert settings.drain_timeout_ms == 30_000
    assert (settings.metrics_port, settings.health_port) == (9464, 8081)


def test_notes(helm: HelmRuns) -> None:
    notes = helm.ok("default")["info"]["notes"]
    assert "JetStream" in notes and "does NOT install NATS" in notes
    assert 'MAILBOX_REPLICAS="3"' in notes
    assert "port-forward svc/default-mailbox 9464:9464" in notes
    assert "/metrics" in notes and "/healthz" in notes and "/readyz" in notes


def test_render_with_hpa_servicemonitor_and_created_secret(helm: HelmRuns) -> None:
    docs = helm.manifest("full")
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret",
        "Service", "ServiceAccount", "ServiceMonitor",
    ]
    dep = helm.one("full", "Deployment")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"

    hpa = helm.one("full", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "full-mailbox"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 65}

    sm = helm.one("full", "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    secret = helm.one("full", "Secret")
    assert secret["metadata"]["name"] == "full-mailbox-nats"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"nats.creds": CREDS, "user": "svc", "password": "s3cret"}  # empty token left out

    c = _container(dep)
    env = {e["name"]: e for e in c["env"]}
    assert env["MAILBOX_NATS_CREDS"]["value"] == "/etc/mailbox/nats/nats.creds"
    assert env["MAILBOX_NATS_USER"]["valueFrom"]["secretKeyRef"] == {"name": "full-mailbox-nats", "key": "user"}
    assert env["MAILBOX_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "full-mailbox-nats", "key": "password"}
    assert "MAILBOX_NATS_TOKEN" not in env
    assert {"name": "nats-creds", "mountPath": "/etc/mailbox/nats", "readOnly": True} in c["volumeMounts"]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "nats-creds"]
    assert vol["secret"]["secretName"] == "full-mailbox-nats"
    assert vol["secret"]["items"] == [{"key": "nats.creds", "path": "nats.creds"}]
    assert "checksum/nats-secret" in dep["spec"]["template"]["metadata"]["annotations"]


def test_render_with_keda_and_existing_secret(helm: HelmRuns) -> None:
    docs = helm.manifest("keda")
    kinds = sorted(d["kind"] for d in docs)
    assert "ScaledObject" in kinds and "HorizontalPodAutoscaler" not in kinds and "Secret" not in kinds
    dep = helm.one("keda", "Deployment")
    assert "replicas" not in dep["spec"], "KEDA owns the replica count"

    so = helm.one("keda", "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == "keda-mailbox"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (3, 20)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    assert meta["stream"] == "acme-signals"
    assert meta["consumer"] == "acme-workers"
    assert meta["lagThreshold"] == "250"  # KEDA trigger metadata values are strings
    assert meta["natsServerMonitoringEndpoint"] == "nats-headless.nats.svc.cluster.local:8222"
    assert meta["account"] == "$G"

    c = _container(dep)
    env = {e["name"]: e for e in c["env"]}
    assert env["MAILBOX_NATS_CREDS"]["value"] == "/etc/mailbox/nats/nats.creds"
    assert env["MAILBOX_NATS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "corp-nats", "key": "tok"}
    assert "MAILBOX_NATS_USER" not in env and "MAILBOX_NATS_PASSWORD" not in env
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "nats-creds"]
    assert vol["secret"] == {"secretName": "corp-nats", "defaultMode": 0o440, "items": [{"key": "user.creds", "path": "nats.creds"}]}
    assert helm.one("keda", "ConfigMap")["data"]["MAILBOX_PREFIX"] == "acme"


def test_grace_period_just_over_drain_renders(helm: HelmRuns) -> None:
    dep = helm.one("grace-31", "Deployment")
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 31


@pytest.mark.parametrize("release", ["grace-30", "grace-10", "drain-90s"])
def test_too_short_grace_period_fails_rendering(helm: HelmRuns, release: str) -> None:
    error = helm.error(release)
    assert "terminationGracePeriodSeconds" in error and "MAILBOX_DRAIN_TIMEOUT_MS" in error, error
    assert "execution error" in error  # the template's `fail`, not a cluster error
    assert helm.applied(release) == [], "nothing may reach the cluster"


def test_hpa_and_keda_are_mutually_exclusive(helm: HelmRuns) -> None:
    assert "mutually exclusive" in helm.error("hpa-and-keda")
    assert "not both" in helm.error("both-secrets")


@pytest.mark.parametrize("release", ["replicas-0", "replicas-str"])
def test_helm_rejects_bad_replica_count_with_the_schema(helm: HelmRuns, release: str) -> None:
    error = helm.error(release)
    assert "schema" in error and "/replicaCount" in error, error
    assert helm.applied(release) == []


# --------------------------------------------------------------------------------------
# (b) values.yaml against values.schema.json (jsonschema)
# --------------------------------------------------------------------------------------


def _validator() -> jsonschema.Draft7Validator:
    schema = _schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_values_yaml_is_valid() -> None:
    errors = [e.message for e in _validator().iter_errors(_values())]
    assert errors == []


def _subschema(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/")
        node = schema
        for part in ref[2:].split("/"):
            node = node[part]
    return node


def test_schema_describes_every_value() -> None:
    """Each key of values.yaml has a typed entry in the schema (free-form maps excepted)."""
    schema = _schema()
    missing: list[str] = []

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = _subschema(schema, node)
        if not any(k in node for k in ("type", "enum", "oneOf", "anyOf", "not")):
            missing.append(f"{path}: no type")
        if isinstance(value, dict) and node.get("type") == "object":
            for key, sub in value.items():
                props = node.get("properties", {})
                if key in props:
                    walk(sub, props[key], f"{path}.{key}")
                elif isinstance(node.get("additionalProperties"), dict):
                    walk(sub, node["additionalProperties"], f"{path}.{key}")
                else:
                    missing.append(f"{path}.{key}")

    walk(_values(), schema, "")
    assert missing == []
    # The chart-specific objects reject unknown keys (typos), down to the top level.
    assert schema["additionalProperties"] is False


def _with(path: str, value: Any) -> dict[str, Any]:
    values = _values()
    *parents, last = path.split(".")
    node = values
    for p in parents:
        node = node[p]
    node[last] = value
    return values


BAD_VALUES = [
    ("replicaCount", 0),
    ("replicaCount", "3"),
    ("replicaCount", -1),
    ("replicaCount", 1.5),
    ("image.repository", 42),
    ("image.repository", ""),
    ("image.pullPolicy", "Sometimes"),
    ("terminationGracePeriodSeconds", 0),
    ("terminationGracePeriodSeconds", "60"),
    ("config.MAILBOX_NATS_URL", ""),
    ("config.MAILBOX_NATS_URL", "http://nats:4222"),
    ("config.MAILBOX_CONCURRENCY", 16),
    ("config.MAILBOX_CONCURRENCY", "0"),
    ("config.MAILBOX_DRAIN_TIMEOUT_MS", "30s"),
    ("config.MAILBOX_REPLICAS", "7"),
    ("config.MAILBOX_METRICS_PORT", "70000"),
    ("config.MAILBOX_LOG_LEVEL", "chatty"),
    ("config.MAILBOX_PREFIX", "a.b"),
    ("config.MAILBOX_NATS_CREDS", "/x"),
    ("config.lowercase_key", "x"),
    ("nats.credsSecret.create", "yes"),
    ("nats.existingSecret", "Not_A_Name"),
    ("podDisruptionBudget.minAvailable", -1),
    ("podDisruptionBudget.minAvailable", "half"),
    ("autoscaling.minReplicas", 0),
    ("keda.lagThreshold", 0),
    ("keda.natsServerMonitoringEndpoint", ""),
    ("service.metricsPort", 0),
    ("securityContext.runAsUser", "10001"),
    ("resources.limits", {"memory": "lots"}),
    ("metrics.serviceMonitor.interval", "often"),
    ("unknownTopLevel", True),
]


@pytest.mark.parametrize(("path", "value"), BAD_VALUES, ids=[f"{p}={v!r}" for p, v in BAD_VALUES])
def test_schema_rejects_bad_values(path: str, value: Any) -> None:
    errors = list(_validator().iter_errors(_with(path, value)))
    assert errors, f"{path}={value!r} was accepted"


GOOD_VALUES = [
    ("replicaCount", 1),
    ("podDisruptionBudget.minAvailable", "50%"),
    ("config.MAILBOX_REPLICAS", "1"),
    ("config.MAILBOX_NATS_URL", "tls://nats.nats.svc:4222"),
    ("config.OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317"),
    ("tmpVolume.sizeLimit", ""),
    ("resources.limits", {"cpu": 2, "memory": "1Gi"}),
]


@pytest.mark.parametrize(("path", "value"), GOOD_VALUES, ids=[f"{p}={v!r}" for p, v in GOOD_VALUES])
def test_schema_accepts_good_overrides(path: str, value: Any) -> None:
    assert [e.message for e in _validator().iter_errors(_with(path, value))] == []


# --------------------------------------------------------------------------------------
# Dockerfile (static checks: no Docker engine here)
# --------------------------------------------------------------------------------------


def test_dockerfile_matches_the_chart() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln.split()[1] for ln in instructions if ln.startswith("FROM ")]
    assert froms and all(f == "python:3.12-slim" for f in froms)
    assert any("pip install --no-cache-dir ." in ln for ln in instructions)
    assert any(re.search(r"useradd .*--uid 10001", ln) for ln in instructions)
    users = [ln for ln in instructions if ln.startswith("USER ")]
    assert users[-1] == "USER 10001"
    assert any(ln.startswith("ENV ") and "PYTHONUNBUFFERED=1" in ln for ln in instructions)
    (expose,) = [ln for ln in instructions if ln.startswith("EXPOSE ")]
    assert expose.split()[1:] == ["9464", "8081"]
    entry = [ln for ln in instructions if ln.startswith("ENTRYPOINT ")]
    assert json.loads(entry[-1][len("ENTRYPOINT "):]) == ["mailbox", "serve"]
    config = _values()["config"]
    assert [config["MAILBOX_METRICS_PORT"], config["MAILBOX_HEALTH_PORT"]] == ["9464", "8081"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "mailbox" in scripts

    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".venv", ".data", ".git", ".pytest_cache"} <= ignored
    assert not ignored & {"service", "pyproject.toml", "README.md"}, "pip install . needs these"


if __name__ == "__main__" and sys.argv[1:2] == ["--helm-worker"]:
    _helm_worker(sys.argv[2], sys.argv[3])
