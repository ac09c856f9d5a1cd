"""The deployment files under deploy/ agree with the product.

Kubernetes overlays are rendered with ``kubectl kustomize`` (skipped when no
kubectl is found); the ECS task definition is checked against botocore's ECS
model; IAM documents must parse. For the proxy container everywhere: every env
var and ``--flag`` is one ``aws-outbound-jwt-proxy --help`` lists (AWS_REGION /
AWS_DEFAULT_REGION belong to the standard AWS chain the help points to), the
probes hit /healthz and /readyz on the metrics port, the hardening holds, and
the grace period outlasts SHUTDOWN_TIMEOUT. Every metric name mentioned in
docs/ and deploy/ must be one a running proxy exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = ("sidecar", "shared")
PROXY_IMAGE = "ghcr.io/example/aws-outbound-jwt-proxy"
METRICS_PORT = 9090
UID = 65532
AWS_CHAIN_ENV = {"AWS_REGION", "AWS_DEFAULT_REGION"}


# ---- what the product accepts ------------------------------------------------------------


@cache
def help_text() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "aws_outbound_jwt_proxy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "1000"},  # argparse: no wrapping inside names
    )
    return re.sub(r"\s+", " ", out.stdout)


def help_env_names() -> set[str]:
    return set(re.findall(r"\[env ([A-Z][A-Z0-9_]*)", help_text()))


def help_flags() -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text()))


def test_help_lists_flags_and_env_names() -> None:
    # guards the two parsers above against a change of --help's layout
    assert {"--upstream-host", "--shutdown-timeout", "--allowed-upstream-hosts"} <= help_flags()
    assert {"UPSTREAM_HOST", "SHUTDOWN_TIMEOUT", "ALLOWED_UPSTREAM_HOSTS"} <= help_env_names()


def seconds(duration: str) -> float:
    """A Go duration (``10s``, ``1m30s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def shutdown_timeout(env: dict[str, str]) -> float:
    """SHUTDOWN_TIMEOUT as set in ``env``, else the product's default from --help."""
    if "SHUTDOWN_TIMEOUT" in env:
        return seconds(env["SHUTDOWN_TIMEOUT"])
    m = re.search(r"\[env SHUTDOWN_TIMEOUT\] \(default '([^']+)'\)", help_text())
    assert m, "SHUTDOWN_TIMEOUT default not found in --help"
    return seconds(m.group(1))


# ---- Kubernetes --------------------------------------------------------------------------


def kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    venv = Path(sys.executable).parent / "kubectl"
    return str(venv) if venv.exists() else None


needs_kubectl = pytest.mark.skipif(
    kubectl() is None, reason="kubectl not found (scripts/check-deploy installs one)"
)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    exe = kubectl()
    assert exe
    out = subprocess.run(
        [exe, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60, check=True
    )
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def proxy_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for c in pod.get("initContainers", []) + pod.get("containers", [])
        if c["image"].startswith(PROXY_IMAGE + ":")
    ]


def pod_specs(overlay: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod template, proxy container) for every workload that runs the proxy."""
    found = False
    for d in render(overlay):
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            template = d["spec"]["template"]
            for c in proxy_containers(template["spec"]):
                found = True
                yield template, c
    assert found, f"{overlay}: no proxy container"


def container_env(overlay: str, c: dict[str, Any]) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps first, then env (which wins)."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(render(overlay), "ConfigMap")}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        assert set(src) == {"configMapRef"}, src
        env.update(configmaps[src["configMapRef"]["name"]])
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", "")
    return env


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    return int(match)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_and_flags_are_the_products(overlay: str) -> None:
    allowed_env = help_env_names() | AWS_CHAIN_ENV
    flags = help_flags()
    for _, c in pod_specs(overlay):
        assert "command" not in c, "the image's entrypoint is the proxy"
        assert set(container_env(overlay, c)) <= allowed_env, set(container_env(overlay, c)) - allowed_env
        for arg in c.get("args", []):
            if arg.startswith("-"):
                assert "--" + arg.lstrip("-").split("=")[0] in flags, arg


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_health_endpoints_on_the_metrics_port(overlay: str) -> None:
    for _, c in pod_specs(overlay):
        env = container_env(overlay, c)
        assert env.get("METRICS_ENABLED", "true") == "true"
        assert env.get("METRICS_LISTEN_ADDR", ":9090") == f":{METRICS_PORT}"
        expected = {"readinessProbe": {"/readyz"}, "livenessProbe": {"/healthz"}}
        expected["startupProbe"] = {"/healthz", "/readyz"}
        for probe, paths in expected.items():
            get = c[probe]["httpGet"]
            assert get["path"] in paths, (probe, get)
            assert port_number(c, get["port"]) == METRICS_PORT, (probe, get)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hardening(overlay: str) -> None:
    for template, c in pod_specs(overlay):
        pod = template["spec"]
        pod_sc = pod.get("securityContext", {})
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc.get("runAsUser", pod_sc.get("runAsUser")) == UID
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile")
        assert seccomp == {"type": "RuntimeDefault"}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
        sa = pod["serviceAccountName"]
        (account,) = [d for d in of_kind(render(overlay), "ServiceAccount") if d["metadata"]["name"] == sa]
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_shutdown_timeout(overlay: str) -> None:
    for template, c in pod_specs(overlay):
        env = container_env(overlay, c)
        shutdown = shutdown_timeout(env)
        pre_stop = 0.0
        hook = c.get("lifecycle", {}).get("preStop", {})
        if "exec" in hook:
            cmd = hook["exec"]["command"]
            assert cmd[0] == "sleep", cmd
            pre_stop = float(cmd[1])
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert grace > pre_stop + shutdown, (grace, pre_stop, shutdown)


@needs_kubectl
def test_sidecar_is_native_and_pinned_to_loopback() -> None:
    ((template, c),) = list(pod_specs("sidecar"))
    pod = template["spec"]
    assert c in pod["initContainers"] and c["restartPolicy"] == "Always"
    assert "startupProbe" in c
    assert pod["containers"], "an app container beside the sidecar"
    env = container_env("sidecar", c)
    assert env["LISTEN_ADDR"] == "127.0.0.1:8080"
    assert env["UPSTREAM_HOST"]
    assert env["TOKEN_AUDIENCE"]


@needs_kubectl
def test_shared_proxy_is_bounded_scaled_and_fenced() -> None:
    docs = render("shared")
    ((template, c),) = list(pod_specs("shared"))
    labels = template["metadata"]["labels"]
    env = container_env("shared", c)
    assert "UPSTREAM_HOST" not in env
    assert env["ALLOWED_UPSTREAM_HOSTS"].strip()
    # the SSRF guard, when set explicitly, still covers link-local (instance metadata)
    assert "169.254.0.0/16" in env.get("DENIED_UPSTREAM_CIDRS", "169.254.0.0/16").split(",")
    assert template["spec"]["topologySpreadConstraints"]

    def selects(selector: dict[str, Any]) -> bool:
        return selector["matchLabels"].items() <= labels.items()

    ((deploy,),) = [of_kind(docs, "Deployment")]
    assert len(proxy_containers(template["spec"])) == len(template["spec"]["containers"]) == 1
    ((svc,),) = [of_kind(docs, "Service")]
    assert svc["spec"]["selector"].items() <= labels.items()
    for p in svc["spec"]["ports"]:
        assert port_number(c, p["targetPort"]) == 8080
    ((hpa,),) = [of_kind(docs, "HorizontalPodAutoscaler")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    ((pdb,),) = [of_kind(docs, "PodDisruptionBudget")]
    assert selects(pdb["spec"]["selector"])
    ((netpol,),) = [of_kind(docs, "NetworkPolicy")]
    assert selects(netpol["spec"]["podSelector"])
    assert any("podSelector" in peer for rule in netpol["spec"]["ingress"] for peer in rule.get("from", []))
    egress = {(p["protocol"], p["port"]) for rule in netpol["spec"]["egress"] for p in rule["ports"]}
    assert {("TCP", 443), ("UDP", 53), ("TCP", 53)} <= egress


@needs_kubectl
def test_podmonitor_scrapes_every_proxy() -> None:
    (pm,) = render("monitoring")
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    # the fields used exist in the Prometheus Operator's PodMonitor v1 schema
    assert set(pm["spec"]) <= {"namespaceSelector", "selector", "podMetricsEndpoints", "jobLabel"}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    for overlay in OVERLAYS:
        for template, c in pod_specs(overlay):
            assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
            assert port_number(c, endpoint["port"]) == METRICS_PORT
            assert endpoint["path"] == container_env(overlay, c).get("METRICS_PATH", "/metrics")


# ---- ECS and IAM -------------------------------------------------------------------------


def task_definition() -> dict[str, Any]:
    return json.loads((DEPLOY / "ecs" / "task-definition.json").read_text())


def test_task_definition_matches_the_ecs_api() -> None:
    import botocore.session
    from botocore.validate import ParamValidator

    shape = (
        botocore.session.get_session()
        .get_service_model("ecs")
        .operation_model("RegisterTaskDefinition")
        .input_shape
    )
    report = ParamValidator().validate(task_definition(), shape)
    assert not report.has_errors(), report.generate_report()


def test_task_definition_proxy_sidecar() -> None:
    td = task_definition()
    assert td["networkMode"] == "awsvpc"
    assert td["taskRoleArn"].startswith("arn:aws:iam::")
    containers = {c["name"]: c for c in td["containerDefinitions"]}
    (proxy,) = [c for c in containers.values() if c["image"].startswith(PROXY_IMAGE + ":")]
    env = {e["name"]: e["value"] for e in proxy["environment"]}
    assert set(env) <= help_env_names() | AWS_CHAIN_ENV, set(env) - help_env_names()
    assert "command" not in proxy and "entryPoint" not in proxy
    assert proxy["essential"] is True
    assert proxy["user"].split(":")[0] == str(UID)
    assert proxy["readonlyRootFilesystem"] is True
    assert proxy["linuxParameters"]["capabilities"]["drop"] == ["ALL"]
    assert {p["containerPort"] for p in proxy["portMappings"]} == {8080, METRICS_PORT}
    check = proxy["healthCheck"]["command"]
    assert check[:3] == ["CMD", "python", "-c"]
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in check[3]
    shutdown = shutdown_timeout(env)
    assert proxy["stopTimeout"] > shutdown
    others = [c for c in containers.values() if c is not proxy]
    assert others
    for app in others:
        assert {"containerName": proxy["name"], "condition": "HEALTHY"} in app["dependsOn"]


def test_health_check_command_runs_against_a_live_metrics_listener() -> None:
    """The exact healthCheck command (python + urllib, no curl) passes against /healthz."""
    check = task_definition()["containerDefinitions"][0]["healthCheck"]["command"]
    with running_proxy() as metrics_port:
        code = check[3].replace(f"127.0.0.1:{METRICS_PORT}", f"127.0.0.1:{metrics_port}")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


@pytest.mark.parametrize("path", sorted(p.name for p in (DEPLOY / "iam").glob("*.json")))
def test_iam_documents(path: str) -> None:
    doc = json.loads((DEPLOY / "iam" / path).read_text())
    assert doc["Version"] == "2012-10-17"
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow" and st["Action"]
        assert ("Resource" in st) != ("Principal" in st)  # identity policy xor trust policy


def test_policy_limits_get_web_identity_token() -> None:
    doc = json.loads((DEPLOY / "iam" / "policy.json").read_text())
    (mint,) = [st for st in doc["Statement"] if st["Action"] == "sts:GetWebIdentityToken"]
    cond = mint["Condition"]
    assert cond["ForAllValues:StringEquals"]["sts:IdentityTokenAudience"]
    assert cond["StringEquals"]["sts:SigningAlgorithm"] in ("RS256", "ES384")
    assert int(cond["NumericLessThanEquals"]["sts:DurationSeconds"]) <= 3600
    tags = [st for st in doc["Statement"] if st["Action"] == "sts:TagGetWebIdentityToken"]
    assert any(k.startswith("aws:RequestTag/") for st in tags for k in st["Condition"]["StringEquals"])


# ---- metric names in docs/ and deploy/ ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_proxy() -> Iterator[int]:
    """The real proxy process (dynamic audience, so no STS call at start); yields its metrics port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="AKIDTEST",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL_STS=f"http://127.0.0.1:{free_port()}",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    argv = [sys.executable, "-m", "aws_outbound_jwt_proxy", "--log-level", "error"]
    argv += ["--listen-addr", f"127.0.0.1:{free_port()}", "--metrics-listen-addr", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop() -> str:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        return err.decode(errors="replace")[-2000:]

    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"proxy did not come up: {stop()}") from None
            time.sleep(0.05)
    try:
        yield port
    finally:
        stop()


@pytest.fixture(scope="module")
def exported_metric_names() -> set[str]:
    """Every sample name a scrape of the real proxy can contain (from its # TYPE lines)."""
    with running_proxy() as port:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_count", "_sum"],
        "summary": ["_count", "_sum"],
    }
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M):
        base = name.removesuffix("_total") if kind == "counter" else name
        names.add(base)
        names.update(base + s for s in suffixes.get(kind, []))
    return names


# Prefixes of the proxy's series and of the Python runtime collectors; label names that
# share a prefix are not metric names.
METRIC_TOKEN = re.compile(
    r"(?<![\w./-])((?:http_server|http_client|token|aws_outbound_jwt_proxy|process|python)_[a-z0-9_]*)(\*?)"
)
LABEL_NAMES = {"token_result"}


def mentioned_metric_names() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    files = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    files += sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".md", ".json", ".yml", ".yaml"})
    for path in files:
        for name, star in METRIC_TOKEN.findall(path.read_text()):
            if name in LABEL_NAMES or (name.endswith("_") and not star):
                continue
            found.setdefault(name + star, set()).add(str(path.relative_to(ROOT)))
    return found


def test_metric_names_in_docs_and_deploy_exist(exported_metric_names: set[str]) -> None:
    mentioned = mentioned_metric_names()
    assert "token_expiry_seconds" in mentioned  # the scan itself works
    missing = {}
    for name, where in mentioned.items():
        if name.endswith("*"):
            ok = any(n.startswith(name[:-1]) for n in exported_metric_names)
        else:
            ok = name in exported_metric_names
        if not ok:
            missing[name] = sorted(where)
    assert not missing, f"not exported by the proxy: {missing}"


# ---- container image ---------------------------------------------------------------------


def locked_pins() -> dict[str, tuple[str, int]]:
    """requirements.lock as {normalized name: (version, number of hashes)}."""
    from packaging.utils import canonicalize_name

    pins: dict[str, tuple[str, int]] = {}
    text = (ROOT / "requirements.lock").read_text()
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            pins[canonicalize_name(m.group(1))] = (m.group(2), block.count("--hash=sha256:"))
    return pins


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """requirements.lock is in sync with [project] dependencies (else: run scripts/lock)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = locked_pins()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in requirements.lock: run scripts/lock"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} vs {dep}: scripts/lock"
    assert "h2" in pins  # httpx[http2]
    assert all(n_hashes > 0 for _, n_hashes in pins.values())


def test_dockerfile_installs_the_lock_and_matches_the_deploy_files() -> None:
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r /tmp/requirements.lock" in dockerfile
    assert dockerfile.index("COPY requirements.lock") < dockerfile.index("COPY src")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}\n" in dockerfile, "the image's default VERSION label follows pyproject"
    assert "\nUSER 65532:65532\n" in dockerfile
    assert 'ENTRYPOINT ["aws-outbound-jwt-proxy"]' in dockerfile
    (cmd,) = re.findall(r"^\s*CMD (\[.*\])$", dockerfile, re.M)
    ecs_check = task_definition()["containerDefinitions"][0]["healthCheck"]["command"]
    assert json.loads(cmd) == ecs_check[1:], "HEALTHCHECK and the ECS healthCheck run the same command"
