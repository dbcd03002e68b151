#!/usr/bin/python3
"""stream_volume.py URI POOL_DIR SIZE_MIB [DEADLINE_S]

Volume streams (STORAGE_VOL_UPLOAD / STORAGE_VOL_DOWNLOAD) through URI (a qemu:///system
style URI; the storage driver answers it). Starts a transient dir pool on POOL_DIR (created
if missing; use a different directory per concurrent run: libvirt refuses two pools with
the same target path), creates a raw volume of SIZE_MIB MiB, uploads SIZE_MIB MiB of
pseudo-random data with virStream sendAll, downloads it with recvAll and compares sha256
and length. Cleans up the volume and the pool (POOL_DIR itself is left in place).
"""
import os
import random
import sys

from _common import (fail, libvirt, run, setup, transient_volume, unique,
                     upload_then_download, usage)


def main():
    if len(sys.argv) not in (4, 5):
        usage("URI POOL_DIR SIZE_MIB [DEADLINE_S]")
    uri, pool_dir, size_mib = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3])
    setup(float(sys.argv[4]) if len(sys.argv) == 5 else 300.0)
    size = size_mib * 1024 * 1024
    os.makedirs(pool_dir, exist_ok=True)

    name = unique("pool")
    conn = libvirt.open(uri)
    try:
        with transient_volume(conn, name, pool_dir, name + ".img", size) as (_pool, vol):
            rng = random.Random(os.getpid())
            r = upload_then_download(conn, vol, size, rng.randbytes)
            info = vol.info()
            if info[1] != size:
                fail("volume capacity %d after upload, want %d" % (info[1], size))
    finally:
        conn.close()
    sha, t_up, t_down = r["sha256"], r["up_s"], r["down_s"]
    mib = size / 1048576.0
    print("stream_volume ok: %d MiB sha256 %s… upload %.2fs (%.0f MiB/s) download %.2fs "
          "(%.0f MiB/s)" % (size_mib, sha[:12], t_up, mib / t_up,
                            t_down, mib / t_down))


run(main)
