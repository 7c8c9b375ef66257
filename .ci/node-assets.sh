#!/usr/bin/env bash
# Provide the pieces of the test cluster's real node and print the directory that holds
# them (stdout: that path, nothing else; progress and cold build times go to stderr).
#
#   bin/     kubelet, kube-proxy (k8s.io/kubernetes at the control plane's pinned version),
#            coredns (its Go module), pause (Kubernetes' pause.c, static), containerd,
#            containerd-shim-runc-v2, ctr, runc, iptables-nft, nft (Debian packages, unpacked)
#   cni/     bridge, host-local, portmap, loopback (Debian containernetworking-plugins)
#   lib/     shared libraries the unpacked iptables needs; lib/xtables its extensions
#   images/  pause.tar and busybox.tar: docker-archive images `ctr images import` reads
#
# Cached by version under ${AUTOGLM_CACHE:-~/.cache/autoglm}/node/<versions>/. Debian
# packages are fetched with `apt-get download` and unpacked with `dpkg -x`: nothing is
# installed into the system. Nothing is written inside the repository.
set -euo pipefail

source "$(dirname "$0")/go-build.sh"   # K8S_VERSION (the control plane's), build, build_kubernetes
COREDNS_VERSION=v1.15.0
PAUSE_TAG=3.10.1             # the pause version Kubernetes 1.34 ships
# Debian bookworm packages (versions as the configured mirror serves them).
DEBS=(containerd=1.6.20~ds1-1+deb12u3 runc=1.1.5+ds1-1+deb12u1
      containernetworking-plugins=1.1.1+ds1-3+b5 busybox-static=1:1.35.0-4+deb12u1+b1
      iptables=1.8.9-2 libip4tc2=1.8.9-2 libip6tc2=1.8.9-2 libxtables12=1.8.9-2
      libnftnl11=1.2.4-2 libmnl0=1.0.4-3 libnetfilter-conntrack3=1.0.9-3
      libnfnetlink0=1.0.2-2 libseccomp2=2.5.4-1+deb12u1
      nftables=1.0.6-2+deb12u2 libnftables1=1.0.6-2+deb12u2 libjansson4=2.14-2)
# Image names: a .local domain no registry answers for (and pulls are disabled anyway).
PAUSE_IMAGE="autoglm.local/pause:$PAUSE_TAG"
BUSYBOX_IMAGE="autoglm.local/busybox:1.35"

cache_root=${AUTOGLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autoglm}
deb_key=$(printf '%s\n' "${DEBS[@]}" | sha1sum | cut -c1-8)
dir="$cache_root/node/k8s-$K8S_VERSION-coredns-$COREDNS_VERSION-pause-$PAUSE_TAG-debs-$deb_key"
bin_dir="$dir/bin"
log() { echo "node-assets: $*" >&2; }

missing() { for f in "$@"; do [[ -e "$dir/$f" ]] || return 0; done; return 1; }
need_go() { command -v go >/dev/null || { log "Go toolchain not found; it builds $*"; exit 1; }; }
mkdir -p "$bin_dir" "$dir/cni" "$dir/images"

if missing bin/kubelet bin/kube-proxy; then
  need_go kubelet and kube-proxy
  log "building kubelet and kube-proxy $K8S_VERSION (cold: several minutes)"
  start=$SECONDS
  build_kubernetes k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
  log "kubelet and kube-proxy built in $((SECONDS - start)) s"
fi

if missing bin/coredns; then
  need_go CoreDNS
  log "building CoreDNS $COREDNS_VERSION"
  start=$SECONDS
  build github.com/coredns/coredns "$COREDNS_VERSION" "" github.com/coredns/coredns
  log "CoreDNS built in $((SECONDS - start)) s"
fi

if missing bin/pause; then
  need_go "the pause binary (for Kubernetes' pause.c)"
  command -v gcc >/dev/null || { log "gcc not found; it builds pause.c"; exit 1; }
  start=$SECONDS
  src=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_TAG-autoglm" \
    -o "$bin_dir/pause" "$src/build/pause/linux/pause.c"
  strip "$bin_dir/pause"
  log "pause built in $((SECONDS - start)) s"
fi

if missing bin/containerd bin/runc bin/iptables bin/nft cni/bridge bin/busybox; then
  command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
    { log "apt-get and dpkg are needed to fetch ${DEBS[*]}"; exit 1; }
  log "fetching Debian packages: ${DEBS[*]}"
  start=$SECONDS
  work=$(mktemp -d "${TMPDIR:-/tmp}/autoglm-node-debs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -q "${DEBS[@]}" >&2)
  for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
  r="$work/root"
  for b in containerd containerd-shim-runc-v2 ctr; do install -m755 "$r/usr/bin/$b" "$bin_dir/"; done
  install -m755 "$r/usr/sbin/runc" "$bin_dir/"
  install -m755 "$r/bin/busybox" "$bin_dir/"
  for p in bridge host-local portmap loopback; do install -m755 "$r/usr/lib/cni/$p" "$dir/cni/"; done
  # iptables without update-alternatives: xtables-nft-multi dispatches on argv[0].
  mkdir -p "$dir/lib"
  cp -a "$r"/usr/lib/x86_64-linux-gnu/*.so* "$dir/lib/"
  cp -a "$r/usr/lib/x86_64-linux-gnu/xtables" "$dir/lib/"
  install -m755 "$r/usr/sbin/xtables-nft-multi" "$r/usr/sbin/nft" "$bin_dir/"
  for n in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sfn xtables-nft-multi "$bin_dir/$n"
  done
  rm -rf "$work"; trap - EXIT
  log "Debian packages unpacked in $((SECONDS - start)) s"
fi

# A docker-archive (manifest.json + config + one layer) from a directory tree, packed
# reproducibly: sorted, mtime 0, numeric owner 0.
image_archive() (
  name=$1 rootfs=$2 out=$3 entry=$4
  work=$(mktemp -d "${TMPDIR:-/tmp}/autoglm-node-image.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$work/layer.tar" .
  diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s,"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"autoglm node-assets.sh"}]}' \
    "$entry" "$diff_id" >"$work/config.json"
  cfg=$(sha256sum "$work/config.json" | cut -d' ' -f1)
  mv "$work/config.json" "$work/$cfg.json"
  mkdir "$work/$diff_id" && mv "$work/layer.tar" "$work/$diff_id/layer.tar"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$cfg" "$name" "$diff_id" >"$work/manifest.json"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work" \
    -cf "$out.tmp" manifest.json "$cfg.json" "$diff_id"
  mv "$out.tmp" "$out"
)

if missing images/pause.tar images/busybox.tar; then
  start=$SECONDS
  root=$(mktemp -d "${TMPDIR:-/tmp}/autoglm-node-rootfs.XXXXXX")
  mkdir -p "$root/pause" "$root/busybox/bin" "$root/busybox/etc" "$root/busybox/tmp"
  cp "$bin_dir/pause" "$root/pause/pause"
  image_archive "$PAUSE_IMAGE" "$root/pause" "$dir/images/pause.tar" '["/pause"]'
  cp "$bin_dir/busybox" "$root/busybox/bin/busybox"
  # (no wget: Debian's static busybox wget segfaults; nc speaks HTTP well enough)
  for a in sh ls cat echo printf sleep nslookup nc ip ps hostname httpd mkdir env id; do
    ln -s busybox "$root/busybox/bin/$a"
  done
  echo 'root:x:0:0:root:/:/bin/sh' >"$root/busybox/etc/passwd"
  echo 'root:x:0:' >"$root/busybox/etc/group"
  chmod 1777 "$root/busybox/tmp"
  image_archive "$BUSYBOX_IMAGE" "$root/busybox" "$dir/images/busybox.tar" '["/bin/sh"]'
  rm -rf "$root"
  echo "$PAUSE_IMAGE" >"$dir/images/pause.name"
  echo "$BUSYBOX_IMAGE" >"$dir/images/busybox.name"
  log "images packed in $((SECONDS - start)) s"
fi

echo "$dir"
