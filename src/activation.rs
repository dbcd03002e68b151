//! systemd socket activation (libvirt-rpc.md §8.4): listeners passed as fds 3.. with
//! `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`, mapped by the unit names libvirt's units use.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::listen::{Listener, ListenerKind};

/// Why activation fds cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error("Some activation file descriptors are unclaimed: {0}")]
    Unclaimed(String),
}

/// The activation environment, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationEnv {
    pub listen_pid: Option<String>,
    pub listen_fds: Option<String>,
    pub listen_fdnames: Option<String>,
}

impl ActivationEnv {
    pub fn from_process() -> Self {
        let get = |k| std::env::var(k).ok();
        Self {
            listen_pid: get("LISTEN_PID"),
            listen_fds: get("LISTEN_FDS"),
            listen_fdnames: get("LISTEN_FDNAMES"),
        }
    }
}

/// What the environment says: no activation, fds to use with their names, or fds to close
/// (names missing or miscounted: libvirt then logs and falls back to creating its sockets).
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    None,
    Use(Vec<(RawFd, String)>),
    Fallback { close: Vec<RawFd>, why: String },
}

/// First fd systemd passes.
const SD_LISTEN_FDS_START: RawFd = 3;

/// Decides from the environment alone (pure, so it is testable).
pub fn plan(env: &ActivationEnv, our_pid: u32) -> Plan {
    let (Some(pid), Some(n)) = (&env.listen_pid, &env.listen_fds) else {
        return Plan::None;
    };
    if pid.trim().parse::<u32>().ok() != Some(our_pid) {
        return Plan::None;
    }
    let n: i32 = match n.trim().parse() {
        Ok(n) if n > 0 => n,
        _ => return Plan::None,
    };
    let fds: Vec<RawFd> = (0..n).map(|i| SD_LISTEN_FDS_START + i).collect();
    match &env.listen_fdnames {
        None => Plan::Fallback {
            close: vec![],
            why: "LISTEN_FDNAMES is not set".into(),
        },
        Some(names) => {
            let names: Vec<String> = names.split(':').map(str::to_string).collect();
            if names.len() != fds.len() {
                return Plan::Fallback {
                    close: fds,
                    why: format!("LISTEN_FDNAMES has {} names for {} fds", names.len(), n),
                };
            }
            Plan::Use(fds.into_iter().zip(names).collect())
        }
    }
}

/// What an activated fd is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A client listener, served by the acceptor (or the admin thread).
    Listener(ListenerKind),
    /// The metrics endpoint's socket (`virtproxyd-metrics.socket`), served by its own thread.
    Metrics,
    /// A restart's hand-over state (`handover::STATE_NAME`).
    HandoverState,
    /// A restart's queue of carried fds (`handover::FDS_NAME`).
    HandoverFds,
}

/// What systemd's unit name (the fd's `FileDescriptorName`) stands for.
pub fn claim_for(name: &str) -> Result<Claim, ActivationError> {
    match name {
        "virtproxyd.socket" => Ok(Claim::Listener(ListenerKind::UnixRw)),
        "virtproxyd-ro.socket" => Ok(Claim::Listener(ListenerKind::UnixRo)),
        "virtproxyd-admin.socket" => Ok(Claim::Listener(ListenerKind::UnixAdmin)),
        "virtproxyd-tcp.socket" => Ok(Claim::Listener(ListenerKind::Tcp)),
        "virtproxyd-tls.socket" => Ok(Claim::Listener(ListenerKind::Tls)),
        "virtproxyd-metrics.socket" => Ok(Claim::Metrics),
        crate::handover::STATE_NAME => Ok(Claim::HandoverState),
        crate::handover::FDS_NAME => Ok(Claim::HandoverFds),
        other => Err(ActivationError::Unclaimed(other.into())),
    }
}

/// The activation fds, sorted by use.
#[derive(Debug)]
pub struct Activated {
    pub listeners: Vec<Listener>,
    /// Sockets of the metrics endpoint (usually none or one).
    pub metrics: Vec<OwnedFd>,
    /// A restart's hand-over: the state memfd and the fd queue (see `handover`).
    pub handover_state: Option<OwnedFd>,
    pub handover_fds: Option<OwnedFd>,
}

/// Takes ownership of the activation fds as listeners. Returns `Ok(None)` without
/// activation (or after falling back, which is logged), and clears the variables so children
/// do not inherit them.
pub fn take_listeners(env: &ActivationEnv) -> Result<Option<Activated>, ActivationError> {
    let plan = plan(env, std::process::id());
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    match plan {
        Plan::None => Ok(None),
        Plan::Fallback { close, why } => {
            tracing::error!("ignoring socket activation: {why}; creating sockets from the config");
            for fd in close {
                // SAFETY: systemd passed these fds to us; nobody else owns them.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            Ok(None)
        }
        Plan::Use(fds) => {
            // Validate every name before taking any fd, so an error leaves nothing half-done.
            let claims: Vec<Claim> = fds
                .iter()
                .map(|(_, name)| claim_for(name))
                .collect::<Result<_, _>>()?;
            let mut out = Activated {
                listeners: Vec::new(),
                metrics: Vec::new(),
                handover_state: None,
                handover_fds: None,
            };
            for ((raw, name), claim) in fds.into_iter().zip(claims) {
                // SAFETY: as above.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: fcntl on our own fd; activation fds arrive without CLOEXEC/O_NONBLOCK.
                unsafe {
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
                    let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
                match claim {
                    Claim::Listener(kind) => {
                        tracing::info!(fd = raw, name = %name, ?kind, "using activated listener");
                        out.listeners.push(Listener {
                            fd,
                            kind,
                            path: None,
                        });
                    }
                    Claim::Metrics => {
                        tracing::info!(fd = raw, name = %name, "using activated metrics socket");
                        out.metrics.push(fd);
                    }
                    Claim::HandoverState => out.handover_state = Some(fd),
                    Claim::HandoverFds => out.handover_fds = Some(fd),
                }
            }
            Ok(Some(out))
        }
    }
}

/// The warning for a read-write socket whose mode lets other users connect while nothing
/// authenticates them (a distribution's `virtproxyd.socket` has `SocketMode=0666`, made for
/// polkit). `None` when there is nothing to warn about.
pub fn open_socket_warning(listener: &Listener, auth: crate::config::Auth) -> Option<String> {
    if listener.kind != ListenerKind::UnixRw || auth != crate::config::Auth::None {
        return None;
    }
    let path = match &listener.path {
        Some(p) => p.clone(),
        None => {
            let addr: nix::sys::socket::UnixAddr =
                nix::sys::socket::getsockname(listener.fd.as_raw_fd()).ok()?;
            addr.path()?.to_path_buf()
        }
    };
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).ok()?.permissions());
    rw_mode_warning(&path, mode & 0o777)
}

/// Pure part of [`open_socket_warning`]: any group or other bit lets someone besides the
/// owner in.
pub fn rw_mode_warning(path: &std::path::Path, mode: u32) -> Option<String> {
    if mode & 0o077 == 0 {
        return None;
    }
    let who = if mode & 0o007 != 0 {
        "every local user"
    } else {
        "every member of the socket's group"
    };
    Some(format!(
        "the read-write socket {} has mode {:04o} and auth_unix_rw = \"none\": {who} gets full \
         control of every guest without authentication. Set SocketMode=0600 for \
         virtproxyd.socket (systemctl edit virtproxyd.socket, then restart it), or \
         set auth_unix_rw = \"polkit\" in virtproxyd.conf",
        path.display(),
        mode
    ))
}

/// Config keys the real daemon ignores under socket activation (logged when set).
pub const IGNORED_KEYS: &[&str] = &[
    "listen_tcp",
    "listen_tls",
    "tcp_port",
    "tls_port",
    "listen_addr",
    "unix_sock_group",
    "unix_sock_ro_perms",
    "unix_sock_rw_perms",
    "unix_sock_admin_perms",
    "unix_sock_dir",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pid: &str, n: &str, names: Option<&str>) -> ActivationEnv {
        ActivationEnv {
            listen_pid: Some(pid.into()),
            listen_fds: Some(n.into()),
            listen_fdnames: names.map(Into::into),
        }
    }

    #[test]
    fn activation_needs_our_pid_and_fds() {
        assert_eq!(plan(&env("1", "2", Some("a:b")), 42), Plan::None);
        assert_eq!(plan(&env("42", "0", Some("")), 42), Plan::None);
        let none = ActivationEnv {
            listen_pid: None,
            listen_fds: None,
            listen_fdnames: None,
        };
        assert_eq!(plan(&none, 42), Plan::None);
        assert_eq!(
            plan(
                &env("42", "2", Some("virtproxyd.socket:virtproxyd-ro.socket")),
                42
            ),
            Plan::Use(vec![
                (3, "virtproxyd.socket".into()),
                (4, "virtproxyd-ro.socket".into())
            ])
        );
    }

    #[test]
    fn missing_or_miscounted_names_fall_back_like_libvirt() {
        assert!(
            matches!(plan(&env("42", "2", None), 42), Plan::Fallback { close, .. } if close.is_empty())
        );
        assert!(matches!(
            plan(&env("42", "2", Some("virtproxyd.socket")), 42),
            Plan::Fallback { close, .. } if close == vec![3, 4]
        ));
    }

    #[test]
    fn open_rw_socket_without_auth_is_warned_about() {
        let p = std::path::Path::new("/run/libvirt/libvirt-sock");
        assert_eq!(rw_mode_warning(p, 0o600), None);
        assert_eq!(rw_mode_warning(p, 0o700), None);
        let w = rw_mode_warning(p, 0o666).unwrap();
        assert!(w.contains("mode 0666"), "{w}");
        assert!(w.contains("every local user"), "{w}");
        assert!(w.contains("SocketMode=0600"), "{w}");
        assert!(w.contains("auth_unix_rw = \"polkit\""), "{w}");
        assert!(rw_mode_warning(p, 0o660)
            .unwrap()
            .contains("every member of the socket's group"));
    }

    #[test]
    fn unit_names_map_to_listeners_and_unknown_names_are_errors() {
        let l = |k| Ok(Claim::Listener(k));
        assert_eq!(claim_for("virtproxyd.socket"), l(ListenerKind::UnixRw));
        assert_eq!(claim_for("virtproxyd-ro.socket"), l(ListenerKind::UnixRo));
        assert_eq!(
            claim_for("virtproxyd-admin.socket"),
            l(ListenerKind::UnixAdmin)
        );
        assert_eq!(claim_for("virtproxyd-tcp.socket"), l(ListenerKind::Tcp));
        assert_eq!(claim_for("virtproxyd-metrics.socket"), Ok(Claim::Metrics));
        assert_eq!(
            claim_for("libvirtd.socket"),
            Err(ActivationError::Unclaimed("libvirtd.socket".into()))
        );
    }
}
