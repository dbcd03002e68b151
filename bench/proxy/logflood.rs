//! The log-flood row (`VPD_BENCH_ONLY=logflood`, also part of a full run): a busy client's
//! call latency through the proxy while a TCP peer sends refused AUTH_POLKIT calls as fast as
//! it can (each one an error line in libvirt's log), against the same client with no flood,
//! interleaved. Reports the p99 ratio (goal <= 1.2x), the calls the flood got answered and how
//! much the proxy's log grew per flood (bounded: 5 lines per connection).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::env::{self, Client, Proxy, Testbed};
use crate::report::{med, median};

/// REMOTE_PROC_AUTH_POLKIT, header only: refused on a TCP listener with auth "none".
fn auth_polkit(serial: u32) -> [u8; 28] {
    let mut f = [0u8; 28];
    for (i, w) in [28u32, 0x2000_8086, 1, 70, 0, serial, 0].iter().enumerate() {
        f[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
    }
    f
}

/// Floods `port` until `stop`; returns the calls answered. Past its free pre-open frames a
/// connection is answered 100 times a second, so the fastest flood was this: 256 refused calls
/// on a connection, their replies read, a new connection (since free frames are drawn from
/// the source's budget, not given per connection, it gets the budget and then 100 a second).
fn flood(port: u16, stop: Arc<AtomicBool>) -> u64 {
    const PER_CONN: u32 = 256;
    let batch: Vec<u8> = (0..PER_CONN).flat_map(auth_polkit).collect();
    let answered = AtomicU64::new(0);
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        if s.write_all(&batch).is_err() {
            continue;
        }
        // Every reply to a refused AUTH_POLKIT has the same length: count frames by bytes.
        let mut bytes = 0usize;
        let mut first_len = 0usize;
        while first_len == 0 || bytes < first_len * PER_CONN as usize {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if first_len == 0 && n >= 4 {
                        first_len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    }
                    bytes += n;
                }
            }
        }
        answered.fetch_add((bytes / first_len.max(1)) as u64, Ordering::Relaxed);
    }
    answered.load(Ordering::Relaxed)
}

pub fn run(tb: &Testbed, client: &Client, reps: usize, busy_secs: f64) -> Value {
    let (proxy, port) = Proxy::start_testbed_tcp(tb, "io_uring");
    // Control: the same flood against another proxy process. What it does to the busy client
    // is the machine's share (the flooder's own CPU, the kernel, 2 vCPUs), not the proxy's.
    let (_other, other_port) = Proxy::start_testbed_tcp(tb, "io_uring");
    let uri = env::unix_uri("qemu:///system", &proxy.rw_sock);
    let busy = || {
        client.json(
            &["calls", &uri, "libversion", "1", &busy_secs.to_string()],
            Duration::from_secs(120),
        )
    };
    let log_len = || std::fs::metadata(&proxy.log).map_or(0, |m| m.len());
    eprintln!("log flood: {reps} reps x {busy_secs:.1} s, with and without a flooding TCP peer");
    let (mut quiet, mut flooded, mut elsewhere) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratios, mut control_ratios, mut vs_control, mut log_growth, mut reply_bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let (mut q, mut f, mut c) = (Value::Null, Value::Null, Value::Null);
        for target in crate::rotated(&[None, Some(port), Some(other_port)], rep) {
            let Some(target) = target else {
                q = busy();
                continue;
            };
            let before = log_len();
            let stop = Arc::new(AtomicBool::new(false));
            let flooder = {
                let stop = stop.clone();
                thread::spawn(move || flood(target, stop))
            };
            // Let the flood reach full speed first.
            thread::sleep(Duration::from_millis(200));
            let r = busy();
            stop.store(true, Ordering::Relaxed);
            let answered = flooder.join().unwrap_or(0);
            thread::sleep(Duration::from_millis(200));
            if target == port {
                f = r;
                reply_bytes.push(answered);
                log_growth.push(log_len().saturating_sub(before));
            } else {
                c = r;
            }
        }
        if let Some(a) = q["p99_us"].as_f64() {
            if let Some(b) = f["p99_us"].as_f64() {
                ratios.push(b / a);
            }
            if let Some(b) = c["p99_us"].as_f64() {
                control_ratios.push(b / a);
            }
        }
        if let (Some(a), Some(b)) = (c["p99_us"].as_f64(), f["p99_us"].as_f64()) {
            vs_control.push(b / a);
        }
        quiet.push(q);
        flooded.push(f);
        elsewhere.push(c);
    }
    let p99 = |runs: &[Value]| med(runs, "p99_us");
    let (ratio, control) = (median(&ratios), median(&control_ratios));
    let flood_vs_control = median(&vs_control);
    eprintln!(
        "log flood: busy client p99 {:.0} us quiet, {:.0} us flooded (ratio {ratio:.2}, goal <= 1.2), \
         {:.0} us with the same flood at another proxy (ratio {control:.2}; flooded/that \
         {flood_vs_control:.2}); \
         log grew {log_growth:?} bytes per flood, calls answered {reply_bytes:?}",
        p99(&quiet),
        p99(&flooded),
        p99(&elsewhere)
    );
    json!({
        "p99_ratio": ratio,
        "ratios": ratios,
        "elsewhere_p99_ratio": control,
        "elsewhere_ratios": control_ratios,
        "flooded_vs_elsewhere_p99_ratio": flood_vs_control,
        "flooded_vs_elsewhere_ratios": vs_control,
        "quiet": quiet,
        "flooded": flooded,
        "elsewhere": elsewhere,
        "log_growth_bytes": log_growth,
        "flood_calls_answered": reply_bytes,
    })
}
