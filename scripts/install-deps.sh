#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need on a fresh Debian bookworm machine.
# Idempotent: a second run only checks.
set -euo pipefail

need_pkgs=(libvirt-daemon libvirt-daemon-driver-qemu
           libvirt-clients python3-libvirt qemu-system-x86 libvirt-dev pkg-config socat haproxy
           libsasl2-dev sasl2-bin libsasl2-modules libsasl2-modules-gssapi-mit)
# GSSAPI tests: a private MIT KDC (scripts/kdc-testbed.sh) and tcpdump to show that a security
# layer hides the RPC bodies on the wire.
need_pkgs+=(krb5-kdc krb5-admin-server krb5-user tcpdump)
# tests/polkit_slow.rs: a private bus for its stand-in polkitd.
need_pkgs+=(dbus-daemon)
# tests/metrics.rs: promtool (from Debian's prometheus, 19 MB; the server it also ships is never
# started, see policy-rc.d below) checks the text-format scrapes; promtool 2.42 reads no
# OpenMetrics, so those go through the Prometheus Python client's strict OpenMetrics parser.
need_pkgs+=(prometheus python3-prometheus-client)
# tests/systemd_restart.rs: systemd 252 booted in private namespaces (scripts/systemd-box.sh),
# driven with nsenter (util-linux).
need_pkgs+=(systemd util-linux)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# Debian's qemu driver refuses to start without this user; create it before the packages'
# postinst scripts or our own daemon run.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || \
  useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
          --shell /usr/sbin/nologin libvirt-qemu
# An unprivileged user for identity tests (a client that is not root).
getent passwd vpdtest >/dev/null || useradd --create-home --shell /bin/sh vpdtest

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d: packages must not start system services here; tests run private daemons.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
echo "deps ok: $(libvirtd --version)"
