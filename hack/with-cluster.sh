#!/usr/bin/env bash
# hack/with-cluster.sh CMD...: run CMD with the local cluster up. When the cluster was not up
# before, it is started for CMD and brought down afterwards, also when CMD fails or this script
# is interrupted (SIGINT/SIGTERM are passed on to all of CMD as SIGTERM first); CMD's exit status
# is kept. A cluster that was already up is left as it was.
set -uo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -gt 0 ] || { echo "usage: $0 CMD..." >&2; exit 2; }

started=0
child=""
signalled=""
# shellcheck disable=SC2317  # called by the traps
cleanup() {
  if [ "$started" = 1 ]; then
    started=0
    echo "[with-cluster] bringing down the cluster this run started" >&2
    "$HACK/cluster.sh" down || echo "[with-cluster] WARNING: cluster down failed" >&2
  fi
}
# shellcheck disable=SC2317
on_signal() {
  signalled=$1
  if [ -n "$child" ]; then
    kill -TERM -- "-$child" 2>/dev/null || true   # CMD's whole process group
  else
    exit "$1"
  fi
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

if "$HACK/cluster.sh" status -q; then
  echo "[with-cluster] using the cluster that is already up (it stays up)" >&2
else
  started=1
  "$HACK/cluster.sh" up >/dev/null || exit $?
fi

# CMD in a process group of its own, waited for with `wait` so that a signal is handled at once
setsid "$@" &
child=$!
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done
[ -z "$signalled" ] || rc=$signalled
exit "$rc"
