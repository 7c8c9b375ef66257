# Sourced by k8s-assets.sh and node-assets.sh: the Kubernetes pin and the Go builds both use.
# The caller sets $bin_dir (where binaries go) and log().

K8S_VERSION=v1.34.4    # kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy

# Builds <pkg...> of module <module>@<version> in a throwaway wrapper module, so that the
# module's own `replace` directives (which point at its source tree) do not apply; extra
# `replace` pairs can be given in $REPLACES.
build() (
  module=$1 version=$2 ldflags=$3; shift 3
  work=$(mktemp -d "${TMPDIR:-/tmp}/autoglm-go-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  cd "$work"
  go mod init autoglm.local/assets >/dev/null 2>&1
  go mod edit -require="$module@$version"
  for r in ${REPLACES:-}; do go mod edit -replace="$r"; done
  export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
  go build -trimpath -ldflags "-s -w $ldflags" -o "$bin_dir/" "$@"
)

# Builds commands of k8s.io/kubernetes at $K8S_VERSION (e.g. k8s.io/kubernetes/cmd/kubelet),
# CGO off as Kubernetes' own release builds them. k8s.io/kubernetes points its staging
# modules at ./staging/src; each is pinned to its published v0.X.Y instead.
build_kubernetes() {
  local modfile staging_version k8s_replaces minor v
  modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  staging_version="v0.${K8S_VERSION#v1.}"
  k8s_replaces=$(sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$modfile" |
    while read -r m; do echo "$m=$m@$staging_version"; done)
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  v="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  v="$v -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  REPLACES="$k8s_replaces" build k8s.io/kubernetes "$K8S_VERSION" "$v" "$@"
}
