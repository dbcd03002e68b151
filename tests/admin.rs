//! The admin server: real `virt-admin` against ours and, where the answers must match, the
//! same commands against libvirt 9.0.0's own virtproxyd from the modular test bed.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::modular::{proxies, proxy, testbed};
use support::pki::{client_dir, Ca};
use support::*;

fn admin_sock(p: &Proxy) -> PathBuf {
    p.dir().join("libvirt-admin-sock")
}

fn ours(p: &Proxy, args: &[&str]) -> Output {
    virt_admin_sock(&admin_sock(p), args)
}

fn theirs(args: &[&str]) -> Output {
    testbed().virt_admin("virtproxyd", args)
}

/// Tests that connect clients to libvirt's virtproxyd hold this, so its client counts are
/// theirs alone.
fn libvirt_clients() -> std::sync::MutexGuard<'static, ()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

fn ok(o: &Output, what: &str) -> String {
    assert_success(o, what);
    stdout(o)
}

/// `key : value` lines of virt-admin's typed-parameter output.
fn field(text: &str, key: &str) -> Option<String> {
    info_field(text, key).map(str::to_string)
}

/// A python client (tests/py/admin_client.py) run as vpdtest, holding its connection open.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    pid: String,
    _dir: tempfile::TempDir,
}

impl Client {
    fn start(uri: &str) -> Client {
        Client::start_with(uri, &[])
    }

    /// `extra`: `["ro"]` opens read-only (VIR_CONNECT_RO).
    fn start_with(uri: &str, extra: &[&str]) -> Client {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["admin_client.py", "_common.py"] {
            std::fs::copy(py_script(f), dir.path().join(f)).unwrap();
        }
        let mut child = Command::new("runuser")
            .args(["-u", "vpdtest", "--", "/usr/bin/python3"])
            .arg(dir.path().join("admin_client.py"))
            .arg(uri)
            .args(extra)
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut c = Client {
            child,
            stdin,
            out,
            pid: String::new(),
            _dir: dir,
        };
        c.pid = c.line().strip_prefix("pid ").expect("pid line").to_string();
        assert_eq!(c.line(), "open", "client did not open {uri}");
        c
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim().to_string()
    }

    /// Makes one call; "ok" or "err <code>".
    fn call(&mut self) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"call\n").unwrap();
        stdin.flush().unwrap();
        self.line()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// The `virtproxyd` server's clients as `(id, client-info)`, through `va`.
fn clients(va: &dyn Fn(&[&str]) -> Output) -> Vec<(u64, String)> {
    let list = ok(&va(&["srv-clients-list", "virtproxyd"]), "srv-clients-list");
    list.lines()
        .filter_map(|l| l.split_whitespace().next().and_then(|w| w.parse().ok()))
        .filter_map(|id: u64| {
            let info = va(&["client-info", "virtproxyd", &id.to_string()]);
            info.status.success().then(|| (id, stdout(&info)))
        })
        .collect()
}

fn client_with_pid(va: &dyn Fn(&[&str]) -> Output, pid: &str) -> (u64, String) {
    clients(va)
        .into_iter()
        .find(|(_, i)| field(i, "unix_process_id").as_deref() == Some(pid))
        .unwrap_or_else(|| panic!("no client with pid {pid}"))
}

fn keys(info: &str) -> Vec<String> {
    info.lines()
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.trim().to_string()))
        .filter(|k| !k.is_empty())
        .collect()
}

#[test]
fn servers_are_listed_and_looked_up_as_libvirts_virtproxyd() {
    let _daemons = support::modular::daemons_shared();
    let p = proxy("", &[]);
    // libvirt lists its servers in the order of a hash table with a per-run random seed
    // (util/virhash.c), so only the set of names can match.
    let names = |text: &str| {
        let mut n: Vec<String> = text
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        n.sort();
        n
    };
    let mine = ok(&ours(&p, &["srv-list"]), "srv-list (ours)");
    let reference = ok(&theirs(&["srv-list"]), "srv-list (libvirt)");
    assert_eq!(names(&mine), names(&reference));
    assert_eq!(names(&mine), ["admin", "virtproxyd"], "{mine}");
    // An unknown server: same error text from both.
    let a = ours(&p, &["srv-threadpool-info", "nope"]);
    let b = theirs(&["srv-threadpool-info", "nope"]);
    assert!(!a.status.success());
    assert_eq!(stderr(&a), stderr(&b));
    // The threadpool is reported with libvirt's parameter names.
    let tp = ok(
        &ours(&p, &["srv-threadpool-info", "virtproxyd"]),
        "threadpool",
    );
    let tp_ref = ok(
        &theirs(&["srv-threadpool-info", "virtproxyd"]),
        "threadpool",
    );
    assert_eq!(keys(&tp), keys(&tp_ref));
    let v = ok(&ours(&p, &["version"]), "version");
    assert!(v.contains("Running against daemon: 9.0.0"), "{v}");
}

/// Two non-root clients: counts, client-info, then one is disconnected (its next call fails,
/// the other keeps working) — on ours (both backends) and on libvirt's virtproxyd.
#[test]
fn two_clients_counted_described_and_one_disconnected() {
    let _daemons = support::modular::daemons_shared();
    let _clients = libvirt_clients();
    let tb = testbed();
    let vpdtest_uid = stdout(&Command::new("id").args(["-u", "vpdtest"]).output().unwrap())
        .trim()
        .to_string();

    // libvirt's virtproxyd first: the reference.
    let uri_ref = unix_uri("qemu:///system", &tb.libvirt_proxy_rw());
    let va_ref = |a: &[&str]| theirs(a);
    let before_ref = field(
        &ok(&theirs(&["srv-clients-info", "virtproxyd"]), "info"),
        "nclients",
    )
    .unwrap();
    let mut c1 = Client::start(&uri_ref);
    let mut c2 = Client::start(&uri_ref);
    let info_ref = ok(&theirs(&["srv-clients-info", "virtproxyd"]), "info");
    let n_ref: u32 = field(&info_ref, "nclients").unwrap().parse().unwrap();
    assert_eq!(n_ref, before_ref.parse::<u32>().unwrap() + 2);
    let (id1, ci_ref) = client_with_pid(&va_ref, &c1.pid);
    assert_eq!(field(&ci_ref, "unix_user_id"), Some(vpdtest_uid.clone()));
    ok(
        &theirs(&["client-disconnect", "virtproxyd", &id1.to_string()]),
        "disconnect",
    );
    let after_ref = (c1.call(), c2.call());
    assert!(after_ref.0.starts_with("err"), "{after_ref:?}");
    assert_eq!(after_ref.1, "ok");
    drop((c1, c2));

    for (backend, p) in proxies("") {
        let va = |a: &[&str]| ours(&p, a);
        let uri = p.uri("qemu:///system");
        let mut c1 = Client::start(&uri);
        let mut c2 = Client::start(&uri);
        let info = ok(&ours(&p, &["srv-clients-info", "virtproxyd"]), "info");
        assert_eq!(
            field(&info, "nclients").as_deref(),
            Some("2"),
            "{backend}: {info}"
        );
        assert_eq!(
            keys(&info),
            keys(&info_ref),
            "{backend}: srv-clients-info fields"
        );
        let (id1, ci) = client_with_pid(&va, &c1.pid);
        assert_eq!(
            field(&ci, "unix_user_id"),
            Some(vpdtest_uid.clone()),
            "{backend}"
        );
        assert_eq!(
            field(&ci, "unix_process_id"),
            Some(c1.pid.clone()),
            "{backend}"
        );
        assert_eq!(
            keys(&ci),
            keys(&ci_ref),
            "{backend}: client-info fields\n{ci}\n{ci_ref}"
        );
        assert_eq!(field(&ci, "readonly"), field(&ci_ref, "readonly"));
        let list = ok(&ours(&p, &["srv-clients-list", "virtproxyd"]), "list");
        assert!(list.contains("unix"), "{backend}: {list}");

        ok(
            &ours(&p, &["client-disconnect", "virtproxyd", &id1.to_string()]),
            "disconnect",
        );
        let after = (c1.call(), c2.call());
        assert_eq!(
            (after.0.starts_with("err"), after.1.as_str()),
            (after_ref.0.starts_with("err"), "ok"),
            "{backend}: {after:?} vs libvirt's {after_ref:?}"
        );
        assert_eq!(
            after.0, after_ref.0,
            "{backend}: error code of the next call"
        );
        assert!(wait_for(Duration::from_secs(5), || {
            field(
                &ok(&ours(&p, &["srv-clients-info", "virtproxyd"]), "info"),
                "nclients",
            )
            .as_deref()
                == Some("1")
        }));
        assert!(
            p.log_text().contains("disconnected by an admin request"),
            "{backend}: {}",
            p.log_text()
        );
        // An unknown id: same error as libvirt's.
        let a = ours(&p, &["client-disconnect", "virtproxyd", "999999"]);
        let b = theirs(&["client-disconnect", "virtproxyd", "999999"]);
        assert_eq!(stderr(&a), stderr(&b), "{backend}");
    }
}

/// A client that opens with VIR_CONNECT_RO on the read-write socket is read-only in
/// client-info, as libvirt's remoteDispatchConnectOpen makes it.
#[test]
fn client_opened_read_only_on_the_rw_socket_is_reported_read_only() {
    let _daemons = support::modular::daemons_shared();
    let _clients = libvirt_clients();
    let tb = testbed();
    let va_ref = |a: &[&str]| theirs(a);
    let uri_ref = unix_uri("qemu:///system", &tb.libvirt_proxy_rw());
    let (ro_ref, rw_ref) = {
        let ro = Client::start_with(&uri_ref, &["ro"]);
        let rw = Client::start(&uri_ref);
        (
            field(&client_with_pid(&va_ref, &ro.pid).1, "readonly"),
            field(&client_with_pid(&va_ref, &rw.pid).1, "readonly"),
        )
    };
    assert_eq!(
        (ro_ref.as_deref(), rw_ref.as_deref()),
        (Some("yes"), Some("no"))
    );
    for (backend, p) in proxies("") {
        let va = |a: &[&str]| ours(&p, a);
        let uri = p.uri("qemu:///system");
        let ro = Client::start_with(&uri, &["ro"]);
        let rw = Client::start(&uri);
        assert_eq!(
            field(&client_with_pid(&va, &ro.pid).1, "readonly"),
            ro_ref,
            "{backend}: read-only open"
        );
        assert_eq!(
            field(&client_with_pid(&va, &rw.pid).1, "readonly"),
            rw_ref,
            "{backend}: read-write open"
        );
    }
}

#[test]
fn max_clients_is_set_live() {
    let _daemons = support::modular::daemons_shared();
    let _clients = libvirt_clients();
    let set_limits = [
        "srv-clients-set",
        "virtproxyd",
        "--max-unauth-clients",
        "0",
        "--max-clients",
        "1",
    ];
    // libvirt's answers first; its limits are put back before anything is asserted.
    let orig = ok(
        &theirs(&["srv-clients-info", "virtproxyd"]),
        "info (libvirt)",
    );
    let refused_ref = theirs(&["srv-clients-set", "virtproxyd", "--max-clients", "5"]);
    let set_ref = theirs(&set_limits);
    let info_ref = ok(
        &theirs(&["srv-clients-info", "virtproxyd"]),
        "info (libvirt)",
    );
    let restore_ref = theirs(&[
        "srv-clients-set",
        "virtproxyd",
        "--max-clients",
        &field(&orig, "nclients_max").unwrap(),
        "--max-unauth-clients",
        &field(&orig, "nclients_unauth_max").unwrap(),
    ]);
    assert_success(&set_ref, "srv-clients-set (libvirt)");
    assert_success(&restore_ref, "restore (libvirt)");

    for (backend, p) in proxies("") {
        // A maximum below the unauthenticated maximum: libvirt's refusal, word for word.
        let a = ours(&p, &["srv-clients-set", "virtproxyd", "--max-clients", "5"]);
        assert!(!a.status.success());
        assert_eq!(stderr(&a), stderr(&refused_ref), "{backend}");

        ok(&ours(&p, &set_limits), "srv-clients-set");
        let info = ok(&ours(&p, &["srv-clients-info", "virtproxyd"]), "info");
        assert_eq!(info, info_ref, "{backend}");
        assert_eq!(field(&info, "nclients_max").as_deref(), Some("1"), "{info}");

        // One client holds the only place; a second is not accepted until the limit is raised.
        let uri = p.uri("qemu:///system");
        let _c1 = Client::start(&uri);
        let mut second = virsh_uri(&uri);
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            second.try_wait().unwrap().is_none(),
            "{backend}: second client was served at the limit"
        );
        raise_limit_and_see_served(&p, &mut second, backend);
    }
}

/// `virsh uri` through `uri`, started (it may wait on the client limit).
fn virsh_uri(uri: &str) -> Child {
    Command::new("virsh")
        .args(["-c", uri, "uri"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Raises `max_clients` to 5000; `waiting` must then be served and succeed within 20 s.
fn raise_limit_and_see_served(p: &Proxy, waiting: &mut Child, backend: &str) {
    ok(
        &ours(
            p,
            &["srv-clients-set", "virtproxyd", "--max-clients", "5000"],
        ),
        "raise",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = waiting.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{backend}: second client still waiting"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{backend}");
}

/// `--max-clients 0` stops accepting, as libvirt's virNetServerCheckLimits (`nclients >=
/// nclients_max`) does; clients already in keep working, and raising it lets the next in.
#[test]
fn max_clients_zero_stops_accepting() {
    let _daemons = support::modular::daemons_shared();
    for (backend, p) in proxies("") {
        let uri = p.uri("qemu:///system");
        let mut c1 = Client::start(&uri);
        ok(
            &ours(
                &p,
                &[
                    "srv-clients-set",
                    "virtproxyd",
                    "--max-unauth-clients",
                    "0",
                    "--max-clients",
                    "0",
                ],
            ),
            "srv-clients-set 0",
        );
        let mut second = virsh_uri(&uri);
        std::thread::sleep(Duration::from_secs(2));
        let early = second.try_wait().unwrap();
        if early.is_some() {
            let o = second.wait_with_output().unwrap();
            panic!(
                "{backend}: a client was served with max_clients 0: {o:?}\n{}",
                p.log_text()
            );
        }
        assert_eq!(c1.call(), "ok", "{backend}: the client already in");
        raise_limit_and_see_served(&p, &mut second, backend);
    }
}

#[test]
fn log_filters_and_outputs_are_set_and_read_back() {
    let _daemons = support::modular::daemons_shared();
    let p = proxy("", &[]);
    let old_ref = ok(&theirs(&["daemon-log-filters"]), "filters (libvirt)");
    ok(
        &ours(&p, &["daemon-log-filters", "1:rpc 3:util"]),
        "set filters",
    );
    ok(
        &theirs(&["daemon-log-filters", "1:rpc 3:util"]),
        "set filters (libvirt)",
    );
    let mine = ok(&ours(&p, &["daemon-log-filters"]), "filters");
    let reference = ok(&theirs(&["daemon-log-filters"]), "filters (libvirt)");
    // Put libvirt's filters back before asserting.
    let restore = old_ref
        .split_once(':')
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    ok(
        &theirs(&["daemon-log-filters", &restore]),
        "restore filters (libvirt)",
    );
    assert_eq!(mine, reference);
    assert!(mine.contains("1:*rpc* 3:*util* "), "{mine:?}");

    // A malformed filter: libvirt's error.
    let a = ours(&p, &["daemon-log-filters", "x"]);
    let b = theirs(&["daemon-log-filters", "x"]);
    assert!(!a.status.success());
    assert_eq!(stderr(&a), stderr(&b));

    // A file output receives debug lines after one call through the proxy.
    let log = p.dir().join("admin-debug.log");
    // Debug from the data path and the handshake; the level stays at warning elsewhere.
    ok(
        &ours(&p, &["daemon-log-filters", "1:rpc 1:remote"]),
        "debug filters",
    );
    let spec = format!("1:file:{}", log.display());
    ok(&ours(&p, &["daemon-log-outputs", &spec]), "set outputs");
    let outs = ok(&ours(&p, &["daemon-log-outputs"]), "outputs");
    assert!(outs.contains(&spec), "{outs}");
    let o = virsh(&p.uri("qemu:///system"), &["uri"]);
    assert_success(&o, "virsh uri");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(": debug : "),
        "no debug lines in {}:\n{text}",
        log.display()
    );

    // Outputs read back as libvirt prints them (a later duplicate destination replaces the
    // earlier one); libvirt's outputs are put back before asserting.
    let old_ref = ok(&theirs(&["daemon-log-outputs"]), "outputs (libvirt)");
    let lv_log = p.dir().join("libvirt-admin-test.log");
    let spec = format!("3:stderr 1:file:{} 4:stderr", lv_log.display());
    ok(&ours(&p, &["daemon-log-outputs", &spec]), "set outputs");
    let set_ref = theirs(&["daemon-log-outputs", &spec]);
    let mine = ok(&ours(&p, &["daemon-log-outputs"]), "outputs");
    let reference = ok(&theirs(&["daemon-log-outputs"]), "outputs (libvirt)");
    let restore = old_ref
        .split_once(':')
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    ok(
        &theirs(&["daemon-log-outputs", &restore]),
        "restore outputs (libvirt)",
    );
    assert_success(&set_ref, "set outputs (libvirt)");
    assert_eq!(mine, reference);
    assert!(
        mine.contains(&format!("1:file:{} 4:stderr", lv_log.display())),
        "{mine}"
    );
    let bad_a = ours(&p, &["daemon-log-outputs", "9:bogus"]);
    let bad_b = theirs(&["daemon-log-outputs", "9:bogus"]);
    assert!(!bad_a.status.success());
    assert_eq!(stderr(&bad_a), stderr(&bad_b));
}

#[test]
fn a_client_of_another_uid_is_refused() {
    let _daemons = support::modular::daemons_shared();
    let p = proxy("unix_sock_admin_perms = \"0777\"\n", &[]);
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "vpdtest", "--", "virt-admin", "-c"])
        .arg(format!(
            "libvirtd:///system?socket={}",
            admin_sock(&p).display()
        ))
        .arg("srv-list")
        .stdin(Stdio::null());
    let o = output_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        wait_for(Duration::from_secs(5), || p
            .log_text()
            .contains("Disallowing client")),
        "{}",
        p.log_text()
    );
    // Root still gets in.
    ok(&ours(&p, &["srv-list"]), "srv-list as root");
}

#[test]
fn daemon_timeout_makes_an_idle_daemon_exit() {
    let _daemons = support::modular::daemons_shared();
    let mut p = proxy("", &[]);
    let uri = p.uri("qemu:///system");
    let c = Client::start(&uri);
    ok(
        &ours(&p, &["daemon-timeout", "--timeout", "1"]),
        "daemon-timeout",
    );
    // Not while a client is connected.
    std::thread::sleep(Duration::from_secs(2));
    assert!(p.running(), "exited with a client connected");
    drop(c);
    assert!(
        wait_for(Duration::from_secs(10), || !p.running()),
        "still running: {}",
        p.log_text()
    );
}

fn server_files(dir: &Path, ca: &Ca) -> String {
    let (cert, key) = ca.server(false);
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    format!(
        "ca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\n",
        d = dir.display()
    )
}

#[test]
fn srv_update_tls_picks_up_a_new_certificate() {
    let files = tempfile::tempdir().unwrap();
    let old = Ca::new("Old CA");
    let new = Ca::new("New CA");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = format!(
        "listen_tls = 1\nlisten_addr = \"127.0.0.1\"\ntls_port = \"{port}\"\n{}",
        server_files(files.path(), &old)
    );
    let p = Proxy::start(daemon(), &conf, &[]);
    let pki = client_dir(files.path(), "newclient", &new, &new.client("client1", 5));
    let uri = format!(
        "test+tls://localhost:{port}/default?pkipath={}",
        pki.display()
    );
    let before = virsh(&uri, &["uri"]);
    assert!(
        !before.status.success(),
        "a client of the new CA got in early"
    );
    server_files(files.path(), &new);
    // Not on SIGHUP here: only the admin call re-reads the files.
    let a = ours(&p, &["srv-update-tls", "admin"]);
    assert!(
        stderr(&a).contains("no tls service found"),
        "{}",
        stderr(&a)
    );
    ok(
        &ours(&p, &["srv-update-tls", "virtproxyd"]),
        "srv-update-tls",
    );
    let after = virsh(&uri, &["uri"]);
    assert_success(&after, "virsh over TLS after srv-update-tls");

    // A TLS client as client-info describes it: address and certificate DN, no UNIX fields.
    let mut child = py_command("identity.py", &[&uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..2 {
        line.clear();
        out.read_line(&mut line).unwrap();
    }
    assert!(line.starts_with("open uid="), "{line}");
    let all = clients(&|a: &[&str]| ours(&p, a));
    drop(child.stdin.take());
    let _ = child.wait();
    let (_, info) = all.first().expect("the TLS client");
    assert_eq!(field(info, "transport").as_deref(), Some("tls"), "{info}");
    assert!(
        field(info, "sock_addr").is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{info}"
    );
    assert!(
        field(info, "tls_x509_dname").is_some_and(|d| d.contains("client1")),
        "{info}"
    );
    assert_eq!(field(info, "unix_user_id"), None, "{info}");
}

/// client-disconnect of a TLS client still in its handshake (it never sends a ClientHello)
/// closes it: the peer sees EOF and the client leaves srv-clients-list.
#[test]
fn client_disconnect_closes_a_client_in_its_tls_handshake() {
    use std::io::Read;
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("Handshake CA");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = format!(
        "listen_tls = 1\nlisten_addr = \"127.0.0.1\"\ntls_port = \"{port}\"\n{}",
        server_files(files.path(), &ca)
    );
    let p = Proxy::start(daemon(), &conf, &[]);
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let tls_ids = || -> Vec<u64> {
        let list = ok(&ours(&p, &["srv-clients-list", "virtproxyd"]), "list");
        list.lines()
            .filter(|l| l.contains("tls"))
            .filter_map(|l| l.split_whitespace().next().and_then(|w| w.parse().ok()))
            .collect()
    };
    let mut ids = Vec::new();
    assert!(
        wait_for(Duration::from_secs(5), || {
            ids = tls_ids();
            !ids.is_empty()
        }),
        "the handshaking client is not listed"
    );
    ok(
        &ours(
            &p,
            &["client-disconnect", "virtproxyd", &ids[0].to_string()],
        ),
        "client-disconnect",
    );
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 16];
    let n = silent.read(&mut b);
    assert!(
        matches!(n, Ok(0))
            || n.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client was not closed: {n:?}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || tls_ids().is_empty()),
        "the client is still listed"
    );
}

#[test]
fn srv_update_tls_without_tls_fails_as_libvirt() {
    let _daemons = support::modular::daemons_shared();
    let p = proxy("", &[]);
    let a = ours(&p, &["srv-update-tls", "virtproxyd"]);
    let b = theirs(&["srv-update-tls", "virtproxyd"]);
    assert!(!a.status.success());
    assert_eq!(stderr(&a), stderr(&b));
}

/// A client that sets its own identity (CONNECT_SET_IDENTITY claiming root) is described by
/// what it set, as libvirt's virtproxyd describes it (the daemon behind never sees the claim).
fn claimed_client_info(uri: &str, va: &dyn Fn(&[&str]) -> Output) -> String {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["identity.py", "_common.py"] {
        std::fs::copy(py_script(f), dir.path().join(f)).unwrap();
    }
    let mut child = Command::new("runuser")
        .args(["-u", "vpdtest", "--", "/usr/bin/python3"])
        .arg(dir.path().join("identity.py"))
        .args([uri, "60", "claim-root"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut next = || {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    let _pid = next();
    assert!(next().starts_with("open uid="));
    assert_eq!(next(), "claimed rc=0");
    // The claim carries no pid: the client without one is ours.
    let info = clients(va)
        .into_iter()
        .map(|(_, i)| i)
        .find(|i| field(i, "unix_process_id").is_none())
        .expect("the claiming client");
    drop(child.stdin.take());
    let _ = child.wait();
    info
}

#[test]
fn client_info_shows_the_identity_a_client_set() {
    let _daemons = support::modular::daemons_shared();
    let _clients = libvirt_clients();
    let tb = testbed();
    let reference = claimed_client_info(
        &unix_uri("qemu:///system", &tb.libvirt_proxy_rw()),
        &|a: &[&str]| theirs(a),
    );
    for (backend, p) in proxies("") {
        let mine = claimed_client_info(&p.uri("qemu:///system"), &|a: &[&str]| ours(&p, a));
        // Everything but the id and the connect time.
        let strip = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with("id ") && !l.starts_with("connection_time"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(strip(&mine), strip(&reference), "{backend}");
        assert_eq!(field(&mine, "unix_user_id").as_deref(), Some("0"));
    }
}
