#!/usr/bin/env bash
# libvirt 9.0.0's modular daemons (virtqemud, virtstoraged, virtnetworkd, virtsecretd) and
# libvirt's own virtproxyd, built from Debian's source package, as on a Fedora/RHEL host.
#
#   modular-testbed.sh build                          -> builds once per machine, prints PREFIX
#   modular-testbed.sh start STATE_DIR [--watch-pid PID]
#   modular-testbed.sh restart STATE_DIR DAEMON       (kill -9 DAEMON and start it again)
#   modular-testbed.sh kill STATE_DIR DAEMON          (kill -9 DAEMON, leave it down)
#   modular-testbed.sh stop STATE_DIR
#
# The build goes to a cache outside the clone ($VPD_MODULAR_CACHE, default
# /var/cache/virtproxyd-rs), keyed by this script's build recipe, so a second run (and a fresh
# clone on the same machine) reuses it. The prefix is private: nothing touches /etc/libvirt
# or /run/libvirt.
#
# start runs the daemons in their own mount namespace in which PREFIX/run, PREFIX/var and
# PREFIX/etc are bind mounts of fresh directories under STATE_DIR/ns, so test processes never
# share daemons or state. The client-side sockets are then reachable from outside at
#   STATE_DIR/ns/run/libvirt/virtqemud-sock, virtqemud-sock-ro, virtstoraged-sock, ...
#   STATE_DIR/ns/run/libvirt/libvirt-sock, libvirt-sock-ro        (libvirt's own virtproxyd)
# Every daemon runs with auth "none" on its own sockets unless VPD_MODULAR_PROXY_CONF adds
# lines to libvirt's virtproxyd's config (libvirt keeps the first occurrence of a key, so the
# extra lines come first). Logs: STATE_DIR/<daemon>.log.
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

prog=$(readlink -f "$0")
CACHE=${VPD_MODULAR_CACHE:-/var/cache/virtproxyd-rs}
VERSION=9.0.0
PREFIX="$CACHE/libvirt-$VERSION"
DAEMONS=(virtsecretd virtstoraged virtnetworkd virtqemud virtproxyd)

# shellcheck source=scripts/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

die() { echo "modular-testbed: $*" >&2; exit 1; }

build_deps=(dpkg-dev patch xz-utils meson ninja-build pkg-config gcc perl python3 libxml2-utils xsltproc
  python3-docutils libglib2.0-dev libxml2-dev libgnutls28-dev libtirpc-dev libyajl-dev
  libnl-3-dev libnl-route-3-dev libcap-ng-dev libudev-dev libpciaccess-dev libdevmapper-dev
  libacl1-dev libattr1-dev libselinux1-dev libapparmor-dev libblkid-dev libsasl2-dev
  libnuma-dev libaudit-dev libreadline-dev libtasn1-6-dev)
run_deps=(qemu-system-x86 libsasl2-modules)

meson_opts=(--libdir=lib -Dsystem=false -Drpath=enabled -Ddocs=disabled -Dtests=disabled
  -Dnls=disabled -Dinit_script=none -Dpolkit=enabled -Dsasl=enabled -Ddriver_libvirtd=enabled
  -Ddriver_remote=enabled -Ddriver_qemu=enabled -Dqemu_user=libvirt-qemu
  -Dqemu_group=libvirt-qemu -Ddriver_network=enabled -Ddriver_secrets=enabled
  -Ddriver_test=enabled -Dstorage_dir=enabled -Dremote_default_mode=direct
  -Ddriver_bhyve=disabled -Ddriver_ch=disabled -Ddriver_esx=disabled -Ddriver_hyperv=disabled
  -Ddriver_interface=disabled -Ddriver_libxl=disabled -Ddriver_lxc=disabled
  -Ddriver_openvz=disabled -Ddriver_vbox=disabled -Ddriver_vmware=disabled
  -Ddriver_vz=disabled -Dstorage_disk=disabled -Dstorage_fs=disabled -Dstorage_gluster=disabled
  -Dstorage_iscsi=disabled -Dstorage_iscsi_direct=disabled -Dstorage_lvm=disabled
  -Dstorage_mpath=disabled -Dstorage_rbd=disabled -Dstorage_scsi=disabled
  -Dstorage_vstorage=disabled -Dstorage_zfs=disabled -Dlibssh=disabled -Dlibssh2=disabled
  -Dcurl=disabled -Dfuse=disabled -Dglusterfs=disabled -Dlibiscsi=disabled -Dopenwsman=disabled
  -Dwireshark_dissector=disabled -Dnetcf=disabled -Dsanlock=disabled -Dnumad=disabled
  -Dlibpcap=disabled -Dfirewalld=disabled -Dfirewalld_zone=disabled -Dudev=enabled
  -Dnss=disabled -Dlogin_shell=disabled -Dbash_completion=disabled -Dsysctl_config=disabled
  -Dhost_validate=disabled -Ddtrace=disabled -Dlibnl=enabled)

# The recipe's fingerprint: a changed option list rebuilds into a fresh prefix.
recipe_id() { printf '%s\n' "$VERSION" "${meson_opts[@]}" | sha256sum | cut -c1-12; }


do_build() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  local id stamp
  id=$(recipe_id)
  stamp="$PREFIX/.built-$id"
  apt_install "${run_deps[@]}"
  getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
      --shell /usr/sbin/nologin libvirt-qemu
  if [ -f "$stamp" ]; then echo "$PREFIX"; return 0; fi

  local t0=$SECONDS
  apt_install "${build_deps[@]}"
  # deb-src: the same archive as the binary packages.
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    sed -n '/^Types: deb$/,/^$/p' /etc/apt/sources.list.d/debian.sources |
      sed 's/^Types: deb$/Types: deb-src/' > /etc/apt/sources.list.d/vpd-deb-src.sources
    apt-get update -qq
  fi
  local work="$CACHE/src-$VERSION"
  rm -rf "$work" "$PREFIX"
  mkdir -p "$work"
  (cd "$work" && apt-get source --download-only -qq "libvirt=$VERSION-4+deb12u2" >/dev/null 2>&1 ||
     apt-get source --download-only -qq libvirt >/dev/null)
  local orig deb
  orig=$(ls "$work"/libvirt_"$VERSION".orig.tar.* | head -1)
  deb=$(ls "$work"/libvirt_"$VERSION"-*.debian.tar.* | head -1)
  [ -f "$orig" ] && [ -f "$deb" ] || die "libvirt $VERSION source not found"
  mkdir -p "$work/tree"
  tar -xf "$orig" -C "$work/tree" --strip-components=1
  tar -xf "$deb" -C "$work/tree"
  (cd "$work/tree" && while read -r p _; do
      case "$p" in ''|'#'*) continue ;; esac
      patch -p1 -s < "debian/patches/$p"
    done < debian/patches/series)
  (cd "$work/tree" && meson setup build --prefix="$PREFIX" --sysconfdir="$PREFIX/etc" \
      --localstatedir="$PREFIX/var" -Drunstatedir="$PREFIX/run" "${meson_opts[@]}" \
      > "$work/meson-setup.log" 2>&1) || { tail -30 "$work/meson-setup.log" >&2; die "meson setup failed"; }
  (cd "$work/tree" && ninja -C build -j"$(nproc)" > "$work/ninja.log" 2>&1 &&
     ninja -C build install > "$work/install.log" 2>&1) ||
    { tail -30 "$work/ninja.log" "$work/install.log" >&2; die "build failed"; }
  # The client-side remote driver builds socket paths under LOCALSTATEDIR/run; on a real host
  # /var/run is a link to /run.
  rm -rf "$PREFIX/var/run"; ln -s ../run "$PREFIX/var/run"
  # virtnetworkd would autostart the stock "default" network (a bridge and firewall rules).
  rm -f "$PREFIX"/etc/libvirt/qemu/networks/autostart/default.xml
  rm -rf "$work/tree/build"
  touch "$stamp"
  echo "modular-testbed: built libvirt $VERSION modular daemons in $((SECONDS - t0)) s" >&2
  echo "$PREFIX"
}

# ---- running -------------------------------------------------------------------------------

ns_dir() { echo "$1/ns/$2"; }   # STATE_DIR, one of run var etc

# Started inside the namespace by the holder: one daemon, in its own session.
launch_daemon() {
  local sd=$1 name=$2
  setsid "$PREFIX/sbin/$name" -f "$sd/$name.conf" -p "$sd/$name.pidfile" \
    </dev/null >>"$sd/$name.log" 2>&1 &
  echo "$! $(starttime $!)" > "$sd/$name.pid"
}

# The holder: lives in the namespace for as long as the test bed runs, so that restart can
# enter it (nsenter) and start a daemon again.
do_holder() {
  local sd=$1 d
  for d in run var etc; do mount --bind "$(ns_dir "$sd" $d)" "$PREFIX/$d"; done
  if [ -c /dev/kvm ]; then            # as private-libvirtd.sh: root:libvirt-qemu 0660 here only
    local maj min
    read -r maj min < <(stat -c '%t %T' /dev/kvm)
    mkdir -p "$sd/ns/_dev"
    mount -t tmpfs -o mode=0755,size=64k vpd-dev "$sd/ns/_dev"
    mknod -m 0660 "$sd/ns/_dev/kvm" c "0x$maj" "0x$min"
    chgrp libvirt-qemu "$sd/ns/_dev/kvm"
    mount --bind "$sd/ns/_dev/kvm" /dev/kvm
  fi
  for d in "${DAEMONS[@]}"; do launch_daemon "$sd" "$d"; done
  echo ready > "$sd/holder.ready"
  trap 'exit 0' TERM INT
  while :; do sleep 3600 & wait $! || true; done
}

do_stop() {
  local sd=$1 pid st name
  if [ -s "$sd/reaper.pid" ]; then
    read -r pid st < "$sd/reaper.pid" || true
    if [ -n "${pid:-}" ] && [ "$pid" != "$$" ] && [ "$pid" != "${BASHPID:-}" ]; then
      alive_as "$pid" "$st" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$sd/reaper.pid"
  fi
  for name in virtproxyd "${DAEMONS[@]}"; do
    [ -s "$sd/$name.pid" ] || continue
    read -r pid st < "$sd/$name.pid" || true
    [ -n "${pid:-}" ] && kill_wait "$pid" "$st" 5 || true
    rm -f "$sd/$name.pid"
  done
  if [ -s "$sd/holder.pid" ]; then
    read -r pid st < "$sd/holder.pid" || true
    [ -n "${pid:-}" ] && kill_wait "$pid" "$st" 5 || true
    rm -f "$sd/holder.pid"
  fi
}

write_confs() {
  local sd=$1 name level=${VPD_MODULAR_LOG_LEVEL:-3}
  for name in "${DAEMONS[@]}"; do
    {
      echo "# modular-testbed.sh: generated on every start"
      [ "$name" = virtproxyd ] && [ -n "${VPD_MODULAR_PROXY_CONF:-}" ] && printf '%s\n' "$VPD_MODULAR_PROXY_CONF"
      # VPD_MODULAR_PROXY_DEFAULT_AUTH=1: libvirt's virtproxyd keeps its compiled-in auth and
      # socket modes (polkit, 0777), as with an untouched virtproxyd.conf.
      if [ "$name" != virtproxyd ] || [ "${VPD_MODULAR_PROXY_DEFAULT_AUTH:-0}" != 1 ]; then
        echo "unix_sock_rw_perms = \"0777\""
        echo "unix_sock_ro_perms = \"0777\""
        echo "auth_unix_rw = \"none\""
        echo "auth_unix_ro = \"none\""
      fi
      echo "log_level = $level"
      echo "log_outputs = \"$level:file:$sd/$name.log\""
      # No idle exit: the tests decide when daemons stop.
    } > "$sd/$name.conf"
    : > "$sd/$name.log"
  done
}

wait_ready() {
  local sd=$1 deadline=$((SECONDS + ${VPD_MODULAR_TIMEOUT:-90})) name sock out="" step=sockets
  local run
  run=$(ns_dir "$sd" run)/libvirt
  while :; do
    for name in "${DAEMONS[@]}"; do
      local pid st
      read -r pid st < "$sd/$name.pid" 2>/dev/null || continue
      alive_as "$pid" "$st" || { tail -20 "$sd/$name.log" >&2; die "$name exited during start-up"; }
    done
    [ $SECONDS -lt "$deadline" ] || { echo "last output: $out" >&2; die "not ready (waiting for $step)"; }
    case $step in
      sockets)
        local ok=1
        for sock in virtqemud-sock virtqemud-sock-ro virtstoraged-sock virtnetworkd-sock \
                    virtsecretd-sock libvirt-sock libvirt-sock-ro; do
          [ -S "$run/$sock" ] || ok=0
        done
        [ $ok = 1 ] && step=qemu ;;
      qemu)
        # The first qemu:///system use probes the emulator (about 10 s under TCG).
        if out=$(timeout 60 virsh -q -c "qemu+unix:///system?socket=$run/virtqemud-sock" \
                   pool-list --all 2>&1); then
          break
        fi ;;
    esac
    sleep 0.1
  done
}

do_start() {
  local sd=$1 watch=$2 d
  [ "$(id -u)" = 0 ] || die "must run as root"
  [ -f "$PREFIX/.built-$(recipe_id)" ] || die "not built: run $0 build"
  command -v virsh >/dev/null || die "virsh missing (scripts/install-deps.sh)"
  mkdir -p "$sd"; sd=$(readlink -f "$sd")
  [ ${#sd} -le 60 ] || die "STATE_DIR too long for unix socket paths: $sd"
  do_stop "$sd"
  rm -rf "$sd/ns" "$sd/holder.ready"
  mkdir -p "$sd/ns/run/libvirt" "$sd/ns/var" "$sd/ns/etc"
  chmod 0755 "$sd" "$sd/ns" "$sd/ns/run" "$sd/ns/run/libvirt"
  cp -a "$PREFIX/var/." "$sd/ns/var/"
  cp -a "$PREFIX/etc/." "$sd/ns/etc/"
  mkdir -p "$sd/ns/var/lib/libvirt/images"
  cat >> "$sd/ns/etc/libvirt/qemu.conf" <<'EOF'
# modular-testbed.sh
user = "libvirt-qemu"
group = "libvirt-qemu"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
remember_owner = 0
stdio_handler = "file"
EOF
  write_confs "$sd"
  setsid unshare -m --propagation private -- "$prog" __holder "$sd" </dev/null \
    >>"$sd/holder.log" 2>&1 &
  echo "$! $(starttime $!)" > "$sd/holder.pid"
  local i
  for ((i = 0; i < 200; i++)); do [ -f "$sd/holder.ready" ] && break; sleep 0.05; done
  [ -f "$sd/holder.ready" ] || { cat "$sd/holder.log" >&2; do_stop "$sd"; die "namespace holder failed"; }
  if [ -n "$watch" ]; then
    setsid "$prog" __reap "$sd" "$watch" "$(starttime "$watch")" </dev/null >/dev/null 2>&1 &
    echo "$! $(starttime $!)" > "$sd/reaper.pid"
  fi
  local t0=$SECONDS
  wait_ready "$sd" || { do_stop "$sd"; exit 1; }
  echo "modular-testbed: ready in $((SECONDS - t0)) s, sockets in $(ns_dir "$sd" run)/libvirt" >&2
  ns_dir "$sd" run
}

do_kill() {
  local sd=$1 name=$2 pid st
  read -r pid st < "$sd/$name.pid" || die "$name not running"
  kill_wait "$pid" "$st" 5 KILL || die "$name survived SIGKILL"
}

do_restart() {
  local sd=$1 name=$2 hpid hst
  do_kill "$sd" "$name" || true
  read -r hpid hst < "$sd/holder.pid" || die "test bed not running"
  alive_as "$hpid" "$hst" || die "test bed holder gone"
  rm -f "$(ns_dir "$sd" run)/libvirt/$name-sock" "$(ns_dir "$sd" run)/libvirt/$name-sock-ro"
  nsenter -t "$hpid" -m -- "$prog" __launch "$sd" "$name"
  local i sock
  sock="$(ns_dir "$sd" run)/libvirt/$name-sock"
  [ "$name" = virtproxyd ] && sock="$(ns_dir "$sd" run)/libvirt/libvirt-sock"
  for ((i = 0; i < 600; i++)); do [ -S "$sock" ] && return 0; sleep 0.05; done
  die "$name did not come back"
}

do_reap() {
  local sd=$1 wpid=$2 wst=$3
  trap '' HUP INT
  while alive_as "$wpid" "$wst"; do sleep 0.5; done
  rm -f "$sd/reaper.pid"
  do_stop "$sd"
}

cmd=${1:-}; shift || true
case "$cmd" in
  build) do_build ;;
  prefix) echo "$PREFIX" ;;
  start)
    [ $# -ge 1 ] || die "usage: start STATE_DIR [--watch-pid PID]"
    sd=$1; shift; watch=""
    if [ "${1:-}" = --watch-pid ]; then watch=${2:?}; fi
    do_start "$sd" "$watch" ;;
  stop) [ -d "${1:?}" ] && do_stop "$(readlink -f "$1")" ;;
  kill) do_kill "$(readlink -f "${1:?}")" "${2:?}" ;;
  restart) do_restart "$(readlink -f "${1:?}")" "${2:?}" ;;
  __holder) do_holder "$1" ;;
  __launch) launch_daemon "$1" "$2" ;;
  __reap) do_reap "$@" ;;
  *) die "usage: $0 build | prefix | start STATE_DIR [--watch-pid PID] | stop STATE_DIR | kill|restart STATE_DIR DAEMON" ;;
esac
