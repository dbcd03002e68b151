//! The metrics endpoint through the real binary: content negotiation, HEAD, 404/405, requests
//! that are huge or never finish, the figures virt-admin shows, the idle timer, and the
//! exposition checked by Prometheus's own parsers (promtool for the text format, the Python
//! client's strict OpenMetrics parser for OpenMetrics).
//!
//! No driver daemon is needed: raw clients on the proxy's socket are enough to be counted.

#[macro_use]
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A proxy with the endpoint on a free loopback port (and `extra` config, `envs`).
fn start(extra: &str, envs: &[(&str, &str)]) -> (Proxy, u16) {
    let port = free_port();
    let p = Proxy::start_with(
        &format!("metrics_listen = \"127.0.0.1:{port}\"\n{extra}"),
        envs,
    );
    (p, port)
}

struct Response {
    status: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` and reads to EOF (the endpoint always closes).
fn exchange(port: u16, request: &str) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response to EOF");
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

fn get(port: u16, accept: Option<&str>) -> Response {
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    exchange(
        port,
        &format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\n{accept}\r\n"),
    )
}

/// `GET path`.
fn get_path(port: u16, path: &str) -> Response {
    exchange(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    )
}

/// The value of an unlabelled or fully labelled series, e.g. `virtproxyd_clients` or
/// `virtproxyd_metrics_requests_total{result="ok"}`.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok())?
    })
}

fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/install-deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the scrape:\n{}{}\n--- scrape\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Prometheus Python client's OpenMetrics parser is strict (types, suffixes, `# EOF`);
/// promtool 2.42 reads only the text format.
fn openmetrics_parser_accepts(text: &str) {
    let script = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
        print(len(list(p(sys.stdin.read()))))\n";
    let mut child = Command::new(PYTHON)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape (python3-prometheus-client):\n{}\n--- scrape\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(families >= 10, "only {families} families");
}

#[test]
fn scrapes_negotiate_the_format_and_prometheus_parsers_accept_both() {
    let (_p, port) = start("", &[]);

    let om = get(port, Some(PROMETHEUS_ACCEPT));
    assert_eq!(om.status, "HTTP/1.1 200 OK");
    assert_eq!(om.header("Content-Type"), Some(OPENMETRICS));
    assert_eq!(om.header("Connection"), Some("close"));
    assert_eq!(
        om.header("Content-Length"),
        Some(om.body.len().to_string().as_str())
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(
        om.body.contains("# TYPE virtproxyd_build info\n"),
        "{}",
        om.body
    );
    openmetrics_parser_accepts(&om.body);

    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let text = get(port, accept);
        assert_eq!(text.status, "HTTP/1.1 200 OK", "{accept:?}");
        assert_eq!(text.header("Content-Type"), Some(TEXT), "{accept:?}");
        assert!(!text.body.contains("# EOF"), "{}", text.body);
        assert!(
            text.body
                .contains("# TYPE virtproxyd_metrics_requests_total counter\n"),
            "{}",
            text.body
        );
        promtool_accepts(&text.body);
    }
    let last = get(port, None);
    assert_eq!(
        value(
            &last.body,
            "virtproxyd_metrics_requests_total{result=\"ok\"}"
        ),
        Some(5.0),
        "each scrape counts itself:\n{}",
        last.body
    );
    let version = format!(
        "virtproxyd_build_info{{version=\"{}\",libvirt=\"9.0.0\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&last.body, &version), Some(1.0), "{}", last.body);
    let started = value(&last.body, "virtproxyd_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 120.0..=now).contains(&started),
        "start {started}, now {now}"
    );
}

#[test]
fn head_has_the_headers_and_no_body_and_other_requests_get_404_or_405() {
    let (_p, port) = start("", &[]);
    let head = exchange(port, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(head.status, "HTTP/1.1 200 OK");
    assert_eq!(head.header("Content-Type"), Some(TEXT));
    let len: usize = head.header("Content-Length").unwrap().parse().unwrap();
    assert!(len > 500, "Content-Length {len}");
    assert_eq!(head.body, "");

    let missing = exchange(port, "GET /metricsx HTTP/1.1\r\n\r\n");
    assert_eq!(missing.status, "HTTP/1.1 404 Not Found");
    assert_eq!(
        exchange(port, "GET / HTTP/1.0\r\n\r\n").status,
        "HTTP/1.1 404 Not Found"
    );
    let post = exchange(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(post.status, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(post.header("Allow"), Some("GET, HEAD"));
    let garbage = exchange(port, "\x16\x03\x01 nonsense\r\n\r\n");
    assert_eq!(garbage.status, "HTTP/1.1 400 Bad Request");

    let body = get(port, None).body;
    for (result, n) in [
        ("ok", 2.0),
        ("not_found", 2.0),
        ("method_not_allowed", 1.0),
        ("bad_request", 1.0),
    ] {
        assert_eq!(
            value(
                &body,
                &format!("virtproxyd_metrics_requests_total{{result=\"{result}\"}}")
            ),
            Some(n),
            "{result}:\n{body}"
        );
    }
}

/// Reads until EOF or a reset; true if the peer closed within `limit`.
fn closed_by_peer(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn a_huge_request_is_closed_and_the_endpoint_keeps_serving() {
    let (mut p, port) = start("", &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // 1 MiB of header that never ends; the endpoint stops reading at 8 KiB.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    huge.resize(1 << 20, b'a');
    let sent = s.write_all(&huge);
    // Either the write fails because the endpoint closed, or it went into the buffers.
    if let Err(e) = &sent {
        assert!(
            matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
            "{e}"
        );
    }
    assert!(
        closed_by_peer(&mut s, Duration::from_secs(5)),
        "the endpoint kept a 1 MiB request open"
    );
    let after = get(port, None);
    assert_eq!(after.status, "HTTP/1.1 200 OK");
    assert_eq!(
        value(
            &after.body,
            "virtproxyd_metrics_requests_total{result=\"too_large\"}"
        ),
        Some(1.0),
        "{}",
        after.body
    );
    assert!(p.running());
}

#[test]
fn a_slow_request_does_not_block_a_scrape_and_is_closed_at_its_deadline() {
    let deadline = Duration::from_millis(1500);
    let (_p, port) = start("", &[("VIRTPROXYD_METRICS_DEADLINE_MS", "1500")]);
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: loc")
        .unwrap();
    let opened = Instant::now();
    // A concurrent scrape is answered at once, not after the slow one's deadline.
    let t = Instant::now();
    let r = get(port, None);
    assert_eq!(r.status, "HTTP/1.1 200 OK");
    assert!(
        t.elapsed() < deadline / 2,
        "a scrape waited {:?} behind a slow client",
        t.elapsed()
    );
    assert!(
        closed_by_peer(&mut slow, Duration::from_secs(10)),
        "the slow request was never closed"
    );
    let held = opened.elapsed();
    assert!(
        held >= deadline - Duration::from_millis(100) && held < deadline * 3,
        "closed after {held:?}, deadline {deadline:?}"
    );
    let body = get(port, None).body;
    assert_eq!(
        value(
            &body,
            "virtproxyd_metrics_requests_total{result=\"timeout\"}"
        ),
        Some(1.0),
        "{body}"
    );
}

#[test]
fn client_counts_match_virt_admin_and_follow_clients() {
    let (p, port) = start("max_clients = 77\nmax_anonymous_clients = 7\n", &[]);
    let admin = p.dir().join("libvirt-admin-sock");
    let info = virt_admin_sock(&admin, &["srv-clients-info", "virtproxyd"]);
    assert_success(&info, "virt-admin srv-clients-info");
    let info = stdout(&info);
    let pool = virt_admin_sock(&admin, &["srv-threadpool-info", "virtproxyd"]);
    assert_success(&pool, "virt-admin srv-threadpool-info");
    let pool = stdout(&pool);
    let body = get(port, None).body;
    for (field, series) in [
        ("nclients_max", "virtproxyd_clients_max"),
        (
            "nclients_unauth_max",
            "virtproxyd_clients_unauthenticated_max",
        ),
        ("nclients_unauth", "virtproxyd_clients_unauthenticated"),
    ] {
        let want: f64 = info_field(&info, field).unwrap().parse().unwrap();
        assert_eq!(value(&body, series), Some(want), "{field}:\n{info}\n{body}");
    }
    for (field, series) in [
        ("minWorkers", "virtproxyd_threadpool_min_workers"),
        ("maxWorkers", "virtproxyd_threadpool_max_workers"),
        ("nWorkers", "virtproxyd_threadpool_workers"),
        ("freeWorkers", "virtproxyd_threadpool_free_workers"),
        ("prioWorkers", "virtproxyd_threadpool_prio_workers"),
        ("jobQueueDepth", "virtproxyd_threadpool_job_queue_depth"),
    ] {
        let want: f64 = info_field(&pool, field).unwrap().parse().unwrap();
        assert_eq!(value(&body, series), Some(want), "{field}:\n{pool}\n{body}");
    }
    assert_eq!(value(&body, "virtproxyd_clients_max"), Some(77.0));

    // Two raw clients on the rw socket and one on the ro socket (auth none: admitted at once).
    let clients: Vec<UnixStream> = [&p.rw_sock, &p.rw_sock, &p.ro_sock]
        .iter()
        .map(|s| UnixStream::connect(s).unwrap())
        .collect();
    let counted = |want: [f64; 3]| {
        let b = get(port, None).body;
        [
            value(&b, "virtproxyd_clients"),
            value(&b, "virtproxyd_clients_by_listener{listener=\"unix_rw\"}"),
            value(&b, "virtproxyd_clients_by_listener{listener=\"unix_ro\"}"),
        ] == want.map(Some)
    };
    assert!(
        wait_for(Duration::from_secs(5), || counted([3.0, 2.0, 1.0])),
        "{}",
        get(port, None).body
    );
    drop(clients);
    assert!(
        wait_for(Duration::from_secs(5), || counted([0.0, 0.0, 0.0])),
        "{}",
        get(port, None).body
    );
}

#[test]
fn scrapes_keep_an_idle_daemon_up_and_it_exits_once_they_stop() {
    let (mut p, port) = start("", &[]);
    let admin = p.dir().join("libvirt-admin-sock");
    assert_success(
        &virt_admin_sock(&admin, &["daemon-timeout", "--timeout", "2"]),
        "virt-admin daemon-timeout",
    );
    // Scraped every 0.5 s for 5 s: more than twice the timeout without a client.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert!(p.running(), "exited while being scraped:\n{}", p.log_text());
        assert_eq!(get(port, None).status, "HTTP/1.1 200 OK");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        wait_for(Duration::from_secs(10), || !p.running()),
        "still running 10 s after the last scrape:\n{}",
        p.log_text()
    );
}

#[test]
fn a_unix_socket_endpoint_is_created_0660_and_removed_at_exit() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("metrics-sock");
    let mut p = Proxy::start_with(&format!("metrics_listen = \"{}\"\n", sock.display()), &[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        out.contains(OPENMETRICS) && out.ends_with("# EOF\n"),
        "{out}"
    );
    assert!(p.stop(Duration::from_secs(10)).success());
    assert!(!sock.exists(), "socket file left behind");
}

#[test]
fn a_bad_metrics_address_fails_the_start() {
    let port = free_port();
    // Taken by someone else: the daemon must refuse to start (exit 6), not run without it.
    let _holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("virtproxyd.conf");
    std::fs::write(
        &conf,
        format!(
            "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
             metrics_listen = \"127.0.0.1:{port}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = output_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_virtproxyd"))
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path().join("pid"))
            .stdin(Stdio::null()),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains(&port.to_string()), "{}", stderr(&out));
}

#[test]
fn an_activated_metrics_socket_is_found_by_name_and_wins_over_metrics_listen() {
    let dir = tempfile::tempdir().unwrap();
    let configured = free_port();
    let conf = dir.path().join("virtproxyd.conf");
    std::fs::write(
        &conf,
        format!(
            "auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
             metrics_listen = \"127.0.0.1:{configured}\"\n"
        ),
    )
    .unwrap();
    let rw = dir.path().join("act-rw");
    let port = free_port();
    let log = dir.path().join("proxy.log");
    let log_file = std::fs::File::create(&log).unwrap();
    // systemd-socket-activate binds both, then execs the proxy on the first connection.
    let mut act = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&rw)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--fdname=virtproxyd.socket:virtproxyd-metrics.socket")
        .args([env!("CARGO_BIN_EXE_virtproxyd"), "-v", "-f"])
        .arg(&conf)
        .arg("-p")
        .arg(dir.path().join("pid"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("systemd-socket-activate");
    let mut first = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            first = TcpStream::connect(("127.0.0.1", port)).ok();
            first.is_some()
        }),
        "the activated port never accepted"
    );
    // This connection starts the daemon and is then served by it.
    let mut s = first.unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}\n{text}");
    assert!(out.contains("virtproxyd_clients 0\n"), "{out}");
    assert!(
        text.contains("'metrics_listen' is ignored"),
        "no note that the configured address was ignored:\n{text}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", configured)).is_err(),
        "metrics_listen was bound as well"
    );
    let _ = act.kill();
    let _ = act.wait();
}

// ---- The relay's own counters, with real clients through the modular test bed ----

/// A series' value, 0 when absent (a procedure never called has no series yet).
fn v(body: &str, series: &str) -> f64 {
    value(body, series).unwrap_or(0.0)
}

/// The sum of every sample of `family` whose labels contain all of `having` (e.g. every
/// `virtproxyd_calls_total` sample).
fn sum_of(body: &str, family: &str, having: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(name, _)| {
            name.split('{').next() == Some(family) && having.iter().all(|h| name.contains(h))
        })
        .filter_map(|(_, x)| x.parse::<f64>().ok())
        .sum()
}

/// Calls, errors, latency, stream bytes, events, opens/closes and daemon sockets: a scrape,
/// a workload of known shape through python3-libvirt, a scrape; each delta exact.
fn relay_counts_a_known_workload_exactly(backend: &str) {
    const N: u32 = 25; // getLibVersion calls
    const K: u32 = 3; // lookups of a missing pool (errors)
    const M: u32 = 4; // extra opens/closes
    const SIZE: u64 = 3 * 1024 * 1024 + 12_345; // uploaded stream bytes
    let _shared = support::modular::daemons_shared();
    let port = free_port();
    let p = support::modular::proxy(
        &format!("metrics_listen = \"127.0.0.1:{port}\"\n"),
        &[("VIRTPROXYD_IO_BACKEND", backend)],
    );
    let scrape = || get(port, Some(TEXT)).body;
    // The harness's readiness probes must be adopted and closed before the first scrape.
    // Its last probe is the only one of the ro socket (it tries ro only once rw answered):
    // until that one is in, a slow acceptor can still add a probe after `before`.
    let mut before = scrape();
    assert!(
        wait_for(Duration::from_secs(10), || {
            before = scrape();
            let accepted = sum_of(&before, "virtproxyd_connections_accepted_total", &[]);
            let ro = sum_of(
                &before,
                "virtproxyd_connections_accepted_total",
                &["listener=\"unix_ro\""],
            );
            // A probe adopted and closed while this scrape was read can show in the listener
            // counts but not yet in the worker's (read earlier): wait until they agree.
            ro > 0.0
                && accepted == sum_of(&before, "virtproxyd_connections_closed_total", &[])
                && accepted == sum_of(&before, "virtproxyd_worker_connections_total", &[])
        }),
        "the start-up probes were not counted:\n{before}"
    );
    let pool = pool_dir();
    let out = output_with_timeout(
        &mut py_command(
            "metrics_workload.py",
            &[
                &p.uri("storage:///system"),
                &p.uri("secret:///system"),
                pool.path().to_str().unwrap(),
                &N.to_string(),
                &K.to_string(),
                &M.to_string(),
                &SIZE.to_string(),
            ],
        ),
        Duration::from_secs(150),
    );
    assert_success(&out, "metrics_workload.py");
    let client: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let client_secs: f64 = client["lib_version_s"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_f64())
        .sum();
    let conns = f64::from(M + 2);
    // Closes are seen by the worker after the client's exit: wait for all of them.
    let closed = r#"virtproxyd_connections_closed_total{listener="unix_rw"}"#;
    let mut after = scrape();
    assert!(
        wait_for(Duration::from_secs(10), || {
            after = scrape();
            v(&after, closed) - v(&before, closed) >= conns
        }),
        "closes not counted:\n{after}"
    );
    let d = |series: &str| v(&after, series) - v(&before, series);
    let lib = r#"program="remote",procedure="connect_get_lib_version""#;
    assert_eq!(
        d(&format!("virtproxyd_calls_total{{{lib},result=\"ok\"}}")),
        f64::from(N)
    );
    assert_eq!(
        d(&format!("virtproxyd_calls_total{{{lib},result=\"error\"}}")),
        0.0
    );
    assert_eq!(
        d(
            r#"virtproxyd_calls_total{program="remote",procedure="storage_pool_lookup_by_name",result="error"}"#
        ),
        f64::from(K)
    );
    // Every connection closed once, relayed (CONNECT_CLOSE is an ordinary call).
    assert_eq!(
        d(r#"virtproxyd_calls_total{program="remote",procedure="connect_close",result="ok"}"#),
        conns
    );
    // The histogram counts every call of the procedure, and the proxy's reply times can
    // only be shorter than what the client measured around each call.
    assert_eq!(
        d(&format!("virtproxyd_call_duration_seconds_count{{{lib}}}")),
        f64::from(N)
    );
    assert_eq!(
        d(&format!(
            "virtproxyd_call_duration_seconds_bucket{{{lib},le=\"+Inf\"}}"
        )),
        f64::from(N)
    );
    let proxy_secs = d(&format!("virtproxyd_call_duration_seconds_sum{{{lib}}}"));
    assert!(
        proxy_secs > 0.0 && proxy_secs <= client_secs,
        "proxy {proxy_secs} s, client {client_secs} s"
    );
    // Nothing went untimed, and every reply relayed is a call counted and timed.
    assert_eq!(d("virtproxyd_calls_untimed_total"), 0.0);
    let calls = sum_of(&after, "virtproxyd_calls_total", &[])
        - sum_of(&before, "virtproxyd_calls_total", &[]);
    let timed = sum_of(&after, "virtproxyd_call_duration_seconds_count", &[])
        - sum_of(&before, "virtproxyd_call_duration_seconds_count", &[]);
    assert_eq!(calls, timed);
    let replies = d(r#"virtproxyd_relay_frames_total{direction="daemon_to_client",type="reply"}"#);
    assert_eq!(replies, calls);
    // The stream: exactly the uploaded bytes, client to daemon.
    assert_eq!(
        d(
            r#"virtproxyd_stream_bytes_total{program="remote",procedure="storage_vol_upload",direction="client_to_daemon"}"#
        ),
        SIZE as f64
    );
    assert!(d(r#"virtproxyd_relay_bytes_total{direction="client_to_daemon"}"#) > SIZE as f64);
    // Events: the secret's DEFINED and UNDEFINED.
    assert_eq!(
        d(r#"virtproxyd_events_total{program="remote",procedure="secret_event_lifecycle"}"#),
        2.0
    );
    // Connections: accepted and closed on the rw socket, by the client, each timed.
    assert_eq!(
        d(r#"virtproxyd_connections_accepted_total{listener="unix_rw"}"#),
        conns
    );
    assert_eq!(d(closed), conns);
    // After CONNECT_CLOSE either side may hang up first: the daemon's EOF or the client's.
    let reason = |r: &str| {
        d(&format!(
            "virtproxyd_connections_closed_by_reason_total{{reason=\"{r}\"}}"
        ))
    };
    assert_eq!(reason("client_closed") + reason("daemon_closed"), conns);
    assert_eq!(d("virtproxyd_connection_duration_seconds_count"), conns);
    // Daemon sockets: storage M + 1 times, secret once; all closed again.
    assert_eq!(
        d(r#"virtproxyd_daemon_connects_total{driver="storage"}"#),
        f64::from(M + 1)
    );
    assert_eq!(
        d(r#"virtproxyd_daemon_connects_total{driver="secret"}"#),
        1.0
    );
    assert_eq!(
        v(&after, r#"virtproxyd_daemon_connections{driver="storage"}"#),
        0.0
    );
    assert_eq!(
        d(r#"virtproxyd_daemon_open_duration_seconds_count{driver="storage"}"#),
        f64::from(M + 1)
    );
    // The worker counted its adoptions (one per connection accepted on any listener) and
    // turns.
    let delta = |family: &str| sum_of(&after, family, &[]) - sum_of(&before, family, &[]);
    assert_eq!(
        delta("virtproxyd_worker_connections_total"),
        delta("virtproxyd_connections_accepted_total")
    );
    assert!(delta("virtproxyd_worker_connections_total") >= conns);
    assert!(d(r#"virtproxyd_worker_loop_iterations_total{worker="0"}"#) > 0.0);
    promtool_accepts(&after);
    openmetrics_parser_accepts(&get(port, Some(OPENMETRICS)).body);
}

/// `/clients`: each relayed client's own figures as JSON, one object per client (never
/// labels): a python client that made 20 calls and holds its connection is listed with its
/// uid, at least 20 calls, bytes both ways and its idle time; a second one that made none
/// is listed with 0 calls.
fn clients_page_lists_each_client_with_its_figures(backend: &str) {
    let _shared = support::modular::daemons_shared();
    let port = free_port();
    let p = support::modular::proxy(
        &format!("metrics_listen = \"127.0.0.1:{port}\"\n"),
        &[("VIRTPROXYD_IO_BACKEND", backend)],
    );
    let script = "import libvirt,sys\n\
                  a=libvirt.open(sys.argv[1])\n\
                  b=libvirt.open(sys.argv[1])\n\
                  for _ in range(20): a.getLibVersion()\n\
                  print('ready',flush=True)\n\
                  sys.stdin.readline()\n";
    let (held, line) = Held::start(script, &[&p.uri("qemu:///system")]);
    assert_eq!(line.trim(), "ready");
    let r = get_path(port, "/clients");
    assert_eq!(r.status, "HTTP/1.1 200 OK");
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let doc: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let clients = doc["clients"].as_array().expect("a list");
    let relayed: Vec<&serde_json::Value> = clients
        .iter()
        .filter(|c| c["calls"].is_u64() && c["listener"] == "unix_rw")
        .collect();
    assert_eq!(relayed.len(), 2, "{backend}: {}", r.body);
    let busy = relayed
        .iter()
        .find(|c| c["calls"].as_u64() >= Some(20))
        .unwrap_or_else(|| panic!("{backend}: no client with its 20 calls: {}", r.body));
    assert_eq!(busy["uid"], 0, "{backend}: {}", r.body);
    assert!(
        busy["bytes_to_daemon"].as_u64() > Some(20 * 28),
        "{}",
        r.body
    );
    assert!(
        busy["bytes_to_client"].as_u64() > Some(20 * 28),
        "{}",
        r.body
    );
    assert!(busy["idle_seconds"].as_f64().is_some(), "{}", r.body);
    assert!(
        relayed.iter().any(|c| c["calls"].as_u64() < Some(20)),
        "{backend}: {}",
        r.body
    );
    assert!(held.finish());
}

on_both_backends!(
    clients_page_lists_each_client_with_its_figures,
    relay_counts_a_known_workload_exactly
);

// ---- Rejections, auth refusals, client-info figures and the /clients bound ----

/// A local client of `sock`, run as user vpdtest, that connects and sends nothing; it holds
/// the connection until the proxy closes it or the test drops it.
fn silent_client(sock: &std::path::Path) -> std::process::Child {
    let script = "import socket,sys\n\
                  s=socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  print('connected',flush=True)\n\
                  s.settimeout(60)\n\
                  s.recv(4)\n";
    let mut c = Command::new("runuser")
        .args(["-u", "vpdtest", "--", PYTHON, "-c", script])
        .arg(sock)
        .stdout(Stdio::piped())
        .spawn()
        .expect("runuser");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(c.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "connected");
    c
}

/// `virtproxyd_connections_rejected_total{reason="max_anonymous_clients"}`: with libvirt's
/// polkit auth and one anonymous slot, a silent user holds the slot and a second one waits
/// first in line; N virsh clients of that user then wait behind them, past the pre-open
/// deadline, and are dropped: exactly N rejections of that reason and none of any other.
#[test]
fn clients_that_wait_past_the_deadline_for_an_anonymous_slot_are_counted_as_rejected() {
    const N: usize = 3;
    let _shared = support::modular::daemons_shared();
    let port = free_port();
    let p = support::modular::proxy(
        &format!(
            "{DEFAULT_AUTH}\nmax_anonymous_clients = 1\nmetrics_listen = \"127.0.0.1:{port}\"\n"
        ),
        &[("VIRTPROXYD_PREOPEN_TIMEOUT_MS", "2500")],
    );
    let before = get(port, Some(TEXT)).body;
    // The holder takes the slot; the second waits first in line and takes it at the
    // holder's deadline, so the virsh clients behind it never get in.
    let mut holder = silent_client(&p.ro_sock);
    std::thread::sleep(Duration::from_millis(300));
    let mut first = silent_client(&p.ro_sock);
    std::thread::sleep(Duration::from_millis(300));
    let uri = unix_uri("qemu+unix:///system", &p.ro_sock);
    let waiting: Vec<_> = (0..N)
        .map(|_| {
            Command::new("runuser")
                .args(["-u", "vpdtest", "--", "virsh", "-c", &uri, "version"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("virsh")
        })
        .collect();
    for c in waiting {
        let out = c.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "a waiting virsh got in:\n{}",
            stdout(&out)
        );
    }
    let reason = |body: &str, r: &str| {
        v(
            body,
            &format!("virtproxyd_connections_rejected_total{{reason=\"{r}\"}}"),
        )
    };
    let mut after = get(port, Some(TEXT)).body;
    assert!(
        wait_for(Duration::from_secs(5), || {
            after = get(port, Some(TEXT)).body;
            reason(&after, "max_anonymous_clients") - reason(&before, "max_anonymous_clients")
                >= N as f64
        }),
        "rejections not counted:\n{after}\n{}",
        p.log_text()
    );
    let reasons = [
        "max_clients",
        "max_anonymous_clients",
        "credentials",
        "tls",
        "admin",
        "shutdown",
        "internal",
    ];
    for r in reasons {
        let want = if r == "max_anonymous_clients" { N } else { 0 };
        assert_eq!(
            reason(&after, r) - reason(&before, r),
            want as f64,
            "{r}:\n{after}"
        );
    }
    // The holder and the first in line were taken on by a worker: closes, not rejections.
    assert_eq!(
        sum_of(&after, "virtproxyd_connections_rejected_total", &[]),
        N as f64
    );
    let _ = holder.kill();
    let _ = first.kill();
    let _ = holder.wait();
    let _ = first.wait();
    promtool_accepts(&after);
}

/// SASL on the rw socket: one open with the right password, two with a wrong one (Cyrus
/// refuses), three of a user outside `sasl_allowed_username_list` (the ACL refuses after
/// Cyrus accepted): `virtproxyd_auth_attempts_total{method="sasl"}` grows by 1 ok and 5
/// failed.
#[test]
fn every_sasl_refusal_counts_as_a_failed_attempt() {
    let _shared = support::modular::daemons_shared();
    let dir = tempfile::tempdir().unwrap();
    support::sasl_scram_conf(
        dir.path(),
        &[("barsuser", "barspass"), ("otheruser", "otherpass")],
    );
    let conf_dir = dir.path().display().to_string();
    let port = free_port();
    let p = support::modular::proxy(
        &format!(
            "auth_unix_rw = \"sasl\"\nauth_unix_ro = \"none\"\n\
             sasl_allowed_username_list = [ \"barsuser\" ]\n\
             metrics_listen = \"127.0.0.1:{port}\"\n"
        ),
        &[("SASL_CONF_PATH", &conf_dir)],
    );
    let script = "import sys, libvirt\n\
                  libvirt.registerErrorHandler(lambda *a: None, None)\n\
                  def creds(cred, _):\n\
                  \x20   for c in cred:\n\
                  \x20       c[4] = sys.argv[2] if c[0] == libvirt.VIR_CRED_AUTHNAME else sys.argv[3]\n\
                  \x20   return 0\n\
                  auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], creds, None]\n\
                  try:\n\
                  \x20   c = libvirt.openAuth(sys.argv[1], auth, 0)\n\
                  \x20   print('ok' if c.getLibVersion() > 0 else 'bad')\n\
                  \x20   c.close()\n\
                  except libvirt.libvirtError as e:\n\
                  \x20   print('refused', e.get_error_code())\n";
    let uri = unix_uri("qemu+unix:///system", &p.rw_sock);
    let series =
        |r: &str| format!("virtproxyd_auth_attempts_total{{method=\"sasl\",result=\"{r}\"}}");
    let before = get(port, Some(TEXT)).body;
    let cases = [
        ("barsuser", "barspass", 1, "ok"),
        ("barsuser", "nope", 2, "refused 45"),
        ("otheruser", "otherpass", 3, "refused 45"),
    ];
    for (user, pass, times, want) in cases {
        for _ in 0..times {
            let out = output_with_timeout(
                Command::new(PYTHON)
                    .args(["-c", script, &uri, user, pass])
                    .stdin(Stdio::null()),
                CLIENT_TIMEOUT,
            );
            assert_eq!(stdout(&out).trim(), want, "{user}/{pass}: {}", stderr(&out));
        }
    }
    let after = get(port, Some(TEXT)).body;
    let d = |s: &str| v(&after, s) - v(&before, s);
    assert_eq!(d(&series("ok")), 1.0, "{after}");
    assert_eq!(d(&series("failed")), 5.0, "{after}");
    assert_eq!(
        sum_of(
            &after,
            "virtproxyd_auth_attempts_total",
            &["method=\"polkit\""]
        ),
        0.0
    );
    promtool_accepts(&after);
}

/// virt-admin `client-info` shows the relay's figures for a client, and they are the
/// `/clients` page's: after N getLibVersion calls its calls grow by N and its bytes by N
/// calls of 28 bytes and N replies of 36, and its last activity is the time of the calls.
#[test]
fn client_info_shows_the_relays_figures_for_the_client() {
    const N: u64 = 10;
    let _shared = support::modular::daemons_shared();
    let port = free_port();
    let p = support::modular::proxy(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"), &[]);
    let admin = p.dir().join("libvirt-admin-sock");
    let script = "import libvirt,os,sys\n\
                  c=libvirt.open(sys.argv[1])\n\
                  print('ready',os.getpid(),flush=True)\n\
                  sys.stdin.readline()\n\
                  for _ in range(int(sys.argv[2])): c.getLibVersion()\n\
                  print('done',flush=True)\n\
                  sys.stdin.readline()\n\
                  c.close()\n";
    let (mut held, line) = Held::start(script, &[&p.uri("qemu:///system"), &N.to_string()]);
    let pid = line
        .trim()
        .strip_prefix("ready ")
        .expect("ready <pid>")
        .to_string();
    let clients = clients_via(|a| virt_admin_sock(&admin, a), "virtproxyd");
    let (id, _) = clients
        .iter()
        .find(|(_, info)| info_field(info, "unix_process_id") == Some(pid.as_str()))
        .unwrap_or_else(|| panic!("no client of pid {pid}: {clients:?}"))
        .clone();
    let info = || {
        let out = virt_admin_sock(&admin, &["client-info", "virtproxyd", &id.to_string()]);
        assert_success(&out, "virt-admin client-info");
        stdout(&out)
    };
    let field = |text: &str, k: &str| -> u64 {
        info_field(text, k)
            .unwrap_or_else(|| panic!("no {k} in:\n{text}"))
            .parse()
            .unwrap()
    };
    let b0 = info();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(held.next().trim(), "done");
    let t1 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b1 = info();
    let d = |k: &str| field(&b1, k) - field(&b0, k);
    assert_eq!(d("calls"), N, "{b0}\n{b1}");
    assert_eq!(d("bytes_to_daemon"), N * 28, "{b1}");
    assert_eq!(d("bytes_to_client"), N * 36, "{b1}");
    let last = field(&b1, "last_activity");
    assert!(
        (t0..=t1).contains(&last),
        "{last} not in {t0}..={t1}:\n{b1}"
    );
    // The /clients page has the same figures for it (no call in between).
    let page = get_path(port, "/clients");
    let doc: serde_json::Value = serde_json::from_str(&page.body).expect("JSON");
    let me = doc["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("client {id} not on /clients: {}", page.body));
    for k in [
        "calls",
        "bytes_to_daemon",
        "bytes_to_client",
        "last_activity",
    ] {
        assert_eq!(
            me[k].as_u64(),
            Some(field(&b1, k)),
            "{k}: {}\n{b1}",
            page.body
        );
    }
    println!("client-info after {N} calls:\n{b1}");
    assert!(held.finish());
}

/// A client polling `/clients` as fast as it can for 3 s (2 connections at a time): every
/// answer is valid JSON listing the connected clients, but the relay workers collect their
/// figures at most once per `CLIENTS_PAGE_REUSE` (1 s) each; the rest are reused answers.
#[test]
fn polling_clients_costs_the_relay_workers_a_bounded_amount() {
    let (_p, port) = start("", &[]);
    let _clients: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&_p.rw_sock).unwrap())
        .collect();
    let body = |b: &str, s: &str| v(b, s);
    // The acceptor has them in the registry before the first /clients (connect returns once
    // a client is in the backlog; a page collected before then would be reused for 1 s).
    let mut before = get(port, Some(TEXT)).body;
    assert!(
        wait_for(Duration::from_secs(10), || {
            before = get(port, Some(TEXT)).body;
            body(
                &before,
                r#"virtproxyd_clients_by_listener{listener="unix_rw"}"#,
            ) >= 3.0
        }),
        "{before}"
    );
    let workers = body(&before, "virtproxyd_threadpool_workers");
    let t = Instant::now();
    let flood = Duration::from_secs(3);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while t.elapsed() < flood {
                    let r = get_path(port, "/clients");
                    assert_eq!(r.status, "HTTP/1.1 200 OK");
                    let doc: serde_json::Value = serde_json::from_str(&r.body).expect("valid JSON");
                    assert!(doc["clients"].as_array().is_some_and(|c| c.len() >= 3));
                    n += 1;
                }
                n
            })
        })
        .collect();
    let requests: u64 = threads.into_iter().map(|h| h.join().unwrap()).sum();
    let elapsed = t.elapsed();
    let after = get(port, Some(TEXT)).body;
    let d = |s: &str| body(&after, s) - body(&before, s);
    let collected = d(r#"virtproxyd_metrics_clients_pages_total{answer="collected"}"#);
    let reused = d(r#"virtproxyd_metrics_clients_pages_total{answer="reused"}"#);
    let collections = d("virtproxyd_client_stats_collections_total");
    println!(
        "{requests} /clients requests in {elapsed:?}: {collected} collected, {reused} reused; \
         {collections} worker collections ({workers} workers)"
    );
    assert_eq!(collected + reused, requests as f64, "{after}");
    // One collection per second of flood, plus the first.
    let bound = elapsed.as_secs_f64().ceil() + 1.0;
    assert!(
        collected >= 1.0 && collected <= bound,
        "{collected} collections in {elapsed:?}"
    );
    assert!(
        collections >= collected && collections <= workers * bound,
        "{collections} worker collections, bound {}",
        workers * bound
    );
    assert!(reused > 0.0 && requests > 10, "{requests} requests");
    promtool_accepts(&after);
}

/// `virtproxyd_connections_rejected_total{reason="tls"}`: N virsh clients over TLS with a
/// certificate of a CA the proxy does not trust never get past the handshake thread: tls +N,
/// and no TLS connection reaches a relay worker.
#[test]
fn tls_clients_refused_at_the_handshake_are_counted_as_rejected() {
    const N: usize = 2;
    use support::pki::{client_dir, Ca};
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("Test CA");
    let (cert, key) = ca.server(false);
    std::fs::write(d.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(d.join("server.pem"), cert).unwrap();
    std::fs::write(d.join("server.key"), key).unwrap();
    let stranger = Ca::new("Other CA");
    // Its certificate is signed by a CA the proxy does not know; it trusts both CAs (libvirt's
    // client checks its own certificate against its CA file before it connects).
    let pki = client_dir(d, "stranger", &stranger, &stranger.client("client1", 7));
    std::fs::write(
        pki.join("cacert.pem"),
        format!("{}{}", ca.cert_pem, stranger.cert_pem),
    )
    .unwrap();
    let tls_port = free_port();
    let (p, port) = start(
        &format!(
            "listen_tls = 1\nlisten_addr = \"127.0.0.1\"\ntls_port = \"{tls_port}\"\n\
             ca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\n",
            d = d.display()
        ),
        &[],
    );
    let before = get(port, Some(TEXT)).body;
    let uri = format!(
        "test+tls://localhost:{tls_port}/default?pkipath={}",
        pki.display()
    );
    for _ in 0..N {
        let out = virsh(&uri, &["version"]);
        assert!(
            !out.status.success(),
            "a stranger got in:\n{}",
            stdout(&out)
        );
    }
    let tls = r#"virtproxyd_connections_rejected_total{reason="tls"}"#;
    let mut after = before.clone();
    assert!(
        wait_for(Duration::from_secs(5), || {
            after = get(port, Some(TEXT)).body;
            v(&after, tls) - v(&before, tls) >= N as f64
        }),
        "not counted:\n{after}\n{}",
        p.log_text()
    );
    let d = |s: &str| v(&after, s) - v(&before, s);
    assert_eq!(d(tls), N as f64, "{after}");
    assert_eq!(
        sum_of(&after, "virtproxyd_connections_rejected_total", &[])
            - sum_of(&before, "virtproxyd_connections_rejected_total", &[]),
        N as f64
    );
    assert_eq!(
        d(r#"virtproxyd_connections_accepted_total{listener="tls"}"#),
        0.0
    );
    promtool_accepts(&after);
}
