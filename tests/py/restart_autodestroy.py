#!/usr/bin/python3
"""restart_autodestroy.py URI DIRECT_URI DAEMON_PID READY_FILE RESTARTED_FILE

A guest started with VIR_DOMAIN_START_AUTODESTROY through URI (the proxy) lives as long as
that connection does: libvirt kills it when the connection closes. Starts one (a disk-less
TCG qemu guest), writes READY_FILE, waits for RESTARTED_FILE, then checks through
DIRECT_URI (the daemon's own socket) that the guest still runs and through URI that the
same connection still works, passing an fd on it right away (virDomainFDAssociate: the
daemon DAEMON_PID must hold the file); then closes the proxied connection and requires the
guest to be gone (so the guest stayed bound to the carried connection).
"""
import os
import sys
import tempfile

from _common import fail, libvirt, qemu_domain_xml, run, setup, unique, usage, wait_for


def main():
    if len(sys.argv) != 6:
        usage("URI DIRECT_URI DAEMON_PID READY_FILE RESTARTED_FILE")
    uri, direct_uri, dpid, ready, restarted = sys.argv[1:6]
    dpid = int(dpid)
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
        # An fd-passing call on the carried connection right after the restart.
        holder_name = unique("fd")
        tmp = tempfile.NamedTemporaryFile(prefix=holder_name + "-", delete=False)
        path = os.path.realpath(tmp.name)
        other = conn.defineXML(qemu_domain_xml(holder_name))
        try:
            other.FDAssociate("vpdtest", [tmp.fileno()], 0)

            def held():
                d = "/proc/%d/fd" % dpid
                for fd in os.listdir(d):
                    try:
                        if os.readlink(os.path.join(d, fd)) == path:
                            return True
                    except OSError:
                        pass
                return False

            if not wait_for(10, held):
                fail("the daemon got no fd from FDAssociate after the restart")
        finally:
            other.undefine()
            del other
            tmp.close()
            os.unlink(path)
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
    print("restart_autodestroy ok: guest %s survived the restart and went with its connection; "
          "an fd passed on it after the restart reached the daemon" % name)


run(main)
