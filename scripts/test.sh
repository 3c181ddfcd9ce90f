#!/usr/bin/env bash
# Set up everything the tests need (venv, Chromium for the browser test) and run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k ingest
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true

scripts/setup.sh test
if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing Debian's chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "==> lint"
.venv/bin/ruff check .
echo "==> tests"
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
