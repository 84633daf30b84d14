#!/usr/bin/env bash
# hack/images.sh: build the project's images without Docker and import them into the local
# cluster's node (root filesystem directory -> umoci -> skopeo docker-archive -> ctr import).
#
#   workerpool-operator:dev            the static `workerpool` binary at /workerpool (entrypoint),
#                                      user 65532, nothing else (the Dockerfile builds the same)
#   workerpool-test-worker:v1 and :v2  one image with two tags: Debian's busybox-static with its
#                                      applet links, and /test-worker (hack/images/test-worker)
#
#   hack/images.sh            build (when an input changed) and import into the running cluster
#   hack/images.sh --no-load  only build the docker-archive tarballs into target/images
#
# Pods use them with imagePullPolicy: Never. Environment: WP_IMAGES_DIR (target/images), and
# those of hack/cluster.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HACK=$ROOT/hack
# shellcheck source=hack/lib/oci.sh
. "$HACK/lib/oci.sh"
OUT=${WP_IMAGES_DIR:-$ROOT/target/images}
TARGET=x86_64-unknown-linux-gnu
OPERATOR_REF=workerpool-operator:dev
WORKER_REF=workerpool-test-worker:v1
WORKER_REF2=workerpool-test-worker:v2

log() { echo "[images] $*" >&2; }
die() { echo "[images] ERROR: $*" >&2; exit 1; }

load=1
case ${1:-} in
  --no-load) load=0 ;;
  "") ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

# fail before the slow build when there is no cluster to import into
if [ $load = 1 ] && ! "$HACK/cluster.sh" status -q; then
  die "the local cluster is not up: run 'make cluster-up' first ($("$HACK/cluster.sh" status 2>&1 | head -1))"
fi
"$HACK/cluster.sh" install   # umoci, skopeo, busybox-static
mkdir -p "$OUT"
t0=$SECONDS

# --- the static binary -------------------------------------------------------------------------
log "building the static workerpool binary (cargo build --release --target $TARGET, crt-static)"
(cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --target "$TARGET" --bin workerpool) || die "cargo build of the static binary failed"
BIN=$ROOT/target/$TARGET/release/workerpool
if readelf -l "$BIN" | grep -q 'program interpreter'; then
  die "$BIN is dynamically linked; the images need a static binary"
fi
"$BIN" --version >/dev/null || die "$BIN does not run"

# inputs_changed NAME FILE...: true when the tarball NAME.tar is missing or was built from other inputs
inputs_changed() {
  local name=$1
  shift
  sha256sum "$@" "$HACK/lib/oci.sh" "$0" | awk '{print $1}' > "$OUT/$name.inputs.new"
  if [ -f "$OUT/$name.tar" ] && cmp -s "$OUT/$name.inputs.new" "$OUT/$name.inputs"; then
    rm -f "$OUT/$name.inputs.new"
    return 1
  fi
  return 0
}
built() { mv -f "$OUT/$1.inputs.new" "$OUT/$1.inputs"; }

# --- workerpool-operator:dev -------------------------------------------------------------------
if inputs_changed operator "$BIN"; then
  log "image $OPERATOR_REF"
  root=$(mktemp -d)
  install -m 0755 "$BIN" "$root/workerpool"
  oci_image_from_dir "$root" "$OPERATOR_REF" "$OUT/operator.tar" -- \
    --config.entrypoint /workerpool --config.user 65532:65532 --config.workingdir / \
    || { rm -rf "$root"; die "building $OPERATOR_REF failed"; }
  rm -rf "$root"
  built operator
else
  log "image $OPERATOR_REF: inputs unchanged, reusing $OUT/operator.tar"
fi

# --- workerpool-test-worker:v1 / :v2 -----------------------------------------------------------
BUSYBOX=/bin/busybox
if readelf -l "$BUSYBOX" | grep -q 'program interpreter'; then
  die "$BUSYBOX is not the static busybox (package busybox-static)"
fi
if inputs_changed test-worker "$HACK/images/test-worker" "$BUSYBOX"; then
  log "image $WORKER_REF (+ $WORKER_REF2)"
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp}
  chmod 1777 "$root/tmp"
  install -m 0755 "$BUSYBOX" "$root/bin/busybox"
  while read -r applet; do
    if [ -n "$applet" ] && [ ! -e "$root/$applet" ]; then ln -s /bin/busybox "$root/$applet"; fi
  done < <("$BUSYBOX" --list-full)
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
  install -m 0755 "$HACK/images/test-worker" "$root/test-worker"
  oci_image_from_dir "$root" "$WORKER_REF" "$OUT/test-worker.tar" --additional-tag "$WORKER_REF2" -- \
    --config.cmd /test-worker --config.env PATH=/bin:/sbin:/usr/bin:/usr/sbin --config.workingdir / \
    || { rm -rf "$root"; die "building $WORKER_REF failed"; }
  rm -rf "$root"
  built test-worker
else
  log "image $WORKER_REF: inputs unchanged, reusing $OUT/test-worker.tar"
fi

if [ $load = 0 ]; then
  log "built in $((SECONDS - t0))s: $OUT/operator.tar $OUT/test-worker.tar"
  exit 0
fi

# --- import into the node (always: the node may be new since the last build) -------------------
for tar in "$OUT/operator.tar" "$OUT/test-worker.tar"; do
  "$HACK/cluster.sh" load-image "$tar"
done
present=$(timeout 60 "$HACK/cluster.sh" ctr images ls -q) || die "cannot list the images in the node"
for ref in $OPERATOR_REF $WORKER_REF $WORKER_REF2; do
  grep -qx "docker.io/library/$ref" <<<"$present" || die "$ref is not in the node after the import"
done
log "images ready in the node in $((SECONDS - t0))s: $OPERATOR_REF $WORKER_REF $WORKER_REF2 (use imagePullPolicy: Never)"
