#!/usr/bin/env bash
# A private MIT Kerberos KDC on 127.0.0.1 for the GSSAPI tests (tests/sasl_gssapi.rs), as a
# Kerberos site runs one, and libvirt's own virtproxyd accepting GSSAPI on plain TCP beside it.
# Nothing goes under /etc: every file is in STATE_DIR and reached through environment variables.
#
#   kdc-testbed.sh start STATE_DIR [--watch-pid PID]
#                                       realm, database, principals, keytab, SASL config; starts
#                                       krb5kdc; prints the environment (as `env` does); with
#                                       --watch-pid, everything stops when PID exits
#   kdc-testbed.sh env STATE_DIR        KEY=VALUE lines for servers and clients (below)
#   kdc-testbed.sh kinit STATE_DIR      a ticket for the test user into STATE_DIR/ccache
#   kdc-testbed.sh stop STATE_DIR
#   kdc-testbed.sh libvirt-proxy STATE_DIR MODULAR_STATE_DIR PORT
#                                       libvirt 9.0.0's virtproxyd (modular-testbed.sh's build)
#                                       inside that test bed's namespace, listening on
#                                       127.0.0.1:PORT with auth_tcp = "sasl" (GSSAPI)
#   kdc-testbed.sh libvirt-proxy-stop STATE_DIR
#
# The environment, as verified with libvirt's own virtproxyd (see tests/sasl_gssapi.rs):
#   server (virtproxyd, ours or libvirt's):
#     KRB5_CONFIG=STATE_DIR/krb5.conf      realm and KDC address (no DNS, no reverse DNS)
#     KRB5_KTNAME=FILE:STATE_DIR/libvirt.keytab
#                                          the service key of libvirt/localhost@REALM; MIT's GSSAPI
#                                          acceptor reads it (Cyrus's `keytab:` option alone is
#                                          ignored with MIT Kerberos)
#     SASL_CONF_PATH=STATE_DIR/sasl2       libvirt.conf: mech_list: gssapi, keytab: ...
#   client (virsh qemu+tcp://localhost:PORT/system):
#     KRB5_CONFIG=STATE_DIR/krb5.conf  KRB5CCNAME=FILE:STATE_DIR/ccache   (after `kinit`)
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

REALM=VPD.TEST
SERVICE=libvirt/localhost
USER_PRINC=vpduser
USER_PASS=vpd-gssapi-test

# shellcheck source=scripts/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

die() { echo "kdc-testbed: $*" >&2; exit 1; }

pkgs=(krb5-kdc krb5-admin-server krb5-user libsasl2-modules-gssapi-mit sasl2-bin tcpdump)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

print_env() {
  local sd=$1
  echo "KRB5_CONFIG=$sd/krb5.conf"
  echo "KRB5_KDC_PROFILE=$sd/kdc.conf"
  echo "KRB5_KTNAME=FILE:$sd/libvirt.keytab"
  echo "KRB5CCNAME=FILE:$sd/ccache"
  echo "SASL_CONF_PATH=$sd/sasl2"
  echo "VPD_KDC_REALM=$REALM"
  echo "VPD_KDC_USER=$USER_PRINC"
  echo "VPD_KDC_PASSWORD=$USER_PASS"
}

# Every tool below reads its configuration from here, never from /etc.
use_env() {
  local sd=$1
  export KRB5_CONFIG="$sd/krb5.conf" KRB5_KDC_PROFILE="$sd/kdc.conf"
  export KRB5CCNAME="FILE:$sd/ccache" KRB5_KTNAME="FILE:$sd/libvirt.keytab"
}

write_config() {
  local sd=$1 port=$2
  cat > "$sd/krb5.conf" <<EOF
# kdc-testbed.sh
[libdefaults]
  default_realm = $REALM
  dns_lookup_realm = false
  dns_lookup_kdc = false
  # The service principal is libvirt/localhost whatever localhost resolves to.
  dns_canonicalize_hostname = false
  rdns = false
  # libvirt hands Cyrus the server's own hostname (gethostname()), so the acceptor would look
  # for libvirt/$(hostname) in the keytab while clients of localhost ask for libvirt/localhost:
  # accept any libvirt/* key of the realm the keytab holds.
  ignore_acceptor_hostname = true
  # Loopback tests: TCP only, no UDP fragments to lose.
  udp_preference_limit = 1
[realms]
  $REALM = {
    kdc = 127.0.0.1:$port
  }
[domain_realm]
  localhost = $REALM
EOF
  cat > "$sd/kdc.conf" <<EOF
# kdc-testbed.sh
[kdcdefaults]
  kdc_listen = 127.0.0.1:$port
  kdc_tcp_listen = 127.0.0.1:$port
[realms]
  $REALM = {
    database_name = $sd/db/principal
    key_stash_file = $sd/db/stash
    acl_file = $sd/kadm5.acl
    kdc_listen = 127.0.0.1:$port
    kdc_tcp_listen = 127.0.0.1:$port
    max_life = 10h 0m 0s
  }
[logging]
  kdc = FILE:$sd/kdc.log
  default = FILE:$sd/kdc.log
EOF
  : > "$sd/kadm5.acl"
  mkdir -p "$sd/sasl2"
  cat > "$sd/sasl2/libvirt.conf" <<EOF
# kdc-testbed.sh: as libvirt's shipped libvirtd.sasl, with a private keytab
mech_list: gssapi
keytab: $sd/libvirt.keytab
EOF
}

kdc_up() {
  local sd=$1 pid st
  [ -s "$sd/kdc.pid" ] || return 1
  read -r pid st < "$sd/kdc.pid" || return 1
  alive_as "$pid" "$st"
}

do_start() {
  local sd=$1 watch=${2:-} port
  [ "$(id -u)" = 0 ] || die "must run as root"
  apt_install "${pkgs[@]}"
  mkdir -p "$sd"; sd=$(readlink -f "$sd")
  if kdc_up "$sd"; then print_env "$sd"; return 0; fi
  use_env "$sd"
  if [ ! -f "$sd/db/principal" ]; then
    rm -rf "$sd/db" "$sd/libvirt.keytab" "$sd/ccache"
    mkdir -p "$sd/db"
    port=$(free_port)
    echo "$port" > "$sd/port"
    write_config "$sd" "$port"
    kdb5_util create -s -r "$REALM" -P "vpd-master-$RANDOM$RANDOM" >"$sd/setup.log" 2>&1 ||
      { cat "$sd/setup.log" >&2; die "kdb5_util create failed"; }
    {
      kadmin.local -r "$REALM" -q "addprinc -randkey $SERVICE@$REALM"
      kadmin.local -r "$REALM" -q "ktadd -k $sd/libvirt.keytab $SERVICE@$REALM"
      kadmin.local -r "$REALM" -q "addprinc -pw $USER_PASS $USER_PRINC@$REALM"
    } >>"$sd/setup.log" 2>&1 || { cat "$sd/setup.log" >&2; die "kadmin.local failed"; }
  fi
  # -n: stay in the foreground, so the pid is the KDC's own.
  setsid krb5kdc -n -r "$REALM" </dev/null >>"$sd/kdc.log" 2>&1 &
  echo "$! $(starttime $!)" > "$sd/kdc.pid"
  if [ -n "$watch" ]; then
    setsid "$(readlink -f "$0")" __reap "$sd" "$watch" "$(starttime "$watch")" </dev/null \
      >/dev/null 2>&1 &
  fi
  local i port
  port=$(cat "$sd/port")
  for ((i = 0; i < 200; i++)); do
    kdc_up "$sd" || { tail -20 "$sd/kdc.log" >&2; die "krb5kdc exited"; }
    # The KDC answers on TCP once it is up.
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      print_env "$sd"
      return 0
    fi
    sleep 0.05
  done
  die "krb5kdc did not listen on 127.0.0.1:$port"
}

do_kinit() {
  local sd
  sd=$(readlink -f "$1")
  use_env "$sd"
  echo "$USER_PASS" | kinit "$USER_PRINC@$REALM" >"$sd/kinit.log" 2>&1 ||
    { cat "$sd/kinit.log" >&2; die "kinit failed"; }
}

do_stop() {
  local sd=$1 pid st
  do_proxy_stop "$sd"
  if [ -s "$sd/kdc.pid" ]; then
    read -r pid st < "$sd/kdc.pid" || true
    [ -n "${pid:-}" ] && kill_wait "$pid" "$st" 5 || true
    rm -f "$sd/kdc.pid"
  fi
}

# libvirt's virtproxyd with GSSAPI on TCP, inside the modular test bed's mount namespace (where
# the driver daemons' sockets are). Its UNIX sockets go to a directory of its own so it does not
# replace the test bed's libvirt-sock. (A modular virtproxyd has no --listen option: listen_tcp
# in its config is enough.)
do_proxy() {
  local sd msd port prefix hpid hst
  sd=$(readlink -f "$1"); msd=$(readlink -f "$2"); port=$3
  prefix=$(bash "$(dirname "$(readlink -f "$0")")/modular-testbed.sh" prefix)
  read -r hpid hst < "$msd/holder.pid" || die "modular test bed not running in $msd"
  alive_as "$hpid" "$hst" || die "modular test bed holder gone"
  do_proxy_stop "$sd"
  mkdir -p "$sd/proxy"
  cat > "$sd/proxy/virtproxyd.conf" <<EOF
# kdc-testbed.sh
listen_tcp = 1
listen_tls = 0
listen_addr = "127.0.0.1"
tcp_port = "$port"
auth_tcp = "sasl"
unix_sock_dir = "$sd/proxy"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_level = ${VPD_KDC_PROXY_LOG_LEVEL:-3}
log_outputs = "${VPD_KDC_PROXY_LOG_LEVEL:-3}:file:$sd/proxy/virtproxyd.log"
EOF
  : > "$sd/proxy/virtproxyd.log"
  use_env "$sd"
  export SASL_CONF_PATH="$sd/sasl2"
  nsenter -t "$hpid" -m -- setsid "$prefix/sbin/virtproxyd" -f "$sd/proxy/virtproxyd.conf" \
    -p "$sd/proxy/virtproxyd.pidfile" </dev/null >>"$sd/proxy/virtproxyd.log" 2>&1 &
  echo "$! $(starttime $!)" > "$sd/proxy/pid"
  local i
  for ((i = 0; i < 200; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    local pid st
    read -r pid st < "$sd/proxy/pid"
    alive_as "$pid" "$st" || { tail -20 "$sd/proxy/virtproxyd.log" >&2; die "virtproxyd exited"; }
    sleep 0.05
  done
  die "libvirt's virtproxyd did not listen on 127.0.0.1:$port"
}

do_proxy_stop() {
  local sd=$1 pid st
  [ -s "$sd/proxy/pid" ] || return 0
  read -r pid st < "$sd/proxy/pid" || true
  [ -n "${pid:-}" ] && kill_wait "$pid" "$st" 5 || true
  rm -f "$sd/proxy/pid"
}

do_reap() {
  local sd=$1 wpid=$2 wst=$3
  trap '' HUP INT
  while alive_as "$wpid" "$wst"; do sleep 0.5; done
  do_stop "$sd"
}

cmd=${1:-}; shift || true
case "$cmd" in
  start)
    sd=${1:?usage: start STATE_DIR [--watch-pid PID]}; watch=""
    if [ "${2:-}" = --watch-pid ]; then watch=${3:?}; fi
    do_start "$sd" "$watch" ;;
  __reap) do_reap "$@" ;;
  env) print_env "$(readlink -f "${1:?usage: env STATE_DIR}")" ;;
  kinit) do_kinit "${1:?usage: kinit STATE_DIR}" ;;
  stop) [ -d "${1:?usage: stop STATE_DIR}" ] && do_stop "$(readlink -f "$1")" ;;
  libvirt-proxy) do_proxy "${1:?}" "${2:?}" "${3:?usage: libvirt-proxy STATE_DIR MODULAR_STATE_DIR PORT}" ;;
  libvirt-proxy-stop) do_proxy_stop "$(readlink -f "${1:?}")" ;;
  *) die "usage: $0 start|env|kinit|stop STATE_DIR | libvirt-proxy STATE_DIR MODULAR_STATE_DIR PORT | libvirt-proxy-stop STATE_DIR" ;;
esac
