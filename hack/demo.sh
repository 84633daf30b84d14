#!/usr/bin/env bash
# hack/demo.sh: the operator's main job, end to end, on the local cluster:
#   1. the local cluster (started if it is not up), the images, the operator installed with
#      `kubectl apply -k deploy/manifests` (the CRD, RBAC, a 2-replica controller Deployment);
#   2. a WorkerPool of 3 queue consumers with limit arguments (examples/demo/workerpool.yaml);
#   3. an image bump, as GitOps would do it: every old worker finishes its current message,
#      exits, and only then is replaced; `kubectl wait --for=condition=RolloutComplete`.
# Everything it started is removed at the end (the cluster too, if the demo started it).
# KEEP=1 keeps the cluster, the operator and the pool running to look around.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HACK=$ROOT/hack
NS=demo
t0=$SECONDS
step() { echo; echo "==> $*"; }
k() { "$HACK/cluster.sh" kubectl "$@"; }

started_cluster=0
followers=()
cleanup() {
  local rc=$?
  for pid in "${followers[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then
    echo; echo "KEEP=1: the cluster, the operator and the pool keep running (KUBECONFIG=$("$HACK/cluster.sh" kubeconfig))."
    echo "Remove them with: make cluster-down"
    exit $rc
  fi
  step "cleaning up"
  k delete namespace "$NS" --ignore-not-found --wait=true >/dev/null 2>&1 || true
  # the operator and its namespace, not the CRD: deleting a CRD deletes every WorkerPool in the cluster
  k delete -f "$ROOT/deploy/manifests/workerpool-operator.yaml" --ignore-not-found >/dev/null 2>&1 || true
  k delete -f "$ROOT/deploy/manifests/namespace.yaml" --ignore-not-found >/dev/null 2>&1 || true
  if [ $started_cluster = 1 ]; then "$HACK/cluster.sh" down; fi
  rm -rf "$logdir"
  exit $rc
}
logdir=$(mktemp -d)
trap cleanup EXIT

step "local cluster"
if ! "$HACK/cluster.sh" status -q; then
  started_cluster=1
fi
"$HACK/cluster.sh" up >/dev/null

step "images: workerpool-operator:dev, workerpool-test-worker:v1/:v2 (built without Docker)"
"$HACK/images.sh"

step "the operator: kubectl apply -k deploy/manifests"
k apply -k "$ROOT/deploy/manifests"
k -n workerpool-system rollout status deployment/workerpool-operator --timeout=180s

step "a pool of 3 consumers: kubectl apply -f examples/demo/workerpool.yaml"
k create namespace "$NS" >/dev/null
k -n "$NS" apply -f "$ROOT/examples/demo/workerpool.yaml"
wait_rollout() {
  # first the controller must have seen the current spec, then the condition tells
  for _ in $(seq 1 120); do
    [ "$(k -n "$NS" get wp emails -o jsonpath='{.status.observedGeneration}')" = \
      "$(k -n "$NS" get wp emails -o jsonpath='{.metadata.generation}')" ] && break
    sleep 1
  done
  k -n "$NS" wait --for=condition=RolloutComplete wp/emails --timeout=180s
}
wait_rollout
k -n "$NS" get wp,pods -o wide
first=$(k -n "$NS" get pods -l workerpool.dev/pool=emails -o jsonpath='{.items[0].metadata.name}')
sleep 3
echo; echo "--- $first: the consumer's arguments, rendered by the agent"
k -n "$NS" logs "$first" -c worker | grep -m1 '^argv:'

step "image bump v1 -> v2 while every worker is in the middle of a message"
old_pods=$(k -n "$NS" get pods -l workerpool.dev/pool=emails -o jsonpath='{.items[*].metadata.name}')
for pod in $old_pods; do
  k -n "$NS" logs -f "$pod" -c worker > "$logdir/$pod.log" 2>/dev/null &
  followers+=($!)
done
sleep 1
k -n "$NS" patch wp emails --type=json \
  -p '[{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "workerpool-test-worker:v2"}]'
for _ in 1 2 3; do sleep 2; k -n "$NS" get wp emails; done
wait_rollout
k -n "$NS" get wp,pods

step "what the old workers did after the stop flag changed (last lines of each)"
for pod in $old_pods; do
  echo "--- $pod"
  grep -E '^(message|received|stopping)' "$logdir/$pod.log" | tail -n 4 || true
  grep -m1 'retired by the stop flag' "$logdir/$pod.log" | sed 's/^.*INFO/  agent:/' || true
done

step "events"
k -n "$NS" get events --sort-by=.metadata.creationTimestamp | grep -E 'WorkerPool|Rollout|Drain' | tail -n 12 || true

echo
echo "Demo done in $((SECONDS - t0))s: 3 workers rolled from v1 to v2, every message finished."
