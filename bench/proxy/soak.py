#!/usr/bin/python3
"""soak.py SPEC_JSON

The soak behind `VPD_BENCH_ONLY=soak cargo bench --bench proxy`: a mixed, hostile workload
through one proxy in front of the modular test bed, for a set time, with virtqemud killed and
restarted every minute. SPEC_JSON names the proxy's socket and TCP port, the test bed, a pool
directory, the length, and where to write the report. Every role runs in a process of its
own (this script with "role NAME"); each writes its counters as one JSON line when it ends.

Roles: callers (cheap calls), event listeners (define/undefine, DEFINED/UNDEFINED events
expected), streams (upload + download, sha256 compared), fd passing (virDomainFDAssociate),
churn (clients killed at random points), idle connections held to virtstoraged, and the
attackers of the hardening issue (CONNECT_SET_IDENTITY floods, pre-open floods, a TCP peer
flooding refused AUTH_POLKIT, a client that never reads its download). An error is "explained"
when it falls within a virtqemud restart's window and the role talks to virtqemud; anything
else is reported as unexplained.
"""
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "py"))

import libvirt  # noqa: E402

from _common import (  # noqa: E402
    Failure, qemu_domain_xml, transient_volume, unique, upload_then_download)

libvirt.registerErrorHandler(lambda *a: None, None)

REMOTE = 0x20008086


def uri(spec, scheme_path):
    scheme, path = scheme_path.split("://", 1)
    return "%s+unix://%s?socket=%s" % (scheme, path, spec["sock"])


def frame(proc, serial, body=b"", prog=REMOTE):
    return struct.pack(">7I", 28 + len(body), prog, 1, proc, 0, serial, 0) + body


def xdr_string(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b + b"\0" * ((4 - len(b) % 4) % 4)


def recv_frame(s):
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    n = struct.unpack(">I", head)[0] - 4
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return head + body


def raw_open(spec, name):
    s = socket.socket(socket.AF_UNIX)
    s.connect(spec["sock"])
    body = struct.pack(">I", 1) + xdr_string(name) + struct.pack(">I", 0)
    s.sendall(frame(1, 1, body))
    r = recv_frame(s)
    if r is None or r[24:28] != b"\0\0\0\0":
        raise RuntimeError("raw open of %s failed" % name)
    return s


class Counters:
    def __init__(self, role):
        self.c = {"role": role, "errors": []}

    def add(self, key, n=1):
        self.c[key] = self.c.get(key, 0) + n

    def error(self, what):
        self.c["errors"].append([time.time(), str(what)[:200]])

    def dump(self, path):
        with open(path, "a") as f:
            f.write(json.dumps(self.c) + "\n")


# ---- roles ---------------------------------------------------------------------------------

def role_caller(spec, c, until):
    conn = None
    while time.time() < until:
        try:
            if conn is None:
                conn = libvirt.open(uri(spec, "qemu:///system"))
            conn.getLibVersion()
            conn.listAllDomains()
            c.add("calls", 2)
        except libvirt.libvirtError as e:
            c.error(e)
            conn = None
            time.sleep(0.2)


def role_events(spec, c, until):
    libvirt.virEventRegisterDefaultImpl()
    threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)],
                     daemon=True).start()
    seen = []
    lock = threading.Condition()

    def cb(_conn, dom, event, _detail, _opaque):
        with lock:
            seen.append((dom.name(), event))
            lock.notify_all()

    conn = None
    while time.time() < until:
        try:
            if conn is None:
                conn = libvirt.open(uri(spec, "qemu:///system"))
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)
            name = unique("soakev")
            dom = conn.defineXML(qemu_domain_xml(name))
            dom.undefine()
            c.add("events_expected", 2)
            want = {(name, libvirt.VIR_DOMAIN_EVENT_DEFINED),
                    (name, libvirt.VIR_DOMAIN_EVENT_UNDEFINED)}
            end = time.time() + 10
            with lock:
                while not want <= set(seen) and time.time() < end:
                    lock.wait(0.5)
                got = want & set(seen)
                seen[:] = []
            c.add("events_received", len(got))
            if len(got) != 2:
                c.error("events missing for %s: got %d of 2" % (name, len(got)))
        except libvirt.libvirtError as e:
            c.error(e)
            conn = None
            time.sleep(0.2)


def role_stream(spec, c, until, index):
    size = 16 << 20
    pool_dir = os.path.join(spec["pool_dir"], "stream%d" % index)
    os.makedirs(pool_dir, exist_ok=True)
    conn = libvirt.open(uri(spec, "storage:///system"))
    name = unique("soakpool")
    rnd = random.Random(name)
    with transient_volume(conn, name, pool_dir, name + ".img", size) as (_pool, vol):
        while time.time() < until:
            try:
                # fails (raises) unless length and sha256 of the download match the upload
                upload_then_download(conn, vol, size, rnd.randbytes)
                c.add("streams_verified", 2)
                c.add("stream_bytes_verified", 2 * size)
            except (libvirt.libvirtError, Failure) as e:
                c.error(e)
                time.sleep(0.2)
    conn.close()


def role_fds(spec, c, until):
    conn = None
    dom = None
    while time.time() < until:
        try:
            if conn is None:
                conn = libvirt.open(uri(spec, "qemu:///system"))
                dom = conn.defineXML(qemu_domain_xml(unique("soakfd")))
            with tempfile.TemporaryFile() as f:
                dom.FDAssociate("soak", [f.fileno()], 0)
            c.add("fd_calls")
            time.sleep(0.05)
        except libvirt.libvirtError as e:
            c.error(e)
            conn = dom = None
            time.sleep(0.2)
    try:
        if dom is not None:
            dom.undefine()
    except libvirt.libvirtError:
        pass


def role_victim(spec, c, until):
    """A short-lived client killed at a random point by the orchestrator: its errors do not
    count (it is the one being killed)."""
    conn = libvirt.open(uri(spec, random.choice(["qemu:///system", "storage:///system"])))
    while time.time() < until:
        conn.getLibVersion()
        conn.listAllDomains() if random.random() < 0.5 else conn.listAllStoragePools()


def role_identity_flood(spec, c, until):
    while time.time() < until:
        try:
            s = raw_open(spec, "storage:///system")
            s.settimeout(1)
            unit = struct.pack(">7I", 28, REMOTE, 1, 419, 0, 9, 0) * 2048
            while time.time() < until:
                c.add("identity_bytes", s.send(unit))
        except (OSError, RuntimeError):
            c.add("identity_blocked")
            time.sleep(1)


def role_preopen_flood(spec, c, until):
    held = []
    while time.time() < until and len(held) < 20:
        s = socket.socket(socket.AF_UNIX)
        s.connect(spec["sock"])
        s.settimeout(1)
        try:
            while True:
                c.add("preopen_bytes", s.send(frame(66, 1) * 2048))
        except OSError:
            pass
        held.append(s)
    time.sleep(max(0, until - time.time()))


def role_log_flood(spec, c, until):
    while time.time() < until:
        try:
            s = socket.create_connection(("127.0.0.1", spec["tcp_port"]))
            calls = frame(70, 5) * 20000
            threading.Thread(target=lambda: s.sendall(calls), daemon=True).start()
            got = 0
            while got < 20000 and recv_frame(s) is not None:
                got += 1
            c.add("log_flood_replies", got)
            s.close()
        except OSError as e:
            c.error(e)
        time.sleep(5)


# Roles whose connections the proxy is meant to cut off.
ATTACKERS = ("identity_flood", "preopen_flood", "log_flood")


def run_role(name, spec, stats, until, index):
    c = Counters(name)
    try:
        {
            "caller": lambda: role_caller(spec, c, until),
            "events": lambda: role_events(spec, c, until),
            "stream": lambda: role_stream(spec, c, until, index),
            "fds": lambda: role_fds(spec, c, until),
            "victim": lambda: role_victim(spec, c, until),
            "identity_flood": lambda: role_identity_flood(spec, c, until),
            "preopen_flood": lambda: role_preopen_flood(spec, c, until),
            "log_flood": lambda: role_log_flood(spec, c, until),
        }[name]()
    except Exception as e:  # noqa: BLE001 - a role that dies reports why
        c.error("role died: %s: %s" % (type(e).__name__, e))
    c.dump(stats)
    sys.stdout.flush()
    os._exit(0)


# ---- the orchestrator ----------------------------------------------------------------------

def spawn(role, spec_path, stats, until, index=0):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "role", role, spec_path,
                             stats, str(until), str(index)], stdin=subprocess.DEVNULL)


def hold_idle(spec, n):
    socks = []
    for _ in range(n):
        socks.append(raw_open(spec, "storage:///system"))
    return socks


def main():
    spec_path = sys.argv[1]
    with open(spec_path) as f:
        spec = json.load(f)
    duration = float(spec["seconds"])
    stats = spec["report"] + ".roles"
    open(stats, "w").close()
    start = time.time()
    until = start + duration
    idle = hold_idle(spec, int(spec.get("idle", 2000)))
    procs = []
    for role, n in [("caller", 4), ("events", 2), ("stream", 2), ("fds", 1),
                    ("identity_flood", 2), ("preopen_flood", 1), ("log_flood", 1)]:
        for i in range(n):
            procs.append(spawn(role, spec_path, stats, until, i))
    stalled = subprocess.Popen([sys.executable, os.path.join(HERE, "..", "..", "tests", "py",
                                                             "stalled_reader.py"),
                                uri(spec, "storage:///system"),
                                os.path.join(spec["pool_dir"], "stalled"), "64",
                                str(duration)],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    restarts = []
    killed = 0
    next_restart = start + 60
    victims = []
    while time.time() < until:
        now = time.time()
        if now >= next_restart and now < until - 10:
            t0 = time.time()
            r = subprocess.run(["bash", spec["testbed_script"], "restart", spec["testbed_state"],
                                "virtqemud"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            restarts.append([t0, time.time(), r.returncode])
            next_restart += 60
        # churn: a client killed at a random point of its life
        if len(victims) < 4:
            victims.append((spawn("victim", spec_path, os.devnull, until), now +
                            random.uniform(0.05, 1.5)))
        for v, at in list(victims):
            if time.time() >= at:
                if v.poll() is None:
                    v.send_signal(signal.SIGKILL)
                    killed += 1
                v.wait()
                victims.remove((v, at))
        time.sleep(0.05)
    for v, _ in victims:
        v.kill()
        v.wait()
    for p in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
    stalled.stdin.close()
    stalled.wait(timeout=120)
    # every idle connection is still served
    idle_ok = 0
    for i, s in enumerate(idle):
        try:
            s.settimeout(10)
            s.sendall(frame(157, 100 + i))
            r = recv_frame(s)
            if r is not None and r[24:28] == b"\0\0\0\0":
                idle_ok += 1
        except OSError:
            pass
        s.close()

    roles = [json.loads(line) for line in open(stats) if line.strip()]
    total = {}
    explained, unexplained, attacked = 0, [], {}
    for r in roles:
        for k, v in r.items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
        qemu_bound = r["role"] in ("caller", "events", "fds")
        for t, what in r["errors"]:
            if r["role"] in ATTACKERS:
                # Being cut off is what the proxy does to them (the pre-open deadline, a
                # refused frame): counted, not judged.
                attacked[r["role"]] = attacked.get(r["role"], 0) + 1
            elif qemu_bound and any(t0 - 1 <= t <= t1 + 10 for t0, t1, _ in restarts):
                explained += 1
            else:
                unexplained.append([r["role"], round(t - start, 1), what])
    report = {
        "seconds": round(time.time() - start, 1),
        "virtqemud_restarts": len(restarts),
        "restart_failures": sum(1 for r in restarts if r[2] != 0),
        "clients_killed": killed,
        "idle_connections": len(idle),
        "idle_still_served": idle_ok,
        "roles": len(roles),
        "totals": total,
        "errors_explained_by_restart": explained,
        "attacker_errors": attacked,
        "errors_unexplained": unexplained,
    }
    with open(spec["report"], "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "role":
        name, spec_path, stats, until, index = sys.argv[2:7]
        with open(spec_path) as f:
            spec = json.load(f)
        run_role(name, spec, stats, float(until), int(index))
    else:
        main()
