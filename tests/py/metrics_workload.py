#!/usr/bin/python3
"""metrics_workload.py STORAGE_URI SECRET_URI POOL_DIR N K M SIZE

A workload of known shape for the metrics tests (tests/metrics.rs), each step through the
proxy:
  - on one storage connection: N getLibVersion calls (each timed by this client), K
    storagePoolLookupByName calls of a pool that does not exist (errors), and an upload of
    SIZE bytes into a volume of a transient dir pool on POOL_DIR;
  - on one secret connection, with the default event loop running: a LIFECYCLE callback,
    then a secret defined and undefined: 2 events;
  - M more storage connections opened and closed.
Prints one line of JSON: {"lib_version_s": [per call seconds...]}.
"""
import json
import queue
import sys
import threading
import time
import uuid as uuid_mod

from _common import fail, libvirt, run, setup, transient_volume, unique, usage


def main():
    if len(sys.argv) != 8:
        usage("STORAGE_URI SECRET_URI POOL_DIR N K M SIZE")
    storage_uri, secret_uri, pool_dir = sys.argv[1:4]
    n, k, m, size = (int(a) for a in sys.argv[4:8])
    setup(120)

    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()

    conn = libvirt.open(storage_uri)
    timings = []
    for _ in range(n):
        t0 = time.monotonic()
        conn.getLibVersion()
        timings.append(time.monotonic() - t0)
    for _ in range(k):
        try:
            conn.storagePoolLookupByName(unique("missing"))
            fail("lookup of a missing pool succeeded")
        except libvirt.libvirtError:
            pass
    with transient_volume(conn, unique("pool"), pool_dir, "v", size) as (_pool, vol):
        st = conn.newStream(0)
        vol.upload(st, 0, size, 0)
        left = {"n": size}

        def source(_stream, nbytes, st_):
            c = min(nbytes, st_["n"])
            st_["n"] -= c
            return b"\x5a" * c

        st.sendAll(source, left)
        st.finish()
    conn.close()

    sconn = libvirt.open(secret_uri)
    got = queue.Queue()

    def on_lifecycle(_conn, _secret, event, _detail, _opaque):
        got.put(event)

    cb = sconn.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_LIFECYCLE,
                                      on_lifecycle, None)
    uuid = str(uuid_mod.uuid4())
    sec = sconn.secretDefineXML(
        "<secret ephemeral='yes' private='yes'><uuid>%s</uuid>"
        "<usage type='volume'><volume>/%s</volume></usage></secret>" % (uuid, unique("s")))
    sec.undefine()
    events = []
    for _ in range(2):
        try:
            events.append(got.get(timeout=10))
        except queue.Empty:
            fail("secret events: got %s, want 2" % events)
    sconn.secretEventDeregisterAny(cb)
    sconn.close()

    for _ in range(m):
        libvirt.open(storage_uri).close()
    print(json.dumps({"lib_version_s": timings}), flush=True)


run(main)
