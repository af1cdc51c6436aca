# Sourced by images.sh and e2e.sh: the container engine and image builder the e2e run needs.
#   engine_up    install docker.io/buildah/debootstrap if missing, then use the running Docker engine
#                or start a private dockerd (overlay2, else vfs; own data root, default socket) for this run
#   engine_down  stop that private dockerd, if this run started it
# Both fail with a message that says what is missing; nothing here is skipped silently.

E2E_STATE=${E2E_STATE:-/var/lib/lathe-e2e}
_ENGINE_PID=""

die() { echo "e2e: error: $*" >&2; exit 1; }
say() { echo "e2e: $*" >&2; }

ensure_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v buildah >/dev/null || missing+=(buildah)
  [ -x /usr/lib/podman/netavark ] || missing+=(netavark)  # buildah's network backend
  command -v debootstrap >/dev/null || missing+=(debootstrap debian-archive-keyring)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "needs ${missing[*]} (Debian packages) and root to install them; run as root or install them first"
  command -v apt-get >/dev/null || die "needs ${missing[*]}; this is not a Debian-like system (no apt-get)"
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y "${missing[@]}" >&2 \
    || { timeout 300 apt-get update >&2 && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y \
           "${missing[@]}" >&2; } \
    || die "apt-get install ${missing[*]} failed"
}

# The docker CLI that matches the daemon we start (Debian's), whatever else is on PATH.
docker() { "${DOCKER_BIN:-/usr/bin/docker}" "$@"; }

engine_up() {
  ensure_packages
  [ "$(id -u)" = 0 ] || die "buildah (chroot isolation) and a private dockerd need root"
  DOCKER_BIN=${DOCKER_BIN:-/usr/bin/docker}
  [ -x "$DOCKER_BIN" ] || DOCKER_BIN=$(command -v docker)
  export DOCKER_BIN
  # On the default socket: buildah's docker-daemon transport talks to that one only (not $DOCKER_HOST).
  unset DOCKER_HOST
  if timeout 20 "$DOCKER_BIN" info >/dev/null 2>&1; then
    say "using the running Docker engine"
    return 0
  fi
  local sock=/var/run/docker.sock
  mkdir -p "$E2E_STATE"
  if [ -S "$sock" ] && ! fuser "$sock" >/dev/null 2>&1; then rm -f "$sock"; fi  # left by a killed dockerd
  # overlay2 where the kernel allows it (a container starts in a second); vfs copies the whole image
  # for every container (a minute for the trainer image), so it is only the fallback.
  local driver
  for driver in ${LATHE_E2E_STORAGE_DRIVER:-overlay2 vfs}; do
    if _start_dockerd "$sock" "$driver"; then return 0; fi
  done
  die "dockerd did not start with ${LATHE_E2E_STORAGE_DRIVER:-overlay2 or vfs} (log above, $E2E_STATE/dockerd.log)"
}

_start_dockerd() {  # socket driver
  say "starting a private dockerd ($2) on $1"
  # Host networking only: no bridge, no iptables rules are touched on this machine.
  dockerd --storage-driver="$2" --host "unix://$1" --data-root "$E2E_STATE/docker" \
    --exec-root "$E2E_STATE/exec" --pidfile "$E2E_STATE/dockerd.pid" --bridge=none --iptables=false \
    --ip6tables=false >"$E2E_STATE/dockerd.log" 2>&1 &
  _ENGINE_PID=$!
  local i
  for i in $(seq 1 60); do
    timeout 10 "$DOCKER_BIN" info >/dev/null 2>&1 && return 0
    kill -0 "$_ENGINE_PID" 2>/dev/null || break
    sleep 1
  done
  tail -20 "$E2E_STATE/dockerd.log" >&2
  engine_down
  return 1
}

engine_down() {
  [ -n "$_ENGINE_PID" ] || return 0
  kill -TERM "$_ENGINE_PID" 2>/dev/null || true
  local i
  for i in $(seq 1 30); do kill -0 "$_ENGINE_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL "$_ENGINE_PID" 2>/dev/null || true
  wait "$_ENGINE_PID" 2>/dev/null || true
  umount "$E2E_STATE/exec/netns/default" 2>/dev/null || true  # dockerd's own network namespace
  _ENGINE_PID=""
  say "private dockerd stopped"
}
