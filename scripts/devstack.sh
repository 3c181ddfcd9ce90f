#!/usr/bin/env bash
# Deployment-like stack without Docker: real Milvus standalone + real S3 server on loopback (data in
# ./.stack), the demo set ingested into them, and the service at http://127.0.0.1:${PORT:-3000}.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true
scripts/setup.sh demo,server
exec .venv/bin/python scripts/devstack.py --port "${PORT:-3000}" "$@"
