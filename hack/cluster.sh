#!/usr/bin/env bash
# hack/cluster.sh: a real single-node Kubernetes (v1.20.2, everything from Debian's packages) in
# its own network namespace, for this project's integration tests and demo. No Docker needed.
#
#   hack/cluster.sh up              install packages, build Kubernetes once (cached), start
#   hack/cluster.sh down            stop everything this script started, remove all its state
#   hack/cluster.sh status [-q]     exit 0 when the cluster is up and healthy
#   hack/cluster.sh kubeconfig      print the kubeconfig path (fails when there is no cluster)
#   hack/cluster.sh load-image TAR  import a docker-archive tarball into the node
#   hack/cluster.sh kubectl ARGS    kubectl against this cluster
#   hack/cluster.sh ctr ARGS        the node's containerd (namespace k8s.io)
#   hack/cluster.sh install|build   only install the Debian packages | also build Kubernetes
#
# Layout: every component runs inside the network namespace $WP_NETNS, so whatever it listens
# on or writes into iptables stays there; the host reaches the API server only through a socat
# forward on 127.0.0.1:$WP_API_PORT. All state (etcd data, certificates, containerd's root and
# state, the kubelet's root, runc state, pod network namespaces, logs) lives in $WP_STATE.
# Every process it starts is recorded in $WP_STATE/pids (pid, name, start time) and placed in
# its own cgroup, so `down` finds all of them (containerd's shims too) without matching names.
#
# Environment: WP_STATE (/tmp/workerpool-cluster), WP_CACHE (~/.cache/wp-k8s), WP_NETNS (wpk8s),
# WP_API_PORT (16443), WP_LOGS (logs of the last cluster are kept there after `down`,
# default $WP_STATE.logs), WP_KEEP_FAILED=1 (a failed `up` leaves its processes and state for
# debugging instead of cleaning up).
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib/oci.sh
. "$HACK/lib/oci.sh"

CACHE=${WP_CACHE:-$HOME/.cache/wp-k8s}
STATE=${WP_STATE:-/tmp/workerpool-cluster}
STATE=${STATE%/}
NS=${WP_NETNS:-wpk8s}
HOST_PORT=${WP_API_PORT:-16443}
LOGS=${WP_LOGS:-$STATE.logs}
BIN=$CACHE/bin
K8S_DEB=1.20.5+really1.20.2-1.1+deb12u1
K8S_ORIG=kubernetes_1.20.5+really1.20.2.orig.tar.gz
K8S_BINS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
PAUSE_REF=k8s.gcr.io/pause:3.2
NODE=node1
NODE_IP=10.244.0.1
# which cluster (state directory) owns the network namespace $NS; see check_foreign
OWNER_DIR=/run/workerpool-cluster
OWNER=$OWNER_DIR/$NS
# one cluster per machine, so `up` and `down` take one machine-wide lock (kept in the cache)
LOCK=$CACHE/.cluster.lock
KC=$STATE/kubeconfig          # for the host: https://127.0.0.1:$HOST_PORT
KC_INNER=$STATE/kubeconfig.inner  # for the components inside the namespace
TASKS=$STATE/containerd/state/io.containerd.runtime.v2.task
# sysctls the kubelet changes machine-wide at start; `down` puts the old values back
KUBELET_SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes"

if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  CGROOT=/sys/fs/cgroup                   # cgroup v2
  KUBEPODS_CGROUPS=(/sys/fs/cgroup/kubepods)
else
  CGROOT=/sys/fs/cgroup/pids              # cgroup v1: the pids hierarchy tracks our processes
  KUBEPODS_CGROUPS=(/sys/fs/cgroup/*/kubepods)
fi
# the cgroup holding every process of this cluster, named after its state directory
TRACK_CG=$CGROOT/workerpool-cluster.$(printf %s "$STATE" | sha256sum | cut -c1-12)

log() { echo "[cluster] $*" >&2; }
warn() { echo "[cluster] WARNING: $*" >&2; }
die() { echo "[cluster] ERROR: $*" >&2; exit 1; }
kubectl_() { kubectl --kubeconfig="$KC" --request-timeout=5s "$@"; }

# ---------------------------------------------------------------------------------------------
# processes

# start time of a live process (clock ticks since boot): with the pid it names one process for
# good. Fails for a zombie (killed, not yet reaped by its parent: here PID 1, which takes seconds).
starttime() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  [ "$1" != Z ] || return 1
  echo "${20}"
}

# same_process PID START: the process recorded as (PID, START) is still running
same_process() {
  local t
  [ -n "$1" ] && t=$(starttime "$1") && [ "$t" = "$2" ]
}

# the recorded pid of a component, if it is still running
component_pid() {
  [ -f "$STATE/pids" ] || return 1
  local pid name start
  while read -r pid name start; do
    if [ "$name" = "$1" ] && same_process "$pid" "$start"; then echo "$pid"; return 0; fi
  done < "$STATE/pids"
  return 1
}

# pids of all our processes that are still running (recorded ones and the tracking cgroup's)
our_pids() {
  local pid name start
  if [ -f "$STATE/pids" ]; then
    while read -r pid name start; do same_process "$pid" "$start" && echo "$pid"; done < "$STATE/pids"
  fi
  [ -f "$TRACK_CG/cgroup.procs" ] && cat "$TRACK_CG/cgroup.procs"
  return 0
}

# start NAME CMD...: run CMD in the background inside the namespace, in its own session and in
# our tracking cgroup, logging to $STATE/NAME.log; records it in $STATE/pids
start() {
  local name=$1
  shift
  # setsid and nsenter exec (no fork), so $! is the component's own pid
  # shellcheck disable=SC2016
  setsid bash -c 'echo $$ > "$1/cgroup.procs" 2>/dev/null || true; ns=$2; shift 2; exec nsenter --net="$ns" "$@"' \
    start "$TRACK_CG" "/run/netns/$NS" "$@" >"$STATE/$name.log" 2>&1 </dev/null 8>&- 9>&- &
  local pid=$!
  disown "$pid"   # no "Killed" job notices from this shell when `down` ends it
  echo "$pid $name $(starttime "$pid")" >> "$STATE/pids"
}

# ---------------------------------------------------------------------------------------------
# packages and the Kubernetes build (cached in $CACHE)

install_packages() {
  local want=(etcd-server containerd runc containernetworking-plugins iptables conntrack socat golang-go
              rsync umoci skopeo busybox-static golang-github-modern-go-reflect2-dev openssl curl iproute2
              util-linux gcc libc6-dev make)
  command -v kubectl >/dev/null 2>&1 || want+=(kubernetes-client)
  local installed missing=() p
  installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${want[@]}" 2>/dev/null | awk '$1 == "ii" {print $2}')
  for p in "${want[@]}"; do grep -qx "$p" <<<"$installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

k8s_built() {
  local b
  for b in $K8S_BINS pause; do [ -x "$BIN/$b" ] || return 1; done
}

build_k8s() {
  k8s_built && return 0
  mkdir -p "$CACHE/src" "$BIN"
  exec 8>"$CACHE/.build.lock"
  flock -w 1800 8 || die "another build holds $CACHE/.build.lock for 30 minutes"
  k8s_built && return 0   # built by someone else while we waited
  log "building Kubernetes 1.20.2 from Debian's source package into $BIN (once, about 5-10 minutes; log: $CACHE/build.log)"
  local t0=$SECONDS
  if [ ! -f "$CACHE/src/$K8S_ORIG" ]; then
    if ! grep -qs deb-src /etc/apt/sources.list.d/wp-deb-src.sources; then
      # source packages from the same Debian mirror the machine already uses
      local uri
      uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
      [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
      [ -n "$uri" ] || die "cannot find the machine's Debian mirror to fetch the kubernetes source package"
      printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$uri" > /etc/apt/sources.list.d/wp-deb-src.sources
      apt-get update -qq || die "apt-get update failed"
    fi
    (cd "$CACHE/src" && apt-get source --download-only -qq "kubernetes=$K8S_DEB" >/dev/null) \
      || die "apt-get source kubernetes=$K8S_DEB failed"
  fi
  local src=$CACHE/src/kubernetes-1.20.2
  if [ ! -d "$src" ]; then
    tar xzf "$CACHE/src/$K8S_ORIG" -C "$CACHE/src"
    # the vendored reflect2 v1.0.1 crashes under Go >= 1.18; Debian ships the fixed v1.0.2
    rm -rf "$src/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
    rm -f "$src"/vendor/github.com/modern-go/reflect2/*_test.go
  fi
  (cd "$src" && export GOPATH=$src/.go CGO_ENABLED=0 HOME=$CACHE/home && mkdir -p "$HOME" &&
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy" \
      >"$CACHE/build.log" 2>&1) \
    || { tail -20 "$CACHE/build.log" >&2; die "building Kubernetes failed; see $CACHE/build.log"; }
  local b
  for b in $K8S_BINS; do cp "$src/_output/bin/$b" "$BIN/.$b.tmp" && mv -f "$BIN/.$b.tmp" "$BIN/$b"; done
  # the pod sandbox ("pause") binary, from the same source
  gcc -Os -static -o "$BIN/.pause.tmp" "$src/build/pause/linux/pause.c" -DVERSION=3.2 && mv -f "$BIN/.pause.tmp" "$BIN/pause"
  log "built Kubernetes in $((SECONDS - t0))s"
}

# the pause image as a docker-archive, built once into the cache
pause_tar() {
  local tar=$CACHE/images/pause-3.2.tar
  if [ ! -f "$tar" ] || [ "$BIN/pause" -nt "$tar" ]; then
    local root
    root=$(mktemp -d)
    cp "$BIN/pause" "$root/pause"
    oci_image_from_dir "$root" "$PAUSE_REF" "$tar" -- --config.entrypoint /pause >&2 || { rm -rf "$root"; return 1; }
    rm -rf "$root"
  fi
  echo "$tar"
}

# ---------------------------------------------------------------------------------------------
# other clusters on this machine

# is any kubelet alive on this machine (a killed one may stay a zombie for a few seconds)
kubelet_running() {
  local pid
  for pid in $(pgrep -x kubelet); do starttime "$pid" >/dev/null && return 0; done
  return 1
}

netns_exists() { [ -e "/run/netns/$NS" ]; }
owner() { cat "$OWNER" 2>/dev/null || true; }
netns_is_ours() { [ "$(owner)" = "$STATE" ]; }

# Refuse to start next to another cluster of this kind: kubelets manage the machine-wide
# kubepods cgroups and /var/log/pods, so two of them would kill each other's containers.
check_foreign() {
  local ours pid comm cmd found="" other=""
  ours=" $(our_pids | tr '\n' ' ') "
  local netns_ino=""
  netns_exists && netns_ino=$(stat -L -c %i "/run/netns/$NS" 2>/dev/null || true)
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    comm=$(cat "$d/comm" 2>/dev/null) || continue
    case $comm in
      kubelet | kube-apiserver | kube-controller | kube-scheduler | kube-proxy | etcd | containerd) ;;
      *) continue ;;
    esac
    [[ $ours == *" $pid "* ]] && continue
    starttime "$pid" >/dev/null || continue   # gone, or a zombie
    local in_ns=""
    if [ -n "$netns_ino" ] && [ "$(readlink "$d/ns/net" 2>/dev/null)" = "net:[$netns_ino]" ]; then in_ns=1; fi
    if [ "$comm" = kubelet ] || [ -n "$in_ns" ]; then
      cmd=$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null)
      found+=$'\n'"    pid $pid: ${cmd:0:160}"
      if [[ $cmd =~ --root-dir=([^ ]*)/kubelet ]]; then other=${BASH_REMATCH[1]}; fi
    fi
  done
  if [ -n "$found" ]; then
    die "another local cluster is running on this machine (only one kubelet can run: they share the machine's cgroups):$found
  Its state directory seems to be: ${other:-unknown}
  Stop it first (a cluster of this script: WP_STATE=${other:-<its state dir>} $0 down; other scripts: their own 'down'), or use that cluster."
  fi
  local o
  o=$(owner)
  if [ -n "$o" ] && [ "$o" != "$STATE" ] && { netns_exists || [ -d "$o" ]; }; then
    die "the network namespace $NS belongs to the cluster in $o (not $STATE); its processes are gone but its state remains.
  Clean it up with: WP_STATE=$o $0 down"
  fi
  if [ -z "$o" ] && netns_exists; then
    die "a network namespace $NS exists that this script did not create (another cluster, e.g. the reference script's?).
  Stop that cluster with its own 'down', or remove the namespace (ip netns del $NS), or set WP_NETNS."
  fi
  local listener
  listener=$(ss -Hltnp "sport = :$HOST_PORT" 2>/dev/null | head -1 || true)
  if [ -n "$listener" ]; then
    pid=$(grep -o 'pid=[0-9]*' <<<"$listener" | head -1 | cut -d= -f2)
    if [ -z "$pid" ] || [[ $ours != *" $pid "* ]]; then
      die "port $HOST_PORT on the host is already in use: $listener (set WP_API_PORT to use another)"
    fi
  fi
}

# ---------------------------------------------------------------------------------------------
# health

API_REASON=""
healthy() {
  API_REASON=""
  [ -f "$STATE/ready" ] || { API_REASON="not started (no $STATE/ready)"; return 1; }
  local pid name start
  while read -r pid name start; do
    same_process "$pid" "$start" || { API_REASON="$name (pid $pid) is not running"; return 1; }
  done < "$STATE/pids"
  local token
  token=$(cat "$STATE/token")
  [ "$(curl -sk --max-time 3 -H "Authorization: Bearer $token" "https://127.0.0.1:$HOST_PORT/readyz" 2>/dev/null)" = ok ] \
    || { API_REASON="the API server does not answer ready on 127.0.0.1:$HOST_PORT"; return 1; }
  [ "$(node_ready)" = True ] || { API_REASON="node $NODE is not Ready"; return 1; }
}

node_ready() {
  kubectl_ get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# up

# fail COMPONENT MESSAGE: report a component that failed to start, with the tail of its log
fail() {
  local c=$1
  shift
  echo "[cluster] ERROR: $*" >&2
  if [ -f "$STATE/$c.log" ]; then
    echo "[cluster] ---- last 25 lines of $c.log ----" >&2
    tail -25 "$STATE/$c.log" >&2
    echo "[cluster] ----" >&2
  fi
  if [ "${WP_KEEP_FAILED:-}" = 1 ]; then
    echo "[cluster] WP_KEEP_FAILED=1: processes and state kept; logs in $STATE/*.log; clean up with: $0 down" >&2
  else
    echo "[cluster] full logs: $LOGS/$c.log (kept after cleanup); set WP_KEEP_FAILED=1 to keep the failed cluster" >&2
  fi
  exit 1
}

# wait_until TIMEOUT WHAT COMPONENT... -- PROBE...: wait for PROBE to succeed, failing early
# when one of the components it depends on has exited
wait_until() {
  local timeout=$1 what=$2
  shift 2
  local comps=()
  while [ "$1" != -- ]; do comps+=("$1"); shift; done
  shift
  local deadline=$((SECONDS + timeout)) c t0=${EPOCHREALTIME/./}
  until "$@" >/dev/null 2>&1; do
    for c in "${comps[@]}"; do
      component_pid "$c" >/dev/null || fail "$c" "$c exited while waiting for $what"
    done
    [ $SECONDS -lt $deadline ] || fail "${comps[0]}" "timed out after ${timeout}s waiting for $what"
    sleep 0.3
  done
  local us=$((${EPOCHREALTIME/./} - t0))
  [ "${WP_VERBOSE:-}" != 1 ] || log "$((us / 1000000)).$((us / 100000 % 10))s waiting for $what"
}

api_ready() {
  [ "$(nsenter --net="/run/netns/$NS" curl -sk --max-time 2 -H "Authorization: Bearer $(cat "$STATE/token")" \
    https://127.0.0.1:6443/readyz)" = ok ]
}
containerd_ready() { timeout 5 ctr --address "$STATE/containerd.sock" version; }
node_is_ready() { [ "$(node_ready)" = True ]; }
# before 1.24, pods are refused until the service account's token secret exists
default_sa_exists() { [ -n "$(kubectl_ -n default get serviceaccount default -o jsonpath='{.secrets[0].name}')" ]; }
proxy_synced() {
  nsenter --net="/run/netns/$NS" iptables -w 5 -t nat -S KUBE-SERVICES 2>/dev/null | grep -q 'default/kubernetes:https'
}

on_up_exit() {
  local rc=$?
  trap - EXIT INT TERM
  [ $rc -eq 0 ] && return 0
  if [ "${WP_KEEP_FAILED:-}" = 1 ]; then exit $rc; fi
  log "up failed (exit $rc): cleaning up what it started"
  teardown || true
  exit $rc
}

up() {
  take_lock
  if [ -e "$STATE" ] && healthy; then
    log "already up and healthy: KUBECONFIG=$KC"
    echo "$KC"
    return 0
  fi
  check_foreign
  if [ -e "$STATE" ] || [ -n "$(owner)" ]; then
    log "a previous cluster in $STATE is not healthy (${API_REASON:-state left behind}): cleaning it up first"
    teardown || die "could not clean up the previous cluster in $STATE (see the warnings above)"
  fi
  install_packages
  build_k8s
  local t0=$SECONDS
  trap on_up_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  mkdir -p "$STATE"/{certs,cni,cni-ipam,containerd,kubelet,runc} "$OWNER_DIR"
  echo "$STATE" > "$OWNER"
  : > "$STATE/pids"
  cat > "$STATE/cluster.env" <<EOF
WP_STATE=$STATE
WP_NETNS=$NS
WP_API_PORT=$HOST_PORT
WP_CACHE=$CACHE
EOF
  # things the host had before, so that `down` can leave it the same
  local s
  for s in $KUBELET_SYSCTLS; do echo "$s=$(sysctl -n "$s")"; done > "$STATE/sysctl.orig"
  mountpoint -q /run/netns 2>/dev/null || touch "$STATE/created-run-netns-mount"
  # host directories the kubelet, containerd's shims and the CNI library use whatever they are told
  for s in /var/log/pods /var/log/containers /var/lib/kubelet /var/lib/cni /run/containerd; do
    [ -e "$s" ] || echo "$s" >> "$STATE/created-dirs"
  done
  mkdir -p "$TRACK_CG"

  ip netns add "$NS"
  ip -n "$NS" link set lo up
  ip -n "$NS" link add wpbr0 type bridge
  ip -n "$NS" addr add "$NODE_IP/24" dev wpbr0
  ip -n "$NS" link set wpbr0 up
  nsenter --net="/run/netns/$NS" sysctl -qw net.ipv4.ip_forward=1

  local token
  token=$(openssl rand -hex 16)
  echo "$token" > "$STATE/token"
  chmod 600 "$STATE/token"
  echo "$token,admin,admin,system:masters" > "$STATE/certs/tokens.csv"
  openssl genrsa -out "$STATE/certs/sa.key" 2048 2>/dev/null
  openssl rsa -in "$STATE/certs/sa.key" -pubout -out "$STATE/certs/sa.pub" 2>/dev/null
  write_kubeconfig "$KC_INNER" https://127.0.0.1:6443 "$token"

  start etcd etcd --name node1 --data-dir "$STATE/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster node1=http://127.0.0.1:2380
  start apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --advertise-address=$NODE_IP --secure-port=6443 --insecure-port=0 \
    --cert-dir="$STATE/certs" --token-auth-file="$STATE/certs/tokens.csv" --authorization-mode=Node,RBAC \
    --service-account-key-file="$STATE/certs/sa.pub" --service-account-signing-key-file="$STATE/certs/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.96.0.0/24 \
    --allow-privileged=true --kubelet-preferred-address-types=InternalIP

  # containerd: everything under $STATE, pod network namespaces included
  cat > "$STATE/containerd/config.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "$STATE/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_REF"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$STATE/runc"
        SystemdCgroup = false
EOF
  cat > "$STATE/cni/10-wpnet.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "wpnet", "plugins": [
  {"type": "bridge", "bridge": "wpbr0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni-ipam", "ranges": [[{"subnet": "10.244.0.0/24", "rangeStart": "10.244.0.10"}]], "routes": [{"dst": "10.96.0.0/24"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}, {"type": "loopback"}]}
EOF
  start containerd containerd --config "$STATE/containerd/config.toml"
  wait_until 30 "containerd to answer on $STATE/containerd.sock" containerd -- containerd_ready
  local pause
  pause=$(pause_tar) || fail containerd "could not build the pause image"
  timeout 120 ctr --address "$STATE/containerd.sock" -n k8s.io images import "$pause" >/dev/null \
    || fail containerd "could not import the pause image into containerd"

  # the kubelet takes seconds to initialise and retries until the API server answers: start it now
  cat > "$STATE/kubelet-config.yaml" <<EOF
kind: KubeletConfiguration
apiVersion: kubelet.config.k8s.io/v1beta1
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failSwapOn: false
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
enforceNodeAllocatable: []
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: /etc/resolv.conf
volumePluginDir: $STATE/kubelet/volume-plugins
# the node turns Ready at the first status update after the kubelet's first sync (default every 10s)
nodeStatusUpdateFrequency: 2s
EOF
  start kubelet "$BIN/kubelet" --config="$STATE/kubelet-config.yaml" --kubeconfig="$KC_INNER" \
    --container-runtime=remote --container-runtime-endpoint="unix://$STATE/containerd.sock" \
    --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" --hostname-override=$NODE --node-ip=$NODE_IP
  wait_until 60 "the API server to be ready" apiserver etcd -- api_ready
  write_kubeconfig "$KC" "https://127.0.0.1:$HOST_PORT" "$token" "$STATE/certs/apiserver.crt"
  start controller-manager "$BIN/kube-controller-manager" --kubeconfig="$KC_INNER" \
    --authentication-kubeconfig="$KC_INNER" --authorization-kubeconfig="$KC_INNER" \
    --service-account-private-key-file="$STATE/certs/sa.key" --root-ca-file="$STATE/certs/apiserver.crt" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port=10257 --controllers='*,-nodeipam' \
    --flex-volume-plugin-dir="$STATE/controller-manager/flexvolume"
  start scheduler "$BIN/kube-scheduler" --kubeconfig="$KC_INNER" --authentication-kubeconfig="$KC_INNER" \
    --authorization-kubeconfig="$KC_INNER" --leader-elect=false --bind-address=127.0.0.1 --secure-port=10259 --port=0

  start kube-proxy "$BIN/kube-proxy" --kubeconfig="$KC_INNER" --cluster-cidr=10.244.0.0/24 \
    --hostname-override=$NODE --proxy-mode=iptables --conntrack-max-per-core=0 \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256

  # the host reaches the API server through 127.0.0.1 only; socat runs outside the namespace
  # shellcheck disable=SC2016
  setsid bash -c 'echo $$ > "$1/cgroup.procs" 2>/dev/null || true; shift; exec "$@"' start "$TRACK_CG" \
    socat "TCP-LISTEN:$HOST_PORT,bind=127.0.0.1,fork,reuseaddr" \
    EXEC:"nsenter --net=/run/netns/$NS socat STDIO TCP\:127.0.0.1\:6443" >"$STATE/socat.log" 2>&1 </dev/null 8>&- 9>&- &
  echo "$! socat $(starttime $!)" >> "$STATE/pids"
  disown $!

  wait_until 20 "the API server on 127.0.0.1:$HOST_PORT (socat)" socat apiserver -- kubectl_ get --raw /readyz
  wait_until 90 "node $NODE to be Ready" kubelet containerd apiserver -- node_is_ready
  wait_until 60 "the default service account and its token" controller-manager apiserver -- default_sa_exists
  wait_until 30 "kube-proxy to program the kubernetes service" kube-proxy -- proxy_synced
  touch "$STATE/ready"
  trap - EXIT INT TERM
  log "up in $((SECONDS - t0))s: node $NODE Ready; KUBECONFIG=$KC"
  echo "$KC"
}

# write_kubeconfig FILE SERVER TOKEN [CA_FILE]: with CA_FILE the server's certificate is verified
# (the API server's self-signed certificate names "localhost" but not 127.0.0.1, hence
# tls-server-name); without, it is not (the components' own kubeconfig, loopback only)
write_kubeconfig() {
  local tls="    insecure-skip-tls-verify: true"
  if [ -n "${4:-}" ]; then
    tls="    certificate-authority-data: $(base64 -w0 "$4")
    tls-server-name: localhost"
  fi
  cat > "$1.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: workerpool-local
  cluster:
    server: $2
$tls
users:
- name: admin
  user:
    token: $3
contexts:
- name: workerpool-local
  context:
    cluster: workerpool-local
    user: admin
current-context: workerpool-local
EOF
  chmod 600 "$1.tmp"
  mv -f "$1.tmp" "$1"
}

# ---------------------------------------------------------------------------------------------
# down

take_lock() {
  mkdir -p "$CACHE"
  exec 9>"$LOCK"
  flock -w 300 9 || die "another '$0' holds $LOCK (waited 5 minutes)"
}

kill_pids() { # SIGNAL PID...
  local sig=$1
  shift
  [ $# -gt 0 ] && kill "-$sig" "$@" 2>/dev/null
  return 0
}

# containers: PID 1 of each container's pid namespace (init.pid, checked against the
# container's cgroup), then anything left in the container's cgroup
kill_containers() {
  local b id pid cg
  for b in "$TASKS"/*/*/; do
    [ -d "$b" ] || continue
    id=$(basename "$b")
    pid=$(cat "$b/init.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && grep -qs "$id" "/proc/$pid/cgroup"; then kill -9 "$pid" 2>/dev/null || true; fi
    while read -r cg; do
      # shellcheck disable=SC2046
      kill_pids 9 $(cat "$cg/cgroup.procs" 2>/dev/null)
    done < <(find "${KUBEPODS_CGROUPS[@]}" -type d -name "$id" 2>/dev/null)
  done
}

stop_components() {
  local pid name start pids=()
  if [ -f "$STATE/pids" ]; then
    while read -r pid name start; do
      same_process "$pid" "$start" && pids+=("$pid")
    done < <(tac "$STATE/pids")
  fi
  if [ ${#pids[@]} -gt 0 ]; then
    kill_pids TERM "${pids[@]}"
    for _ in $(seq 1 30); do
      local alive=()
      for pid in "${pids[@]}"; do starttime "$pid" >/dev/null && alive+=("$pid"); done
      [ ${#alive[@]} -eq 0 ] && break
      sleep 0.1
    done
    while read -r pid name start; do
      same_process "$pid" "$start" && kill -9 "$pid" 2>/dev/null
    done < <(tac "$STATE/pids")
  fi
  # everything else we started: containerd's shims, socat's per-connection children
  if [ -f "$TRACK_CG/cgroup.procs" ]; then
    for _ in $(seq 1 50); do
      # shellcheck disable=SC2046
      set -- $(cat "$TRACK_CG/cgroup.procs" 2>/dev/null)
      [ $# -eq 0 ] && break
      kill_pids 9 "$@"
      sleep 0.1
    done
  fi
  # without the cgroup (e.g. it could not be created): the shims containerd recorded
  local f
  for f in "$TASKS"/*/*/shim.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-address $STATE/containerd.sock"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  return 0
}

our_mounts() {
  awk -v s="$STATE" '{ m = $2; gsub(/\\040/, " ", m); if (m == s || index(m, s "/") == 1) print m }' /proc/mounts | sort -r
}

unmount_all() {
  local _ m
  for _ in 1 2 3 4 5; do
    local ms
    ms=$(our_mounts)
    [ -z "$ms" ] && return 0
    while read -r m; do umount -l "$m" 2>/dev/null || true; done <<<"$ms"
  done
  [ -z "$(our_mounts)" ]
}

teardown() {
  local ok=0 n f d s
  kill_containers
  stop_components
  # network namespaces: pods' (normally under $STATE, see netns_mounts_under_state_dir, but
  # also any the CNI left in /run/netns), then the cluster's own
  while read -r n; do
    [ -n "$n" ] && { ip netns del "$(basename "$n")" 2>/dev/null || true; }
  done < <(cat "$TASKS"/*/*/config.json 2>/dev/null | grep -o '/run/netns/cni-[0-9a-f-]*' | sort -u)
  unmount_all || { warn "mounts left under $STATE: $(our_mounts | tr '\n' ' ')"; ok=1; }
  if netns_exists && [ "$(owner)" = "$STATE" ]; then
    ip netns del "$NS" 2>/dev/null || { warn "could not delete network namespace $NS"; ok=1; }
  fi
  if [ -f "$STATE/created-run-netns-mount" ] && mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ]; then
    if umount /run/netns 2>/dev/null; then rmdir /run/netns 2>/dev/null || true; fi
  fi
  # cgroups: ours, and the kubelet's kubepods when no kubelet runs any more (rmdir only
  # removes empty ones)
  if [ -d "$TRACK_CG" ]; then
    for n in $(seq 1 20); do rmdir "$TRACK_CG" 2>/dev/null && break; sleep 0.1; done
    [ -d "$TRACK_CG" ] && { warn "processes left in $TRACK_CG: $(tr '\n' ' ' < "$TRACK_CG/cgroup.procs")"; ok=1; }
  fi
  if ! kubelet_running; then
    for d in "${KUBEPODS_CGROUPS[@]}"; do
      [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    done
  fi
  # files the shims and the kubelet leave outside $STATE when they are killed
  for f in "$TASKS"/*/*/address; do
    [ -f "$f" ] || continue
    s=$(sed 's#^unix://##' "$f")
    case $s in /run/containerd/s/*) rm -f "$s" ;; esac
  done
  for d in "$TASKS"/*/*/; do
    [ -d "$d" ] && rm -f /var/lib/cni/results/*-"$(basename "$d")"-*
  done
  for d in "$STATE"/kubelet/pods/*/; do
    [ -d "$d" ] || continue
    s=$(basename "$d")
    rm -rf /var/log/pods/*_"$s"
    find /var/log/containers -maxdepth 1 -type l -lname "*_$s/*" -delete 2>/dev/null || true
  done
  if ! kubelet_running; then rm -f /var/lib/kubelet/device-plugins/kubelet.sock; fi
  # host directories that did not exist before `up` hold only what this cluster put there
  if [ -f "$STATE/created-dirs" ]; then
    while read -r d; do
      case $d in /var/log/pods | /var/log/containers | /var/lib/kubelet | /var/lib/cni | /run/containerd) rm -rf "$d" ;; esac
    done < "$STATE/created-dirs"
  fi
  if [ -f "$STATE/sysctl.orig" ]; then
    while IFS='=' read -r s n; do sysctl -qw "$s=$n" 2>/dev/null || true; done < "$STATE/sysctl.orig"
  fi
  # keep the logs of the last cluster, then remove the state
  if compgen -G "$STATE/*.log" >/dev/null; then
    rm -rf "$LOGS"
    mkdir -p "$LOGS"
    cp "$STATE"/*.log "$LOGS/" 2>/dev/null || true
  fi
  if [ -e "$STATE" ]; then
    rm -rf "$STATE" 2>/dev/null || { warn "could not remove $STATE completely"; ok=1; }
  fi
  if [ "$(owner)" = "$STATE" ]; then rm -f "$OWNER"; rmdir "$OWNER_DIR" 2>/dev/null || true; fi
  return $ok
}

down() {
  take_lock
  if [ ! -e "$STATE" ] && [ "$(owner)" != "$STATE" ]; then
    log "no cluster in $STATE: nothing to do"
    return 0
  fi
  local t0=$SECONDS
  teardown || die "down finished with leftovers (see the warnings above)"
  log "down in $((SECONDS - t0))s (logs of the last cluster: $LOGS)"
}

# ---------------------------------------------------------------------------------------------

status() {
  local quiet=${1:-}
  if [ ! -e "$STATE" ]; then
    [ -n "$quiet" ] || echo "no cluster ($STATE does not exist)"
    return 1
  fi
  if healthy; then
    [ -n "$quiet" ] || {
      echo "up and healthy: KUBECONFIG=$KC"
      local pid name start
      while read -r pid name start; do printf '  %-20s pid %s\n' "$name" "$pid"; done < "$STATE/pids"
    }
    return 0
  fi
  [ -n "$quiet" ] || echo "not healthy: $API_REASON (state: $STATE; '$0 up' restarts it, '$0 down' cleans up)"
  return 1
}

require_up() {
  { [ -S "$STATE/containerd.sock" ] && component_pid containerd >/dev/null; } \
    || die "the cluster is not up ($STATE): run 'make cluster-up' (hack/cluster.sh up) first"
}

load_image() {
  local tar=${1:?usage: $0 load-image TAR}
  [ -f "$tar" ] || die "no such file: $tar"
  require_up
  timeout 300 ctr --address "$STATE/containerd.sock" -n k8s.io images import "$tar" >/dev/null \
    || die "importing $tar into the node failed (containerd log: $STATE/containerd.log)"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  up) up ;;
  down) down ;;
  status) status "${1:+quiet}" ;;
  kubeconfig)
    [ -f "$KC" ] || die "no cluster: $KC does not exist; run 'make cluster-up'"
    echo "$KC" ;;
  load-image) load_image "${1:-}" ;;
  kubectl) exec kubectl --kubeconfig="$KC" "$@" ;;
  ctr) require_up; exec ctr --address "$STATE/containerd.sock" -n k8s.io "$@" ;;
  install) install_packages ;;
  build) install_packages; build_k8s ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2 ;;
esac
