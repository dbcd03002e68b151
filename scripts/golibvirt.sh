#!/usr/bin/env bash
# Builds tests/go/golibvirt-workload (a go-libvirt client, the pure-Go implementation of
# libvirt's RPC protocol) with Debian's Go and go-libvirt packages, offline, into a cache
# outside the clone, and prints the binary's path. Rebuilt only when main.go changes.
#
#   golibvirt.sh            -> /var/cache/virtproxyd-rs/golibvirt-workload/<hash>/golibvirt-workload
#
# VPD_GOLIBVIRT_CACHE overrides the cache directory. Needs root for apt-get when a package
# is missing.
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

here=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
src="$here/tests/go/golibvirt-workload/main.go"
CACHE=${VPD_GOLIBVIRT_CACHE:-/var/cache/virtproxyd-rs/golibvirt-workload}

die() { echo "golibvirt: $*" >&2; exit 1; }
[ -f "$src" ] || die "missing $src"

pkgs=(golang-go golang-github-digitalocean-go-libvirt-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "must run as root to install ${missing[*]}"
  echo "golibvirt: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The key covers the program and the library version it is built against.
lib_ver=$(dpkg-query -W -f='${Version}' golang-github-digitalocean-go-libvirt-dev)
key=$( { sha256sum < "$src"; echo "$lib_ver"; go version; } | sha256sum | cut -c1-16)
out="$CACHE/$key/golibvirt-workload"
if [ ! -x "$out" ]; then
  mkdir -p "$CACHE/$key"
  work=$(mktemp -d "$CACHE/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/golibvirt-workload"
  cp "$src" "$work/golibvirt-workload/main.go"
  # GOPATH mode against Debian's source packages: no module download, no network.
  (cd "$work/golibvirt-workload" &&
     GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$work/gocache" GOFLAGS= \
       go build -o "$work/golibvirt-workload.bin" .) >&2 || die "go build failed"
  # rename(2) so a concurrent test never runs a half-written binary.
  mv "$work/golibvirt-workload.bin" "$out.tmp.$$"
  mv "$out.tmp.$$" "$out"
fi
echo "$out"
