//! CONNECT_OPEN name → driver daemon socket (libvirt-rpc.md §4.2–4.3).
//!
//! Unlike libvirt's virtproxyd we never dial out: names with a host, a transport or a
//! `socket=` parameter are refused, so a local client cannot make the proxy connect anywhere
//! the operator did not configure (pitfall 11).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::UnixAddr;

use crate::proto::msg::{err_code, err_domain, RemoteError};

/// Where libvirt's client side looks for system daemons (`LOCALSTATEDIR/run/libvirt`; it
/// avoids RUNSTATEDIR on purpose, and `/var/run` links to `/run`). A session proxy sends
/// every non-`/session` name there, as libvirt's remote driver does.
pub const SYSTEM_SOCKET_DIR: &str = "/var/run/libvirt";

/// Driver labels of the per-daemon metrics: [`KNOWN_DRIVERS`], then `other` for every scheme
/// routed by a `driver_sockets` entry alone (a fixed set, so the series count never follows
/// the config).
pub const METRIC_DRIVERS: &[&str] = &[
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
    "other",
];

/// Schemes with a per-driver daemon named `virt<scheme>d`: the metric labels but `other`.
const KNOWN_DRIVERS: &[&str] = match METRIC_DRIVERS.split_last() {
    Some((_, known)) => known,
    None => &[],
};

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
    /// An unprivileged daemon: `/session` URIs go to `socket_dir`, other names to the
    /// system daemons in `system_dir`; no read-only listener.
    session: bool,
    system_dir: PathBuf,
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
            system_dir: PathBuf::from(SYSTEM_SOCKET_DIR),
        }
    }

    /// Where a session proxy finds the system daemons (tests point it elsewhere).
    pub fn with_system_dir(mut self, dir: PathBuf) -> Self {
        self.system_dir = dir;
        self
    }

    /// The rw socket serving `scheme`, if any daemon is configured or conventional for it.
    pub fn socket_for(&self, scheme: &str) -> Option<PathBuf> {
        self.socket_in(scheme, &self.socket_dir)
    }

    /// As `socket_for`, with conventional sockets looked up in `dir`. An explicit
    /// `driver_sockets` entry is the operator's choice for the scheme and wins everywhere.
    fn socket_in(&self, scheme: &str, dir: &Path) -> Option<PathBuf> {
        if let Some((_, p)) = self.overrides.iter().find(|(s, _)| s == scheme) {
            return Some(p.clone());
        }
        KNOWN_DRIVERS
            .contains(&scheme)
            .then(|| dir.join(format!("virt{scheme}d-sock")))
    }

    /// libvirt (`remoteGetURIDaemonInfo`) uses the per-user daemon only for a `/session`
    /// path when unprivileged; `/system` and everything else reach the system daemons.
    fn uses_user_daemon(&self, path: &str) -> bool {
        self.session && path == "/session"
    }

    fn with_ro(&self, rw: &Path, readonly: bool, user: bool) -> PathBuf {
        // Per-user daemons have no read-only socket.
        if readonly && !user {
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
        let mut path = before_query;
        if let Some(authority_and_path) = before_query.strip_prefix("//") {
            let (authority, p) = match authority_and_path.find('/') {
                Some(i) => authority_and_path.split_at(i),
                None => (authority_and_path, ""),
            };
            if !authority.is_empty() {
                return Err(RouteError::RemoteHost(name.into()));
            }
            path = p;
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
        let user = self.uses_user_daemon(path);
        let dir = if self.session && !user {
            &self.system_dir
        } else {
            &self.socket_dir
        };
        let rw = self
            .socket_in(&scheme_lc, dir)
            .ok_or_else(|| RouteError::UnknownScheme(name.into()))?;
        Ok(Target {
            uri: name.into(),
            socket: self.with_ro(&rw, readonly, user),
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
                let sock = self.with_ro(&rw, readonly, self.session);
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

/// The address of a driver socket: a path, or with a leading `@` a Linux abstract socket
/// (the name after the `@`, as `ss` and systemd spell it), which has no file to connect by.
pub fn driver_addr(path: &Path) -> io::Result<UnixAddr> {
    match path.as_os_str().as_bytes().strip_prefix(b"@") {
        Some(name) if !name.is_empty() => Ok(UnixAddr::new_abstract(name)?),
        _ => Ok(UnixAddr::new(path)?),
    }
}

/// Connects to a driver socket without blocking the worker. A UNIX connect either completes
/// at once or fails (EAGAIN when the daemon's backlog is full).
pub fn connect_nonblocking(path: &Path) -> io::Result<OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &driver_addr(path)?)?;
    Ok(fd)
}

/// Whether a driver socket is there, for probing an empty name. An abstract name has no file
/// to stat, so it counts as there when something listens on it (a full backlog included).
pub fn driver_socket_exists(path: &Path) -> bool {
    if path.as_os_str().as_bytes().starts_with(b"@") {
        return match connect_nonblocking(path) {
            Ok(_) => true,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
    }
    path.exists()
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

    #[test]
    fn session_proxy_sends_only_session_paths_to_the_user_dir() {
        let t = RouteTable::new("/run/user/1000/libvirt".into(), vec![], true)
            .with_system_dir("/sysdir".into());
        let r = t.resolve(Some("qemu:///system"), false, none).unwrap();
        assert_eq!(r.socket, Path::new("/sysdir/virtqemud-sock"));
        let r = t.resolve(Some("qemu:///session"), false, none).unwrap();
        assert_eq!(r.socket, Path::new("/run/user/1000/libvirt/virtqemud-sock"));
        let r = t
            .resolve(Some("network:///session?x=1"), false, none)
            .unwrap();
        assert_eq!(
            r.socket,
            Path::new("/run/user/1000/libvirt/virtnetworkd-sock")
        );
        // Anything but exactly "/session" is not a per-user name for libvirt either.
        let r = t.resolve(Some("qemu:///sessionx"), false, none).unwrap();
        assert_eq!(r.socket, Path::new("/sysdir/virtqemud-sock"));
        let r = t.resolve(Some("qemu:/session"), false, none).unwrap();
        assert_eq!(r.socket, Path::new("/run/user/1000/libvirt/virtqemud-sock"));
        // System daemons keep their read-only sockets; per-user daemons have none.
        let r = t.resolve(Some("qemu:///system"), true, none).unwrap();
        assert_eq!(r.socket, Path::new("/sysdir/virtqemud-sock-ro"));
        let r = t.resolve(Some("qemu:///session"), true, none).unwrap();
        assert_eq!(r.socket, Path::new("/run/user/1000/libvirt/virtqemud-sock"));
        let default = RouteTable::new("/run/user/1000/libvirt".into(), vec![], true);
        let r = default
            .resolve(Some("qemu:///system"), false, none)
            .unwrap();
        assert_eq!(r.socket, Path::new("/var/run/libvirt/virtqemud-sock"));
    }

    #[test]
    fn privileged_proxy_ignores_the_session_distinction() {
        let r = table()
            .resolve(Some("qemu:///session"), false, none)
            .unwrap();
        assert_eq!(r.socket, Path::new("/run/libvirt/virtqemud-sock"));
    }

    #[test]
    fn at_paths_are_abstract_addresses() {
        let a = driver_addr(Path::new("@vpd/qemu-sock")).unwrap();
        assert_eq!(a.as_abstract(), Some(&b"vpd/qemu-sock"[..]));
        assert_eq!(a.path(), None);
        let a = driver_addr(Path::new("/run/libvirt/virtqemud-sock")).unwrap();
        assert_eq!(a.as_abstract(), None);
        assert_eq!(a.path(), Some(Path::new("/run/libvirt/virtqemud-sock")));
        // An abstract driver_socket_dir gives abstract names for every daemon.
        let t = RouteTable::new("@vpd".into(), vec![], false);
        let r = t.resolve(Some("qemu:///system"), true, none).unwrap();
        let a = driver_addr(&r.socket).unwrap();
        assert_eq!(a.as_abstract(), Some(&b"vpd/virtqemud-sock-ro"[..]));
    }

    #[test]
    fn abstract_listener_is_reached_and_probed() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixListener};
        let name = format!("vpd-route-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixListener::bind_addr(&addr).unwrap();
        let at = PathBuf::from(format!("@{name}"));
        assert!(driver_socket_exists(&at));
        let fd = connect_nonblocking(&at).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        // The peer of an unbound client is unnamed; what matters is that it arrived here.
        assert!(peer.is_unnamed());
        drop(fd);
        drop(listener);
        assert!(!driver_socket_exists(&at));
        let e = connect_nonblocking(&at).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);

        // And through routing: an empty name probes the abstract override.
        let listener = UnixListener::bind_addr(&addr).unwrap();
        let t = RouteTable::new(
            "/nonexistent".into(),
            vec![("qemu".into(), at.clone())],
            false,
        );
        let r = t.resolve(None, false, driver_socket_exists).unwrap();
        assert_eq!(r.uri, "qemu:///system");
        assert_eq!(r.socket, at);
        drop(listener);
    }

    #[test]
    fn metric_drivers_are_the_known_drivers_then_other() {
        let (other, known) = METRIC_DRIVERS.split_last().unwrap();
        assert_eq!(known, KNOWN_DRIVERS);
        assert_eq!(*other, "other");
    }
}
