//! The io_uring backend: one multishot POLL_ADD per registration, re-armed if the kernel ends
//! it.
//!
//! Every registration gets its own `user_data` id, never reused: a completion that arrives
//! after its registration was removed (the final -ECANCELED, or a CQE already in the ring)
//! then matches nothing and is dropped, even when the owner's token was registered again for
//! a new fd in the meantime.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{Event, Interest};

/// user_data of POLL_REMOVE requests themselves; their completions carry no news.
const REMOVE_TAG: u64 = u64::MAX;

struct Registration {
    token: u64,
    fd: RawFd,
    mask: u32,
}

pub struct Uring {
    ring: IoUring,
    next_id: u64,
    /// registration id → what it watches.
    regs: HashMap<u64, Registration>,
    /// token → registration id, to find what to remove.
    by_token: HashMap<u64, u64>,
}

fn mask(interest: Interest) -> u32 {
    match interest {
        Interest::Read => libc::POLLIN as u32,
        Interest::ReadWrite => (libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP) as u32,
        Interest::ReadOnly => (libc::POLLIN | libc::POLLRDHUP) as u32,
    }
}

impl Uring {
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(1024)
            .or_else(|_| IoUring::new(1024))?;
        // Waiting with a timeout needs IORING_ENTER_EXT_ARG (5.11).
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks EXT_ARG (kernel < 5.11)",
            ));
        }
        // No op we submit needs io-wq; cap it anyway so nothing can grow a thread per socket.
        let mut max = [1u32, 1u32];
        let _ = ring.submitter().register_iowq_max_workers(&mut max);
        let mut u = Self {
            ring,
            next_id: 1,
            regs: HashMap::new(),
            by_token: HashMap::new(),
        };
        u.probe_multishot_poll()?;
        Ok(u)
    }

    /// Multishot POLL_ADD needs 5.13; older kernels fail it with EINVAL. Try it once on an
    /// eventfd so that `Auto` can fall back to epoll instead of spinning on re-arms.
    fn probe_multishot_poll(&mut self) -> io::Result<()> {
        // SAFETY: plain syscall; the fd is owned right away.
        let efd = unsafe { libc::eventfd(1, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let e = opcode::PollAdd::new(types::Fd(efd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(0);
        self.push(e)?;
        self.ring.submit_and_wait(1)?;
        let cqe = self.ring.completion().next();
        let ok = cqe
            .as_ref()
            .is_some_and(|c| c.result() >= 0 && cqueue::more(c.flags()));
        // Tear the probe down before the eventfd goes.
        self.push(opcode::PollRemove::new(0).build().user_data(REMOVE_TAG))?;
        self.ring.submit_and_wait(1)?;
        self.ring.completion().for_each(drop);
        if ok {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks multishot poll (kernel < 5.13)",
            ))
        }
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entries we push reference no user memory (poll and poll-remove).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm(&mut self, id: u64) -> io::Result<()> {
        let Some(r) = self.regs.get(&id) else {
            return Ok(());
        };
        let e = opcode::PollAdd::new(types::Fd(r.fd), r.mask)
            .multi(true)
            .build()
            .user_data(id);
        self.push(e)
    }

    /// Records a registration for `token` (a fresh id) and returns it with the id it replaces.
    fn register(&mut self, fd: RawFd, token: u64, interest: Interest) -> (u64, Option<u64>) {
        let id = self.next_id;
        self.next_id += 1;
        self.regs.insert(
            id,
            Registration {
                token,
                fd,
                mask: mask(interest),
            },
        );
        (id, self.by_token.insert(token, id))
    }

    pub fn add(&mut self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let (id, old) = self.register(fd, token, interest);
        if let Some(old) = old {
            // The owner re-registered a token without removing it first: drop the old one.
            self.cancel(old);
        }
        if let Err(e) = self.arm(id).and_then(|_| self.ring.submit().map(drop)) {
            self.remove(token);
            return Err(e);
        }
        Ok(())
    }

    /// A new registration replaces the old one; both requests go in with the next wait (the
    /// fd stays open meanwhile). The new poll checks readiness when armed, so an edge the old
    /// one posted after our last reap (its completion is dropped as stale) is seen again.
    pub fn modify(&mut self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let (id, old) = self.register(fd, token, interest);
        if let Some(old) = old {
            self.regs.remove(&old);
            self.push(opcode::PollRemove::new(old).build().user_data(REMOVE_TAG))?;
        }
        self.arm(id)
    }

    fn cancel(&mut self, id: u64) {
        self.regs.remove(&id);
        let e = opcode::PollRemove::new(id).build().user_data(REMOVE_TAG);
        // The poll holds a file reference: the socket stays open until the removal is
        // processed, so submit it right away rather than at the next wait.
        if self.push(e).is_ok() {
            let _ = self.ring.submit();
        }
    }

    pub fn remove(&mut self, token: u64) {
        if let Some(id) = self.by_token.remove(&token) {
            self.cancel(id);
        }
    }

    pub fn wait(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let res = match timeout {
            Some(d) => {
                let ts = types::Timespec::new()
                    .sec(d.as_secs())
                    .nsec(d.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        if let Err(e) = res {
            match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) => {}
                _ => return Err(e),
            }
        }
        let mut rearm = Vec::new();
        let mut dead = Vec::new();
        for cqe in self.ring.completion() {
            let id = cqe.user_data();
            let Some(r) = self.regs.get(&id) else {
                continue;
            }; // removed: stale news
               // A poll completion's result is the ready mask; an error counts as readable so the
               // owner's next read reports it.
            let res = cqe.result();
            let readable = res < 0
                || res as u32
                    & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) as u32
                    != 0;
            let hup = res < 0
                || res as u32 & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) as u32 != 0;
            out.push(Event {
                token: r.token,
                readable,
                hup,
            });
            if cqueue::more(cqe.flags()) {
                continue;
            }
            let res = cqe.result();
            if res >= 0 || res == -libc::ECANCELED || res == -libc::ENOMEM {
                // The kernel ended the multishot (CQ overflow, cancellation we did not ask
                // for): watch again.
                rearm.push(id);
            } else {
                // A persistent error (EBADF, EINVAL): the owner learns the details from its
                // own syscalls after the event above; re-arming would only spin.
                tracing::warn!(token = r.token, "io_uring poll ended with error {}", -res);
                dead.push(id);
            }
        }
        for id in dead {
            if let Some(r) = self.regs.remove(&id) {
                self.by_token.remove(&r.token);
            }
        }
        for id in rearm {
            if let Err(e) = self.arm(id) {
                tracing::error!("io_uring re-arm failed: {e}");
            }
        }
        Ok(())
    }
}
