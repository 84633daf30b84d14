#!/usr/bin/env bash
# hack/helm.sh: Helm (the real v4 engine, as the Python library helm-python-sdk) without a helm
# binary. The first run creates a virtualenv in .build/helm-venv and installs the pinned
# package into it through pip; later runs reuse it. Usage: see hack/helm.py.
#   hack/helm.sh lint deploy/helm/workerpool-operator --strict
#   hack/helm.sh template deploy/helm/workerpool-operator --name workerpool-operator -n workerpool-system
# Environment: HELM_VENV (default <repo>/.build/helm-venv), PYTHON (default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HELM_VENV:-$ROOT/.build/helm-venv}
SDK_VERSION=0.2.2

ensure_venv() {
  [ -f "$VENV/.helm-python-sdk-$SDK_VERSION" ] && return 0
  mkdir -p "$(dirname "$VENV")"
  (
    flock 9
    [ -f "$VENV/.helm-python-sdk-$SDK_VERSION" ] && exit 0
    echo "[helm] installing helm-python-sdk==$SDK_VERSION into $VENV (once)" >&2
    py=${PYTHON:-python3}
    if ! "$py" -m venv "$VENV" >&2; then
      # Debian's python3 needs python3-venv for this
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[helm] installing python3-venv" >&2
        rm -rf "$VENV"
        { apt-get install -y -q python3-venv >&2 || { apt-get update -q >&2 && apt-get install -y -q python3-venv >&2; }; } &&
          "$py" -m venv "$VENV" >&2
      else
        false
      fi || { echo "[helm] cannot create a virtualenv with $py (Debian: apt-get install python3-venv)" >&2; exit 1; }
    fi
    "$VENV/bin/pip" install --quiet "helm-python-sdk==$SDK_VERSION" >&2
    "$VENV/bin/python" -c 'import helm_python as h; h.helm_sdk_version()' >&2
    touch "$VENV/.helm-python-sdk-$SDK_VERSION"
  ) 9>"$VENV.lock"
}

ensure_venv
exec "$VENV/bin/python" "$ROOT/hack/helm.py" "$@"
