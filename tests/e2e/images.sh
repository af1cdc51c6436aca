#!/usr/bin/env bash
# `make images`: both Dockerfile targets, built from this working tree into the local Docker engine:
#   lathe-service:local       target service
#   lathe-trainer:local-cpu   target trainer with a CPU torch (the wheel folder $PIP_FIND_LINKS is
#                             mounted into the build) instead of the CUDA build
# No image registry is needed: the three FROM images are replaced by stand-ins made here (build args;
# the real bases stay the Dockerfile's defaults, docs/deploy.md builds with those):
#   a Debian base from debootstrap (python3, python3-venv, ca-certificates) for PYTHON_IMAGE and
#   CUDA_IMAGE, carrying this machine's CA bundle so that builds reach the package index; and a
#   `FROM scratch` image holding the uv binary of the PyPI `uv` wheel of UV_IMAGE's version.
# Stand-ins are cached in buildah's storage, keyed by Debian release and CA-bundle hash; the project's
# images are always rebuilt, so a stale image is never tested.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."
. tests/e2e/engine.sh

DEBIAN_RELEASE=${LATHE_STANDIN_RELEASE:-bookworm}
CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
PY=$(realpath -ms "${PY:-.venv/bin/python}")
export BUILDAH_ISOLATION=chroot
WORK=""

cleanup() {
  local rc=$?
  [ -n "$WORK" ] && rm -rf "$WORK"
  engine_down
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

debian_mirror() {
  # The Debian mirror this machine's apt uses (deb822 .sources first, then sources.list).
  [ -n "${LATHE_DEBIAN_MIRROR:-}" ] && { echo "$LATHE_DEBIAN_MIRROR"; return; }
  local uri
  uri=$( { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | sed 's/^URIs:[[:space:]]*//' | tr ' ' '\n'
           grep -hsE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
             | sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' | awk '{print $1}'; } \
         | grep -E '/debian/?$' | head -1 || true)
  [ -n "$uri" ] || die "no Debian mirror in this machine's apt sources; set LATHE_DEBIAN_MIRROR"
  echo "$uri"
}

has_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

standin_debian() {
  [ -r "$CA_BUNDLE" ] || die "CA bundle $CA_BUNDLE not readable (set SSL_CERT_FILE)"
  local key name ctr mnt
  key=$( { echo "$DEBIAN_RELEASE python3,python3-venv,ca-certificates"; cat "$CA_BUNDLE"; } | sha256sum | cut -c1-12)
  name="localhost/lathe-standin-debian:$DEBIAN_RELEASE-$key"
  if has_image "$name"; then say "stand-in base $name (cached)"; echo "$name"; return; fi
  say "stand-in base $name: debootstrap $DEBIAN_RELEASE"
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  if ! timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
         "$DEBIAN_RELEASE" "$mnt" "$(debian_mirror)" >"$WORK/debootstrap.log" 2>&1; then
    tail -20 "$WORK/debootstrap.log" >&2
    buildah rm "$ctr" >/dev/null
    die "debootstrap failed (log above)"
  fi
  # Builds reach the package index through this machine's egress, whose CA only this bundle has.
  install -D -m 0644 "$CA_BUNDLE" "$mnt/usr/local/share/lathe-standin/ca-bundle.pem"
  rm -rf "$mnt/var/cache/apt/archives/"*.deb "$mnt/var/lib/apt/lists/"*
  buildah umount "$ctr" >/dev/null
  buildah config --env SSL_CERT_FILE=/usr/local/share/lathe-standin/ca-bundle.pem --cmd /bin/bash "$ctr"
  buildah commit -q --rm "$ctr" "$name" >/dev/null
  echo "$name"
}

standin_uv() {
  local version name ctr
  version=$(sed -nE 's/^ARG UV_IMAGE=.*:([0-9][0-9.]*)$/\1/p' Dockerfile)
  [ -n "$version" ] || die "no uv version in the Dockerfile's ARG UV_IMAGE"
  name="localhost/lathe-standin-uv:$version"
  if has_image "$name"; then say "stand-in uv $name (cached)"; echo "$name"; return; fi
  say "stand-in uv $name from the PyPI wheel"
  timeout 300 "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
    --dest "$WORK/uv" "uv==$version" >&2 || die "pip download uv==$version failed"
  (cd "$WORK/uv" && "$PY" -m zipfile -e uv-*.whl x) >&2
  ctr=$(buildah from scratch)
  buildah copy --chmod 0755 "$ctr" "$(ls "$WORK"/uv/x/uv-*.data/scripts/uv)" /uv >/dev/null
  buildah commit -q --rm "$ctr" "$name" >/dev/null
  echo "$name"
}

build() {  # target tag [extra buildah args…]
  local target=$1 tag=$2 started
  shift 2
  started=$(date +%s)
  say "building target $target → $tag"
  # Committed straight into the Docker engine (no second copy in buildah's storage).
  timeout 1500 buildah bud --network host --layers=false --target "$target" -t "docker-daemon:$tag" "$@" . \
    >"$WORK/build-$target.log" 2>&1 || { tail -40 "$WORK/build-$target.log" >&2; die "building $target failed (log above)"; }
  say "$tag built in $(( $(date +%s) - started )) s, $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MiB", $1/1048576}')"
}

torch_wheels() {
  local dir=${PIP_FIND_LINKS:-}
  version=$(sed -nE 's/^ARG TORCH_VERSION=(.*)$/\1/p' Dockerfile)
  if [ -z "$dir" ] || ! ls "$dir"/torch-"$version"+cpu-*.whl >/dev/null 2>&1; then
    die "no CPU torch $version wheel in PIP_FIND_LINKS (${dir:-unset}); the CPU trainer image installs torch from there"
  fi
  echo "$dir"
}

engine_up
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lathe-images.XXXXXX")
[ -x "$PY" ] || die "$PY missing: run make install first"
BASE=$(standin_debian)
UV=$(standin_uv)
WHEELS=$(torch_wheels)
build service lathe-service:local --build-arg PYTHON_IMAGE="$BASE" --build-arg UV_IMAGE="$UV"
build trainer lathe-trainer:local-cpu --build-arg PYTHON_IMAGE="$BASE" --build-arg UV_IMAGE="$UV" \
  --build-arg CUDA_IMAGE="$BASE" --build-arg TORCH_FIND_LINKS=/wheels --build-arg TORCH_VARIANT=cpu \
  -v "$WHEELS:/wheels:ro"
# The previous builds, untagged now, would only take disk.
docker image prune -f >/dev/null || true
say "images ready: lathe-service:local, lathe-trainer:local-cpu"
