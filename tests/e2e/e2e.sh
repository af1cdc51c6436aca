#!/usr/bin/env bash
# `make e2e` (after `make images`): tests/e2e in containers, on host networking and 127.0.0.1.
# Uses the running Docker engine or starts a private one; whatever happens, the run's containers
# are removed and that private dockerd is stopped at the end. The whole run is bounded in time.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."
. tests/e2e/engine.sh
PY=$(realpath -ms "${PY:-.venv/bin/python}")
LIMIT_S=${LATHE_E2E_TIMEOUT_S:-900}

cleanup() {
  local rc=$? left
  left=$(docker ps -aq --filter label=lathe-e2e 2>/dev/null || true)
  if [ -n "$left" ]; then
    say "removing containers left by the run: $(echo $left)"
    docker rm -f $left >/dev/null 2>&1 || true
  fi
  engine_down
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$PY" ] || die "$PY missing: run make install first"
engine_up
for image in lathe-service:local lathe-trainer:local-cpu; do
  docker image inspect "$image" >/dev/null 2>&1 || die "image $image is missing: run make images"
done
volumes_before=$(docker volume ls -q | sort)
export LATHE_E2E_FIGURES="$E2E_STATE/figures.json"
rm -f "$LATHE_E2E_FIGURES"
started=$(date +%s)
# Its own basetemp: the logs of every pod and of the service stay there after a failure.
LATHE_E2E=1 timeout --kill-after=30 "$LIMIT_S" "$PY" -m pytest -q -p no:cacheprovider -rs --durations=0 \
  --basetemp "$E2E_STATE/pytest" tests/e2e "$@" || { rc=$?; [ $rc = 124 ] && say "timed out after $LIMIT_S s"; exit $rc; }
left=$(docker ps -aq --filter label=lathe-e2e)
[ -z "$left" ] || die "containers left after the run: $left"
[ "$(docker volume ls -q | sort)" = "$volumes_before" ] || die "the run left Docker volumes behind"
say "passed in $(( $(date +%s) - started )) s; figures: $(tr -d '\n' < "$LATHE_E2E_FIGURES" 2>/dev/null)"
