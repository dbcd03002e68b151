#!/usr/bin/python3
"""stalled_reader.py URI POOL_DIR SIZE_MIB HOLD_S

A client that starts a volume download and never reads it: makes a transient pool with a
sparse SIZE_MIB MiB volume, starts the download stream, prints "stalled" and then makes no
libvirt call (so its socket is never read) for HOLD_S seconds or until stdin closes. What the
daemon sends backs up through the proxy: the proxy must hold a bounded amount of it.
"""
import os
import select
import sys

from _common import libvirt, run, setup, transient_volume, unique, usage


def main():
    if len(sys.argv) != 5:
        usage("URI POOL_DIR SIZE_MIB HOLD_S")
    uri, pool_dir = sys.argv[1], os.path.abspath(sys.argv[2])
    size, hold = int(sys.argv[3]) * 1024 * 1024, float(sys.argv[4])
    setup(hold + 120.0)
    os.makedirs(pool_dir, exist_ok=True)
    conn = libvirt.open(uri)
    name = unique("stallpool")
    with transient_volume(conn, name, pool_dir, name + ".img", size) as (_pool, vol):
        st = conn.newStream(0)
        vol.download(st, 0, size, 0)
        print("stalled", flush=True)
        select.select([sys.stdin], [], [], hold)
        st.abort()
    conn.close()


run(main)
