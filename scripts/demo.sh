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
if [ -z "${RIS_MILVUS_URI:-}" ] && [ -e "${RIS_DATA_DIR:-data}/milvus.db" ]; then
  # A collection from an earlier run, perhaps of another version whose default models or recipe differ (the
  # service refuses to mix embeddings): re-embedded in place from its stored originals, a no-op when it matches.
  echo "==> an earlier demo collection: bringing it to the serving models and recipe"
  .venv/bin/python -m ingest.reembed
fi
echo "==> ingesting (safe to rerun: already-present images are skipped)"
.venv/bin/python -m ingest "$DEMO_DIR"
echo "==> serving on http://127.0.0.1:$PORT  (web page: /, API docs: /docs)"
exec .venv/bin/bentoml serve service:ImageSearch --host 127.0.0.1 --port "$PORT"
