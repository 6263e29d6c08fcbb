#!/bin/sh
# Fetch the checkpoint files into the cache volume and verify them (init container, POSIX sh).
# usage: fetch_checkpoint.sh DEST MANIFEST   (MANIFEST lines: "<sha256> <path> <url>")
# A file already present with the right digest is left alone; a missing or stale one is fetched
# into a temporary name, verified, then renamed (several pods may share the volume).
# A digest mismatch fails naming the file and both digests. FETCH overrides the downloader.
set -eu
dest=$1
manifest=$2
fetch=${FETCH:-wget -q -O}
while read -r want path url; do
  [ -n "${want:-}" ] || continue
  file="$dest/$path"
  if [ -f "$file" ]; then
    have=$(sha256sum "$file" | cut -d' ' -f1)
    if [ "$have" = "$want" ]; then
      echo "verified $path"
      continue
    fi
    echo "stale $path (sha256 $have, expected $want): fetching again"
  fi
  mkdir -p "$(dirname "$file")"
  tmp="$file.part.$$"
  if ! $fetch "$tmp" "$url"; then
    rm -f "$tmp"
    echo "fetch failed: $path from $url" >&2
    exit 1
  fi
  got=$(sha256sum "$tmp" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    rm -f "$tmp"
    echo "sha256 mismatch: $path: expected $want, got $got" >&2
    exit 1
  fi
  mv "$tmp" "$file"
  echo "fetched $path"
done < "$manifest"
