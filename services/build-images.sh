#!/usr/bin/env bash
# Build the cluster's images from the repository root (what `make images` runs):
#
#   services/build-images.sh [orchestrator] [model-services]      (default: both)
#
# Settings (environment):
#   ENGINE               podman or docker (default: podman where present, else docker)
#   BASE_IMAGE           base of the model-services image (default: the Dockerfile's, NVIDIA's Triton image)
#   ORCH_BASE_IMAGE      base of the orchestrator image (default: the Dockerfile's, Ray's image)
#   TORCH_INDEX_URL      extra package index for torch in the model-services image (e.g. a CUDA build's)
#   IMAGE_PREFIX, IMAGE_TAG   image names: $IMAGE_PREFIX/funchat-orchestrator:$IMAGE_TAG, ...-model-services
#                        (default localhost, latest); each image is also tagged with the chart's
#                        appVersion (helm/funchat/Chart.yaml), the tag the chart uses by default
#   redis (a target, not in the default set): Debian's redis-server as $IMAGE_PREFIX/funchat-redis,
#                        for the chart's in-chart Redis where no registry is reachable
#   BUILD_ARGS           more arguments for the engine's build command
#
# pip inside the build: with podman, this machine's pip configuration goes in read-only, never into
# the image: every PIP_* variable is written to a file mounted at /run/pip-env/env (the Dockerfiles
# source it in the RUN that calls pip), with PIP_CERT pointing at a copy of pip's CA bundle there, and each pip configuration file `pip config debug` names,
# plus every existing local path those settings and variables refer to (find-links folders, file://
# indexes, constraint and certificate files), is mounted at the same path. docker's build has no
# mounts for RUN steps: there pip uses the image's defaults.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/services/containers.conf}

ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
command -v "$ENGINE" >/dev/null 2>&1 || { echo "neither podman nor docker is installed" >&2; exit 2; }
PREFIX=${IMAGE_PREFIX:-localhost}
TAG=${IMAGE_TAG:-latest}
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' helm/funchat/Chart.yaml)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(orchestrator model-services)

PIP_ARGS=()
PIP_TMP=""
if [ "$(basename "$ENGINE")" = podman ]; then
  PY=$(command -v python3 || true)
  [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
  PIP_TMP=$(mktemp -d /tmp/funchat-pip-env.XXXXXX)
  trap 'rm -rf "$PIP_TMP"' EXIT
  : > "$PIP_TMP/env"
  while IFS='=' read -r name value; do
    printf '%s=%q\n' "$name" "$value" >> "$PIP_TMP/env"
  done < <(env | grep -E '^PIP_[A-Z0-9_]+=' || true)
  # The CA bundle pip is told to use (it may hold this network's own CA): copied next to the env file,
  # since the image's own bundle lives at the same path (/etc/ssl/...) and apt rewrites it.
  cert=${PIP_CERT:-}
  if [ -z "$cert" ] && [ -n "$PY" ]; then
    cert=$("$PY" -m pip config get global.cert 2>/dev/null || true)
  fi
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    cp "$cert" "$PIP_TMP/cert.pem"
    echo "PIP_CERT=/run/pip-env/cert.pem" >> "$PIP_TMP/env"
  fi
  PIP_ARGS+=(-v "$PIP_TMP:/run/pip-env:ro")
  if [ -n "$PY" ] && "$PY" -m pip --version >/dev/null 2>&1; then
    # Files pip reads its configuration from, then every local path named in them or in PIP_*.
    mapfile -t paths < <(
      { "$PY" -m pip config debug 2>/dev/null | sed -n 's/^ *\(\/[^,]*\), exists: True$/\1/p'
        "$PY" -m pip config list 2>/dev/null | sed "s/^[^=]*='\(.*\)'$/\1/"
        env | sed -n 's/^PIP_[A-Z0-9_]*=//p'
      } | tr ' ' '\n' | sed 's#^file://##' | grep '^/' | sort -u)
    mounts=()
    for p in "${paths[@]}"; do
      [ -e "$p" ] || continue
      case "$p" in
        /etc/ssl/*) continue;;  # the CA bundle: copied above
        */simple|*/simple/) p=$(dirname "${p%/}");;    # a file:// index: its pages link to ../../files
      esac
      mounts+=("$p")
    done
    # each path once, and none inside another one already mounted
    prev=""
    while IFS= read -r p; do
      [ -n "$p" ] || continue
      if [ -n "$prev" ] && [[ "$p" == "$prev"/* || "$p" == "$prev" ]]; then continue; fi
      PIP_ARGS+=(-v "$p:$p:ro"); prev=$p
    done < <(printf '%s\n' "${mounts[@]}" | sort -u)
  fi
fi

build() {  # name dockerfile base-arg-value extra-args...
  local name=$1 file=$2 base=$3; shift 3
  local args=(build --network host -f "$file" -t "$PREFIX/funchat-$name:$TAG")
  [ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
  args+=("$@" "${PIP_ARGS[@]}")
  # shellcheck disable=SC2206
  [ -n "${BUILD_ARGS:-}" ] && args+=(${BUILD_ARGS})
  echo "+ $ENGINE ${args[*]} ."
  local t0=$SECONDS
  "$ENGINE" "${args[@]}" .
  echo "built $PREFIX/funchat-$name:$TAG in $((SECONDS - t0)) s"
  if [ -n "$APP_VERSION" ] && [ "$APP_VERSION" != "$TAG" ]; then
    "$ENGINE" tag "$PREFIX/funchat-$name:$TAG" "$PREFIX/funchat-$name:$APP_VERSION"
  fi
  "$ENGINE" image ls "$PREFIX/funchat-$name"
}

for t in "${TARGETS[@]}"; do
  case "$t" in
    orchestrator) build orchestrator services/orchestrator/Dockerfile "${ORCH_BASE_IMAGE:-}" ;;
    model-services|triton)
      extra=()
      [ -n "${TORCH_INDEX_URL:-}" ] && extra+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
      build model-services services/triton/Dockerfile "${BASE_IMAGE:-}" "${extra[@]}" ;;
    redis) build redis services/redis/Dockerfile "${BASE_IMAGE:-}" ;;
    *) echo "unknown image $t (orchestrator, model-services, redis)" >&2; exit 2 ;;
  esac
done
