//! Other real clients through the proxy, in front of libvirt 9.0.0's modular daemons
//! (`scripts/modular-testbed.sh`, through `support::modular`): go-libvirt, a second
//! implementation of the RPC protocol (`tests/go/golibvirt-workload`), and virsh over
//! `qemu+ssh://` with `proxy=netcat` through a private sshd (`scripts/sshd-testbed.sh`), the
//! way an ssh client reaches virtproxyd on a modular host. Each runs on both io backends.
//! The sshd and the Go program are set up once per test binary and stopped when it exits
//! (`--watch-pid`).

mod support;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use support::modular::{testbed, Testbed};
use support::{golibvirt_bin, output_with_timeout, wait_for, Proxy, MANIFEST_DIR};

fn root() -> &'static Path {
    Path::new(MANIFEST_DIR)
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The clients share one test bed, and the comparisons below (virsh through ssh against
/// virsh direct) need no other client changing its state meanwhile.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A short per-run state dir (the sshd's socket paths must stay under 108 bytes).
fn state_dir(what: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/vpd-cl-{}-{what}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The private sshd: its port and the URI parameters that make virsh use its key.
struct Sshd {
    port: u16,
    uri_params: String,
}

fn sshd() -> &'static Sshd {
    static S: OnceLock<Sshd> = OnceLock::new();
    S.get_or_init(|| {
        let o = Command::new("bash")
            .arg(root().join("scripts/sshd-testbed.sh"))
            .arg("start")
            .arg(state_dir("ssh"))
            .args(["--watch-pid", &std::process::id().to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "sshd-testbed: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let get = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {out}"))
                .to_string()
        };
        Sshd {
            port: get("PORT=").parse().unwrap(),
            uri_params: get("URI_PARAMS="),
        }
    })
}

/// Our proxy in front of the test bed, on one io backend, with `extra` config lines first
/// (they win); auth "none" on the UNIX sockets (support's default): go-libvirt opens
/// without AUTH_LIST.
fn proxy(backend: &str, extra: &str) -> Proxy {
    support::modular::proxy(extra, &[("VIRTPROXYD_IO_BACKEND", backend)])
}

/// Runs a client with stdin closed, killing it when `limit` passes.
fn run_with_deadline(cmd: &mut Command, limit: Duration) -> Output {
    output_with_timeout(cmd.stdin(Stdio::null()), limit)
}

fn virsh(uri: &str, args: &[&str]) -> Output {
    run_with_deadline(
        Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(uri)
            .args(args),
        Duration::from_secs(60),
    )
}

fn direct_uri(tb: &Testbed) -> String {
    tb.direct_uri("qemu:///system", "virtqemud")
}

// ---------------------------------------------------------------------------------------
// go-libvirt

fn golibvirt(sock: &Path) -> (serde_json::Value, Output) {
    let pool = tempfile::Builder::new()
        .prefix("vpd-cl-pool-")
        .tempdir_in("/tmp")
        .unwrap();
    let o = run_with_deadline(
        Command::new(golibvirt_bin())
            .arg("-socket")
            .arg(sock)
            .arg("-pool-dir")
            .arg(pool.path())
            .args(["-mib", "10", "-timeout", "90s"]),
        Duration::from_secs(120),
    );
    let line = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let v = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("no JSON from golibvirt-workload ({e}): {}", text(&o)));
    (v, o)
}

fn golibvirt_through_proxy(backend: &str) {
    let _g = serial();
    let tb = testbed();
    let proxy = proxy(backend, "");
    let before = proxy.relayed("qemu:///system");
    let (v, o) = golibvirt(&proxy.rw_sock);
    assert!(
        o.status.success() && v["ok"] == true,
        "{backend}: {}\nproxy log:\n{}",
        text(&o),
        proxy.log_text()
    );
    assert_eq!(v["uri"], "qemu:///system");
    assert_eq!(v["lib_version"], 9_000_000, "{v}");
    assert_eq!(v["domain_defined"], true, "{v}");
    assert_eq!(
        v["events"],
        serde_json::json!(["defined", "undefined"]),
        "{v}"
    );
    assert_eq!(v["stream_bytes"], 10 << 20, "{v}");
    assert_eq!(v["stream_match"], true, "{v}");
    assert_eq!(v["upload_sha256"], v["download_sha256"], "{v}");
    assert_eq!(v["pipelined_ok"], 8, "{v}");
    // Same host, same lists as a libvirt.so client sees directly at virtqemud.
    let host = virsh(&direct_uri(tb), &["hostname"]);
    assert!(host.status.success(), "{}", text(&host));
    assert_eq!(
        v["hostname"],
        String::from_utf8_lossy(&host.stdout).trim(),
        "{v}"
    );
    let nets = virsh(&direct_uri(tb), &["net-list", "--all", "--name"]);
    let mut want: Vec<String> = String::from_utf8_lossy(&nets.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut got: Vec<String> = serde_json::from_value(v["networks"].clone()).unwrap();
    want.sort();
    got.sort();
    assert_eq!(got, want, "networks");
    // It really went through this proxy (and the open reached virtqemud).
    assert_eq!(
        proxy.relayed("qemu:///system"),
        before + 1,
        "{}",
        proxy.log_text()
    );
}

#[test]
fn golibvirt_workload_through_proxy_io_uring() {
    golibvirt_through_proxy("io_uring");
}

#[test]
fn golibvirt_workload_through_proxy_epoll() {
    golibvirt_through_proxy("epoll");
}

/// go-libvirt over the proxy's plain TCP listener: its 4 MiB stream frames leave a 4 KiB
/// write buffer, so they arrive as many small TCP segments (the shape that stalled the
/// splice relay when full pipe slots were taken for a drained socket), and go-libvirt has no
/// keepalive to wake a stalled relay. 64 MiB each way must arrive intact.
fn golibvirt_over_tcp(backend: &str) {
    let _g = serial();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = proxy(
        backend,
        &format!("listen_tcp = 1\nlisten_addr = \"127.0.0.1\"\ntcp_port = \"{port}\"\nauth_tcp = \"none\""),
    );
    let up = wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "{backend}: no TCP listener: {}", proxy.log_text());
    let pool = tempfile::Builder::new()
        .prefix("vpd-cl-pool-")
        .tempdir_in("/tmp")
        .unwrap();
    let o = run_with_deadline(
        Command::new(golibvirt_bin())
            .args(["-tcp-port", &port.to_string(), "-pool-dir"])
            .arg(pool.path())
            .args(["-mib", "64", "-timeout", "120s"]),
        Duration::from_secs(150),
    );
    let line = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("no JSON from golibvirt-workload ({e}): {}", text(&o)));
    assert!(
        o.status.success() && v["ok"] == true,
        "{backend}: {}\nproxy log:\n{}",
        text(&o),
        proxy.log_text()
    );
    assert_eq!(v["stream_bytes"], 64 << 20, "{v}");
    assert_eq!(v["stream_match"], true, "{v}");
    assert_eq!(v["pipelined_ok"], 8, "{v}");
}

#[test]
fn golibvirt_over_tcp_streams_4_mib_frames_io_uring() {
    golibvirt_over_tcp("io_uring");
}

#[test]
fn golibvirt_over_tcp_streams_4_mib_frames_epoll() {
    golibvirt_over_tcp("epoll");
}

// ---------------------------------------------------------------------------------------
// virsh over qemu+ssh with proxy=netcat

fn ssh_uri(s: &Sshd, proxy_sock: &Path) -> String {
    format!(
        "qemu+ssh://root@127.0.0.1:{}/system?socket={}&proxy=netcat&{}",
        s.port,
        proxy_sock.display(),
        s.uri_params
    )
}

fn virsh_over_ssh(backend: &str) {
    let _g = serial();
    let tb = testbed();
    let s = sshd();
    let proxy = proxy(backend, "");
    let uri = ssh_uri(s, &proxy.rw_sock);
    let before = proxy.relayed("qemu:///system");
    for args in [
        &["list", "--all"][..],
        &["pool-list", "--all"][..],
        &["net-list", "--all"][..],
    ] {
        let via = virsh(&uri, args);
        assert!(
            via.status.success(),
            "{backend} {args:?}: {}\nproxy log:\n{}",
            text(&via),
            proxy.log_text()
        );
        let direct = virsh(&direct_uri(tb), args);
        assert!(
            direct.status.success(),
            "direct {args:?}: {}",
            text(&direct)
        );
        assert_eq!(
            String::from_utf8_lossy(&via.stdout),
            String::from_utf8_lossy(&direct.stdout),
            "{backend} {args:?}: through ssh+nc+proxy vs direct"
        );
    }
    // A value only the daemon knows, to rule out an empty list matching an empty list.
    let v = virsh(&uri, &["version", "--daemon"]);
    assert!(v.status.success(), "{}", text(&v));
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("Running against daemon: 9.0.0"),
        "{}",
        text(&v)
    );
    // Four virsh runs, four opens relayed by this proxy (nc on the far side dialled it).
    assert_eq!(
        proxy.relayed("qemu:///system"),
        before + 4,
        "{}",
        proxy.log_text()
    );
}

#[test]
fn virsh_over_ssh_netcat_through_proxy_io_uring() {
    virsh_over_ssh("io_uring");
}

#[test]
fn virsh_over_ssh_netcat_through_proxy_epoll() {
    virsh_over_ssh("epoll");
}

// ---------------------------------------------------------------------------------------
// An abstract driver socket (`driver_sockets = [ "qemu=@name" ]`)

/// Listens on the abstract name `name` and joins every connection to `target`, counting
/// them: a stand-in for a daemon that listens on an abstract socket.
fn abstract_bridge(name: &str, target: PathBuf) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(a) = conn else { return };
            let Ok(b) = UnixStream::connect(&target) else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (mut a, mut b) = (a, b);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a2, &mut b2);
                let _ = b2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b, &mut a);
                let _ = a.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    count
}

fn abstract_driver_socket(backend: &str) {
    let _g = serial();
    let tb = testbed();
    let name = format!("vpd-cl-{}-{backend}", std::process::id());
    let count = abstract_bridge(&name, tb.sock("virtqemud-sock"));
    let proxy = proxy(backend, &format!("driver_sockets = [ \"qemu=@{name}\" ]"));
    let o = virsh(
        &format!("qemu+unix:///system?socket={}", proxy.rw_sock.display()),
        &["version", "--daemon"],
    );
    assert!(
        o.status.success(),
        "{}\nproxy log:\n{}",
        text(&o),
        proxy.log_text()
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("Running against daemon: 9.0.0"));
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "abstract listener unused"
    );
    assert_eq!(proxy.relayed("qemu:///system"), 1, "{}", proxy.log_text());
}

#[test]
fn abstract_driver_socket_through_proxy_io_uring() {
    abstract_driver_socket("io_uring");
}

#[test]
fn abstract_driver_socket_through_proxy_epoll() {
    abstract_driver_socket("epoll");
}
