//! One user's polkit check that never ends must not delay anyone else's AUTH_POLKIT.
//!
//! A stand-in polkitd on a private D-Bus daemon (the proxy finds it through
//! `DBUS_SYSTEM_BUS_ADDRESS`) never answers CheckAuthorization for one uid, as polkitd does
//! while that user's registered agent sits on the question, and answers "authorized" at once
//! for every other uid. Clients are raw protocol clients in processes of their own uid (the
//! proxy takes the uid from SO_PEERCRED). Needs no libvirt and no real polkitd.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use support::*;

/// The uid whose checks polkitd never answers, and one whose checks it allows.
const SLOW_UID: u32 = 64101;
const FAST_UID: u32 = 64102;
/// More stuck checks than the proxy ever had polkit threads (4).
const STUCK: usize = 8;

/// AUTH_LIST, then AUTH_POLKIT; prints "listed" after the first reply, then the AUTH_POLKIT
/// reply's status and `complete` and how long it took.
const CLIENT_PY: &str = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def recvn(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("closed")
        b += c
    return b
def call(proc_, serial):
    s.sendall(struct.pack(">7I", 28, 0x20008086, 1, proc_, 0, serial, 0))
    n = struct.unpack(">I", recvn(4))[0]
    return recvn(n - 4)
call(66, 1)
print("listed", flush=True)
t = time.monotonic()
r = call(70, 2)
ms = (time.monotonic() - t) * 1000
status = struct.unpack(">I", r[20:24])[0]
body = struct.unpack(">i", r[24:28])[0] if status == 0 and len(r) >= 28 else -1
print("polkit %d %d %.1f" % (status, body, ms), flush=True)
"#;

/// A private bus daemon, killed on drop.
struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        let mut child = Command::new("dbus-daemon")
            .arg("--session")
            .arg("--nofork")
            .arg("--print-address=1")
            .arg(format!("--address=unix:path={}", dir.join("bus").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dbus-daemon (package dbus-daemon)");
        let mut line = String::new();
        let out = child.stdout.take().expect("dbus-daemon stdout");
        BufReader::new(out)
            .read_line(&mut line)
            .expect("dbus-daemon address");
        Bus {
            child,
            address: line.trim().to_string(),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Subject = (String, HashMap<String, zbus::zvariant::OwnedValue>);
type CheckArgs = (Subject, String, HashMap<String, String>, u32, String);

/// Owns org.freedesktop.PolicyKit1 on `address` and serves CheckAuthorization from a thread;
/// counts the checks it leaves unanswered.
fn stand_in_polkitd(address: &str) -> Arc<AtomicUsize> {
    let conn = zbus::blocking::connection::Builder::address(address)
        .and_then(|b| b.name("org.freedesktop.PolicyKit1"))
        .and_then(|b| b.build())
        .expect("stand-in polkitd on the private bus");
    let stuck = Arc::new(AtomicUsize::new(0));
    let counter = stuck.clone();
    std::thread::spawn(move || {
        // Unanswered calls are kept, as polkitd keeps them while an agent is asked.
        let mut held = Vec::new();
        for msg in zbus::blocking::MessageIterator::from(&conn) {
            let Ok(msg) = msg else { break };
            let header = msg.header();
            if header.message_type() != zbus::message::Type::MethodCall
                || header.member().map(|m| m.as_str()) != Some("CheckAuthorization")
            {
                continue;
            }
            let Ok(((_, fields), _, _, _, _)) = msg.body().deserialize::<CheckArgs>() else {
                continue;
            };
            let uid = match fields.get("uid").map(|v| &**v) {
                Some(zbus::zvariant::Value::I32(u)) => *u as u32,
                _ => continue,
            };
            if uid == SLOW_UID {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(msg);
                continue;
            }
            let details: HashMap<String, String> = HashMap::new();
            let _ = conn.reply(&header, &((true, false, details),));
        }
    });
    stuck
}

fn client(uid: u32, sock: &Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(PYTHON)
        .arg("-c")
        .arg(CLIENT_PY)
        .arg(sock)
        .current_dir("/")
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn client");
    let out = child.stdout.take().expect("client stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

struct Reaped(Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn checks_that_never_end_for_one_user_do_not_delay_another_users_auth_polkit() {
    let dir = tempfile::Builder::new()
        .prefix("vpd-pkslow-")
        .tempdir()
        .expect("temp dir");
    let bus = Bus::start(dir.path());
    let stuck = stand_in_polkitd(&bus.address);
    let p = Proxy::start_with(
        &format!("{DEFAULT_AUTH}\n"),
        &[
            ("DBUS_SYSTEM_BUS_ADDRESS", bus.address.as_str()),
            ("VIRTPROXYD_IO_BACKEND", "epoll"),
        ],
    );
    let mut children = Reaped(Vec::new());
    let mut slow = Vec::new();
    for _ in 0..STUCK {
        let (c, rx) = client(SLOW_UID, &p.rw_sock);
        children.0.push(c);
        slow.push(rx);
    }
    for rx in &slow {
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(20)).as_deref(),
            Ok("listed"),
            "a slow-uid client got no AUTH_LIST reply; log:\n{}",
            p.log_text()
        );
    }
    // Their AUTH_POLKIT calls are on the way; with a thread per check only four reach polkitd.
    wait_for(Duration::from_secs(3), || {
        stuck.load(Ordering::SeqCst) >= STUCK
    });
    let reached = stuck.load(Ordering::SeqCst);

    let (c, rx) = client(FAST_UID, &p.rw_sock);
    children.0.push(c);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).as_deref(),
        Ok("listed")
    );
    let t = Instant::now();
    let line = rx.recv_timeout(Duration::from_secs(5));
    let waited = t.elapsed();
    eprintln!("{reached} stuck checks at polkitd; the other user's AUTH_POLKIT: {line:?} after {waited:?}");
    let line = line.unwrap_or_else(|_| {
        panic!(
            "no AUTH_POLKIT answer for uid {FAST_UID} in {waited:?} behind {STUCK} stuck checks; log:\n{}",
            p.log_text()
        )
    });
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.get(..3), Some(&["polkit", "0", "1"][..]), "{line}");
    let ms: f64 = fields
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX);
    assert!(ms < 100.0, "AUTH_POLKIT took {ms} ms");
    assert_eq!(reached, STUCK, "every stuck check is in flight at once");
    // The stuck clients are still waiting, not failed.
    for rx in &slow {
        assert!(matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)));
    }
    drop(bus);
}
