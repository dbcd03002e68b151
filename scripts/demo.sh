#!/usr/bin/env bash
# The main job, end to end: a real local libvirtd (Debian's, started privately), virtproxyd in
# front of it, and a real client (virsh) going through the proxy.
#
#   bash scripts/demo.sh          start everything and show a client going through
#   bash scripts/demo.sh stop     stop the proxy and the private libvirtd
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
demo=${VPD_DEMO_DIR:-/tmp/virtproxyd-demo}

stop() {
  if [ -s "$demo/proxy.pid" ]; then kill "$(cat "$demo/proxy.pid")" 2>/dev/null || true; fi
  bash scripts/private-libvirtd.sh stop "$demo/libvirtd" 2>/dev/null || true
  echo "stopped"
}
if [ "${1:-}" = stop ]; then stop; exit 0; fi

bash scripts/install-deps.sh
cargo build --release --quiet
mkdir -p "$demo"
if [ -s "$demo/proxy.pid" ] && kill -0 "$(cat "$demo/proxy.pid")" 2>/dev/null; then stop >/dev/null; fi

echo "== starting a private libvirtd (sockets in $demo/libvirtd/run)"
bash scripts/private-libvirtd.sh start "$demo/libvirtd" >/dev/null
d="$demo/libvirtd/run/libvirt-sock"

cat > "$demo/virtproxyd.conf" <<CONF
# Demo: our sockets in $demo/proxy; every driver is served by the one private libvirtd.
unix_sock_dir = "$demo/proxy"
unix_sock_rw_perms = "0777"
driver_sockets = [ "qemu=$d", "test=$d", "storage=$d", "network=$d", "nodedev=$d", "secret=$d" ]
CONF
echo "== starting virtproxyd (log: $demo/virtproxyd.log)"
"$root/target/release/virtproxyd" -v -f "$demo/virtproxyd.conf" -p "$demo/proxy.pid" \
  >"$demo/virtproxyd.log" 2>&1 &
for _ in $(seq 100); do [ -S "$demo/proxy/libvirt-sock" ] && break; sleep 0.05; done

rw="$demo/proxy/libvirt-sock"
ro="$demo/proxy/libvirt-sock-ro"
run() { echo "\$ $*"; "$@"; }
echo "== a real client through the proxy"
run virsh -c "qemu+unix:///system?socket=$rw" version
run virsh -c "test+unix:///default?socket=$rw" list --all
run virsh -c "test+unix:///default?socket=$ro" dominfo test
echo "== what the proxy logged"
tail -n 6 "$demo/virtproxyd.log"
cat <<NEXT

Try next:
  virsh -c 'qemu+unix:///system?socket=$rw'          # interactive shell through the proxy
  virsh -c 'test+unix:///default?socket=$ro' list    # read-only socket
  /usr/bin/python3 -c 'import libvirt; c = libvirt.open("test+unix:///default?socket=$rw"); print(c.listAllDomains())'
  tail -f $demo/virtproxyd.log
Stop with: bash scripts/demo.sh stop
NEXT
