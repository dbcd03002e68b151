#!/usr/bin/python3
"""diff_workload.py RW_URI RO_URI POOL_DIR TAG

One scripted workload for the differential test: run through libvirt's own virtproxyd and
through ours (tests/modular.rs), its JSON output is compared field by field. Every step
records either {"ok": value} or {"err": [code, domain, message]}; names carry TAG so that
runs do not collide, and TAG is replaced by "<tag>" in the output so runs compare.

Covers: connection facts, qemu / storage / network / secret calls that virtqemud handles or
forwards to virtstoraged, virtnetworkd and virtsecretd, error replies (unknown objects, bad
XML, bad flags, read-only refusals), lifecycle and storage events, a 16 MiB volume stream
each way (sha256), a client's own CONNECT_SET_IDENTITY (valid and invalid).
"""
import hashlib
import json
import os
import queue
import sys
import threading

from _common import libvirt, qemu_domain_xml, setup, usage

if len(sys.argv) != 5:
    usage("RW_URI RO_URI POOL_DIR TAG")
RW, RO, POOL_DIR, TAG = sys.argv[1:]
setup(120)

results = {}


def step(name, fn):
    try:
        v = fn()
        results[name] = {"ok": v}
    except libvirt.libvirtError as e:
        results[name] = {
            "err": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]
        }
    return results[name]


def ok(name):
    return "ok" in results[name]


libvirt.virEventRegisterDefaultImpl()
loop = threading.Thread(
    target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)], daemon=True
)
loop.start()

conn = libvirt.open(RW)
ro = libvirt.openReadOnly(RO)

# Connection facts.
step("lib_version", conn.getLibVersion)
step("hv_type", conn.getType)
step("hv_version", lambda: conn.getVersion() > 0)
step("hostname", conn.getHostname)
step("is_alive", conn.isAlive)
step("is_secure", conn.isSecure)
step("is_encrypted", conn.isEncrypted)
step("max_vcpus_qemu", lambda: conn.getMaxVcpus("qemu") > 0)
step("node_info_cpus", lambda: conn.getInfo()[2] > 0)
step("caps_has_host", lambda: "<host>" in conn.getCapabilities())
step("uri", conn.getURI)

# Errors from each daemon, relayed.
step("dom_lookup_missing", lambda: conn.lookupByName("nosuch-" + TAG).name())
step("pool_lookup_missing", lambda: conn.storagePoolLookupByName("nosuch-" + TAG).name())
step("net_lookup_missing", lambda: conn.networkLookupByName("nosuch-" + TAG).name())
step("secret_lookup_missing",
     lambda: conn.secretLookupByUUIDString("00000000-0000-4000-8000-000000000000").UUIDString())
step("dom_define_bad_xml", lambda: conn.defineXML("<domain").name())
step("dom_list_bad_flags", lambda: len(conn.listAllDomains(1 << 30)))

# Domain lifecycle events around define / undefine (virtqemud).
events = queue.Queue()
dom_name = "vpd-diff-dom-" + TAG
cb = conn.domainEventRegisterAny(
    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
    lambda _c, d, ev, det, _o: events.put((d.name(), ev, det)) if d.name() == dom_name else None,
    None)
step("dom_define", lambda: conn.defineXML(qemu_domain_xml(dom_name)).name())
step("dom_list_has_it", lambda: dom_name in [d.name() for d in conn.listAllDomains()])
step("dom_is_active", lambda: conn.lookupByName(dom_name).isActive())
step("dom_undefine", lambda: conn.lookupByName(dom_name).undefine())
seen = []
try:
    while len(seen) < 2:
        seen.append(list(events.get(timeout=10)))
except queue.Empty:
    pass
results["dom_events"] = {"ok": seen}
conn.domainEventDeregisterAny(cb)

# Storage through virtqemud -> virtstoraged, with a 16 MiB stream each way.
pool_name = "vpd-diff-pool-" + TAG
pool_xml = ("<pool type='dir'><name>%s</name><target><path>%s</path></target></pool>"
            % (pool_name, POOL_DIR))
step("pool_create", lambda: conn.storagePoolCreateXML(pool_xml, 0).name())
step("pool_create_again", lambda: conn.storagePoolCreateXML(pool_xml, 0).name())
if ok("pool_create"):
    pool = conn.storagePoolLookupByName(pool_name)
    vol_xml = ("<volume><name>v.raw</name><capacity unit='MiB'>16</capacity>"
               "<target><format type='raw'/></target></volume>")
    step("vol_create", lambda: pool.createXML(vol_xml, 0).name())
    step("vol_list", lambda: pool.listVolumes())
    data = hashlib.sha256(TAG.encode()).digest() * (16 * 1024 * 1024 // 32)
    want = hashlib.sha256(data).hexdigest()

    def upload():
        vol = pool.storageVolLookupByName("v.raw")
        st = conn.newStream(0)
        vol.upload(st, 0, len(data), 0)
        view = memoryview(data)
        off = 0
        while off < len(data):
            off += st.send(view[off:off + 256 * 1024].tobytes())
        st.finish()
        return len(data)

    def download():
        vol = pool.storageVolLookupByName("v.raw")
        st = conn.newStream(0)
        vol.download(st, 0, len(data), 0)
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = st.recv(256 * 1024)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        st.finish()
        return [n, h.hexdigest() == want]

    step("vol_upload", upload)
    step("vol_download", download)
    step("vol_lookup_missing", lambda: pool.storageVolLookupByName("nosuch").name())
    step("vol_delete", lambda: pool.storageVolLookupByName("v.raw").delete(0))
    step("pool_destroy", lambda: pool.destroy())

# Networks (virtnetworkd) and secrets (virtsecretd), through the qemu connection.
net_name = "vpd-diff-net-" + TAG
net_xml = "<network><name>%s</name></network>" % net_name
step("net_define", lambda: conn.networkDefineXML(net_xml).name())
step("net_in_list", lambda: net_name in [n.name() for n in conn.listAllNetworks()])
step("net_define_bad_xml", lambda: conn.networkDefineXML("<network>").name())
step("net_undefine", lambda: conn.networkLookupByName(net_name).undefine())
sec_xml = ("<secret ephemeral='yes' private='yes'><usage type='volume'>"
           "<volume>/vpd-diff/%s</volume></usage></secret>" % TAG)
step("secret_define", lambda: conn.secretDefineXML(sec_xml).usageID())
if ok("secret_define"):
    sec = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_VOLUME, "/vpd-diff/" + TAG)
    step("secret_set", lambda: sec.setValue(b"s3cret"))
    step("secret_get_private", lambda: sec.value().decode())
    step("secret_undefine", lambda: sec.undefine())

# Read-only connection: reads pass, writes are refused by the daemon.
step("ro_lib_version", ro.getLibVersion)
step("ro_list_domains", lambda: isinstance(ro.listAllDomains(), list))
step("ro_define", lambda: ro.defineXML(qemu_domain_xml("vpd-diff-ro-" + TAG)).name())
step("ro_net_define", lambda: ro.networkDefineXML(net_xml).name())

# A client's own identity call: answered by virtproxyd, never forwarded (the daemon keeps
# the identity virtproxyd gave it at open).
step("set_identity_ok", lambda: conn.setIdentity({"unix-user-id": 0, "user-name": "root"}))
step("set_identity_bad_name", lambda: conn.setIdentity({"bogus": "x"}))
step("after_identity_still_works", conn.getLibVersion)

ro.close()
conn.close()
text = json.dumps(results, sort_keys=True).replace(TAG, "<tag>")
print(text, flush=True)
os._exit(0)
