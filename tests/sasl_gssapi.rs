//! GSSAPI (Kerberos) on plain TCP, where SASL negotiates a security layer: a private MIT KDC
//! on loopback (`scripts/kdc-testbed.sh`), a user with a ticket from `kinit`, the modular test
//! bed's daemons behind the proxy, and libvirt's own virtproxyd from the same build, set up the
//! same way, as the reference. The workload (`tests/py/gss_workload.py`: calls, lifecycle
//! events, a 256 MiB volume stream up and down with sha256 compared) runs through each while
//! tcpdump records the TCP port: with the layer no RPC body may show in the capture (a marker
//! string in names and stream data), and in a run without the layer the same marker must show,
//! so the check is known to work. Every run also reports the proxy's CPU time per GiB moved.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::modular::testbed;
use support::*;

const STREAM_MIB: u64 = 256;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kdc-testbed.sh")
}

/// The KDC and libvirt's GSSAPI virtproxyd of this test process.
struct Bed {
    state: PathBuf,
    /// From `kdc-testbed.sh env`: KRB5_CONFIG, KRB5_KTNAME, KRB5CCNAME, SASL_CONF_PATH, ...
    env: Vec<(String, String)>,
    libvirt_port: u16,
}

impl Bed {
    fn var(&self, k: &str) -> &str {
        self.env
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("kdc-testbed.sh env has no {k}"))
    }

    /// What a server (ours or libvirt's) needs: realm, keytab, Cyrus config dir.
    fn server_env(&self) -> Vec<(&str, &str)> {
        ["KRB5_CONFIG", "KRB5_KTNAME", "SASL_CONF_PATH"]
            .into_iter()
            .map(|k| (k, self.var(k)))
            .collect()
    }

    /// What a client needs: realm and the ticket cache `kinit` filled.
    fn client_env(&self) -> Vec<(&str, &str)> {
        ["KRB5_CONFIG", "KRB5CCNAME"]
            .into_iter()
            .map(|k| (k, self.var(k)))
            .collect()
    }

    fn libvirt_proxy_pid(&self) -> u32 {
        std::fs::read_to_string(self.state.join("proxy/pid"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .expect("libvirt's virtproxyd pid")
    }
}

fn run_script(args: &[&str]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(args).stdin(Stdio::null());
    output_with_timeout(&mut cmd, Duration::from_secs(300))
}

fn bed() -> &'static Bed {
    static BED: OnceLock<Bed> = OnceLock::new();
    BED.get_or_init(|| {
        let tb = testbed();
        let state = PathBuf::from(format!("/tmp/vpd-kdc-{}", std::process::id()));
        let pid = std::process::id().to_string();
        let state_s = state.to_str().expect("utf-8 state dir");
        let o = run_script(&["start", state_s, "--watch-pid", &pid]);
        assert_success(&o, "kdc-testbed.sh start");
        let env = stdout(&o)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_success(&run_script(&["kinit", state_s]), "kdc-testbed.sh kinit");
        let libvirt_port = free_port();
        let o = run_script(&[
            "libvirt-proxy",
            state_s,
            tb.state.to_str().expect("utf-8 test bed dir"),
            &libvirt_port.to_string(),
        ]);
        assert_success(&o, "kdc-testbed.sh libvirt-proxy");
        Bed {
            state,
            env,
            libvirt_port,
        }
    })
}

/// One 256 MiB workload at a time: they share two cores, and the CPU figures should not
/// measure each other.
fn heavy() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

/// tcpdump on loopback for one TCP port, into a file.
struct Capture {
    child: Child,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    fn start(port: u16) -> Capture {
        let dir = tempfile::tempdir().expect("capture dir");
        let file = dir.path().join("cap.pcap");
        let err = dir.path().join("tcpdump.err");
        let child = Command::new("tcpdump")
            // -Z root: Debian's tcpdump drops to its own user, which cannot write here.
            .args([
                "-i", "lo", "-n", "-U", "-Z", "root", "-s", "2048", "-B", "32768",
            ])
            .arg("-w")
            .arg(&file)
            .args(["tcp", "port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("tcpdump stderr file"))
            .spawn()
            .expect("spawn tcpdump (scripts/install-deps.sh)");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut c = Capture {
            child,
            file,
            _dir: dir,
        };
        loop {
            let text = std::fs::read_to_string(&err).unwrap_or_default();
            if text.contains("listening on") {
                return c;
            }
            if let Ok(Some(st)) = c.child.try_wait() {
                panic!("tcpdump exited ({st}): {text}");
            }
            assert!(Instant::now() < deadline, "tcpdump not listening: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the capture (SIGINT flushes the file) and returns its bytes.
    fn finish(mut self) -> Vec<u8> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            assert!(Instant::now() < deadline, "tcpdump did not stop on SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read(&self.file).expect("read capture")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut at = 0;
    while let Some(i) = hay[at..].iter().position(|&b| b == first) {
        let start = at + i;
        if hay[start + 1..].starts_with(rest) {
            return true;
        }
        at = start + 1;
    }
    false
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let after = stat.rsplit_once(") ").map(|(_, r)| r).expect("stat format");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// What one run through one server gave.
#[derive(Debug)]
struct Run {
    outcome: Value,
    marker_in_capture: bool,
    capture_bytes: usize,
    /// The server's CPU seconds per GiB of stream data (upload plus download).
    cpu_per_gib: f64,
}

/// The workload through `uri` while capturing `port`, measuring `server_pid`'s CPU.
fn workload(uri: &str, port: u16, server_pid: u32, label: &str) -> Run {
    let _heavy = heavy();
    let bed = bed();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let marker = format!(
        "VPDMARK{:08x}{:08x}",
        std::process::id(),
        nanos ^ port as u32
    );
    let pool = pool_dir();
    let cap = Capture::start(port);
    let cpu0 = cpu_seconds(server_pid);
    let mut cmd = py_command(
        "gss_workload.py",
        &[
            uri,
            pool.path().to_str().expect("utf-8 pool dir"),
            &STREAM_MIB.to_string(),
            &marker,
        ],
    );
    cmd.stdin(Stdio::null());
    for (k, v) in bed.client_env() {
        cmd.env(k, v);
    }
    let o = output_with_timeout(&mut cmd, Duration::from_secs(600));
    let cpu = cpu_seconds(server_pid) - cpu0;
    let captured = cap.finish();
    assert_success(&o, &format!("{label}: gss_workload.py"));
    let outcome: Value = serde_json::from_str(stdout(&o).trim())
        .unwrap_or_else(|e| panic!("{label}: workload output {e}: {}", stdout(&o)));
    let gib = (2 * STREAM_MIB) as f64 / 1024.0;
    let run = Run {
        marker_in_capture: contains(&captured, marker.as_bytes()),
        capture_bytes: captured.len(),
        cpu_per_gib: cpu / gib,
        outcome,
    };
    eprintln!(
        "{label}: {:.2} CPU s per GiB streamed ({cpu:.2} s for {} MiB up + {} MiB down), \
         capture {} bytes, marker seen: {}, timing {}",
        run.cpu_per_gib,
        STREAM_MIB,
        STREAM_MIB,
        run.capture_bytes,
        run.marker_in_capture,
        run.outcome["timing"]
    );
    run
}

/// The outcome fields that must match between servers (the stream's sha256 depends on the
/// run's marker, the timing on the machine).
fn comparable(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("stream_sha256");
        m.remove("timing");
    }
    v
}

/// libvirt's own virtproxyd with GSSAPI, run once and shared by the tests that compare.
fn reference() -> &'static Run {
    static REF: OnceLock<Run> = OnceLock::new();
    REF.get_or_init(|| {
        let bed = bed();
        workload(
            &format!("qemu+tcp://localhost:{}/system", bed.libvirt_port),
            bed.libvirt_port,
            bed.libvirt_proxy_pid(),
            "libvirt's virtproxyd, GSSAPI",
        )
    })
}

fn our_proxy(auth_tcp: &str, backend: &str, port: u16) -> Proxy {
    let bed = bed();
    let mut env = bed.server_env();
    env.push(("VIRTPROXYD_IO_BACKEND", backend));
    support::modular::proxy(
        &format!(
            "listen_tcp = 1\nlisten_tls = 0\nlisten_addr = \"127.0.0.1\"\n\
             tcp_port = \"{port}\"\nauth_tcp = \"{auth_tcp}\"\n"
        ),
        &env,
    )
}

#[test]
fn libvirts_virtproxyd_negotiates_a_gssapi_layer_that_hides_rpc_bodies() {
    let _daemons = support::modular::daemons_shared();
    let r = reference();
    assert_eq!(r.outcome["encrypted"], 1, "{}", r.outcome);
    assert_eq!(r.outcome["stream_bytes"], STREAM_MIB * 1024 * 1024);
    assert_eq!(r.outcome["events"], serde_json::json!([[0, 0], [1, 0]]));
    // The capture saw the whole transfer (snap length 2 KiB per packet) ...
    assert!(
        r.capture_bytes > 1 << 20,
        "capture of {} bytes",
        r.capture_bytes
    );
    // ... and not one marker: names and stream data were all inside the layer.
    assert!(!r.marker_in_capture, "plaintext RPC body on the wire");
}

#[test]
fn gssapi_through_the_proxy_is_layered_and_matches_libvirt() {
    let _daemons = support::modular::daemons_shared();
    let reference = reference();
    for backend in ["io_uring", "epoll"] {
        let port = free_port();
        let p = our_proxy("sasl", backend, port);
        let r = workload(
            &format!("qemu+tcp://localhost:{port}/system"),
            port,
            p.pid(),
            &format!("this proxy ({backend}), GSSAPI copy path"),
        );
        // virsh after kinit, as an administrator would use it.
        let mut cmd = Command::new("virsh");
        cmd.arg("-c")
            .arg(format!("qemu+tcp://localhost:{port}/system"))
            .arg("version; pool-list --all; uri")
            .stdin(Stdio::null());
        for (k, v) in bed().client_env() {
            cmd.env(k, v);
        }
        let o = output_with_timeout(&mut cmd, CLIENT_TIMEOUT);
        assert_success(&o, &format!("{backend}: virsh"));
        assert!(
            stdout(&o).contains("Running hypervisor: QEMU")
                && stdout(&o).contains(&format!("qemu+tcp://localhost:{port}/system")),
            "{backend}: {}",
            stdout(&o)
        );
        assert!(
            p.log_text().contains("SASL security layer: copied"),
            "{backend}: not on the copy path: {}",
            p.log_text()
        );
        assert_eq!(
            comparable(&r.outcome),
            comparable(&reference.outcome),
            "{backend}: outcomes differ from libvirt's virtproxyd"
        );
        assert!(r.capture_bytes > 1 << 20, "{backend}: capture too small");
        assert!(
            !r.marker_in_capture,
            "{backend}: plaintext RPC body on the wire"
        );
    }
}

/// The control: the same workload on plain TCP without SASL (auth_tcp "none", spliced): the
/// marker shows in the capture, so its absence above means something.
#[test]
fn without_a_layer_the_capture_shows_the_marker() {
    let _daemons = support::modular::daemons_shared();
    let port = free_port();
    let p = our_proxy("none", "io_uring", port);
    let r = workload(
        &format!("qemu+tcp://localhost:{port}/system"),
        port,
        p.pid(),
        "this proxy, plain TCP without SASL (splice path)",
    );
    assert_eq!(r.outcome["encrypted"], 0, "{}", r.outcome);
    assert_eq!(r.outcome["stream_bytes"], STREAM_MIB * 1024 * 1024);
    assert!(r.marker_in_capture, "the marker check would see nothing");
}

/// Back-pressure through the copy path: a client that pauses after every piece of a download
/// makes the proxy stop reading the daemon again and again; every byte must still arrive (a
/// stall hangs the client until its watchdog fails it).
#[test]
fn a_slow_reader_of_a_layered_stream_gets_every_byte() {
    let _daemons = support::modular::daemons_shared();
    for backend in ["io_uring", "epoll"] {
        let _heavy = heavy();
        let port = free_port();
        let p = our_proxy("sasl", backend, port);
        let pool = pool_dir();
        let mut cmd = py_command(
            "slow_download.py",
            &[
                &format!("qemu+tcp://localhost:{port}/system"),
                pool.path().to_str().expect("utf-8 pool dir"),
                "64",
                "5",
                "120",
            ],
        );
        cmd.stdin(Stdio::null());
        for (k, v) in bed().client_env() {
            cmd.env(k, v);
        }
        let o = output_with_timeout(&mut cmd, Duration::from_secs(180));
        assert_success(&o, &format!("{backend}: slow_download.py"));
        assert!(stdout(&o).contains("slow_download ok"), "{}", stdout(&o));
        assert!(
            p.log_text().contains("SASL security layer: copied"),
            "{backend}: not on the copy path"
        );
        eprintln!("{backend}: {}", stdout(&o).trim());
    }
}
