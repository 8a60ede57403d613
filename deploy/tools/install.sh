#!/usr/bin/env bash
# Installs what tests/test_deploy.py runs. Called by `make deploy-tools` (part of `make test`).
#
#   install.sh venv DIR   the Python tools (requirements.txt) and a pinned kubectl into the venv DIR
#   install.sh promtool   promtool from Debian's `prometheus` package, unless promtool is already on PATH
#
# Nothing here ever fails silently: a tool that cannot be installed is reported, and the deploy tests then
# fail under `make test` with the same explanation.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"

install_venv() {
    local dir="$1"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    "$dir/bin/python" -m pip install --quiet -r "$here/requirements.txt"
    # kubectl (with its built-in kustomize) at a pinned version, so every machine renders the same way.
    "$dir/bin/python" "$here/fetch_kubectl.py" "$dir/bin"
}

install_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "deploy tools: installing promtool (Debian package prometheus)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        command -v promtool >/dev/null 2>&1 && return 0
    fi
    cat >&2 <<'MSG'
deploy tools: promtool is not on PATH and could not be installed here (needs apt-get as root).
  Debian/Ubuntu: sudo apt-get install --no-install-recommends prometheus
  elsewhere:     put promtool (Prometheus 2.42 or newer) on PATH
The promtool checks in tests/test_deploy.py fail under `make test` until then.
MSG
}

case "${1:-}" in
    venv) install_venv "${2:?usage: install.sh venv DIR}" ;;
    promtool) install_promtool ;;
    *) echo "usage: install.sh venv DIR | install.sh promtool" >&2; exit 2 ;;
esac
