#!/usr/bin/env bash
# Provide pinned Kubernetes control-plane binaries for the test suite and print
# the directory that holds them (stdout: that path, nothing else).
#
# Where they come from:
#   1. $KUBEBUILDER_ASSETS (controller-runtime envtest's convention), if it holds all six;
#   2. the cache, keyed by version: ${AUTOGLM_CACHE:-~/.cache/autoglm}/k8s/<versions>/bin;
#   3. a build from the published Go modules with the installed Go toolchain, into (2).
# Nothing is written inside the repository.
set -euo pipefail

source "$(dirname "$0")/go-build.sh"   # K8S_VERSION, build, build_kubernetes
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.7.0
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

cache_root=${AUTOGLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autoglm}
bin_dir="$cache_root/k8s/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION/bin"
log() { echo "k8s-assets: $*" >&2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  ok=1
  for b in "${BINARIES[@]}"; do [[ -x "$KUBEBUILDER_ASSETS/$b" ]] || ok=0; done
  if ((ok)); then
    log "using \$KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
    echo "$KUBEBUILDER_ASSETS"
    exit 0
  fi
  log "\$KUBEBUILDER_ASSETS lacks some of ${BINARIES[*]}; using the pinned build in $bin_dir"
fi
mkdir -p "$bin_dir"

missing() { for b in "$@"; do [[ -x "$bin_dir/$b" ]] || return 0; done; return 1; }

command -v go >/dev/null || { missing "${BINARIES[@]}" && { log "Go toolchain not found; it is needed to build the missing binaries"; exit 1; }; }

if missing kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  log "building Kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl); a cold build takes several minutes"
  start=$SECONDS
  build_kubernetes k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
  log "Kubernetes built in $((SECONDS - start)) s"
fi

if missing etcd; then
  log "building etcd $ETCD_VERSION"
  start=$SECONDS
  build go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "" go.etcd.io/etcd/server/v3
  mv "$bin_dir/v3" "$bin_dir/etcd" 2>/dev/null || mv "$bin_dir/server" "$bin_dir/etcd"
  log "etcd built in $((SECONDS - start)) s"
fi

if missing kwok; then
  log "building kwok $KWOK_VERSION"
  start=$SECONDS
  build sigs.k8s.io/kwok "$KWOK_VERSION" "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
  log "kwok built in $((SECONDS - start)) s"
fi

echo "$bin_dir"
