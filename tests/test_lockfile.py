"""Reproducible builds: uv.lock matches pyproject.toml, the hash-pinned exports match uv.lock, `make`, CI and the
image install only from them, the SBOM lists exactly what the image installs, and the image carries OCI labels.

`make lock` regenerates uv.lock, requirements/*.txt and the SBOM after a dependency change."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements"
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
# The exports `make lock` writes (file -> `uv export` arguments); the Makefile must say the same.
EXPORTS = {
    "runtime.txt": ["--no-default-groups"],
    "build.txt": ["--only-group", "build"],
    "dev.txt": ["--no-default-groups", "--group", "build", "--extra", "dev", "--extra", "deploy"],
    "bench.txt": ["--no-default-groups", "--group", "build", "--extra", "dev", "--extra", "deploy", "--extra", "bench"],
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)(?: ; ([^\\]+))?")


def uv(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    if UV is None:
        pytest.fail("uv is not installed: it is in the dev extra (make install)")
    return subprocess.run([UV, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def pins(path: Path, *, here: bool = False) -> dict[str, str]:
    """name -> version of every pin; with ``here``, only those whose marker holds on this machine."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match and not (here and match[3] and not Marker(match[3].strip()).evaluate()):
            found[canonical(match[1])] = match[2]
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_matches_pyproject() -> None:
    result = uv("lock", "--check", "--offline")
    assert result.returncode == 0, f"uv.lock is stale: run `make lock`\n{result.stderr}"


def test_a_dependency_added_to_pyproject_makes_the_check_fail(tmp_path: Path) -> None:
    shutil.copy(REPO / "uv.lock", tmp_path / "uv.lock")
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(
        text.replace("dependencies = [\n", 'dependencies = [\n    "six>=1.0",\n', 1), encoding="utf-8"
    )
    result = uv("lock", "--check", "--offline", cwd=tmp_path)
    assert result.returncode != 0
    # With uv's cache it says the lock needs updating; with an empty cache (a clean CI machine) offline
    # resolution of the new requirement fails. Either way the check fails.
    assert "needs to be updated" in result.stderr or "unsatisfiable" in result.stderr, result.stderr


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_the_hash_pinned_exports_match_the_lock(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    result = uv("export", "--quiet", "--frozen", "--no-emit-project", *EXPORTS[name], "-o", str(out))
    assert result.returncode == 0, result.stderr
    body = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    committed = [line for line in (REQUIREMENTS / name).read_text().splitlines() if not line.startswith("#")]
    assert committed == body, f"requirements/{name} does not match uv.lock: run `make lock`"
    assert pins(REQUIREMENTS / name), name
    # Every pinned package carries at least one hash (pip --require-hashes enforces it at install time too).
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (REQUIREMENTS / name).read_text())
    assert all("--hash=sha256:" in block for block in blocks if PIN.match(block)), name
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert f"{' '.join(EXPORTS[name])} -o requirements/{name}" in makefile, f"`make lock` writes {name} differently"


def test_everything_installs_from_the_lock_only() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "pip install --quiet --require-hashes --no-deps -r requirements/dev.txt" in makefile
    assert "pip install --quiet --no-deps --no-build-isolation -e ." in makefile
    assert re.search(r"^LOCKED := pyproject.toml requirements/dev.txt$", makefile, re.MULTILINE), "stamp"
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test"), "CI runs make test, which installs"
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs, "the Dockerfile installs something"
    for line in installs:
        assert "--require-hashes" in line or "--no-index" in line, f"unlocked install in the Dockerfile: {line}"
    assert "-r requirements/runtime.txt" in dockerfile
    assert "--no-build-isolation" in dockerfile
    # The dev export is the runtime export plus tools: the image runs the versions the tests ran.
    runtime, dev = pins(REQUIREMENTS / "runtime.txt"), pins(REQUIREMENTS / "dev.txt")
    assert {name: dev.get(name) for name in runtime} == runtime


def test_the_sbom_lists_exactly_the_packages_the_image_installs() -> None:
    sbom = json.loads((REQUIREMENTS / "sbom.cdx.json").read_text(encoding="utf-8"))
    assert sbom["bomFormat"] == "CycloneDX"
    assert "serialNumber" not in sbom, "reproducible: no random serial number (cyclonedx-py --output-reproducible)"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    root = sbom["metadata"]["component"]
    assert (root["name"], root["version"]) == (project["name"], project["version"])
    components = {canonical(c["name"]): c["version"] for c in sbom["components"]}
    assert components == pins(REQUIREMENTS / "runtime.txt"), "requirements/sbom.cdx.json is stale: run `make sbom`"
    for component in sbom["components"]:
        assert component["purl"] == f"pkg:pypi/{component['name']}@{component['version']}"
        hashes = [h for ref in component.get("externalReferences", []) for h in ref.get("hashes", [])]
        assert hashes, f"{component['name']}: no hashes in the SBOM"


def test_the_image_carries_oci_labels_and_its_sbom() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    labels = dict(re.findall(r"(org\.opencontainers\.image\.[a-z.]+)=\"([^\"]*)\"", dockerfile))
    assert set(labels) >= {
        "org.opencontainers.image.title",
        "org.opencontainers.image.description",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.created",
        "org.opencontainers.image.source",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.base.name",
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert re.search(rf"^ARG VERSION={re.escape(project['version'])}$", dockerfile, re.MULTILINE), "VERSION arg"
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]
    assert "cp requirements/sbom.cdx.json /opt/venv/share/cost-worker/sbom.cdx.json" in dockerfile


@pytest.mark.slow
def test_the_dockerfile_builder_step_installs_from_the_lock(tmp_path: Path) -> None:
    """No container runtime here, so run the builder stage's COPY and RUN outside Docker: the same commands,
    with /opt and /tmp under tmp_path. The wheel builds with the locked backend, the runtime installs hash-checked,
    and the result runs and carries the SBOM and the schema (compat.toml included). Needs PyPI (or pip's cache)."""
    text = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    builder = text[text.index("FROM base AS builder") : text.index("FROM base AS runtime")]
    src = tmp_path / "src"
    src.mkdir()
    for line in builder.splitlines():
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            for source in sources:
                destination = src / (Path(source).name if target == "./" else target)
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(REPO / source, destination)
    (run,) = [line for line in builder.splitlines() if line.startswith("RUN ")]
    command = run.removeprefix("RUN ").replace("/opt/", f"{tmp_path}/opt/").replace("/tmp/dist", f"{tmp_path}/dist")
    command = command.replace("python -m venv", f"{sys.executable} -m venv")
    result = subprocess.run(  # the Dockerfile's own command, run in a scratch directory
        command, shell=True, cwd=src, capture_output=True, text=True, timeout=900, check=False, executable="/bin/bash"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    venv = tmp_path / "opt" / "venv"
    assert (venv / "share" / "cost-worker" / "sbom.cdx.json").read_bytes() == (
        REQUIREMENTS / "sbom.cdx.json"
    ).read_bytes()
    assert not (venv / "bin" / "pip").exists(), "pip is removed from the shipped venv"
    freeze = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print('\\n'.join(sorted("
            "f\"{d.metadata['Name']}=={d.version}\" for d in m.distributions())))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    installed = {canonical(line.split("==")[0]): line.split("==")[1] for line in freeze}
    assert installed.pop("cost-worker") == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert installed == pins(REQUIREMENTS / "runtime.txt", here=True), "exactly the locked runtime packages"
    # The optional pieces import without setuptools (the tracing instrumentations), and compat.toml travels in
    # the wheel (worker/_schema), so the compatibility window works in the image.
    check = (
        "import opentelemetry.instrumentation.asyncpg, opentelemetry.instrumentation.aiokafka, worker.tracing\n"
        "from worker.migrate import load_migrations\n"
        "print(all(m.compat for m in load_migrations()))"
    )
    result = subprocess.run([str(venv / "bin" / "python"), "-c", check], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "True", result.stderr
