#!/usr/bin/env bash
# Private, throw-away root libvirtd (Debian's /usr/sbin/libvirtd) for the integration tests.
#
#   private-libvirtd.sh start STATE_DIR [--watch-pid PID]   -> prints the daemon pid on stdout
#   private-libvirtd.sh stop  STATE_DIR
#
# The daemon runs in its own mount namespace. Every directory where a root libvirtd keeps
# state (/run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt, /etc/libvirt)
# is replaced inside that namespace by a bind mount of a fresh directory under STATE_DIR/ns,
# wiped on every start, so runs never see each other's state and the system's libvirt (if
# any) is untouched. Only the client sockets live outside the overlaid directories:
#   STATE_DIR/run/libvirt-sock, libvirt-sock-ro, libvirt-admin-sock   (auth none, 0777)
# Other files: STATE_DIR/libvirtd.conf, STATE_DIR/libvirtd.log (daemon log + stderr),
# STATE_DIR/libvirtd.pid (libvirtd's own pid file), STATE_DIR/daemon.pid, STATE_DIR/reaper.pid.
# Domain logs end up in STATE_DIR/ns/log/qemu/, qemu's private config in STATE_DIR/ns/etc/.
#
# Environment: VPD_LIBVIRTD_LOG_LEVEL (1 debug .. 4 error, default 3),
#              VPD_LIBVIRTD_LOG_FILTERS (libvirt log_filters string, default none),
#              VPD_LIBVIRTD_TIMEOUT (readiness deadline in seconds, default 60),
#              VPD_LIBVIRTD_EXTRA_CONF (text appended to the generated libvirtd.conf, e.g.
#                "max_clients = 20000"; libvirt keeps the first occurrence of a key, so use
#                it only for keys the generated config does not set; default none).
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

prog=$(readlink -f "$0")
LIBVIRTD=/usr/sbin/libvirtd
OVERLAID=(/run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /etc/libvirt)

# shellcheck source=scripts/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

die() { echo "private-libvirtd: $*" >&2; exit 1; }
usage() { die "usage: $0 start STATE_DIR [--watch-pid PID] | stop STATE_DIR"; }

# Stop whatever a previous start left in STATE_DIR: reaper, daemon, qemu processes.
do_stop() {
  local sd=$1 pid st f
  if [ -s "$sd/reaper.pid" ]; then
    read -r pid st < "$sd/reaper.pid" || true
    # the reaper calls do_stop itself; do not kill it if that is who we are
    if [ -n "${pid:-}" ] && [ "$pid" != "$$" ] && [ "$pid" != "${BASHPID:-}" ]; then
      alive_as "$pid" "$st" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$sd/reaper.pid"
  fi
  if [ -s "$sd/daemon.pid" ]; then
    read -r pid st < "$sd/daemon.pid" || true
    [ -n "${pid:-}" ] && kill_wait "$pid" "$st" 5 || true
    rm -f "$sd/daemon.pid"
  fi
  # qemu processes started by that daemon (pid files are on the host side of the bind mount)
  for f in "$(ns_src /run/libvirt "$sd")"/qemu/*.pid; do
    [ -s "$f" ] || continue
    pid=$(tr -dc 0-9 < "$f")
    [ -n "$pid" ] || continue
    case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in
      */qemu-system-*) kill_wait "$pid" "$(starttime "$pid")" 3 || true ;;
    esac
  done
  rm -f "$sd"/run/libvirt-sock "$sd"/run/libvirt-sock-ro "$sd"/run/libvirt-admin-sock
}

# Runs inside the new mount namespace (as the process that becomes libvirtd).
do_ns_exec() {
  local sd=$1 d
  for d in "${OVERLAID[@]}"; do
    mkdir -p "$d"                         # empty mount point on the host fs; harmless
    mount --bind "$(ns_src "$d" "$sd")" "$d"
  done
  # /dev/kvm here is root:root 0600 (no udev). The capability probe runs qemu as root and sees
  # KVM, but the cache validation asks whether the qemu user (libvirt-qemu) can open /dev/kvm,
  # says no and throws every cached probe away. Give libvirt-qemu access the way stock Debian
  # does (root:kvm 0660), but only inside this namespace: a private node bound over /dev/kvm.
  if [ -c /dev/kvm ]; then
    local maj min
    read -r maj min < <(stat -c '%t %T' /dev/kvm)
    mkdir -p "$sd/ns/_dev"
    mount -t tmpfs -o mode=0755,size=64k vpd-dev "$sd/ns/_dev"
    mknod -m 0660 "$sd/ns/_dev/kvm" c "0x$maj" "0x$min"
    chgrp libvirt-qemu "$sd/ns/_dev/kvm"
    mount --bind "$sd/ns/_dev/kvm" /dev/kvm
  fi
  exec "$LIBVIRTD" -f "$sd/libvirtd.conf" -p "$sd/libvirtd.pid"
}

ns_src() { local d=$1; echo "$2/ns/${d//\//_}"; }

do_start() {
  local sd=$1 watch=$2 d src
  [ -x "$LIBVIRTD" ] || die "$LIBVIRTD not installed (run scripts/install-deps.sh)"
  [ "$(id -u)" = 0 ] || die "must run as root"
  getent passwd libvirt-qemu >/dev/null || die "user libvirt-qemu missing (run scripts/install-deps.sh)"
  mkdir -p "$sd"
  sd=$(readlink -f "$sd")
  for d in "${OVERLAID[@]}"; do
    case "$sd/" in "$d"/*) die "STATE_DIR must not be under $d" ;; esac
  done
  [ ${#sd} -le 80 ] || die "STATE_DIR too long for unix socket paths: $sd"
  if [ -n "$watch" ]; then
    case "$watch" in *[!0-9]*) die "--watch-pid needs a number" ;; esac
    alive "$watch" || die "--watch-pid $watch: no such process"
  fi

  do_stop "$sd"                                  # anything left from an earlier run
  rm -rf "$sd/ns" "$sd/run"
  mkdir -p "$sd/run"
  chmod 0755 "$sd" "$sd/run"
  for d in "${OVERLAID[@]}"; do
    src=$(ns_src "$d" "$sd"); mkdir -p "$src"; chmod 0755 "$src"
  done
  # /etc/libvirt: the client configs from the host, plus our qemu.conf
  src=$(ns_src /etc/libvirt "$sd")
  cp -a /etc/libvirt/libvirt.conf /etc/libvirt/libvirt-admin.conf "$src"/ 2>/dev/null || true
  cat > "$src/qemu.conf" <<'EOF'
# private-libvirtd.sh: qemu driver config for the test daemon
user = "libvirt-qemu"
group = "libvirt-qemu"
# no apparmor/selinux profiles on the test machine
security_driver = "none"
# do not create cgroups on the host for test guests
cgroup_controllers = [ ]
# no per-domain /dev namespace, no xattr ownership tracking (robust in containers)
namespaces = [ ]
remember_owner = 0
# guest stdout/stderr to /var/log/libvirt/qemu/*.log directly; no virtlogd needed
stdio_handler = "file"
EOF
  # /var/log/libvirt/qemu and /var/lib/libvirt/qemu are created by the driver itself.
  # Optional shared qemu capabilities cache (libvirt re-validates every entry against the
  # emulator binary, libvirt version and host, so reusing it is safe); saves the ~12 s probe.
  local caps=${VPD_QEMU_CAPS_CACHE:-}
  if [ -n "$caps" ] && compgen -G "$caps/*.xml" >/dev/null; then
    src=$(ns_src /var/cache/libvirt "$sd")/qemu/capabilities
    mkdir -p "$src"; chmod 0755 "$(dirname "$src")"; chmod 0700 "$src"
    cp "$caps"/*.xml "$src"/
  fi

  local level=${VPD_LIBVIRTD_LOG_LEVEL:-3} filters=${VPD_LIBVIRTD_LOG_FILTERS:-}
  # With filters, the output must pass what they let through (e.g. debug of one source);
  # log_level keeps every other source at $level.
  local out_level=$level
  [ -n "$filters" ] && out_level=1
  cat > "$sd/libvirtd.conf" <<EOF
# private-libvirtd.sh: generated, overwritten on every start
unix_sock_dir = "$sd/run"
unix_sock_rw_perms = "0777"
unix_sock_ro_perms = "0777"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_level = $level
log_outputs = "$out_level:file:$sd/libvirtd.log"
log_filters = "$filters"
EOF
  if [ -n "${VPD_LIBVIRTD_EXTRA_CONF:-}" ]; then
    printf '%s\n' "$VPD_LIBVIRTD_EXTRA_CONF" >> "$sd/libvirtd.conf"
  fi
  : > "$sd/libvirtd.log"
  rm -f "$sd/libvirtd.pid"

  local t0=$SECONDS t_start t_sock t_test
  t_start=$(date +%s.%N)
  # New session (no job-control signals from the test's terminal), private mount namespace.
  # unshare without --fork execs, and setsid does not fork here (we are not a group leader),
  # so $! is libvirtd's pid; checked against libvirtd's own pid file below.
  setsid unshare -m --propagation private -- "$prog" __ns-exec "$sd" \
    </dev/null >>"$sd/libvirtd.log" 2>&1 &
  local dpid=$! dst
  dst=$(starttime "$dpid")
  echo "$dpid $dst" > "$sd/daemon.pid"

  if [ -n "$watch" ]; then
    setsid "$prog" __reap "$sd" "$watch" "$(starttime "$watch")" "$dpid" "$dst" \
      </dev/null >/dev/null 2>&1 &
    echo "$! $(starttime $!)" > "$sd/reaper.pid"
  fi

  local deadline=$((SECONDS + ${VPD_LIBVIRTD_TIMEOUT:-60}))
  local rw="$sd/run/libvirt-sock" step=socket out=""
  fail() {
    echo "private-libvirtd: $1" >&2
    [ -n "$out" ] && echo "last client output: $out" >&2
    echo "---- tail of $sd/libvirtd.log ----" >&2
    tail -n 40 "$sd/libvirtd.log" >&2 || true
    do_stop "$sd"
    exit 1
  }
  while :; do
    alive_as "$dpid" "$dst" || { wait "$dpid" 2>/dev/null; fail "libvirtd exited during startup (rc $?)"; }
    [ $SECONDS -lt $deadline ] || fail "not ready after ${VPD_LIBVIRTD_TIMEOUT:-60}s (waiting for $step)"
    case $step in
      socket)
        if [ -S "$rw" ] && [ -S "$sd/run/libvirt-sock-ro" ] && [ -S "$sd/run/libvirt-admin-sock" ]; then
          step=test; t_sock=$(date +%s.%N)
        fi ;;
      test)
        if out=$(timeout 30 virsh -q -c "test+unix:///default?socket=$rw" list --all 2>&1); then
          step=qemu; t_test=$(date +%s.%N)
        fi ;;
      qemu)
        # first qemu:///system use probes the emulator's capabilities (slow under TCG)
        if out=$(timeout 60 virsh -c "qemu+unix:///system?socket=$rw" version 2>&1); then
          break
        fi ;;
    esac
    [ $step = qemu ] && [ -n "$out" ] && sleep 0.2 || sleep 0.05
  done

  if [ -n "$caps" ]; then           # publish freshly probed capabilities, atomically per file
    mkdir -p "$caps"
    local f
    for f in "$(ns_src /var/cache/libvirt "$sd")"/qemu/capabilities/*.xml; do
      [ -f "$f" ] || continue
      cmp -s "$f" "$caps/${f##*/}" && continue
      cp "$f" "$caps/.${f##*/}.$$" && mv -f "$caps/.${f##*/}.$$" "$caps/${f##*/}"
    done
  fi
  local ppid_file=""
  [ -s "$sd/libvirtd.pid" ] && ppid_file=$(tr -dc 0-9 < "$sd/libvirtd.pid")
  [ "$ppid_file" = "$dpid" ] || fail "pid mismatch: started $dpid, libvirtd.pid says '$ppid_file'"
  awk -v a="$t_start" -v b="$t_sock" -v c="$t_test" -v d="$(date +%s.%N)" -v p="$dpid" -v r="$sd/run" \
    'BEGIN { printf "private-libvirtd: pid %s ready in %.2fs (sockets %.2fs, test driver %.2fs, qemu %.2fs), sockets in %s\n", p, d-a, b-a, c-b, d-c, r }' >&2
  echo "$dpid"
}

# Background reaper: stop the daemon as soon as the watched process is gone.
do_reap() {
  local sd=$1 wpid=$2 wst=$3 dpid=$4 dst=$5
  trap '' HUP INT
  while alive_as "$wpid" "$wst" && alive_as "$dpid" "$dst"; do sleep 0.5; done
  rm -f "$sd/reaper.pid"
  alive_as "$dpid" "$dst" && do_stop "$sd"
  exit 0
}

cmd=${1:-}; shift || true
case "$cmd" in
  start)
    [ $# -ge 1 ] || usage
    sd=$1; shift; watch=""
    while [ $# -gt 0 ]; do
      case "$1" in
        --watch-pid) [ $# -ge 2 ] || usage; watch=$2; shift 2 ;;
        --watch-pid=*) watch=${1#*=}; shift ;;
        *) usage ;;
      esac
    done
    do_start "$sd" "$watch" ;;
  stop)
    [ $# -eq 1 ] || usage
    [ -d "$1" ] || exit 0
    do_stop "$(readlink -f "$1")" ;;
  __ns-exec) do_ns_exec "$1" ;;
  __reap) do_reap "$@" ;;
  *) usage ;;
esac
