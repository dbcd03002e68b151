#!/usr/bin/python3
"""restart_autodestroy.py URI DIRECT_URI READY_FILE RESTARTED_FILE

A guest started with VIR_DOMAIN_START_AUTODESTROY through URI (the proxy) lives as long as
that connection does: libvirt kills it when the connection closes. Starts one (a disk-less
TCG qemu guest), writes READY_FILE, waits for RESTARTED_FILE, then checks through
DIRECT_URI (the daemon's own socket) that the guest still runs and through URI that the
same connection still works; then closes the proxied connection and requires the guest to
be gone (so the guest stayed bound to the carried connection).
"""
import os
import sys

from _common import fail, libvirt, qemu_domain_xml, run, setup, unique, usage, wait_for


def main():
    if len(sys.argv) != 5:
        usage("URI DIRECT_URI READY_FILE RESTARTED_FILE")
    uri, direct_uri, ready, restarted = sys.argv[1:5]
    setup(120)
    conn = libvirt.open(uri)
    direct = libvirt.open(direct_uri)
    name = unique("autodestroy")
    dom = conn.createXML(qemu_domain_xml(name), libvirt.VIR_DOMAIN_START_AUTODESTROY)
    try:
        with open(ready, "w") as f:
            f.write("ready\n")
        if not wait_for(60, lambda: os.path.exists(restarted)):
            fail("no restart within 60 s")
        if not direct.lookupByName(name).isActive():
            fail("the AUTODESTROY guest stopped across the restart")
        if not dom.isActive():
            fail("the proxied connection does not see its guest")
        # A domain object holds a reference to its connection: drop it, or close() keeps
        # the connection open.
        del dom
        left = conn.close()
        if left != 0:
            fail("the connection still has %d references" % left)
        gone = wait_for(20, lambda: name not in [d.name() for d in direct.listAllDomains()])
        if not gone:
            fail("closing the carried connection did not destroy its AUTODESTROY guest")
    finally:
        try:
            direct.lookupByName(name).destroy()
        except libvirt.libvirtError:
            pass
        direct.close()
    print("restart_autodestroy ok: guest %s survived the restart and went with its connection"
          % name)


run(main)
