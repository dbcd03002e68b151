#!/usr/bin/env bash
# The main job, end to end, as on a Fedora/RHEL host: libvirt 9.0.0's modular daemons
# (virtqemud, virtstoraged, virtnetworkd, virtsecretd; built once per machine from Debian's
# source by scripts/modular-testbed.sh and started privately), virtproxyd in front of them with
# an untouched-style config (libvirt's defaults: polkit on the UNIX sockets, root bypasses it),
# and real clients (virsh, virt-admin) going through it.
#
#   bash scripts/demo.sh          start everything and show clients going through
#   bash scripts/demo.sh stop     stop the proxy and the daemons
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
demo=${VPD_DEMO_DIR:-/tmp/virtproxyd-demo}

stop() {
  if [ -s "$demo/proxy.pid" ]; then kill "$(cat "$demo/proxy.pid")" 2>/dev/null || true; fi
  bash scripts/modular-testbed.sh stop "$demo/tb" 2>/dev/null || true
  echo "stopped"
}
if [ "${1:-}" = stop ]; then stop; exit 0; fi

bash scripts/install-deps.sh
echo "== libvirt's modular daemons (built once per machine; the first build takes minutes)"
bash scripts/modular-testbed.sh build >/dev/null
cargo build --release --quiet
mkdir -p "$demo"
if [ -s "$demo/proxy.pid" ] && kill -0 "$(cat "$demo/proxy.pid")" 2>/dev/null; then stop >/dev/null; fi

run_dir=$(bash scripts/modular-testbed.sh start "$demo/tb" 2>/dev/null)
echo "== driver daemons running, sockets in $run_dir/libvirt"

cat > "$demo/virtproxyd.conf" <<CONF
# Demo: libvirt's defaults, our sockets in $demo/proxy, the daemons' sockets found by
# driver_socket_dir alone.
unix_sock_dir = "$demo/proxy"
driver_socket_dir = "$run_dir/libvirt"
CONF
echo "== starting virtproxyd (log: $demo/virtproxyd.log)"
"$root/target/release/virtproxyd" -v -f "$demo/virtproxyd.conf" -p "$demo/proxy.pid" \
  >"$demo/virtproxyd.log" 2>&1 &
for _ in $(seq 100); do [ -S "$demo/proxy/libvirt-sock" ] && break; sleep 0.05; done

rw="$demo/proxy/libvirt-sock"
ro="$demo/proxy/libvirt-sock-ro"
admin="$demo/proxy/libvirt-admin-sock"
run() { echo "\$ $*"; "$@"; }
echo "== real clients through the proxy"
run virsh -c "qemu+unix:///system?socket=$rw" version
run virsh -c "qemu+unix:///system?socket=$rw" net-list --all
run virsh -c "network:///system?socket=$rw" net-list --all
run virsh -c "qemu+unix:///system?socket=$ro" list --all
run virt-admin -c "libvirtd:///system?socket=$admin" srv-list
echo "== what the proxy logged"
tail -n 8 "$demo/virtproxyd.log"
cat <<NEXT

Try next:
  virsh -c 'qemu+unix:///system?socket=$rw'             # interactive shell through the proxy
  virt-admin -c 'libvirtd:///system?socket=$admin'      # the admin interface
  /usr/bin/python3 -c 'import libvirt; c = libvirt.open("qemu+unix:///system?socket=$rw"); print(c.getHostname())'
  tail -f $demo/virtproxyd.log
Stop with: bash scripts/demo.sh stop
NEXT
