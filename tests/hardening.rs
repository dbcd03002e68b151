//! Hardening against hostile clients, on both io backends, through the modular test bed's real
//! daemons: no client can make the proxy hold more than a fixed amount of memory on its
//! behalf, whatever it sends or refuses to read, while another client's calls keep working.

#[macro_use]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use support::modular::{daemons_exclusive, proxy, testbed};
use support::*;

/// The bound in `doc/administration.md` ("Hostile clients") on what one connection can make the
/// proxy hold, for every kind of connection this test attacks (pre-open, relayed UNIX, admin).
const BOUND_PER_CONN: usize = 512 * 1024;

/// What each flooding client tries to write before giving up; a proxy that keeps reading
/// (and answering) takes all of it.
const FLOOD: usize = 16 << 20;

const REMOTE_PROGRAM: u32 = 0x2000_8086;
const ADMIN_PROGRAM: u32 = 0x0690_0690;

fn rss_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn header(len: usize, prog: u32, proc_: i32, serial: u32) -> Vec<u8> {
    [len as u32, prog, 1, proc_ as u32, 0, serial, 0]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
}

fn xdr_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b.resize(b.len().div_ceil(4) * 4, 0);
    b
}

/// A raw client of `sock` that opened `uri` (auth "none" on the test proxy).
fn raw_open(sock: &Path, uri: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut body = vec![0, 0, 0, 1];
    body.extend(xdr_string(uri));
    body.extend([0, 0, 0, 0]);
    s.write_all(&frame(1, 0, 1, &body)).unwrap();
    let r = read_frame(&mut s).expect("open reply");
    assert_eq!(&r[24..28], &[0, 0, 0, 0], "open of {uri} failed");
    s
}

/// Writes `unit` again and again until `FLOOD` bytes are written or a write blocks for a
/// second (the proxy stopped reading). Returns the bytes written.
fn flood(mut s: UnixStream, unit: Vec<u8>) -> (UnixStream, usize) {
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let batch: Vec<u8> = unit
        .iter()
        .copied()
        .cycle()
        .take(unit.len() * (64 * 1024 / unit.len()).max(1))
        .collect();
    let mut written = 0;
    while written < FLOOD {
        match s.write(&batch) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n,
        }
    }
    (s, written)
}

/// Header-only CONNECT_SET_IDENTITY calls: each is answered by the proxy itself.
fn identity_unit() -> Vec<u8> {
    header(28, REMOTE_PROGRAM, 419, 9)
}

struct Stopped(u32);
impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// A client's calls keep working during the attack: `calls` rounds of getLibVersion +
/// listAllDomains through `uri`, each answered within `limit`.
fn victim_keeps_working(uri: &str, calls: usize, limit: Duration) {
    let script = format!(
        "import sys, time, libvirt\n\
         libvirt.registerErrorHandler(lambda *a: None, None)\n\
         c = libvirt.open({uri:?})\n\
         worst = 0.0\n\
         for i in range({calls}):\n\
         \x20   t = time.monotonic()\n\
         \x20   assert c.getLibVersion() > 0 and len(c.listAllDomains()) >= 0\n\
         \x20   worst = max(worst, time.monotonic() - t)\n\
         print('worst %.3f' % worst)\n"
    );
    let out = output_with_timeout(
        Command::new(PYTHON).args(["-c", &script]),
        Duration::from_secs(120),
    );
    assert_success(&out, "victim client");
    let worst: f64 = stdout(&out)
        .trim()
        .strip_prefix("worst ")
        .and_then(|w| w.parse().ok())
        .expect("worst latency line");
    assert!(
        worst < limit.as_secs_f64(),
        "a victim call took {worst:.3} s during the attack"
    );
}

fn memory_stays_bounded_under_attack(backend: &str) {
    let _excl = daemons_exclusive();
    let tb = testbed();
    let p = proxy("", &[("VIRTPROXYD_IO_BACKEND", backend)]);
    let qemu = p.uri("qemu:///system");
    victim_keeps_working(&qemu, 5, Duration::from_secs(5));
    let before = rss_bytes(p.pid());
    let mut conns = 0usize;
    let mut held: Vec<UnixStream> = Vec::new();

    // 1. Identity floods: CONNECT_SET_IDENTITY without reading the proxy's answers.
    let floods: Vec<_> = (0..8)
        .map(|_| {
            let s = raw_open(&p.rw_sock, "qemu:///system");
            thread::spawn(move || flood(s, identity_unit()))
        })
        .collect();
    conns += 8;

    // 2. Pre-open: AUTH_LIST calls without reading, and frames left half-sent.
    let preopen: Vec<_> = (0..8)
        .map(|_| {
            let s = UnixStream::connect(&p.rw_sock).unwrap();
            thread::spawn(move || flood(s, header(28, REMOTE_PROGRAM, 66, 1)))
        })
        .collect();
    conns += 8;
    for _ in 0..8 {
        let mut s = UnixStream::connect(&p.rw_sock).unwrap();
        let mut f = header(60_000, REMOTE_PROGRAM, 66, 1);
        f.resize(40_000, 7);
        s.write_all(&f).unwrap();
        held.push(s);
    }
    conns += 8;

    // 3. A daemon that stops reading while its clients write (virtnetworkd, stopped).
    let net: Vec<UnixStream> = (0..4)
        .map(|_| raw_open(&p.rw_sock, "network:///system"))
        .collect();
    let stopped = Stopped(tb.pid("virtnetworkd"));
    assert!(Command::new("kill")
        .args(["-STOP", &stopped.0.to_string()])
        .status()
        .unwrap()
        .success());
    let to_stopped: Vec<_> = net
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            thread::spawn(move || flood(s, header(28, REMOTE_PROGRAM, 157, i as u32 + 10)))
        })
        .collect();
    conns += 4;

    // 4. Clients that never read a volume download.
    let pools = pool_dir();
    let mut readers: Vec<Child> = (0..4)
        .map(|i| {
            let mut c = Command::new(PYTHON)
                .arg(py_script("stalled_reader.py"))
                .arg(p.uri("storage:///system"))
                .arg(pools.path().join(format!("p{i}")))
                .args(["256", "60"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(c.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(
                line.trim(),
                "stalled",
                "stalled_reader did not start its download"
            );
            c
        })
        .collect();
    conns += 4;

    // 5. The admin socket: calls without reading the replies.
    let admin_sock = p.dir().join("libvirt-admin-sock");
    let admins: Vec<_> = (0..4)
        .map(|_| {
            let mut s = UnixStream::connect(&admin_sock).expect("admin socket");
            let mut open = header(32, ADMIN_PROGRAM, 1, 1);
            open.extend([0, 0, 0, 0]);
            s.write_all(&open).unwrap();
            thread::spawn(move || flood(s, header(28, ADMIN_PROGRAM, 3, 2)))
        })
        .collect();
    conns += 4;

    let mut written = Vec::new();
    for t in floods
        .into_iter()
        .chain(preopen)
        .chain(to_stopped)
        .chain(admins)
    {
        let (s, n) = t.join().unwrap();
        written.push(n);
        held.push(s);
    }
    // The attack is at its height: every attacker is blocked or done.
    thread::sleep(Duration::from_millis(500));
    let during = rss_bytes(p.pid());
    victim_keeps_working(&qemu, 20, Duration::from_secs(2));
    let grew = during.saturating_sub(before);
    let bound = conns * BOUND_PER_CONN;
    eprintln!(
        "{backend}: RSS {} KiB before, {} KiB under attack by {conns} connections \
         (bound {} KiB); written per attacker: {written:?}",
        before / 1024,
        during / 1024,
        bound / 1024
    );
    assert!(
        grew <= bound,
        "{backend}: the proxy grew by {} KiB for {conns} hostile connections (bound {} KiB)",
        grew / 1024,
        bound / 1024
    );
    assert!(
        written.iter().all(|&n| n < FLOOD),
        "{backend}: some attacker wrote all {FLOOD} bytes: the proxy never pushed back \
         ({written:?})"
    );
    drop(stopped);
    for mut r in readers.drain(..) {
        drop(r.stdin.take());
        let _ = r.wait();
    }
    drop(held);
    // Nothing leaked and the proxy still serves.
    assert!(
        wait_for(Duration::from_secs(20), || open_fds(p.pid()) < 64),
        "{backend}: {} fds open after the attackers left",
        open_fds(p.pid())
    );
    victim_keeps_working(&qemu, 3, Duration::from_secs(5));
}

/// Connects to `sock` as user vpdtest (so the proxy counts it as anonymous under polkit),
/// prints "connected"; with "stall" sends nothing and prints the seconds until the proxy
/// closed it; with "authlist" sends AUTH_LIST and prints the seconds until its reply.
const LOCAL_CLIENT_PY: &str = r#"
import socket, struct, sys, time
path, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
t = time.monotonic()
print("connected", flush=True)
s.settimeout(60)
if mode == "authlist":
    s.sendall(struct.pack(">7I", 28, 0x20008086, 1, 66, 0, 1, 0))
data = s.recv(4)
print("%s %.3f" % ("reply" if data else "closed", time.monotonic() - t), flush=True)
"#;

fn local_client(sock: &Path, mode: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut c = Command::new("runuser")
        .args(["-u", "vpdtest", "--", PYTHON, "-c", LOCAL_CLIENT_PY])
        .arg(sock)
        .arg(mode)
        .stdout(Stdio::piped())
        .spawn()
        .expect("runuser");
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    (c, out)
}

fn last_line(mut c: Child, mut out: BufReader<std::process::ChildStdout>) -> (String, f64) {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let _ = c.wait();
    let (what, secs) = line.trim().split_once(' ').expect("outcome line");
    (what.to_string(), secs.parse().expect("seconds"))
}

/// Root opens through `sock` with libvirt's default polkit auth (AUTH_LIST, then the open):
/// returns the time it took, or None if the proxy did not answer within 5 s.
fn root_opens(sock: &Path) -> Option<Duration> {
    let t = std::time::Instant::now();
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame(66, 0, 1, &[])).ok()?;
    let r = read_frame(&mut s)?;
    assert_eq!(&r[24..28], &[0, 0, 0, 0], "AUTH_LIST failed");
    let mut body = vec![0, 0, 0, 1];
    body.extend(xdr_string("qemu:///system"));
    body.extend([0, 0, 0, 0]);
    s.write_all(&frame(1, 0, 2, &body)).ok()?;
    let r = read_frame(&mut s)?;
    assert_eq!(&r[24..28], &[0, 0, 0, 0], "root's open failed");
    Some(t.elapsed())
}

/// `max_anonymous_clients` local connections that never authenticate: libvirt (and this
/// proxy before) stops accepting on every socket, root's included, for as long as they stay.
/// Here root still opens at once, other users wait their turn as in libvirt, and the stalled
/// connections are closed at the pre-open deadline.
fn stalled_local_clients_lock_nobody_out(backend: &str) {
    let _shared = support::modular::daemons_shared();
    let deadline_ms = 3000;
    let p = proxy(
        &format!("{DEFAULT_AUTH}\nmax_anonymous_clients = 3\n"),
        &[
            ("VIRTPROXYD_IO_BACKEND", backend),
            ("VIRTPROXYD_PREOPEN_TIMEOUT_MS", &deadline_ms.to_string()),
        ],
    );
    let stalled: Vec<_> = (0..3).map(|_| local_client(&p.ro_sock, "stall")).collect();
    // The limit is reached: another user's client waits for a slot.
    thread::sleep(Duration::from_millis(300));
    let waiting = local_client(&p.ro_sock, "authlist");
    for sock in [&p.rw_sock, &p.ro_sock] {
        let took = root_opens(sock);
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(2)),
            "{backend}: root could not open through {} with 3 stalled clients: {took:?}\n{}",
            sock.display(),
            p.log_text()
        );
    }
    let deadline = deadline_ms as f64 / 1000.0;
    for (c, out) in stalled {
        let (what, secs) = last_line(c, out);
        assert_eq!(what, "closed", "{backend}: a stalled client was answered");
        assert!(
            secs >= deadline - 0.2 && secs < deadline + 3.0,
            "{backend}: a stalled client was closed after {secs} s (deadline {deadline} s)"
        );
    }
    // The waiting client got in once the stalled ones were gone, not before.
    let (what, secs) = last_line(waiting.0, waiting.1);
    assert_eq!(
        what, "reply",
        "{backend}: the waiting client was not served"
    );
    assert!(
        secs >= deadline - 0.7 && secs < deadline + 3.0,
        "{backend}: the waiting client got its reply after {secs} s"
    );
}

/// A TCP peer that sends a refused AUTH_POLKIT at line rate: libvirt logs one error line per
/// call. Here its lines stop at `CLIENT_LOG_LINES` (the last says so), its close line counts
/// the rest, past its source's burst (1,024 frames) it is answered at 256 calls a second, and
/// a relayed client's calls keep working meanwhile.
fn log_flood_is_bounded(backend: &str) {
    let _shared = support::modular::daemons_shared();
    let (p, port) = tcp_proxy(backend);
    // Past 1,024 pre-open frames a source gets 256 answers a second: 1,500 calls take > 1.8 s.
    let calls = 1500usize;
    let t = std::time::Instant::now();
    let mut peer = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut reader = peer.try_clone().unwrap();
    let drain = thread::spawn(move || {
        let mut replies = 0;
        while replies < calls && read_frame(&mut reader).is_some() {
            replies += 1;
        }
        replies
    });
    let flood: Vec<u8> = (0..calls as u32)
        .flat_map(|serial| frame(70, 0, serial, &[]))
        .collect();
    peer.write_all(&flood).unwrap();
    victim_keeps_working(&p.uri("qemu:///system"), 10, Duration::from_secs(2));
    assert_eq!(
        drain.join().unwrap(),
        calls,
        "{backend}: every call is answered"
    );
    assert!(
        t.elapsed() >= Duration::from_millis((1500 - 1024) * 1000 / 256 * 9 / 10),
        "{backend}: {calls} refused pre-open calls answered in {:?}: not throttled",
        t.elapsed()
    );
    drop(peer);
    assert!(
        wait_for(Duration::from_secs(10), || p
            .log_text()
            .contains("log lines about it were suppressed")),
        "{backend}: no close line with the suppressed count"
    );
    let log = p.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("invalid PolicyKit init request"))
        .count();
    assert_eq!(
        lines, 5,
        "{backend}: {lines} log lines for {calls} refused calls"
    );
    assert!(log.contains("further such lines about this client are suppressed"));
    assert!(log.contains(&format!("({} log lines about it", calls - 5)));
}

/// A peer that reconnects for every few refused calls: the per-connection budget alone would
/// log 5 lines per connection; the process-wide limit keeps it to 50 lines a second, and says
/// how many it suppressed.
fn reconnecting_log_flood_is_bounded(backend: &str) {
    let _shared = support::modular::daemons_shared();
    let (p, port) = tcp_proxy(backend);
    let refused = |calls: u32| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let f: Vec<u8> = (0..calls).flat_map(|i| frame(70, 0, i, &[])).collect();
        s.write_all(&f).unwrap();
        for _ in 0..calls {
            assert!(
                read_frame(&mut s).is_some(),
                "{backend}: a refused call unanswered"
            );
        }
    };
    let t = std::time::Instant::now();
    for _ in 0..100 {
        refused(10);
    }
    let secs = t.elapsed().as_secs() + 1;
    // A call in a later second reports what was suppressed before it.
    thread::sleep(Duration::from_millis(1100));
    refused(1);
    assert!(
        wait_for(Duration::from_secs(5), || p
            .log_text()
            .contains("log lines about misbehaving clients were suppressed")),
        "{backend}: no line says what was suppressed"
    );
    let lines = p
        .log_text()
        .lines()
        .filter(|l| l.contains("invalid PolicyKit init request"))
        .count();
    assert!(
        lines as u64 <= 50 * (secs + 1) + 1,
        "{backend}: {lines} lines for 100 connections in {secs} s"
    );
}

/// A TCP peer that floods refused calls on 8 connections at once, each reconnecting after 64
/// calls, for 3 s: all its connections share its source's pre-open rate (a burst of 1,024
/// frames, then 256 a second), so that is what it gets answered, however it spreads them.
/// Before, each connection brought 256 free frames: ~120,000 answers a second.
fn a_source_gets_its_rate_however_many_connections(backend: &str) {
    let _shared = support::modular::daemons_shared();
    let (p, port) = tcp_proxy(backend);
    const PER_CONN: u32 = 64;
    const FLOODERS: usize = 8;
    let window = Duration::from_secs(3);
    let t = std::time::Instant::now();
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            thread::spawn(move || {
                let batch: Vec<u8> = (0..PER_CONN).flat_map(|i| frame(70, 0, i, &[])).collect();
                let (mut answered, mut connections) = (0u64, 0u64);
                while t.elapsed() < window {
                    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.write_all(&batch).unwrap();
                    connections += 1;
                    for _ in 0..PER_CONN {
                        if t.elapsed() >= window {
                            break;
                        }
                        assert!(read_frame(&mut s).is_some(), "a refused call unanswered");
                        answered += 1;
                    }
                }
                (answered, connections)
            })
        })
        .collect();
    let (mut answered, mut connections) = (0, 0);
    for f in flooders {
        let (a, c) = f.join().unwrap();
        answered += a;
        connections += c;
    }
    let secs = t.elapsed().as_secs_f64();
    // The burst, the rate over the window, and a frame in flight per connection.
    let bound = 1024.0 + 256.0 * secs + FLOODERS as f64;
    eprintln!(
        "{backend}: {answered} refused calls answered on {connections} connections in {secs:.1} s"
    );
    assert!(
        (answered as f64) <= bound,
        "{backend}: {answered} refused calls answered on {connections} connections in {secs:.1} s (bound {bound:.0})"
    );
    assert!(
        answered >= 1024,
        "{backend}: only {answered} refused calls answered: the burst is not served at full speed"
    );
    // Another source (a local client here) is not slowed by it.
    victim_keeps_working(&p.uri("qemu:///system"), 10, Duration::from_secs(2));
}

/// A log output that stops taking lines (a FIFO whose reader never reads, as a stuck journald
/// or syslog would) costs lines, never the relay: 300 connections, each logging three info
/// lines, go through while the FIFO is full. Before, the first write to the full FIFO blocked
/// a relay worker and every client on it.
fn a_stuck_log_output_does_not_stall_clients(backend: &str) {
    let _shared = support::modular::daemons_shared();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("log.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // Held open and never read: the proxy's writes fill it and then block.
    use std::os::unix::fs::OpenOptionsExt;
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let p = proxy(
        &format!("log_outputs = \"1:file:{}\"\n", fifo.display()),
        &[("VIRTPROXYD_IO_BACKEND", backend)],
    );
    let script = format!(
        "import libvirt\n\
         libvirt.registerErrorHandler(lambda *a: None, None)\n\
         for i in range(300):\n\
         \x20   c = libvirt.open({:?})\n\
         \x20   assert c.getLibVersion() > 0\n\
         \x20   c.close()\n\
         print('done')\n",
        p.uri("qemu:///system")
    );
    let out = output_with_timeout(
        Command::new(PYTHON).args(["-c", &script]),
        Duration::from_secs(120),
    );
    assert_success(
        &out,
        &format!("{backend}: 300 opens with a stuck log output"),
    );
}

/// A proxy with a TCP listener (auth "none") on a free port, besides its UNIX sockets.
fn tcp_proxy(backend: &str) -> (support::Proxy, u16) {
    let port = free_port();
    let conf = format!(
        "listen_tcp = 1\nlisten_addr = \"127.0.0.1\"\ntcp_port = \"{port}\"\nauth_tcp = \"none\"\n"
    );
    (proxy(&conf, &[("VIRTPROXYD_IO_BACKEND", backend)]), port)
}

on_both_backends!(
    a_source_gets_its_rate_however_many_connections,
    memory_stays_bounded_under_attack,
    stalled_local_clients_lock_nobody_out,
    log_flood_is_bounded,
    reconnecting_log_flood_is_bounded,
    a_stuck_log_output_does_not_stall_clients,
    parked_clients_are_bounded,
);

/// Local clients waiting for an anonymous slot are held by the acceptor, at most 1000 of
/// them (then the local listeners pause and the kernel's backlog takes the rest, as with
/// libvirt): 1,300 silent connections of one user cost the proxy at most 1000 fds more than
/// the one that holds the only slot.
fn parked_clients_are_bounded(backend: &str) {
    let _shared = support::modular::daemons_shared();
    let p = proxy(
        &format!("{DEFAULT_AUTH}\nmax_anonymous_clients = 1\nmax_queued_clients = 1000\n"),
        &[("VIRTPROXYD_IO_BACKEND", backend)],
    );
    let holder = local_client(&p.ro_sock, "stall");
    thread::sleep(Duration::from_millis(300));
    let before = open_fds(p.pid());
    let script = r#"
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(1300):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(sys.argv[1])
    except OSError:
        break
    held.append(s)
print(len(held), flush=True)
sys.stdin.readline()
"#;
    let mut c = Command::new("runuser")
        .args(["-u", "vpdtest", "--", PYTHON, "-c", script])
        .arg(&p.ro_sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let connected: usize = line.trim().parse().expect("connection count");
    assert!(connected > 1000, "{backend}: only {connected} connected");
    thread::sleep(Duration::from_millis(500));
    let during = open_fds(p.pid());
    assert!(
        during <= before + 1000,
        "{backend}: {during} fds with {connected} waiting clients ({before} before)"
    );
    assert!(
        during >= before + 900,
        "{backend}: the waiting clients were not accepted ({during} fds, {before} before)"
    );
    drop(c.stdin.take());
    let _ = c.wait();
    // The holder sees its connection end with the proxy.
    drop(p);
    let (what, _) = last_line(holder.0, holder.1);
    assert_eq!(what, "closed", "{backend}");
}
