#!/usr/bin/python3
"""admin_client.py URI [ro]

Prints "pid <PID>", opens URI (read-only with "ro"), makes one call and prints "open". Then, for every line read
on stdin, makes one call (getLibVersion) and prints "ok" or "err <code>"; exits 0 when stdin
closes. Lets a test disconnect this client with virt-admin and see its next call fail.
"""
import os
import sys

from _common import libvirt, run, setup, usage


def main():
    if len(sys.argv) not in (2, 3):
        usage("URI [ro]")
    setup(300)
    print("pid %d" % os.getpid(), flush=True)
    if sys.argv[2:] == ["ro"]:
        conn = libvirt.openReadOnly(sys.argv[1])
    else:
        conn = libvirt.open(sys.argv[1])
    conn.getLibVersion()
    print("open", flush=True)
    for _ in sys.stdin:
        try:
            conn.getLibVersion()
            print("ok", flush=True)
        except libvirt.libvirtError as e:
            print("err %d" % e.get_error_code(), flush=True)


run(main)
