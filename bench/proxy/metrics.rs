//! The metrics rows (`VPD_BENCH_ONLY=metrics`, also part of a full run): what counting costs
//! the relay, and what a scrape costs. Two proxies in front of the modular test bed, one
//! with `metrics_listen` and one without, interleaved: call rate and relay CPU per call at 1
//! and 8 clients (goal: within 3 %); then, with 9,000 idle connections through the one with
//! metrics (private libvirtd, as the scale rows), the time and size of a scrape.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::env::{self, Client, IdleGroup, Proxy, Testbed};
use crate::report::median;

/// One `GET /metrics` (the text format); its time and size.
fn scrape(port: u16) -> Option<(Duration, usize)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: text/plain\r\n\r\n")
        .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&body);
    text.starts_with("HTTP/1.1 200").then(|| {
        (
            took,
            text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len()),
        )
    })
}

fn series(port: u16) -> usize {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: text/plain\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("HTTP") && l.contains(' '))
        .count()
}

pub fn run(tb: &Testbed, client: &Client, reps: usize, secs: f64, idle: usize) -> Value {
    let port = env::free_port();
    let on = Proxy::start_testbed_conf(
        tb,
        "io_uring",
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
    );
    let off = Proxy::start_testbed(tb, "io_uring");
    let mut rows = Vec::new();
    for clients in [1usize, 8] {
        let (mut rate_ratio, mut cpu_ratio) = (Vec::new(), Vec::new());
        let mut raw = Vec::new();
        for rep in 0..reps {
            let mut got = [Value::Null, Value::Null];
            for which in crate::rotated(&[0usize, 1], rep) {
                let p = if which == 0 { &on } else { &off };
                let uri = env::unix_uri("qemu:///system", &p.rw_sock);
                let c0 = env::cpu_sched(p.pid());
                let mut v = client.json(
                    &[
                        "calls",
                        &uri,
                        "libversion",
                        &clients.to_string(),
                        &secs.to_string(),
                    ],
                    Duration::from_secs(120),
                );
                let n = v["calls"].as_f64().unwrap_or(f64::NAN);
                v["proxy_cpu_us_per_call"] = json!((env::cpu_sched(p.pid()) - c0) / n * 1e6);
                got[which] = v;
            }
            let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            rate_ratio.push(f(&got[0], "rate") / f(&got[1], "rate"));
            cpu_ratio
                .push(f(&got[0], "proxy_cpu_us_per_call") / f(&got[1], "proxy_cpu_us_per_call"));
            raw.push(json!({"on": got[0], "off": got[1]}));
        }
        eprintln!(
            "metrics: {clients} client(s): call rate with metrics {:.3}x without, proxy CPU per \
             call {:.3}x (goal within 3 %)",
            median(&rate_ratio),
            median(&cpu_ratio)
        );
        rows.push(json!({
            "clients": clients,
            "rate_ratio": median(&rate_ratio),
            "cpu_per_call_ratio": median(&cpu_ratio),
            "rate_ratios": rate_ratio,
            "cpu_ratios": cpu_ratio,
            "raw": raw,
        }));
    }
    drop((on, off));

    // A scrape with `idle` clients connected.
    let daemon = env::Daemon::start_tagged(
        "metrics",
        "max_clients = 20000\nmax_anonymous_clients = 20000\nmax_queued_clients = 1000\n\
         keepalive_interval = -1",
    );
    let port = env::free_port();
    let p = Proxy::start_conf(
        &daemon,
        "io_uring",
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
    );
    let uri = env::unix_uri("test:///default", &p.rw_sock);
    let before = series(port);
    let g = IdleGroup::open(client, &uri, idle, 2500);
    let scrapes: Vec<(Duration, usize)> = (0..5).filter_map(|_| scrape(port)).collect();
    let after = series(port);
    let alive = g.close();
    let ms: Vec<f64> = scrapes
        .iter()
        .map(|(d, _)| d.as_secs_f64() * 1000.0)
        .collect();
    let size = scrapes.last().map_or(0, |s| s.1);
    eprintln!(
        "metrics: scrape with {idle} clients: {:.1} ms median of {}, {size} bytes; series {before} \
         before the clients, {after} with them; {alive}/{idle} alive",
        median(&ms),
        ms.len()
    );
    json!({
        "calls": rows,
        "scrape": {
            "idle": idle,
            "ms": ms,
            "bytes": size,
            "series_before": before,
            "series_with_idle": after,
        },
    })
}
