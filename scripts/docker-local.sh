#!/usr/bin/env bash
# A Docker engine and a Python base image on a machine that has no image
# registry (our CI box): what tests/packaging/test_image.py and .ci/run need.
#
#   scripts/docker-local.sh engine       install docker.io if missing, start dockerd if not running
#   scripts/docker-local.sh base-image   print the name of a local python:3.11 stand-in, making it if needed
#
# The base image is Debian bookworm from the apt mirror this machine uses
# (debootstrap), with Debian's python3.11 in place of python:3.11-slim. Its root
# file system is cached as a tarball under $BASE_CACHE (default
# /var/cache/model-api), so a wiped docker image store costs a `docker import`
# (seconds), not a debootstrap (minutes). pip in the image reaches PyPI the way
# pip on this machine does: the machine's CA bundle and its `cert` setting are
# copied in. Nothing else of the machine (find-links, local indexes) goes in.
#
# dockerd is started without a bridge and without iptables rules: containers
# must use --network host.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-model-api-base:bookworm-py311}"
BASE_CACHE="${BASE_CACHE:-/var/cache/model-api}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

log() { printf 'docker-local: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

engine_up() { docker info >/dev/null 2>&1; }

cmd_engine() {
  if engine_up; then return 0; fi
  if ! command -v dockerd >/dev/null; then
    log "installing docker.io (apt-get)"
    as_root apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q docker.io >/dev/null \
      || die "apt-get install docker.io failed"
  fi
  if ! command -v docker >/dev/null; then die "docker.io is installed but there is no docker client on PATH"; fi
  log "starting dockerd (log: $DOCKERD_LOG)"
  as_root mkdir -p "$(dirname "$DOCKERD_LOG")"
  # its own session: it outlives this script and the test run that asked for it
  as_root setsid dockerd --bridge=none --iptables=false >>"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 1 60); do engine_up && { log "dockerd is up"; return 0; }; sleep 0.5; done
  tail -n 20 "$DOCKERD_LOG" >&2 || true
  die "dockerd did not come up within 30 s (log above: $DOCKERD_LOG)"
}

make_rootfs_tarball() {  # $1: output tarball
  local out="$1" root mirror
  command -v debootstrap >/dev/null || {
    log "installing debootstrap (apt-get)"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q debootstrap >/dev/null \
      || die "apt-get install debootstrap failed"
  }
  # the first Debian mirror apt is configured with (one-line or deb822 format)
  mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -1 | tr -d ' ' || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
  root="$(mktemp -d /var/tmp/model-api-rootfs.XXXXXX)"
  log "debootstrap bookworm from $mirror into $root (a few minutes, once)"
  as_root debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python-is-python3,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; die "debootstrap failed (log: $root.log)"; }
  # after the packages, so update-ca-certificates does not overwrite it
  as_root cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' | as_root tee "$root/etc/pip.conf" >/dev/null
  as_root rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
  as_root mkdir -p "$(dirname "$out")"
  as_root tar -C "$root" -c . -f "$out.tmp"
  as_root mv "$out.tmp" "$out"
  as_root rm -rf "$root" "$root.log"
}

cmd_base_image() {
  engine_up || die "no Docker engine (run: $0 engine)"
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    local tarball="$BASE_CACHE/rootfs-bookworm-py311.tar"
    [[ -f "$tarball" ]] || make_rootfs_tarball "$tarball"
    log "docker import $tarball as $BASE_IMAGE"
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$BASE_IMAGE" >/dev/null
  fi
  printf '%s\n' "$BASE_IMAGE"
}

case "${1:-}" in
  engine) cmd_engine ;;
  base-image) cmd_base_image ;;
  *) echo "usage: $0 engine|base-image" >&2; exit 2 ;;
esac
