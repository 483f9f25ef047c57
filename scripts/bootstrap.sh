#!/usr/bin/env bash
# Creates .venv and installs the project with its test and lint tools, plus the Debian
# packages the tests use that a fresh machine may lack. Safe to run again.
# Python packages come from requirements.lock only (exact versions, hashes checked); the
# project itself is installed on top without resolving anything. `make lock` upgrades the lock.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v redis-server >/dev/null || missing+=(redis-server)
# Headless Chromium and its driver take the operator-surface screenshots in the e2e tests.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# spin model-checks the submission protocol (make model-check); its verifiers are compiled with gcc.
command -v spin >/dev/null || missing+=(spin)
command -v gcc >/dev/null || missing+=(gcc)
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]} from Debian's packages"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# promtool checks the shipped alert rules (tests/test_metrics.py); it comes with Prometheus, whose
# recommended exporters are not wanted here, and whose server is never started.
if ! command -v promtool >/dev/null; then
    echo "bootstrap: installing prometheus (for promtool) from Debian's packages"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
    # Where systemd runs, the package starts its server: only the tool is wanted.
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q --require-hashes -r requirements.lock
.venv/bin/pip install -q --no-deps -e .
echo "bootstrap: .venv ready ($(.venv/bin/python --version))"
