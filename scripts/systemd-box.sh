#!/usr/bin/env bash
# A real systemd 252 as PID 1 of private namespaces, booted on an overlay of / whose upper
# layer is a tmpfs (never on the host's files: its tmpfiles would empty the host's /tmp), on a
# bare target. Recipe and facts: the project's shared docs (systemd-testbed.md).
#
#   systemd-box.sh start BOXDIR [DIR...]   boot it; DIRs are bind-mounted at the same path
#                                          (e.g. the driver daemons' socket directory);
#                                          prints the box's PID 1 as the host sees it
#   systemd-box.sh stop BOXDIR             kill it (everything in it dies with it)
#   systemd-box.sh inner BOXDIR [DIR...]   (internal: runs inside the new namespaces)
#
# Drive it with: nsenter -t PID -m -p -r -w systemctl ...; its files are /proc/PID/root/...
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
die() { echo "systemd-box: $*" >&2; exit 1; }

cmd=${1:-}; box=${2:-}
[ -n "$cmd" ] && [ -n "$box" ] || die "usage: $0 start|stop|inner BOXDIR [DIR...]"
shift 2

case "$cmd" in
inner)
  mount --make-rprivate /
  mkdir -p "$box/upper" "$box/root"
  mount -t tmpfs tmpfs "$box/upper"
  mkdir -p "$box/upper/u" "$box/upper/w"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$box/upper/u,workdir=$box/upper/w" "$box/root"
  r=$box/root
  mount -t proc proc "$r/proc"
  mount --rbind /sys "$r/sys"
  mount --rbind /dev "$r/dev"
  for d in run tmp var/tmp; do mount -t tmpfs tmpfs "$r/$d"; done
  # Sockets seen through the overlay refuse connections: bind the real directories.
  for d in "$@"; do
    mkdir -p "$r$d"
    mount --bind "$d" "$r$d"
  done
  mkdir -p "$r/run/systemd/system"
  printf '[Unit]\nDescription=bare\nDefaultDependencies=no\n' > "$r/run/systemd/system/bare.target"
  cd "$r"
  exec chroot . env container=other /lib/systemd/systemd --system --unit=bare.target --log-target=null
  ;;
start)
  mkdir -p "$box"
  [ -x /lib/systemd/systemd ] || die "no /lib/systemd/systemd (apt-get install systemd)"
  setsid unshare --fork --pid --mount --uts --ipc --mount-proc \
    bash "$(readlink -f "$0")" inner "$box" "$@" </dev/null >"$box/boot.log" 2>&1 &
  launcher=$!
  # The box's init is the grandchild of unshare: find it by its parent chain.
  for _ in $(seq 1 200); do
    pid=$( (pgrep -f "systemd --system --unit=bare.target" || true) | while read -r p; do
      # ours: an ancestor is the launcher
      q=$p
      while [ -n "$q" ] && [ "$q" != 1 ]; do
        [ "$q" = "$launcher" ] && { echo "$p"; break; }
        q=$(awk '{print $4}' "/proc/$q/stat" 2>/dev/null || true)
      done
    done | head -1) || true
    if [ -n "$pid" ] && nsenter -t "$pid" -m -p -r -w systemctl is-system-running >/dev/null 2>&1; then
      echo "$pid" > "$box/pid"
      echo "$pid"
      exit 0
    fi
    sleep 0.05
  done
  die "the box did not come up; boot log: $(cat "$box/boot.log" 2>/dev/null)"
  ;;
stop)
  [ -f "$box/pid" ] || exit 0
  pid=$(cat "$box/pid")
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  rm -f "$box/pid"
  ;;
*) die "unknown command $cmd" ;;
esac
