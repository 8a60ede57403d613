"""Offline checks of deploy/: the Kustomize manifests, the Dockerfile, the alert rules and the dashboard.

Every check runs a real tool; none needs a cluster or the network:

- ``kubectl kustomize`` (pinned kubectl 1.33 / kustomize 5.6 from deploy/tools) renders the base and the
  overlay; everything below looks at the rendered output, which is what ``kubectl apply -k`` would send.
- ``kubernetes-validate --strict`` checks the built-in kinds against the Kubernetes 1.30 schemas;
  deploy/tools/check_crds.py checks ScaledObject, ServiceMonitor and PrometheusRule against models generated
  from the KEDA 2.16 and prometheus-operator 0.80 CRD schemas.
- ``checkov`` (once per session) and ``hadolint`` lint manifests and Dockerfile; skips must carry reasons.
- ``promtool check rules`` / ``promtool test rules`` on the rule groups extracted from the PrometheusRule,
  with the unit tests in deploy/prometheus/tests.
- Every PromQL expression (alerts, KEDA query, dashboard) is parsed and may name only series that
  worker/metrics.py exports, plus ``up``.

The linters live in .venv-tools (``make deploy-tools``, part of ``make test``). Without them a plain
``pytest`` skips these tests with the reason; under ``make test`` (COST_WORKER_REQUIRE_DEPLOY_TOOLS=1) a
missing tool fails them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from worker import metrics as worker_metrics
from worker.config import Settings, env_name

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = ("base", "overlays/production")
KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
RULES_FILE = "cost-worker.rules.yaml"  # the name the promtool unit tests load
# The checkov skips that exist on purpose, each justified next to the skip itself (annotations in
# deploy/base, a comment in deploy/Dockerfile). A new skip must be added here too, deliberately.
EXPECTED_CHECKOV_SKIPS = {
    ("kubernetes", "CKV_K8S_43", "Deployment.cost-worker"),
    ("kubernetes", "CKV_K8S_43", "Job.cost-worker-migrate"),
    ("kubernetes", "CKV_K8S_43", "Deployment.cost-worker-notify"),
    ("dockerfile", "CKV_DOCKER_2", "Dockerfile"),
    ("kubernetes", "CKV_K8S_43", "Deployment.cost-collector"),
}
EXPECTED_ALERTS = {
    "CostWorkerDown",
    "CostWorkerTargetDown",
    "CostWorkerConsumerLagGrowing",
    "CostWorkerNoCommits",
    "CostWorkerInputLostToRetention",
    "CostWorkerQuarantineRateHigh",
    "CostWorkerOutboxBacklogHigh",
    "CostWorkerOutboxOldestAgeHigh",
    "CostWorkerNotReady",
    "CostWorkerSpendRebuildsPending",
    "CostWorkerNotifyDown",
    "CostWorkerNotifyDeliveriesDelayed",
    "CostWorkerNotifyDeliveriesFailed",
    "CostWorkerNotifySecretsKeyMismatch",
    "CostCollectorDown",
    "CostCollectorNoActivePoller",
    "CostCollectorStale",
    "CostCollectorAuthFailures",
    "CostCollectorEndpointRefused",
}

# --- tools ------------------------------------------------------------------------------------------------


def tools_bin() -> Path:
    return Path(os.environ.get("COST_WORKER_DEPLOY_TOOLS") or REPO / ".venv-tools") / "bin"


def require_tool(name: str, *, venv: bool = True, path: bool = False) -> str:
    """The tool's path; else fail under ``make test`` and skip in a bare ``pytest`` run."""
    candidate = tools_bin() / name
    if venv and candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name) if path else None
    if found:
        return found
    where = " or ".join(([str(tools_bin())] if venv else []) + (["PATH"] if path else []))
    message = f"{name} not found in {where}: run `make deploy-tools` (part of `make test`); see deploy/tools/"
    if os.environ.get("COST_WORKER_REQUIRE_DEPLOY_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)


def run(args: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


# --- rendered manifests -----------------------------------------------------------------------------------

Doc = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    name: str
    path: Path
    docs: list[Doc]

    def all(self, kind: str) -> list[Doc]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Doc:
        found = [doc for doc in self.all(kind) if name is None or doc["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]


def render(kustomization: str, out_dir: Path) -> Rendered:
    kubectl = require_tool("kubectl", path=True)
    result = run([kubectl, "kustomize", str(DEPLOY / kustomization)])
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    path = out_dir / (kustomization.replace("/", "-") + ".yaml")
    path.write_text(result.stdout, encoding="utf-8")
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return Rendered(kustomization, path, docs)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    out_dir = tmp_path_factory.mktemp("rendered")
    return {name: render(name, out_dir) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def production(rendered: dict[str, Rendered]) -> Rendered:
    return rendered["overlays/production"]


def test_kustomizations_render_every_part(rendered: dict[str, Rendered]) -> None:
    for output in rendered.values():
        kinds = {doc["kind"] for doc in output.docs}
        assert kinds >= {
            "ServiceAccount",
            "ConfigMap",
            "Deployment",
            "Job",
            "Service",
            "ServiceMonitor",
            "PrometheusRule",
            "PodDisruptionBudget",
            "ScaledObject",
            "NetworkPolicy",
        }, output.name
        assert "Secret" not in kinds, f"{output.name}: Secrets are created out of band, never rendered"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_built_in_kinds_match_kubernetes_schemas(rendered: dict[str, Rendered], kustomization: str) -> None:
    tool = require_tool("kubernetes-validate")
    output = rendered[kustomization]
    result = run([tool, "--kubernetes-version", KUBERNETES_VERSION, "--strict", "--no-warn", str(output.path)])
    assert result.returncode == 0, result.stdout + result.stderr
    # Every built-in object was really checked (not skipped for want of a schema).
    passed = set(re.findall(r"passed for resource (\S+) against", result.stdout))
    built_in = {f"{d['kind'].lower()}/{d['metadata']['name']}" for d in output.docs if d["kind"] not in CUSTOM_KINDS}
    assert passed == built_in, result.stdout


def test_custom_resources_match_crd_schemas(rendered: dict[str, Rendered]) -> None:
    python = require_tool("python")
    paths = [str(output.path) for output in rendered.values()]
    result = run([python, str(DEPLOY / "tools" / "check_crds.py"), *paths])
    assert result.returncode == 0, result.stdout + result.stderr
    checked = result.stdout.count("\nok ") + result.stdout.startswith("ok ")
    assert checked == sum(1 for o in rendered.values() for d in o.docs if d["kind"] in CUSTOM_KINDS), result.stdout


# --- security lint ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkov_reports(rendered: dict[str, Rendered]) -> dict[str, Any]:
    """One checkov run over both renderings and the Dockerfile (checkov takes a few seconds to start)."""
    checkov = require_tool("checkov")
    files = [arg for output in rendered.values() for arg in ("--file", str(output.path))]
    # --skip-download: no guideline download from the vendor's API (offline; nothing is uploaded either).
    options = ["--framework", "kubernetes", "dockerfile", "--skip-download", "--output", "json"]
    result = run([checkov, *options, *files, "--file", "deploy/Dockerfile"], cwd=REPO)
    assert result.stdout.strip(), f"checkov printed no report:\n{result.stderr}"
    reports = json.loads(result.stdout)
    return {report["check_type"]: report for report in reports}


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_finds_nothing_unjustified(checkov_reports: dict[str, Any], framework: str) -> None:
    report = checkov_reports[framework]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for c in report["results"]["failed_checks"]
    ]
    assert failed == [], "checkov failed:\n" + "\n".join(failed)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 40, "checkov ran suspiciously few checks"


def test_checkov_skips_are_the_known_ones_with_reasons(checkov_reports: dict[str, Any]) -> None:
    skips = set()
    for framework, report in checkov_reports.items():
        for check in report["results"]["skipped_checks"]:
            reason = check["check_result"].get("suppress_comment") or ""
            assert len(reason) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"
            resource = check["resource"]
            # "Deployment.<namespace>.<name>" in the overlay, "Deployment.default.<name>" in the base
            if framework == "kubernetes":
                kind, *_, name = resource.split(".")
                resource = f"{kind}.{name}"
            else:
                resource = Path(check["file_path"]).name
            skips.add((framework, check["check_id"], resource))
    assert skips == EXPECTED_CHECKOV_SKIPS


def test_hadolint_passes_and_every_ignore_has_a_reason() -> None:
    hadolint = require_tool("hadolint")
    dockerfile = DEPLOY / "Dockerfile"
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dockerfile.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#"), f"line {number + 1}: hadolint ignore without a reason above it"
            assert "hadolint" not in before, f"line {number + 1}: hadolint ignore without a reason above it"


# --- Dockerfile -------------------------------------------------------------------------------------------


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(FROM line, instructions) per stage, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    instructions = [
        line for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")
    ]
    stages: list[tuple[str, list[str]]] = []
    for instruction in instructions:
        if instruction.upper().startswith("FROM "):
            stages.append((instruction, []))
        else:
            assert stages, f"instruction before the first FROM: {instruction}"
            stages[-1][1].append(instruction)
    return stages


def test_dockerfile_is_multi_stage_pinned_and_unprivileged(production: Rendered) -> None:
    stages = dockerfile_stages()
    froms = [line.split() for line, _ in stages]
    external = [words[1] for words in froms if words[1] not in {w[3] for w in froms if len(w) == 4}]
    assert len(external) == 1, f"one pinned base image, got {external}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", external[0]), external[0]
    assert len(stages) >= 3, "base, builder and runtime stages"
    _, runtime = stages[-1]
    copies = [i for i in runtime if i.startswith("COPY")]
    assert copies == ["COPY --from=builder /opt/venv /opt/venv"], "runtime copies only the venv"
    users = [i.split()[1] for i in runtime if i.startswith("USER ")]
    assert users, "the runtime stage sets USER"
    assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), f"numeric non-root USER, got {users}"
    assert runtime[-2:] == ['ENTRYPOINT ["cost-worker"]', 'CMD ["run"]']
    builder = next(i for line, body in stages if line.endswith(" AS builder") for i in body if i.startswith("RUN "))
    assert "[dev" not in builder, "no dev extras in the image"
    assert "[deploy" not in builder, "no deploy extras in the image"
    # The image's user is the one the pods run as.
    uid = users[-1].split(":")[0]
    for deployment in production.all("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert str(pod["securityContext"]["runAsUser"]) == uid


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes; a directory covers its contents."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        matched = any(fnmatch(p, body) or fnmatch(p, body.replace("**/", "")) for p in prefixes)
        if matched:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for _, body in dockerfile_stages():
        for instruction in body:
            if instruction.startswith("COPY ") and "--from=" not in instruction:
                sources += instruction.split()[1:-1]
    assert sources, "the Dockerfile copies something from the context"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
        for child in (REPO / source).rglob("*.py") if (REPO / source).is_dir() else []:
            assert not dockerignored(str(child.relative_to(REPO)), patterns), f"{child} excluded"
    for unwanted in (".venv", ".git", "tests/conftest.py", "deploy/Dockerfile", ".dev"):
        assert dockerignored(unwanted, patterns), f"{unwanted} would be sent to the build context"


# --- workload invariants ----------------------------------------------------------------------------------


def config_env(output: Rendered) -> dict[str, str]:
    """The worker's settings ConfigMap (its name carries a content hash)."""
    (config,) = [d for d in output.all("ConfigMap") if d["metadata"]["name"].startswith("cost-worker-config-")]
    data: dict[str, str] = config["data"]
    return data


def pod_labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_worker_pod_spec(rendered: dict[str, Rendered], kustomization: str) -> None:
    output = rendered[kustomization]
    deployment = output.one("Deployment", "cost-worker")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = config_env(output)
    port = int(config["COST_WORKER_METRICS_PORT"])
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("metrics", port)]
    assert container["args"] == ["run"]
    assert config["COST_WORKER_LOG_FORMAT"] == "json"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"

    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert {p["port"] for p in probes.values()} == {"metrics"}

    # SIGKILL must come well after the worker's own drain deadline.
    assert pod["terminationGracePeriodSeconds"] >= float(config["COST_WORKER_SHUTDOWN_GRACE"]) + 15

    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {"/tmp", config["COST_WORKER_SECRETS_DIR"], "/etc/cost-worker/ca"}
    assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp"), "secrets and CAs read-only"

    resources = container["resources"]
    assert set(resources["requests"]) >= {"cpu", "memory"}
    assert set(resources["limits"]) >= {"cpu", "memory"}
    assert pod["topologySpreadConstraints"], "replicas spread over nodes and zones"
    for constraint in pod["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"]["matchLabels"], pod_labels(deployment))


SECRET_WORDS = re.compile(r"PASSWORD|DATABASE_URL|SECRET|TOKEN|KEY", re.IGNORECASE)


def volume(doc: Doc, mount_path: str) -> Doc:
    """The volume a workload's only container mounts at ``mount_path``."""
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (name,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    found: list[Doc] = [v for v in pod["volumes"] if v["name"] == name]
    assert len(found) == 1, f"one volume {name}"
    return found[0]


def projected_items(doc: Doc, mount_path: str, kind: str) -> dict[str, tuple[str, str]]:
    """File name -> (source object, key) of the projected volume mounted at ``mount_path``."""
    files = {}
    for source in volume(doc, mount_path)["projected"]["sources"]:
        assert set(source) == {kind}, f"{mount_path}: only {kind} sources expected, got {set(source)}"
        for item in source[kind]["items"]:
            files[item["path"]] = (source[kind]["name"], item["key"])
    return files


def container_env(doc: Doc) -> dict[str, Doc]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return {env["name"]: env for env in container.get("env", [])}


# Every workload -> the secret files it gets: file (= setting) -> (Secret, key).
KAFKA_FILES = {
    "COST_WORKER_KAFKA_SASL_USERNAME": ("cost-worker-kafka", "username"),
    "COST_WORKER_KAFKA_SASL_PASSWORD": ("cost-worker-kafka", "password"),
}
SECRET_FILES = {
    ("Deployment", "cost-worker"): {"COST_WORKER_DATABASE_URL": ("cost-worker-db-writer", "url"), **KAFKA_FILES},
    ("Job", "cost-worker-migrate"): {"COST_WORKER_DATABASE_URL": ("cost-worker-db-owner", "url")},
    ("Deployment", "cost-worker-notify"): {
        "COST_WORKER_DATABASE_URL": ("cost-worker-db-writer", "url"),
        **KAFKA_FILES,
        "COST_WORKER_NOTIFY_SECRETS_KEY": ("cost-worker-notify", "secrets-key"),
    },
    ("Deployment", "cost-collector"): {"COST_WORKER_DATABASE_URL": ("cost-worker-db-collector", "url"), **KAFKA_FILES},
}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_secrets_are_files_writer_for_worker_owner_for_migrations(
    rendered: dict[str, Rendered], kustomization: str
) -> None:
    output = rendered[kustomization]
    config = config_env(output)
    assert not [key for key in config if SECRET_WORDS.search(key) and key != "COST_WORKER_SECRETS_DIR"], (
        "secret-like key in the ConfigMap"
    )
    workloads = {(d["kind"], d["metadata"]["name"]): d for d in output.docs if d["kind"] in {"Deployment", "Job"}}
    assert set(workloads) == set(SECRET_FILES)
    secrets_dir = config["COST_WORKER_SECRETS_DIR"]
    job_doc = workloads["Job", "cost-worker-migrate"]
    assert container_env(job_doc)["COST_WORKER_SECRETS_DIR"]["value"] == secrets_dir
    settings = {env_name(field) for field in Settings.model_fields}
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for key, doc in workloads.items():
        # No Secret in any environment: only files, named like the setting they hold (pydantic-settings'
        # secrets_dir reads them), in the directory COST_WORKER_SECRETS_DIR names.
        for env in container_env(doc).values():
            assert "secretKeyRef" not in env.get("valueFrom", {}), (
                f"{key}: {env['name']} is a secret in the environment"
            )
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        assert all("secretRef" not in source for source in container.get("envFrom", []))
        if key[0] == "Deployment":
            (source,) = container["envFrom"]  # the settings ConfigMap (COST_WORKER_SECRETS_DIR among them)
            assert source["configMapRef"]["name"].startswith("cost-worker-config-")
        files = projected_items(doc, secrets_dir, "secret")
        assert files == SECRET_FILES[key], key
        assert set(files) <= settings
        # Every referenced Secret is documented with its keys.
        for name, secret_key in files.values():
            assert f"`{name}`" in readme, f"Secret {name} is not documented in deploy/README.md"
            assert f"`{secret_key}`" in readme, (
                f"key {secret_key} of Secret {name} is not documented in deploy/README.md"
            )
    (job_container,) = job_doc["spec"]["template"]["spec"]["containers"]
    assert job_container["args"] == ["migrate"]
    owners = {key for key, files in SECRET_FILES.items() if "owner" in files["COST_WORKER_DATABASE_URL"][0]}
    assert owners == {("Job", "cost-worker-migrate")}, "only the migration Job gets the owner login"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ca_bundles_are_mounted_where_the_settings_look(rendered: dict[str, Rendered], kustomization: str) -> None:
    """sslmode=verify-full as documented needs the PostgreSQL CA (PGSSLROOTCERT); SSL to Kafka needs its CA. Every
    Deployment reads both paths from the shared ConfigMap, so every one mounts both."""
    output = rendered[kustomization]
    config = config_env(output)
    job_doc = output.one("Job", "cost-worker-migrate")
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "sslmode=verify-full" in readme
    wanted = [
        *((doc, [config["PGSSLROOTCERT"], config["COST_WORKER_KAFKA_SSL_CAFILE"]]) for doc in output.all("Deployment")),
        (job_doc, [container_env(job_doc)["PGSSLROOTCERT"]["value"]]),
    ]
    assert len(wanted) == 4
    for doc, paths in wanted:
        for path in paths:
            mount, _, file_name = path.rpartition("/")
            items = projected_items(doc, mount, "configMap")
            assert file_name in items, f"{doc['kind']} {doc['metadata']['name']}: {path} is not in the CA volume"
            name, key = items[file_name]
            assert f"`{name}`" in readme, f"ConfigMap {name} is not documented in deploy/README.md"
            assert f"`{key}`" in readme, f"key {key} of {name} is not documented in deploy/README.md"
    assert config["COST_WORKER_KAFKA_SECURITY_PROTOCOL"].endswith("SSL")


def kafka_ports(output: Rendered) -> set[int]:
    brokers = config_env(output)["COST_WORKER_KAFKA_BOOTSTRAP_SERVERS"].split(",")
    return {int(broker.rsplit(":", 1)[1]) for broker in brokers}


def egress_ports(policy: Doc) -> set[int]:
    return {p["port"] for rule in policy["egress"] for p in rule["ports"]}


def scraped_from_monitoring_only(policy: Doc) -> bool:
    (ingress,) = policy["ingress"]
    peers = [peer["namespaceSelector"]["matchLabels"] for peer in ingress["from"]]
    return ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}] and peers == [
        {"kubernetes.io/metadata.name": "monitoring"}
    ]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_service_pdb_networkpolicy_select_the_right_pods(rendered: dict[str, Rendered], kustomization: str) -> None:
    output = rendered[kustomization]
    worker = pod_labels(output.one("Deployment", "cost-worker"))
    migrate = pod_labels(output.one("Job", "cost-worker-migrate"))
    service = output.one("Service", "cost-worker")
    assert selects(service["spec"]["selector"], worker)
    assert not selects(service["spec"]["selector"], migrate)
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("metrics", "metrics")]
    monitor = output.one("ServiceMonitor", "cost-worker")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    pdb = output.one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], worker)
    assert not selects(pdb["spec"]["selector"]["matchLabels"], migrate)

    policies = {p["metadata"]["name"]: p for p in output.all("NetworkPolicy")}
    worker_policy = policies["cost-worker"]["spec"]
    assert selects(worker_policy["podSelector"]["matchLabels"], worker)
    assert sorted(worker_policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = worker_policy["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert [peer["namespaceSelector"]["matchLabels"] for peer in ingress["from"]] == [
        {"kubernetes.io/metadata.name": "monitoring"}
    ]
    assert egress_ports(worker_policy) == {53, 5432} | kafka_ports(output)
    migrate_policy = policies["cost-worker-migrate"]["spec"]
    assert selects(migrate_policy["podSelector"]["matchLabels"], migrate)
    assert "ingress" not in migrate_policy
    assert "Ingress" in migrate_policy["policyTypes"]
    assert {p["port"] for rule in migrate_policy["egress"] for p in rule["ports"]} == {53, 5432}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_notify_pods_are_hardened_scraped_and_reach_only_public_https(
    rendered: dict[str, Rendered], kustomization: str
) -> None:
    output = rendered[kustomization]
    deployment = output.one("Deployment", "cost-worker-notify")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    labels = pod_labels(deployment)
    assert container["args"] == ["notify", "run"]
    assert deployment["spec"]["replicas"] >= 2  # two dispatchers: one down delays nothing
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] >= float(config_env(output)["COST_WORKER_SHUTDOWN_GRACE"]) + 15
    refs = projected_items(deployment, config_env(output)["COST_WORKER_SECRETS_DIR"], "secret")
    assert refs["COST_WORKER_NOTIFY_SECRETS_KEY"] == ("cost-worker-notify", "secrets-key")
    assert "writer" in refs["COST_WORKER_DATABASE_URL"][0]
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "`cost-worker-notify`" in readme
    assert "`secrets-key`" in readme
    # The worker's Service, PDB and scaling do not pick up notify pods; notify's own Service does.
    assert not selects(output.one("Service", "cost-worker")["spec"]["selector"], labels)
    assert not selects(output.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert selects(output.one("Service", "cost-worker-notify")["spec"]["selector"], labels)
    monitor = output.one("ServiceMonitor", "cost-worker-notify")
    assert selects(
        monitor["spec"]["selector"]["matchLabels"], output.one("Service", "cost-worker-notify")["metadata"]["labels"]
    )
    policy = {p["metadata"]["name"]: p for p in output.all("NetworkPolicy")}["cost-worker-notify"]["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels)
    assert scraped_from_monitoring_only(policy)
    assert egress_ports(policy) == {53, 5432, 443} | kafka_ports(output)  # DNS, database, brokers, receivers
    (https,) = [rule for rule in policy["egress"] if {p["port"] for p in rule["ports"]} == {443}]
    (block,) = https["to"]
    assert block["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(block["ipBlock"]["except"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_scaling_never_exceeds_the_partition_count(rendered: dict[str, Rendered], kustomization: str) -> None:
    output = rendered[kustomization]
    scaled = output.one("ScaledObject")
    partitions = int(scaled["metadata"]["annotations"]["cost-worker/input-topic-partitions"])
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    assert spec["scaleTargetRef"]["name"] == output.one("Deployment", "cost-worker")["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert metric_names(trigger["metadata"]["query"]) == {"cost_worker_consumer_lag_messages"}
    # A drain takes one replica at a time and, at the minimum replica count, still leaves one consuming.
    assert output.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert spec["minReplicaCount"] >= 2


# Each component's ServiceMonitor (and Service, of the same name) -> the `job` label its targets get, from the
# Service's cost-worker/job label (the ServiceMonitor's jobLabel), so a namePrefix does not change it. The rule
# group watching a component is named like its job.
SCRAPE_JOBS = {
    "cost-worker": "cost-worker",
    "cost-worker-notify": "cost-worker-notify",
    "cost-collector": "cost-collector",
}


def scrape_jobs(output: Rendered, prefix: str = "") -> dict[str, str]:
    """ServiceMonitor name (without ``prefix``) -> the job label Prometheus gives the targets it scrapes."""
    jobs = {}
    for monitor in output.all("ServiceMonitor"):
        service = output.one("Service", monitor["metadata"]["name"])
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        for other in output.all("Service"):
            if other is not service:
                assert not selects(monitor["spec"]["selector"]["matchLabels"], other["metadata"]["labels"])
        jobs[monitor["metadata"]["name"].removeprefix(prefix)] = service["metadata"]["labels"][
            monitor["spec"]["jobLabel"]
        ]
    return jobs


def check_queries_follow_the_deployment(output: Rendered, prefix: str = "") -> None:
    """No namespace written into the alert rules; the KEDA query names the namespace deployed to. Every process
    exports the whole registry, so each rule group selects every series by its own component's job (the label
    the ServiceMonitor takes from the Service), and the KEDA query by the worker's: no other job matcher."""
    namespace = output.one("Deployment", prefix + "cost-worker")["metadata"]["namespace"]
    assert {doc["metadata"].get("namespace") for doc in output.docs if doc["kind"] != "Namespace"} == {namespace}
    jobs = scrape_jobs(output, prefix)
    assert jobs == SCRAPE_JOBS, "one job per component, whatever the prefix"
    groups = output.one("PrometheusRule")["spec"]["groups"]
    assert {group["name"] for group in groups} == set(jobs.values()), "one rule group per component, named by its job"
    for group in groups:
        for rule in group["rules"]:
            expr = rule["expr"]
            assert label_values(expr, "namespace") == [], f"a namespace in {rule['alert']}"
            for selector in selectors(expr):
                matchers = [(m.op, m.value) for m in selector.matchers.matchers if m.name == "job"]
                assert matchers == [(promql_parser.MatchOp.Equal, group["name"])], (
                    f"{rule['alert']}: {selector} must select job {group['name']!r} only"
                )
    query = output.one("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    assert label_values(query, "namespace") == [namespace]
    assert label_values(query, "job") == [jobs["cost-worker"]]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_queries_follow_the_namespace_deployed_to(rendered: dict[str, Rendered], kustomization: str) -> None:
    check_queries_follow_the_deployment(rendered[kustomization])


def test_a_second_environment_needs_no_query_edits(production: Rendered, tmp_path: Path) -> None:
    """A copy of the production overlay with another namespace and a name prefix: every query still fits."""
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("tools", "prometheus"))
    staging = tmp_path / "deploy" / "overlays" / "staging"
    shutil.copytree(DEPLOY / "overlays" / "production", staging)
    for path in staging.glob("*.yaml"):
        text = path.read_text(encoding="utf-8").replace("namespace: cost-worker", "namespace: cost-staging")
        path.write_text(
            text.replace("  name: cost-worker\n", "  name: cost-staging\n", 1)
            if path.name == "namespace.yaml"
            else text
        )
    kustomization = staging / "kustomization.yaml"
    kustomization.write_text("namePrefix: staging-\n" + kustomization.read_text(encoding="utf-8"), encoding="utf-8")
    kubectl = require_tool("kubectl", path=True)
    result = run([kubectl, "kustomize", str(staging)])
    assert result.returncode == 0, result.stderr
    output = Rendered("staging", staging, [doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert output.one("Deployment", "staging-cost-worker")["metadata"]["namespace"] == "cost-staging"
    check_queries_follow_the_deployment(output, "staging-")
    assert output.one("PrometheusRule")["spec"] == production.one("PrometheusRule")["spec"], "rules unchanged"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_dashboard_ships_as_a_configmap_for_grafanas_sidecar(
    rendered: dict[str, Rendered], kustomization: str
) -> None:
    (config_map,) = [d for d in rendered[kustomization].all("ConfigMap") if "cost-worker.json" in d.get("data", {})]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(config_map["data"]["cost-worker.json"])
    assert shipped == json.loads((DEPLOY / "grafana" / "cost-worker.json").read_text(encoding="utf-8"))


# --- PromQL against the worker's metrics ------------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_series() -> set[str]:
    """Every series name the worker's metrics (worker/metrics.py) can expose."""
    names: set[str] = set()
    for value in vars(worker_metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def metric_names(expr: str) -> set[str]:
    names = set()
    for selector in selectors(expr):
        fixed = [
            m.value for m in selector.matchers.matchers if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal
        ]
        name = selector.name or (fixed[0] if fixed else None)
        assert name, f"a selector without a fixed metric name cannot be checked: {selector} in {expr}"
        names.add(name)
    return names


def label_values(expr: str, label: str) -> list[str]:
    return [m.value for s in selectors(expr) for m in s.matchers.matchers if m.name == label]


def test_metric_name_extraction_is_not_vacuous() -> None:
    assert "cost_worker_batch_duration_seconds_bucket" in exported_series()
    assert "cost_worker_ready_bucket" not in exported_series()
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="1"}[5m]))) / on() group_left b and absent(c)'
    assert metric_names(expr) == {"a_bucket", "b", "c"}
    assert metric_names('{__name__="d", job="x"}') == {"d"}


def alerting_rules(output: Rendered) -> list[Doc]:
    return [rule for group in output.one("PrometheusRule")["spec"]["groups"] for rule in group["rules"]]


def test_alert_rules_use_only_exported_metrics(production: Rendered) -> None:
    allowed = exported_series() | {"up"}
    for rule in alerting_rules(production):
        unknown = metric_names(rule["expr"]) - allowed
        assert not unknown, f"{rule['alert']} uses metrics the worker does not export: {sorted(unknown)}"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_severity_summary_description_and_a_runbook_section(production: Rendered) -> None:
    rules = alerting_rules(production)
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    anchors = {github_anchor(m) for m in re.findall(r"^#+ (.+)$", readme, re.MULTILINE)}
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"], rule["alert"]
        assert len(annotations["description"]) > 40, rule["alert"]
        url, _, anchor = annotations["runbook_url"].partition("#")
        assert url.endswith("/deploy/README.md"), annotations["runbook_url"]
        assert anchor == rule["alert"].lower(), annotations["runbook_url"]
        assert anchor in anchors, f"no section for {rule['alert']} in deploy/README.md"


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", venv=False, path=True)


@pytest.fixture
def rules_dir(production: Rendered, tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file, next to the promtool unit tests."""
    groups = production.one("PrometheusRule")["spec"]["groups"]
    (tmp_path / RULES_FILE).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    for test_file in (DEPLOY / "prometheus" / "tests").glob("*.yaml"):
        shutil.copy(test_file, tmp_path / test_file.name)
    return tmp_path


def test_promtool_check_rules(promtool: str, rules_dir: Path) -> None:
    result = run([promtool, "check", "rules", RULES_FILE], cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests(promtool: str, rules_dir: Path) -> None:
    test_files = sorted(p.name for p in rules_dir.glob("*.test.yaml"))
    assert test_files
    result = run([promtool, "test", "rules", *test_files], cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_shown_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test_file in (DEPLOY / "prometheus" / "tests").glob("*.test.yaml"):
        document = yaml.safe_load(test_file.read_text(encoding="utf-8"))
        assert document["rule_files"] == [RULES_FILE]
        for case in document["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == EXPECTED_ALERTS, f"no firing case for {sorted(EXPECTED_ALERTS - firing)}"
    assert quiet == EXPECTED_ALERTS, f"no quiet case for {sorted(EXPECTED_ALERTS - quiet)}"


# --- Grafana dashboard ------------------------------------------------------------------------------------

GRAFANA_VARIABLES = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "cost-worker.json").read_text(encoding="utf-8"))

    def panels(items: list[Doc]) -> Iterator[Doc]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    queries = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"unexpected variable query {query}"
            queries.append(match.group(1))
    return queries


def as_promql(query: str) -> str:
    """Grafana's variables replaced by values of the right kind, so Prometheus' grammar applies."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return "5m" if name.startswith("__") and name.endswith(("interval", "range")) else "x"

    return GRAFANA_VARIABLES.sub(value, query)


def test_dashboard_queries_use_only_exported_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 30
    allowed = exported_series() | {"up"}
    used: set[str] = set()
    for query in queries:
        names = metric_names(as_promql(query))
        assert names, f"query without a metric: {query}"
        assert not names - allowed, f"{query} uses metrics the worker does not export: {sorted(names - allowed)}"
        used |= names
    must_show = {
        "cost_worker_messages_total",
        "cost_worker_consumer_lag_messages",
        "cost_worker_batch_duration_seconds_bucket",
        "cost_worker_quarantined_total",
        "cost_worker_alerts_raised_total",
        "cost_worker_outbox_backlog_messages",
        "cost_worker_outbox_oldest_age_seconds",
        "cost_worker_database_retries_total",
        "cost_worker_ready",
    }
    assert must_show <= used, f"dashboard lacks {sorted(must_show - used)}"
    assert any("histogram_quantile" in q and "cost_worker_batch_duration_seconds_bucket" in q for q in queries)


def test_dashboard_queries_select_each_components_job() -> None:
    """Every process exports the whole registry: a panel of the worker selects the worker's job, a panel of the
    collector the collector's (its cost_worker_collect_* series), or notify and standby pods would count too."""
    for query in dashboard_queries():
        for selector in selectors(as_promql(query)):
            name = selector.name or ""
            job = SCRAPE_JOBS["cost-collector" if name.startswith("cost_worker_collect_") else "cost-worker"]
            matchers = [(m.op, m.value) for m in selector.matchers.matchers if m.name == "job"]
            assert matchers == [(promql_parser.MatchOp.Equal, job)], f"{query}: {selector} must select job {job!r}"


def test_dashboard_and_keda_queries_parse_with_prometheus(promtool: str, production: Rendered, tmp_path: Path) -> None:
    """promtool parses every query (as a recording rule), so Prometheus' own grammar judges them."""
    queries = [as_promql(q) for q in dashboard_queries()]
    queries.append(production.one("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"])
    rules = [{"record": f"cost_worker_deploy_check:query{i}", "expr": q} for i, q in enumerate(queries)]
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}), "utf-8")
    result = run([promtool, "check", "rules", "queries.yaml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the collector (issue 14) -------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_collector_pod_spec_secrets_and_egress(rendered: dict[str, Rendered], kustomization: str) -> None:
    output = rendered[kustomization]
    deployment = output.one("Deployment", "cost-collector")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["collect"]
    assert deployment["spec"]["replicas"] >= 2, "a standby takes over the poller lock"
    env = {e["name"]: e for e in container["env"]}
    assert env["COST_WORKER_DATABASE_ROLE"]["value"] == "cost_worker_collector"
    refs = projected_items(deployment, config_env(output)["COST_WORKER_SECRETS_DIR"], "secret")
    assert refs["COST_WORKER_DATABASE_URL"] == ("cost-worker-db-collector", "url")
    assert "COST_WORKER_KAFKA_SASL_PASSWORD" in refs
    # The key-encryption key is a mounted Secret file, read-only; the env var holds only its path.
    kek_path = env["COST_WORKER_COLLECT_KEY_ENCRYPTION_KEY_FILE"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kek"]
    assert mount["readOnly"] is True
    assert kek_path.startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kek"]
    assert volume["secret"]["secretName"] == "cost-collector-kek"
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for documented in ("`cost-worker-db-collector`", "`cost-collector-kek`", "`kek`"):
        assert documented in readme
    assert {p: container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")} == {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Scraped as job cost-collector (the alert rules' job), and only the collector may reach the providers.
    service = output.one("Service", "cost-collector")
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    assert not selects(service["spec"]["selector"], pod_labels(output.one("Deployment", "cost-worker")))
    monitor = output.one("ServiceMonitor", "cost-collector")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    policies = {p["metadata"]["name"]: p["spec"] for p in output.all("NetworkPolicy")}
    assert selects(policies["cost-collector"]["podSelector"]["matchLabels"], pod_labels(deployment))
    assert scraped_from_monitoring_only(policies["cost-collector"])
    assert egress_ports(policies["cost-collector"]) == {53, 5432, 443} | kafka_ports(output)  # + the providers
    assert 443 not in egress_ports(policies["cost-worker"])
