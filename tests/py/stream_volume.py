#!/usr/bin/python3
"""stream_volume.py URI POOL_DIR SIZE_MIB [DEADLINE_S]

Volume streams (STORAGE_VOL_UPLOAD / STORAGE_VOL_DOWNLOAD) through URI (a qemu:///system
style URI; the storage driver answers it). Starts a transient dir pool on POOL_DIR (created
if missing; use a different directory per concurrent run: libvirt refuses two pools with
the same target path), creates a raw volume of SIZE_MIB MiB, uploads SIZE_MIB MiB of
pseudo-random data with virStream sendAll, downloads it with recvAll and compares sha256
and length. Cleans up the volume and the pool (POOL_DIR itself is left in place).
"""
import hashlib
import os
import random
import sys
import time

from _common import fail, libvirt, run, setup, unique, usage

CHUNK = 256 * 1024


def main():
    if len(sys.argv) not in (4, 5):
        usage("URI POOL_DIR SIZE_MIB [DEADLINE_S]")
    uri, pool_dir, size_mib = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3])
    setup(float(sys.argv[4]) if len(sys.argv) == 5 else 300.0)
    size = size_mib * 1024 * 1024
    os.makedirs(pool_dir, exist_ok=True)

    name = unique("pool")
    conn = libvirt.open(uri)
    pool = vol = None
    try:
        pool = conn.storagePoolCreateXML(
            "<pool type='dir'><name>%s</name><target><path>%s</path></target></pool>"
            % (name, pool_dir), 0)
        vol = pool.createXML(
            "<volume><name>%s.img</name><capacity unit='bytes'>%d</capacity>"
            "<allocation>0</allocation><target><format type='raw'/></target></volume>"
            % (name, size), 0)

        # upload
        rng = random.Random(os.getpid())
        up = {"left": size, "sha": hashlib.sha256()}

        def source(_stream, nbytes, st):
            n = min(nbytes, st["left"])
            if n <= 0:
                return b""
            data = rng.randbytes(n)
            st["left"] -= n
            st["sha"].update(data)
            return data

        t0 = time.monotonic()
        st = conn.newStream(0)
        vol.upload(st, 0, size, 0)
        st.sendAll(source, up)
        st.finish()
        t_up = time.monotonic() - t0
        if up["left"] != 0:
            fail("upload stopped with %d bytes unsent" % up["left"])

        info = vol.info()
        if info[1] != size:
            fail("volume capacity %d after upload, want %d" % (info[1], size))

        # download
        down = {"n": 0, "sha": hashlib.sha256()}

        def sink(_stream, data, st):
            st["n"] += len(data)
            st["sha"].update(data)
            return len(data)

        t1 = time.monotonic()
        st = conn.newStream(0)
        vol.download(st, 0, size, 0)
        st.recvAll(sink, down)
        st.finish()
        t_down = time.monotonic() - t1

        if down["n"] != size:
            fail("downloaded %d bytes, uploaded %d" % (down["n"], size))
        if down["sha"].hexdigest() != up["sha"].hexdigest():
            fail("sha256 mismatch: uploaded %s, downloaded %s"
                 % (up["sha"].hexdigest(), down["sha"].hexdigest()))
    finally:
        if vol is not None:
            try:
                vol.delete(0)
            except libvirt.libvirtError as e:
                sys.stderr.write("cleanup: delete volume: %s\n" % e)
        if pool is not None:
            try:
                pool.destroy()
            except libvirt.libvirtError as e:
                sys.stderr.write("cleanup: destroy pool %s: %s\n" % (name, e))
        conn.close()
    mib = size / 1048576.0
    print("stream_volume ok: %d MiB sha256 %s… upload %.2fs (%.0f MiB/s) download %.2fs "
          "(%.0f MiB/s)" % (size_mib, up["sha"].hexdigest()[:12], t_up, mib / t_up,
                            t_down, mib / t_down))


run(main)
