# shellcheck shell=bash
# Building OCI images without a Docker engine: root filesystem directory -> umoci -> skopeo.
# Sourced by hack/cluster.sh (the pause image) and hack/images.sh (the project's images).

# oci_image_from_dir ROOTFS_DIR REF TAR [--additional-tag REF]... [-- UMOCI_CONFIG_ARGS...]
#   Writes a docker-archive tarball TAR holding one image, tagged REF (and every additional
#   tag), whose single layer is the content of ROOTFS_DIR (owners and modes kept as they are
#   on disk). UMOCI_CONFIG_ARGS are `umoci config` options, e.g. --config.entrypoint /x.
oci_image_from_dir() {
  local dir=$1 ref=$2 tar=$3
  shift 3
  local extra_tags=() config=()
  while [ $# -gt 0 ]; do
    case $1 in
      --additional-tag) extra_tags+=(--additional-tag "$2"); shift 2 ;;
      --) shift; config=("$@"); break ;;
      *) echo "oci_image_from_dir: unexpected argument $1" >&2; return 2 ;;
    esac
  done
  local work rc=0
  work=$(mktemp -d "${TMPDIR:-/tmp}/oci-image.XXXXXX")
  {
    umoci init --layout "$work/oci" >/dev/null &&
    umoci new --image "$work/oci:img" >/dev/null &&
    umoci unpack --rootless --image "$work/oci:img" "$work/bundle" >/dev/null 2>&1 &&
    cp -a "$dir"/. "$work/bundle/rootfs/" &&
    umoci repack --image "$work/oci:img" "$work/bundle" >/dev/null &&
    { [ ${#config[@]} -eq 0 ] || umoci config --image "$work/oci:img" "${config[@]}" >/dev/null; } &&
    mkdir -p "$(dirname "$tar")" &&
    rm -f "$tar.tmp" &&
    skopeo copy -q "${extra_tags[@]}" "oci:$work/oci:img" "docker-archive:$tar.tmp:$ref" >/dev/null &&
    mv -f "$tar.tmp" "$tar"
  } || rc=$?
  rm -rf "$work"
  [ $rc -eq 0 ] || echo "oci_image_from_dir: building $ref from $dir failed (exit $rc)" >&2
  return $rc
}
