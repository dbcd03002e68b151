//! The io_uring backend: one multishot POLL_ADD per registration, re-armed if the kernel ends
//! it.
//!
//! An interest switch updates the armed poll's mask in place (POLL_REMOVE with
//! `IORING_POLL_UPDATE_EVENTS`, 5.13) and asks for no completion when it succeeds
//! (`IOSQE_CQE_SKIP_SUCCESS`, 5.17): nothing but news ends the next wait. Kernels without
//! either get a new poll for each switch, and the old one's removal.
//!
//! Every registration gets its own `user_data` id, never reused: a completion that arrives
//! after its registration was removed (the final -ECANCELED, or a CQE already in the ring)
//! then matches nothing and is dropped, even when the owner's token was registered again for
//! a new fd in the meantime.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{Event, Interest};

/// user_data of a request to remove the poll with id `id` is `REMOVING | id`, of one to
/// update its mask `UPDATING | id` (ids count up from 1 and never reach these bits). Their
/// completions carry no news, only a failure to act on: a poll whose wake-up is being
/// processed answers -EALREADY and is left as it was, so the request is made again.
const REMOVING: u64 = 1 << 63;
const UPDATING: u64 = 1 << 62;
/// Probes' own requests.
const PROBE_TAG: u64 = REMOVING - 1;

/// What this kernel's io_uring offers beyond multishot poll.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// A poll's mask can be changed in place.
    pub poll_update: bool,
    /// A request can succeed without posting a completion.
    pub skip_success: bool,
    /// Completions are posted when the worker asks for them (`IORING_SETUP_DEFER_TASKRUN`,
    /// 6.1), not by interrupting whatever syscall it is in.
    pub defer_taskrun: bool,
}

/// A ring whose task work runs only when its one issuer waits; created disabled, so that
/// the issuer is the thread that first waits on it (see `Uring::enable`).
fn deferring_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_r_disabled()
        .build(entries)
}

fn plain_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_coop_taskrun()
        .build(1024)
        .or_else(|_| IoUring::new(1024))
}

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
    features: Features,
    /// False until the first `wait` of a deferring ring: nothing is submitted before.
    enabled: bool,
    /// Removals and updates that found their poll busy (-EALREADY) and were made again.
    retried: u64,
    /// Completions reaped that carried no news (a removal's, a cancelled poll's last one):
    /// each may have ended a wait for nothing.
    stale: u64,
}

fn mask(interest: Interest) -> u32 {
    match interest {
        Interest::Read => libc::POLLIN as u32,
        Interest::ReadWrite => (libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP) as u32,
        Interest::ReadOnly => (libc::POLLIN | libc::POLLRDHUP) as u32,
    }
}

/// What `Uring::probe` found, once per process: every worker's ring is alike.
static PROBED: OnceLock<Result<Features, (io::ErrorKind, String)>> = OnceLock::new();

impl Uring {
    /// A ring for one worker. With deferred task work it starts disabled, and the first
    /// `wait` enables it on the worker's own thread: that thread becomes its only issuer.
    pub fn new() -> io::Result<Self> {
        let features = PROBED
            .get_or_init(|| Self::probe().map_err(|e| (e.kind(), e.to_string())))
            .clone()
            .map_err(|(kind, why)| io::Error::new(kind, why))?;
        let ring = if features.defer_taskrun {
            deferring_ring(1024)?
        } else {
            plain_ring()?
        };
        Ok(Self::with_ring(ring, features))
    }

    fn with_ring(ring: IoUring, features: Features) -> Self {
        // No op we submit needs io-wq; cap it anyway so nothing can grow a thread per socket.
        let mut max = [1u32, 1u32];
        let _ = ring.submitter().register_iowq_max_workers(&mut max);
        Self {
            ring,
            next_id: 1,
            regs: HashMap::new(),
            by_token: HashMap::new(),
            enabled: !features.defer_taskrun,
            features,
            stale: 0,
            retried: 0,
        }
    }

    /// What this kernel offers, found on a throwaway ring.
    fn probe() -> io::Result<Features> {
        let ring = plain_ring()?;
        // Waiting with a timeout needs IORING_ENTER_EXT_ARG (5.11).
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks EXT_ARG (kernel < 5.11)",
            ));
        }
        let skip_success = ring.params().is_feature_skip_cqe_on_success();
        let mut u = Self::with_ring(ring, Features::default());
        u.probe_multishot_poll()?;
        Ok(Features {
            poll_update: u.probe_poll_update()?,
            skip_success,
            defer_taskrun: deferring_ring(2).is_ok(),
        })
    }

    pub fn features(&self) -> Features {
        self.features
    }

    /// Whether a poll's mask can be updated in place: an update of an armed poll on an eventfd
    /// must complete with 0 (EINVAL before 5.13).
    fn probe_poll_update(&mut self) -> io::Result<bool> {
        // SAFETY: plain syscall; the fd is owned right away.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let probe_id = 0;
        let add = opcode::PollAdd::new(types::Fd(efd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(probe_id);
        self.push(add)?;
        self.push(poll_update(probe_id, libc::POLLOUT as u32).user_data(PROBE_TAG))?;
        self.ring.submit_and_wait(1)?;
        let mut updated = false;
        for cqe in self.ring.completion() {
            if cqe.user_data() == PROBE_TAG {
                updated = cqe.result() == 0;
            }
        }
        // Tear the probe down before the eventfd goes.
        self.push(
            opcode::PollRemove::new(probe_id)
                .build()
                .user_data(REMOVING | probe_id),
        )?;
        self.ring.submit_and_wait(1)?;
        self.ring.completion().for_each(drop);
        Ok(updated)
    }

    /// `flags` for requests whose success carries no news.
    fn quiet(&self) -> squeue::Flags {
        if self.features.skip_success {
            squeue::Flags::SKIP_SUCCESS
        } else {
            squeue::Flags::empty()
        }
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
        self.push(opcode::PollRemove::new(0).build().user_data(REMOVING))?;
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
            if !self.enabled {
                return Err(io::Error::other(
                    "io_uring queue full before its first wait",
                ));
            }
            self.ring.submit()?;
        }
    }

    /// Submits what is queued, unless the ring waits for its issuer's first `wait`.
    fn submit_now(&mut self) -> io::Result<()> {
        if self.enabled {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Makes the calling thread the ring's issuer (a deferring ring is created disabled).
    fn enable(&mut self) -> io::Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
        }
        Ok(())
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
        if let Err(e) = self.arm(id).and_then(|_| self.submit_now()) {
            self.remove(token);
            return Err(e);
        }
        Ok(())
    }

    /// A new registration replaces the old one; both requests go in with the next wait (the
    /// fd stays open meanwhile). The new poll checks readiness when armed, so an edge the old
    /// one posted after our last reap (its completion is dropped as stale) is seen again.
    pub fn modify(&mut self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        if self.features.poll_update {
            if let Some(id) = self.by_token.get(&token).copied() {
                if let Some(r) = self.regs.get_mut(&id).filter(|r| r.fd == fd) {
                    r.mask = mask(interest);
                    // The update re-arms the poll, which checks readiness as a new one would.
                    // Should the poll have ended meanwhile (-ENOENT), its last completion is
                    // still to be reaped, and the re-arm in `wait` takes the new mask.
                    let mask = r.mask;
                    return self.push_update(id, mask);
                }
            }
        }
        let (id, old) = self.register(fd, token, interest);
        if let Some(old) = old {
            self.regs.remove(&old);
            self.push_removal(old)?;
        }
        self.arm(id)
    }

    fn push_update(&mut self, id: u64, mask: u32) -> io::Result<()> {
        let e = poll_update(id, mask).user_data(UPDATING | id);
        let quiet = self.quiet();
        self.push(e.flags(quiet))
    }

    fn push_removal(&mut self, id: u64) -> io::Result<()> {
        let e = opcode::PollRemove::new(id).build().user_data(REMOVING | id);
        let quiet = self.quiet();
        self.push(e.flags(quiet))
    }

    fn cancel(&mut self, id: u64) {
        self.regs.remove(&id);
        // The poll holds a file reference: the socket stays open until the removal is
        // processed, so submit it right away rather than at the next wait.
        if self.push_removal(id).is_ok() {
            let _ = self.submit_now();
        }
    }

    /// Acts on a removal's or an update's completion (it has none when it succeeded and the
    /// kernel skips those).
    fn on_request_done(&mut self, user_data: u64, res: i32) {
        if res != -libc::EALREADY {
            // 0; -ENOENT: the poll had ended already (its last completion re-arms it with
            // the new mask, or finds it removed); anything else would fail again.
            return;
        }
        self.retried += 1;
        let id = user_data & !(REMOVING | UPDATING);
        let again = if user_data & REMOVING != 0 {
            self.push_removal(id)
        } else if let Some(mask) = self.regs.get(&id).map(|r| r.mask) {
            self.push_update(id, mask)
        } else {
            Ok(()) // removed since: the removal is under way
        };
        if let Err(e) = again {
            tracing::error!("io_uring: cannot queue a poll request again: {e}");
        }
    }

    pub fn remove(&mut self, token: u64) {
        if let Some(id) = self.by_token.remove(&token) {
            self.cancel(id);
        }
    }

    #[cfg(test)]
    pub fn set_features(&mut self, features: Features) {
        self.features = features;
    }

    /// Completions so far that carried no news.
    pub fn stale_completions(&self) -> u64 {
        self.stale
    }

    /// Removals and updates made again after finding their poll busy.
    pub fn retried_requests(&self) -> u64 {
        self.retried
    }

    pub fn wait(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.enable()?;
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
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let id = cqe.user_data();
            if id & (REMOVING | UPDATING) != 0 {
                done.push((id, cqe.result()));
                continue;
            }
            let Some(r) = self.regs.get(&id) else {
                self.stale += 1; // removed: stale news
                continue;
            };
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
        for (user_data, res) in done {
            self.on_request_done(user_data, res);
        }
        Ok(())
    }
}

/// A request to set the mask of the multishot poll armed with user_data `id` (liburing's
/// `io_uring_prep_poll_update`; the crate has no builder for it): POLL_REMOVE with the
/// update flags in `len` and the new events in `poll32_events`.
fn poll_update(id: u64, mask: u32) -> squeue::Entry {
    const LEN: std::ops::Range<usize> = 24..28;
    const POLL32_EVENTS: std::ops::Range<usize> = 28..32;
    // include/uapi/linux/io_uring.h (the crate keeps its copies private).
    const IORING_POLL_ADD_MULTI: u32 = 1 << 0;
    const IORING_POLL_UPDATE_EVENTS: u32 = 1 << 1;
    let flags = IORING_POLL_UPDATE_EVENTS | IORING_POLL_ADD_MULTI;
    // SAFETY: `squeue::Entry` is `repr(C)` around the 64-byte `io_uring_sqe`, every field of
    // which is a plain integer (or a union of them): any byte pattern is a valid value.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(opcode::PollRemove::new(id).build()) };
    raw[LEN].copy_from_slice(&flags.to_ne_bytes());
    raw[POLL32_EVENTS].copy_from_slice(&mask.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Switches `ours` between write interest and none `rounds` times, each time after the
    /// peer read what we wrote; returns the events seen and the stale completions reaped.
    fn switch_rounds(u: &mut Uring, rounds: usize) -> (usize, u64) {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let fd = ours.as_raw_fd();
        u.add(fd, 9, Interest::ReadWrite).unwrap();
        let mut out = Vec::new();
        let stale_before = u.stale_completions();
        for _ in 0..rounds {
            (&ours).write_all(b"call").unwrap();
            let mut b = [0u8; 4];
            peer.read_exact(&mut b).unwrap();
            u.modify(fd, 9, Interest::ReadOnly).unwrap();
            u.wait(&mut out, Some(Duration::ZERO)).unwrap();
            u.modify(fd, 9, Interest::ReadWrite).unwrap();
            u.wait(&mut out, Some(Duration::from_millis(200))).unwrap();
        }
        u.remove(9);
        (out.len(), u.stale_completions() - stale_before)
    }

    /// An interest switch updates the poll in place: writability is still reported after each
    /// switch back, and no completion without news is reaped (the replacing fallback reaps
    /// a removal's and a cancelled poll's completion for each switch).
    #[test]
    fn interest_switches_update_the_poll_in_place_and_reap_nothing_stale() {
        let Ok(mut u) = Uring::new() else {
            return; // io_uring disabled here
        };
        let native = u.features();
        assert!(native.poll_update, "kernel 5.13+ updates polls: {native:?}");
        let (events, stale) = switch_rounds(&mut u, 20);
        assert!(events >= 20, "writable after each switch back: {events}");
        assert_eq!(stale, 0, "{native:?}");

        let mut u = Uring::new().unwrap();
        u.set_features(Features {
            defer_taskrun: native.defer_taskrun,
            ..Features::default()
        });
        let (events, stale) = switch_rounds(&mut u, 20);
        assert!(
            events >= 20,
            "fallback: writable after each switch back: {events}"
        );
        assert!(
            stale >= 20,
            "fallback reaps the replaced polls' ends: {stale}"
        );
    }

    /// A poll whose wake-up is still being processed refuses to be removed (-EALREADY); the
    /// removal is made again, so the socket we closed really closes: the poll holds a
    /// reference to it until removed.
    #[test]
    fn a_busy_poll_is_still_removed_and_the_socket_closes() {
        let Ok(mut u) = Uring::new() else {
            return;
        };
        let mut out = Vec::new();
        u.wait(&mut out, Some(Duration::ZERO)).unwrap();
        let mut retried = 0;
        for round in 0..20 {
            let (ours, mut peer) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            u.add(ours.as_raw_fd(), round, Interest::ReadWrite).unwrap();
            u.wait(&mut out, Some(Duration::from_millis(100))).unwrap();
            // A wake-up (write space after the peer's read) not yet reaped, then the removal.
            (&ours).write_all(b"call").unwrap();
            let mut b = [0u8; 4];
            peer.read_exact(&mut b).unwrap();
            let before = u.retried_requests();
            u.remove(round);
            drop(ours);
            for _ in 0..3 {
                u.wait(&mut out, Some(Duration::from_millis(10))).unwrap();
            }
            retried += u.retried_requests() - before;
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            assert_eq!(
                peer.read(&mut b).unwrap(),
                0,
                "round {round}: the peer sees EOF"
            );
        }
        // With deferred task work the wake-up is pending at every removal.
        if u.features().defer_taskrun {
            assert!(retried >= 20, "{retried}");
        }
    }
}
