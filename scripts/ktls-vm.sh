#!/usr/bin/env bash
# Runs a program inside a qemu VM booted with a stock Debian kernel that has kernel TLS
# (CONFIG_TLS=m), for hosts whose own kernel has none. See shared/docs/ktls-vm.md.
#
#   scripts/ktls-vm.sh run --kernel 6.1|6.12 [--timeout SECS] [--env NAME=VALUE]... -- PROGRAM [ARGS...]
#       Boots the kernel, runs PROGRAM ARGS inside (lo up, kTLS + x86 crypto modules loaded,
#       /tmp a tmpfs), prints its stdout+stderr and exits with its exit status. A VM that fails
#       to boot, to set up or to finish in time exits non-zero (125 setup/boot, 124 timeout)
#       with a message on stderr; it never passes silently.
#   scripts/ktls-vm.sh prepare [--kernel 6.1|6.12|all]
#       Downloads the kernels (private apt configuration) and builds the cached base images.
#       Re-resolves the kernel ABI each time; rebuilds only what changed.
#   scripts/ktls-vm.sh selftest
#       Builds a small static C probe (scripts/ktls-vm/selftest.c: TCP_ULP "tls" on a 127.0.0.1
#       socket, then a TLS 1.3 AES-128-GCM and ChaCha20-Poly1305 record round trip through
#       TLS_TX/TLS_RX) and runs it on both kernels; fails unless kTLS works in both.
#
# As a cargo runner (cargo appends the test binary and its arguments):
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/ktls-vm.sh run --kernel 6.12 --"
#
# Environment: VPD_KTLS_CACHE (default /var/cache/virtproxyd-ktls); VPD_KTLS_TIMEOUT (default
# for --timeout, 300); VPD_KTLS_VERBOSE=1 (full, unquiet kernel console on stderr, with init's
# steps timestamped). RUST_BACKTRACE, RUST_LOG, RUST_TEST_THREADS, RUST_TEST_NOCAPTURE and
# RUST_MIN_STACK are passed into the VM when set. Diagnosis only: VPD_KTLS_QEMU (qemu command,
# split on spaces), VPD_KTLS_CPU (-cpu, default: see default_cpu), VPD_KTLS_ACCEL (default tcg).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HELPERS=$HERE/ktls-vm
CACHE=${VPD_KTLS_CACHE:-/var/cache/virtproxyd-ktls}
SERIES_ALL=(6.1 6.12)
MODULES_PRELOAD="tls aesni_intel ghash_clmulni_intel chacha_x86_64 poly1305_x86_64"
# Module directories copied into the image (plus whatever they depend on).
MODULE_DIRS="kernel/net/tls kernel/crypto kernel/arch/x86/crypto kernel/lib/crypto"
# Bump when the layout of the base image changes; init's hash is added automatically.
IMAGE_FORMAT=1
# First qemu verified to boot 6.12 reliably with cx16 (10.0.2: 12/12; 7.2: 4/12). See default_cpu.
CX16_FIXED_IN=10.0

log() { echo "ktls-vm: $*" >&2; }
fail() { echo "ktls-vm: error: $*" >&2; exit 125; }

usage() { # exit status (0: asked for help, to stdout; else to stderr)
  local rc=${1:-2}
  if [ "$rc" = 0 ]; then exec 3>&1; else exec 3>&2; fi
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&3
  exit "$rc"
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------- host tools
host_apt_updated=
host_install() { # packages...
  log "installing with apt-get: $*"
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$host_apt_updated" ]; then as_root apt-get update -qq >&2; host_apt_updated=1; fi
  as_root apt-get install -y -qq --no-install-recommends "$@" >&2
}

ensure_host_tools() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  command -v xz >/dev/null || missing+=(xz-utils)
  command -v gzip >/dev/null || missing+=(gzip)
  command -v flock >/dev/null || missing+=(util-linux)
  command -v timeout >/dev/null || missing+=(coreutils)
  command -v ldd >/dev/null || missing+=(libc-bin)
  command -v dpkg-deb >/dev/null || missing+=(dpkg)
  if [ "${#missing[@]}" -gt 0 ]; then host_install "${missing[@]}"; fi
}

# ---------------------------------------------------------------- private apt
# Own sources list, lists, caches and preferences under $CACHE/apt; the system's sources are
# neither read nor changed. The system's apt.conf.d is still read (proxies, Check-Valid-Until).
APTDIR=$CACHE/apt
apt_opts() {
  printf '%s\n' \
    -o "Dir::Etc::SourceList=$APTDIR/sources.list" \
    -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d" \
    -o "Dir::Etc::Preferences=$APTDIR/preferences" \
    -o "Dir::Etc::PreferencesParts=$APTDIR/preferences.d" \
    -o "Dir::State=$APTDIR/state" \
    -o "Dir::State::Lists=$APTDIR/state/lists" \
    -o "Dir::State::extended_states=$APTDIR/state/extended_states" \
    -o "Dir::State::status=/var/lib/dpkg/status" \
    -o "Dir::Cache=$APTDIR/cache" \
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false" \
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false" \
    -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false" \
    -o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false" \
    -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false" \
    -o "Acquire::Languages=none" \
    -o "APT::Get::List-Cleanup=false"
}
papt_get() { local o; mapfile -t o < <(apt_opts); apt-get "${o[@]}" "$@"; }
papt_cache() { local o; mapfile -t o < <(apt_opts); apt-cache "${o[@]}" "$@"; }

apt_setup() {
  mkdir -p "$APTDIR"/{sources.list.d,preferences.d,state/lists/partial,cache/archives/partial}
  local key=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$key" ] || host_install debian-archive-keyring
  cat > "$APTDIR/sources.list" <<EOF
deb [signed-by=$key] http://deb.debian.org/debian bookworm main
deb [signed-by=$key] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=$key] http://deb.debian.org/debian bookworm-backports main
EOF
  log "apt-get update (private configuration in $APTDIR)"
  papt_get -qq update >&2 || fail "apt-get update with the private configuration failed"
}

# Highest version of linux-image-cloud-amd64 in the series (6.1 from bookworm/-security,
# 6.12 from bookworm-backports) -> prints "PACKAGE VERSION" of the ABI-specific image.
resolve_kernel() { # series
  local series=$1 best='' v dep
  while read -r v; do
    case $v in "$series".*) ;; *) continue ;; esac
    if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
  done < <(papt_cache madison linux-image-cloud-amd64 | awk -F'|' '{gsub(/ /,"",$2); print $2}')
  [ -n "$best" ] || fail "no linux-image-cloud-amd64 $series.x in bookworm/-security/-backports"
  dep=$(papt_cache show "linux-image-cloud-amd64=$best" | sed -n 's/^Depends: //p' | head -n1 |
        tr ',' '\n' | grep -o 'linux-image-[^ ]*-cloud-amd64' | head -n1)
  [ -n "$dep" ] || fail "cannot resolve the ABI of linux-image-cloud-amd64=$best"
  echo "$dep $best"
}

download_deb() { # package version -> prints path of the .deb
  local pkg=$1 ver=$2 dir=$CACHE/debs f
  mkdir -p "$dir"
  f=$(for d in "$dir/${pkg}"_*.deb; do
        [ -f "$d" ] && [ "$(dpkg-deb -f "$d" Version)" = "$ver" ] && echo "$d"; done | head -n1)
  if [ -z "$f" ]; then
    log "downloading $pkg=$ver"
    # apt drops privileges to _apt for downloads: let it write here.
    if id _apt >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then chown _apt "$dir"; fi
    (cd "$dir" && papt_get -qq download "$pkg=$ver" >&2) || fail "apt-get download $pkg=$ver failed"
    f=$(for d in "$dir/${pkg}"_*.deb; do
          [ -f "$d" ] && [ "$(dpkg-deb -f "$d" Version)" = "$ver" ] && echo "$d"; done | head -n1)
    [ -n "$f" ] || fail "downloaded $pkg=$ver but cannot find the .deb"
  fi
  echo "$f"
}

# busybox-static is fetched with the private apt configuration and unpacked into the cache,
# not installed: installing it would remove the host's busybox package (they conflict).
ensure_busybox() {
  local bb=$CACHE/busybox/bin/busybox
  if [ ! -x "$bb" ]; then
    local ver deb
    ver=$(papt_cache policy busybox-static | sed -n 's/^ *Candidate: //p')
    if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then fail "busybox-static not found in bookworm"; fi
    deb=$(download_deb busybox-static "$ver")
    rm -rf "$CACHE/busybox.tmp"; mkdir -p "$CACHE/busybox.tmp"
    dpkg-deb -x "$deb" "$CACHE/busybox.tmp"
    rm -rf "$CACHE/busybox"; mv "$CACHE/busybox.tmp" "$CACHE/busybox"
  fi
  BUSYBOX=$bb
}

image_key() { # pkg version
  echo "$1 $2 format=$IMAGE_FORMAT init=$(sha256sum "$HELPERS/init" | cut -c1-16)"
}

# Builds $CACHE/kernels/<series>/{vmlinuz,base.cpio.gz,info} from the kernel package.
build_image() { # series pkg version
  local series=$1 pkg=$2 ver=$3 deb tmp kver mods root m line
  deb=$(download_deb "$pkg" "$ver")
  tmp=$CACHE/kernels/.build-$series.$$
  rm -rf "$CACHE/kernels/.build-$series".*   # left by an interrupted build (we hold the lock)
  mkdir -p "$tmp/x" "$tmp/full" "$tmp/root"
  log "building the $series image from $pkg $ver"
  dpkg-deb -x "$deb" "$tmp/x"
  kver=$(ls "$tmp/x/lib/modules")
  [ "$(echo "$kver" | wc -l)" = 1 ] || fail "unexpected module tree in $deb"

  # All modules, decompressed (6.12 ships .ko.xz, which busybox modprobe cannot read), with a
  # dependency table to find what the selected directories need from elsewhere.
  mods=$tmp/full/lib/modules/$kver
  mkdir -p "$mods"
  cp -a "$tmp/x/lib/modules/$kver/." "$mods/"
  find "$mods" -name '*.ko.xz' -print0 | xargs -0 -r xz -d
  "$BUSYBOX" depmod -b "$tmp/full" "$kver"

  root=$tmp/root
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,ktls-vm,lib/modules/"$kver"}
  cp "$BUSYBOX" "$root/bin/busybox"
  for m in $("$BUSYBOX" --list); do
    [ "$m" = busybox ] || ln -s busybox "$root/bin/$m"
  done
  for m in modprobe insmod rmmod depmod lsmod modinfo poweroff reboot; do ln -s ../bin/busybox "$root/sbin/$m"; done
  install -m 755 "$HELPERS/init" "$root/init"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
  printf 'passwd: files\ngroup: files\nhosts: files\n' > "$root/etc/nsswitch.conf"
  : > "$root/etc/resolv.conf"

  # Selected directories plus the transitive dependencies (modules.dep lists them all).
  (cd "$mods" && for d in $MODULE_DIRS; do [ -d "$d" ] && find "$d" -name '*.ko'; done) | sort -u > "$tmp/sel"
  while read -r m; do
    line=$(grep -m1 "^$m:" "$mods/modules.dep") || fail "$m not in modules.dep"
    echo "${line#*:}" | tr ' ' '\n' | sed '/^$/d'
  done < "$tmp/sel" > "$tmp/deps"
  sort -u "$tmp/sel" "$tmp/deps" | while read -r m; do
    mkdir -p "$root/lib/modules/$kver/$(dirname "$m")"
    cp "$mods/$m" "$root/lib/modules/$kver/$m"
  done
  cp "$mods"/modules.builtin "$mods"/modules.order "$root/lib/modules/$kver/"
  [ -f "$mods/modules.builtin.modinfo" ] && cp "$mods/modules.builtin.modinfo" "$root/lib/modules/$kver/"
  "$BUSYBOX" depmod -b "$root" "$kver"
  for m in $MODULES_PRELOAD; do
    grep -q "/$(echo "$m" | sed 's/[-_]/[-_]/g')\.ko:" "$root/lib/modules/$kver/modules.dep" ||
      fail "$m.ko missing from the $series image"
  done

  # gzip base, zero-padded to 4 bytes: the per-run cpio appended after it is dropped by the
  # kernel unless it starts on a 4-byte boundary.
  (cd "$root" && find . -mindepth 1 | sed 's|^\./||' | sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) |
    gzip -6 > "$tmp/base.cpio.gz"
  local size pad
  size=$(stat -c %s "$tmp/base.cpio.gz"); pad=$(( (4 - size % 4) % 4 ))
  head -c "$pad" /dev/zero >> "$tmp/base.cpio.gz"
  cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  image_key "$pkg" "$ver" > "$tmp/key"
  echo "$kver" > "$tmp/kver"
  rm -rf "$tmp/x" "$tmp/full" "$tmp/root" "$tmp/sel" "$tmp/deps"

  local dst=$CACHE/kernels/$series
  rm -rf "$dst.old"; [ -d "$dst" ] && mv "$dst" "$dst.old"
  mv "$tmp" "$dst"; rm -rf "$dst.old"
  log "$series: $kver ($pkg $ver), base image $(stat -c %s "$dst/base.cpio.gz") bytes"
}

with_lock() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
}

cmd_prepare() {
  local which=all
  while [ $# -gt 0 ]; do
    case $1 in
      --kernel) which=${2:?}; shift 2 ;;
      --kernel=*) which=${1#*=}; shift ;;
      -h|--help) usage 0 ;;
      *) fail "prepare: unknown argument $1" ;;
    esac
  done
  local series_list=()
  case $which in
    all) series_list=("${SERIES_ALL[@]}") ;;
    6.1|6.12) series_list=("$which") ;;
    *) fail "--kernel must be 6.1, 6.12 or all (got $which)" ;;
  esac
  ensure_host_tools
  with_lock
  apt_setup
  ensure_busybox
  local s pkg ver pv
  for s in "${series_list[@]}"; do
    pv=$(resolve_kernel "$s")
    read -r pkg ver <<< "$pv"
    if [ -f "$CACHE/kernels/$s/key" ] && [ "$(cat "$CACHE/kernels/$s/key")" = "$(image_key "$pkg" "$ver")" ]; then
      log "$s: $(cat "$CACHE/kernels/$s/kver") ($pkg $ver) up to date"
    else
      build_image "$s" "$pkg" "$ver"
    fi
  done
  exec 9>&-
}

# The cached image is usable for `run` when it exists and was built by this init/format;
# a newer kernel upload is picked up only by an explicit `prepare`.
image_ok() { # series
  local d=$CACHE/kernels/$1 pkg ver
  [ -f "$d/base.cpio.gz" ] && [ -f "$d/vmlinuz" ] && [ -f "$d/key" ] || return 1
  read -r pkg ver _ < "$d/key"
  [ "$(cat "$d/key")" = "$(image_key "$pkg" "$ver")" ]
}

# Rebuild from the cached .deb when only init/format changed (no network needed).
ensure_image() { # series
  local s=$1 pkg ver
  image_ok "$s" && return 0
  if [ -f "$CACHE/kernels/$s/key" ] && [ -x "$CACHE/busybox/bin/busybox" ]; then
    read -r pkg ver _ < "$CACHE/kernels/$s/key"
    if ls "$CACHE/debs/${pkg}"_*.deb >/dev/null 2>&1; then
      ( with_lock; BUSYBOX=$CACHE/busybox/bin/busybox; image_ok "$s" || build_image "$s" "$pkg" "$ver" )
      image_ok "$s" && return 0
    fi
  fi
  log "no cached image for $s: preparing"
  ( with_lock; image_ok "$s" && exit 0; cmd_prepare --kernel "$s" )
  image_ok "$s" || fail "prepare did not produce an image for $s"
}

qemu_version() { # qemu command... -> "MAJOR.MINOR.PATCH"
  "$@" --version 2>/dev/null | sed -n '1s/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | grep .
}

# TCG only (see the doc: KVM here is nested without vmx/svm and dies on stock kernels).
# qemu 7.2's TCG corrupts EFLAGS around CMPXCHG16B: 6.12 kernels, whose SLUB fast path uses it,
# oops at random (double faults, spurious #DB, GPFs) in 8 of 12 boots here; 6.1 was not seen to
# fail. Hiding cx16 makes the kernel take its locked fallback; kTLS and its crypto (AES-NI,
# PCLMUL, AVX2) are untouched. Newer qemu keeps the plain "max" model.
default_cpu() { # qemu version
  if dpkg --compare-versions "$1" lt "$CX16_FIXED_IN"; then echo max,cx16=off; else echo max; fi
}

sq() { # single-quote for sh
  printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

cmd_run() {
  local series='' tmo=${VPD_KTLS_TIMEOUT:-300} envs=()
  while [ $# -gt 0 ]; do
    case $1 in
      --kernel) series=${2:?}; shift 2 ;;
      --kernel=*) series=${1#*=}; shift ;;
      --timeout) tmo=${2:?}; shift 2 ;;
      --timeout=*) tmo=${1#*=}; shift ;;
      --env) envs+=("${2:?}"); shift 2 ;;
      --env=*) envs+=("${1#*=}"); shift ;;
      --) shift; break ;;
      -h|--help) usage 0 ;;
      *) fail "run: unknown argument $1 (the program goes after --)" ;;
    esac
  done
  case $series in 6.1|6.12) ;; "") fail "run: --kernel 6.1|6.12 is required" ;; *) fail "run: --kernel must be 6.1 or 6.12 (got $series)" ;; esac
  case $tmo in ''|*[!0-9]*|0) fail "run: --timeout must be a positive number of seconds" ;; esac
  [ $# -ge 1 ] || fail "run: no program given (… -- PROGRAM [ARGS...])"
  local prog=$1; shift
  [ -f "$prog" ] || fail "run: $prog: no such file"
  prog=$(realpath "$prog")
  [ "$(head -c 4 "$prog" | od -An -c | tr -d ' ')" = '177ELF' ] || fail "run: $prog is not an ELF binary"

  ensure_host_tools
  ensure_image "$series"
  local img=$CACHE/kernels/$series kver
  kver=$(cat "$img/kver")
  local BUSYBOX=$CACHE/busybox/bin/busybox

  local t
  t=$(mktemp -d "${TMPDIR:-/tmp}/ktls-vm.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$t'" EXIT
  local p=$t/payload name
  name=$(basename "$prog")
  mkdir -p "$p/ktls-vm/bin"
  cp "$prog" "$p/ktls-vm/bin/$name"; chmod 755 "$p/ktls-vm/bin/$name"

  # Shared libraries, at the paths ldd names (the program's interpreter included).
  local lddout lib
  if lddout=$(ldd "$prog" 2>/dev/null); then
    while read -r lib; do
      [ -n "$lib" ] || continue
      [ -f "$lib" ] || fail "run: $name needs $lib, which is missing on the host"
      mkdir -p "$p$(dirname "$lib")"
      cp -L "$lib" "$p$lib"
    done < <(printf '%s\n' "$lddout" | grep -v 'not found' |
             sed -n 's/.*=> \(\/[^ ]*\) (0x.*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p')
    if printf '%s\n' "$lddout" | grep -q 'not found'; then
      fail "run: unresolved libraries: $(printf '%s\n' "$lddout" | grep 'not found' | tr -s ' \t' ' ')"
    fi
  fi
  # glibc finds the loader at /lib64; Debian's usr-merge has /lib64 -> usr/lib64 on some hosts.
  if [ -d "$p/usr/lib64" ] && [ ! -e "$p/lib64" ]; then ln -s usr/lib64 "$p/lib64"; fi

  {
    echo "export PATH=/bin:/sbin HOME=/tmp TMPDIR=/tmp"
    local v
    for v in RUST_BACKTRACE RUST_LOG RUST_TEST_THREADS RUST_TEST_NOCAPTURE RUST_MIN_STACK; do
      if [ -n "${!v+x}" ]; then echo "export $v=$(sq "${!v}")"; fi
    done
    for v in "${envs[@]}"; do
      case $v in [A-Za-z_]*=*) ;; *) fail "run: --env wants NAME=VALUE (got $v)" ;; esac
      echo "export ${v%%=*}=$(sq "${v#*=}")"
    done
    printf 'exec %s' "$(sq "/ktls-vm/bin/$name")"
    local a
    for a in "$@"; do printf ' %s' "$(sq "$a")"; done
    echo
  } > "$p/ktls-vm/run.sh"

  (cd "$p" && find . -mindepth 1 | sed 's|^\./||' | sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) > "$t/payload.cpio"
  cat "$img/base.cpio.gz" "$t/payload.cpio" > "$t/initrd"
  : > "$t/console"; : > "$t/out"; : > "$t/status"

  # qemu: VPD_KTLS_QEMU may name another binary (and extra options, split on spaces).
  local qemu qver cpu
  read -r -a qemu <<< "${VPD_KTLS_QEMU:-qemu-system-x86_64}"
  qver=$(qemu_version "${qemu[@]}") || fail "cannot run ${qemu[*]} --version"
  cpu=${VPD_KTLS_CPU:-$(default_cpu "$qver")}

  local start end rc=0 quiet=quiet
  [ "${VPD_KTLS_VERBOSE:-0}" = 1 ] && quiet=KTLS_VM_DEBUG=1
  start=$(date +%s.%N)
  timeout -k 5 "$tmo" "${qemu[@]}" \
    -accel "${VPD_KTLS_ACCEL:-tcg}" -cpu "$cpu" -m 1024 -smp 2 -nic none -no-reboot -nographic -monitor none \
    -kernel "$img/vmlinuz" -initrd "$t/initrd" \
    -append "console=ttyS0 panic=-1 $quiet" \
    -serial "file:$t/console" -serial "file:$t/out" -serial "file:$t/status" \
    < /dev/null > "$t/qemu.log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')

  # The program's output, byte for byte.
  cat "$t/out"

  if [ "${VPD_KTLS_VERBOSE:-0}" = 1 ]; then
    { echo "---- console ($kver) ----"; cat "$t/console"; echo "---- end console ----"; } >&2
  fi
  show_diag() {
    {
      echo "---- status port ----"; cat "$t/status"
      echo "---- qemu ----"; cat "$t/qemu.log"
      echo "---- console, last 40 lines ($kver) ----"; tail -n 40 "$t/console"
      echo "---- end ----"
    } >&2
  }
  local status_line exit_status
  status_line=$(tr -d '\r' < "$t/status" | grep -aE '^ktls-vm: exit [0-9]{1,3}$' | tail -n1 || true)
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    log "TIMEOUT: the VM ($kver) did not finish within ${tmo}s; output above is partial"
    show_diag; exit 124
  fi
  if grep -aq '^ktls-vm: setup-failed' "$t/status"; then
    log "VM setup failed on $kver: $(grep -a '^ktls-vm: setup-failed' "$t/status" | head -n1 | cut -d' ' -f3-)"
    show_diag; exit 125
  fi
  if [ -z "$status_line" ]; then
    if grep -aq '^ktls-vm: ready' "$t/status"; then
      log "the program started on $kver but the VM stopped without reporting its exit status (qemu rc=$rc)"
    else
      log "the VM ($kver) did not boot to the program (qemu rc=$rc)"
    fi
    show_diag; exit 125
  fi
  if [ "$rc" != 0 ]; then
    log "qemu exited with $rc after the program finished"; show_diag; exit 125
  fi
  exit_status=${status_line#ktls-vm: exit }
  log "$name exited $exit_status on $kver in ${secs}s (qemu $qver, -cpu $cpu)"
  exit "$exit_status"
}

cmd_selftest() {
  ensure_host_tools
  command -v cc >/dev/null || host_install gcc libc6-dev
  local t rc=0 s out st start end
  t=$(mktemp -d "${TMPDIR:-/tmp}/ktls-vm-selftest.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$t'" EXIT
  cc -static -O2 -Wall -o "$t/ktls-probe" "$HELPERS/selftest.c" || fail "selftest: cc -static failed"
  "$t/ktls-probe" 2>&1 | sed "s/^/host: /" || true
  for s in "${SERIES_ALL[@]}"; do
    ensure_image "$s"
    start=$(date +%s.%N)
    st=0; out=$("$0" run --kernel "$s" --timeout 120 -- "$t/ktls-probe" --require) || st=$?
    end=$(date +%s.%N)
    printf '%s\n' "$out" | sed "s/^/vm $s: /"
    echo "vm $s: exit $st, $(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')s wall"
    if [ "$st" != 0 ] || ! printf '%s\n' "$out" | grep -q '^TCP_ULP tls: ok' ||
       [ "$(printf '%s\n' "$out" | grep -c '^kTLS .*: ok')" != 2 ]; then
      echo "selftest: FAILED on $s: kTLS not available or not working in the VM" >&2; rc=1
    fi
  done
  if [ "$rc" = 0 ]; then echo "selftest: ok (kTLS ULP and TLS 1.3 records work on ${SERIES_ALL[*]})"; fi
  return "$rc"
}

case ${1:-} in
  run) shift; cmd_run "$@" ;;
  prepare) shift; cmd_prepare "$@" ;;
  selftest) shift; cmd_selftest "$@" ;;
  -h|--help|help) usage 0 ;;
  "") usage ;;
  *) echo "ktls-vm: unknown command $1" >&2; usage ;;
esac
