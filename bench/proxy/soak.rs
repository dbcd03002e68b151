//! `VPD_BENCH_ONLY=soak cargo bench --bench proxy`: a long mixed and hostile workload through
//! one proxy in front of the modular test bed (`soak.py` drives it: calls, events, verified
//! streams, fd passing, clients killed at random points, 2,000 idle connections, the
//! hardening issue's attackers, virtqemud killed and restarted every minute). This side
//! starts the test bed and the proxy, samples the proxy's fds and RSS, and judges the run:
//! no panic, the proxy alive, no error that a daemon restart does not explain, every idle
//! connection still served, and the proxy's fds back where they started.
//!
//!   VPD_SOAK_SECS (default 600), VPD_SOAK_BACKEND (default io_uring), VPD_SOAK_IDLE (2000)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::env::{self, Proxy, Testbed};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The process's open fds that are not pipes: the workers keep up to 8 spare splice pipes
/// each (`relay::Pools`), so pipes are judged apart.
fn non_pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| !t.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Runs the soak; returns the process exit code (0 when the run was clean).
pub fn run() -> i32 {
    let secs: u64 = env_or("VPD_SOAK_SECS", "600").parse().unwrap_or(600);
    let backend: &'static str = match env_or("VPD_SOAK_BACKEND", "io_uring").as_str() {
        "epoll" => "epoll",
        _ => "io_uring",
    };
    let idle: usize = env_or("VPD_SOAK_IDLE", "2000").parse().unwrap_or(2000);
    let tb = Testbed::start("");
    let (mut proxy, port) = Proxy::start_testbed_tcp(&tb, backend);
    let pid = proxy.pid();
    // Settle, then the starting point.
    std::thread::sleep(Duration::from_millis(500));
    let (fds_start, rss_start) = (env::fds(pid), env::rss_kib(pid));
    let other_fds_start = non_pipe_fds(pid);
    let work = tempfile::Builder::new()
        .prefix("vpd-soak-")
        .tempdir_in("/tmp")
        .expect("soak dir");
    let report_path = env::target_dir().join("bench-soak.json");
    let spec = json!({
        "sock": proxy.rw_sock,
        "tcp_port": port,
        "testbed_script": env::testbed_script(),
        "testbed_state": tb.state,
        "pool_dir": work.path().join("pools"),
        "seconds": secs,
        "idle": idle,
        "report": report_path,
    });
    let spec_path = work.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("write soak spec");
    eprintln!("soak: {secs} s through the {backend} backend, {idle} idle connections");

    // Peaks while it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut fds, mut rss) = (0usize, 0u64);
            while !stop.load(Ordering::Relaxed) {
                fds = fds.max(env::fds(pid));
                rss = rss.max(env::rss_kib(pid));
                std::thread::sleep(Duration::from_secs(2));
            }
            (fds, rss)
        })
    };
    let script = std::path::Path::new(env::MANIFEST_DIR).join("bench/proxy/soak.py");
    let (ok, out, err) = env::run(
        std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(&spec_path),
        Duration::from_secs(secs + 600),
    );
    stop.store(true, Ordering::Relaxed);
    let (fds_peak, rss_peak) = sampler.join().unwrap_or((0, 0));
    if !ok {
        eprintln!("soak.py failed:\n{out}\n{err}");
    }
    // Every client is gone: the proxy's fds come back to where they started, but for the
    // spare pipes its workers keep (at most 8 per worker, 2 fds each).
    let fds_back = env::wait_for(Duration::from_secs(30), || {
        non_pipe_fds(pid) <= other_fds_start
    });
    let (fds_end, rss_end) = (env::fds(pid), env::rss_kib(pid));
    let other_fds_end = non_pipe_fds(pid);
    let alive = proxy.running();
    let log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
    let panics = log.matches("panicked").count();
    let mut report: Value = std::fs::read_to_string(&report_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    report["backend"] = json!(backend);
    report["proxy"] = json!({
        "fds_start": fds_start, "fds_peak": fds_peak, "fds_end": fds_end,
        "non_pipe_fds_start": other_fds_start, "non_pipe_fds_end": other_fds_end,
        "rss_kib_start": rss_start, "rss_kib_peak": rss_peak, "rss_kib_end": rss_end,
        "alive": alive, "panics": panics,
    });
    let unexplained = report["errors_unexplained"]
        .as_array()
        .map_or(usize::MAX, Vec::len);
    let idle_ok = report["idle_still_served"] == report["idle_connections"];
    let clean = ok && alive && panics == 0 && unexplained == 0 && idle_ok && fds_back;
    report["clean"] = json!(clean);
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    let _ = std::fs::write(&report_path, &text);
    println!("{text}");
    eprintln!(
        "soak {}: report in {}",
        if clean { "clean" } else { "NOT clean" },
        report_path.display()
    );
    if clean {
        0
    } else {
        1
    }
}
