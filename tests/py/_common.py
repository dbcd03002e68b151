"""Shared helpers for the client scripts in tests/py (run with Debian's /usr/bin/python3).

Every script: exit 0 only when its assertions hold; on failure print one line
"FAIL <script>: <reason>" to stderr (and stdout) and exit 1. A watchdog kills a
hung script (exit 3) so a broken proxy can never hang the Rust test.
"""
import contextlib
import faulthandler
import os
import sys
import time
import uuid

try:
    import libvirt
except ImportError:  # pyenv's python3 on PATH has no bindings
    sys.stderr.write("FAIL: python3-libvirt missing; run with /usr/bin/python3\n")
    sys.exit(2)

SCRIPT = os.path.basename(sys.argv[0])


class Failure(Exception):
    pass


def fail(reason):
    """Abort the check (main thread only): finally-blocks still clean up, run() reports."""
    raise Failure(reason)


def _report_fail(reason):
    msg = "FAIL %s: %s" % (SCRIPT, reason)
    print(msg, flush=True)
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
    os._exit(1)


def usage(text):
    sys.stderr.write("usage: %s %s\n" % (SCRIPT, text))
    sys.exit(2)


def setup(watchdog_s):
    """Silence libvirt's default stderr error printer and arm a hard watchdog."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    # dump_traceback_later runs in its own C thread, so it fires even while the main
    # thread is blocked inside a libvirt call.
    faulthandler.dump_traceback_later(watchdog_s, exit=True)


def unique(prefix):
    return "vpd-%s-%d-%s" % (prefix, os.getpid(), uuid.uuid4().hex[:8])


def qemu_domain_xml(name):
    """Minimal KVM-less qemu domain: no disks, no network, nothing to start."""
    return """<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>""" % name


def test_domain_xml(name):
    """Domain for the test driver (test:///default)."""
    return """<domain type='test'>
  <name>%s</name>
  <memory unit='MiB'>8</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>""" % name


def wait_for(deadline_s, pred, interval=0.02):
    end = time.monotonic() + deadline_s
    while True:
        if pred():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def run(main):
    """Run main(), turning any exception into a FAIL line."""
    try:
        main()
    except Failure as e:
        _report_fail(str(e))
    except libvirt.libvirtError as e:
        _report_fail("libvirt error: %s" % (e.get_error_message() or e))
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - report anything
        _report_fail("%s: %s" % (type(e).__name__, e))
    sys.stdout.flush()
    os._exit(0)   # do not wait for the event-loop thread


@contextlib.contextmanager
def transient_volume(conn, pool_name, pool_dir, vol_name, size):
    """A transient dir pool on pool_dir and a raw volume of size bytes in it, as (pool, vol);
    both are removed on the way out. A cleanup error fails a check that passed; after a
    failure it is only logged, so the first reason is the one reported."""
    pool = conn.storagePoolCreateXML(
        "<pool type='dir'><name>%s</name><target><path>%s</path></target></pool>"
        % (pool_name, pool_dir), 0)
    vol = None
    ok = False
    try:
        vol = pool.createXML(
            "<volume><name>%s</name><capacity unit='bytes'>%d</capacity>"
            "<allocation>0</allocation><target><format type='raw'/></target></volume>"
            % (vol_name, size), 0)
        yield pool, vol
        ok = True
    finally:
        steps = [("destroy pool", pool.destroy)]
        if vol is not None:
            steps.insert(0, ("delete volume", lambda: vol.delete(0)))
        failed = None
        for what, undo in steps:
            try:
                undo()
            except libvirt.libvirtError as e:
                sys.stderr.write("cleanup: %s %s: %s\n" % (what, pool_name, e))
                failed = failed or e
        if ok and failed is not None:
            raise failed


def upload_then_download(conn, vol, size, make, pause_s=0.0):
    """Uploads size bytes made by make(n) into vol (virStream sendAll), downloads them
    (recvAll; a reader that sleeps pause_s after every piece when asked) and fails unless
    length and sha256 match. Returns {"sha256", "up_s", "down_s", "pieces"}."""
    import hashlib
    up = {"left": size, "sha": hashlib.sha256()}

    def source(_stream, nbytes, st):
        n = min(nbytes, st["left"])
        if n <= 0:
            return b""
        data = make(n)
        st["left"] -= n
        st["sha"].update(data)
        return data

    t0 = time.monotonic()
    st = conn.newStream(0)
    vol.upload(st, 0, size, 0)
    st.sendAll(source, up)
    st.finish()
    t_up = time.monotonic() - t0
    if up["left"] != 0:
        fail("upload stopped with %d bytes unsent" % up["left"])

    down = {"n": 0, "pieces": 0, "sha": hashlib.sha256()}

    def sink(_stream, data, st):
        st["n"] += len(data)
        st["pieces"] += 1
        st["sha"].update(data)
        if pause_s:
            time.sleep(pause_s)
        return len(data)

    t1 = time.monotonic()
    st = conn.newStream(0)
    vol.download(st, 0, size, 0)
    st.recvAll(sink, down)
    st.finish()
    t_down = time.monotonic() - t1
    if down["n"] != size:
        fail("downloaded %d bytes, uploaded %d" % (down["n"], size))
    if down["sha"].hexdigest() != up["sha"].hexdigest():
        fail("sha256 mismatch: uploaded %s, downloaded %s"
             % (up["sha"].hexdigest(), down["sha"].hexdigest()))
    return {"sha256": up["sha"].hexdigest(), "up_s": t_up, "down_s": t_down,
            "pieces": down["pieces"]}
