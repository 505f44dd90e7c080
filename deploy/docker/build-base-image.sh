#!/usr/bin/env bash
# Build the Dockerfile's base image locally, for machines that reach Debian's archive but no
# container registry: a minimal Debian bookworm (debootstrap, variant minbase) with Python 3.11
# and venv, imported into Docker under the tag the Dockerfile's FROM names.
#
# Usage: deploy/docker/build-base-image.sh [TAG]
# Does nothing when TAG is already present (a real image pulled from a registry is never
# replaced); FORCE=1 rebuilds. Needs root, debootstrap and a running Docker daemon.
# The Debian mirror is the first one in this machine's apt sources (MIRROR overrides it).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
tag="${1:-$(awk 'toupper($1) == "FROM" { print $2; exit }' "$here/../../Dockerfile")}"
docker_cli="${DOCKER:-docker}"

if [[ "${FORCE:-0}" != 1 ]] && "$docker_cli" image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag: present"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
[[ "$(id -u)" == 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }

mirror="${MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '$1 == "URIs:" && $2 ~ /\/debian\/?$/ { print $2; exit }')"
fi
if [[ -z "$mirror" && -r /etc/apt/sources.list ]]; then
    mirror="$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)"
fi

root="$(mktemp -d "${TMPDIR:-/var/tmp}/access-proxy-base.XXXXXX")"
trap 'rm -rf "$root"' EXIT
echo "base image $tag: debootstrap bookworm into $root ${mirror:+from $mirror}"
debootstrap --variant=minbase --include=python3-venv bookworm "$root" ${mirror:+"$mirror"} \
    > "$root.log" 2>&1 || { tail -30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# What an image never needs: package lists and caches, docs, man pages, translations.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/log/*
tar -C "$root" --numeric-owner -c . | "$docker_cli" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
echo "base image $tag: imported ($("$docker_cli" image inspect -f '{{.Size}}' "$tag") bytes)"
