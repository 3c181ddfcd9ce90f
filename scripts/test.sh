#!/usr/bin/env bash
# Set up everything the tests need (venv, Chromium for the browser test) and run the whole suite.
# Extra arguments go to one plain pytest run instead, e.g. scripts/test.sh -k ingest
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true

scripts/setup.sh test
# checkov (Kubernetes manifest security checks) pins networkx<2.7, which clashes with scikit-image:
# it lives in its own venv; tests/test_k8s_security.py finds it at .venv-checkov/bin/checkov.
if [ ! -x .venv-checkov/bin/checkov ]; then
  echo "==> installing checkov into .venv-checkov"
  "${PYTHON:-python3.11}" -m venv .venv-checkov 2>/dev/null || python3 -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install --quiet checkov==3.3.30
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing Debian's chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "==> installing Debian's prometheus for promtool (the alerts' unit tests)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
echo "==> lint"
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -ra --durations=15 "$@"
fi
# The fast tier (no server, ~2-3 min) in a random order: every test stands alone. Then the tests that
# start servers, in file order (their shared session-scoped servers start once that way).
echo "==> fast tests, random order"
.venv/bin/python -m pytest -ra -m "not slow and not container" -p random_order --random-order-bucket=global --durations=10
echo "==> slow tests (real Milvus, S3, bentoml serve, Chromium)"
.venv/bin/python -m pytest -ra -m "slow and not container" --durations=15
# Faults under load, short (~5 min): each dependency killed and restarted while an ingest, searches and
# inserts run; exits 1 if an acknowledged write is lost, a 500 answers, or something never recovers.
echo "==> faults under load (bench/fault_load.py --quick)"
.venv/bin/python bench/fault_load.py --quick
# The image built here with podman and run as deployed (~1 min warm, ~6 min on a fresh machine).
echo "==> container: build the image, run it as the manifests deploy it"
exec scripts/container-test.sh
