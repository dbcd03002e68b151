//! Side-by-side benchmark with real libvirt C clients (`bench/proxy/client.c`, compiled at
//! run time). Calls, connect-open and volume streams go to libvirt 9.0.0's modular daemons
//! (`scripts/modular-testbed.sh`): straight to virtqemud's socket ("direct"), through this
//! proxy (io_uring and epoll, routed by `driver_socket_dir`), through libvirt's own
//! virtproxyd from the same build, and through socat. The idle-connection scale, idle CPU
//! and TLS-burst sections stay on private Debian libvirtds. Runs are interleaved (the order
//! rotates every repetition) so all see the same machine; figures are medians over
//! repetitions, ratios are medians of the per-repetition ratios to the direct run next to it.
//!
//!   cargo bench --bench proxy                 full run (~6–9 minutes on 2 cores)
//!   cargo bench --bench proxy -- --quick      or VPD_BENCH_QUICK=1: a few minutes
//!   VPD_BENCH_ONLY=tls,idlecpu cargo bench …  only those sections
//!   VPD_BENCH_PROXY_BIN=/path/virtproxyd      measure another build of the proxy
//!   VPD_BENCH_ONLY=soak VPD_SOAK_SECS=1800 …  the soak alone (`soak.rs`; not in a full run)
//!   cargo bench --bench proxy -- --write-doc  also a quick or partial run rewrites the doc
//!   cargo bench --bench proxy -- --doc-from target/bench-proxy.json
//!                                             measure nothing: the doc from a stored run
//!
//! Measures: cheap-call rate and latency (1 and 8 clients) and the relay's CPU per call,
//! connect-open time, volume download/upload throughput (virtqemud → virtstoraged) and the
//! relay's CPU per GiB (socat as the naive copy relay),
//! and N idle proxied connections (fds, RSS, iou-wrk threads, a busy client's p99 and the
//! proxy's CPU per call), and a busy client's p99 during bursts of TLS handshakes.
//! Prints one table and writes `target/bench-proxy.json` (plus a dated copy under
//! `target/bench-proxy-history/`). A full run of every section then renders that JSON's table
//! into `doc/performance.md` between its markers (`report::markdown`), with the commit and
//! the machine it ran on.

mod env;
mod logflood;
mod metrics;
#[path = "../../tests/support/pki.rs"]
mod pki;
mod report;
mod restart;
mod soak;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use env::{Client, Daemon, Haproxy, IdleGroup, Pool, Proxy, Socat, Testbed};

/// Run sizes; quick mode trades precision for time.
struct Params {
    quick: bool,
    reps: usize,
    call_secs: f64,
    open_count: usize,
    stream_bytes: u64,
    stream_reps: usize,
    idle_counts: Vec<usize>,
    busy_secs: f64,
    /// backends (plus "direct") the scale test runs for
    scale_endpoints: Vec<&'static str>,
    nofile: u64,
}

impl Params {
    fn new(quick: bool, nofile: u64) -> Params {
        // Each idle proxied connection costs the proxy 2 fds (and the daemon 1); keep 1,000
        // fds of headroom for everything else, in steps of 1,000.
        let nmax = (((nofile.saturating_sub(1000)) / 2) / 1000 * 1000).clamp(1000, 19000) as usize;
        if quick {
            Params {
                quick,
                reps: 1,
                call_secs: 0.4,
                open_count: 40,
                stream_bytes: 256 << 20,
                stream_reps: 1,
                // the CPU-per-call comparison wants many idle connections even here
                idle_counts: vec![nmax.min(9000)],
                busy_secs: 1.0,
                scale_endpoints: vec!["io_uring", "direct"],
                nofile,
            }
        } else {
            let mut idle_counts = vec![1000];
            if nmax > 1000 {
                idle_counts.push(nmax);
            }
            Params {
                quick,
                reps: 4,
                call_secs: 1.5,
                open_count: 200,
                stream_bytes: 1 << 30,
                stream_reps: 3,
                idle_counts,
                busy_secs: 3.0,
                scale_endpoints: vec!["io_uring", "epoll", "direct"],
                nofile,
            }
        }
    }
}

/// Where a client connects: the daemon itself, a proxy, or socat.
struct Endpoint {
    name: &'static str,
    sock: PathBuf,
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one (children inherit it); returns it.
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit out-pointer / in-pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

/// `order` rotated by `rep`, so no endpoint always runs first (or right after another).
fn rotated<T: Copy>(order: &[T], rep: usize) -> Vec<T> {
    (0..order.len())
        .map(|i| order[(i + rep) % order.len()])
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` builds and runs bench binaries too; only measure under
    // `cargo bench`, which passes --bench.
    if !args.iter().any(|a| a == "--bench") {
        println!("proxy: measures only under `cargo bench` (add -- --quick for a short run)");
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--doc-from") {
        let from = args
            .get(i + 1)
            .expect("--doc-from needs a bench-proxy.json path");
        let text = std::fs::read_to_string(from).expect("read the bench JSON");
        let doc: Value = serde_json::from_str(&text).expect("parse the bench JSON");
        report::write_doc(&doc, &doc_page()).unwrap_or_else(|e| panic!("{e}"));
        println!("{} written from {from}", doc_page().display());
        return;
    }
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("VPD_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let t_start = Instant::now();
    // VPD_BENCH_ONLY=tls,idlecpu,… runs only those sections (calls, open, streams, scale,
    // idlecpu, tls, logflood, restart, metrics); the table then has only their rows.
    let only = std::env::var("VPD_BENCH_ONLY").unwrap_or_default();
    let want = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    let nofile = raise_nofile();
    if only.trim() == "soak" {
        // Not part of a full run: it takes VPD_SOAK_SECS (default 10 minutes).
        std::process::exit(soak::run());
    }
    let p = Params::new(quick, nofile);
    eprintln!(
        "proxy bench: {} mode, fd limit {nofile}, idle counts {:?}",
        if quick { "quick" } else { "full" },
        p.idle_counts
    );

    // what was measured: taken before anything runs (the tree may change meanwhile)
    let mut meta = meta(&p);
    meta["sections"] = json!(if only.trim().is_empty() {
        "all"
    } else {
        only.trim()
    });
    let mut laps = Laps(serde_json::Map::new(), Instant::now());
    env::remove_stale_tmp();
    let client = Client {
        bin: env::build_client(),
    };
    // The calls, connect-open and stream sections measure against libvirt 9.0.0's modular
    // daemons: virtqemud is what clients reach on Fedora/RHEL, and libvirt's own virtproxyd
    // from the same build runs beside ours.
    let tb = Testbed::start("");
    let qemu_sock = tb.sock("virtqemud-sock");
    let mut uring = Proxy::start_testbed(&tb, "io_uring");
    let mut epoll = Proxy::start_testbed(&tb, "epoll");
    let pool = Pool::create(&qemu_sock, p.stream_bytes);
    let socat = Socat::start(&qemu_sock);
    let haproxy = Haproxy::start(&qemu_sock);
    let libvirt_pid = tb.pid("virtproxyd");
    let daemon_pids = [tb.pid("virtqemud"), tb.pid("virtstoraged")];
    // The scale and TLS sections stay on a private Debian libvirtd (its client limits raised
    // for thousands of connections; libvirtd's defaults are 5000 clients, 20 unauthenticated)
    // with their own proxies in front of it.
    let legacy = (want("scale") || want("tls")).then(|| {
        let daemon = Daemon::start(
            "max_clients = 20000\nmax_anonymous_clients = 20000\nmax_queued_clients = 1000",
        );
        let uring = Proxy::start(&daemon, "io_uring");
        let epoll = Proxy::start(&daemon, "epoll");
        (daemon, uring, epoll)
    });
    laps.lap("setup");

    let endpoints = [
        Endpoint {
            name: "direct",
            sock: qemu_sock.clone(),
        },
        Endpoint {
            name: "io_uring",
            sock: uring.rw_sock.clone(),
        },
        Endpoint {
            name: "epoll",
            sock: epoll.rw_sock.clone(),
        },
        Endpoint {
            name: "libvirt",
            sock: tb.sock("libvirt-sock"),
        },
        Endpoint {
            name: "socat",
            sock: socat.sock.clone(),
        },
    ]
    .into_iter()
    .chain(haproxy.as_ref().map(|h| Endpoint {
        name: "haproxy",
        sock: h.sock.clone(),
    }))
    .collect::<Vec<_>>();
    let ep = |name: &str| endpoints.iter().find(|e| e.name == name).unwrap();
    let qemu_uri = |name: &str| env::unix_uri("qemu:///system", &ep(name).sock);
    let proxy_pid = |name: &str| match name {
        "io_uring" => Some(uring.pid()),
        "epoll" => Some(epoll.pid()),
        "libvirt" => Some(libvirt_pid),
        "haproxy" => haproxy.as_ref().map(|h| h.pid()),
        _ => None,
    };
    // The relay's CPU seconds so far: proxies from their live threads (schedstat, ns);
    // socat from its own and its reaped forked relays' clock ticks (call after wait_idle).
    let relay_cpu = |name: &str| match name {
        "socat" => Some((env::cpu_ticks(socat.pid()), socat.cpu())),
        n => proxy_pid(n).map(|pid| (env::cpu_ticks(pid), env::cpu_sched(pid))),
    };
    let daemon_cpu = || {
        daemon_pids
            .iter()
            .map(|&pid| {
                let (own, children) = env::cpu_ticks(pid);
                own + children
            })
            .sum::<f64>()
    };
    let all: Vec<&str> = endpoints.iter().map(|e| e.name).collect();

    // ---- 1. calls ------------------------------------------------------------------------
    eprintln!("calls: {} reps x {:.1} s", p.reps, p.call_secs);
    let procs = ["libversion", "listall"];
    let clients = [1usize, 8];
    // (proc, clients, endpoint) → one JSON per rep
    let mut calls: BTreeMap<(&str, usize, &str), Vec<Value>> = BTreeMap::new();
    for rep in 0..p.reps * usize::from(want("calls")) {
        for proc_ in procs {
            for c in clients {
                for name in rotated(&all, rep) {
                    let r0 = relay_cpu(name);
                    let mut v = client.json(
                        &[
                            "calls",
                            &qemu_uri(name),
                            proc_,
                            &c.to_string(),
                            &p.call_secs.to_string(),
                        ],
                        Duration::from_secs(60),
                    );
                    if name == "socat" {
                        socat.wait_idle();
                    }
                    // The relay's CPU over the whole client run (its c connects and the
                    // warm-up included) per measured call.
                    if let (Some((_, s0)), Some((_, s1))) = (r0, relay_cpu(name)) {
                        let n = v["calls"].as_f64().unwrap_or(f64::NAN);
                        v["relay_cpu_us_per_call"] = json!((s1 - s0) / n * 1e6);
                    }
                    calls.entry((proc_, c, name)).or_default().push(v);
                }
            }
        }
    }

    laps.lap("calls");

    // ---- 2. connect-open -------------------------------------------------------------------
    eprintln!("connect-open: {} reps x {} opens", p.reps, p.open_count);
    let mut opens: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for rep in 0..p.reps.max(3) * usize::from(want("open")) {
        for name in rotated(&all, rep) {
            let v = client.json(
                &["open", &qemu_uri(name), &p.open_count.to_string()],
                Duration::from_secs(120),
            );
            if name == "socat" {
                socat.wait_idle();
            }
            opens.entry(name).or_default().push(v);
        }
    }

    laps.lap("open");

    // ---- 3. streams ------------------------------------------------------------------------
    // virStorageVolDownload/Upload on a qemu:///system connection: virtqemud forwards the
    // storage calls and the stream to virtstoraged.
    eprintln!(
        "streams: {} reps x {} MiB, download and upload",
        p.stream_reps,
        p.stream_bytes >> 20
    );
    let mut streams: BTreeMap<(&str, &str), Vec<Value>> = BTreeMap::new();
    let bytes_s = p.stream_bytes.to_string();
    // Untimed warm-up, one each way: the first upload allocates the file's blocks, the
    // first download faults in the daemon's and iohelper's code paths.
    let warm = qemu_uri("direct");
    if want("streams") {
        client.json(
            &["download", &warm, &pool.name, "dl"],
            Duration::from_secs(600),
        );
        client.json(
            &["upload", &warm, &pool.name, "ul", &bytes_s],
            Duration::from_secs(600),
        );
    }
    for rep in 0..p.stream_reps * usize::from(want("streams")) {
        for dir in ["download", "upload"] {
            for name in rotated(&all, rep) {
                let uri = qemu_uri(name);
                let mut args = vec![dir, uri.as_str(), pool.name.as_str()];
                if dir == "download" {
                    args.push("dl");
                } else {
                    args.extend(["ul", bytes_s.as_str()]);
                }
                let d0 = daemon_cpu();
                let r0 = relay_cpu(name);
                let mut v = client.json(&args, Duration::from_secs(600));
                if name == "socat" {
                    socat.wait_idle();
                }
                let r1 = relay_cpu(name);
                let d1 = daemon_cpu();
                if let (Some((t0, s0)), Some((t1, s1))) = (r0, r1) {
                    // socat: own + reaped children (ticks); proxies: live threads (ns),
                    // with the tick-based figure kept for cross-checking
                    v["relay_cpu_s"] = json!(s1 - s0);
                    v["relay_cpu_ticks_s"] = json!((t1.0 + t1.1) - (t0.0 + t0.1));
                }
                // virtqemud + virtstoraged (clock ticks, iohelper children once reaped)
                v["daemon_cpu_s"] = json!(d1 - d0);
                streams.entry((dir, name)).or_default().push(v);
            }
        }
    }
    drop(socat);
    drop(haproxy);
    laps.lap("streams");

    // ---- 4. scale --------------------------------------------------------------------------
    // On the private libvirtd (see `legacy` above), not the test bed.
    let legacy_pid = |name: &str| {
        legacy.as_ref().and_then(|(_, u, e)| match name {
            "io_uring" => Some(u.pid()),
            "epoll" => Some(e.pid()),
            _ => None,
        })
    };
    let legacy_uri = |name: &str| {
        let (d, u, e) = legacy.as_ref().expect("libvirtd for the scale section");
        let sock = match name {
            "io_uring" => &u.rw_sock,
            "epoll" => &e.rw_sock,
            _ => &d.rw_sock,
        };
        env::unix_uri("test:///default", sock)
    };
    let ldaemon_pid = legacy.as_ref().map(|l| l.0.pid).unwrap_or(0);
    // A busy client (one connection, back-to-back calls) while N idle connections are open,
    // against the same busy client with none open. The idle connections reach the daemon
    // either way, so the direct run shows what the daemon itself does with N clients.
    let busy = |name: &str| {
        let pid = legacy_pid(name);
        let cpu0 = pid.map(env::cpu_sched);
        let mut v = client.json(
            &[
                "calls",
                &legacy_uri(name),
                "libversion",
                "1",
                &p.busy_secs.to_string(),
            ],
            Duration::from_secs(120),
        );
        // The proxy's CPU per relayed call: a loop that walked every connection would show
        // here as growth with the idle count.
        if let (Some(pid), Some(c0)) = (pid, cpu0) {
            let calls = v["calls"].as_f64().unwrap_or(f64::NAN);
            v["proxy_cpu_us_per_call"] = json!((env::cpu_sched(pid) - c0) / calls * 1e6);
        }
        v
    };
    let snapshot = |pid: Option<u32>| {
        pid.map(|pid| {
            let (threads, iou) = env::threads(pid);
            json!({
                "rss_kib": env::rss_kib(pid),
                "fds": env::fds(pid),
                "threads": threads,
                "iou_wrk": iou,
            })
        })
        .unwrap_or(Value::Null)
    };
    // no-idle baselines, interleaved across endpoints (two rounds now, one at the end)
    let mut busy0: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let scale_endpoints: Vec<&str> = if want("scale") {
        p.scale_endpoints.clone()
    } else {
        Vec::new()
    };
    for round in 0..2 * usize::from(!scale_endpoints.is_empty()) {
        for name in rotated(&scale_endpoints, round) {
            busy0.entry(name).or_default().push(busy(name));
        }
    }
    let mut scale: Vec<Value> = Vec::new();
    for &name in &scale_endpoints {
        let pid = legacy_pid(name);
        let uri = legacy_uri(name);
        let per_proc = 2500;
        eprintln!("scale: {name}, idle {:?}", p.idle_counts);
        let base = snapshot(pid);
        let d_base = json!({"rss_kib": env::rss_kib(ldaemon_pid), "fds": env::fds(ldaemon_pid)});
        let mut points = Vec::new();
        for &n in &p.idle_counts {
            let t0 = Instant::now();
            let g = IdleGroup::open(&client, &uri, n, per_proc);
            let open_secs = t0.elapsed().as_secs_f64();
            thread::sleep(Duration::from_secs(1));
            let idle = snapshot(pid);
            let d_idle =
                json!({"rss_kib": env::rss_kib(ldaemon_pid), "fds": env::fds(ldaemon_pid)});
            let b = busy(name);
            let after_busy = snapshot(pid);
            let alive = g.close();
            if let Some(pid) = pid {
                let fds0 = base["fds"].as_u64().unwrap_or(0) as usize;
                let ok = env::wait_for(Duration::from_secs(120), || env::fds(pid) <= fds0 + 2);
                if !ok {
                    eprintln!(
                        "scale: {name}: proxy still holds {} fds (baseline {fds0})",
                        env::fds(pid)
                    );
                }
            } else {
                // daemon releases its clients
                let fds0 = d_base["fds"].as_u64().unwrap_or(0) as usize;
                env::wait_for(Duration::from_secs(120), || {
                    env::fds(ldaemon_pid) <= fds0 + 10
                });
            }
            eprintln!(
                "scale: {name}: {n} idle opened in {open_secs:.1} s, {alive} alive at the end"
            );
            points.push(json!({
                "idle": n,
                "open_secs": open_secs,
                "alive_at_end": alive,
                "proxy_idle": idle,
                "proxy_after_busy": after_busy,
                "daemon_idle": d_idle,
                "busy": b,
            }));
        }
        scale.push(json!({
            "endpoint": name,
            "proxy_base": base,
            "daemon_base": d_base,
            "points": points,
        }));
    }
    for name in rotated(&scale_endpoints, 2) {
        busy0.entry(name).or_default().push(busy(name));
    }
    for e in &mut scale {
        let name = e["endpoint"].as_str().unwrap_or_default().to_string();
        e["busy_no_idle"] = json!(busy0.get(name.as_str()).cloned().unwrap_or_default());
    }
    laps.lap("scale");

    // ---- 5. proxy CPU per call with idle connections ---------------------------------------
    let idle_cpu = if want("idlecpu") {
        idle_cpu(&p, &client)
    } else {
        Value::Null
    };
    laps.lap("idle_cpu");

    // ---- 6. TLS handshake burst --------------------------------------------------------------
    let tls = if want("tls") {
        tls_burst(&p, &client, &legacy.as_ref().expect("libvirtd").0)
    } else {
        Value::Null
    };
    laps.lap("tls_burst");

    // ---- 7. log flood ------------------------------------------------------------------------
    let logflood = if want("logflood") {
        logflood::run(&tb, &client, p.reps.max(3) * 2, p.busy_secs)
    } else {
        Value::Null
    };
    laps.lap("logflood");
    let restart = if want("restart") {
        restart::run(&client, &p.idle_counts, p.reps.max(3) + 1)
    } else {
        Value::Null
    };
    laps.lap("restart");
    let metrics = if want("metrics") {
        metrics::run(
            &tb,
            &client,
            p.reps.max(3) + 1,
            p.call_secs,
            p.idle_counts.iter().copied().max().unwrap_or(1000),
        )
    } else {
        Value::Null
    };
    laps.lap("metrics");

    // ---- health ----------------------------------------------------------------------------
    let mut legacy = legacy;
    let legacy_proxies = legacy.iter_mut().flat_map(|(_, u, e)| [u, e]);
    for p in [&mut uring, &mut epoll].into_iter().chain(legacy_proxies) {
        assert!(
            p.running(),
            "virtproxyd ({}) died during the run:\n{}",
            p.backend,
            p.log_tail()
        );
    }

    assert!(
        std::path::Path::new(&format!("/proc/{libvirt_pid}")).exists(),
        "libvirt's virtproxyd died during the run"
    );

    meta["elapsed_secs"] = json!(t_start.elapsed().as_secs_f64());
    meta["section_secs"] = json!(laps.0);
    let doc = report::build(
        meta,
        &p_summary(&p),
        &calls,
        &opens,
        &streams,
        &scale,
        &idle_cpu,
        &tls,
        p.stream_bytes,
    );
    let mut doc = doc;
    if !logflood.is_null() {
        doc["summary"]["logflood_p99_ratio"] = logflood["p99_ratio"].clone();
        doc["summary"]["logflood_elsewhere_p99_ratio"] = logflood["elsewhere_p99_ratio"].clone();
        doc["raw"]["logflood"] = logflood;
    }
    if !restart.is_null() {
        doc["raw"]["restart"] = restart;
    }
    if !metrics.is_null() {
        doc["raw"]["metrics"] = metrics;
    }
    drop(pool);
    drop(uring);
    drop(epoll);
    drop(legacy);
    drop(tb);

    let out = env::target_dir().join("bench-proxy.json");
    let text = serde_json::to_string_pretty(&doc).unwrap();
    std::fs::write(&out, &text).expect("write bench-proxy.json");
    let hist = env::target_dir().join("bench-proxy-history");
    let _ = std::fs::create_dir_all(&hist);
    let stamp = doc["meta"]["date"]
        .as_str()
        .unwrap_or("unknown")
        .replace(':', "");
    let _ = std::fs::write(
        hist.join(format!(
            "{stamp}-{}.json",
            if p.quick { "quick" } else { "full" }
        )),
        &text,
    );
    println!("\nJSON: {}", out.display());
    // Only a full run of every section replaces the page's table unless asked: a quick or
    // partial run has fewer repetitions or rows.
    if (!p.quick && only.trim().is_empty()) || args.iter().any(|a| a == "--write-doc") {
        match report::write_doc(&doc, &doc_page()) {
            Ok(()) => println!("table written to {}", doc_page().display()),
            Err(e) => eprintln!("doc not written: {e}"),
        }
    }
}

/// The page whose table a run rewrites.
fn doc_page() -> PathBuf {
    PathBuf::from(env::MANIFEST_DIR).join("doc/performance.md")
}

fn p_summary(p: &Params) -> Value {
    json!({
        "quick": p.quick,
        "reps": p.reps,
        "call_secs": p.call_secs,
        "open_count": p.open_count,
        "stream_bytes": p.stream_bytes,
        "stream_reps": p.stream_reps,
        "idle_counts": p.idle_counts,
        "busy_secs": p.busy_secs,
        "scale_endpoints": p.scale_endpoints,
        "nofile": p.nofile,
    })
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(env::MANIFEST_DIR)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Seconds per section.
struct Laps(serde_json::Map<String, Value>, Instant);

impl Laps {
    fn lap(&mut self, name: &str) {
        self.0
            .insert(name.into(), json!(self.1.elapsed().as_secs_f64()));
        self.1 = Instant::now();
    }
}

fn meta(p: &Params) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let dirty: Vec<String> = cmd_out("git", &["status", "--porcelain"])
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    json!({
        "date": cmd_out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "kernel": cmd_out("uname", &["-r"]),
        "cpu_model": cpu,
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "git_commit": cmd_out("git", &["rev-parse", "HEAD"]),
        "git_dirty": dirty,
        "libvirt": cmd_out("libvirtd", &["--version"]),
        "proxy_bin": env::proxy_bin(),
        "mode": if p.quick { "quick" } else { "full" },
    })
}

/// TLS handshakes run at a time by the burst generator.
const BURST_CONCURRENCY: usize = 25;
/// Handshakes made at least; they go on until the busy client's window is over.
const BURST_SIZE: usize = 500;

/// One full TLS handshake against `port` (client certificate included) up to libvirt's
/// confirmation byte; then the connection is dropped.
fn tls_handshake(cfg: &Arc<rustls::ClientConfig>, port: u16) -> bool {
    use std::io::Read;
    let Ok(name) = "localhost".try_into() else {
        return false;
    };
    let Ok(mut conn) = rustls::ClientConnection::new(cfg.clone(), name) else {
        return false;
    };
    let Ok(mut sock) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let mut b = [0u8; 1];
    matches!(tls.read(&mut b), Ok(1) if b[0] == 1)
}

/// A relayed client's call latency (UNIX socket, through an io_uring proxy that also listens
/// for TLS) with and without TLS handshakes against the same proxy: 25 at a time, for the
/// whole of the busy client's window, 500 at least. The generator threads run as SCHED_IDLE
/// so that, on a small machine, their own client-side crypto competes as little as possible
/// with the busy client and the proxy. Interleaved; one JSON per run.
fn tls_burst(p: &Params, client: &Client, daemon: &env::Daemon) -> Value {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let files = tempfile::tempdir().expect("tempdir");
    let ca = pki::Ca::new("Bench CA");
    let (cert, key) = ca.server(false);
    let d = files.path();
    std::fs::write(d.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(d.join("server.pem"), cert).unwrap();
    std::fs::write(d.join("server.key"), key).unwrap();
    let conf = |port: u16| {
        format!(
            "listen_tls = 1\nlisten_addr = \"127.0.0.1\"\ntls_port = \"{port}\"\n\
             ca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\n",
            d = d.display()
        )
    };
    let port = env::free_port();
    let proxy = Proxy::start_conf(daemon, "io_uring", &conf(port));
    // Control: the same handshakes against another proxy process. What they do to the busy
    // client is the machine's share (generator, kernel, CPU), not the proxy under test's.
    let other_port = env::free_port();
    let _other = Proxy::start_conf(daemon, "io_uring", &conf(other_port));
    let (ccert, ckey) = ca.client("bench", 1);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(ccert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(ckey.as_bytes()).unwrap(),
        )
        .unwrap(),
    );
    assert!(
        tls_handshake(&cfg, port),
        "TLS bench proxy refuses handshakes"
    );
    let uri = env::unix_uri("test:///default", &proxy.rw_sock);
    let busy = || {
        client.json(
            &["calls", &uri, "libversion", "1", &p.busy_secs.to_string()],
            Duration::from_secs(120),
        )
    };
    let reps = p.reps.max(3);
    eprintln!(
        "tls burst: {reps} reps x {:.1} s, with and without handshakes",
        p.busy_secs
    );
    let (mut quiet, mut loaded, mut control, mut spun) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Port 0: no handshakes, every CPU kept busy by SCHED_IDLE spinners instead. What that
    // does to the busy client is what any saturating SCHED_IDLE load costs on this machine
    // (vCPU wake-ups, the hypervisor), with no TLS and no proxy work in it.
    for rep in 0..reps {
        for target in rotated(&[None, Some(port), Some(other_port), Some(0)], rep) {
            let Some(port) = target else {
                quiet.push(busy());
                continue;
            };
            if port == 0 {
                spun.push(with_idle_spinners(busy));
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let done = Arc::new(AtomicUsize::new(0));
            let failed = Arc::new(AtomicUsize::new(0));
            let cpu0 = env::cpu_sched(proxy.pid());
            let t0 = Instant::now();
            let gens: Vec<_> = (0..BURST_CONCURRENCY)
                .map(|_| {
                    let (stop, done, failed, cfg) =
                        (stop.clone(), done.clone(), failed.clone(), cfg.clone());
                    thread::spawn(move || {
                        // The load generator is not under test: SCHED_IDLE keeps its own
                        // client-side crypto from delaying the busy client (any runnable
                        // normal task preempts it at once).
                        let param = libc::sched_param { sched_priority: 0 };
                        // SAFETY: pid 0 = this thread; param is valid for the call.
                        unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                        // at least one whole burst, and load for the whole busy window
                        while !stop.load(Ordering::Relaxed)
                            || done.load(Ordering::Relaxed) < BURST_SIZE
                        {
                            if tls_handshake(&cfg, port) {
                                done.fetch_add(1, Ordering::Relaxed);
                            } else {
                                failed.fetch_add(1, Ordering::Relaxed);
                                thread::sleep(Duration::from_millis(1));
                            }
                        }
                    })
                })
                .collect();
            // Let the first handshakes be in flight before the busy client starts.
            thread::sleep(Duration::from_millis(50));
            let mut v = busy();
            stop.store(true, Ordering::Relaxed);
            for g in gens {
                let _ = g.join();
            }
            let secs = t0.elapsed().as_secs_f64();
            let n = done.load(Ordering::Relaxed);
            v["handshakes"] = json!(n);
            v["handshake_failures"] = json!(failed.load(Ordering::Relaxed));
            v["burst_secs"] = json!(secs);
            v["handshakes_per_s"] = json!(n as f64 / secs);
            v["proxy_cpu_s"] = json!(env::cpu_sched(proxy.pid()) - cpu0);
            if port == other_port {
                control.push(v);
            } else {
                loaded.push(v);
            }
        }
    }
    json!({"no_burst": quiet, "burst": loaded, "burst_elsewhere": control, "idle_spinners": spun})
}

/// Runs `f` while one SCHED_IDLE thread per CPU spins.
fn with_idle_spinners(f: impl FnOnce() -> Value) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let n = thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..n)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: pid 0 = this thread; param is valid for the call.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(50));
    let v = f();
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    v
}

/// The proxy's CPU per relayed call with N idle relayed connections, against none: whatever a
/// worker does per loop for every connection it holds shows here. The idle connections go to
/// one libvirtd (server keepalive off, so they are really idle: no PINGs to relay) and the
/// busy client's to another, so the busy client is not slowed by libvirtd itself with N
/// clients and both runs make calls at the same pace. Interleaved: 0 idle, N idle, 0 idle.
fn idle_cpu(p: &Params, client: &Client) -> Value {
    let n = p.idle_counts.iter().copied().max().unwrap_or(1000);
    let idle_daemon = env::Daemon::start_tagged(
        "idle",
        "max_clients = 20000\nmax_anonymous_clients = 20000\nmax_queued_clients = 1000\n\
         keepalive_interval = -1",
    );
    let busy_daemon = env::Daemon::start_tagged("busy", "");
    let conf = format!(
        "driver_sockets = [ \"qemu={}\", \"test={}\" ]\n",
        idle_daemon.rw_sock.display(),
        busy_daemon.rw_sock.display()
    );
    let proxy = Proxy::start_conf(&busy_daemon, "io_uring", &conf);
    let pid = proxy.pid();
    let busy_uri = env::unix_uri("test:///default", &proxy.rw_sock);
    let idle_uri = env::unix_uri("qemu:///system", &proxy.rw_sock);
    let busy = || {
        let c0 = env::cpu_sched(pid);
        let mut v = client.json(
            &[
                "calls",
                &busy_uri,
                "libversion",
                "1",
                &p.busy_secs.to_string(),
            ],
            Duration::from_secs(120),
        );
        let calls = v["calls"].as_f64().unwrap_or(f64::NAN);
        v["proxy_cpu_us_per_call"] = json!((env::cpu_sched(pid) - c0) / calls * 1e6);
        v
    };
    eprintln!("idle cpu: busy client with 0 and {n} idle connections");
    let reps = p.reps.max(2);
    let (mut none, mut many) = (Vec::new(), Vec::new());
    none.push(busy());
    let g = env::IdleGroup::open(client, &idle_uri, n, 2500);
    thread::sleep(Duration::from_secs(1));
    for _ in 0..reps {
        many.push(busy());
    }
    let alive = g.close();
    env::wait_for(Duration::from_secs(120), || env::fds(pid) < 100);
    for _ in 1..reps {
        none.push(busy());
    }
    json!({"idle": n, "alive_at_end": alive, "no_idle": none, "with_idle": many})
}
