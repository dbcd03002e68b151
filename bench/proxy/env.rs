//! The processes a bench run drives: the modular test bed, the private libvirtd, proxies, the socat relay, the C
//! load client, a storage pool; plus what the bench reads from /proc. Every process this
//! file starts dies with the bench: guards kill it on drop (panics included) and children
//! carry PR_SET_PDEATHSIG so a killed bench leaves nothing behind either (the daemon is
//! covered by the script's `--watch-pid` reaper).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const TARGET_TMPDIR: &str = env!("CARGO_TARGET_TMPDIR");
/// Built by cargo for benches (the release profile under `cargo bench`).
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_virtproxyd");

/// The proxy binary to measure: `VPD_BENCH_PROXY_BIN` (e.g. an older build, to compare)
/// or this tree's.
pub fn proxy_bin() -> String {
    std::env::var("VPD_BENCH_PROXY_BIN")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| PROXY_BIN.to_string())
}

/// `target/` (the parent of `target/tmp`).
pub fn target_dir() -> PathBuf {
    Path::new(TARGET_TMPDIR)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(TARGET_TMPDIR))
}

/// The child gets SIGKILL when the bench process dies (must be spawned from the main thread:
/// the signal follows the thread that forked).
fn die_with_bench(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

fn kill_wait(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: plain kill(2) on our own child's pid (not yet reaped, so not reused).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Runs `cmd` to completion (killed after `limit`); returns (success, stdout, stderr).
pub fn run(cmd: &mut Command, limit: Duration) -> (bool, String, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = die_with_bench(cmd)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let te = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            kill_wait(&mut child);
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    match status {
        Some(st) => (
            st.success(),
            to.join().unwrap_or_default(),
            te.join().unwrap_or_default(),
        ),
        None => (
            false,
            String::new(),
            format!("killed after {limit:?}: {cmd:?}"),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields of /proc/<pid>/stat after "pid (comm) ", 0-based from `state` (field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(") ")?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// (utime+stime, cutime+cstime) in seconds (clock ticks: 10 ms resolution).
pub fn cpu_ticks(pid: u32) -> (f64, f64) {
    let f = stat_fields(pid).unwrap_or_default();
    let g = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime = field 14, stime 15, cutime 16, cstime 17 → indices 11..=14 here
    ((g(11) + g(12)) / clk_tck(), (g(13) + g(14)) / clk_tck())
}

/// CPU seconds of the live threads of `pid`, ns resolution (sum of task schedstat run time).
/// Threads that exited in between are missed; the proxy's threads live as long as it does.
pub fn cpu_sched(pid: u32) -> f64 {
    let Ok(d) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    d.flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// (threads, of which io_uring io-wq workers "iou-wrk-*").
pub fn threads(pid: u32) -> (usize, usize) {
    let Ok(d) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let mut n = 0;
    let mut wrk = 0;
    for t in d.flatten() {
        n += 1;
        if fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("iou-wrk")) {
            wrk += 1;
        }
    }
    (n, wrk)
}

/// Pids whose parent is `pid` (zombies included: not reaped yet).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(d) = fs::read_dir("/proc") else {
        return vec![];
    };
    d.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat_fields(p)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|pp| pp == pid)
        })
        .collect()
}

pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Prefix of this process's directories under /tmp: `vpd-bench-<kind>-<pid>-`.
fn tmp_prefix(kind: &str) -> String {
    format!("vpd-bench-{kind}-{}-", std::process::id())
}

/// A fresh directory (mode 0755) for one endpoint's socket and files.
fn endpoint_dir(kind: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&tmp_prefix(kind))
        .tempdir()
        .unwrap_or_else(|e| panic!("{kind} dir: {e}"));
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Removes /tmp directories of earlier bench processes that are gone (a bench killed by a
/// signal cannot run its destructors; its children died with it, its pool dir stays).
pub fn remove_stale_tmp() {
    let Ok(d) = fs::read_dir("/tmp") else {
        return;
    };
    for e in d.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("vpd-bench-")) else {
            continue;
        };
        let Some((kind, rest)) = rest.split_once('-') else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !["proxy", "socat", "pool", "tb"].contains(&kind)
            || pid == std::process::id()
            || Path::new(&format!("/proc/{pid}")).exists()
        {
            continue;
        }
        let _ = fs::remove_dir_all(e.path());
    }
}

// ---------------------------------------------------------------------------------------
// libvirtd
// ---------------------------------------------------------------------------------------

pub struct Daemon {
    pub state_dir: PathBuf,
    pub rw_sock: PathBuf,
    pub pid: u32,
}

fn script() -> PathBuf {
    Path::new(MANIFEST_DIR).join("scripts/private-libvirtd.sh")
}

impl Daemon {
    /// Starts Debian's libvirtd through `scripts/private-libvirtd.sh` with client limits
    /// raised for the scale test (`extra_conf`), reaped when this process exits.
    pub fn start(extra_conf: &str) -> Daemon {
        Self::start_tagged("", extra_conf)
    }

    /// Another daemon beside the first (`tag` names its state directory).
    pub fn start_tagged(tag: &str, extra_conf: &str) -> Daemon {
        let tmp = PathBuf::from(TARGET_TMPDIR);
        let base = if tmp.as_os_str().len() + "/vpd-bench-4194304".len() <= 80 {
            tmp
        } else {
            PathBuf::from("/tmp")
        };
        fs::create_dir_all(&base).expect("create state dir base");
        // state dirs of earlier bench processes that are gone
        if let Ok(d) = fs::read_dir(&base) {
            for e in d.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("vpd-bench-"))
                    .and_then(|p| p.split('-').next()?.parse::<u32>().ok())
                else {
                    continue;
                };
                if Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                let _ = run(
                    Command::new(script()).arg("stop").arg(e.path()),
                    Duration::from_secs(30),
                );
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let state_dir = match tag {
            "" => base.join(format!("vpd-bench-{}", std::process::id())),
            t => base.join(format!("vpd-bench-{}-{t}", std::process::id())),
        };
        let mut cmd = Command::new(script());
        cmd.arg("start")
            .arg(&state_dir)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .env(
                "VPD_QEMU_CAPS_CACHE",
                Path::new(TARGET_TMPDIR).join("qemu-caps-cache"),
            )
            .env("VPD_LIBVIRTD_EXTRA_CONF", extra_conf);
        // not die_with_bench: the script exits at once; the reaper handles the daemon
        cmd.stdin(Stdio::null());
        let out = cmd.output().expect("run private-libvirtd.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "private-libvirtd.sh start failed ({}):\n{stdout}{stderr}",
            out.status
        );
        eprint!("{stderr}");
        let pid = stdout
            .lines()
            .rev()
            .find_map(|l| l.trim().parse::<u32>().ok())
            .expect("no daemon pid");
        Daemon {
            rw_sock: state_dir.join("run/libvirt-sock"),
            state_dir,
            pid,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = run(
            Command::new(script()).arg("stop").arg(&self.state_dir),
            Duration::from_secs(30),
        );
        let _ = fs::remove_dir_all(&self.state_dir);
    }
}

// ---------------------------------------------------------------------------------------
// libvirt 9.0.0's modular daemons (scripts/modular-testbed.sh)
// ---------------------------------------------------------------------------------------

/// virtqemud, virtstoraged, virtnetworkd, virtsecretd and libvirt's own virtproxyd (auth
/// none, sockets 0777), in a private mount namespace, stopped when the bench exits
/// (`--watch-pid`).
pub struct Testbed {
    pub state: PathBuf,
    /// The daemons' socket directory, seen from outside the namespace.
    pub sock_dir: PathBuf,
}

pub fn testbed_script() -> PathBuf {
    Path::new(MANIFEST_DIR).join("scripts/modular-testbed.sh")
}

impl Testbed {
    /// `extra_proxy_conf`: lines for libvirt's virtproxyd (VPD_MODULAR_PROXY_CONF).
    pub fn start(extra_proxy_conf: &str) -> Testbed {
        // socket paths must stay short: the script wants STATE_DIR <= 60 bytes
        let state = PathBuf::from(format!("/tmp/vpd-bench-tb-{}", std::process::id()));
        let mut cmd = Command::new("bash");
        cmd.arg(testbed_script())
            .arg("start")
            .arg(&state)
            .args(["--watch-pid", &std::process::id().to_string()])
            .env("VPD_MODULAR_PROXY_CONF", extra_proxy_conf)
            .stdin(Stdio::null());
        let (ok, out, err) = run(&mut cmd, Duration::from_secs(240));
        assert!(
            ok,
            "modular-testbed.sh start failed (run `scripts/modular-testbed.sh build` once):\n{out}{err}"
        );
        eprint!("{err}");
        let run_dir = PathBuf::from(out.trim());
        Testbed {
            state,
            sock_dir: run_dir.join("libvirt"),
        }
    }

    pub fn sock(&self, name: &str) -> PathBuf {
        self.sock_dir.join(name)
    }

    /// A daemon's pid (virtqemud, virtstoraged, …, virtproxyd for libvirt's proxy).
    pub fn pid(&self, daemon: &str) -> u32 {
        fs::read_to_string(self.state.join(format!("{daemon}.pid")))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no pid for {daemon}"))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = run(
            Command::new("bash")
                .arg(testbed_script())
                .arg("stop")
                .arg(&self.state),
            Duration::from_secs(60),
        );
        let _ = fs::remove_dir_all(&self.state);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// `scheme:///path` → `scheme+unix:///path?socket=<sock>`.
pub fn unix_uri(scheme_path: &str, sock: &Path) -> String {
    let (scheme, rest) = scheme_path.split_once("://").expect("scheme://path");
    format!("{scheme}+unix://{rest}?socket={}", sock.display())
}

fn wait_accepting(sock: &Path, child: &mut Child, what: &str, log: &Path) {
    let ok = wait_for(Duration::from_secs(15), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{what} exited during startup ({st}):\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        sock.exists() && UnixStream::connect(sock).is_ok()
    });
    assert!(ok, "{what} not accepting on {}", sock.display());
}

// ---------------------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------------------

pub struct Proxy {
    pub backend: &'static str,
    pub rw_sock: PathBuf,
    pub log: PathBuf,
    dir: TempDir,
    child: Child,
}

impl Proxy {
    pub fn start(daemon: &Daemon, backend: &'static str) -> Proxy {
        Self::start_conf(daemon, backend, "")
    }

    /// In front of the modular test bed, routed by `driver_socket_dir` alone (as on a
    /// Fedora/RHEL host).
    pub fn start_testbed(tb: &Testbed, backend: &'static str) -> Proxy {
        Self::start_routed(
            &format!("driver_socket_dir = \"{}\"", tb.sock_dir.display()),
            backend,
            "",
        )
    }

    /// `start_testbed` with a TCP listener (auth "none") on a free loopback port, too.
    pub fn start_testbed_tcp(tb: &Testbed, backend: &'static str) -> (Proxy, u16) {
        let port = free_port();
        let tcp = format!(
            "listen_tcp = 1\nlisten_addr = \"127.0.0.1\"\ntcp_port = \"{port}\"\nauth_tcp = \"none\"\n"
        );
        (Self::start_testbed_conf(tb, backend, &tcp), port)
    }

    /// `start_testbed` with `extra` config lines first.
    pub fn start_testbed_conf(tb: &Testbed, backend: &'static str, extra: &str) -> Proxy {
        Self::start_routed(
            &format!("driver_socket_dir = \"{}\"", tb.sock_dir.display()),
            backend,
            extra,
        )
    }

    /// Like `start`, with `extra` config lines first (virconf keeps a key's first value).
    pub fn start_conf(daemon: &Daemon, backend: &'static str, extra: &str) -> Proxy {
        let d = daemon.rw_sock.display();
        Self::start_routed(
            &format!("driver_sockets = [ \"test={d}\", \"qemu={d}\", \"storage={d}\" ]"),
            backend,
            extra,
        )
    }

    /// `routing`: the config line(s) naming the driver daemons' sockets. Auth is set to
    /// "none" explicitly (the proxy's default is polkit on UNIX sockets).
    fn start_routed(routing: &str, backend: &'static str, extra: &str) -> Proxy {
        let dir = endpoint_dir("proxy");
        let conf = dir.path().join("virtproxyd.conf");
        fs::write(
            &conf,
            format!(
                "{extra}\n\
                 unix_sock_dir = \"{}\"\n\
                 unix_sock_rw_perms = \"0777\"\n\
                 unix_sock_ro_perms = \"0777\"\n\
                 auth_unix_rw = \"none\"\n\
                 auth_unix_ro = \"none\"\n\
                 {routing}\n\
                 io_backend = \"{backend}\"\n\
                 max_clients = 20000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let log = dir.path().join("virtproxyd.log");
        let lf = fs::File::create(&log).unwrap();
        let mut cmd = Command::new(proxy_bin());
        cmd.arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path().join("virtproxyd.pid"))
            .env_remove("VIRTPROXYD_IO_BACKEND")
            .stdin(Stdio::null())
            .stdout(lf.try_clone().unwrap())
            .stderr(lf);
        let child = die_with_bench(&mut cmd).spawn().expect("spawn virtproxyd");
        let mut p = Proxy {
            backend,
            rw_sock: dir.path().join("libvirt-sock"),
            log,
            dir,
            child,
        };
        let (sock, log) = (p.rw_sock.clone(), p.log.clone());
        wait_accepting(&sock, &mut p.child, "virtproxyd", &log);
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_tail(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = t.lines().collect();
        v[v.len().saturating_sub(20)..].join("\n")
    }

    #[allow(dead_code)]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        kill_wait(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------
// socat: the naive userspace copy relay
// ---------------------------------------------------------------------------------------

pub struct Socat {
    pub sock: PathBuf,
    _dir: TempDir,
    child: Child,
}

impl Socat {
    /// Listens on a fresh socket and relays every connection to `target`.
    pub fn start(target: &Path) -> Socat {
        let dir = endpoint_dir("socat");
        let sock = dir.path().join("sock");
        let log = dir.path().join("socat.log");
        let mut cmd = Command::new("socat");
        cmd.arg(format!("UNIX-LISTEN:{},fork", sock.display()))
            .arg(format!("UNIX-CONNECT:{}", target.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let mut child = die_with_bench(&mut cmd).spawn().expect("spawn socat");
        // do not connect to probe readiness: each connect forks a relay child
        let ok = wait_for(Duration::from_secs(10), || sock.exists());
        if let Ok(Some(st)) = child.try_wait() {
            panic!("socat exited ({st})");
        }
        assert!(ok, "socat did not listen on {}", sock.display());
        Socat {
            sock,
            _dir: dir,
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds of socat and its reaped relay children (clock ticks).
    pub fn cpu(&self) -> f64 {
        let (own, children) = cpu_ticks(self.pid());
        own + children
    }

    /// Waits until every relay child has exited and been reaped (so its CPU time is in the
    /// parent's cutime/cstime).
    pub fn wait_idle(&self) {
        let pid = self.pid();
        let ok = wait_for(Duration::from_secs(30), || children_of(pid).is_empty());
        assert!(ok, "socat relay children did not exit");
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        for c in children_of(self.pid()) {
            // SAFETY: plain kill(2); the pids are socat's unreaped children.
            unsafe { libc::kill(c as i32, libc::SIGKILL) };
        }
        kill_wait(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------
// haproxy: a production splicing TCP relay (no handshake work)
// ---------------------------------------------------------------------------------------

pub struct Haproxy {
    pub sock: PathBuf,
    _dir: TempDir,
    child: Child,
}

impl Haproxy {
    /// `mode tcp` with `option splice-auto` from a fresh socket to `target`, one process
    /// (its threads' CPU is read like a proxy's). None when haproxy is not installed.
    pub fn start(target: &Path) -> Option<Haproxy> {
        let bin = Path::new("/usr/sbin/haproxy");
        if !bin.exists() {
            eprintln!("haproxy not installed (scripts/install-deps.sh): no haproxy column");
            return None;
        }
        let dir = endpoint_dir("haproxy");
        let sock = dir.path().join("sock");
        let conf = dir.path().join("haproxy.cfg");
        fs::write(
            &conf,
            format!(
                "global\n  maxconn 4000\n  nbthread 2\n\
                 defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  \
                 timeout server 1h\n  option splice-auto\n\
                 listen relay\n  bind unix@{} mode 777\n  server virtqemud unix@{}\n",
                sock.display(),
                target.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("haproxy.log");
        let mut cmd = Command::new(bin);
        cmd.arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(dir.path().join("haproxy.err")).unwrap());
        let mut child = die_with_bench(&mut cmd).spawn().expect("spawn haproxy");
        let ok = wait_for(Duration::from_secs(10), || sock.exists());
        if let Ok(Some(st)) = child.try_wait() {
            let err = fs::read_to_string(dir.path().join("haproxy.err")).unwrap_or_default();
            panic!("haproxy exited ({st}): {err}");
        }
        assert!(ok, "haproxy did not listen on {}", sock.display());
        Some(Haproxy {
            sock,
            _dir: dir,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        kill_wait(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------
// The C load client
// ---------------------------------------------------------------------------------------

/// Compiles bench/proxy/client.c into target/ with the flags pkg-config gives for libvirt.
pub fn build_client() -> PathBuf {
    let src = Path::new(MANIFEST_DIR).join("bench/proxy/client.c");
    let out = target_dir().join("bench-proxy-client");
    let (ok, flags, err) = run(
        Command::new("pkg-config").args(["--cflags", "--libs", "libvirt"]),
        Duration::from_secs(30),
    );
    assert!(
        ok,
        "pkg-config libvirt failed (run scripts/install-deps.sh): {err}"
    );
    let mut cmd = Command::new("cc");
    cmd.args(["-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .args(flags.split_whitespace())
        .arg("-lpthread");
    let (ok, o, e) = run(&mut cmd, Duration::from_secs(120));
    assert!(ok, "cc {} failed:\n{o}{e}", src.display());
    out
}

pub struct Client {
    pub bin: PathBuf,
}

impl Client {
    /// Runs one subcommand and returns its JSON (last stdout line); panics on failure.
    pub fn json(&self, args: &[&str], limit: Duration) -> Value {
        let (ok, out, err) = run(Command::new(&self.bin).args(args), limit);
        assert!(ok, "client {args:?} failed:\n{out}{err}");
        let line = out.lines().last().unwrap_or("");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("client {args:?}: {e}: {out:?}"))
    }
}

/// Idle connections held by several client processes (one libvirt connection costs the
/// client ~3 fds, and a process may hold 20,000 at most).
pub struct IdleGroup {
    children: Vec<(Child, Option<ChildStdin>)>,
    lines: mpsc::Receiver<(usize, String)>,
}

impl IdleGroup {
    pub fn open(client: &Client, uri: &str, total: usize, per_proc: usize) -> IdleGroup {
        let nproc = total.div_ceil(per_proc).max(1);
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut left = total;
        for i in 0..nproc {
            let n = left.div_ceil(nproc - i);
            left -= n;
            let mut cmd = Command::new(&client.bin);
            cmd.args(["idle", uri, &n.to_string(), "6"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = die_with_bench(&mut cmd).spawn().expect("spawn idle client");
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().unwrap();
            let tx = tx.clone();
            thread::spawn(move || {
                for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send((i, l));
                }
            });
            children.push((child, stdin));
        }
        let g = IdleGroup {
            children,
            lines: rx,
        };
        let mut ready = 0;
        let mut opened = 0;
        let deadline = Instant::now() + Duration::from_secs(300);
        while ready < nproc {
            let left = deadline.saturating_duration_since(Instant::now());
            let (i, l) = g
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("idle clients not ready ({ready}/{nproc})"));
            let n: usize = l
                .strip_prefix("ready ")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("idle client {i}: {l}"));
            opened += n;
            ready += 1;
        }
        assert_eq!(opened, total, "idle clients opened {opened} of {total}");
        g
    }

    /// Closes the clients' stdin; each makes one call per connection and exits. Returns
    /// how many connections were still alive.
    pub fn close(mut self) -> usize {
        for (_, stdin) in &mut self.children {
            if let Some(mut s) = stdin.take() {
                let _ = s.flush();
            }
        }
        let mut alive = 0;
        let n = self.children.len();
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut done = 0;
        while done < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((_, l)) = self.lines.recv_timeout(left) else {
                break;
            };
            if let Ok(v) = serde_json::from_str::<Value>(&l) {
                alive += v["alive"].as_u64().unwrap_or(0) as usize;
                done += 1;
            }
        }
        for (c, _) in &mut self.children {
            let _ = c.wait();
        }
        alive
    }
}

impl Drop for IdleGroup {
    fn drop(&mut self) {
        for (c, _) in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Storage pool with the stream volumes
// ---------------------------------------------------------------------------------------

pub struct Pool {
    pub name: String,
    uri: String,
    _dir: TempDir,
}

impl Pool {
    /// A transient `dir` pool on a fresh directory under /tmp with two raw volumes of
    /// `bytes`: `dl` (sparse, read by downloads) and `ul` (written by uploads).
    pub fn create(sock: &Path, bytes: u64) -> Pool {
        let dir = tempfile::Builder::new()
            .prefix(&tmp_prefix("pool"))
            .tempdir_in("/tmp")
            .expect("pool dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let name = format!(
            "vpd-bench-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let uri = unix_uri("qemu:///system", sock);
        let script = format!(
            "pool-create-as {name} dir --target {}; \
             vol-create-as {name} dl {bytes}b --format raw --allocation 0; \
             vol-create-as {name} ul {bytes}b --format raw --allocation 0",
            dir.path().display()
        );
        let (ok, o, e) = run(
            Command::new("virsh").args(["-c", &uri, &script]),
            Duration::from_secs(60),
        );
        assert!(ok, "creating pool {name} failed:\n{o}{e}");
        Pool {
            name,
            uri,
            _dir: dir,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let n = &self.name;
        let _ = run(
            Command::new("virsh").args([
                "-c",
                &self.uri,
                &format!("vol-delete --pool {n} dl; vol-delete --pool {n} ul; pool-destroy {n}"),
            ]),
            Duration::from_secs(60),
        );
    }
}
