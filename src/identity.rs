//! The client's identity, captured at accept time and forwarded with CONNECT_SET_IDENTITY
//! (libvirt-rpc.md §4.5, pitfall 10).

use std::os::fd::{AsRawFd, BorrowedFd};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::proto::msg::TypedValue;

/// Who is on the other end of a client socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub unix: Option<UnixPeer>,
    /// Distinguished name of a TLS client certificate.
    pub x509_dname: Option<String>,
    pub selinux_context: Option<String>,
    /// The SASL user name, once SASL authentication succeeded.
    pub sasl_user_name: Option<String>,
}

/// Credentials of a UNIX socket peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixPeer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub user_name: Option<String>,
    pub group_name: Option<String>,
    /// Start time in clock ticks since boot (guards against pid reuse downstream).
    pub process_time: u64,
}

/// User and group names by id, kept briefly: a name lookup goes through NSS (files, LDAP…)
/// and costs more than the rest of an accept; a renamed user is seen within `NAME_TTL`.
#[derive(Debug, Default)]
pub struct NameCache {
    users: HashMap<u32, (Option<String>, Instant)>,
    groups: HashMap<u32, (Option<String>, Instant)>,
}

const NAME_TTL: Duration = Duration::from_secs(30);
/// Bound on cached ids, so a flood of distinct uids cannot grow memory.
const NAME_CACHE_MAX: usize = 4096;

fn cached(
    map: &mut HashMap<u32, (Option<String>, Instant)>,
    id: u32,
    look: impl FnOnce() -> Option<String>,
) -> Option<String> {
    let now = Instant::now();
    if let Some((name, at)) = map.get(&id) {
        if now.duration_since(*at) < NAME_TTL {
            return name.clone();
        }
    }
    if map.len() >= NAME_CACHE_MAX {
        map.clear();
    }
    let name = look();
    map.insert(id, (name.clone(), now));
    name
}

impl NameCache {
    pub fn user(&mut self, uid: u32) -> Option<String> {
        cached(&mut self.users, uid, || {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
    }
    pub fn group(&mut self, gid: u32) -> Option<String> {
        cached(&mut self.groups, gid, || {
            nix::unistd::Group::from_gid(gid.into())
                .ok()
                .flatten()
                .map(|g| g.name)
        })
    }
}

impl Identity {
    /// Reads SO_PEERCRED, /proc start time, names and the security label of a UNIX peer.
    pub fn of_unix_peer(fd: BorrowedFd<'_>) -> std::io::Result<Identity> {
        Self::of_unix_peer_cached(fd, &mut NameCache::default())
    }

    /// As `of_unix_peer`, with names from `cache`.
    pub fn of_unix_peer_cached(
        fd: BorrowedFd<'_>,
        cache: &mut NameCache,
    ) -> std::io::Result<Identity> {
        let cred = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(std::io::Error::from)?;
        let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
        let process_time = if pid > 0 {
            read_proc_stat(pid)
                .and_then(|s| start_time_from_stat(&s))
                .unwrap_or(0)
        } else {
            u64::MAX
        };
        let user_name = cache.user(uid);
        let group_name = cache.group(gid);
        Ok(Identity {
            unix: Some(UnixPeer {
                uid,
                gid,
                pid: if pid == 0 { -1 } else { pid },
                user_name,
                group_name,
                process_time,
            }),
            x509_dname: None,
            selinux_context: peer_security_label(fd),
            sasl_user_name: None,
        })
    }

    /// The CONNECT_SET_IDENTITY parameters, in libvirt's order.
    pub fn params(&self) -> Vec<(&'static str, TypedValue)> {
        let mut p = Vec::new();
        if let Some(u) = &self.unix {
            // An unresolvable name is left out rather than failing the open: the daemon
            // accepts a partial identity, and uid/gid still identify the caller.
            if let Some(n) = &u.user_name {
                p.push(("user-name", TypedValue::Str(n.clone())));
            }
            p.push(("unix-user-id", TypedValue::ULLong(u.uid.into())));
            if let Some(n) = &u.group_name {
                p.push(("group-name", TypedValue::Str(n.clone())));
            }
            p.push(("unix-group-id", TypedValue::ULLong(u.gid.into())));
            p.push(("process-id", TypedValue::LLong(u.pid.into())));
            p.push(("process-time", TypedValue::ULLong(u.process_time)));
        }
        if let Some(dn) = &self.x509_dname {
            p.push(("x509-distinguished-name", TypedValue::Str(dn.clone())));
        }
        if let Some(ctx) = &self.selinux_context {
            p.push(("selinux-context", TypedValue::Str(ctx.clone())));
        }
        // Set at authentication, after the rest: libvirt appends it last.
        if let Some(n) = &self.sasl_user_name {
            p.push(("sasl-user-name", TypedValue::Str(n.clone())));
        }
        p
    }
}

/// /proc/<pid>/stat, read until its closing newline: on every accepted client, so no size
/// query (the file reports size 0, and `read_to_end` would ask with statx and lseek first) and
/// no read for EOF. The line is well under 1 KiB (comm is at most 64 bytes); a longer one is
/// read whole all the same.
fn read_proc_stat(pid: i32) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut buf = vec![0u8; 1024];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        let n = f.read(&mut buf[len..]).ok()?;
        len += n;
        if n == 0 || buf[..len].ends_with(b"\n") {
            break;
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

/// Field 22 of /proc/<pid>/stat, counted after the last ')' because `comm` may hold spaces
/// and parentheses.
pub fn start_time_from_stat(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ')' the first field is #3 (state); #22 is therefore the 20th.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// `getpeercon()` equivalent: the peer's LSM label, absent when no LSM provides one.
fn peer_security_label(fd: BorrowedFd<'_>) -> Option<String> {
    let raw = label_with_retry(|buf, len| {
        // SAFETY: buf/len describe a writable buffer of `*len` bytes.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERSEC,
                buf.as_mut_ptr().cast(),
                len,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    })?;
    let mut buf = raw;
    while buf.last() == Some(&0) {
        buf.pop();
    }
    String::from_utf8(buf).ok().filter(|s| !s.is_empty())
}

/// Labels are usually short, but SELinux MLS ranges and stacked LSMs can exceed any fixed
/// buffer (libvirt's getpeercon grows it too).
const LABEL_FIRST: usize = 256;
/// A label longer than this is not a label we can forward (XDR strings have a cap too).
const LABEL_MAX: usize = 64 * 1024;

/// Calls `get(buf, len)` as getsockopt is called; on ERANGE grows the buffer to the length
/// the kernel asked for (at least double) and tries again. `None` on any other error.
fn label_with_retry(
    mut get: impl FnMut(&mut [u8], &mut libc::socklen_t) -> std::io::Result<()>,
) -> Option<Vec<u8>> {
    let mut size = LABEL_FIRST;
    loop {
        let mut buf = vec![0u8; size];
        let mut len = size as libc::socklen_t;
        match get(&mut buf, &mut len) {
            Ok(()) => {
                buf.truncate((len as usize).min(size));
                return Some(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && size < LABEL_MAX => {
                size = (len as usize).max(size * 2).min(LABEL_MAX);
            }
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_comm() {
        let stat = "4242 (we ird) (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time_from_stat(stat), Some(987654));
        assert_eq!(start_time_from_stat("garbage"), None);
    }

    /// Our own stat line, read the short way, is whole and agrees with the long way.
    #[test]
    fn proc_stat_is_read_whole() {
        let pid = std::process::id() as i32;
        let quick = read_proc_stat(pid).unwrap();
        let full = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert!(quick.ends_with('\n'));
        assert_eq!(
            quick.split_whitespace().nth(21),
            full.split_whitespace().nth(21)
        );
        assert_eq!(start_time_from_stat(&quick), start_time_from_stat(&full));
        assert!(start_time_from_stat(&quick).is_some_and(|t| t > 0));
        assert_eq!(read_proc_stat(-1), None);
    }

    #[test]
    fn params_follow_libvirt_order_and_types() {
        let id = Identity {
            unix: Some(UnixPeer {
                uid: 1000,
                gid: 1000,
                pid: 77,
                user_name: Some("alice".into()),
                group_name: Some("alice".into()),
                process_time: 5,
            }),
            x509_dname: None,
            selinux_context: Some("unconfined".into()),
            sasl_user_name: Some("bob".into()),
        };
        let names: Vec<_> = id.params().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "user-name",
                "unix-user-id",
                "group-name",
                "unix-group-id",
                "process-id",
                "process-time",
                "selinux-context",
                "sasl-user-name"
            ]
        );
        assert_eq!(id.params()[7].1, TypedValue::Str("bob".into()));
        assert_eq!(id.params()[1].1, TypedValue::ULLong(1000));
        assert_eq!(id.params()[4].1, TypedValue::LLong(77));
        assert!(Identity::default().params().is_empty());
    }

    #[test]
    fn own_socketpair_peer_is_us() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let id = Identity::of_unix_peer(a.as_fd()).unwrap();
        let u = id.unix.unwrap();
        assert_eq!(u.pid as u32, std::process::id());
        assert_eq!(u.uid, nix::unistd::geteuid().as_raw());
        assert!(u.process_time > 0);
    }

    /// A fake getsockopt holding `label`: ERANGE with the needed length when the buffer is
    /// short, as the kernel's SO_PEERSEC does.
    fn fake(
        label: &[u8],
    ) -> impl FnMut(&mut [u8], &mut libc::socklen_t) -> std::io::Result<()> + '_ {
        move |buf, len| {
            if (*len as usize) < label.len() {
                *len = label.len() as libc::socklen_t;
                return Err(std::io::Error::from_raw_os_error(libc::ERANGE));
            }
            buf[..label.len()].copy_from_slice(label);
            *len = label.len() as libc::socklen_t;
            Ok(())
        }
    }

    #[test]
    fn long_labels_are_read_whole() {
        let short = b"system_u:system_r:unconfined_t:s0\0".to_vec();
        assert_eq!(label_with_retry(fake(&short)), Some(short.clone()));
        // Over 256 bytes: an MLS range with many categories.
        let mut long = b"unconfined_u:unconfined_r:unconfined_t:s0-s0:".to_vec();
        long.extend(
            (0..200)
                .map(|i| format!("c{i},"))
                .collect::<String>()
                .bytes(),
        );
        assert!(long.len() > 256);
        assert_eq!(label_with_retry(fake(&long)), Some(long.clone()));
        // A kernel that reports no size still gets a bigger buffer each time.
        let mut calls = 0;
        let got = label_with_retry(|buf, len| {
            calls += 1;
            if (*len as usize) < 1000 {
                return Err(std::io::Error::from_raw_os_error(libc::ERANGE));
            }
            buf[0] = b'x';
            *len = 1;
            Ok(())
        });
        assert_eq!(got, Some(b"x".to_vec()));
        assert_eq!(calls, 3); // 256, 512, then 1024 fits
    }

    #[test]
    fn absurd_or_failing_labels_give_none() {
        let huge = vec![b'a'; LABEL_MAX + 1];
        assert_eq!(label_with_retry(fake(&huge)), None);
        let none =
            label_with_retry(|_, _| Err(std::io::Error::from_raw_os_error(libc::ENOPROTOOPT)));
        assert_eq!(none, None);
    }
}
