//! CONNECT_OPEN name → driver daemon socket (libvirt-rpc.md §4.2–4.3).
//!
//! Unlike libvirt's virtproxyd we never dial out: names with a host, a transport or a
//! `socket=` parameter are refused, so a local client cannot make the proxy connect anywhere
//! the operator did not configure (pitfall 11).

use std::path::{Path, PathBuf};

use crate::proto::msg::{err_code, err_domain, RemoteError};

/// Schemes with a per-driver daemon named `virt<scheme>d`.
const KNOWN_DRIVERS: &[&str] = &[
    "qemu",
    "lxc",
    "xen",
    "vbox",
    "bhyve",
    "vz",
    "ch",
    "network",
    "storage",
    "nodedev",
    "nwfilter",
    "secret",
    "interface",
];

/// Probe order for an empty name when running privileged (libvirt-rpc.md §4.2).
const PROBE_SYSTEM: &[&str] = &["xen", "qemu", "lxc", "vbox", "bhyve", "vz"];
/// Probe order for an unprivileged daemon.
const PROBE_SESSION: &[&str] = &["qemu", "vbox"];

/// Where a CONNECT_OPEN goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The name sent downstream (the probed URI when the client sent none).
    pub uri: String,
    /// The daemon socket to connect to (the `-ro` one for read-only clients).
    pub socket: PathBuf,
    pub readonly: bool,
}

/// A name we will not route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("'{0}' is not a valid connection URI")]
    BadUri(String),
    #[error("URI '{uri}' names transport '{transport}': virtproxyd only forwards to local driver daemons; connect to the remote host directly")]
    Transport { uri: String, transport: String },
    #[error("URI '{0}' names a remote host: virtproxyd only forwards to local driver daemons; connect to that host directly")]
    RemoteHost(String),
    #[error(
        "URI '{0}' has a 'socket' parameter: virtproxyd does not connect to client-chosen sockets"
    )]
    SocketParam(String),
    #[error("{0}")]
    UnknownScheme(String),
    #[error("connection not open")]
    NothingProbed,
}

impl RouteError {
    /// The libvirt-style error reply for this refusal.
    pub fn to_remote(&self) -> RemoteError {
        match self {
            RouteError::UnknownScheme(uri) => {
                RemoteError::new(err_code::NO_CONNECT, err_domain::NONE, uri.clone())
            }
            RouteError::NothingProbed => RemoteError::new(
                err_code::INTERNAL_ERROR,
                err_domain::RPC,
                "connection not open",
            ),
            other => RemoteError::new(err_code::NO_SUPPORT, err_domain::RPC, other.to_string()),
        }
    }
}

/// The routing table built from the config.
#[derive(Debug, Clone)]
pub struct RouteTable {
    socket_dir: PathBuf,
    overrides: Vec<(String, PathBuf)>,
    /// An unprivileged daemon: `/session` URIs, no read-only sockets.
    session: bool,
}

impl RouteTable {
    pub fn new(socket_dir: PathBuf, overrides: Vec<(String, PathBuf)>, session: bool) -> Self {
        let overrides = overrides
            .into_iter()
            .map(|(s, p)| (s.to_ascii_lowercase(), p))
            .collect();
        Self {
            socket_dir,
            overrides,
            session,
        }
    }

    /// The rw socket serving `scheme`, if any daemon is configured or conventional for it.
    pub fn socket_for(&self, scheme: &str) -> Option<PathBuf> {
        if let Some((_, p)) = self.overrides.iter().find(|(s, _)| s == scheme) {
            return Some(p.clone());
        }
        KNOWN_DRIVERS
            .contains(&scheme)
            .then(|| self.socket_dir.join(format!("virt{scheme}d-sock")))
    }

    fn with_ro(&self, rw: &Path, readonly: bool) -> PathBuf {
        if readonly && !self.session {
            let mut s = rw.as_os_str().to_owned();
            s.push("-ro");
            PathBuf::from(s)
        } else {
            rw.to_path_buf()
        }
    }

    /// Resolves a CONNECT_OPEN name. `exists` answers whether a socket file exists (injected
    /// so that probing is testable).
    pub fn resolve(
        &self,
        name: Option<&str>,
        readonly: bool,
        exists: impl Fn(&Path) -> bool,
    ) -> Result<Target, RouteError> {
        let name = name.unwrap_or("");
        if name.is_empty() {
            return self.probe(readonly, exists);
        }
        let (scheme, rest) = name
            .split_once(':')
            .ok_or_else(|| RouteError::BadUri(name.into()))?;
        let scheme_lc = scheme.to_ascii_lowercase();
        if scheme.is_empty()
            || !scheme_lc
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
        {
            return Err(RouteError::BadUri(name.into()));
        }
        if let Some((_, transport)) = scheme_lc.split_once('+') {
            return Err(RouteError::Transport {
                uri: name.into(),
                transport: transport.into(),
            });
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        if let Some(authority_and_path) = before_query.strip_prefix("//") {
            let authority = authority_and_path.split('/').next().unwrap_or("");
            if !authority.is_empty() {
                return Err(RouteError::RemoteHost(name.into()));
            }
        }
        if let Some(q) = query {
            let has_socket = q.split('&').any(|kv| {
                kv.split('=')
                    .next()
                    .is_some_and(|k| k.eq_ignore_ascii_case("socket"))
            });
            if has_socket {
                return Err(RouteError::SocketParam(name.into()));
            }
        }
        let rw = self
            .socket_for(&scheme_lc)
            .ok_or_else(|| RouteError::UnknownScheme(name.into()))?;
        Ok(Target {
            uri: name.into(),
            socket: self.with_ro(&rw, readonly),
            readonly,
        })
    }

    fn probe(&self, readonly: bool, exists: impl Fn(&Path) -> bool) -> Result<Target, RouteError> {
        let (order, path) = if self.session {
            (PROBE_SESSION, "session")
        } else {
            (PROBE_SYSTEM, "system")
        };
        for drv in order {
            if let Some(rw) = self.socket_for(drv) {
                let sock = self.with_ro(&rw, readonly);
                if exists(&sock) {
                    return Ok(Target {
                        uri: format!("{drv}:///{path}"),
                        socket: sock,
                        readonly,
                    });
                }
            }
        }
        Err(RouteError::NothingProbed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new(
            "/run/libvirt".into(),
            vec![("test".into(), "/tmp/d/libvirt-sock".into())],
            false,
        )
    }
    fn none(_: &Path) -> bool {
        false
    }

    #[test]
    fn known_schemes_map_to_their_daemon_and_ro_socket() {
        let t = table()
            .resolve(Some("qemu:///system"), false, none)
            .unwrap();
        assert_eq!(t.socket, Path::new("/run/libvirt/virtqemud-sock"));
        let t = table()
            .resolve(Some("network:///system"), true, none)
            .unwrap();
        assert_eq!(t.socket, Path::new("/run/libvirt/virtnetworkd-sock-ro"));
        assert_eq!(t.uri, "network:///system");
    }

    #[test]
    fn overrides_win_and_get_ro_suffix() {
        let t = table()
            .resolve(Some("test:///default"), true, none)
            .unwrap();
        assert_eq!(t.socket, Path::new("/tmp/d/libvirt-sock-ro"));
        assert!(t.readonly);
    }

    #[test]
    fn remote_names_are_refused() {
        let t = table();
        assert!(matches!(
            t.resolve(Some("qemu+tcp://h/system"), false, none),
            Err(RouteError::Transport { .. })
        ));
        assert!(matches!(
            t.resolve(Some("qemu://host/system"), false, none),
            Err(RouteError::RemoteHost(_))
        ));
        assert!(matches!(
            t.resolve(Some("qemu:///system?socket=/etc/x"), false, none),
            Err(RouteError::SocketParam(_))
        ));
        assert!(matches!(
            t.resolve(Some("foo:///system"), false, none),
            Err(RouteError::UnknownScheme(_))
        ));
        assert!(matches!(
            t.resolve(Some("nocolon"), false, none),
            Err(RouteError::BadUri(_))
        ));
        let e = t
            .resolve(Some("foo:///system"), false, none)
            .unwrap_err()
            .to_remote();
        assert_eq!(
            e.message,
            "no connection driver available for foo:///system"
        );
    }

    #[test]
    fn empty_name_probes_existing_sockets_in_libvirt_order() {
        let exists = |p: &Path| p == Path::new("/run/libvirt/virtqemud-sock-ro");
        let t = table().resolve(Some(""), true, exists).unwrap();
        assert_eq!(t.uri, "qemu:///system");
        assert_eq!(
            table().resolve(None, false, exists),
            Err(RouteError::NothingProbed)
        );
        let session = RouteTable::new("/run/user/1000/libvirt".into(), vec![], true);
        let t = session
            .resolve(None, true, |p: &Path| p.ends_with("virtqemud-sock"))
            .unwrap();
        assert_eq!(t.uri, "qemu:///session");
        assert_eq!(t.socket, Path::new("/run/user/1000/libvirt/virtqemud-sock"));
    }
}
