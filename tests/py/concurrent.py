#!/usr/bin/python3
"""concurrent.py URI N CALLS [ro] [DEADLINE_S]

N client processes, each with its own connection to URI, each doing CALLS cheap calls
(alternating getLibVersion and listAllDomains); all must succeed. Add "ro" to open the
connections read-only. Prints a one-line summary.
"""
import multiprocessing
import os
import sys
import time

from _common import fail, libvirt, run, setup, usage


def worker(args):
    uri, calls, ro, start_at = args
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    # line everybody up so the connections really overlap
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    t0 = time.monotonic()
    done = 0
    try:
        conn = libvirt.openReadOnly(uri) if ro else libvirt.open(uri)
        try:
            for i in range(calls):
                if i % 2 == 0:
                    if conn.getLibVersion() <= 0:
                        return (os.getpid(), done, "getLibVersion returned nothing", 0.0)
                else:
                    conn.listAllDomains(0)
                done += 1
        finally:
            conn.close()
    except libvirt.libvirtError as e:
        return (os.getpid(), done, e.get_error_message() or str(e), 0.0)
    except Exception as e:  # noqa: BLE001
        return (os.getpid(), done, "%s: %s" % (type(e).__name__, e), 0.0)
    return (os.getpid(), done, None, time.monotonic() - t0)


def main():
    args = sys.argv[1:]
    ro = "ro" in args
    args = [a for a in args if a != "ro"]
    if len(args) not in (3, 4):
        usage("URI N CALLS [ro] [DEADLINE_S]")
    uri, n, calls = args[0], int(args[1]), int(args[2])
    setup(float(args[3]) if len(args) == 4 else 120.0)

    t0 = time.monotonic()
    start_at = time.time() + 0.3 + 0.01 * n
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(n) as pool:
        results = pool.map(worker, [(uri, calls, ro, start_at)] * n, chunksize=1)
    wall = time.monotonic() - t0

    bad = [r for r in results if r[2] is not None or r[1] != calls]
    if bad:
        pid, done, err, _ = bad[0]
        fail("%d of %d clients failed; e.g. pid %d after %d/%d calls: %s"
             % (len(bad), n, pid, done, calls, err))
    total = n * calls
    slowest = max(r[3] for r in results)
    print("concurrent ok: %d clients x %d calls = %d calls, wall %.2fs, slowest client "
          "%.2fs (%.0f calls/s)" % (n, calls, total, wall, slowest, total / max(slowest, 1e-9)))


run(main)
