#!/usr/bin/env bash
# Provide the real Prometheus Operator and a Prometheus with Kubernetes service discovery, for
# e2e/check_prometheus_operator.py, and print the directory that holds them (stdout: that
# path, nothing else; progress and cold build times go to stderr).
#
#   bin/    operator (cmd/operator of the operator's Go module); prometheus and promtool
#           (Prometheus' Go module, built with Kubernetes, file and HTTP discovery only)
#   crds/   the operator's CRDs (example/prometheus-operator-crd of its module)
#
# Cached by version under ${AUTOGLM_CACHE:-~/.cache/autoglm}/prometheus-operator/<versions>/;
# built from the published Go modules with the installed Go toolchain (cold: 4-12 minutes).
# The directory only appears once complete (built aside, then renamed), so an interrupted
# build is never taken for a cached one. Nothing is written inside the repository.
set -euo pipefail

source "$(dirname "$0")/go-build.sh"   # build
OPERATOR_MODULE=github.com/prometheus-operator/prometheus-operator
OPERATOR_VERSION=v0.94.1
# The operator's go.mod points its pkg/client at its own source tree, a nested module its
# module zip leaves out; no v0.94.x of pkg/client is published, so the previous minor's
# stands in (pkg/apis/monitoring stays at the operator's version).
OPERATOR_CLIENT_VERSION=v0.93.1
PROMETHEUS_MODULE=github.com/prometheus/prometheus
PROMETHEUS_MODULE_VERSION=v0.316.0   # Prometheus v3.16.0 as a Go module
PROMETHEUS_VERSION=3.16.0
# Every service discovery but Kubernetes' left out (file and HTTP are always in): the check
# needs no other, and the binary is ~30% smaller and quicker to build than with all of them.
PROMETHEUS_TAGS=remove_all_sd,enable_kubernetes_sd

cache_root=${AUTOGLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autoglm}
root="$cache_root/prometheus-operator"
dir="$root/$OPERATOR_VERSION-prometheus-v$PROMETHEUS_VERSION"
log() { echo "prometheus-operator: $*" >&2; }

if [[ -e "$dir/.complete" ]]; then echo "$dir"; exit 0; fi

command -v go >/dev/null || { log "Go toolchain not found; it builds the Prometheus Operator and Prometheus"; exit 1; }
mkdir -p "$root"
# Concurrent callers: one builds, the others wait for it and then use its result.
exec 9>"$root/.lock"
flock 9
if [[ -e "$dir/.complete" ]]; then echo "$dir"; exit 0; fi
rm -rf "$root"/.build.* "$dir"   # what a killed build left behind
stage=$(mktemp -d "$root/.build.XXXXXX")
chmod 755 "$stage"   # mktemp made it private; the final directory is not
trap 'rm -rf "$stage"' EXIT
bin_dir="$stage/bin"   # where go-build.sh's build puts binaries
mkdir -p "$bin_dir" "$stage/crds"

log "building the Prometheus Operator $OPERATOR_VERSION (cold: several minutes)"
start=$SECONDS
REPLACES="$OPERATOR_MODULE/pkg/client=$OPERATOR_MODULE/pkg/client@$OPERATOR_CLIENT_VERSION" \
  build "$OPERATOR_MODULE" "$OPERATOR_VERSION" \
  "-X github.com/prometheus/common/version.Version=${OPERATOR_VERSION#v}" \
  "$OPERATOR_MODULE/cmd/operator"
log "operator built in $((SECONDS - start)) s"

log "building Prometheus v$PROMETHEUS_VERSION (-tags $PROMETHEUS_TAGS; cold: several minutes)"
start=$SECONDS
pv="-X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION"
build "$PROMETHEUS_MODULE" "$PROMETHEUS_MODULE_VERSION" "$pv" \
  -tags "$PROMETHEUS_TAGS" "$PROMETHEUS_MODULE/cmd/prometheus"
log "prometheus built in $((SECONDS - start)) s"
start=$SECONDS   # promtool after prometheus: only what it adds
build "$PROMETHEUS_MODULE" "$PROMETHEUS_MODULE_VERSION" "$pv" \
  -tags "$PROMETHEUS_TAGS" "$PROMETHEUS_MODULE/cmd/promtool"
log "promtool built in $((SECONDS - start)) s"

# The CRDs as the operator's release ships them (its module is in the module cache by now).
src=$(go mod download -json "$OPERATOR_MODULE@$OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
install -m644 "$src"/example/prometheus-operator-crd/*.yaml "$stage/crds/"

touch "$stage/.complete"
mv -T "$stage" "$dir"
trap - EXIT
echo "$dir"
