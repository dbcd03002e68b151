#!/usr/bin/python3
"""calls_paced.py URI WARM N

getLibVersion calls through URI in two rounds, paced by the caller (the counting-allocator
test, tests/metrics_alloc.rs): WARM calls, then "warm" on stdout and a line awaited on
stdin; N calls, then "done" and a line awaited; then close.
"""
import sys

from _common import libvirt, run, setup, usage


def main():
    if len(sys.argv) != 4:
        usage("URI WARM N")
    uri, warm, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    setup(120)
    conn = libvirt.open(uri)
    for _ in range(warm):
        conn.getLibVersion()
    print("warm", flush=True)
    sys.stdin.readline()
    for _ in range(n):
        conn.getLibVersion()
    print("done", flush=True)
    sys.stdin.readline()
    conn.close()


run(main)
