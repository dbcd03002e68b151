//! TLS handshakes on their own thread, off the relay workers.
//!
//! A handshake costs the server a signature and key exchange (hundreds of µs to ms of CPU);
//! run inline on a relay worker, a burst of them delays every relayed call on that worker.
//! Here they run on a handshake thread with its own epoll, as SCHED_IDLE, so relay workers
//! win the CPU whenever both want it. A client whose handshake and
//! certificate checks pass is handed to a relay worker with its session (`Established`); one
//! that fails or stalls past the pre-open deadline is closed here, and the relay workers never
//! see it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::accept::{Established, Step, TlsAccept};
use crate::metrics::counters::Rejected;
use crate::reactor::{Event, Interest, Reactor};
use crate::shared::{Inbox, NewConn, Shared};
use crate::sys;
use crate::sys::drain_eventfd;
use crate::timers::Timers;

const WAKER_TOKEN: u64 = u64::MAX - 1;

/// Makes this thread SCHED_IDLE: any waking normal thread (a relay worker, the clients and
/// daemons on the machine) preempts it at once. A nice value only changes the CPU share: the
/// kernel's EEVDF scheduler usually lets a running task keep the CPU for the rest of its slice
/// (ms) when another wakes, whatever their nice values, and that is the stall relayed calls
/// would see. SCHED_IDLE still gets a small share on a
/// saturated machine, so handshakes slow down there but do not stop; the pre-open deadline
/// bounds the wait. Falls back to nice 19.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 = the calling thread; param is valid for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return;
    }
    let e = io::Error::last_os_error();
    // SAFETY: plain syscall; on Linux PRIO_PROCESS with a thread id sets that thread's nice.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    tracing::debug!(
        "SCHED_IDLE refused for the handshake thread ({e}); nice 19: {}",
        if rc == 0 { "set" } else { "refused too" }
    );
}

struct Pending {
    nc: NewConn,
    gen: u32,
    accept: TlsAccept,
    deadline: Instant,
}

/// One handshake thread.
pub struct Handshaker {
    index: usize,
    reactor: Reactor,
    rx: Receiver<NewConn>,
    waker: OwnedFd,
    shared: Arc<Shared>,
    workers: Vec<Inbox>,
    conns: Slab<Pending>,
    next_gen: u32,
    timers: Timers<(usize, u32)>,
    /// The registry's disconnect generation last scanned for.
    disconnects_seen: u64,
}

fn token(slot: usize, gen: u32) -> u64 {
    (u64::from(gen) << 32) | slot as u64
}

impl Handshaker {
    pub fn new(
        index: usize,
        rx: Receiver<NewConn>,
        waker: OwnedFd,
        shared: Arc<Shared>,
        workers: Vec<Inbox>,
    ) -> io::Result<Handshaker> {
        // epoll: handshakes are a few events per client, not the per-message path.
        let mut reactor = Reactor::new(crate::reactor::Kind::Epoll)?;
        reactor.add(waker.as_raw_fd(), WAKER_TOKEN, Interest::Read)?;
        Ok(Handshaker {
            index,
            reactor,
            rx,
            waker,
            shared,
            workers,
            conns: Slab::new(),
            next_gen: 1,
            timers: Timers::default(),
            disconnects_seen: 0,
        })
    }

    pub fn run(mut self) {
        lower_priority();
        let mut events: Vec<Event> = Vec::with_capacity(64);
        let mut due = Vec::new();
        loop {
            let timeout = self
                .timers
                .timeout(Instant::now(), Duration::from_millis(500));
            events.clear();
            if let Err(e) = self.reactor.wait(&mut events, Some(timeout)) {
                tracing::error!(handshaker = self.index, "reactor wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            for ev in &events {
                if ev.token == WAKER_TOKEN {
                    drain_eventfd(&self.waker);
                    self.take_new();
                    self.admin_disconnects();
                    continue;
                }
                let slot = (ev.token & 0xffff_ffff) as usize;
                let gen = (ev.token >> 32) as u32;
                if self.conns.get(slot).is_some_and(|p| p.gen == gen) {
                    self.drive(slot);
                }
            }
            due.clear();
            self.timers.pop_due(Instant::now(), &mut due);
            for &(at, (slot, gen)) in &due {
                if self
                    .conns
                    .get(slot)
                    .is_some_and(|p| p.gen == gen && p.deadline == at)
                {
                    let why = format!(
                        "TLS handshake not completed within {:?} (pre-open deadline)",
                        self.shared.preopen_deadline
                    );
                    self.close(slot, Rejected::Tls, &why);
                }
            }
            let Self { timers, conns, .. } = &mut self;
            timers.compact(conns.len(), |at, &(slot, gen)| {
                conns
                    .get(slot)
                    .is_some_and(|p| p.gen == gen && p.deadline == at)
            });
            if self.shared.shutdown.load(Ordering::Relaxed) {
                let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                for s in slots {
                    self.close(s, Rejected::Shutdown, "proxy shutting down");
                }
                return;
            }
        }
    }

    fn take_new(&mut self) {
        loop {
            let nc = match self.rx.try_recv() {
                Ok(nc) => nc,
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            };
            let accept = self
                .shared
                .tls
                .load_full()
                .ok_or_else(|| "TLS is not configured".to_string())
                .and_then(TlsAccept::new);
            let accept = match accept {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(conn = nc.id, "cannot start TLS: {e}");
                    // Out of the registry too, or it stays listed as a ghost.
                    self.closed(nc, Rejected::Internal, &format!("cannot start TLS: {e}"));
                    continue;
                }
            };
            // Marked while queued here (the scan below may have run before it arrived).
            if self.shared.registry.disconnect_requested(nc.id) {
                self.closed(nc, Rejected::Admin, "disconnected by an admin request");
                continue;
            }
            let gen = self.next_gen;
            self.next_gen = self.next_gen.wrapping_add(1).max(1);
            let deadline = nc
                .deadline
                .unwrap_or_else(|| Instant::now() + self.shared.preopen_deadline);
            let raw = nc.fd.as_raw_fd();
            let slot = self.conns.insert(Pending {
                nc,
                gen,
                accept,
                deadline,
            });
            self.timers.arm(deadline, (slot, gen));
            if let Err(e) = self.reactor.add(raw, token(slot, gen), Interest::ReadWrite) {
                self.close(
                    slot,
                    Rejected::Internal,
                    &format!("cannot watch the socket: {e}"),
                );
                continue;
            }
            // Edge-triggered: the ClientHello may already be waiting.
            self.drive(slot);
        }
    }

    /// Closes the handshaking clients an admin client asked to disconnect (client-disconnect);
    /// one that already went on to its worker is closed by the worker's adoption instead.
    fn admin_disconnects(&mut self) {
        let gen = self.shared.registry.disconnect_generation();
        if gen == self.disconnects_seen {
            return;
        }
        self.disconnects_seen = gen;
        let marked: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, p)| self.shared.registry.disconnect_requested(p.nc.id))
            .map(|(k, _)| k)
            .collect();
        for slot in marked {
            self.close(slot, Rejected::Admin, "disconnected by an admin request");
        }
    }

    fn drive(&mut self, slot: usize) {
        let Some(p) = self.conns.get_mut(slot) else {
            return;
        };
        match p.accept.drive(p.nc.fd.as_fd()) {
            Ok(Step::Blocked) => {}
            Ok(Step::Done) => self.hand_over(slot),
            Err(e) => self.close(slot, Rejected::Tls, &e),
        }
    }

    /// Certificate checks, kTLS, the confirmation byte, then off to a relay worker.
    fn hand_over(&mut self, slot: usize) {
        let Some(p) = self.conns.try_remove(slot) else {
            return;
        };
        let Pending {
            mut nc,
            gen,
            accept,
            ..
        } = p;
        self.reactor.remove(nc.fd.as_raw_fd(), token(slot, gen));
        let established = match accept.finish(&nc.fd) {
            Ok(e) => e,
            Err(why) => return self.closed(nc, Rejected::Tls, &why),
        };
        match &established {
            Established::Kernel { dn, .. } => {
                // The confirmation byte is the first plaintext the kernel encrypts, in a record
                // of its own as libvirt sends it; a fresh socket takes 1 byte.
                match sys::send(nc.fd.as_fd(), &[1]) {
                    Ok(1) => {}
                    other => {
                        let why = format!("cannot send the TLS confirmation byte: {other:?}");
                        return self.closed(nc, Rejected::Tls, &why);
                    }
                }
                tracing::info!(
                    conn = nc.id,
                    dn = dn.as_deref().unwrap_or(""),
                    "TLS established; records in the kernel (kTLS)"
                );
            }
            Established::User { dn, .. } => tracing::info!(
                conn = nc.id,
                dn = dn.as_deref().unwrap_or(""),
                "TLS established; records in userspace (no kTLS)"
            ),
        }
        nc.tls = Some(established);
        // The worker the acceptor chose (and registered for admin disconnects).
        let Some(w) = self.workers.get(nc.worker) else {
            return self.closed(nc, Rejected::Internal, "no relay worker");
        };
        if let Err(nc) = w.send(nc) {
            self.closed(*nc, Rejected::Internal, "relay worker is gone");
        }
    }

    fn close(&mut self, slot: usize, reason: Rejected, why: &str) {
        if let Some(p) = self.conns.try_remove(slot) {
            self.reactor.remove(p.nc.fd.as_raw_fd(), token(slot, p.gen));
            self.closed(p.nc, reason, why);
        }
    }

    /// Drops a client that never reached a relay worker (a rejection, for metrics).
    fn closed(&mut self, nc: NewConn, reason: Rejected, why: &str) {
        tracing::info!(conn = nc.id, "connection closed: {why}");
        self.shared.registry.remove(nc.id);
        self.shared.registry.rejected(reason, 1);
        drop(nc);
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::ListenerKind;
    use crate::registry::ClientRecord;

    #[test]
    fn a_client_whose_tls_cannot_start_leaves_the_registry() {
        let shared = Arc::new(crate::shared::test_shared());
        let (tx, rx) = std::sync::mpsc::channel();
        let waker = crate::sys::eventfd().unwrap();
        let mut h = Handshaker::new(0, rx, waker, shared.clone(), Vec::new()).unwrap();
        let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        shared.registry.insert(ClientRecord {
            id: 9,
            timestamp: 1,
            kind: ListenerKind::Tls,
            identity: Default::default(),
            peer_addr: None,
            worker: 0,
            claimed: None,
            opened_readonly: false,
            disconnect_requested: false,
        });
        shared.clients.fetch_add(1, Ordering::AcqRel);
        let nc = NewConn {
            id: 9,
            fd: ours.into(),
            kind: ListenerKind::Tls,
            identity: Default::default(),
            deadline: None,
            tls: None,
            unauthenticated: Some(crate::shared::Unauthenticated::new(&shared)),
            worker: 0,
            auth: crate::config::Auth::None,
            early: None,
            rate: None,
            carried: None,
        };
        assert!(tx.send(nc).is_ok());
        // No TLS settings: TlsAccept cannot start.
        h.take_new();
        assert_eq!(shared.clients.load(Ordering::Acquire), 0);
        assert_eq!(shared.unauthenticated.load(Ordering::Acquire), 0);
        assert!(shared.registry.list().is_empty(), "a ghost is listed");
    }
}
