#!/usr/bin/env bash
# The whole product on embedded defaults: install, import the model, build and ingest the demo set,
# then serve the API + web page at http://127.0.0.1:${PORT:-3000} (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true
PORT="${PORT:-3000}"
DEMO_DIR="${DEMO_DIR:-demo-data/images}"

scripts/setup.sh demo
echo "==> importing the embedding model into the BentoML model store"
.venv/bin/python -m models import
echo "==> building the demo image set in $DEMO_DIR"
.venv/bin/python -m ingest.demo "$DEMO_DIR"
echo "==> ingesting (safe to rerun: already-present images are skipped)"
.venv/bin/python -m ingest "$DEMO_DIR"
echo "==> serving on http://127.0.0.1:$PORT  (web page: /, API docs: /docs)"
exec .venv/bin/bentoml serve service:ImageSearch --host 127.0.0.1 --port "$PORT"
