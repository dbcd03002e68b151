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
}

/// A readiness report.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub token: u64,
    /// Data, EOF or an error may be waiting (so a read is worth a syscall).
    pub readable: bool,
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

    /// Starts watching `fd` for readability and writability.
    pub fn add(&mut self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        match self {
            Reactor::Uring(u) => u.add(fd, token, interest),
            Reactor::Epoll(e) => e.add(fd, token, interest),
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
