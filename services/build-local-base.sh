#!/usr/bin/env bash
# Make a Debian 12 (bookworm) base image without any image registry: debootstrap a minimal root
# file system from the Debian mirror this machine's apt already uses, and `podman import` it.
#
#   services/build-local-base.sh [IMAGE]        (default localhost/debian-base:bookworm)
#
# Used where no container registry is reachable (the project's development machines); the images
# are then built with `make images BASE_IMAGE=... ORCH_BASE_IMAGE=...` (see services/README.md).
# Idempotent: an existing image is kept (FORCE=1 rebuilds it).
set -euo pipefail
IMAGE=${1:-localhost/debian-base:bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

if podman image exists "$IMAGE" && [ "${FORCE:-0}" != 1 ]; then
  echo "$IMAGE exists (FORCE=1 to rebuild)"; exit 0
fi

# The mirror apt uses here (deb822 sources or the classic sources.list), first "debian" one.
MIRROR=${DEBIAN_MIRROR:-}
if [ -z "$MIRROR" ]; then
  MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -v security | head -n1 || true)
fi
if [ -z "$MIRROR" ]; then
  MIRROR=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
fi
[ -n "$MIRROR" ] || { echo "cannot tell which Debian mirror apt uses: set DEBIAN_MIRROR" >&2; exit 2; }

ROOTFS=$(mktemp -d /tmp/funchat-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/tmp/funchat-debootstrap.log 2>&1 \
  || { tail -n 30 /tmp/funchat-debootstrap.log >&2; exit 1; }
# The same mirror (and security suite) inside the image, so apt-get works in builds.
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" > "$ROOTFS/etc/apt/sources.list"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | podman import - "$IMAGE"
podman image ls "$IMAGE"
