//! Mapping of config keys to typed [`Config`] fields, with libvirt's type rules:
//! booleans are the integers 0/1, unsigned keys refuse negatives, string keys
//! refuse numbers (ports must be quoted) and a wrong type is fatal.

use std::path::{Path, PathBuf};

use super::virconf::{Value, VirConf};
use super::{Auth, Config, ConfigError, HostUuidSource, IoBackend, MetricsListen};

/// Every key this daemon reads; anything else in the file is reported in
/// [`Config::unknown_keys`] and otherwise ignored, as libvirt does.
#[rustfmt::skip]
pub(super) const KNOWN_KEYS: &[&str] = &[
    "listen_tls", "listen_tcp", "tls_port", "tcp_port", "listen_addr",
    "unix_sock_group", "unix_sock_ro_perms", "unix_sock_rw_perms", "unix_sock_admin_perms",
    "unix_sock_dir", "auth_unix_rw", "auth_unix_ro", "auth_tcp", "auth_tls", "access_drivers",
    "key_file", "cert_file", "ca_file", "crl_file", "tls_no_sanity_certificate",
    "tls_no_verify_certificate", "tls_allowed_dn_list", "tls_priority", "tcp_min_ssf",
    "sasl_allowed_username_list", "min_workers", "max_workers", "prio_workers", "max_clients",
    "max_queued_clients", "max_anonymous_clients", "max_client_requests", "admin_min_workers",
    "admin_max_workers", "admin_max_clients", "admin_max_queued_clients",
    "admin_max_client_requests", "keepalive_interval", "keepalive_count",
    "admin_keepalive_interval", "admin_keepalive_count", "log_level", "log_filters",
    "log_outputs", "audit_level", "audit_logging", "host_uuid", "host_uuid_source",
    "ovs_timeout", "driver_socket_dir", "driver_sockets", "io_backend", "worker_threads",
    "metrics_listen", "restart_handover",
];

/// Typed access to a parsed file, producing errors that name the key and line.
struct Reader<'a> {
    conf: &'a VirConf,
    file: &'a Path,
}

impl Reader<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, self.conf.line_of(key).unwrap_or(0), reason)
    }

    /// A 0/1 integer.
    fn bool(&self, key: &str, out: &mut bool) -> Result<(), ConfigError> {
        match self.conf.get(key) {
            None => Ok(()),
            Some(Value::Int(v @ (0 | 1))) => {
                *out = *v == 1;
                Ok(())
            }
            Some(Value::Int(_)) => {
                Err(self.err(key, format!("value for '{key}' parameter must be 0 or 1")))
            }
            Some(_) => Err(self.err(
                key,
                format!("expected a number (0 or 1) for '{key}' parameter"),
            )),
        }
    }

    /// An integer in `lo..=hi`; `unsigned` selects the message for negatives.
    fn ranged(&self, key: &str, lo: i128, hi: i128) -> Result<Option<i128>, ConfigError> {
        let unsigned = lo >= 0;
        match self.conf.get(key) {
            None => Ok(None),
            Some(Value::Int(v)) if *v < 0 && unsigned => Err(self.err(
                key,
                format!("expected an unsigned integer for '{key}' parameter, not a negative one"),
            )),
            Some(Value::Int(v)) if (lo..=hi).contains(v) => Ok(Some(*v)),
            Some(Value::Int(_)) => Err(self.err(
                key,
                format!("value for '{key}' parameter must be in range {lo}:{hi}"),
            )),
            Some(_) if unsigned => Err(self.err(
                key,
                format!("expected an unsigned integer for '{key}' parameter"),
            )),
            Some(_) => Err(self.err(key, format!("expected an integer for '{key}' parameter"))),
        }
    }

    fn uint(&self, key: &str, out: &mut u32) -> Result<(), ConfigError> {
        if let Some(v) = self.ranged(key, 0, u32::MAX.into())? {
            *out = u32::try_from(v).map_err(|_| self.err(key, "value out of range"))?;
        }
        Ok(())
    }

    fn int(&self, key: &str, out: &mut i32) -> Result<(), ConfigError> {
        if let Some(v) = self.ranged(key, i32::MIN.into(), i32::MAX.into())? {
            *out = i32::try_from(v).map_err(|_| self.err(key, "value out of range"))?;
        }
        Ok(())
    }

    fn str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.conf.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, format!("expected a string for '{key}' parameter"))),
        }
    }

    fn string(&self, key: &str, out: &mut String) -> Result<(), ConfigError> {
        if let Some(s) = self.str(key)? {
            *out = s.to_string();
        }
        Ok(())
    }

    fn opt_string(&self, key: &str, out: &mut Option<String>) -> Result<(), ConfigError> {
        if let Some(s) = self.str(key)? {
            *out = Some(s.to_string());
        }
        Ok(())
    }

    /// A non-empty path string.
    fn path(&self, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        match self.str(key)? {
            Some("") => Err(self.err(key, format!("'{key}' parameter must not be empty"))),
            other => Ok(other.map(PathBuf::from)),
        }
    }

    /// An octal mode string such as `"0770"`.
    fn perms(&self, key: &str, out: &mut u32) -> Result<(), ConfigError> {
        let Some(s) = self.str(key)? else {
            return Ok(());
        };
        match u32::from_str_radix(s, 8) {
            Ok(m) if !s.is_empty() && s.bytes().all(|b| (b'0'..=b'7').contains(&b)) && m <= 0o7777 => {
                *out = m;
                Ok(())
            }
            _ => Err(self.err(key, format!("failed to parse mode '{s}' for '{key}' parameter (expected octal, e.g. \"0770\")"))),
        }
    }

    /// A list whose elements are all strings (a bare string is refused).
    fn string_list(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.conf.get(key) {
            None => Ok(None),
            Some(Value::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    _ => Err(self.err(key, format!("'{key}' parameter must be a list of strings"))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(self.err(
                key,
                format!("expected a list of strings for '{key}' parameter"),
            )),
        }
    }

    fn auth(&self, key: &str, out: &mut Auth) -> Result<(), ConfigError> {
        let Some(s) = self.str(key)? else {
            return Ok(());
        };
        *out = match s {
            "none" => Auth::None,
            "sasl" => Auth::Sasl,
            "polkit" => Auth::Polkit,
            _ => {
                return Err(self.err(
                    key,
                    format!("unknown authentication type '{s}' for '{key}' parameter (expected \"none\", \"sasl\" or \"polkit\")"),
                ))
            }
        };
        Ok(())
    }
}

/// Apply every known key in `conf` to `cfg` (which holds the defaults).
pub(super) fn apply(conf: &VirConf, file: &Path, cfg: &mut Config) -> Result<(), ConfigError> {
    let r = Reader { conf, file };

    r.bool("listen_tls", &mut cfg.listen_tls)?;
    r.bool("listen_tcp", &mut cfg.listen_tcp)?;
    r.string("tls_port", &mut cfg.tls_port)?;
    r.string("tcp_port", &mut cfg.tcp_port)?;
    r.opt_string("listen_addr", &mut cfg.listen_addr)?;

    r.opt_string("unix_sock_group", &mut cfg.unix_sock_group)?;
    r.perms("unix_sock_ro_perms", &mut cfg.unix_sock_ro_perms)?;
    r.perms("unix_sock_admin_perms", &mut cfg.unix_sock_admin_perms)?;
    r.auth("auth_unix_rw", &mut cfg.auth_unix_rw)?;
    // libvirt makes the rw socket world-accessible when polkit guards it,
    // unless the file sets the mode itself.
    // Deviation: libvirt keeps 0777 when the file turns polkit off without a mode; an open
    // socket without auth hands every local user full access, so it falls back to 0700.
    cfg.unix_sock_rw_perms = if cfg.auth_unix_rw == Auth::Polkit {
        0o777
    } else {
        0o700
    };
    r.perms("unix_sock_rw_perms", &mut cfg.unix_sock_rw_perms)?;
    if let Some(dir) = r.path("unix_sock_dir")? {
        cfg.unix_sock_dir = dir;
        // A session daemon with a custom socket dir gets no admin socket (§8.1).
        cfg.admin_sock_enabled = cfg.privileged;
    }

    r.auth("auth_unix_ro", &mut cfg.auth_unix_ro)?;
    r.auth("auth_tcp", &mut cfg.auth_tcp)?;
    r.auth("auth_tls", &mut cfg.auth_tls)?;
    if let Some(list) = r.string_list("access_drivers")? {
        cfg.access_drivers = list;
    }

    tls_files(&r, cfg)?;
    r.bool(
        "tls_no_sanity_certificate",
        &mut cfg.tls_no_sanity_certificate,
    )?;
    r.bool(
        "tls_no_verify_certificate",
        &mut cfg.tls_no_verify_certificate,
    )?;
    cfg.tls_allowed_dn_list = r.string_list("tls_allowed_dn_list")?;
    r.string("tls_priority", &mut cfg.tls_priority)?;
    r.uint("tcp_min_ssf", &mut cfg.tcp_min_ssf)?;
    if conf.get("tcp_min_ssf").is_some() && cfg.tcp_min_ssf < 112 {
        return Err(r.err(
            "tcp_min_ssf",
            "minimum SSF levels lower than 112 are not supported",
        ));
    }
    cfg.sasl_allowed_username_list = r.string_list("sasl_allowed_username_list")?;

    r.uint("min_workers", &mut cfg.min_workers)?;
    r.uint("max_workers", &mut cfg.max_workers)?;
    if cfg.max_workers < 1 {
        return Err(r.err("max_workers", "'max_workers' parameter must be at least 1"));
    }
    r.uint("prio_workers", &mut cfg.prio_workers)?;
    r.uint("max_clients", &mut cfg.max_clients)?;
    r.uint("max_queued_clients", &mut cfg.max_queued_clients)?;
    r.uint("max_anonymous_clients", &mut cfg.max_anonymous_clients)?;
    r.uint("max_client_requests", &mut cfg.max_client_requests)?;
    r.uint("admin_min_workers", &mut cfg.admin_min_workers)?;
    r.uint("admin_max_workers", &mut cfg.admin_max_workers)?;
    r.uint("admin_max_clients", &mut cfg.admin_max_clients)?;
    r.uint(
        "admin_max_queued_clients",
        &mut cfg.admin_max_queued_clients,
    )?;
    r.uint(
        "admin_max_client_requests",
        &mut cfg.admin_max_client_requests,
    )?;

    r.int("keepalive_interval", &mut cfg.keepalive_interval)?;
    r.uint("keepalive_count", &mut cfg.keepalive_count)?;
    r.int(
        "admin_keepalive_interval",
        &mut cfg.admin_keepalive_interval,
    )?;
    r.uint("admin_keepalive_count", &mut cfg.admin_keepalive_count)?;

    if let Some(v) = r.ranged("log_level", 0, 4)? {
        cfg.log_level = v as u32; // 0..=4, cannot truncate
    }
    r.opt_string("log_filters", &mut cfg.log_filters)?;
    r.opt_string("log_outputs", &mut cfg.log_outputs)?;
    r.uint("audit_level", &mut cfg.audit_level)?;
    r.bool("audit_logging", &mut cfg.audit_logging)?;
    r.opt_string("host_uuid", &mut cfg.host_uuid)?;
    if let Some(s) = r.str("host_uuid_source")? {
        cfg.host_uuid_source = match s {
            "smbios" => HostUuidSource::Smbios,
            "machine-id" => HostUuidSource::MachineId,
            _ => {
                return Err(r.err(
                    "host_uuid_source",
                    format!(
                        "unknown host_uuid_source '{s}' (expected \"smbios\" or \"machine-id\")"
                    ),
                ))
            }
        };
    }
    r.uint("ovs_timeout", &mut cfg.ovs_timeout)?;

    if let Some(dir) = r.path("driver_socket_dir")? {
        cfg.driver_socket_dir = dir;
    }
    if let Some(list) = r.string_list("driver_sockets")? {
        cfg.driver_sockets = driver_sockets(&r, &list)?;
    }
    if let Some(s) = r.str("io_backend")? {
        cfg.io_backend = IoBackend::parse(s).ok_or_else(|| {
            r.err(
                "io_backend",
                format!("unknown io_backend '{s}' (expected \"auto\", \"io_uring\" or \"epoll\")"),
            )
        })?;
    }
    r.uint("worker_threads", &mut cfg.worker_threads)?;
    cfg.metrics_listen = metrics_listen(&r)?;
    r.bool("restart_handover", &mut cfg.restart_handover)?;

    cfg.unknown_keys = conf
        .keys()
        .filter(|k| !KNOWN_KEYS.contains(k))
        .map(str::to_string)
        .collect();
    Ok(())
}

/// `metrics_listen`: one string or a list of strings, each `host:port` or an absolute UNIX
/// path; "" (or an empty list) leaves the endpoint off. A list lets one daemon serve both a
/// loopback port and a socket file. Repeated entries are refused (the second bind would fail
/// at start with a less helpful message).
fn metrics_listen(r: &Reader<'_>) -> Result<Vec<MetricsListen>, ConfigError> {
    const KEY: &str = "metrics_listen";
    let entries: Vec<String> = match r.conf.get(KEY) {
        None => return Ok(Vec::new()),
        Some(Value::Str(s)) if s.is_empty() => return Ok(Vec::new()),
        Some(Value::Str(s)) => vec![s.clone()],
        Some(Value::List(_)) => r.string_list(KEY)?.unwrap_or_default(),
        Some(_) => {
            return Err(r.err(
                KEY,
                "expected a string or a list of strings for 'metrics_listen' parameter",
            ))
        }
    };
    let mut out: Vec<MetricsListen> = Vec::with_capacity(entries.len());
    for e in &entries {
        let addr = MetricsListen::parse(e).ok_or_else(|| {
            r.err(
                KEY,
                format!(
                    "bad metrics_listen entry '{e}': expected \"host:port\" (port 1-65535, \
                     \"[v6]:port\" for IPv6) or an absolute socket path"
                ),
            )
        })?;
        if out.contains(&addr) {
            return Err(r.err(KEY, format!("'{e}' appears twice in metrics_listen")));
        }
        out.push(addr);
    }
    Ok(out)
}

/// `ca_file`/`cert_file`/`key_file` go together: set one, set all three, and
/// then `crl_file` is used only if set (§6.3). Otherwise the defaults stay and
/// `crl_file` alone is ignored, as in libvirt.
fn tls_files(r: &Reader<'_>, cfg: &mut Config) -> Result<(), ConfigError> {
    let ca = r.path("ca_file")?;
    let cert = r.path("cert_file")?;
    let key = r.path("key_file")?;
    let crl = r.path("crl_file")?;
    match (ca, cert, key) {
        (None, None, None) => Ok(()),
        (Some(ca), Some(cert), Some(key)) => {
            cfg.ca_file = ca;
            cfg.cert_file = cert;
            cfg.key_file = key;
            cfg.crl_file = crl;
            cfg.tls_fallback_to_system = false;
            Ok(())
        }
        _ => {
            let first = ["ca_file", "cert_file", "key_file"]
                .into_iter()
                .find(|k| r.conf.get(k).is_some())
                .unwrap_or("ca_file");
            Err(r.err(
                first,
                "if any of ca_file, cert_file or key_file is set, all three must be set",
            ))
        }
    }
}

/// Parse `["scheme=/path/to/sock", ...]`. Schemes are URI schemes (letter,
/// then letters, digits, `+ - .`), stored lowercase; paths are absolute or
/// `@abstract`. A scheme may appear only once.
fn driver_sockets(r: &Reader<'_>, list: &[String]) -> Result<Vec<(String, PathBuf)>, ConfigError> {
    let mut out: Vec<(String, PathBuf)> = Vec::with_capacity(list.len());
    for entry in list {
        let bad = || {
            r.err(
                "driver_sockets",
                format!("bad driver_sockets entry '{entry}': expected \"scheme=/path/to/socket\""),
            )
        };
        let (scheme, path) = entry.split_once('=').ok_or_else(bad)?;
        let scheme_ok = scheme
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if !scheme_ok || !(path.starts_with('/') || path.len() > 1 && path.starts_with('@')) {
            return Err(bad());
        }
        let scheme = scheme.to_ascii_lowercase();
        if out.iter().any(|(s, _)| *s == scheme) {
            return Err(r.err(
                "driver_sockets",
                format!("scheme '{scheme}' appears twice in driver_sockets"),
            ));
        }
        out.push((scheme, PathBuf::from(path)));
    }
    Ok(out)
}
