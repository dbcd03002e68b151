//! End-to-end tests: real Debian libvirtd behind the proxy, real virsh and python3-libvirt in
//! front. Every test runs against both relay backends (io_uring and epoll).

mod support;

use support::{frame, read_frame};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{daemon, open_fds, py, virsh, wait_for, Proxy};

const BACKENDS: [&str; 2] = ["io_uring", "epoll"];

fn proxies(extra: &str) -> Vec<(&'static str, Proxy)> {
    BACKENDS
        .iter()
        .map(|b| {
            (
                *b,
                Proxy::start(daemon(), &format!("io_backend = \"{b}\"\n{extra}"), &[]),
            )
        })
        .collect()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
#[track_caller]
fn assert_ok(o: &std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

#[test]
fn virsh_lists_defines_and_runs_test_domains() {
    for (backend, p) in proxies("") {
        let uri = p.uri("test:///default");
        let o = virsh(&uri, &["list", "--all"]);
        assert_ok(&o, backend);
        assert!(stdout(&o).contains("test"), "{backend}: {}", stdout(&o));
        let o = virsh(&uri, &["version"]);
        assert_ok(&o, backend);
        assert!(
            stdout(&o).contains("Running hypervisor: TEST"),
            "{backend}: {}",
            stdout(&o)
        );
        let o = virsh(&uri, &["capabilities"]);
        assert!(stdout(&o).contains("<capabilities>"), "{backend}");

        // The test driver's state lives as long as a connection: one virsh session.
        let xml = p.dir().join("dom.xml");
        std::fs::write(&xml, "<domain type='test'><name>vpd-life</name><memory>1024</memory><os><type>hvm</type></os></domain>").unwrap();
        let script = format!(
            "define {x}; start vpd-life; domstate vpd-life; destroy vpd-life; domstate vpd-life; undefine vpd-life",
            x = xml.display()
        );
        let o = virsh(&uri, &[&script]);
        assert_ok(&o, backend);
        let out = stdout(&o);
        assert!(
            out.contains("running") && out.contains("shut off"),
            "{backend}: {out}"
        );
    }
}

#[test]
fn qemu_system_version_goes_to_the_qemu_daemon() {
    for (backend, p) in proxies("") {
        let o = virsh(&p.uri("qemu:///system"), &["version"]);
        assert_ok(&o, backend);
        assert!(
            stdout(&o).contains("Running hypervisor: QEMU"),
            "{backend}: {}",
            stdout(&o)
        );
    }
}

#[test]
fn lifecycle_events_reach_python_through_the_proxy() {
    for (backend, p) in proxies("") {
        let o = py("events.py", &[&p.uri("test:///default")]);
        assert_ok(&o, backend);
    }
}

#[test]
fn volume_streams_of_256_mib_round_trip() {
    for (backend, p) in proxies("") {
        let pool = p.dir().join("pool");
        std::fs::create_dir_all(&pool).unwrap();
        let o = py(
            "stream_volume.py",
            &[&p.uri("qemu:///system"), pool.to_str().unwrap(), "256"],
        );
        assert_ok(&o, backend);

        // virsh's own vol-upload / vol-download, compared by sha256.
        let uri = p.uri("qemu:///system");
        let name = format!("vpdv-{backend}");
        let data = p.dir().join("up.bin");
        let back = p.dir().join("down.bin");
        let o = Command::new("head")
            .args(["-c", "268435456", "/dev/urandom"])
            .output()
            .unwrap();
        std::fs::write(&data, &o.stdout).unwrap();
        let setup = format!(
            "pool-create-as {name} dir --target {}; vol-create-as {name} v 256M --format raw",
            pool.display()
        );
        assert_ok(&virsh(&uri, &[&setup]), backend);
        assert_ok(
            &virsh(
                &uri,
                &["vol-upload", "--pool", &name, "v", data.to_str().unwrap()],
            ),
            backend,
        );
        assert_ok(
            &virsh(
                &uri,
                &["vol-download", "--pool", &name, "v", back.to_str().unwrap()],
            ),
            backend,
        );
        let _ = virsh(
            &uri,
            &[&format!("vol-delete --pool {name} v; pool-destroy {name}")],
        );
        let sum = |f: &std::path::Path| {
            stdout(&Command::new("sha256sum").arg(f).output().unwrap())
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            sum(&data),
            sum(&back),
            "{backend}: downloaded volume differs"
        );
    }
}

#[test]
fn screenshot_stream_from_the_test_driver() {
    for (backend, p) in proxies("") {
        let file = p.dir().join("shot.png");
        let o = virsh(
            &p.uri("test:///default"),
            &["screenshot", "test", file.to_str().unwrap()],
        );
        assert_ok(&o, backend);
        let png = std::fs::read(&file).unwrap();
        assert!(
            png.len() > 1000 && png.starts_with(b"\x89PNG"),
            "{backend}: {} bytes",
            png.len()
        );
    }
}

#[test]
fn fds_reach_the_daemon_with_fd_associate() {
    for (backend, p) in proxies("") {
        let o = py(
            "fd_associate.py",
            &[&p.uri("qemu:///system"), &daemon().pid.to_string()],
        );
        assert_ok(&o, backend);
    }
}

#[test]
fn read_only_socket_reads_but_refuses_writes() {
    for (backend, p) in proxies("") {
        let uri = p.uri_ro("test:///default");
        let o = virsh(&uri, &["list", "--all"]);
        assert_ok(&o, backend);
        let xml = p.dir().join("ro.xml");
        std::fs::write(&xml, "<domain type='test'><name>vpd-ro</name><memory>1024</memory><os><type>hvm</type></os></domain>").unwrap();
        let o = virsh(&uri, &["define", xml.to_str().unwrap()]);
        assert!(
            !o.status.success(),
            "{backend}: define on ro socket succeeded"
        );
        assert!(
            stderr(&o).contains("read only access prevents virDomainDefineXML"),
            "{backend}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn non_root_client_identity_reaches_the_daemon() {
    let uid = stdout(&Command::new("id").args(["-u", "vpdtest"]).output().unwrap())
        .trim()
        .to_string();
    for (backend, p) in proxies("") {
        // The checkout may sit where vpdtest cannot read (a 0700 temp dir): run a copy.
        let pydir = p.dir().join("py");
        std::fs::create_dir_all(&pydir).unwrap();
        for f in ["identity.py", "_common.py"] {
            std::fs::copy(support::py_script(f), pydir.join(f)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pydir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut child = Command::new("runuser")
            .args(["-u", "vpdtest", "--", "/usr/bin/python3"])
            .arg(pydir.join("identity.py"))
            .arg(p.uri("test:///default"))
            .current_dir(p.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        use std::io::BufRead;
        lines.read_line(&mut line).unwrap();
        let pid = line
            .trim()
            .strip_prefix("pid ")
            .expect("identity.py prints its pid")
            .to_string();
        line.clear();
        lines.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("open uid="),
            "{backend}: identity.py did not open: {line}"
        );
        // The daemon's client for that connection carries the client's uid and pid, not root's.
        let clients = support::admin_clients(daemon());
        let seen = clients.iter().any(|(_, info)| {
            support::info_field(info, "unix_user_id") == Some(uid.as_str())
                && support::info_field(info, "unix_process_id") == Some(pid.as_str())
        });
        drop(child.stdin.take());
        let _ = child.wait();
        assert!(
            seen,
            "{backend}: no daemon client with uid {uid} pid {pid}: {clients:?}"
        );
    }
}

#[test]
fn routing_probes_empty_names_and_names_unknown_or_missing_daemons() {
    let drvdir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&daemon().rw_sock, drvdir.path().join("virtqemud-sock")).unwrap();
    let extra = format!("driver_socket_dir = \"{}\"", drvdir.path().display());
    for (backend, p) in proxies(&extra) {
        // An empty name is probed to the first daemon socket present (virtqemud-sock here),
        // and the probed URI is what goes downstream.
        let o = virsh(
            &format!("qemu+unix:///system?socket={}&name=", p.rw_sock.display()),
            &["version"],
        );
        assert_ok(&o, backend);
        assert!(
            stdout(&o).contains("Running hypervisor: QEMU"),
            "{backend}: {}",
            stdout(&o)
        );
        assert!(
            p.log_text().contains("uri=\"qemu:///system\""),
            "{backend}: {}",
            p.log_text()
        );

        let o = virsh(&p.uri("foo:///system"), &["list"]);
        assert!(
            stderr(&o).contains("no connection driver available for foo:///system"),
            "{backend}: {}",
            stderr(&o)
        );

        let o = virsh(&p.uri("lxc:///system"), &["list"]);
        let want = format!(
            "Failed to connect socket to '{}/virtlxcd-sock': No such file or directory",
            drvdir.path().display()
        );
        assert!(stderr(&o).contains(&want), "{backend}: {}", stderr(&o));

        let o = virsh(
            &format!(
                "qemu+unix:///system?socket={}&name=qemu%2Bssh://h/system",
                p.rw_sock.display()
            ),
            &["list"],
        );
        assert!(
            stderr(&o).contains("only forwards to local driver daemons"),
            "{backend}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn two_hundred_concurrent_clients() {
    for (backend, p) in proxies("") {
        let o = py("concurrent.py", &[&p.uri("test:///default"), "200", "20"]);
        assert_ok(&o, backend);
    }
}

// ---- abuse: a raw client speaking bad protocol -------------------------------------------

fn raw(p: &Proxy) -> UnixStream {
    let s = UnixStream::connect(&p.rw_sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}
/// True when the proxy closed the connection (EOF, or reset).
fn closed_by_proxy(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn open_test_default(s: &mut UnixStream) {
    let mut body = vec![0, 0, 0, 1, 0, 0, 0, 15];
    body.extend_from_slice(b"test:///default\0");
    body.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&frame(1, 0, 1, &body)).unwrap();
    let reply = read_frame(s).expect("open reply");
    assert_eq!(&reply[24..28], &[0, 0, 0, 0], "open failed");
}

#[test]
fn malformed_input_is_closed_cleanly_without_leaks() {
    for (backend, p) in proxies("") {
        // Warm up one full connection so lazily created resources are in the baseline.
        assert_ok(&virsh(&p.uri("test:///default"), &["list"]), backend);
        let baseline = open_fds(p.pid());
        let bystander_uri = p.uri("test:///default");

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("len 0", 0u32.to_be_bytes().to_vec()),
            ("len 27", 27u32.to_be_bytes().to_vec()),
            ("len 0xffffffff", u32::MAX.to_be_bytes().to_vec()),
        ];
        for (what, bytes) in cases {
            let mut s = raw(&p);
            s.write_all(&bytes).unwrap();
            assert!(closed_by_proxy(&mut s), "{backend}: {what} not closed");
        }
        // Truncated frame, then the client goes away.
        {
            let mut s = raw(&p);
            let f = frame(66, 0, 0, &[]);
            s.write_all(&f[..20]).unwrap();
        }
        // A call before open gets libvirt's error reply, and the connection stays usable.
        {
            let mut s = raw(&p);
            s.write_all(&frame(3, 0, 7, &[])).unwrap();
            let r = read_frame(&mut s).unwrap();
            assert_eq!(&r[24..28], &[0, 0, 0, 1], "{backend}: status must be ERROR");
            assert!(String::from_utf8_lossy(&r).contains("hypervisor connection not open"));
            s.write_all(&frame(66, 0, 8, &[])).unwrap();
            let r = read_frame(&mut s).unwrap();
            assert_eq!(
                &r[28..],
                &[0, 0, 0, 1, 0, 0, 0, 0],
                "{backend}: AUTH_LIST reply"
            );
        }
        // A second CONNECT_OPEN after relay started ends the connection.
        {
            let mut s = raw(&p);
            open_test_default(&mut s);
            let mut body = vec![0, 0, 0, 1, 0, 0, 0, 15];
            body.extend_from_slice(b"test:///default\0\0\0\0\0");
            s.write_all(&frame(1, 0, 2, &body)).unwrap();
            assert!(
                closed_by_proxy(&mut s),
                "{backend}: second open not refused"
            );
        }
        // An oversized length after open is refused too (validated in the relay).
        {
            let mut s = raw(&p);
            open_test_default(&mut s);
            s.write_all(&u32::MAX.to_be_bytes()).unwrap();
            assert!(
                closed_by_proxy(&mut s),
                "{backend}: bad length after open not closed"
            );
        }
        // After open, a frame that needs no answer and the client's close in one go: the
        // close comes with no edge of its own, yet the proxy must see it (fds settle below).
        {
            let mut s = raw(&p);
            open_test_default(&mut s);
            let mut pong = Vec::new();
            for v in [28u32, 0x6b65_6570, 1, 2, 2, 0, 0] {
                pong.extend_from_slice(&v.to_be_bytes());
            }
            s.write_all(&pong).unwrap();
        }
        // Other clients never noticed.
        assert_ok(&virsh(&bystander_uri, &["list"]), backend);
        let settled = wait_for(Duration::from_secs(10), || open_fds(p.pid()) == baseline);
        assert!(
            settled,
            "{backend}: fds {} after abuse, {baseline} before",
            open_fds(p.pid())
        );
    }
}

#[test]
fn stalled_stream_reader_does_not_slow_others() {
    for (backend, p) in proxies("") {
        let uri = p.uri("qemu:///system");
        let pool = p.dir().join("slowpool");
        std::fs::create_dir_all(&pool).unwrap();
        let name = format!("vpds-{backend}");
        let setup = format!(
            "pool-create-as {name} dir --target {}; vol-create-as {name} v 256M --format raw",
            pool.display()
        );
        assert_ok(&virsh(&uri, &[&setup]), backend);
        let socket_baseline = sockets(p.pid());
        // virsh writes the download to a pipe nobody reads: it stops reading its socket.
        let mut slow = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "virsh -c '{uri}' vol-download --pool {name} v /dev/stdout | sleep 60"
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..5 {
            let t = Instant::now();
            assert_ok(&virsh(&p.uri("test:///default"), &["list"]), backend);
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "{backend}: bystander took {:?}",
                t.elapsed()
            );
        }
        let _ = Command::new("pkill")
            .args(["-f", &format!("vol-download --pool {name}")])
            .status();
        let _ = slow.kill();
        let _ = slow.wait();
        let _ = virsh(
            &uri,
            &[&format!("vol-delete --pool {name} v; pool-destroy {name}")],
        );
        // Connections are gone (their sockets closed); the worker may keep a few spare pipes
        // for the next stream (bounded pool), which are not leaks.
        let settled = wait_for(Duration::from_secs(10), || {
            sockets(p.pid()) <= socket_baseline
        });
        assert!(
            settled,
            "{backend}: {} sockets after the stalled stream, {socket_baseline} before",
            sockets(p.pid())
        );
        assert!(
            pipes(p.pid()) <= 2 * 8 * 2 + 2,
            "{backend}: {} pipe fds",
            pipes(p.pid())
        );
    }
}

fn iou_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("iou-wrk"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn sockets(pid: u32) -> usize {
    fd_links_starting_with(pid, "socket:")
}

fn pipes(pid: u32) -> usize {
    fd_links_starting_with(pid, "pipe:")
}

fn fd_links_starting_with(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|f| {
                    std::fs::read_link(f.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn idle_connections_hold_two_fds_no_pipe_and_no_kernel_thread() {
    for (backend, p) in proxies("") {
        // Workers create their rings after the sockets appear: settle before counting.
        assert_ok(&virsh(&p.uri("test:///default"), &["list"]), backend);
        let before = open_fds(p.pid());
        let threads_before = support::threads(p.pid());
        // (The proxy may inherit a pipe from the test runner, e.g. cargo's jobserver.)
        let pipes_before = pipes(p.pid());
        let mut conns: Vec<UnixStream> = (0..100)
            .map(|_| {
                let mut s = raw(&p);
                open_test_default(&mut s);
                s
            })
            .collect();
        // Each relayed connection: the client socket and the daemon socket, nothing more.
        let after = open_fds(p.pid());
        assert_eq!(
            after - before,
            200,
            "{backend}: {before} fds before, {after} with 100 idle"
        );
        assert_eq!(
            pipes(p.pid()),
            pipes_before,
            "{backend}: idle connections hold pipes"
        );
        assert_eq!(
            iou_workers(p.pid()),
            0,
            "{backend}: io-wq workers exist while idle"
        );
        assert_eq!(
            support::threads(p.pid()),
            threads_before,
            "{backend}: threads grew with connections"
        );
        // They still work.
        for s in conns.iter_mut().take(3) {
            s.write_all(&frame(157, 0, 9, &[])).unwrap(); // CONNECT_GET_LIB_VERSION
            let r = read_frame(s).unwrap();
            assert_eq!(
                &r[20..28],
                &[0, 0, 0, 9, 0, 0, 0, 0],
                "{backend}: reply serial/status"
            );
        }
        drop(conns);
        assert!(
            wait_for(Duration::from_secs(10), || open_fds(p.pid()) == before),
            "{backend}: fds not released"
        );
    }
}

#[test]
fn max_clients_pauses_accepting_until_a_client_leaves() {
    for (backend, p) in proxies("max_clients = 2") {
        let mut a = raw(&p);
        let _b = raw(&p);
        a.write_all(&frame(66, 0, 0, &[])).unwrap();
        assert!(
            read_frame(&mut a).is_some(),
            "{backend}: first client not served"
        );
        // The third connection waits in the backlog: no answer while two are connected.
        let mut c = raw(&p);
        c.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        c.write_all(&frame(66, 0, 0, &[])).unwrap();
        let mut byte = [0u8; 1];
        assert!(
            c.read(&mut byte).is_err(),
            "{backend}: third client served over max_clients"
        );
        drop(a);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(
            read_frame(&mut c).is_some(),
            "{backend}: third client not served after one left"
        );
    }
}

#[test]
fn keepalive_is_end_to_end_after_hand_over() {
    for (backend, p) in proxies("") {
        let mut s = raw(&p);
        s.write_all(&frame(66, 0, 0, &[])).unwrap();
        read_frame(&mut s).unwrap();
        // SUPPORTS_FEATURE(PROGRAM_KEEPALIVE) before open: the proxy must pass it downstream.
        s.write_all(&frame(60, 0, 1, &10u32.to_be_bytes())).unwrap();
        let r = read_frame(&mut s).unwrap();
        assert_eq!(
            &r[28..],
            &[0, 0, 0, 1],
            "{backend}: feature 10 not supported"
        );
        open_test_default(&mut s);
        // The daemon pings an idle client after keepalive_interval (5 s); the ping arrives
        // through the relay, and our pong goes back to the daemon.
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let ping = read_frame(&mut s).expect("no keepalive PING from the daemon");
        assert_eq!(
            &ping[4..20],
            &[0x6b, 0x65, 0x65, 0x70, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2],
            "{backend}"
        );
        let mut pong = ping.clone();
        pong[15] = 2;
        s.write_all(&pong).unwrap();
        // Still alive afterwards.
        s.write_all(&frame(157, 0, 5, &[])).unwrap();
        let r = read_frame(&mut s).unwrap();
        assert_eq!(&r[20..28], &[0, 0, 0, 5, 0, 0, 0, 0], "{backend}");
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn preopen_flood_without_reading_neither_grows_memory_nor_stalls_others() {
    for (backend, p) in proxies("") {
        let rss_before = vm_rss_kib(p.pid());
        let ping: Vec<u8> = [28u32, 0x6b65_6570, 1, 1, 2, 0, 0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let burst: Vec<u8> = ping
            .iter()
            .cycle()
            .take(ping.len() * 4096)
            .copied()
            .collect();
        let mut flooder = raw(&p);
        flooder
            .set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let t = Instant::now();
        let mut sent = 0usize;
        // Write PINGs and never read the PONGs, until the socket pushes back.
        while t.elapsed() < Duration::from_secs(3) {
            match flooder.write(&burst) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        let t = Instant::now();
        assert_ok(&virsh(&p.uri("test:///default"), &["list"]), backend);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{backend}: bystander took {:?}",
            t.elapsed()
        );
        let grown = vm_rss_kib(p.pid()).saturating_sub(rss_before);
        assert!(
            grown < 16 * 1024,
            "{backend}: RSS grew {grown} KiB after {sent} bytes of PINGs"
        );
    }
}

#[test]
fn pipelined_failing_opens_leave_no_daemon_connections_behind() {
    let count = |d: &support::Daemon| support::admin_clients(d).len();
    for (backend, p) in proxies("") {
        // Workers create their rings after the sockets appear: settle before counting.
        assert_ok(&virsh(&p.uri("test:///default"), &["list"]), backend);
        let before = count(daemon());
        let fds_before = open_fds(p.pid());
        let mut s = raw(&p);
        let bad_name = "test:///nonexistent/vpd.xml";
        let mut bad = vec![0, 0, 0, 1];
        bad.extend_from_slice(&(bad_name.len() as u32).to_be_bytes());
        bad.extend_from_slice(bad_name.as_bytes());
        bad.resize(bad.len().next_multiple_of(4), 0);
        bad.extend_from_slice(&[0, 0, 0, 0]);
        // Ten opens the daemon refuses, all in one write.
        let burst: Vec<u8> = (0..10u32).flat_map(|i| frame(1, 0, i, &bad)).collect();
        s.write_all(&burst).unwrap();
        for i in 0..10u32 {
            let r = read_frame(&mut s).expect("error reply");
            assert_eq!(
                &r[20..28],
                &[&i.to_be_bytes()[..], &[0, 0, 0, 1]].concat()[..],
                "{backend}: reply {i}"
            );
        }
        drop(s);
        let settled = wait_for(Duration::from_secs(10), || {
            count(daemon()) <= before && open_fds(p.pid()) <= fds_before
        });
        assert!(
            settled,
            "{backend}: daemon has {} clients (was {before}), proxy {} fds (was {fds_before})",
            count(daemon()),
            open_fds(p.pid())
        );
    }
}

#[test]
fn second_open_pipelined_behind_the_first_is_refused() {
    for (backend, p) in proxies("") {
        let mut s = raw(&p);
        let mut body = vec![0, 0, 0, 1, 0, 0, 0, 15];
        body.extend_from_slice(b"test:///default\0\0\0\0\0");
        let mut two = frame(1, 0, 1, &body);
        two.extend(frame(1, 0, 2, &body));
        s.write_all(&two).unwrap();
        let r = read_frame(&mut s).expect("first open reply");
        assert_eq!(&r[24..28], &[0, 0, 0, 0], "{backend}: first open failed");
        assert!(
            closed_by_proxy(&mut s),
            "{backend}: pipelined second open not refused"
        );
    }
}

/// A busy driver daemon's socket: listen backlog 1 and one accept per `every`. Each accepted
/// connection is relayed byte for byte to the real libvirtd by two threads, so the opens that
/// get through are real. Returns the accepting thread (it ends when `stop` is set).
fn slow_accepting_daemon(
    path: &std::path::Path,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    // listen() again on a listening AF_UNIX socket sets its backlog.
    // SAFETY: plain syscall on a socket we own.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 1) }, 0);
    listener.set_nonblocking(true).unwrap();
    let target = daemon().rw_sock.clone();
    std::thread::spawn(move || {
        let mut accepted = 0;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            let Ok((client, _)) = listener.accept() else {
                continue;
            };
            accepted += 1;
            client.set_nonblocking(false).unwrap();
            let up = UnixStream::connect(&target).unwrap();
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
        accepted
    })
}

#[test]
fn opens_wait_while_the_daemon_backlog_is_full() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    const CLIENTS: usize = 120;
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("busy-sock");
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = slow_accepting_daemon(&sock, Duration::from_millis(4), stop.clone());
        let p = Proxy::start(
            daemon(),
            &format!(
                "io_backend = \"{backend}\"\ndriver_sockets = [ \"test={}\" ]\n",
                sock.display()
            ),
            &[],
        );
        let start = Arc::new(Barrier::new(CLIENTS));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (start, path) = (start.clone(), p.rw_sock.clone());
                std::thread::spawn(move || -> Result<(), String> {
                    let mut s = UnixStream::connect(&path).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
                    let mut body = vec![0, 0, 0, 1, 0, 0, 0, 15];
                    body.extend_from_slice(b"test:///default\0\0\0\0\0");
                    start.wait();
                    s.write_all(&frame(1, 0, 1, &body))
                        .map_err(|e| e.to_string())?;
                    let r = read_frame(&mut s).ok_or("no open reply")?;
                    if r[24..28] == [0, 0, 0, 0] {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&r[28..]).into_owned())
                    }
                })
            })
            .collect();
        let results: Vec<Result<(), String>> = clients
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err("client panicked".into())))
            .collect();
        stop.store(true, Ordering::Relaxed);
        let accepted = acceptor.join().unwrap();
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{backend}: {} of {CLIENTS} opens failed (daemon accepted {accepted}), e.g. {:?}",
            failed.len(),
            failed.first()
        );
        assert_eq!(accepted, CLIENTS, "{backend}");
        assert!(
            !p.log_text().contains("Resource temporarily unavailable"),
            "{backend}"
        );
    }
}
