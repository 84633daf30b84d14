#!/usr/bin/env bash
# hack/test-deploy.sh: end-to-end test of the deployment artefacts on the local cluster.
#
#   1. offline: `helm lint` the chart; render it with default and with other values and check
#      the output (replicas, hardened pod, probes, RBAC scope, ServiceMonitor); bad values must be
#      refused by values.schema.json; deploy/manifests must be up to date (hack/check-deploy.sh);
#   2. Helm: install the chart into workerpool-system, watching only a test namespace (other
#      tests run their own controllers in their own namespaces at the same time); both replicas
#      Running and Ready; the service account's permissions are what the ClusterRole says, in the
#      watched namespace only; the example WorkerPools pass the CRD's schema (server dry-run); a
#      pool of the test worker gets its pods Running;
#   3. leader election: delete the leader's pod and scale the pool 1 -> 2 meanwhile; the other
#      replica takes the Lease (time measured) and reconciles the change, then rolls the pool
#      out to a new revision; /metrics of the leader (API server pod proxy) and of the Service
#      (service proxy) have every workerpool_* series;
#   4. uninstall; `kubectl apply -k` of deploy/manifests (through an overlay in a temporary
#      directory that sets the watched namespace) runs an equivalent operator: pods Ready, and it
#      reconciles the pool (scale 2 -> 1); delete it.
# Everything it creates is removed on exit, failure included; the CRD is left alone (other tests
# use it). Needs: the cluster of hack/cluster.sh (KUBECONFIG, default
# /tmp/workerpool-cluster/kubeconfig) with the images workerpool-operator:dev and
# workerpool-test-worker:v1 imported into the node (make images).
#
# Environment: KUBECONFIG; WP_DEPLOY_TEST_NS (the watched namespace, default wp-deploy-test);
# WP_DEPLOY_KEEP=1 keeps everything on failure for debugging (clean up by running again).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART=$ROOT/deploy/helm/workerpool-operator
HELM=$ROOT/hack/helm.sh
export KUBECONFIG=${KUBECONFIG:-/tmp/workerpool-cluster/kubeconfig}
OP_NS=workerpool-system
TEST_NS=${WP_DEPLOY_TEST_NS:-wp-deploy-test}
RELEASE=workerpool-operator
LEASE=workerpool-operator-leader
SA=system:serviceaccount:$OP_NS:workerpool-operator
POOL=deploy-test
OWNER_LABEL=workerpool.dev/test=deploy   # marks the namespaces this script created
WORKER_IMAGE=workerpool-test-worker:v1
OPERATOR_IMAGE=workerpool-operator:dev

START_MS=$(($(date +%s%N) / 1000000))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wp-test-deploy.XXXXXX")
TIMINGS=()
TAKEOVER_MS=""
phase_name=""
phase_start=0

now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }
log() { echo "[test-deploy +$(secs $(($(now_ms) - START_MS)))s] $*" >&2; }
phase() {
  phase_end
  phase_name=$1
  phase_start=$(now_ms)
  log "== $1"
}
phase_end() {
  if [ -n "$phase_name" ]; then TIMINGS+=("$(printf '%-72s %8ss' "$phase_name" "$(secs $(($(now_ms) - phase_start)))")"); fi
  phase_name=""
}
k() { kubectl --request-timeout=20s "$@"; }

diagnostics() {
  echo "----- diagnostics -----" >&2
  if ! k get --raw /readyz >/dev/null 2>&1; then
    echo "the cluster at KUBECONFIG=$KUBECONFIG does not answer any more (brought down or restarted meanwhile?)" >&2
    return 0
  fi
  k get pods -n "$OP_NS" -o wide >&2 2>&1 || true
  k get pods -n "$TEST_NS" -o wide >&2 2>&1 || true
  k get workerpools -n "$TEST_NS" -o yaml 2>&1 | sed -n '/^  status:/,$p' | head -60 >&2 || true
  k get lease "$LEASE" -n "$OP_NS" -o yaml >&2 2>&1 || true
  for pod in $(k get pods -n "$OP_NS" -o name 2>/dev/null); do
    echo "--- logs of $pod (last 40 lines)" >&2
    k logs -n "$OP_NS" "$pod" --tail=40 >&2 2>&1 || true
  done
  k get events -n "$OP_NS" --sort-by=.lastTimestamp 2>&1 | tail -20 >&2 || true
  k get events -n "$TEST_NS" --sort-by=.lastTimestamp 2>&1 | tail -20 >&2 || true
  echo "-----------------------" >&2
}

fail() {
  echo >&2
  echo "[test-deploy] FAILED${phase_name:+ in \"$phase_name\"}: $*" >&2
  [ "${NO_DIAGNOSTICS:-}" = 1 ] || diagnostics
  exit 1
}

# wait_for DESCRIPTION TIMEOUT_SECONDS COMMAND...: run COMMAND every half second until it
# succeeds; gives up at the timeout, or at once when the API server stops answering
wait_for() {
  local what=$1 timeout=$2 deadline next_check
  shift 2
  deadline=$(($(now_ms) + timeout * 1000))
  next_check=$(($(now_ms) + 10000))
  until "$@" >/dev/null 2>&1; do
    [ "$(now_ms)" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for: $what"
    if [ "$(now_ms)" -ge "$next_check" ]; then
      k get --raw /readyz >/dev/null 2>&1 || fail "the API server stopped answering while waiting for: $what"
      next_check=$(($(now_ms) + 10000))
    fi
    sleep 0.5
  done
}

# expect FILE JQ_EXPR DESCRIPTION: the JSON in FILE must make JQ_EXPR true
expect() {
  jq -e "$2" "$1" >/dev/null || fail "$3 (jq: $2 on ${1##*/})"
}

remove_operator_objects() {
  # The release's objects, by name (cluster-scoped ones too); never the CRD.
  [ -f "$WORK/operator.yaml" ] || "$HELM" template "$CHART" --name "$RELEASE" -n "$OP_NS" \
    --set "watchNamespace=$TEST_NS" >"$WORK/operator.yaml" 2>/dev/null || return 0
  k delete -f "$WORK/operator.yaml" --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1 || true
  k delete clusterrole,clusterrolebinding "$RELEASE" --ignore-not-found >/dev/null 2>&1 || true
}

cleanup() {
  local rc=$?
  phase_end
  trap - EXIT INT TERM
  if [ $rc -ne 0 ] && [ "${WP_DEPLOY_KEEP:-}" = 1 ]; then
    log "WP_DEPLOY_KEEP=1: leaving $OP_NS, $TEST_NS and $WORK for debugging"
    exit $rc
  fi
  if [ "${CLUSTER_TOUCHED:-}" = 1 ]; then
    log "cleaning up"
    "$HELM" uninstall "$RELEASE" -n "$OP_NS" --ignore-not-found >/dev/null 2>&1 || true
    remove_operator_objects
    k delete namespace "$TEST_NS" "$OP_NS" --ignore-not-found --wait=true --timeout=180s >/dev/null 2>&1 ||
      log "WARNING: namespaces $TEST_NS/$OP_NS not gone yet"
  fi
  rm -rf "$WORK"
  if [ ${#TIMINGS[@]} -gt 0 ]; then
    echo "[test-deploy] timings:" >&2
    printf '  %s\n' "${TIMINGS[@]}" >&2
    [ -z "$TAKEOVER_MS" ] || echo "  leader takeover after deleting the leader's pod: $(secs "$TAKEOVER_MS")s" >&2
    echo "  total: $(secs $(($(now_ms) - START_MS)))s" >&2
  fi
  if [ $rc -eq 0 ]; then echo "[test-deploy] PASSED" >&2; else echo "[test-deploy] FAILED (exit $rc)" >&2; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

render() { # render OUT.json [helm template options...]
  local out=$1
  shift
  "$HELM" template "$CHART" --name "$RELEASE" -n "$OP_NS" "$@" >"$out.yaml" || fail "helm template $* failed"
  "$HELM" to-json <"$out.yaml" >"$out" || fail "cannot parse the output of helm template $*"
}

# ------------------------------------------------------------------------------------------------
phase "lint and check the chart (offline)"
"$HELM" lint "$CHART" --strict --kube-version v1.20.2 >"$WORK/lint.txt" 2>&1 || { cat "$WORK/lint.txt" >&2; fail "helm lint failed"; }
"$ROOT/hack/check-deploy.sh" >&2 || fail "hack/check-deploy.sh failed (chart CRD or deploy/manifests out of date)"

phase "render with default values and check"
render "$WORK/default.json"
D=$WORK/default.json
dep='.[] | select(.kind == "Deployment")'
ctr="$dep | .spec.template.spec.containers[0]"
expect "$D" '[.[].apiVersion] - ["v1", "apps/v1", "rbac.authorization.k8s.io/v1"] == []' "only APIs of Kubernetes 1.20 (v1, apps/v1, rbac v1)"
expect "$D" "$dep | .spec.replicas == 2" "2 replicas by default"
expect "$D" "$dep | .metadata.namespace == \"$OP_NS\"" "the Deployment is in the release namespace"
expect "$D" "$ctr | .command == [\"/workerpool\"] and (.args | index([\"controller\", \"--leader-elect\"]) == 0)" "runs workerpool controller --leader-elect"
expect "$D" "$ctr | .args | index(\"--lease-name=$LEASE\") != null" "the Lease is $LEASE"
expect "$D" "$ctr | .image == \"$OPERATOR_IMAGE\" and .imagePullPolicy == \"IfNotPresent\"" "image $OPERATOR_IMAGE, IfNotPresent"
expect "$D" "$ctr | .env | map(select(.name == \"WORKERPOOL_AGENT_IMAGE\"))[0].value == \"$OPERATOR_IMAGE\"" "the agent image defaults to the operator image"
expect "$D" "$ctr | .env | map(select(.name == \"WORKERPOOL_WATCH_NAMESPACE\")) == []" "watches all namespaces by default"
expect "$D" "$ctr | .env | map(select(.name == \"WORKERPOOL_LOG_FORMAT\"))[0].value == \"json\"" "JSON logs by default"
expect "$D" "$ctr | .env | map(select(.name == \"POD_NAME\"))[0].valueFrom.fieldRef.fieldPath == \"metadata.name\"" "POD_NAME from the downward API"
expect "$D" "$ctr | .env | map(select(.name == \"POD_NAMESPACE\"))[0].valueFrom.fieldRef.fieldPath == \"metadata.namespace\"" "POD_NAMESPACE from the downward API"
expect "$D" "$dep | .spec.template.spec.securityContext | .runAsNonRoot == true and .runAsUser == 65532 and .seccompProfile.type == \"RuntimeDefault\"" "pod securityContext: non-root 65532, seccomp RuntimeDefault"
expect "$D" "$ctr | .securityContext | .readOnlyRootFilesystem == true and .allowPrivilegeEscalation == false and .capabilities.drop == [\"ALL\"] and .runAsNonRoot == true and .runAsUser == 65532 and .seccompProfile.type == \"RuntimeDefault\"" "container securityContext hardened"
expect "$D" "$ctr | .livenessProbe.httpGet.path == \"/healthz\" and .readinessProbe.httpGet.path == \"/readyz\"" "liveness /healthz, readiness /readyz"
expect "$D" "$ctr | .ports[0] | .name == \"http-metrics\" and .containerPort == 8080" "container port http-metrics 8080"
expect "$D" "$ctr | .resources.limits.memory != null and .resources.requests.cpu != null" "resources set"
expect "$D" '.[] | select(.kind == "Service") | .spec.ports[0] | .name == "http-metrics" and .port == 8080' "Service port http-metrics 8080"
expect "$D" '[.[] | select(.kind == "ServiceMonitor")] == []' "no ServiceMonitor by default"
expect "$D" '[.[] | select(.kind == "ClusterRoleBinding")] | length == 1' "a ClusterRoleBinding when watching all namespaces"
expect "$D" '[.[] | select(.kind == "ClusterRole") | .rules[] | (.verbs + .resources + .apiGroups)[] | select(. == "*")] == []' "no wildcard in the ClusterRole"
expect "$D" '[.[] | select(.kind == "ClusterRole") | .rules[] | .resources[] | select(. == "secrets" or . == "leases" or . == "workerpools/scale")] == []' "the ClusterRole grants no secrets, leases or scale"
expect "$D" '[.[] | select(.kind == "ClusterRole") | .rules[] | .verbs[] | select(. == "bind" or . == "escalate" or . == "impersonate")] == []' "no bind/escalate/impersonate"
expect "$D" ".[] | select(.kind == \"Role\") | .metadata.namespace == \"$OP_NS\" and (.rules | map(.resources[]) | unique == [\"leases\"]) and (.rules[1].resourceNames == [\"$LEASE\"])" "leases only in a namespaced Role, renewals limited to the one Lease"

phase "render with other values and check"
cat >"$WORK/values.yaml" <<EOF
replicaCount: 3
image: {repository: my-registry/workerpool-operator, tag: "1.2.3", pullPolicy: Always}
agentImage: my-registry/workerpool-agent:1.2.3
watchNamespace: team-a
logLevel: debug
logFormat: text
serviceMonitor: {enabled: true, labels: {release: prometheus}}
podAnnotations: {example.com/note: hello}
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Equal, value: operators, effect: NoSchedule}]
resources: {requests: {cpu: 10m, memory: 32Mi}, limits: {memory: 128Mi}}
EOF
render "$WORK/custom.json" -f "$WORK/values.yaml" --set extraArgs[0]=--log-level=debug
C=$WORK/custom.json
expect "$C" "$dep | .spec.replicas == 3" "replicaCount 3"
expect "$C" "$ctr | .image == \"my-registry/workerpool-operator:1.2.3\" and .imagePullPolicy == \"Always\"" "image and pull policy from values"
expect "$C" "$ctr | .env | map(select(.name == \"WORKERPOOL_AGENT_IMAGE\"))[0].value == \"my-registry/workerpool-agent:1.2.3\"" "agentImage from values"
expect "$C" "$ctr | .env | map(select(.name == \"WORKERPOOL_WATCH_NAMESPACE\"))[0].value == \"team-a\"" "watchNamespace passed to the controller"
expect "$C" "$ctr | .env | map(select(.name == \"WORKERPOOL_LOG_FORMAT\"))[0].value == \"text\"" "logFormat text"
expect "$C" "$ctr | .env | map(select(.name == \"WORKERPOOL_LOG\"))[0].value == \"debug\"" "logLevel debug"
expect "$C" "$ctr | .args[-1] == \"--log-level=debug\"" "extraArgs appended"
expect "$C" '[.[] | select(.kind == "ClusterRoleBinding")] == []' "no ClusterRoleBinding when watching one namespace"
expect "$C" '.[] | select(.kind == "RoleBinding" and .metadata.namespace == "team-a") | .roleRef.kind == "ClusterRole"' "a RoleBinding to the ClusterRole in the watched namespace"
expect "$C" '.[] | select(.kind == "ServiceMonitor") | .metadata.labels.release == "prometheus" and .spec.endpoints[0].port == "http-metrics"' "ServiceMonitor with its labels"
expect "$C" "$dep | .spec.template.metadata.annotations[\"example.com/note\"] == \"hello\"" "podAnnotations"
expect "$C" "$dep | .spec.template.spec.nodeSelector[\"kubernetes.io/os\"] == \"linux\" and .spec.template.spec.tolerations[0].key == \"dedicated\"" "nodeSelector and tolerations"
expect "$C" "$ctr | .resources.limits.memory == \"128Mi\"" "resources from values"

phase "bad values are refused by values.schema.json"
echo "replicaCount: 1.5" >"$WORK/float.yaml"
refused() { # refused DESCRIPTION EXPECTED_MESSAGE_PART helm-options...
  local what=$1 part=$2
  shift 2
  if "$HELM" template "$CHART" "$@" >/dev/null 2>"$WORK/refused.txt"; then fail "$what was accepted"; fi
  grep -q -- "$part" "$WORK/refused.txt" || { cat "$WORK/refused.txt" >&2; fail "$what: refused, but not by the schema ($part)"; }
}
refused "replicaCount 0" "/replicaCount" --set replicaCount=0
refused "replicaCount 1.5" "/replicaCount" -f "$WORK/float.yaml"
refused "replicaCount \"two\"" "/replicaCount" --set replicaCount=two
refused "logFormat xml" "/logFormat" --set logFormat=xml
refused "image.pullPolicy Sometimes" "/image/pullPolicy" --set image.pullPolicy=Sometimes
refused "watchNamespace Not_A_Name" "/watchNamespace" --set watchNamespace=Not_A_Name
refused "an unknown key (replicas)" "replicas" --set replicas=2
refused "serviceMonitor.enabled \"yes\"" "/serviceMonitor/enabled" --set serviceMonitor.enabled=yes
phase_end

# ------------------------------------------------------------------------------------------------
phase "cluster preflight"
k get --raw /readyz >/dev/null 2>&1 || NO_DIAGNOSTICS=1 fail "no cluster at KUBECONFIG=$KUBECONFIG (make cluster-up)"
# (the kubelet lists at most 50 images in the node's status: a missing one is only a warning)
images=$(k get nodes -o json 2>/dev/null | jq -r '.items[].status.images[]?.names[]?' || true)
for image in "$OPERATOR_IMAGE" "$WORKER_IMAGE"; do
  grep -Eq "(^|/)$image\$" <<<"$images" ||
    log "WARNING: the node does not list image $image (make images); going on, pods may fail with ErrImageNeverPull"
done
k get crd workerpools.workerpool.dev >/dev/null 2>&1 || log "the WorkerPool CRD is not installed yet: the chart installs it"
for ns in "$OP_NS" "$TEST_NS"; do
  if k get namespace "$ns" >/dev/null 2>&1; then
    [ -n "$(k get namespace "$ns" -l "$OWNER_LABEL" -o name 2>/dev/null)" ] ||
      NO_DIAGNOSTICS=1 fail "namespace $ns exists and was not made by this test; refusing to touch it"
  fi
done
CLUSTER_TOUCHED=1
if k get namespace "$OP_NS" "$TEST_NS" --ignore-not-found -o name 2>/dev/null | grep -q .; then
  log "removing what an earlier run left behind"
  "$HELM" uninstall "$RELEASE" -n "$OP_NS" --ignore-not-found >/dev/null 2>&1 || true
  remove_operator_objects
  k delete namespace "$OP_NS" "$TEST_NS" --ignore-not-found --wait=true --timeout=180s >/dev/null ||
    fail "cannot delete the namespaces of an earlier run"
fi
if k get clusterrole "$RELEASE" >/dev/null 2>&1; then
  [ "$(k get clusterrole "$RELEASE" -o jsonpath='{.metadata.labels.app\.kubernetes\.io/instance}')" = "$RELEASE" ] ||
    NO_DIAGNOSTICS=1 fail "a ClusterRole $RELEASE exists that is not this chart's"
  remove_operator_objects
fi
for ns in "$OP_NS" "$TEST_NS"; do
  k create namespace "$ns" >/dev/null
  k label namespace "$ns" "$OWNER_LABEL" >/dev/null
done

# ------------------------------------------------------------------------------------------------
phase "helm install (2 replicas, watching $TEST_NS)"
"$HELM" install "$RELEASE" "$CHART" -n "$OP_NS" --set "watchNamespace=$TEST_NS" \
  --set "logLevel=info\,kube=warn" --wait --timeout 180 --quiet >"$WORK/install.txt" 2>&1 ||
  { cat "$WORK/install.txt" >&2; fail "helm install failed"; }
sed 's/^/  /' "$WORK/install.txt" >&2

controller_pods_ready() { # exactly $1 controller pods, all Running and Ready, none terminating
  k get pods -n "$OP_NS" -l app.kubernetes.io/name=workerpool-operator -o json >"$WORK/op-pods.json" || return 1
  jq -e --argjson n "$1" '[.items[] | select(.metadata.deletionTimestamp == null)] | length == $n and
    all(.status.phase == "Running" and (.status.conditions // [] | any(.type == "Ready" and .status == "True")))' \
    "$WORK/op-pods.json" >/dev/null
}
wait_for "2 controller pods Running and Ready" 120 controller_pods_ready 2
k get pods -n "$OP_NS" -o wide >&2

phase "the service account has exactly the controller's permissions"
can() { k auth can-i --as="$SA" "$@" 2>/dev/null; }
allowed() { can "$@" >/dev/null || fail "the operator's service account cannot $*"; }
denied() { ! can "$@" >/dev/null || fail "the operator's service account can $* (least privilege)"; }
allowed list workerpools.workerpool.dev -n "$TEST_NS"
allowed watch workerpools.workerpool.dev -n "$TEST_NS"
allowed patch workerpools.workerpool.dev --subresource=status -n "$TEST_NS"
allowed create pods -n "$TEST_NS"
allowed delete pods -n "$TEST_NS"
allowed patch pods -n "$TEST_NS"
allowed create configmaps -n "$TEST_NS"
allowed patch configmaps -n "$TEST_NS"
allowed create roles.rbac.authorization.k8s.io -n "$TEST_NS"
allowed create rolebindings.rbac.authorization.k8s.io -n "$TEST_NS"
allowed create events.events.k8s.io -n "$TEST_NS"
allowed create leases.coordination.k8s.io -n "$OP_NS"
allowed update leases.coordination.k8s.io/"$LEASE" -n "$OP_NS"
denied update leases.coordination.k8s.io/another-lease -n "$OP_NS"
denied create leases.coordination.k8s.io -n "$TEST_NS"
denied list pods -n default
denied list workerpools.workerpool.dev -n default
denied get secrets -n "$TEST_NS"
denied update workerpools.workerpool.dev -n "$TEST_NS"
denied patch workerpools.workerpool.dev --subresource=scale -n "$TEST_NS"
denied patch workerpools.workerpool.dev -n "$TEST_NS"
denied delete configmaps -n "$TEST_NS"
denied create deployments.apps -n "$TEST_NS"
denied create clusterroles.rbac.authorization.k8s.io

phase "the examples pass the CRD's schema (server-side dry run)"
k apply --dry-run=server -n "$TEST_NS" -f "$ROOT/examples/symfony/workerpool.yaml" \
  -f "$ROOT/examples/laravel/workerpool.yaml" >&2 || fail "an example WorkerPool is refused by the API server"

phase "a WorkerPool of the test worker gets its pod Running"
cat >"$WORK/pool.yaml" <<EOF
apiVersion: workerpool.dev/v1alpha1
kind: WorkerPool
metadata:
  name: $POOL
spec:
  replicas: 1
  consumer:
    limits: {messages: 1000}
    timeLimitJitterPercent: 0
  rollout: {strategy: Rolling, drainTimeoutSeconds: 60}
  template:
    spec:
      terminationGracePeriodSeconds: 3
      containers:
        - name: worker
          image: $WORKER_IMAGE
          imagePullPolicy: Never
          command: ["/test-worker"]
          env:
            - {name: MESSAGE_SECONDS, value: "1"}
EOF
k apply -n "$TEST_NS" -f "$WORK/pool.yaml" >&2 || fail "cannot create the WorkerPool"

# pool_at N [REVISION]: N live worker pods, all Running and Ready (of REVISION when given), and the
# pool's status agrees (replicas, readyReplicas, updatedReplicas, nothing draining)
pool_at() {
  k get pods -n "$TEST_NS" -l "workerpool.dev/pool=$POOL" -o json >"$WORK/pods.json" || return 1
  jq -e --argjson n "$1" --arg rev "${2:-}" '[.items[] | select(.metadata.deletionTimestamp == null and
      .status.phase != "Succeeded" and .status.phase != "Failed")] | length == $n and
    all(.status.phase == "Running" and (.status.conditions // [] | any(.type == "Ready" and .status == "True")) and
        ($rev == "" or .metadata.labels["workerpool.dev/revision"] == $rev))' "$WORK/pods.json" >/dev/null || return 1
  k get workerpool "$POOL" -n "$TEST_NS" -o json >"$WORK/pool.json" || return 1
  jq -e --argjson n "$1" '.status.replicas == $n and .status.readyReplicas == $n and
    .status.updatedReplicas == $n and (.status.drainingReplicas // 0) == 0' "$WORK/pool.json" >/dev/null
}
wait_for "1 worker pod Running and the pool's status at 1/1" 120 pool_at 1
k get workerpool "$POOL" -n "$TEST_NS" >&2
k get pods -n "$TEST_NS" -o wide >&2

# ------------------------------------------------------------------------------------------------
phase "find the leader; metrics"
holder() { k get lease "$LEASE" -n "$OP_NS" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
leader_is_a_pod() {
  local h
  h=$(holder) && [ -n "$h" ] && k get pod "$h" -n "$OP_NS" >/dev/null 2>&1
}
wait_for "a controller pod holding the Lease $LEASE" 60 leader_is_a_pod
LEADER=$(holder)
transitions_before=$(k get lease "$LEASE" -n "$OP_NS" -o jsonpath='{.spec.leaseTransitions}')
log "leader: $LEADER"

scrape() { # scrape POD: /metrics of one controller pod, through the API server's pod proxy
  k get --raw "/api/v1/namespaces/$OP_NS/pods/$1:8080/proxy/metrics"
}
# check_metrics FILE WORKERS [after-rollouts]: every workerpool_* series of a leader that
# manages the test pool; after the rollouts, one was observed and workers hit the drain timeout
# (workerpool_drain_timeouts_total has no line before the first timeout)
check_metrics() {
  local f=$1 workers=$2 series extra=()
  [ "${3:-}" != after-rollouts ] || extra=(
    '^workerpool_rollout_duration_seconds_count [1-9]'
    "^workerpool_drain_timeouts_total\\{namespace=\"$TEST_NS\",pool=\"$POOL\"\\} [1-9]"
  )
  for series in "${extra[@]}" \
    '^workerpool_reconciles_total\{result="ok"\} [1-9]' \
    '^workerpool_reconcile_duration_seconds_count [1-9]' \
    '^workerpool_reconcile_duration_seconds_bucket\{le="' \
    '^workerpool_pools 1$' \
    "^workerpool_workers\\{namespace=\"$TEST_NS\",pool=\"$POOL\",state=\"running\"\\} $workers\$" \
    "^workerpool_workers\\{namespace=\"$TEST_NS\",pool=\"$POOL\",state=\"draining\"\\} 0\$" \
    "^workerpool_rollouts_in_progress\\{namespace=\"$TEST_NS\",pool=\"$POOL\"\\} 0\$" \
    '^workerpool_rollout_duration_seconds_count [0-9]' \
    '^workerpool_leader 1$'; do
    grep -Eq "$series" "$f" || { cat "$f" >&2; fail "/metrics has no line matching: $series"; }
  done
}
poll_metrics() { # poll_metrics POD WORKERS [after-rollouts]: until the leader's metrics show the pool
  scrape "$1" >"$WORK/metrics.txt" 2>/dev/null &&
    NO_DIAGNOSTICS=1 check_metrics_quiet "$WORK/metrics.txt" "$2" "${3:-}"
}
check_metrics_quiet() { (check_metrics "$@") >/dev/null 2>&1; }
# wait_metrics POD WORKERS [after-rollouts]: up to 30 s for the series, then name what is missing
wait_metrics() {
  local deadline=$(($(now_ms) + 30000))
  until poll_metrics "$@"; do
    [ "$(now_ms)" -lt "$deadline" ] || break
    sleep 1
  done
  scrape "$1" >"$WORK/metrics.txt" || fail "cannot scrape /metrics of $1 through the API server's pod proxy"
  check_metrics "$WORK/metrics.txt" "${@:2}"
}
wait_metrics "$LEADER" 1
log "leader /metrics (pod proxy): $(grep -c '^workerpool_' "$WORK/metrics.txt") workerpool_* samples, all expected series present"
k get --raw "/api/v1/namespaces/$OP_NS/services/$RELEASE:http-metrics/proxy/metrics" >"$WORK/svc-metrics.txt" ||
  fail "cannot scrape the Service $RELEASE:http-metrics through the API server's service proxy"
grep -Eq '^workerpool_leader [01]$' "$WORK/svc-metrics.txt" || fail "the Service's /metrics has no workerpool_leader"
for pod in $(jq -r '.items[].metadata.name' "$WORK/op-pods.json"); do
  [ "$pod" = "$LEADER" ] && continue
  scrape "$pod" | grep -q '^workerpool_leader 0$' || fail "standby replica $pod does not report workerpool_leader 0"
done

# ------------------------------------------------------------------------------------------------
phase "delete the leader's pod, scale 1 -> 2 meanwhile: takeover"
t0=$(now_ms)
k delete pod "$LEADER" -n "$OP_NS" --wait=false >&2
k scale workerpool "$POOL" -n "$TEST_NS" --replicas=2 >&2 || fail "kubectl scale (the /scale subresource) failed"
new_leader=""
while :; do
  h=$(holder || true)
  if [ -n "$h" ] && [ "$h" != "$LEADER" ]; then
    new_leader=$h
    TAKEOVER_MS=$(($(now_ms) - t0))
    break
  fi
  [ $(($(now_ms) - t0)) -lt 60000 ] || fail "no other replica took the Lease within 60 s (holder: '${h}')"
  sleep 0.1
done
log "new leader $new_leader took the Lease $(secs "$TAKEOVER_MS")s after the old leader's pod was deleted"
k get pod "$new_leader" -n "$OP_NS" >/dev/null 2>&1 || fail "the new holder $new_leader is no controller pod"
transitions_after=$(k get lease "$LEASE" -n "$OP_NS" -o jsonpath='{.spec.leaseTransitions}')
[ "${transitions_after:-0}" -gt "${transitions_before:-0}" ] ||
  fail "leaseTransitions did not grow ($transitions_before -> $transitions_after)"
wait_for "the new leader to reconcile the scale-out: 2 workers Running, status 2/2" 120 pool_at 2
reconciled_ms=$(($(now_ms) - t0))
log "pool at 2/2 $(secs "$reconciled_ms")s after the leader's pod was deleted"
wait_for "the Deployment to replace the deleted pod (2 controller pods Ready)" 120 controller_pods_ready 2

phase "the new leader rolls the pool out: graceful, then past the drain timeout"
# 1. MESSAGE_SECONDS 1 -> 30: the old workers finish their 1 s message and exit, new ones start
# 2. another revision with drainTimeoutSeconds 2: the workers are inside a 30 s message, so the
#    controller deletes them after 2 s (Event DrainTimeout, workerpool_drain_timeouts_total)
# rollout PATCH DESCRIPTION: apply a JSON patch, wait until every worker runs the new revision
rollout() {
  local old_rev
  k get workerpool "$POOL" -n "$TEST_NS" -o json >"$WORK/pool.json" || fail "cannot read the pool"
  old_rev=$(jq -r '.status.updateRevision' "$WORK/pool.json")
  k patch workerpool "$POOL" -n "$TEST_NS" --type=json -p "$1" >&2 || fail "cannot patch the pool"
  new_rev_known() {
    k get workerpool "$POOL" -n "$TEST_NS" -o json >"$WORK/pool.json" &&
      jq -e --arg old "$old_rev" '.status.updateRevision != null and .status.updateRevision != $old' "$WORK/pool.json"
  }
  wait_for "a new updateRevision ($2)" 30 new_rev_known
  new_rev=$(jq -r '.status.updateRevision' "$WORK/pool.json")
  rollout_complete() {
    pool_at 2 "$new_rev" &&
      jq -e '.status.conditions | any(.type == "RolloutComplete" and .status == "True")' "$WORK/pool.json"
  }
  local t
  t=$(now_ms)
  wait_for "rollout $old_rev -> $new_rev complete ($2)" 180 rollout_complete
  log "rolled out $old_rev -> $new_rev ($2) in $(secs $(($(now_ms) - t)))s"
}
rollout '[{"op": "replace", "path": "/spec/template/spec/containers/0/env/0/value", "value": "30"}]' \
  "graceful: old workers finish their message"
rollout '[{"op": "replace", "path": "/spec/rollout/drainTimeoutSeconds", "value": 2},
          {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "MARKER", "value": "v3"}}]' \
  "workers busy past drainTimeoutSeconds 2 are deleted"
drain_timeout_event() { k get events -n "$TEST_NS" --field-selector reason=DrainTimeout -o name | grep -q .; }
wait_for "a DrainTimeout Event after workers were deleted past the drain timeout" 30 drain_timeout_event
wait_metrics "$new_leader" 2 after-rollouts
log "new leader /metrics: every workerpool_* series present:"
grep -E '^workerpool_[a-z_]+(\{[^}]*\})? ' "$WORK/metrics.txt" | grep -v '_bucket' | sed 's/^/  /' >&2

phase "helm uninstall"
"$HELM" uninstall "$RELEASE" -n "$OP_NS" --wait --timeout 120 >&2 || fail "helm uninstall failed"
gone() { ! k get deployment "$RELEASE" -n "$OP_NS" >/dev/null 2>&1 && ! k get clusterrole "$RELEASE" >/dev/null 2>&1; }
wait_for "the release's objects to be gone" 60 gone
no_controller_pods() { [ -z "$(k get pods -n "$OP_NS" -l app.kubernetes.io/name=workerpool-operator -o name)" ]; }
wait_for "the controller pods to be gone" 90 no_controller_pods
k get crd workerpools.workerpool.dev >/dev/null || fail "helm uninstall removed the CRD"

# ------------------------------------------------------------------------------------------------
phase "kubectl apply -k deploy/manifests (overlay: watch $TEST_NS)"
mkdir -p "$WORK/kustomize/overlay"
cp -r "$ROOT/deploy/manifests" "$WORK/kustomize/base"
cat >"$WORK/kustomize/overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../base
patches:
  - target: {kind: Deployment, name: $RELEASE}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {name: WORKERPOOL_WATCH_NAMESPACE, value: $TEST_NS}
EOF
k kustomize "$WORK/kustomize/overlay" >"$WORK/kustomized.yaml" || fail "kubectl kustomize of the overlay failed"
"$HELM" to-json <"$WORK/kustomized.yaml" >"$WORK/kustomized.json" || fail "cannot parse the kustomize output"
expect "$WORK/kustomized.json" "[.[].kind] | sort == ([\"ClusterRole\", \"ClusterRoleBinding\", \"CustomResourceDefinition\", \"Deployment\", \"Namespace\", \"Role\", \"RoleBinding\", \"Service\", \"ServiceAccount\"] | sort)" "deploy/manifests holds the operator's objects, the CRD and the Namespace"
k apply -k "$WORK/kustomize/overlay" >&2 || fail "kubectl apply -k failed"
wait_for "2 controller pods Running and Ready (kubectl apply -k)" 120 controller_pods_ready 2
k rollout status deployment/"$RELEASE" -n "$OP_NS" --timeout=60s >&2 || fail "rollout of the applied Deployment failed"
k get pods -n "$OP_NS" -o wide >&2

phase "the applied operator reconciles the pool (scale 2 -> 1)"
wait_for "a controller pod holding the Lease" 60 leader_is_a_pod
log "leader: $(holder)"
k scale workerpool "$POOL" -n "$TEST_NS" --replicas=1 >&2
wait_for "1 worker Running, status 1/1" 120 pool_at 1 "$new_rev"

phase "delete the applied operator"
k delete -f "$WORK/kustomize/base/$RELEASE.yaml" --wait=true --timeout=120s >&2 || fail "kubectl delete failed"
wait_for "the controller pods to be gone" 90 no_controller_pods
phase_end
