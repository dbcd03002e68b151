#!/usr/bin/python3
"""events.py URI [DEADLINE_S]

Domain lifecycle events through URI (a test:///default style URI): with the default
event loop running, register a LIFECYCLE callback, define + start + destroy + undefine a
uniquely named test domain, and require STARTED and STOPPED events for it within the
deadline (default 10 s after the action).
"""
import queue
import sys
import threading
import time

from _common import fail, libvirt, run, setup, test_domain_xml, unique, usage

NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "DEFINED",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "UNDEFINED",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "STARTED",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "SUSPENDED",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "RESUMED",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "STOPPED",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "SHUTDOWN",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "PMSUSPENDED",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "CRASHED",
}


def main():
    if len(sys.argv) not in (2, 3):
        usage("URI [DEADLINE_S]")
    uri = sys.argv[1]
    deadline = float(sys.argv[2]) if len(sys.argv) == 3 else 10.0
    setup(deadline + 30)

    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()

    conn = libvirt.open(uri)
    name = unique("ev")
    got = queue.Queue()

    def on_lifecycle(_conn, dom, event, detail, _opaque):
        got.put((dom.name(), event, detail))

    cb = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                     on_lifecycle, None)
    t0 = time.monotonic()
    dom = conn.defineXML(test_domain_xml(name))
    try:
        dom.create()
        dom.destroy()
    finally:
        dom.undefine()

    want = {libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STOPPED}
    seen = []
    end = time.monotonic() + deadline
    while want - {e for e, _ in seen}:
        left = end - time.monotonic()
        if left <= 0:
            fail("missing %s for %s after %.1fs; got %s" % (
                "/".join(NAMES[e] for e in sorted(want - {e for e, _ in seen})), name,
                deadline, [NAMES.get(e, e) for e, _ in seen] or "nothing"))
        try:
            dname, event, detail = got.get(timeout=left)
        except queue.Empty:
            continue
        if dname == name:
            seen.append((event, detail))
    elapsed = time.monotonic() - t0
    conn.domainEventDeregisterAny(cb)
    conn.close()
    print("events ok: %s for %s in %.3fs" % (
        " ".join(NAMES.get(e, str(e)) for e, _ in seen), name, elapsed))


run(main)
