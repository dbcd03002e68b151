//! Listening sockets: `libvirt-sock` (rw) and `libvirt-sock-ro` with libvirt's permissions.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

/// The kind of listener a client arrived on; it decides what the client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// `libvirt-sock`: read-write.
    UnixRw,
    /// `libvirt-sock-ro`: read-only, routed to the daemons' `-ro` sockets.
    UnixRo,
    /// `libvirt-admin-sock`: the admin protocol, served by the admin thread (`admin::serve`),
    /// never by a relay worker.
    UnixAdmin,
    /// Plain TCP: no fd passing, empty identity (auth "none").
    Tcp,
    /// TLS over TCP: no fd passing, the client certificate's DN as identity.
    Tls,
}

impl ListenerKind {
    /// Whether clients arrive with UNIX credentials and may pass fds.
    pub fn is_unix(self) -> bool {
        !matches!(self, ListenerKind::Tcp | ListenerKind::Tls)
    }
}

/// A socket we accept clients on.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub kind: ListenerKind,
    /// Set when we created the socket file (and so must unlink it on exit).
    pub path: Option<PathBuf>,
}

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another daemon is already listening on '{0}'")]
    InUse(PathBuf),
    #[error("cannot create socket '{path}': {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("unknown group '{0}' in unix_sock_group")]
    UnknownGroup(String),
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> ListenError + '_ {
    move |source| ListenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates a UNIX listener at `path` with `mode`, owned by `group` when given.
/// A stale socket file is replaced; one with a live daemon behind it is an error.
///
/// The socket is bound and set up under a staging name and renamed into place once it
/// listens: a client (or a script) that sees `path` can connect to it. Bound at `path`
/// itself, a connect between `bind` and `listen` would be refused.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    group: Option<&str>,
    backlog: u32,
    kind: ListenerKind,
) -> Result<Listener, ListenError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.to_path_buf()));
        }
    }
    let staging = staging_path(path);
    let bind_at = staging.as_deref().unwrap_or(path);
    // A staging file left by a crash of this pid's predecessor, or the stale socket itself.
    if std::fs::symlink_metadata(bind_at).is_ok() {
        std::fs::remove_file(bind_at).map_err(io_err(bind_at))?;
    }
    let set_up = listen_at(bind_at, mode, group, backlog);
    let fd = match (set_up, &staging) {
        (Ok(fd), Some(staging)) => match std::fs::rename(staging, path) {
            Ok(()) => fd,
            Err(e) => {
                let _ = std::fs::remove_file(staging);
                return Err(io_err(path)(e));
            }
        },
        (Ok(fd), None) => fd,
        (Err(e), _) => {
            if staging.is_some() {
                let _ = std::fs::remove_file(bind_at);
            }
            return Err(e);
        }
    };
    Ok(Listener {
        fd,
        kind,
        path: Some(path.to_path_buf()),
    })
}

/// `dir/.name.<pid>.new` beside `path`, or `None` when that would not fit in a
/// `sockaddr_un` (then the socket is bound at `path` directly).
fn staging_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let staging = path.with_file_name(format!(".{name}.{}.new", std::process::id()));
    // sun_path holds 108 bytes including the terminating NUL.
    (staging.as_os_str().len() < 108).then_some(staging)
}

/// A listening socket bound at `at` with `mode` and `group`.
fn listen_at(
    at: &Path,
    mode: u32,
    group: Option<&str>,
    backlog: u32,
) -> Result<OwnedFd, ListenError> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io_err(at)(e.into()))?;
    let addr = UnixAddr::new(at).map_err(|e| io_err(at)(e.into()))?;
    // The umask keeps the socket from ever being more open than `mode`, even briefly.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(!mode & 0o777));
    let bound = bind(fd.as_raw_fd(), &addr);
    nix::sys::stat::umask(old);
    bound.map_err(|e| io_err(at)(e.into()))?;
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode)).map_err(io_err(at))?;
    if let Some(g) = group {
        let grp = nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .ok_or_else(|| ListenError::UnknownGroup(g.to_string()))?;
        if grp.gid.as_raw() != 0 {
            nix::unistd::chown(at, None, Some(grp.gid)).map_err(|e| io_err(at)(e.into()))?;
        }
    }
    let backlog =
        Backlog::new(backlog.clamp(1, i32::MAX as u32) as i32).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|e| io_err(at)(e.into()))?;
    Ok(fd)
}

/// Creates TCP listeners on `addrs` (all addresses when empty: one IPv4 and one v6-only IPv6
/// socket, as libvirt does) at `port`.
pub fn bind_tcp(
    addrs: &[String],
    port: &str,
    backlog: u32,
    kind: ListenerKind,
) -> Result<Vec<Listener>, ListenError> {
    use nix::sys::socket::{setsockopt, sockopt, SockaddrStorage};
    use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
    let what = PathBuf::from(format!("port {port}"));
    let port: u16 = port.parse().map_err(|_| ListenError::Io {
        path: what.clone(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "ports must be numbers"),
    })?;
    let mut targets: Vec<SocketAddr> = Vec::new();
    if addrs.is_empty() {
        targets.push(SocketAddr::new(IpAddr::from([0u8; 4]), port));
        targets.push(SocketAddr::new(IpAddr::from([0u16; 8]), port));
    } else {
        for a in addrs {
            let resolved = (a.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| io_err(&what)(e))?;
            targets.extend(resolved);
        }
    }
    let mut out = Vec::new();
    for addr in targets {
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = match socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        ) {
            Ok(fd) => fd,
            // A host without IPv6 still serves IPv4 when no address was configured.
            Err(nix::errno::Errno::EAFNOSUPPORT) if addrs.is_empty() => continue,
            Err(e) => return Err(io_err(&what)(e.into())),
        };
        let _ = setsockopt(&fd, sockopt::ReuseAddr, &true);
        if addr.is_ipv6() {
            let _ = setsockopt(&fd, sockopt::Ipv6V6Only, &true);
        }
        let sa = SockaddrStorage::from(addr);
        bind(fd.as_raw_fd(), &sa)
            .map_err(|e| io_err(&PathBuf::from(addr.to_string()))(e.into()))?;
        let backlog =
            Backlog::new(backlog.clamp(1, i32::MAX as u32) as i32).unwrap_or(Backlog::MAXCONN);
        listen(&fd, backlog).map_err(|e| io_err(&what)(e.into()))?;
        tracing::info!("listening on {addr} ({kind:?})");
        out.push(Listener {
            fd,
            kind,
            path: None,
        });
    }
    Ok(out)
}

impl Listener {
    /// Removes the socket file if we created it.
    pub fn unlink(&self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libvirt-sock");
        let first = bind_unix(&path, 0o700, None, 16, ListenerKind::UnixRw).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(matches!(
            bind_unix(&path, 0o700, None, 16, ListenerKind::UnixRw),
            Err(ListenError::InUse(_))
        ));
        drop(first); // socket file stays behind, now stale
        let again = bind_unix(&path, 0o666, None, 16, ListenerKind::UnixRw).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o666
        );
        again.unlink();
        assert!(!path.exists());
    }

    #[test]
    fn the_socket_file_appears_listening_and_no_staging_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libvirt-sock");
        let l = bind_unix(&path, 0o600, None, 16, ListenerKind::UnixRw).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("libvirt-sock")]);
        l.unlink();
    }

    #[test]
    fn a_path_too_long_to_stage_is_bound_directly() {
        let dir = tempfile::tempdir().unwrap();
        let room = 107 - dir.path().as_os_str().len() - 1;
        let path = dir.path().join("s".repeat(room));
        assert!(staging_path(&path).is_none());
        let l = bind_unix(&path, 0o600, None, 16, ListenerKind::UnixRw).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        l.unlink();
    }
}
