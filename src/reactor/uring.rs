//! The io_uring backend: one multishot POLL_ADD per fd, re-armed if the kernel ends it.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::Event;

/// user_data of POLL_REMOVE requests themselves; their completions carry no news.
const REMOVE_TAG: u64 = u64::MAX;

pub struct Uring {
    ring: IoUring,
    /// token → fd, needed only to re-arm a multishot poll the kernel terminated.
    fds: HashMap<u64, RawFd>,
}

impl Uring {
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(1024)
            .or_else(|_| IoUring::new(1024))?;
        // No op we submit needs io-wq; cap it anyway so nothing can grow a thread per socket.
        let mut max = [1u32, 1u32];
        let _ = ring.submitter().register_iowq_max_workers(&mut max);
        Ok(Self {
            ring,
            fds: HashMap::new(),
        })
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

    fn arm(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let mask = (libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP) as u32;
        let e = opcode::PollAdd::new(types::Fd(fd), mask)
            .multi(true)
            .build()
            .user_data(token);
        self.push(e)
    }

    pub fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        self.fds.insert(token, fd);
        self.arm(fd, token)?;
        // Submit now so readiness already present is reported on the next wait.
        self.ring.submit()?;
        Ok(())
    }

    pub fn remove(&mut self, token: u64) {
        self.fds.remove(&token);
        let e = opcode::PollRemove::new(token).build().user_data(REMOVE_TAG);
        // The poll holds a file reference: the socket stays open until the removal is
        // processed, so submit it right away rather than at the next wait.
        if self.push(e).is_ok() {
            let _ = self.ring.submit();
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
        for cqe in self.ring.completion() {
            let token = cqe.user_data();
            if token == REMOVE_TAG {
                continue;
            }
            let live = self.fds.contains_key(&token);
            if !cqueue::more(cqe.flags()) && live {
                rearm.push(token);
            }
            if cqe.result() >= 0 || live {
                out.push(Event { token });
            }
        }
        for token in rearm {
            if let Some(&fd) = self.fds.get(&token) {
                self.arm(fd, token)?;
            }
        }
        Ok(())
    }
}
