//! `virtproxyd.conf`: libvirt-syntax parsing ([`virconf`]) and the typed [`Config`].
//!
//! Every key libvirt 9.0.0's virtproxyd reads (libvirt-rpc.md §7.2) is parsed and
//! type-checked with libvirt's defaults, even where this daemon does not act on it
//! yet, so that a file libvirt would refuse is refused here too. Our own keys
//! (`driver_socket_dir`, `driver_sockets`, `io_backend`, `worker_threads`, `metrics_listen`) follow
//! the same syntax. File contents are never logged: only key names and line
//! numbers appear in errors.

pub mod virconf;

mod keys;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::listen::ListenerKind;

/// Environment variable that overrides the `io_backend` key.
pub const IO_BACKEND_ENV: &str = "VIRTPROXYD_IO_BACKEND";

/// Client authentication scheme for one listener (`auth_*` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No authentication beyond the transport (UNIX permissions, TLS certificates).
    None,
    /// SASL authentication.
    Sasl,
    /// polkit authorisation (UNIX sockets only).
    Polkit,
}

impl Auth {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Sasl => "sasl",
            Auth::Polkit => "polkit",
        }
    }
}

/// Which event loop the reactor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring when it can be set up, epoll otherwise.
    Auto,
    /// io_uring only; startup fails if it is unavailable.
    IoUring,
    /// epoll only (for tests and kernels/containers that block io_uring).
    Epoll,
}

impl IoBackend {
    /// Parse `"auto"`, `"io_uring"` or `"epoll"`.
    pub fn parse(s: &str) -> Option<IoBackend> {
        match s {
            "auto" => Some(IoBackend::Auto),
            "io_uring" => Some(IoBackend::IoUring),
            "epoll" => Some(IoBackend::Epoll),
            _ => None,
        }
    }
}

/// One address of the metrics endpoint (`metrics_listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// `host:port` (`[v6]:port` for IPv6 literals); the host is resolved when binding and
    /// every address it resolves to is bound.
    Tcp { host: String, port: u16 },
    /// An absolute UNIX socket path.
    Unix(PathBuf),
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            MetricsListen::Tcp { host, port } => write!(f, "{host}:{port}"),
            MetricsListen::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl MetricsListen {
    /// Parses one entry: an absolute path, or `host:port` with a port in 1..=65535.
    pub fn parse(s: &str) -> Option<MetricsListen> {
        if s.starts_with('/') {
            return Some(MetricsListen::Unix(PathBuf::from(s)));
        }
        let (host, port) = s.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
        let host = match host.strip_prefix('[') {
            Some(h) => h.strip_suffix(']')?,
            // An IPv6 literal must be bracketed, or its last group would read as the port.
            None if host.contains(':') => return None,
            None => host,
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return None;
        }
        Some(MetricsListen::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

/// Where the host UUID comes from when `host_uuid` is unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostUuidSource {
    /// The SMBIOS system UUID.
    Smbios,
    /// `/etc/machine-id`.
    MachineId,
}

/// The parts of the process environment that change defaults.
///
/// Kept as plain data so that tests can describe root and session setups
/// without touching the real environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    /// Running as root: system paths and the read-only socket.
    pub privileged: bool,
    /// The user's home directory.
    pub home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR` (only absolute values are kept).
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$XDG_CONFIG_HOME` (only absolute values are kept).
    pub xdg_config_home: Option<PathBuf>,
    /// `$VIRTPROXYD_IO_BACKEND`, which overrides the `io_backend` key.
    pub io_backend_override: Option<String>,
}

impl Env {
    /// Read the environment of the current process.
    pub fn from_process() -> Env {
        // The XDG spec says relative or empty values must be ignored.
        let abs = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        let home = abs("HOME").or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
                .filter(|p| p.is_absolute())
        });
        Env {
            privileged: nix::unistd::geteuid().is_root(),
            home,
            xdg_runtime_dir: abs("XDG_RUNTIME_DIR"),
            xdg_config_home: abs("XDG_CONFIG_HOME"),
            io_backend_override: std::env::var(IO_BACKEND_ENV).ok(),
        }
    }

    fn home(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(|| PathBuf::from("/"))
    }

    /// `/run/libvirt` for root, else `$XDG_RUNTIME_DIR/libvirt` or `~/.cache/libvirt`
    /// (glib's fallback when there is no runtime dir).
    fn run_dir(&self) -> PathBuf {
        if self.privileged {
            return PathBuf::from("/run/libvirt");
        }
        match &self.xdg_runtime_dir {
            Some(d) => d.join("libvirt"),
            None => self.home().join(".cache/libvirt"),
        }
    }
}

/// A configuration error: `FILE:LINE: reason`, or `FILE: reason` when no single
/// line is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The config file (empty when the config did not come from a file).
    pub file: PathBuf,
    /// 1-based line, 0 when not line-specific.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    fn new(file: &Path, line: usize, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            line,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.file.as_os_str().is_empty(), self.line) {
            (true, _) => write!(f, "{}", self.reason),
            (false, 0) => write!(f, "{}: {}", self.file.display(), self.reason),
            (false, n) => write!(f, "{}:{}: {}", self.file.display(), n, self.reason),
        }
    }
}

/// Where a [`Config`] came from, for error messages.
///
/// This is metadata, not configuration: it compares equal to any other
/// `Origin`, so two configs with the same settings are equal whatever file
/// they were read from.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The file, if the config was read from one.
    pub file: Option<PathBuf>,
    /// First line of each key present in the file.
    pub key_lines: Vec<(String, usize)>,
}

impl PartialEq for Origin {
    fn eq(&self, _: &Origin) -> bool {
        true
    }
}

impl Origin {
    /// The line on which `key` was set, if it came from the file.
    pub fn line_of(&self, key: &str) -> Option<usize> {
        self.key_lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|&(_, l)| l)
    }
}

/// The typed daemon configuration. Field names are the config keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    // --- network listeners ---
    /// Listen for TLS connections (`tls_port`). virtproxyd default: off.
    pub listen_tls: bool,
    /// Listen for plain TCP connections (`tcp_port`).
    pub listen_tcp: bool,
    /// TLS port number or service name.
    pub tls_port: String,
    /// TCP port number or service name.
    pub tcp_port: String,
    /// Address to listen on; `None` = all addresses.
    pub listen_addr: Option<String>,

    // --- UNIX sockets ---
    /// Group owning the sockets; `None` = no chown.
    pub unix_sock_group: Option<String>,
    /// Mode of the read-only socket.
    pub unix_sock_ro_perms: u32,
    /// Mode of the read-write socket: 0777 when `auth_unix_rw` is polkit (root's default),
    /// else 0700, unless the file sets it.
    pub unix_sock_rw_perms: u32,
    /// Mode of the admin socket.
    pub unix_sock_admin_perms: u32,
    /// Directory holding `libvirt-sock`, `libvirt-sock-ro`, `libvirt-admin-sock`.
    pub unix_sock_dir: PathBuf,
    /// Whether the admin socket is created. libvirt omits it for a session
    /// daemon whose `unix_sock_dir` was set explicitly (§8.1).
    pub admin_sock_enabled: bool,

    // --- authentication and access control ---
    /// Auth on the read-write UNIX socket.
    pub auth_unix_rw: Auth,
    /// Auth on the read-only UNIX socket.
    pub auth_unix_ro: Auth,
    /// Auth on the TCP listener (SASL by default, as in libvirt).
    pub auth_tcp: Auth,
    /// Auth on the TLS listener.
    pub auth_tls: Auth,
    /// Access-control drivers (`["none"]` when unset).
    pub access_drivers: Vec<String>,

    // --- TLS ---
    /// CA certificate file.
    pub ca_file: PathBuf,
    /// Server certificate file.
    pub cert_file: PathBuf,
    /// Server private key file.
    pub key_file: PathBuf,
    /// CA revocation list; loaded only if the file exists. `None` when the
    /// TLS files were set explicitly without `crl_file`.
    pub crl_file: Option<PathBuf>,
    /// Session defaults only: fall back to the system paths when the files in
    /// `~/.pki/libvirt` are missing (CA and CRL each, cert and key as a pair).
    pub tls_fallback_to_system: bool,
    /// Skip the sanity checks on our own certificate.
    pub tls_no_sanity_certificate: bool,
    /// Accept clients whose certificate does not verify.
    pub tls_no_verify_certificate: bool,
    /// Allowed client DN patterns; `None` = any, empty = nobody.
    pub tls_allowed_dn_list: Option<Vec<String>>,
    /// TLS priority string (gnutls syntax in libvirt).
    pub tls_priority: String,
    /// Minimum SASL security strength factor on TCP.
    pub tcp_min_ssf: u32,
    /// Allowed SASL usernames; `None` = any, empty = nobody.
    pub sasl_allowed_username_list: Option<Vec<String>>,

    // --- limits ---
    /// Minimum worker threads (libvirt thread pool).
    pub min_workers: u32,
    /// Maximum worker threads; at least 1.
    pub max_workers: u32,
    /// Priority worker threads.
    pub prio_workers: u32,
    /// Maximum clients across all listeners.
    pub max_clients: u32,
    /// listen() backlog (0 means 30).
    pub max_queued_clients: u32,
    /// Maximum clients not yet authenticated; 0 = unlimited.
    pub max_anonymous_clients: u32,
    /// In-flight requests per client.
    pub max_client_requests: u32,
    /// Admin server: minimum workers.
    pub admin_min_workers: u32,
    /// Admin server: maximum workers.
    pub admin_max_workers: u32,
    /// Admin server: maximum clients.
    pub admin_max_clients: u32,
    /// Admin server: listen() backlog.
    pub admin_max_queued_clients: u32,
    /// Admin server: in-flight requests per client.
    pub admin_max_client_requests: u32,

    // --- keepalive ---
    /// Seconds between server pings; -1 disables them.
    pub keepalive_interval: i32,
    /// Unanswered pings before the client is dropped.
    pub keepalive_count: u32,
    /// Admin server: keepalive interval.
    pub admin_keepalive_interval: i32,
    /// Admin server: keepalive count.
    pub admin_keepalive_count: u32,

    // --- logging, audit, misc ---
    /// 0 = library default, 1 debug … 4 error.
    pub log_level: u32,
    /// libvirt log filter string.
    pub log_filters: Option<String>,
    /// libvirt log output string.
    pub log_outputs: Option<String>,
    /// 0 off, 1 on, 2 fail to start if auditing is unavailable.
    pub audit_level: u32,
    /// Also send audit records to the log.
    pub audit_logging: bool,
    /// Fixed host UUID.
    pub host_uuid: Option<String>,
    /// Source of the host UUID when `host_uuid` is unset.
    pub host_uuid_source: HostUuidSource,
    /// Open vSwitch command timeout in seconds.
    pub ovs_timeout: u32,

    // --- our own keys ---
    /// Directory of the per-driver daemon sockets (`virtqemud-sock`, …).
    pub driver_socket_dir: PathBuf,
    /// Explicit URI-scheme → driver socket routes, in file order.
    pub driver_sockets: Vec<(String, PathBuf)>,
    /// Reactor backend (`$VIRTPROXYD_IO_BACKEND` wins over the file).
    pub io_backend: IoBackend,
    /// Reactor worker threads; 0 = one per two CPUs, at least one.
    pub worker_threads: u32,
    /// Where the metrics endpoint listens; empty = off (the default).
    pub metrics_listen: Vec<MetricsListen>,
    /// Whether a restart hands the relayed connections to the next process (`SIGUSR2`, or
    /// `SIGTERM` into systemd's fd store); on by default.
    pub restart_handover: bool,

    // --- not keys ---
    /// Whether the defaults were computed for root.
    pub privileged: bool,
    /// Keys present in the file but not read, in file order (log them at debug).
    pub unknown_keys: Vec<String>,
    /// File and key lines, for error messages; ignored by `==`.
    pub origin: Origin,
}

impl Config {
    /// Built-in defaults for `env`. Does not apply `$VIRTPROXYD_IO_BACKEND`
    /// (that can fail, so [`Config::from_text`] and [`Config::load`] do it).
    pub fn defaults(env: &Env) -> Config {
        let (ca_file, crl_file, cert_file, key_file) = if env.privileged {
            (
                PathBuf::from("/etc/pki/CA/cacert.pem"),
                PathBuf::from("/etc/pki/CA/cacrl.pem"),
                PathBuf::from("/etc/pki/libvirt/servercert.pem"),
                PathBuf::from("/etc/pki/libvirt/private/serverkey.pem"),
            )
        } else {
            let pki = env.home().join(".pki/libvirt");
            (
                pki.join("cacert.pem"),
                pki.join("cacrl.pem"),
                pki.join("servercert.pem"),
                pki.join("serverkey.pem"),
            )
        };
        Config {
            listen_tls: false,
            listen_tcp: false,
            tls_port: "16514".into(),
            tcp_port: "16509".into(),
            listen_addr: None,
            unix_sock_group: None,
            unix_sock_ro_perms: 0o777,
            // libvirt opens the rw socket to everyone when polkit guards it.
            unix_sock_rw_perms: if env.privileged { 0o777 } else { 0o700 },
            unix_sock_admin_perms: 0o700,
            unix_sock_dir: env.run_dir(),
            admin_sock_enabled: true,
            // libvirt's polkit+SASL build (every distribution's): polkit on the system
            // sockets, none for a session daemon, SASL on plain TCP.
            auth_unix_rw: if env.privileged {
                Auth::Polkit
            } else {
                Auth::None
            },
            auth_unix_ro: if env.privileged {
                Auth::Polkit
            } else {
                Auth::None
            },
            auth_tcp: Auth::Sasl,
            auth_tls: Auth::None,
            access_drivers: vec!["none".into()],
            ca_file,
            cert_file,
            key_file,
            crl_file: Some(crl_file),
            tls_fallback_to_system: !env.privileged,
            tls_no_sanity_certificate: false,
            tls_no_verify_certificate: false,
            tls_allowed_dn_list: None,
            tls_priority: "NORMAL".into(),
            tcp_min_ssf: 56,
            sasl_allowed_username_list: None,
            min_workers: 5,
            max_workers: 20,
            prio_workers: 5,
            max_clients: 5000,
            max_queued_clients: 1000,
            max_anonymous_clients: 20,
            max_client_requests: 5,
            admin_min_workers: 5,
            admin_max_workers: 20,
            admin_max_clients: 5000,
            admin_max_queued_clients: 20,
            admin_max_client_requests: 5,
            keepalive_interval: 5,
            keepalive_count: 5,
            admin_keepalive_interval: 5,
            admin_keepalive_count: 5,
            log_level: 0,
            log_filters: None,
            log_outputs: None,
            audit_level: 1,
            audit_logging: false,
            host_uuid: None,
            host_uuid_source: HostUuidSource::Smbios,
            ovs_timeout: 5,
            driver_socket_dir: env.run_dir(),
            driver_sockets: Vec::new(),
            io_backend: IoBackend::Auto,
            worker_threads: 0,
            metrics_listen: Vec::new(),
            restart_handover: true,
            privileged: env.privileged,
            unknown_keys: Vec::new(),
            origin: Origin::default(),
        }
    }

    /// Parse `text` (the contents of `file`, which is only used in messages).
    pub fn from_text(text: &str, file: &Path, env: &Env) -> Result<Config, ConfigError> {
        let conf = virconf::parse(text).map_err(|e| ConfigError::new(file, e.line, e.message))?;
        let mut cfg = Config::defaults(env);
        keys::apply(&conf, file, &mut cfg)?;
        cfg.origin = Origin {
            file: Some(file.to_path_buf()),
            key_lines: conf
                .keys()
                .filter_map(|k| Some((k.to_string(), conf.line_of(k)?)))
                .collect(),
        };
        if let Some(v) = &env.io_backend_override {
            cfg.io_backend = IoBackend::parse(v).ok_or_else(|| {
                ConfigError::new(
                    file,
                    0,
                    format!("{IO_BACKEND_ENV} must be \"auto\", \"io_uring\" or \"epoll\""),
                )
            })?;
        }
        Ok(cfg)
    }

    /// Read the config file. With `None` the default path is used and a missing
    /// file means defaults; an explicit path must exist.
    pub fn load(path: Option<&Path>, env: &Env) -> Result<Config, ConfigError> {
        let (file, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (Config::default_path(env), false),
        };
        let text = match read_limited(&file) {
            Ok(t) => t,
            Err(ReadError::Io(e)) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(path = %file.display(), "no config file, using defaults");
                String::new()
            }
            Err(ReadError::Io(e)) => {
                return Err(ConfigError::new(
                    &file,
                    0,
                    format!("cannot read config file: {e}"),
                ))
            }
            Err(ReadError::TooLarge) => {
                return Err(ConfigError::new(
                    &file,
                    0,
                    format!(
                        "config file is larger than {} bytes",
                        virconf::MAX_INPUT_LEN
                    ),
                ))
            }
            Err(ReadError::NotUtf8(line)) => {
                return Err(ConfigError::new(
                    &file,
                    line,
                    "config file is not valid UTF-8",
                ))
            }
        };
        Config::from_text(&text, &file, env)
    }

    /// `/etc/libvirt/virtproxyd.conf` for root, else
    /// `$XDG_CONFIG_HOME/libvirt/virtproxyd.conf` (default `~/.config`).
    pub fn default_path(env: &Env) -> PathBuf {
        if env.privileged {
            return PathBuf::from("/etc/libvirt/virtproxyd.conf");
        }
        let base = env
            .xdg_config_home
            .clone()
            .unwrap_or_else(|| env.home().join(".config"));
        base.join("libvirt/virtproxyd.conf")
    }

    /// The auth key and value that apply to a listener of `kind` (the admin socket has none).
    pub fn auth_for(&self, kind: ListenerKind) -> (&'static str, Auth) {
        match kind {
            ListenerKind::UnixRw => ("auth_unix_rw", self.auth_unix_rw),
            ListenerKind::UnixRo => ("auth_unix_ro", self.auth_unix_ro),
            ListenerKind::UnixAdmin => ("", Auth::None),
            ListenerKind::Tcp => ("auth_tcp", self.auth_tcp),
            ListenerKind::Tls => ("auth_tls", self.auth_tls),
        }
    }

    /// Path of the read-write socket.
    pub fn rw_socket_path(&self) -> PathBuf {
        self.unix_sock_dir.join("libvirt-sock")
    }

    /// Path of the read-only socket; session daemons have none.
    pub fn ro_socket_path(&self) -> Option<PathBuf> {
        self.privileged
            .then(|| self.unix_sock_dir.join("libvirt-sock-ro"))
    }

    /// Path of the admin socket, when one is created.
    pub fn admin_socket_path(&self) -> Option<PathBuf> {
        self.admin_sock_enabled
            .then(|| self.unix_sock_dir.join("libvirt-admin-sock"))
    }
}

enum ReadError {
    Io(std::io::Error),
    TooLarge,
    /// Line of the first invalid byte.
    NotUtf8(usize),
}

/// Read at most [`virconf::MAX_INPUT_LEN`] bytes, so a huge or endless file
/// (e.g. `/dev/zero`) cannot exhaust memory.
fn read_limited(path: &Path) -> Result<String, ReadError> {
    let f = std::fs::File::open(path).map_err(ReadError::Io)?;
    let mut buf = Vec::new();
    f.take(virconf::MAX_INPUT_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(ReadError::Io)?;
    if buf.len() > virconf::MAX_INPUT_LEN {
        return Err(ReadError::TooLarge);
    }
    String::from_utf8(buf).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = 1 + bytes[..valid.min(bytes.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        ReadError::NotUtf8(line)
    })
}
