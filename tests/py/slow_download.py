#!/usr/bin/python3
"""slow_download.py URI POOL_DIR SIZE_MIB PAUSE_MS [DEADLINE_S]

A volume stream read by a slow client: uploads SIZE_MIB MiB of pseudo-random data, then
downloads it with a sink that sleeps PAUSE_MS after each piece, so the client stops reading
its socket again and again and everything between the daemon and it fills up (back-pressure
through the proxy). Compares length and sha256. A relay that stalls under back-pressure makes
this hang until the watchdog fires (DEADLINE_S, default 300), which fails.
"""
import os
import random
import sys

from _common import libvirt, run, setup, transient_volume, unique, upload_then_download, usage


def main():
    if len(sys.argv) not in (5, 6):
        usage("URI POOL_DIR SIZE_MIB PAUSE_MS [DEADLINE_S]")
    uri, pool_dir = sys.argv[1], os.path.abspath(sys.argv[2])
    size, pause = int(sys.argv[3]) * 1024 * 1024, int(sys.argv[4]) / 1000.0
    setup(float(sys.argv[5]) if len(sys.argv) == 6 else 300.0)
    os.makedirs(pool_dir, exist_ok=True)
    conn = libvirt.open(uri)
    name = unique("slowpool")
    try:
        with transient_volume(conn, name, pool_dir, name + ".img", size) as (_pool, vol):
            r = upload_then_download(conn, vol, size, random.Random(name).randbytes,
                                     pause_s=pause)
        print("slow_download ok: %d MiB in %d pieces, %.2fs"
              % (size >> 20, r["pieces"], r["down_s"]))
    finally:
        conn.close()


run(main)
