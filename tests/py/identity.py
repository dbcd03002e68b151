#!/usr/bin/python3
"""identity.py URI [DEADLINE_S [claim-root]]

Prints "pid <PID>" on the first line, opens URI, makes one call, prints "open uid=<UID>"
and then keeps the connection open until stdin is closed (or DEADLINE_S, default 120 s,
passes). Meant for `runuser -u vpdtest -- /usr/bin/python3 identity.py URI` with a pipe on
stdin, so a test can inspect the connection with `virt-admin client-info` (look for
unix_process_id == PID) while it is open. Exit 0 after a clean close.
With "claim-root", the client then calls virConnectSetIdentity claiming uid/gid 0 and prints
"claimed rc=<RC>" (or "claimed error=<CODE>,<DOMAIN>").
"""
import os
import select
import sys
import time

from _common import fail, libvirt, run, setup, usage


def main():
    if len(sys.argv) not in (2, 3, 4):
        usage("URI [DEADLINE_S [claim-root]]")
    uri = sys.argv[1]
    deadline = float(sys.argv[2]) if len(sys.argv) >= 3 else 120.0
    claim = len(sys.argv) == 4 and sys.argv[3] == "claim-root"
    setup(deadline + 30)
    print("pid %d" % os.getpid(), flush=True)
    conn = libvirt.open(uri)
    conn.getLibVersion()
    print("open uid=%d" % os.getuid(), flush=True)
    if claim:
        try:
            rc = conn.setIdentity({"user-name": "root", "unix-user-id": 0,
                                   "group-name": "root", "unix-group-id": 0})
            print("claimed rc=%d" % rc, flush=True)
        except libvirt.libvirtError as e:
            print("claimed error=%d,%d" % (e.get_error_code(), e.get_error_domain()), flush=True)
    end = time.monotonic() + deadline
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([sys.stdin.fileno()], [], [], min(left, 1.0))
        if r and not os.read(sys.stdin.fileno(), 4096):
            break                                # stdin closed
        if not conn.isAlive():
            fail("connection died while waiting")
    conn.close()
    print("closed", flush=True)


run(main)
