#!/usr/bin/env bash
# hack/demo.sh: the local demo. For now: bring the local cluster up (if it is not), build and
# import the images, install the WorkerPool CRD, and say what it did. To be extended with a
# real pool and a graceful rollout (add steps at the end; `k` is kubectl for the local cluster).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HACK=$ROOT/hack
t0=$SECONDS
step() { echo; echo "==> $*"; }
k() { "$HACK/cluster.sh" kubectl "$@"; }

step "local cluster (hack/cluster.sh up)"
KUBECONFIG_PATH=$("$HACK/cluster.sh" up)

step "images (hack/images.sh): workerpool-operator:dev, workerpool-test-worker:v1/:v2"
"$HACK/images.sh"

step "the WorkerPool CRD (kubectl apply -f crds/)"
k apply -f "$ROOT/crds/"
k wait --for=condition=Established --timeout=60s crd/workerpools.workerpool.dev >/dev/null
k get crd workerpools.workerpool.dev

cat <<EOF

Done in $((SECONDS - t0))s:
  * a single-node Kubernetes 1.20 runs in the network namespace ${WP_NETNS:-wpk8s}; its API is on
    https://127.0.0.1:${WP_API_PORT:-16443}
  * the images are in its node (pods use them with imagePullPolicy: Never)
  * the WorkerPool CRD is installed

Try:
  export KUBECONFIG=$KUBECONFIG_PATH
  kubectl get nodes
  kubectl explain workerpool.spec
The cluster stays up; stop it with: make cluster-down
EOF
