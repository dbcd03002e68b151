#!/usr/bin/python3
"""fd_associate.py URI DAEMON_PID [DEADLINE_S]

FD passing (REMOTE_PROC_DOMAIN_FD_ASSOCIATE, a CALL_WITH_FDS) through URI (a
qemu:///system style URI). Defines a minimal qemu domain, passes the fd of a uniquely
named temp file with virDomainFDAssociate, and requires that the driver daemon DAEMON_PID
then holds that file open (a link in /proc/DAEMON_PID/fd) while the connection is open.
Then undefines the domain and requires the daemon to let go of the file.

Note (libvirt 9.0.0, observed): the daemon keeps associated fds of an inactive domain
after the client connection closes; they are released when the domain is undefined.
"""
import os
import sys
import tempfile
import time

from _common import fail, libvirt, qemu_domain_xml, run, setup, unique, usage, wait_for


def holders(pid, path):
    """fd numbers of process pid that point at path."""
    out = []
    d = "/proc/%d/fd" % pid
    try:
        entries = os.listdir(d)
    except OSError as e:
        fail("cannot list %s: %s" % (d, e))
    for fd in entries:
        try:
            if os.readlink(os.path.join(d, fd)) == path:
                out.append(int(fd))
        except OSError:
            pass  # fd closed meanwhile
    return out


def main():
    if len(sys.argv) not in (3, 4):
        usage("URI DAEMON_PID [DEADLINE_S]")
    uri, dpid = sys.argv[1], int(sys.argv[2])
    deadline = float(sys.argv[3]) if len(sys.argv) == 4 else 10.0
    setup(2 * deadline + 30)
    if not os.path.isdir("/proc/%d/fd" % dpid):
        fail("daemon pid %d does not exist" % dpid)

    name = unique("fd")
    tmp = tempfile.NamedTemporaryFile(prefix=name + "-", suffix=".fdtest", delete=False)
    path = os.path.realpath(tmp.name)
    conn = libvirt.open(uri)
    dom = None
    try:
        if holders(dpid, path):
            fail("daemon already holds %s before the call" % path)
        dom = conn.defineXML(qemu_domain_xml(name))
        t0 = time.monotonic()
        dom.FDAssociate("vpdtest", [tmp.fileno()], 0)
        if not wait_for(deadline, lambda: holders(dpid, path)):
            fail("daemon %d holds no fd for %s after FDAssociate" % (dpid, path))
        t_assoc = time.monotonic() - t0
        dom.info()                      # one more round trip on the same connection
        fds = holders(dpid, path)
        if not fds:
            fail("daemon dropped the associated fd while the connection is open")
        dom.undefine()
        dom = None
        t1 = time.monotonic()
        if not wait_for(deadline, lambda: not holders(dpid, path)):
            fail("daemon %d still holds %s %.1fs after undefine" % (dpid, path, deadline))
        t_release = time.monotonic() - t1
        conn.close()
        conn = None
    finally:
        tmp.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        if dom is not None:
            try:
                dom.undefine()
            except libvirt.libvirtError as e:
                sys.stderr.write("cleanup: undefine %s: %s\n" % (name, e))
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
    print("fd_associate ok: daemon %d held %s as fd %s (%.3fs); released %.3fs after undefine"
          % (dpid, os.path.basename(path), fds, t_assoc, t_release))


run(main)
