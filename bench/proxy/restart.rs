//! The restart rows (`VPD_BENCH_ONLY=restart`, also part of a full run): what a busy client
//! sees across `SIGUSR2` (the proxy re-executes itself and carries every connection, see
//! `handover`) with 0, 1,000 and 9,000 idle connections open through it: the latency of the
//! call that spans the restart (p50/p99 over repetitions; goal p99 <= 100 ms at 9,000), the
//! old process's quiesce time, and how long a new client waits for its open from the signal
//! on. Every idle connection must still work afterwards. Private libvirtd (test driver) with
//! raised client limits, as the scale rows.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::env::{self, Client, IdleGroup, Proxy};
use crate::report::median;

fn frame(proc_: u32, serial: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(28 + body.len());
    for v in [
        (28 + body.len()) as u32,
        0x2000_8086,
        1,
        proc_,
        0,
        serial,
        0,
    ] {
        f.extend(v.to_be_bytes());
    }
    f.extend(body);
    f
}

/// Sends one call and reads its reply (header and body); true when it succeeded.
fn call(s: &mut UnixStream, proc_: u32, serial: u32, body: &[u8]) -> bool {
    if s.write_all(&frame(proc_, serial, body)).is_err() {
        return false;
    }
    let mut hdr = [0u8; 28];
    if s.read_exact(&mut hdr).is_err() {
        return false;
    }
    let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    let mut rest = vec![0u8; len.saturating_sub(28)];
    s.read_exact(&mut rest).is_ok() && hdr[24..28] == [0, 0, 0, 0]
}

/// A raw client of `sock` that opened test:///default.
fn opened(sock: &std::path::Path) -> Option<UnixStream> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let uri = b"test:///default";
    let mut body = vec![0, 0, 0, 1];
    body.extend((uri.len() as u32).to_be_bytes());
    body.extend(uri);
    body.resize(body.len().div_ceil(4) * 4, 0);
    body.extend([0, 0, 0, 0]);
    call(&mut s, 1, 1, &body).then_some(s)
}

/// CONNECT_OPEN on a fresh connection; the time to its reply.
fn open_latency(sock: &std::path::Path) -> Option<Duration> {
    let t = Instant::now();
    opened(sock).map(|_| t.elapsed())
}

/// Back-to-back CONNECT_GET_LIB_VERSION calls on one connection until `stop`: each call's
/// start and duration.
fn busy_calls(
    mut s: UnixStream,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(Instant, Duration)> {
    let mut out = Vec::new();
    let mut serial = 2;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        if !call(&mut s, 157, serial, &[]) {
            panic!("restart bench: a busy call failed across the restart");
        }
        out.push((t, t.elapsed()));
        serial += 1;
    }
    out
}

/// The quiesce time the old process logged last.
fn quiesce_ms(log: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let l = text
        .lines()
        .rev()
        .find(|l| l.contains("connections ready to hand over"))?;
    let at = l.find("quiesce_ms=")? + "quiesce_ms=".len();
    l[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn handovers(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("taking over from the previous process")
        .count()
}

pub fn run(client: &Client, idle_counts: &[usize], reps: usize) -> Value {
    let daemon = env::Daemon::start_tagged(
        "restart",
        "max_clients = 20000\nmax_anonymous_clients = 20000\nmax_queued_clients = 1000\n\
         keepalive_interval = -1",
    );
    let mut rows = Vec::new();
    for backend in ["io_uring", "epoll"] {
        // Info lines: the hand-over and its quiesce time are read from the log.
        let mut proxy = Proxy::start_conf(&daemon, backend, "log_level = 2");
        let uri = env::unix_uri("test:///default", &proxy.rw_sock);
        let pid = proxy.pid();
        for &n in std::iter::once(&0).chain(idle_counts) {
            let g = IdleGroup::open(client, &uri, n, 2500);
            let (mut spans, mut quiesce, mut opens) = (Vec::new(), Vec::new(), Vec::new());
            let mut busy_runs = Vec::new();
            for _ in 0..reps {
                let before = handovers(&proxy.log);
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let conn = opened(&proxy.rw_sock).expect("restart bench: busy client open");
                let busy = {
                    let stop = stop.clone();
                    thread::spawn(move || busy_calls(conn, stop))
                };
                thread::sleep(Duration::from_millis(500));
                let signalled = Instant::now();
                let _ = std::process::Command::new("kill")
                    .args(["-USR2", &pid.to_string()])
                    .status();
                let open = open_latency(&proxy.rw_sock);
                thread::sleep(Duration::from_millis(500));
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let calls = busy.join().unwrap_or_default();
                // The longest call that ended after the signal: the one the hand-over held up
                // (the old process asks the new binary first, relaying meanwhile, so the
                // call in flight at the signal is seldom the one).
                let span = calls
                    .iter()
                    .filter(|(t, d)| *t + *d >= signalled)
                    .map(|(_, d)| d.as_secs_f64() * 1000.0)
                    .fold(f64::NAN, f64::max);
                let usual: Vec<f64> = calls
                    .iter()
                    .filter(|(t, _)| *t < signalled)
                    .map(|(_, d)| d.as_secs_f64() * 1000.0)
                    .collect();
                let took_over =
                    env::wait_for(Duration::from_secs(30), || handovers(&proxy.log) > before);
                assert!(
                    took_over,
                    "restart bench: no hand-over\n{}",
                    proxy.log_tail()
                );
                assert!(
                    proxy.running(),
                    "restart bench: the proxy died\n{}",
                    proxy.log_tail()
                );
                spans.push(span);
                busy_runs.push(json!({"calls": calls.len(), "p50_ms_before": median(&usual)}));
                quiesce.push(quiesce_ms(&proxy.log).unwrap_or(f64::NAN));
                opens.push(open.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0));
            }
            if n > 0 {
                let log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
                for l in log
                    .lines()
                    .filter(|l| {
                        // The pause's timeline: each line says how long after the quiesce began.
                        l.contains("quiesce")
                    })
                    .rev()
                    .take(6)
                {
                    eprintln!("restart: {l}");
                }
            }
            let alive = g.close();
            let mut sorted = spans.clone();
            sorted.sort_by(f64::total_cmp);
            let p99 = sorted.last().copied().unwrap_or(f64::NAN);
            eprintln!(
                "restart: {backend}, {n} idle: spanning call {:.1} ms median, {p99:.1} ms max \
                 over {reps}; quiesce {:.0} ms; a new client's open {:.1} ms; {alive}/{n} idle \
                 alive after {reps} restarts",
                median(&spans),
                median(&quiesce),
                median(&opens)
            );
            rows.push(json!({
                "backend": backend,
                "idle": n,
                "spanning_call_ms": spans,
                "spanning_call_p50_ms": median(&spans),
                "spanning_call_p99_ms": p99,
                "quiesce_ms": quiesce,
                "new_open_ms": opens,
                "idle_alive_after": alive,
                "busy": busy_runs,
            }));
        }
    }
    Value::Array(rows)
}
