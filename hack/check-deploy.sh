#!/usr/bin/env bash
# hack/check-deploy.sh: fails when the deployment files have drifted (offline, no cluster):
#   * the chart's CRD (deploy/helm/workerpool-operator/crds/) differs from crds/workerpool.yaml
#   * deploy/manifests differs from a fresh hack/render-manifests.sh
#   * the chart fails `helm lint --strict` (real Helm engine, for Kubernetes 1.20)
#   * deploy/manifests does not build with kustomize (when kubectl is there)
# Fix the first two with:  cp crds/workerpool.yaml deploy/helm/workerpool-operator/crds/ && hack/render-manifests.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART=$ROOT/deploy/helm/workerpool-operator
failed=0
problem() { echo "check-deploy: $*" >&2; failed=1; }

crd_files=$(cd "$CHART/crds" && ls)
[ "$crd_files" = "workerpool.yaml" ] || problem "the chart's crds/ must hold exactly workerpool.yaml, has: $crd_files"
cmp -s "$ROOT/crds/workerpool.yaml" "$CHART/crds/workerpool.yaml" ||
  problem "deploy/helm/workerpool-operator/crds/workerpool.yaml differs from crds/workerpool.yaml; run: cp crds/workerpool.yaml deploy/helm/workerpool-operator/crds/ && hack/render-manifests.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$ROOT/hack/render-manifests.sh" "$tmp/manifests" >/dev/null
if ! diff -ru "$ROOT/deploy/manifests" "$tmp/manifests" >"$tmp/diff"; then
  head -40 "$tmp/diff" >&2
  problem "deploy/manifests is stale (diff above, first 40 lines); run: hack/render-manifests.sh"
fi

"$ROOT/hack/helm.sh" lint "$CHART" --strict --kube-version v1.20.2 >"$tmp/lint" 2>&1 ||
  { cat "$tmp/lint" >&2; problem "helm lint --strict failed"; }

if command -v kubectl >/dev/null; then
  kubectl kustomize "$ROOT/deploy/manifests" >/dev/null 2>"$tmp/kustomize" ||
    { cat "$tmp/kustomize" >&2; problem "kubectl kustomize deploy/manifests failed"; }
fi

[ $failed -eq 0 ] || exit 1
echo "check-deploy: chart CRD in sync, deploy/manifests up to date, chart lints clean"
