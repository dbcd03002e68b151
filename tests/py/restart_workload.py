#!/usr/bin/python3
"""restart_workload.py URI POOL_DIR SIZE_MIB READY_FILE RESTARTED_FILE

Connections that must live through a proxy restart (tests/restart.rs): opens them all,
then writes READY_FILE and keeps them busy until RESTARTED_FILE appears, and a second
longer. Meanwhile:
- 4 connections call getLibVersion + listAllStoragePools in a loop (every call must work);
- 1 connection has a storage pool lifecycle callback registered before the restart, and
  must see the events of a pool defined, started, stopped and undefined after it;
- 1 connection downloads a SIZE_MIB volume (uploaded first) slowly, across the restart,
  and compares its sha256 with what it uploaded;
- 1 connection uploads another SIZE_MIB volume slowly, across the restart; it is then
  downloaded and compared.
No connection is re-opened. Prints the counts.
"""
import hashlib
import os
import queue
import random
import sys
import threading
import time

from _common import fail, libvirt, run, setup, transient_volume, unique, usage, wait_for


def random_bytes(seed, size):
    """size random bytes; randbytes() alone takes at most 2**28 bytes (its bit count is a C int)."""
    rng = random.Random(seed)
    step = 1 << 24
    return b"".join(rng.randbytes(min(step, size - at)) for at in range(0, size, step))


def main():
    if len(sys.argv) != 6:
        usage("URI POOL_DIR SIZE_MIB READY_FILE RESTARTED_FILE")
    uri, pool_dir, size_mib = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3])
    ready, restarted = sys.argv[4], sys.argv[5]
    setup(120)
    os.makedirs(pool_dir, exist_ok=True)
    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()

    busy = [libvirt.open(uri) for _ in range(4)]
    watcher = libvirt.open(uri)
    streamer = libvirt.open(uri)
    uploader = libvirt.open(uri)
    events = queue.Queue()

    def on_pool(_conn, pool, event, _detail, _opaque):
        events.put((pool.name(), event))

    watcher.storagePoolEventRegisterAny(
        None, libvirt.VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE, on_pool, None)

    stop = threading.Event()
    calls = [0] * len(busy)
    errors = []

    def hammer(i, conn):
        while not stop.is_set():
            try:
                if conn.getLibVersion() <= 0:
                    errors.append("conn %d: bad version" % i)
                conn.listAllStoragePools()
                calls[i] += 1
            except libvirt.libvirtError as e:
                errors.append("conn %d: %s" % (i, e.get_error_message()))
                return

    size = size_mib * 1024 * 1024
    name = unique("restart")
    with transient_volume(streamer, name, pool_dir, name + ".img", size) as (_pool, vol):
        data = random_bytes(os.getpid(), size)
        up = streamer.newStream(0)
        vol.upload(up, 0, size, 0)
        sent = 0
        while sent < size:
            n = up.send(data[sent:sent + 262144])
            if n <= 0:
                fail("upload send returned %d" % n)
            sent += n
        up.finish()
        want = hashlib.sha256(data).hexdigest()

        # A second volume, uploaded slowly on its own connection across the restart.
        vol2 = _pool.createXML(
            "<volume><name>%s-up.img</name><capacity>%d</capacity>"
            "<target><format type='raw'/></target></volume>" % (name, size), 0)
        data2 = random_bytes(os.getpid() + 1, size)
        up_result = {}

        def slow_upload():
            try:
                v = uploader.storageVolLookupByKey(vol2.key())
                st = uploader.newStream(0)
                v.upload(st, 0, size, 0)
                off, seen = 0, None
                while off < size:
                    n = st.send(data2[off:off + 262144])
                    if n <= 0:
                        up_result["error"] = "upload send returned %d" % n
                        return
                    off += n
                    if seen is None:
                        time.sleep(0.02)
                        if os.path.exists(restarted):
                            seen = off
                st.finish()
                up_result["seen"] = seen
            except libvirt.libvirtError as e:
                up_result["error"] = e.get_error_message()

        threads = [threading.Thread(target=hammer, args=(i, c)) for i, c in enumerate(busy)]
        for t in threads:
            t.start()
        uploading = threading.Thread(target=slow_upload)
        uploading.start()
        down = streamer.newStream(0)
        vol.download(down, 0, size, 0)
        got = hashlib.sha256()
        received = 0
        with open(ready, "w") as f:
            f.write("ready\n")
        # Slowly: the download must still be running when the proxy restarts.
        restart_seen_at = None
        while True:
            chunk = down.recv(262144)
            if chunk == -2:
                time.sleep(0.01)
                continue
            if not chunk:
                break
            got.update(chunk)
            received += len(chunk)
            if restart_seen_at is None:
                time.sleep(0.02)
                if os.path.exists(restarted):
                    restart_seen_at = received
        down.finish()
        if received != size:
            fail("downloaded %d bytes, want %d" % (received, size))
        if got.hexdigest() != want:
            fail("download sha256 %s, uploaded %s" % (got.hexdigest()[:12], want[:12]))
        if restart_seen_at is None or restart_seen_at >= size:
            fail("the download ended before the restart finished (%s of %d bytes)"
                 % (restart_seen_at, size))
        uploading.join(60)
        if "error" in up_result:
            fail("the upload across the restart failed: %s" % up_result["error"])
        seen = up_result.get("seen")
        if seen is None or seen >= size:
            fail("the upload ended before the restart finished (%s of %d bytes)" % (seen, size))
        check = streamer.newStream(0)
        vol2.download(check, 0, size, 0)
        back = hashlib.sha256()
        got2 = 0
        while True:
            chunk = check.recv(1 << 20)
            if chunk == -2:
                continue
            if not chunk:
                break
            back.update(chunk)
            got2 += len(chunk)
        check.finish()
        if got2 != size or back.hexdigest() != hashlib.sha256(data2).hexdigest():
            fail("the volume uploaded across the restart reads back different (%d bytes)" % got2)
        up_at = 100.0 * seen / size
        vol2.delete(0)

    if not wait_for(30, lambda: os.path.exists(restarted)):
        fail("no restart within 30 s")
    before = list(calls)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    if errors:
        fail("busy connections failed: %s" % "; ".join(errors[:3]))
    if any(after <= b for after, b in zip(calls, before)):
        fail("a busy connection made no call after the restart: %s -> %s" % (before, calls))

    # Events registered before the restart still arrive after it.
    pname = unique("evpool")
    pdir = os.path.join(pool_dir, pname)
    os.makedirs(pdir, exist_ok=True)
    p = watcher.storagePoolDefineXML(
        "<pool type='dir'><name>%s</name><target><path>%s</path></target></pool>"
        % (pname, pdir), 0)
    p.create(0)
    p.destroy()
    p.undefine()
    seen = set()
    end = time.monotonic() + 10
    while time.monotonic() < end and not {
            libvirt.VIR_STORAGE_POOL_EVENT_DEFINED, libvirt.VIR_STORAGE_POOL_EVENT_STARTED,
            libvirt.VIR_STORAGE_POOL_EVENT_STOPPED,
            libvirt.VIR_STORAGE_POOL_EVENT_UNDEFINED} <= seen:
        try:
            n, ev = events.get(timeout=0.5)
        except queue.Empty:
            continue
        if n == pname:
            seen.add(ev)
    if len(seen) < 4:
        fail("pool events after the restart: %s" % sorted(seen))
    for c in busy + [watcher, streamer, uploader]:
        c.close()
    print("restart_workload ok: calls %s (after the restart %s), %d MiB verified each way, "
          "download %.0f%% and upload %.0f%% done at the restart" % (
              calls, [a - b for a, b in zip(calls, before)], size_mib,
              100.0 * restart_seen_at / size, up_at))


run(main)
