#!/usr/bin/env bash
# hack/bench.sh (make bench): the benchmarks. They print figures and assert nothing; these
# machines are shared and noisy, so each figure is a median (and p99) of runs made side by side.
#   1. the agent alone (hack/bench-agent.sh): restart gap after a clean exit, resident memory;
#   2. on the local cluster (tests/bench.rs): drain-signal latency over the API watch beside the
#      ConfigMap-volume path, rollout overhead for a pool of 10, and a 1-second worker under the
#      agent beside the same worker under a plain Deployment.
# The cluster is started (and stopped again) when it is not up.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ "${1:-}" != --inside ]; then
  exec hack/with-cluster.sh "$0" --inside
fi

hack/images.sh
echo
echo "=== the agent (static release binary, as in the pods)"
WORKERPOOL_BIN=$ROOT/target/x86_64-unknown-linux-gnu/release/workerpool hack/bench-agent.sh 500
echo
echo "=== on the local cluster"
KUBECONFIG=$(hack/cluster.sh kubeconfig) cargo test -q --test bench -- --ignored --nocapture --test-threads=1 2>&1 \
  | grep -vE '^(running|test result|$)'
