#!/usr/bin/env bash
# Build the CPU image (scripts/container.sh bentofile.cpu.yaml) and run it as deployed (tests/test_container.py): the API and the
# embedder as two containers and the ingest Job's pods, with the manifests' command, env, secrets and
# security context, against a real Milvus server and S3 server on this host. Prints image sizes and cold starts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/container.sh "${1:-bentofile.cpu.yaml}"  # the image the cpu overlay runs (no PyTorch)
# The podman settings container.sh wrote; and no skipping: a missing image here is a failure.
export CONTAINERS_CONF="${CONTAINER_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/ris-containers}/containers.conf"
export CONTAINER_TEST_REQUIRED=1
exec .venv/bin/python -m pytest -ra -s -m container tests/test_container.py -p no:random_order
