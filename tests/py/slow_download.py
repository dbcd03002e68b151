#!/usr/bin/python3
"""slow_download.py URI POOL_DIR SIZE_MIB PAUSE_MS [DEADLINE_S]

A volume stream read by a slow client: uploads SIZE_MIB MiB of pseudo-random data, then
downloads it with a sink that sleeps PAUSE_MS after each piece, so the client stops reading
its socket again and again and everything between the daemon and it fills up (back-pressure
through the proxy). Compares length and sha256. A relay that stalls under back-pressure makes
this hang until the watchdog fires (DEADLINE_S, default 300), which fails.
"""
import hashlib
import os
import random
import sys
import time

from _common import dir_pool_and_volume, fail, libvirt, run, setup, unique, usage


def main():
    if len(sys.argv) not in (5, 6):
        usage("URI POOL_DIR SIZE_MIB PAUSE_MS [DEADLINE_S]")
    uri, pool_dir = sys.argv[1], os.path.abspath(sys.argv[2])
    size, pause = int(sys.argv[3]) * 1024 * 1024, int(sys.argv[4]) / 1000.0
    setup(float(sys.argv[5]) if len(sys.argv) == 6 else 300.0)
    os.makedirs(pool_dir, exist_ok=True)
    conn = libvirt.open(uri)
    name = unique("slowpool")
    pool = vol = None
    try:
        pool, vol = dir_pool_and_volume(conn, name, pool_dir, name + ".img", size)
        data = random.Random(name).randbytes(size)
        st = conn.newStream(0)
        vol.upload(st, 0, size, 0)
        sent = {"at": 0}

        def source(_stream, nbytes, s):
            chunk = data[s["at"]:s["at"] + nbytes]
            s["at"] += len(chunk)
            return chunk

        st.sendAll(source, sent)
        st.finish()

        down = {"n": 0, "pieces": 0, "sha": hashlib.sha256()}

        def sink(_stream, piece, s):
            s["n"] += len(piece)
            s["pieces"] += 1
            s["sha"].update(piece)
            time.sleep(pause)
            return len(piece)

        t0 = time.monotonic()
        st = conn.newStream(0)
        vol.download(st, 0, size, 0)
        st.recvAll(sink, down)
        st.finish()
        if down["n"] != size:
            fail("downloaded %d bytes, uploaded %d" % (down["n"], size))
        if down["sha"].hexdigest() != hashlib.sha256(data).hexdigest():
            fail("sha256 mismatch")
        print("slow_download ok: %d MiB in %d pieces, %.2fs"
              % (size >> 20, down["pieces"], time.monotonic() - t0))
    finally:
        if vol is not None:
            vol.delete(0)
        if pool is not None:
            pool.destroy()
        conn.close()


run(main)
