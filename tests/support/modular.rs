//! libvirt 9.0.0's modular daemons (`scripts/modular-testbed.sh`): virtqemud, virtstoraged,
//! virtnetworkd, virtsecretd and libvirt's own virtproxyd, started once per test process in
//! a private mount namespace and stopped when the process exits (`--watch-pid`). Proxies
//! reach them through `driver_socket_dir` alone, as on a Fedora/RHEL host.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{assert_success, output_with_timeout, Proxy, MANIFEST_DIR};

#[derive(Debug)]
pub struct Testbed {
    /// STATE_DIR of the script: `<daemon>.log`, `<daemon>.pid`, `ns/`.
    pub state: PathBuf,
    /// The daemons' socket directory, seen from outside the namespace.
    pub sock_dir: PathBuf,
}

fn script() -> PathBuf {
    Path::new(MANIFEST_DIR).join("scripts/modular-testbed.sh")
}

impl Testbed {
    pub fn sock(&self, name: &str) -> PathBuf {
        self.sock_dir.join(name)
    }

    /// Client URI straight to a driver daemon's socket (no proxy).
    pub fn direct_uri(&self, scheme_path: &str, daemon: &str) -> String {
        super::unix_uri(scheme_path, &self.sock(&format!("{daemon}-sock")))
    }

    /// libvirt's own virtproxyd: its rw and ro sockets.
    pub fn libvirt_proxy_rw(&self) -> PathBuf {
        self.sock("libvirt-sock")
    }
    pub fn libvirt_proxy_ro(&self) -> PathBuf {
        self.sock("libvirt-sock-ro")
    }

    /// virt-admin against a daemon's admin socket (server name = the daemon's name).
    pub fn virt_admin(&self, daemon: &str, args: &[&str]) -> Output {
        let sock = if daemon == "virtproxyd" {
            self.sock("libvirt-admin-sock")
        } else {
            self.sock(&format!("{daemon}-admin-sock"))
        };
        let mut cmd = Command::new("virt-admin");
        cmd.arg("-c")
            .arg(format!("{daemon}:///system?socket={}", sock.display()))
            .args(args)
            .stdin(Stdio::null());
        output_with_timeout(&mut cmd, super::CLIENT_TIMEOUT)
    }

    /// A daemon's current clients: `(id, client-info text)` each.
    pub fn clients(&self, daemon: &str) -> Vec<(u64, String)> {
        super::clients_via(|args| self.virt_admin(daemon, args), daemon)
    }

    /// The daemon's pid now (it changes across `restart`).
    pub fn pid(&self, daemon: &str) -> u32 {
        std::fs::read_to_string(self.state.join(format!("{daemon}.pid")))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no pid for {daemon}"))
    }

    pub fn log_tail(&self, daemon: &str, lines: usize) -> String {
        super::tail(&self.state.join(format!("{daemon}.log")), lines)
    }

    fn run_script(&self, verb: &str, daemon: &str) {
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .arg(verb)
            .arg(&self.state)
            .arg(daemon)
            .stdin(Stdio::null());
        let o = output_with_timeout(&mut cmd, Duration::from_secs(60));
        assert_success(&o, &format!("modular-testbed.sh {verb} {daemon}"));
    }

    /// SIGKILL, as a crash would; the daemon stays down.
    pub fn kill(&self, daemon: &str) {
        self.run_script("kill", daemon);
    }

    /// SIGKILL if running, then start it again with the same sockets.
    pub fn restart(&self, daemon: &str) {
        self.run_script("restart", daemon);
    }
}

/// The test bed of this test process, started on first use.
pub fn testbed() -> &'static Testbed {
    static TB: OnceLock<Result<Testbed, String>> = OnceLock::new();
    match TB.get_or_init(start) {
        Ok(t) => t,
        Err(e) => panic!("modular test bed unavailable: {e}"),
    }
}

/// Extra lines for libvirt's virtproxyd's config and extra environment for every daemon of
/// the bed (see [`testbed_with`]).
static EXTRA: OnceLock<(String, Vec<(String, String)>)> = OnceLock::new();

/// The test bed with `proxy_conf` added to libvirt's virtproxyd's config (first, so it wins)
/// and `envs` in every daemon's environment. A test process uses one kind of bed; the first
/// call starts it.
pub fn testbed_with(proxy_conf: &str, envs: &[(&str, &str)]) -> &'static Testbed {
    let _ = EXTRA.set((
        proxy_conf.to_string(),
        envs.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    ));
    testbed()
}

static DEFAULT_AUTH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The test bed with libvirt's virtproxyd on its compiled-in auth (polkit for root, sockets
/// 0777), as with an untouched virtproxyd.conf. A test process uses either this or
/// [`testbed`] (the first call starts the bed).
pub fn testbed_default_auth() -> &'static Testbed {
    DEFAULT_AUTH.store(true, std::sync::atomic::Ordering::SeqCst);
    testbed()
}

fn start() -> Result<Testbed, String> {
    // Socket paths must stay short (108 bytes); the script wants STATE_DIR <= 60.
    let state = PathBuf::from(format!("/tmp/vpd-tb-{}", std::process::id()));
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .arg("start")
        .arg(&state)
        .args(["--watch-pid", &std::process::id().to_string()])
        .stdin(Stdio::null());
    if DEFAULT_AUTH.load(std::sync::atomic::Ordering::SeqCst) {
        cmd.env("VPD_MODULAR_PROXY_DEFAULT_AUTH", "1");
    }
    if let Some((conf, envs)) = EXTRA.get() {
        cmd.env("VPD_MODULAR_PROXY_CONF", conf);
        cmd.envs(envs.iter().map(|(k, v)| (k, v)));
    }
    let o = output_with_timeout(&mut cmd, Duration::from_secs(180));
    if !o.status.success() {
        return Err(format!(
            "modular-testbed.sh start failed (run `scripts/modular-testbed.sh build` once): {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let run = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    Ok(Testbed {
        state,
        sock_dir: run.join("libvirt"),
    })
}

/// A proxy in front of the test bed, routed by `driver_socket_dir` only.
pub fn proxy(extra_conf: &str, envs: &[(&str, &str)]) -> Proxy {
    let tb = testbed();
    Proxy::start_with(
        &format!(
            "{extra_conf}\nunix_sock_rw_perms = \"0777\"\nunix_sock_ro_perms = \"0777\"\n\
             driver_socket_dir = \"{}\"\n",
            tb.sock_dir.display()
        ),
        envs,
    )
}

/// `proxy`, running the binary at `bin`.
#[allow(dead_code)]
pub fn proxy_with_binary(bin: &std::path::Path, extra_conf: &str, envs: &[(&str, &str)]) -> Proxy {
    let tb = testbed();
    Proxy::start_binary(
        bin,
        &format!(
            "{extra_conf}\nunix_sock_rw_perms = \"0777\"\nunix_sock_ro_perms = \"0777\"\n\
             driver_socket_dir = \"{}\"\n",
            tb.sock_dir.display()
        ),
        envs,
    )
}

/// One proxy per io backend.
pub fn proxies(extra_conf: &str) -> Vec<(&'static str, Proxy)> {
    ["io_uring", "epoll"]
        .into_iter()
        .map(|b| (b, proxy(extra_conf, &[("VIRTPROXYD_IO_BACKEND", b)])))
        .collect()
}

/// Tests that take a daemon down hold this exclusively; every other test shares it, so no
/// test sees a daemon vanish that it did not stop itself.
fn daemons_lock() -> &'static std::sync::RwLock<()> {
    static L: std::sync::RwLock<()> = std::sync::RwLock::new(());
    &L
}

pub fn daemons_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    daemons_lock().read().unwrap_or_else(|e| e.into_inner())
}

pub fn daemons_exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    daemons_lock().write().unwrap_or_else(|e| e.into_inner())
}
