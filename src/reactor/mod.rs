//! Readiness notification for the relay workers, from io_uring or epoll.
//!
//! Both backends only report readiness; the syscalls that move bytes (recvmsg, sendmsg,
//! splice) are issued inline by the pump right after. io_uring's own SPLICE op always runs on
//! an io-wq kernel thread (design.md trap 1), so submitting it for a socket that may be idle
//! would park one kernel thread per connection. Multishot POLL_ADD parks nothing.
//!
//! Semantics for both: edge-style. An event means "something changed on this fd"; the owner
//! must then work until EAGAIN (or reschedule itself) before waiting again.

mod epoll;
mod uring;

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Auto,
    IoUring,
    Epoll,
}

/// What to watch an fd for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Wakers: readable only.
    Read,
    /// Sockets: readable, writable, peer closed.
    ReadWrite,
    /// Sockets with nothing waiting to be written: readable, peer closed. Watching
    /// writability only while a write is blocked saves a wake-up each time the peer reads
    /// what we sent (one per relayed call and side).
    ReadOnly,
}

/// A readiness report.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub token: u64,
    /// Data, EOF or an error may be waiting (so a read is worth a syscall).
    pub readable: bool,
    /// The peer closed (or the socket failed): a short read no longer proves the queue empty,
    /// since the EOF behind the data comes with no further edge.
    pub hup: bool,
}

/// One worker's readiness source.
pub enum Reactor {
    Uring(Box<uring::Uring>),
    Epoll(epoll::Epoll),
}

impl Reactor {
    /// Sets up the requested backend; `Auto` falls back to epoll when io_uring cannot be
    /// created (disabled by sysctl, blocked by seccomp, old kernel).
    pub fn new(kind: Kind) -> io::Result<Reactor> {
        match kind {
            Kind::Epoll => Ok(Reactor::Epoll(epoll::Epoll::new()?)),
            Kind::IoUring => Ok(Reactor::Uring(Box::new(uring::Uring::new()?))),
            Kind::Auto => match uring::Uring::new() {
                Ok(u) => Ok(Reactor::Uring(Box::new(u))),
                Err(e) => {
                    tracing::info!("io_uring unavailable ({e}); using epoll");
                    Ok(Reactor::Epoll(epoll::Epoll::new()?))
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Reactor::Uring(_) => "io_uring",
            Reactor::Epoll(_) => "epoll",
        }
    }

    /// Which path the backend runs, and why: for the startup log.
    pub fn path(&self) -> String {
        match self {
            Reactor::Uring(u) => {
                let f = u.features();
                let switch = match (f.poll_update, f.skip_success) {
                    (true, true) => "poll masks updated in place without a completion",
                    (true, false) => {
                        "poll masks updated in place, a completion each (no CQE_SKIP_SUCCESS)"
                    }
                    (false, _) => "polls replaced on each switch (no poll update)",
                };
                let completions = if f.defer_taskrun {
                    "completions posted at the wait (DEFER_TASKRUN)"
                } else {
                    "completions posted by task work (no DEFER_TASKRUN)"
                };
                format!("{switch}; {completions}")
            }
            Reactor::Epoll(_) => "epoll_ctl(MOD) on each switch".into(),
        }
    }

    /// Starts watching `fd` for readability and writability.
    pub fn add(&mut self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        match self {
            Reactor::Uring(u) => u.add(fd, token, interest),
            Reactor::Epoll(e) => e.add(fd, token, interest),
        }
    }

    /// Changes what a registered `fd` is watched for. Readiness that already holds for the
    /// new interest is reported at the next wait, so no edge is lost in the switch.
    pub fn modify(&mut self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        match self {
            Reactor::Uring(u) => u.modify(fd, token, interest),
            Reactor::Epoll(e) => e.modify(fd, token, interest),
        }
    }

    /// Stops watching `fd`; must be called before the fd is closed.
    pub fn remove(&mut self, fd: RawFd, token: u64) {
        match self {
            Reactor::Uring(u) => u.remove(token),
            Reactor::Epoll(e) => e.remove(fd),
        }
    }

    /// Waits for events (or the timeout) and appends them to `out`.
    pub fn wait(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Reactor::Uring(u) => u.wait(out, timeout),
            Reactor::Epoll(e) => e.wait(out, timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn events(r: &mut Reactor) -> Vec<u64> {
        let mut out = Vec::new();
        r.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        out.iter().map(|e| e.token).collect()
    }

    /// `ReadOnly` stops the wake-ups a peer's read causes; switching back to `ReadWrite`
    /// reports writability that already holds (no edge is lost in the switch); readability
    /// is reported throughout.
    #[test]
    fn write_interest_can_be_dropped_and_taken_up_again() {
        for kind in [Kind::IoUring, Kind::Epoll] {
            let Ok(mut r) = Reactor::new(kind) else {
                continue; // io_uring disabled here: epoll still runs
            };
            let (ours, mut peer) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            r.add(ours.as_raw_fd(), 7, Interest::ReadWrite).unwrap();
            assert_eq!(events(&mut r), vec![7], "{kind:?}: initially writable");
            (&ours).write_all(b"call").unwrap();
            let mut b = [0u8; 4];
            peer.read_exact(&mut b).unwrap();
            assert_eq!(
                events(&mut r),
                vec![7],
                "{kind:?}: the peer's read wakes us"
            );
            r.modify(ours.as_raw_fd(), 7, Interest::ReadOnly).unwrap();
            events(&mut r); // a switch may report current readiness once
            (&ours).write_all(b"call").unwrap();
            peer.read_exact(&mut b).unwrap();
            assert!(
                events(&mut r).is_empty(),
                "{kind:?}: no wake-up for the peer's read"
            );
            r.modify(ours.as_raw_fd(), 7, Interest::ReadWrite).unwrap();
            assert_eq!(
                events(&mut r),
                vec![7],
                "{kind:?}: writable now is reported"
            );
            r.modify(ours.as_raw_fd(), 7, Interest::ReadOnly).unwrap();
            events(&mut r);
            peer.write_all(b"reply").unwrap();
            let mut out = Vec::new();
            r.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
            assert!(
                out.iter().any(|e| e.token == 7 && e.readable),
                "{kind:?}: readable still reported"
            );
            r.remove(ours.as_raw_fd(), 7);
        }
    }
}
