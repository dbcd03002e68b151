#!/usr/bin/env bash
# A real system D-Bus and polkitd with libvirt's polkit policy and rules, as a Fedora/RHEL or
# Debian host has them, for tests/polkit.rs. Idempotent: start reuses what already runs.
#
#   polkit-testbed.sh start          system bus + polkitd + libvirt's policy/rules + users
#   polkit-testbed.sh stop-polkitd   stop polkitd only (and keep the bus from re-activating it)
#   polkit-testbed.sh start-polkitd  start polkitd again
#   polkit-testbed.sh stop           stop polkitd and the bus that start started
#
# Users: vpdpk (in group libvirt: allowed org.libvirt.unix.manage by libvirt's rules) and
# vpdtest (outside it). The policy and rules come from the modular test bed's build
# (scripts/modular-testbed.sh build), i.e. libvirt 9.0.0's own files.
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

STATE=${VPD_POLKIT_STATE:-/run/vpd-polkit-testbed}
PREFIX=$(bash "$(dirname "$(readlink -f "$0")")/modular-testbed.sh" prefix)
POLKITD=/usr/lib/polkit-1/polkitd
ACTIVATION=/usr/share/dbus-1/system-services/org.freedesktop.PolicyKit1.service

# shellcheck source=scripts/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

die() { echo "polkit-testbed: $*" >&2; exit 1; }


bus_up() { dbus-send --system --print-reply --dest=org.freedesktop.DBus / \
             org.freedesktop.DBus.GetId >/dev/null 2>&1; }
polkitd_pids() { pgrep -x polkitd || true; }

start_bus() {
  bus_up && return 0
  mkdir -p /run/dbus
  # A stale pid file from a bus that died keeps dbus-daemon from starting.
  rm -f /run/dbus/pid
  dbus-daemon --system --fork --print-pid > "$STATE/dbus.pid"
  local i
  for ((i = 0; i < 100; i++)); do bus_up && return 0; sleep 0.05; done
  die "system bus did not come up"
}

start_polkitd() {
  # Let the bus activate polkitd again (stop-polkitd hid its activation file).
  [ -f "$STATE/activation.service" ] && mv -f "$STATE/activation.service" "$ACTIVATION"
  if [ -z "$(polkitd_pids)" ]; then
    setsid "$POLKITD" --no-debug </dev/null >>"$STATE/polkitd.log" 2>&1 &
  fi
  local i
  for ((i = 0; i < 200; i++)); do
    pkaction --action-id org.libvirt.unix.manage >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  die "polkitd does not know org.libvirt.unix.manage (see $STATE/polkitd.log)"
}

stop_polkitd() {
  # Without its activation file the bus cannot restart polkitd behind the test's back.
  [ -f "$ACTIVATION" ] && mv -f "$ACTIVATION" "$STATE/activation.service"
  local pid i
  for pid in $(polkitd_pids); do kill -TERM "$pid" 2>/dev/null || true; done
  for ((i = 0; i < 100; i++)); do [ -z "$(polkitd_pids)" ] && return 0; sleep 0.05; done
  for pid in $(polkitd_pids); do kill -KILL "$pid" 2>/dev/null || true; done
}

do_start() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  apt_install dbus dbus-bin polkitd
  mkdir -p "$STATE"
  [ -f "$PREFIX/share/polkit-1/actions/org.libvirt.unix.policy" ] ||
    die "libvirt's policy missing: run scripts/modular-testbed.sh build"
  install -D -m 0644 "$PREFIX/share/polkit-1/actions/org.libvirt.unix.policy" \
    /usr/share/polkit-1/actions/org.libvirt.unix.policy
  install -D -m 0644 "$PREFIX/share/polkit-1/rules.d/50-libvirt.rules" \
    /etc/polkit-1/rules.d/50-libvirt.rules
  getent group libvirt >/dev/null || groupadd --system libvirt
  getent passwd vpdtest >/dev/null || useradd --create-home --shell /bin/sh vpdtest
  getent passwd vpdpk >/dev/null || useradd --create-home --shell /bin/sh vpdpk
  id -nG vpdpk | tr ' ' '\n' | grep -qx libvirt || usermod -aG libvirt vpdpk
  start_bus
  start_polkitd
  echo "polkit-testbed: system bus and polkitd ready" >&2
}

do_stop() {
  stop_polkitd
  [ -f "$STATE/activation.service" ] && mv -f "$STATE/activation.service" "$ACTIVATION"
  if [ -s "$STATE/dbus.pid" ]; then
    kill -TERM "$(cat "$STATE/dbus.pid")" 2>/dev/null || true
    rm -f "$STATE/dbus.pid"
  fi
}

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  stop-polkitd) mkdir -p "$STATE"; stop_polkitd ;;
  start-polkitd) mkdir -p "$STATE"; start_polkitd ;;
  *) die "usage: $0 start | stop | stop-polkitd | start-polkitd" ;;
esac
