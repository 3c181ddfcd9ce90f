#!/usr/bin/env bash
# Build the product's container image for real, on a machine without Docker or registry access:
#   1. podman, runc and mmdebstrap from Debian (installed when missing);
#   2. the base image the bento's generated Dockerfile names (FROM python:3.11-slim), made from Debian
#      bookworm packages (Python 3.11) with mmdebstrap, since no registry image can be pulled here;
#   3. `bentoml build` of the bento (offline, with the model from a BentoML model store of its own);
#   4. `podman build` of the bento's own build context and generated Dockerfile, unchanged.
# Prints the image's name and size. Usage: scripts/container.sh [bentofile.yaml|bentofile.cpu.yaml]
# bentofile.cpu.yaml (the CPU image, no PyTorch) first converts the model to OpenVINO here, checked against
# PyTorch fp32 on the demo photos (`python -m models export-openvino`), and packages that.
#
# Where this machine has local wheel mirrors (/opt/pypi-more, /opt/pypi: torch's CUDA build and its
# nvidia-* wheels), they are mounted into the build and named to uv by the stand-in base image, so the
# image's `uv pip install` takes them from disk (everything else comes from PyPI). A registry's
# python:3.11-slim carries no such settings.
set -euo pipefail
cd "$(dirname "$0")/.."
BENTOFILE=${1:-bentofile.yaml}
WORK=${CONTAINER_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/ris-containers}  # outside the tree bentoml build reads
BASE=localhost/python:3.11-slim
mkdir -p "$WORK"
export BENTOML_HOME="$WORK/bentoml" BENTOML_DO_NOT_TRACK=true

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=""
for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
if [ -n "$missing" ]; then
  echo "==> installing$missing from Debian"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null
fi

# The sandbox refuses crun's cgroup handling and the default rlimits: runc, cgroupfs, no default ulimits.
cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

mounts=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
indexes=""
for mirror in /opt/pypi-more /opt/pypi; do
  if [ -d "$mirror/simple" ]; then
    mounts+=(-v "$mirror:$mirror:ro")
    indexes="$indexes file://$mirror/simple"
  fi
done
indexes=${indexes# }

if ! podman image exists "$BASE"; then
  echo "==> base image $BASE from Debian bookworm (mmdebstrap)"
  if [ ! -f "$WORK/base.tar" ]; then  # written under another name first: an interrupted run leaves none
    $SUDO mmdebstrap --quiet --mode=root --variant=minbase --format=tar \
      --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$WORK/base.tar.part"
    $SUDO chown "$(id -u):$(id -g)" "$WORK/base.tar.part" && mv "$WORK/base.tar.part" "$WORK/base.tar"
  fi
  # Debian's pip refuses to install into the system Python (PEP 668) unless told; the Dockerfile installs
  # uv that way, as it would into the official image's /usr/local Python.
  changes=(--change "ENV PIP_BREAK_SYSTEM_PACKAGES=1" --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
           --change "ENV UV_NATIVE_TLS=1" --change "ENV UV_SYSTEM_CERTS=1" --change 'CMD ["python3"]')
  # The mirrors hold some packages at other versions than the pins: uv may take each from any index.
  [ -n "$indexes" ] && changes+=(--change "ENV UV_EXTRA_INDEX_URL=\"$indexes\"" --change "ENV UV_INDEX_STRATEGY=unsafe-best-match")
  podman import "${changes[@]}" "$WORK/base.tar" "$BASE" >/dev/null
fi

echo "==> bento ($BENTOFILE)"
.venv/bin/python -m models import --model efficientnet-lite0 >/dev/null
if grep -q -- '-openvino:' "$BENTOFILE"; then
  echo "==> OpenVINO model for the image without PyTorch (converted and checked against PyTorch fp32)"
  [ -d "$WORK/fidelity-photos" ] || .venv/bin/python -m ingest.demo "$WORK/fidelity-photos" --variants 0 >/dev/null
  .venv/bin/python -m models export-openvino --model efficientnet-lite0 --fidelity-images "$WORK/fidelity-photos" >/dev/null
fi
tag=$(.venv/bin/bentoml build -f "$BENTOFILE" -o tag . | tail -1 | sed 's/^__tag__://')
name=${tag%%:*}
version=${tag#*:}
# The build context is the exported bento, as `bentoml containerize` makes it: in the local bento store a
# bento only refers to its model, the export carries the weights (models/) beside the code.
bento_dir="$WORK/context/$name-$version"
rm -rf "$WORK/context" && mkdir -p "$bento_dir"
.venv/bin/bentoml export "$tag" "$WORK/context/bento.tar" >/dev/null
tar -xf "$WORK/context/bento.tar" -C "$bento_dir" && rm "$WORK/context/bento.tar"
[ -d "$bento_dir/models" ] || { echo "the exported bento has no models/" >&2; exit 1; }

echo "==> podman build $name:$version"
started=$(date +%s)
podman build --pull=never --network host "${mounts[@]}" -f "$bento_dir/env/docker/Dockerfile" \
  -t "localhost/$name:$version" -t "localhost/$name:latest" "$bento_dir"
echo "==> built localhost/$name:$version in $(( $(date +%s) - started )) s"
podman image inspect "localhost/$name:$version" --format '{{.Size}}' | awk '{printf "==> image size: %.2f GB\n", $1 / 1e9}'
