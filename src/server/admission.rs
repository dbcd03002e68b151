//! Handing clients to the relay workers: accepted ones, and those a previous process
//! carried over.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::limits::starts_anonymous;
use super::threads::WorkerHandle;
use crate::flood::{Source, SourceRates};
use crate::handover::{Carried, Resumed};
use crate::identity::Identity;
use crate::listen::ListenerKind;
use crate::metrics::counters::Rejected;
use crate::shared::{NewConn, Shared, Unauthenticated};
use crate::sys::wake;

/// `ip:port` of a TCP/TLS peer, for client-info.
fn peer_addr(kind: ListenerKind, fd: &OwnedFd) -> Option<std::net::SocketAddr> {
    if kind.is_unix() {
        return None;
    }
    let sa: nix::sys::socket::SockaddrStorage =
        nix::sys::socket::getpeername(fd.as_raw_fd()).ok()?;
    if let Some(v4) = sa.as_sockaddr_in() {
        Some(std::net::SocketAddr::V4((*v4).into()))
    } else {
        sa.as_sockaddr_in6()
            .map(|v6| std::net::SocketAddr::V6((*v6).into()))
    }
}

/// Whom a new client's pre-open frames are charged to (see `flood`); `None` for root, whose
/// frames are never slowed.
fn flood_source(identity: &Identity, peer: Option<std::net::SocketAddr>) -> Option<Source> {
    match (&identity.unix, peer) {
        (Some(u), _) if u.uid == 0 => None,
        (Some(u), _) => Some(Source::Uid(u.uid)),
        (None, Some(addr)) => Some(Source::Ip(addr.ip())),
        // A remote peer whose address we could not read: charge it with everyone else's.
        (None, None) => Some(Source::Uid(u32::MAX)),
    }
}

/// Hands accepted clients to the relay workers (through a TLS handshake thread for TLS).
pub(super) struct Admission<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) workers: &'a [WorkerHandle],
    pub(super) handshakers: &'a [WorkerHandle],
    pub(super) next_worker: usize,
    pub(super) next_handshaker: usize,
    pub(super) next_id: u64,
    /// Whether a client was admitted yet (see `over_max_clients`).
    pub(super) admitted_any: bool,
    /// The pre-open rate of each source (see `flood`).
    pub(super) rates: SourceRates,
}

impl Admission<'_> {
    /// Takes in the connections a previous process carried over: the same ids in the
    /// registry, each straight to a worker's relay. They are polled in chunks: those with
    /// bytes waiting go to their worker at once (a client mid-call waits for that), the idle
    /// rest once every chunk was polled, with one wake-up per worker.
    pub(super) fn resume(&mut self, r: Resumed) {
        let t = Instant::now();
        self.next_id = self.next_id.max(r.next_id);
        let n = r.carried.len();
        let mut first_ms = None;
        let mut idle = Vec::with_capacity(n);
        let mut carried = r.carried.into_iter();
        loop {
            let chunk: Vec<Carried> = carried.by_ref().take(BUSY_POLL_CHUNK).collect();
            if chunk.is_empty() {
                break;
            }
            let busy = busy_flags(&chunk);
            for (c, busy) in chunk.into_iter().zip(busy) {
                if busy {
                    self.resume_one(c, true);
                    first_ms = first_ms.or_else(|| crate::handover::ms_since(r.began_ns));
                } else {
                    idle.push(c);
                }
            }
        }
        for c in idle {
            self.resume_one(c, false);
        }
        for w in self.workers {
            wake(&w.inbox.waker);
        }
        if n > 0 {
            tracing::info!(
                conns = n,
                ms = t.elapsed().as_millis() as u64,
                first_since_quiesce_began_ms = first_ms,
                since_quiesce_began_ms = crate::handover::ms_since(r.began_ns),
                "carried connections resumed"
            );
        }
    }

    /// One carried connection to a worker (`wake_now`: its worker is woken for it).
    fn resume_one(&mut self, c: Carried, wake_now: bool) {
        let shared = self.shared;
        let rec = c.record;
        let Some(daemon) = c.daemon else {
            // A client that had sent nothing yet: as if just accepted.
            self.admit(c.client, rec.kind, rec.identity);
            return;
        };
        self.next_id = self.next_id.max(rec.id + 1);
        let owner = self.next_worker % self.workers.len();
        self.next_worker = self.next_worker.wrapping_add(1);
        shared.clients.fetch_add(1, Ordering::AcqRel);
        shared.registry.insert(crate::registry::ClientRecord {
            id: rec.id,
            timestamp: rec.timestamp,
            kind: rec.kind,
            identity: rec.identity.clone(),
            peer_addr: rec.peer_addr.clone(),
            worker: owner,
            claimed: rec.claimed.clone(),
            opened_readonly: rec.opened_readonly,
            disconnect_requested: false,
        });
        let id = rec.id;
        let nc = NewConn {
            id,
            fd: c.client,
            kind: rec.kind,
            identity: rec.identity.clone(),
            deadline: None,
            tls: None,
            unauthenticated: None,
            worker: owner,
            auth: shared.auth.of(rec.kind),
            early: None,
            rate: None,
            carried: Some(Box::new(crate::handover::Resume {
                record: rec,
                daemon,
            })),
        };
        if self.workers[owner].inbox.send_quiet(nc).is_err() {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            shared.registry.remove(id);
            shared.registry.rejected(Rejected::Internal, 1);
            tracing::error!(conn = id, "relay worker is gone; dropping a carried client");
        } else if wake_now {
            wake(&self.workers[owner].inbox.waker);
        }
    }

    pub(super) fn admit(&mut self, fd: OwnedFd, kind: ListenerKind, identity: Identity) {
        let shared = self.shared;
        let id = self.next_id;
        self.next_id += 1;
        self.admitted_any = true;
        match &identity.unix {
            Some(u) => {
                tracing::info!(conn = id, uid = u.uid, pid = u.pid, listener = ?kind, "client connected")
            }
            None => tracing::info!(conn = id, listener = ?kind, "client connected"),
        }
        shared.clients.fetch_add(1, Ordering::AcqRel);
        // The relay worker that will own it (a TLS client reaches it through a handshake
        // thread, which hands it to this worker).
        let owner = self.next_worker % self.workers.len();
        self.next_worker = self.next_worker.wrapping_add(1);
        let anonymous = starts_anonymous(shared, kind, &identity);
        let peer = peer_addr(kind, &fd);
        let rate = flood_source(&identity, peer).map(|s| self.rates.of(s, Instant::now()));
        shared.registry.insert(crate::registry::ClientRecord {
            id,
            timestamp: crate::registry::now_epoch(),
            kind,
            identity: identity.clone(),
            peer_addr: peer.map(|a| a.to_string()),
            worker: owner,
            claimed: None,
            opened_readonly: false,
            disconnect_requested: false,
        });
        let nc = NewConn {
            id,
            fd,
            kind,
            identity,
            auth: shared.auth.of(kind),
            // Remote clients must open in time; local ones must authenticate in time if they
            // count as anonymous (see `worker::preopen`'s deadline).
            deadline: (!kind.is_unix() || anonymous)
                .then(|| Instant::now() + shared.preopen_deadline),
            tls: None,
            worker: owner,
            rate,
            carried: None,
            unauthenticated: anonymous.then(|| Unauthenticated::new(shared)),
            // Started here, not in the worker: the daemon's accept then overlaps the
            // hand-over too.
            early: shared
                .last_open
                .guess(kind)
                .and_then(crate::shared::connect_early),
        };
        let to = if kind == ListenerKind::Tls && !self.handshakers.is_empty() {
            self.next_handshaker = self.next_handshaker.wrapping_add(1);
            &self.handshakers[self.next_handshaker % self.handshakers.len()]
        } else {
            &self.workers[owner]
        };
        if to.inbox.send(nc).is_err() {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            shared.registry.remove(id);
            shared.registry.rejected(Rejected::Internal, 1);
            tracing::error!("relay worker is gone; dropping client");
        }
    }
}

/// Carried connections polled per `poll()` call while resuming: a busy one goes to its
/// worker after its chunk's poll, not after 18,000 sockets' worth.
const BUSY_POLL_CHUNK: usize = 256;

/// Which of `carried` have bytes waiting on either socket (one poll() per chunk, not a
/// syscall per connection); all false if poll fails.
fn busy_flags(carried: &[Carried]) -> Vec<bool> {
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(carried.len() * 2);
    for c in carried {
        fds.push(PollFd::new(c.client.as_fd(), PollFlags::POLLIN));
        if let Some(d) = &c.daemon {
            fds.push(PollFd::new(d.as_fd(), PollFlags::POLLIN));
        }
    }
    if poll(&mut fds, PollTimeout::ZERO).is_err() {
        return vec![false; carried.len()];
    }
    let mut ready = fds
        .iter()
        .map(|f| f.revents().is_some_and(|r| !r.is_empty()));
    carried
        .iter()
        .map(|c| {
            let client = ready.next().unwrap_or(false);
            let daemon = c.daemon.is_some() && ready.next().unwrap_or(false);
            client || daemon
        })
        .collect()
}
