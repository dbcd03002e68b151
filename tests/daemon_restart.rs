//! A driver daemon that dies mid-call: its clients see an error, the proxy stays healthy,
//! keeps answering, and serves again once the daemon is back. Own test binary, because it
//! kills its libvirtd.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{daemon, open_fds, virsh, wait_for, Proxy};

#[test]
fn daemon_killed_mid_call_then_restarted() {
    for backend in ["io_uring", "epoll"] {
        let d = daemon();
        let pid = support::daemon_pid_now(d);
        let p = Proxy::start(d, &format!("io_backend = \"{backend}\""), &[]);
        let uri = p.uri("test:///default");
        assert!(
            virsh(&uri, &["list"]).status.success(),
            "{backend}: proxy not serving"
        );
        let baseline = open_fds(p.pid());

        // 20 clients calling in a tight loop (far more calls than can finish).
        let clients = support::py_command("concurrent.py", &[&uri, "20", "1000000", "120"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        support::crash_daemon(d, pid);

        // Every client sees an error promptly instead of hanging.
        let t = Instant::now();
        let out = clients.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "{backend}: clients did not notice the daemon died"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{backend}: clients hung for {:?}",
            t.elapsed()
        );

        // The proxy is alive and says clearly that the daemon is missing.
        let o = virsh(&uri, &["list"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("Failed to connect socket to"),
            "{backend}: {err}"
        );
        let settled = wait_for(Duration::from_secs(10), || open_fds(p.pid()) <= baseline);
        assert!(
            settled,
            "{backend}: proxy holds {} fds, {baseline} before",
            open_fds(p.pid())
        );

        // Back in business once the daemon is.
        support::restart_daemon(d);
        let o = virsh(&uri, &["list", "--all"]);
        assert!(
            o.status.success(),
            "{backend}: after restart: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
