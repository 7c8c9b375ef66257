#!/usr/bin/env bash
# Provide Debian's Prometheus (2.42) for the local runtime and its tests; print the path of
# the binary. Uses `prometheus` from PATH when installed, else unpacks the Debian package
# into ${AUTOGLM_CACHE:-~/.cache/autoglm}/prometheus (no service is installed or started).
set -euo pipefail
if command -v prometheus >/dev/null; then command -v prometheus; exit 0; fi
cache=${AUTOGLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autoglm}/prometheus
bin="$cache/usr/bin/prometheus"
if [[ ! -x "$bin" ]]; then
  echo "prometheus: fetching Debian's package into $cache" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && { apt-get download prometheus >/dev/null 2>&1 ||
     { apt-get update >/dev/null 2>&1 && apt-get download prometheus >/dev/null; }; })
  mkdir -p "$cache"
  dpkg -x "$work"/prometheus_*.deb "$cache"
fi
echo "$bin"
