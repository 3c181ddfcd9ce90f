#!/usr/bin/env bash
# bench/gpu_check.py on the lent GPU machine (the `device` tool), which starts bare, reaches no package
# index and has its own Python 3.12 with PyTorch, torchvision, numpy, Pillow, scikit-image, httpx, grpcio,
# pandas, pyarrow... but not BentoML, Milvus Lite, pymilvus, pydantic(-settings), FastAPI or MinIO.
#
#   bench/gpu_check.sh fetch     here, once: the ~50 wheels (cp312, ~30 MB) the GPU image lacks, at the
#                                versions of this checkout's .venv, into build/gpu-wheels (git-ignored)
#   bench/gpu_check.sh [ARGS]    there: install them into /tmp/ris-site (seconds, no venv, nothing
#                                compiled) and run `python3 bench/gpu_check.py ARGS`; the table goes to
#                                $OUT/gpu_check.md, stderr and the services' log beside it
#
# The device call: command `bash bench/gpu_check.sh`, carry ["build/gpu-wheels"], timeout_s 480.
# Where every package is already importable (a developer's venv: PYTHON=.venv/bin/python) nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=build/gpu-wheels

# The closure of the project's runtime dependencies minus what the GPU image ships
# (/work/.library/device/KINDS.md, "Python packages already there"); typing-extensions and certifi are
# carried too because pydantic and bentoml need newer ones than the image may hold.
PACKAGES="a2wsgi aiohttp-asgi-connector aiosqlite annotated-types argon2-cffi argon2-cffi-bindings asgiref
bentoml cachetools cattrs certifi cffi click-option-group contextlib2 faiss-cpu fastapi httpx-ws kantoku
milvus-lite minio opentelemetry-api opentelemetry-instrumentation opentelemetry-instrumentation-aiohttp-client
opentelemetry-instrumentation-asgi opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-util-http
orjson pip-requirements-parser pycparser pycryptodome pydantic pydantic-core pydantic-settings pymilvus
python-dotenv python-json-logger python-multipart pyzmq rich-toolkit schema simple-di starlette tenacity
tomli-w tornado typing-extensions typing-inspection uvicorn watchfiles wsproto"

if [ "${1:-}" = fetch ]; then
    python=${PYTHON:-.venv/bin/python}
    # shellcheck disable=SC2086
    specs=$("$python" -c 'import sys; from importlib.metadata import version; print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' $PACKAGES)
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    platforms=""
    for p in manylinux_2_{17,24,26,27,28,31,34,35}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=" --platform $p"
    done
    # shellcheck disable=SC2086
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $platforms -d "$WHEELS" $specs
    echo "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS (carry it)"
    exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/build/gpu-check-out}
WORK=${GPU_CHECK_WORKDIR:-/tmp/ris-gpu-check}
mkdir -p "$OUT"
if ! "$PY" -c 'import bentoml, fastapi, milvus_lite, minio, pydantic_settings, pymilvus' 2>/dev/null; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "bentoml & co. are not importable with $PY and $WHEELS holds no wheels:" >&2
        echo "run 'bench/gpu_check.sh fetch' where PyPI is reachable and carry $WHEELS" >&2
        exit 2
    fi
    started=$SECONDS
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ris-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/ris-site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed $(find "$WHEELS" -name '*.whl' | wc -l) wheels into /tmp/ris-site in $((SECONDS - started)) s"
fi
# The services are started from the repository root; bento/, models/ and service.py import from it.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"

set +e
"$PY" bench/gpu_check.py --workdir "$WORK" "$@" 2>"$OUT/stderr.log" | tee "$OUT/gpu_check.md"
rc=${PIPESTATUS[0]}
set -e
cp "$WORK/service.log" "$OUT/service.log" 2>/dev/null || true
if [ "$rc" -ne 0 ]; then
    echo "--- gpu_check.py exited $rc; last lines of $OUT/stderr.log:"
    tail -n 40 "$OUT/stderr.log"
fi
exit "$rc"
