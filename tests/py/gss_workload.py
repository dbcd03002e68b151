#!/usr/bin/python3
"""gss_workload.py URI POOL_DIR SIZE_MIB MARKER [DEADLINE_S]

The GSSAPI workload of tests/sasl_gssapi.rs through URI (qemu+tcp://...): a few calls, domain
lifecycle events around define/undefine (virtqemud), and a volume stream of SIZE_MIB MiB up
and down (virtqemud -> virtstoraged) with sha256 compared. MARKER (ASCII) is put where a
plaintext capture would show it: in the domain, pool and volume names, and every 512 bytes of
the uploaded data (the rest is pseudo-random, seeded by MARKER so every run sends the same).
Prints one JSON object of outcomes on stdout; exits non-zero with FAIL on any failure.
"""
import json
import os
import queue
import random
import sys
import threading

from _common import (fail, libvirt, qemu_domain_xml, run, setup, transient_volume,
                     upload_then_download, usage)


def main():
    if len(sys.argv) not in (5, 6):
        usage("URI POOL_DIR SIZE_MIB MARKER [DEADLINE_S]")
    uri, pool_dir, size_mib, marker = (sys.argv[1], os.path.abspath(sys.argv[2]),
                                       int(sys.argv[3]), sys.argv[4])
    setup(float(sys.argv[5]) if len(sys.argv) == 6 else 600.0)
    mark = marker.encode()
    size = size_mib * 1024 * 1024
    os.makedirs(pool_dir, exist_ok=True)
    out = {}

    libvirt.virEventRegisterDefaultImpl()
    threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)],
                     daemon=True).start()
    conn = libvirt.open(uri)
    out["encrypted"] = conn.isEncrypted()
    out["secure"] = conn.isSecure()
    out["hv_type"] = conn.getType()
    out["lib_version"] = conn.getLibVersion()
    out["caps_has_host"] = "<host>" in conn.getCapabilities()
    try:
        conn.lookupByName("nosuch-" + marker)
        out["lookup_missing"] = "found"
    except libvirt.libvirtError as e:
        out["lookup_missing"] = [e.get_error_domain(), e.get_error_code()]

    # Events: DEFINED and UNDEFINED for a domain whose name carries the marker.
    events = queue.Queue()
    dom_name = "dom-" + marker
    cb = conn.domainEventRegisterAny(
        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        lambda _c, d, ev, det, _o: events.put([ev, det]) if d.name() == dom_name else None,
        None)
    conn.defineXML(qemu_domain_xml(dom_name)).undefine()
    seen = []
    try:
        while len(seen) < 2:
            seen.append(events.get(timeout=20))
    except queue.Empty:
        fail("lifecycle events: got %r, want DEFINED and UNDEFINED" % seen)
    conn.domainEventDeregisterAny(cb)
    out["events"] = seen

    with transient_volume(conn, "pool-%s" % marker, pool_dir, "vol-%s.img" % marker,
                          size) as (pool, vol):
        out["vol_listed"] = ("vol-%s.img" % marker) in pool.listVolumes()

        rng = random.Random(marker)

        def make(n):
            # The marker every 512 bytes: a capture of the wire must not show it.
            data = bytearray(rng.randbytes(n))
            for off in range(0, n - len(mark) + 1, 512):
                data[off:off + len(mark)] = mark
            return bytes(data)

        r = upload_then_download(conn, vol, size, make)
        out["stream_bytes"] = size
        out["stream_sha256"] = r["sha256"]
        out["timing"] = {"up_s": round(r["up_s"], 2), "down_s": round(r["down_s"], 2)}
    conn.close()
    print(json.dumps(out, sort_keys=True))


run(main)
