#!/usr/bin/env bash
# Builds the edgegen image with podman on a machine that reaches no image registry (`make image`):
#   deploy/podman/image.sh [WHEEL_DIR]
# 1. The base, debian:bookworm-slim, is made here once when podman does not have it: debootstrap's minbase,
#    trimmed as Debian's slim images are (no apt lists or caches, no docs, man pages or translations), then
#    imported under the name the Dockerfile's FROM resolves to. Making it needs root; it stays in podman's
#    storage, so later builds start from it at once.
# 2. The wheels in WHEEL_DIR (the llama-cpp-python wheel the Makefile built) go to deploy/docker/wheels/, so
#    the build compiles nothing.
# 3. podman builds deploy/docker/Dockerfile with chroot isolation (the only kind these sandboxed VMs allow)
#    in Docker's format (OCI images drop HEALTHCHECK), reusing its cached layers.
#    When pip here trusts a CA of its own (PIP_CERT: a TLS-inspecting egress proxy, say), the build's pip is
#    given it too, through a mount (the image keeps only the empty mount point, /etc/xdg/pip).
# CONTAINERS_CONF (default: containers.conf beside this script) carries what running containers needs here.
# IMAGE names the result (default edgegen:latest); DEBIAN_MIRROR the mirror debootstrap uses.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/deploy/podman/containers.conf}"
image="${IMAGE:-edgegen:latest}"
base=docker.io/library/debian:bookworm-slim
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

dir=""
pipconf=""
trap 'rm -rf ${dir:+"$dir"} ${pipconf:+"$pipconf"}' EXIT

make_base() {
  [ "$(id -u)" -eq 0 ] || { echo "making the base image needs root (debootstrap)" >&2; exit 1; }
  dir="$(mktemp -d /var/tmp/edgegen-base.XXXXXX)"
  debootstrap --variant=minbase bookworm "$dir" "$mirror" >/dev/null
  # What the slim images leave out, and keep leaving out for the packages the Dockerfile installs.
  cat >"$dir/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  cat >"$dir/etc/apt/apt.conf.d/slim" <<'EOF'
APT::Keep-Downloaded-Packages "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
EOF
  rm -f "$dir/etc/apt/sources.list"
  cat >"$dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$dir"/usr/share/{man,info,lintian}/* "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*
  find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  tar -C "$dir" -c . | podman import --message "debootstrap --variant=minbase bookworm, slimmed" - "$base" >/dev/null
  echo "made $base locally"
}

podman image exists "$base" || make_base

wheels="$root/deploy/docker/wheels"
rm -f "$wheels"/*.whl
if [ -n "${1:-}" ]; then
  cp "$1"/*.whl "$wheels"/
fi

trust=()
if [ -n "${PIP_CERT:-}" ]; then
  pipconf="$(mktemp -d)"
  cp "$PIP_CERT" "$pipconf/ca.crt"
  printf '[global]\ncert = /etc/xdg/pip/ca.crt\n' >"$pipconf/pip.conf"
  chmod -R a+rX "$pipconf"
  trust=(--volume "$pipconf:/etc/xdg/pip:ro")
fi

podman build --isolation chroot --format docker --pull=never --layers "${trust[@]}" \
  -f "$root/deploy/docker/Dockerfile" -t "$image" "$root"
size="$(podman image inspect --format '{{.Size}}' "$image")"
echo "$image: $((size / 1000000)) MB"
