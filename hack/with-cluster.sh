#!/usr/bin/env bash
# hack/with-cluster.sh CMD...: run CMD with the local cluster up. When the cluster was not up
# before, it is started for CMD and brought down afterwards, also when CMD fails or is
# interrupted; CMD's exit status is kept. A cluster that was already up is left as it was.
set -uo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -gt 0 ] || { echo "usage: $0 CMD..." >&2; exit 2; }

started=0
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [ "$started" = 1 ]; then
    started=0
    echo "[with-cluster] bringing down the cluster this run started" >&2
    "$HACK/cluster.sh" down || echo "[with-cluster] WARNING: cluster down failed" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if "$HACK/cluster.sh" status -q; then
  echo "[with-cluster] using the cluster that is already up (it stays up)" >&2
else
  started=1
  "$HACK/cluster.sh" up >/dev/null || exit $?
fi

rc=0
"$@" || rc=$?
exit $rc
