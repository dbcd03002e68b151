#!/usr/bin/env bash
# A private sshd on 127.0.0.1 for qemu+ssh:// tests, with its own host key and a root client
# key, leaving the system's sshd, /etc/ssh and /root/.ssh alone.
#
#   sshd-testbed.sh start STATE_DIR [--watch-pid PID]  -> prints PORT=, KEY=, SSH=, URI_PARAMS=
#   sshd-testbed.sh stop STATE_DIR
# With --watch-pid the sshd is stopped once process PID (e.g. a test binary) has exited.
#
# SSH is a wrapper (`ssh -F STATE_DIR/ssh_config`) for libvirt's `command=` URI parameter, so
# known_hosts goes to STATE_DIR, not ~/.ssh. A URI then looks like
#   qemu+ssh://root@127.0.0.1:PORT/system?socket=/x/libvirt-sock&proxy=netcat&$URI_PARAMS
# (libvirt 9.0.0 runs `sh -c 'nc -U SOCKET'` on the far side for proxy=netcat).
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

prog=$(readlink -f "$0")
die() { echo "sshd-testbed: $*" >&2; exit 1; }

install_deps() {
  local missing=() p
  for p in openssh-server openssh-client netcat-openbsd; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "sshd-testbed: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  # policy-rc.d: the package must not start the system's sshd.
  local had_policy=1
  [ -e /usr/sbin/policy-rc.d ] || { had_policy=0
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$had_policy" = 1 ] || rm -f /usr/sbin/policy-rc.d
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Field 22 of /proc/PID/stat: tells a live process from a later one with the same pid.
starttime() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }

do_start() {
  local dir=$1 watch=${2:-}
  [ "$(id -u)" = 0 ] || die "must run as root"
  install_deps
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -f "$dir/sshd.pid" ] && kill -0 "$(cat "$dir/sshd.pid")" 2>/dev/null && die "already running in $dir"
  [ -f "$dir/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
  [ -f "$dir/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key" -C vpd-testbed
  cp "$dir/client_key.pub" "$dir/authorized_keys"
  chmod 600 "$dir/authorized_keys"
  # sshd's privilege separation directory (Debian's unit creates it; we run sshd ourselves).
  mkdir -p /run/sshd && chmod 0755 /run/sshd

  local port tries=0
  while :; do
    port=$(free_port)
    cat > "$dir/sshd_config" <<CONF
ListenAddress 127.0.0.1:$port
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The state dir may live under a world-writable /tmp.
StrictModes no
PrintMotd no
AcceptEnv LANG LC_*
CONF
    # Without -D sshd forks once it is listening, so the port is up when this returns.
    if /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"; then break; fi
    tries=$((tries + 1))
    [ "$tries" -lt 5 ] || die "sshd did not start; see $dir/sshd.log"
  done

  cat > "$dir/ssh_config" <<CONF
Host *
  IdentityFile $dir/client_key
  IdentitiesOnly yes
  UserKnownHostsFile $dir/known_hosts
  StrictHostKeyChecking accept-new
  BatchMode yes
  LogLevel ERROR
CONF
  # Pin the host key now, so clients verify it instead of trusting the first answer.
  echo "[127.0.0.1]:$port $(cut -d' ' -f1-2 "$dir/host_key.pub")" > "$dir/known_hosts"
  cat > "$dir/ssh" <<WRAP
#!/bin/sh
exec /usr/bin/ssh -F '$dir/ssh_config' "\$@"
WRAP
  chmod +x "$dir/ssh"
  if [ -n "$watch" ]; then
    local wst; wst=$(starttime "$watch")
    [ -n "$wst" ] || { do_stop "$dir"; die "no process $watch to watch"; }
    setsid bash "$prog" __reap "$dir" "$watch" "$wst" </dev/null >/dev/null 2>&1 &
  fi
  local params="command=$dir/ssh&keyfile=$dir/client_key&no_tty=1"
  # STATE_DIR/env can be sourced by a shell (quoted: the params hold '&').
  printf 'PORT=%q\nKEY=%q\nSSH=%q\nURI_PARAMS=%q\n' "$port" "$dir/client_key" "$dir/ssh" \
    "$params" > "$dir/env"
  printf 'PORT=%s\nKEY=%s\nSSH=%s\nURI_PARAMS=%s\n' "$port" "$dir/client_key" "$dir/ssh" "$params"
}

do_stop() {
  local dir=$1 pid
  [ -f "$dir/sshd.pid" ] || return 0
  pid=$(cat "$dir/sshd.pid")
  # Only the listener we started: its pid file is ours.
  kill "$pid" 2>/dev/null || true
  rm -f "$dir/sshd.pid"
}

do_reap() {
  local dir=$1 wpid=$2 wst=$3
  while [ "$(starttime "$wpid")" = "$wst" ]; do sleep 0.5; done
  do_stop "$dir"
}

case "${1:-}" in
  start)
    if [ $# -eq 2 ]; then do_start "$2"
    elif [ $# -eq 4 ] && [ "$3" = --watch-pid ]; then do_start "$2" "$4"
    else die "usage: $0 start STATE_DIR [--watch-pid PID]"; fi ;;
  __reap) do_reap "$2" "$3" "$4" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop STATE_DIR"; do_stop "$2" ;;
  *) die "usage: $0 start|stop STATE_DIR" ;;
esac
