#!/usr/bin/env bash
# What `make image-test` needs on a Debian machine: debootstrap (for the base image where no
# registry is reachable) and a Docker engine. Installs what is missing when run as root with apt;
# otherwise names it. The test itself starts dockerd when no daemon answers.
set -euo pipefail
need=()
command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || need+=(debootstrap)
command -v dockerd >/dev/null || [[ -x /usr/sbin/dockerd ]] || need+=(docker.io)
((${#need[@]})) || exit 0
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
else
    echo "make image-test needs: ${need[*]} (e.g. apt-get install ${need[*]})" >&2
    exit 1
fi
