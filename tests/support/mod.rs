//! Shared harness for the integration tests: a private Debian libvirtd (started once per
//! test process by `scripts/private-libvirtd.sh`), virtproxyd instances in front of it, and
//! the real clients (virsh, virt-admin, python3-libvirt scripts in `tests/py`).
//!
//! Use from a test file with `mod support;` and `use support::*;`.
#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub(crate) const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const TARGET_TMPDIR: &str = env!("CARGO_TARGET_TMPDIR");
/// Debian's interpreter: it has python3-libvirt (the `python3` on PATH may not).
pub const PYTHON: &str = "/usr/bin/python3";

/// Put in a proxy's config to keep libvirt's default auth (polkit for root) in tests.
pub const DEFAULT_AUTH: &str = "# vpd-test: libvirt's default auth";
/// Default limit for one client command (virsh, virt-admin, a python script).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------
// The driver daemon
// ---------------------------------------------------------------------------------------

/// The private libvirtd every test in this process talks to (directly or via a proxy).
#[derive(Debug)]
pub struct Daemon {
    /// STATE_DIR of `private-libvirtd.sh`: libvirtd.conf, libvirtd.log, run/, ns/.
    pub state_dir: PathBuf,
    /// `<state_dir>/run/libvirt-sock` (auth none, mode 0777).
    pub rw_sock: PathBuf,
    /// `<state_dir>/run/libvirt-sock-ro`.
    pub ro_sock: PathBuf,
    /// `<state_dir>/run/libvirt-admin-sock` (root only).
    pub admin_sock: PathBuf,
    /// libvirtd's pid (as seen from this process).
    pub pid: u32,
}

impl Daemon {
    /// Direct URI to the daemon's rw socket, e.g. `uri("test:///default")` →
    /// `test+unix:///default?socket=<rw_sock>`.
    pub fn uri(&self, scheme_path: &str) -> String {
        unix_uri(scheme_path, &self.rw_sock)
    }

    /// Direct URI to the daemon's read-only socket.
    pub fn uri_ro(&self, scheme_path: &str) -> String {
        unix_uri(scheme_path, &self.ro_sock)
    }

    /// virt-admin URI of the daemon's admin socket.
    pub fn admin_uri(&self) -> String {
        format!("libvirtd:///system?socket={}", self.admin_sock.display())
    }

    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("libvirtd.log")
    }

    /// Last `lines` lines of the daemon log (for assertion messages).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// Whether libvirtd is still running (not gone, not a zombie).
    pub fn alive(&self) -> bool {
        process_alive(self.pid)
    }
}

fn script_path() -> PathBuf {
    Path::new(MANIFEST_DIR).join("scripts/private-libvirtd.sh")
}

/// The daemon for this test process: started on first use, with `--watch-pid` set to this
/// process so the script's reaper stops it (and any qemu it started) when the test binary
/// exits, however it exits. Panics (in every caller) if the daemon cannot be started.
pub fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Result<Daemon, String>> = OnceLock::new();
    match DAEMON.get_or_init(start_daemon) {
        Ok(d) => d,
        Err(e) => panic!("private libvirtd unavailable: {e}"),
    }
}

fn state_dir_base() -> PathBuf {
    // unix socket paths are limited to 107 bytes; the script wants STATE_DIR <= 80.
    let base = PathBuf::from(TARGET_TMPDIR);
    if base.as_os_str().len() + "/vpd-libvirtd-4194304".len() <= 80 {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

/// Removes state dirs of earlier test processes that no longer exist (their daemons were
/// stopped by the reaper; the dirs stay behind for post-mortem reading until now).
fn remove_stale_state_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vpd-libvirtd-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        // Make sure nothing of it is still running (normally a no-op), then delete.
        let _ = Command::new(script_path())
            .arg("stop")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&dir);
    }
}

fn start_daemon() -> Result<Daemon, String> {
    let base = state_dir_base();
    fs::create_dir_all(&base).map_err(|e| format!("create {}: {e}", base.display()))?;
    remove_stale_state_dirs(&base);
    let state_dir = base.join(format!("vpd-libvirtd-{}", std::process::id()));
    // Capabilities of the qemu binary, shared between test processes: the first start
    // probes qemu (~10 s under TCG), later starts reuse the (libvirt-validated) cache.
    let caps_cache = Path::new(TARGET_TMPDIR).join("qemu-caps-cache");

    let mut cmd = Command::new(script_path());
    cmd.arg("start")
        .arg(&state_dir)
        .arg("--watch-pid")
        .arg(std::process::id().to_string())
        .env("VPD_QEMU_CAPS_CACHE", &caps_cache)
        .stdin(Stdio::null());
    let out = output_with_timeout(&mut cmd, Duration::from_secs(150));
    if !out.status.success() {
        return Err(format!(
            "{} start {} failed ({}):\n{}{}",
            script_path().display(),
            state_dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid = stdout
        .lines()
        .rev()
        .find_map(|l| l.trim().parse::<u32>().ok())
        .ok_or_else(|| format!("no pid in script output: {stdout:?}"))?;
    // progress line ("ready in …") for the test log
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let run = state_dir.join("run");
    Ok(Daemon {
        rw_sock: run.join("libvirt-sock"),
        ro_sock: run.join("libvirt-sock-ro"),
        admin_sock: run.join("libvirt-admin-sock"),
        state_dir,
        pid,
    })
}

// ---------------------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------------------

/// One virtproxyd (this crate's binary) with its own socket directory, relaying to the
/// private daemon. Killed on drop.
#[derive(Debug)]
pub struct Proxy {
    dir: TempDir,
    /// `<dir>/libvirt-sock`
    pub rw_sock: PathBuf,
    /// `<dir>/libvirt-sock-ro`
    pub ro_sock: PathBuf,
    /// The generated `virtproxyd.conf`.
    pub conf: PathBuf,
    /// stdout+stderr of the proxy.
    pub log: PathBuf,
    child: Child,
}

impl Proxy {
    /// Starts `virtproxyd -f <dir>/virtproxyd.conf -p <dir>/virtproxyd.pid` with `envs` added
    /// to the environment and waits until both sockets accept connections.
    ///
    /// The config is `unix_sock_dir` (fixed), then `extra_conf`, then the defaults
    /// (`unix_sock_rw_perms = "0777"`, `unix_sock_ro_perms = "0777"`, `driver_sockets` for
    /// qemu/test/storage/network → the daemon's rw socket). virconf keeps the *first*
    /// occurrence of a key, so `extra_conf` can override any default.
    pub fn start(daemon: &Daemon, extra_conf: &str, envs: &[(&str, &str)]) -> Proxy {
        let d = daemon.rw_sock.display();
        let defaults = format!(
            "unix_sock_rw_perms = \"0777\"\n\
             unix_sock_ro_perms = \"0777\"\n\
             driver_sockets = [ \"qemu={d}\", \"test={d}\", \"storage={d}\", \"network={d}\" ]\n"
        );
        Self::start_with(&format!("{extra_conf}\n{defaults}"), envs)
    }

    /// Like `start`, but the config is exactly `unix_sock_dir = "<dir>"` followed by `conf`
    /// (nothing else added: no perms, no driver_sockets), plus `auth_unix_rw/ro = "none"`
    /// unless `conf` sets an `auth_unix_*` key or contains [`DEFAULT_AUTH`].
    pub fn start_with(conf: &str, envs: &[(&str, &str)]) -> Proxy {
        Self::start_binary(Path::new(env!("CARGO_BIN_EXE_virtproxyd")), conf, envs)
    }

    /// Like `start_with`, running the binary at `bin` (a copy a test may replace).
    pub fn start_binary(bin: &Path, conf: &str, envs: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("vpd-proxy-")
            .tempdir()
            .expect("create proxy temp dir");
        // TempDir is 0700; non-root clients (runuser -u vpdtest) must reach the sockets.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod proxy temp dir");
        let conf_path = dir.path().join("virtproxyd.conf");
        // Root's defaults are polkit on both sockets; tests get auth "none" (so raw clients
        // need no AUTH_LIST and other users need no polkitd) unless they set auth themselves or
        // ask for libvirt's defaults with DEFAULT_AUTH.
        let auth = if conf.contains("auth_unix_") || conf.contains(DEFAULT_AUTH) {
            ""
        } else {
            "auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n"
        };
        let text = format!(
            "unix_sock_dir = \"{}\"\n{conf}\n{auth}",
            dir.path().display()
        );
        fs::write(&conf_path, text).expect("write virtproxyd.conf");
        let log = dir.path().join("virtproxyd.log");
        let log_file = fs::File::create(&log).expect("create proxy log");
        let log_err = log_file.try_clone().expect("dup proxy log");

        let mut cmd = Command::new(bin);
        // -v: one info line per connection open/close, read by tests and by people.
        cmd.arg("-v")
            .arg("-f")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path().join("virtproxyd.pid"))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn virtproxyd");
        let mut p = Proxy {
            rw_sock: dir.path().join("libvirt-sock"),
            ro_sock: dir.path().join("libvirt-sock-ro"),
            conf: conf_path,
            log,
            dir,
            child,
        };
        p.wait_ready(Duration::from_secs(15));
        p
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "virtproxyd exited during startup ({st}); config:\n{}\nlog:\n{}",
                    fs::read_to_string(&self.conf).unwrap_or_default(),
                    self.log_text()
                );
            }
            let ready = [&self.rw_sock, &self.ro_sock]
                .iter()
                .all(|s| s.exists() && UnixStream::connect(s).is_ok());
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "virtproxyd not accepting on {} and {} after {limit:?}; log:\n{}",
                    self.rw_sock.display(),
                    self.ro_sock.display(),
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Client URI through the proxy's rw socket, e.g. `uri("test:///default")` →
    /// `test+unix:///default?socket=<rw_sock>`.
    pub fn uri(&self, scheme_path: &str) -> String {
        unix_uri(scheme_path, &self.rw_sock)
    }

    /// Client URI through the proxy's read-only socket.
    pub fn uri_ro(&self, scheme_path: &str) -> String {
        unix_uri(scheme_path, &self.ro_sock)
    }

    /// Everything the proxy wrote to stdout/stderr so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connections to `uri` the proxy opened downstream and handed to its relay so far (one
    /// log line each).
    pub fn relayed(&self, uri: &str) -> usize {
        let tag = format!("uri=\"{uri}\"");
        self.log_text()
            .lines()
            .filter(|l| l.contains("connection opened and handed to the relay") && l.contains(&tag))
            .count()
    }

    /// Whether the proxy process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to the proxy.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGTERM, then wait up to `limit` for a clean exit (SIGKILL after that). Returns the
    /// exit status.
    pub fn stop(&mut self, limit: Duration) -> ExitStatus {
        if let Ok(Some(st)) = self.child.try_wait() {
            return st;
        }
        self.signal("TERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait for virtproxyd");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// `scheme:///path` (or `scheme/path`) → `scheme+unix:///path?socket=<sock>` (an existing
/// query gets `&socket=…`).
pub fn unix_uri(scheme_path: &str, sock: &Path) -> String {
    let (scheme, rest) = match scheme_path.split_once("://") {
        Some((s, r)) => (s.to_string(), r.to_string()),
        None => match scheme_path.split_once('/') {
            Some((s, p)) => (s.to_string(), format!("/{p}")),
            None => (scheme_path.to_string(), "/".to_string()),
        },
    };
    // a given transport ("test+unix") is replaced
    let scheme = scheme.split('+').next().unwrap_or("").to_string();
    let sep = if rest.contains('?') { '&' } else { '?' };
    format!("{scheme}+unix://{rest}{sep}socket={}", sock.display())
}

/// Runs `cmd` capturing stdout/stderr; kills it after `limit` (the Output then has the kill
/// signal as status and a note appended to stderr).
pub fn output_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().unwrap_or_else(|_| ExitStatus::from_raw(9));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
    };
    // A grandchild that inherited the pipes could keep them open forever; only wait for
    // the readers when the command itself finished normally.
    let stdout = if timed_out {
        Vec::new()
    } else {
        out_t.join().unwrap_or_default()
    };
    let mut stderr = if timed_out {
        Vec::new()
    } else {
        err_t.join().unwrap_or_default()
    };
    if timed_out {
        stderr
            .extend_from_slice(format!("\n[harness] killed after {limit:?}: {cmd:?}\n").as_bytes());
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// `virsh -c <uri> <args…>` (stdin closed, 180 s limit).
pub fn virsh(uri: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("virsh");
    cmd.arg("-c").arg(uri).args(args).stdin(Stdio::null());
    output_with_timeout(&mut cmd, CLIENT_TIMEOUT)
}

/// `virsh -r -c <uri> <args…>` (read-only open).
pub fn virsh_ro(uri: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("virsh");
    cmd.arg("-r")
        .arg("-c")
        .arg(uri)
        .args(args)
        .stdin(Stdio::null());
    output_with_timeout(&mut cmd, CLIENT_TIMEOUT)
}

/// Path of a client script in `tests/py`.
pub fn py_script(script: &str) -> PathBuf {
    Path::new(MANIFEST_DIR).join("tests/py").join(script)
}

/// The command for `/usr/bin/python3 tests/py/<script> <args…>`, for callers that need
/// to change it (stdin pipe, environment) before running it.
pub fn py_command(script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(py_script(script)).args(args);
    cmd
}

/// Same, run as another user: `runuser -u <user> -- /usr/bin/python3 tests/py/<script> …`.
pub fn py_command_as(user: &str, script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.arg("-u")
        .arg(user)
        .arg("--")
        .arg(PYTHON)
        .arg(py_script(script))
        .args(args);
    cmd
}

/// Runs `/usr/bin/python3 tests/py/<script> <args…>` (stdin closed, 180 s limit). Each
/// script exits 0 only when its assertions hold and prints `FAIL <script>: <reason>`
/// otherwise.
pub fn py(script: &str, args: &[&str]) -> Output {
    let mut cmd = py_command(script, args);
    cmd.stdin(Stdio::null());
    output_with_timeout(&mut cmd, CLIENT_TIMEOUT)
}

/// `virt-admin -c libvirtd:///system?socket=<daemon admin sock> <args…>`.
pub fn virt_admin(daemon: &Daemon, args: &[&str]) -> Output {
    virt_admin_sock(&daemon.admin_sock, args)
}

/// virt-admin against any admin socket (e.g. a proxy's, if it has one).
pub fn virt_admin_sock(admin_sock: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("virt-admin");
    cmd.arg("-c")
        .arg(format!(
            "libvirtd:///system?socket={}",
            admin_sock.display()
        ))
        .args(args)
        .stdin(Stdio::null());
    output_with_timeout(&mut cmd, CLIENT_TIMEOUT)
}

/// The daemon's current clients on server `libvirtd`: `(id, client-info text)` each.
/// `client-info` has lines like `unix_user_id   : 1001`, `unix_process_id: 4242`.
pub fn admin_clients(daemon: &Daemon) -> Vec<(u64, String)> {
    clients_via(|args| virt_admin(daemon, args), "libvirtd")
}

/// A server's clients through `virt_admin` (any admin socket): `(id, client-info text)` each.
pub fn clients_via(virt_admin: impl Fn(&[&str]) -> Output, server: &str) -> Vec<(u64, String)> {
    let list = virt_admin(&["srv-clients-list", server]);
    assert_success(&list, &format!("virt-admin srv-clients-list {server}"));
    let ids: Vec<u64> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().and_then(|w| w.parse().ok()))
        .collect();
    ids.into_iter()
        .filter_map(|id| {
            let info = virt_admin(&["client-info", server, &id.to_string()]);
            // a client may disconnect between the two calls
            info.status
                .success()
                .then(|| (id, String::from_utf8_lossy(&info.stdout).into_owned()))
        })
        .collect()
}

/// The value of `key` in virt-admin `client-info` text (`key : value` lines).
pub fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// Panics with the command's stdout/stderr unless it exited 0.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// stdout as a String.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as a String.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------
// Processes and polling
// ---------------------------------------------------------------------------------------

/// Number of open fds of `pid` (entries of /proc/pid/fd); 0 if the process is gone.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Number of threads of `pid` (0 if gone).
pub fn threads(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Polls `f` every 20 ms until it returns true (→ true) or `deadline` has passed (→ false).
pub fn wait_for(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
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

/// Last `lines` lines of a text file ("" if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// A directory for a dir storage pool (unique, world-traversable, removed on drop).
/// libvirt refuses two pools with the same target path, so use one per test.
pub fn pool_dir() -> TempDir {
    let d = tempfile::Builder::new()
        .prefix("vpd-pool-")
        .tempdir()
        .expect("create pool dir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).expect("chmod pool dir");
    d
}

/// Kills this process's daemon with SIGKILL (as a crash would) and waits until it is gone.
#[allow(dead_code)]
pub fn crash_daemon(d: &Daemon, pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    assert!(
        wait_for(Duration::from_secs(10), || !process_alive(pid)),
        "daemon {pid} survived SIGKILL"
    );
    let _ = d;
}

/// Starts the daemon again in the same state directory (same socket paths); returns its pid.
#[allow(dead_code)]
pub fn restart_daemon(d: &Daemon) -> u32 {
    let mut cmd = Command::new(script_path());
    cmd.arg("start")
        .arg(&d.state_dir)
        .arg("--watch-pid")
        .arg(std::process::id().to_string())
        .env(
            "VPD_QEMU_CAPS_CACHE",
            Path::new(TARGET_TMPDIR).join("qemu-caps-cache"),
        )
        .stdin(Stdio::null());
    let out = output_with_timeout(&mut cmd, Duration::from_secs(150));
    assert_success(&out, "private-libvirtd.sh start (restart)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| l.trim().parse::<u32>().ok())
        .expect("restart printed no pid")
}

/// The daemon's current pid (it changes across `restart_daemon`).
#[allow(dead_code)]
pub fn daemon_pid_now(d: &Daemon) -> u32 {
    fs::read_to_string(d.state_dir.join("libvirtd.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(d.pid)
}
pub mod modular;
pub mod pki;

/// A REMOTE-program frame, for tests that speak the wire protocol themselves.
#[allow(dead_code)]
pub fn frame_status(proc_: i32, mtype: u32, serial: u32, status: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(28 + body.len());
    for v in [
        (28 + body.len()) as u32,
        0x2000_8086,
        1,
        proc_ as u32,
        mtype,
        serial,
        status,
    ] {
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(body);
    f
}

/// A REMOTE-program frame with status OK.
#[allow(dead_code)]
pub fn frame(proc_: i32, mtype: u32, serial: u32, body: &[u8]) -> Vec<u8> {
    frame_status(proc_, mtype, serial, 0, body)
}

/// Reads one whole frame; None on EOF, error or timeout.
#[allow(dead_code)]
pub fn read_frame(r: &mut impl std::io::Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let n = (u32::from_be_bytes(len) as usize).checked_sub(4)?;
    let mut rest = vec![0u8; n];
    r.read_exact(&mut rest).ok()?;
    Some([len.to_vec(), rest].concat())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
/// A loopback port free now and never handed out before in this test binary, below the
/// kernel's ephemeral range (32768-60999): a port from bind(0) is an ephemeral one, which
/// any outgoing connection (another test's scrape, say) may take as its local port before
/// the proxy meant to have it binds it, and the proxy then fails its start after its UNIX
/// sockets already answered.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    // Held while probing: no two tests race for the same number here.
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Spread test binaries over the range by their pid.
    let start = 20_000 + (std::process::id() % 600) as u16 * 20;
    for i in 0..12_000u16 {
        let port = 20_000 + (start - 20_000 + i) % 12_000;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between 20000 and 31999");
}

/// One test per io backend, named `<scenario>::io_uring` and `<scenario>::epoll` (use with
/// `#[macro_use] mod support;`).
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn io_uring() {
                super::$scenario("io_uring");
            }
            #[test]
            fn epoll() {
                super::$scenario("epoll");
            }
        }
    )*};
}

/// A python3-libvirt client script that holds its connections open between steps: each step
/// prints one line, then waits for a line on stdin (see `next`).
#[allow(dead_code)]
pub struct Held {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

#[allow(dead_code)]
impl Held {
    /// Runs `script` with `args` and returns it with the first line it printed.
    pub fn start(script: &str, args: &[&str]) -> (Held, String) {
        let mut child = Command::new(PYTHON)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a python client");
        let out = std::io::BufReader::new(child.stdout.take().expect("its stdout"));
        let mut held = Held { child, out };
        let first = held.line();
        (held, first)
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.out, &mut line).expect("a line from the client");
        line
    }

    /// Lets the script go on to its next step; returns the line that step printed.
    pub fn next(&mut self) -> String {
        std::io::Write::write_all(self.child.stdin.as_mut().expect("its stdin"), b"\n")
            .expect("write to the client");
        self.line()
    }

    /// Lets the script finish; whether it exited 0.
    pub fn finish(mut self) -> bool {
        drop(self.child.stdin.take());
        self.child.wait().is_ok_and(|s| s.success())
    }
}

/// The go-libvirt client (`tests/go/golibvirt-workload`), built once per machine by
/// scripts/golibvirt.sh.
pub fn golibvirt_bin() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let o = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/golibvirt.sh"))
            .output()
            .expect("run scripts/golibvirt.sh");
        assert_success(&o, "scripts/golibvirt.sh");
        PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
    })
}

/// A Cyrus SASL config for the service "libvirt" in `dir`: SCRAM-SHA-256 over a sasldb
/// holding `users` (name, password), written by saslpasswd2. Point SASL_CONF_PATH at `dir`.
pub fn sasl_scram_conf(dir: &Path, users: &[(&str, &str)]) {
    use std::io::Write;
    let db = dir.join("passwd.db");
    for (user, pass) in users {
        let mut child = Command::new("saslpasswd2")
            .args(["-p", "-c", "-a", "libvirt", "-f"])
            .arg(&db)
            .arg(user)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("saslpasswd2 (sasl2-bin)");
        child
            .stdin
            .take()
            .expect("saslpasswd2's stdin")
            .write_all(format!("{pass}\n").as_bytes())
            .expect("write the password to saslpasswd2");
        assert_success(
            &child.wait_with_output().expect("wait for saslpasswd2"),
            "saslpasswd2",
        );
    }
    fs::write(
        dir.join("libvirt.conf"),
        format!("mech_list: scram-sha-256\nsasldb_path: {}\n", db.display()),
    )
    .expect("write libvirt.conf");
}
