//! A relay worker thread: its own reactor, its own connections, its own buffer and pipe pools.
//! A connection lives on one worker for its whole life; nothing here takes a lock.
//!
//! The worker keeps the loop: reactor, inbox, deadlines, the runnable queue, pools, adopting
//! and closing. A connection's state and the steps that move it are in `conn`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::config::Auth;
use crate::handshake::{Action, Handshake};
use crate::identity::Identity;
use crate::listen::ListenerKind;
use crate::polkit;

mod handover;
mod preopen;
use crate::conn::preopen::{Pre, PreOpen};
use crate::conn::{
    client_frame_verdict, drive_layered, drive_relay, token, Conn, Deadlines, Outcome, Side, State,
    TimerKey, TimerKind,
};
use crate::metrics::meter::WorkerMeter;
use crate::reactor::{Event, Interest, Reactor};
use crate::relay::tracker::{Tracker, Verdict};
use crate::relay::{Direction, Pools, Pump};
use crate::shared::{EarlyConn, NewConn, Shared};
use crate::sys::{drain_eventfd, FrameCutter};
use crate::timers::Timers;
use crate::tls::accept::Established;
use crate::tls::shuttle::{Flow, Shuttle};

/// A worker's line to the polkit threads: requests out, answers back (with its eventfd).
pub type PolkitLink = crate::offload::Link<polkit::Request, polkit::Answer>;

/// A worker's line to the SASL threads.
pub type SaslLink = crate::offload::Link<crate::sasl::Request, crate::sasl::Answer>;

/// How long the downstream handshake may take before the client gets an error (connect
/// retries while the daemon's backlog is full included).
const DOWNSTREAM_DEADLINE: Duration = Duration::from_secs(30);
/// An early connection the client has not opened by then is closed, so that a client idling
/// before its open (or waiting on a polkit agent) does not hold a daemon connection.
const EARLY_UNUSED_FOR: Duration = Duration::from_secs(5);
/// Longest sleep of a worker with nothing due (a safety net; wake-ups come from the reactor).
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// Largest frame the driver daemon may send during the downstream handshake (it is trusted;
/// its real replies are tiny).
const PREOPEN_DAEMON_FRAME_MAX: usize = 1 << 20;
/// Largest frame accepted from a client before its open, local or remote (every client is
/// untrusted until then; real opens are tiny): this bounds what one of them makes us buffer
/// (frame plus one read chunk in, `PREOPEN_TX_CAP` plus one reply out).
const PREOPEN_FRAME_MAX: usize = 64 * 1024;
/// The same on a SASL listener: a 64 KiB token travels as 256 KiB (4 bytes per byte).
const PREOPEN_FRAME_MAX_SASL: usize = 320 * 1024;
const WAKER_TOKEN: u64 = u64::MAX - 1;
/// Replies queued for a pre-open client beyond which it is not read any more.
const PREOPEN_TX_CAP: usize = 64 * 1024;
/// New clients adopted per loop turn (see `Worker::adopt_from_inbox`).
const ADOPT_PER_TURN: usize = 4;
/// Connections carried over by a restart adopted per loop turn.
const CARRIED_PER_TURN: usize = 1024;
/// Pre-open frames handled per service before other connections get a turn.
const PREOPEN_FRAMES_PER_DRIVE: usize = 64;

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// An offload thread's answer for one of this worker's pre-open connections.
trait OffloadAnswer {
    /// The connection it is for: slot and generation.
    fn conn(&self) -> (usize, u32);
    /// Gives it to the pre-open connection `conn`'s handshake; `out` gets what that does next.
    fn deliver(self, conn: &mut Conn, out: &mut Vec<Action>);
}

impl OffloadAnswer for polkit::Answer {
    fn conn(&self) -> (usize, u32) {
        (self.slot, self.gen)
    }

    fn deliver(self, conn: &mut Conn, out: &mut Vec<Action>) {
        let State::Pre(p) = &mut conn.state else {
            return;
        };
        p.hs.on_polkit_answer(self.result, out);
    }
}

impl OffloadAnswer for crate::sasl::Answer {
    fn conn(&self) -> (usize, u32) {
        (self.slot, self.gen)
    }

    fn deliver(self, conn: &mut Conn, out: &mut Vec<Action>) {
        let State::Pre(p) = &mut conn.state else {
            return;
        };
        conn.sasl = self.session;
        p.hs.on_sasl_answer(self.outcome, out);
    }
}

/// One worker's loop.
pub struct Worker {
    index: usize,
    reactor: Reactor,
    rx: Receiver<NewConn>,
    waker: OwnedFd,
    shared: Arc<Shared>,
    conns: Slab<Conn>,
    pools: Pools,
    next_gen: u32,
    runnable: VecDeque<(usize, u32)>,
    /// Present when a listener uses polkit.
    polkit: Option<PolkitLink>,
    /// Present when a listener uses SASL.
    sasl: Option<SaslLink>,
    timers: Timers<TimerKey>,
    /// Its counter block, when metrics are on (`with_metrics`).
    meter: Option<WorkerMeter>,
    /// New clients may be waiting in `rx` (the waker fired, or the last turn stopped early).
    inbox_pending: bool,
}

impl Worker {
    pub fn new(
        index: usize,
        reactor: Reactor,
        rx: Receiver<NewConn>,
        waker: OwnedFd,
        shared: Arc<Shared>,
        polkit: Option<PolkitLink>,
        sasl: Option<SaslLink>,
    ) -> io::Result<Worker> {
        let mut w = Worker {
            index,
            reactor,
            rx,
            waker,
            pools: Pools::new(64 * 1024, 1 << 20, shared.splice_threshold),
            shared,
            conns: Slab::new(),
            next_gen: 1,
            runnable: VecDeque::new(),
            polkit,
            sasl,
            timers: Timers::default(),
            meter: None,
            inbox_pending: false,
        };
        let raw = w.waker.as_raw_fd();
        w.reactor.add(raw, WAKER_TOKEN, Interest::Read)?;
        Ok(w)
    }

    /// Counts into `meter` (metrics on); without it the relay counts nothing.
    pub fn with_metrics(mut self, meter: Option<WorkerMeter>) -> Worker {
        self.meter = meter;
        self
    }

    pub fn run(mut self) {
        tracing::debug!(
            worker = self.index,
            backend = self.reactor.name(),
            "worker started"
        );
        let mut events: Vec<Event> = Vec::with_capacity(256);
        let mut drain_until: Option<Instant> = None;
        let mut handover_until: Option<Instant> = None;
        loop {
            let timeout = if !self.runnable.is_empty() || self.inbox_pending {
                Some(Duration::ZERO)
            } else if drain_until.is_some() || handover_until.is_some() {
                Some(Duration::from_millis(20))
            } else {
                Some(self.timers.timeout(Instant::now(), IDLE_WAIT))
            };
            events.clear();
            if let Err(e) = self.reactor.wait(&mut events, timeout) {
                tracing::error!(worker = self.index, "reactor wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            let woke = self.meter.as_ref().map(|_| Instant::now());
            for ev in &events {
                if ev.token == WAKER_TOKEN {
                    self.drain_waker();
                    self.inbox_pending = true;
                    self.polkit_answers();
                    self.sasl_answers();
                    self.admin_disconnects();
                    self.client_stats();
                    continue;
                }
                let slot = ((ev.token & 0xffff_ffff) >> 2) as usize;
                let gen = (ev.token >> 32) as u32;
                if ev.readable {
                    self.mark_readable(slot, gen, (ev.token & 3) as u8, ev.hup);
                }
                self.service(slot, gen);
            }
            for _ in 0..self.runnable.len() {
                if let Some((slot, gen)) = self.runnable.pop_front() {
                    match self.conns.get_mut(slot) {
                        Some(c) if c.gen == gen => c.queued = false,
                        _ => continue,
                    }
                    self.service(slot, gen);
                }
            }
            if self.inbox_pending {
                self.inbox_pending = self.adopt_from_inbox();
            }
            self.fire_timers();
            if let (Some(m), Some(woke)) = (&self.meter, woke) {
                m.loop_turn(woke);
            }
            if self.shared.handover.requested.load(Ordering::Relaxed) {
                if self.handover_step(&mut handover_until) {
                    tracing::info!(
                        worker = self.index,
                        since_quiesce_began_ms =
                            crate::handover::ms_since(Some(self.shared.handover.began_ns())),
                        "worker quiesced"
                    );
                    self.shared.handover.worker_left();
                    return;
                }
                continue;
            }
            if self.shared.shutdown.load(Ordering::Relaxed) {
                let deadline =
                    *drain_until.get_or_insert_with(|| Instant::now() + self.shared.drain_grace);
                let expired = Instant::now() >= deadline;
                // Connections between frames close now; those mid-frame get until the deadline.
                let slots: Vec<usize> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| expired || c.at_rest())
                    .map(|(k, _)| k)
                    .collect();
                for s in slots {
                    self.close(
                        s,
                        if expired {
                            "proxy shut down (grace period over)"
                        } else {
                            "proxy shutting down"
                        },
                    );
                }
                if self.conns.is_empty() {
                    return;
                }
            }
        }
    }

    fn drain_waker(&mut self) {
        drain_eventfd(&self.waker);
    }

    /// Adopts up to `ADOPT_PER_TURN` new clients; true if more are waiting. A burst of new
    /// clients (a TLS handshake thread hands them over in batches) is spread over loop turns,
    /// so the established connections' events are served in between.
    fn adopt_from_inbox(&mut self) -> bool {
        let mut adopted = 0;
        // Connections carried from a previous process take no step on adoption (see
        // `adopt_carried`): many of them fit in a turn.
        let mut carried = 0;
        while adopted < ADOPT_PER_TURN && carried < CARRIED_PER_TURN {
            match self.rx.try_recv() {
                Ok(nc) if nc.carried.is_some() => {
                    carried += 1;
                    self.adopt(nc);
                }
                Ok(nc) => {
                    adopted += 1;
                    self.adopt(nc);
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    fn adopt(&mut self, mut nc: NewConn) {
        if let Some(resume) = nc.carried.take() {
            return self.adopt_carried(nc.fd, *resume);
        }
        // client-disconnect while it was queued here or in its TLS handshake.
        if self.shared.registry.disconnect_requested(nc.id) {
            tracing::info!(
                conn = nc.id,
                "connection closed: disconnected by an admin request"
            );
            self.shared.registry.remove(nc.id);
            self.shared
                .registry
                .rejected(crate::metrics::counters::Rejected::Admin, 1);
            drop(nc);
            self.shared.clients.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        // A client is authenticated once it is here (a TLS client's session is up), unless its
        // listener asks for polkit: then it stays counted until AUTH_POLKIT or root's bypass.
        let unauthenticated = if nc.auth != Auth::None {
            nc.unauthenticated
        } else {
            None
        };
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let mut identity = nc.identity;
        let mut client = nc.fd;
        let mut shuttle = None;
        let mut cutter = None;
        // Sockets to watch besides the client one: (fd, side).
        let mut extra = Vec::new();
        let tls_established = nc.tls.is_some();
        // SASL needs the TCP socket's addresses, taken before a userspace TLS client's
        // socket is swapped for its plaintext end.
        let sasl_addrs = (nc.auth == Auth::Sasl).then(|| crate::sasl::addresses(&client));
        let mut key_bits = None;
        match nc.tls {
            None => {}
            Some(Established::Kernel { dn, key_bits: bits }) => {
                key_bits = bits;
                // The handshake thread sent the confirmation byte; writes must end at frame
                // ends from here on (see `FrameCutter`).
                cutter = Some(FrameCutter::default());
                identity = Identity {
                    x509_dname: dn,
                    ..Identity::default()
                };
            }
            Some(Established::User { conn, dn }) => {
                key_bits = conn
                    .negotiated_cipher_suite()
                    .and_then(crate::tls::accept::key_bits);
                let (local_client, local_shuttle) = match socketpair() {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(conn = nc.id, "socketpair: {e}");
                        self.shared.registry.remove(nc.id);
                        self.shared
                            .registry
                            .rejected(crate::metrics::counters::Rejected::Internal, 1);
                        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
                        return;
                    }
                };
                extra.push((local_shuttle.as_raw_fd(), Side::LocalShuttle));
                extra.push((client.as_raw_fd(), Side::Accepted));
                let tcp = std::mem::replace(&mut client, local_client);
                shuttle = Some(Box::new(Shuttle::new(conn, tcp, local_shuttle)));
                identity = Identity {
                    x509_dname: dn,
                    ..Identity::default()
                };
            }
        }
        let sasl = sasl_addrs.map(|(local, remote)| {
            let secure = nc.kind != ListenerKind::Tcp;
            crate::handshake::SaslParams {
                setup: crate::sasl::Setup {
                    local,
                    remote,
                    // libvirt tells SASL the TLS cipher's key size in bits.
                    external_ssf: key_bits.filter(|_| tls_established),
                    secure,
                    tcp_min_ssf: self.shared.sasl.tcp_min_ssf,
                },
                allowed: self.shared.sasl.allowed.clone(),
            }
        });
        if tls_established {
            // client-info shows a TLS client's DN.
            self.shared.registry.set_identity(nc.id, identity.clone());
        }
        let client_side = if shuttle.is_some() {
            Side::LocalClient
        } else {
            Side::Accepted
        };
        let raw = client.as_raw_fd();
        let watch_all = shuttle.is_some();
        let mut timers = Deadlines::default();
        timers[TimerKind::PreOpen] = nc.deadline;
        entry.insert(Conn {
            id: nc.id,
            gen,
            kind: nc.kind,
            queued: false,
            inheritable: false,
            tls: shuttle,
            client_readable: true,
            daemon_readable: true,
            client_write_watched: watch_all,
            daemon_write_watched: false,
            client_hup: false,
            daemon_hup: false,
            client,
            daemon: None,
            state: State::Pre(Box::new(PreOpen {
                hs: match sasl {
                    Some(params) => Handshake::new(nc.kind, identity)
                        .with_auth(nc.auth)
                        .with_sasl(params),
                    None => Handshake::new(nc.kind, identity).with_auth(nc.auth),
                },
                c_rx: Vec::new(),
                c_tx: Vec::new(),
                d_rx: Vec::new(),
                d_tx: Vec::new(),
                rate: nc.rate,
                client_frames: 0,
                timers,
                connecting: None,
                closing: None,
                cutter,
                layer: None,
            })),
            uri: None,
            daemon_path: None,
            since: Instant::now(),
            unauthenticated,
            sasl: None,
            meter: self.meter.as_ref().map(|m| m.adopted(nc.kind)),
        });
        if let Some(at) = nc.deadline {
            self.timers.arm(
                at,
                TimerKey {
                    slot,
                    gen,
                    kind: TimerKind::PreOpen,
                },
            );
        }
        // A plain (or kTLS) client starts with nothing to write to it: writability is watched
        // once a write blocks (`watch_blocked_writes`). The userspace TLS sockets watch all.
        let first = if matches!(client_side, Side::Accepted) {
            Interest::ReadOnly
        } else {
            Interest::ReadWrite
        };
        extra.insert(0, (raw, client_side));
        for (i, (fd, side)) in extra.into_iter().enumerate() {
            let interest = if i == 0 { first } else { Interest::ReadWrite };
            if let Err(e) = self.reactor.add(fd, token(slot, gen, side), interest) {
                tracing::warn!(conn = nc.id, "cannot watch client socket: {e}");
                self.close(slot, "reactor registration failed");
                return;
            }
        }
        if let Some(early) = nc.early {
            self.take_early(slot, gen, early);
        }
        // The client has usually sent its first call by now, and an early connection's
        // answer may be in: both are read without waiting for the next readiness report.
        self.service(slot, gen);
    }

    /// Gives a new client the daemon connection the accept thread made for it.
    fn take_early(&mut self, slot: usize, gen: u32, early: EarlyConn) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let State::Pre(p) = &mut conn.state else {
            return;
        };
        if !p.hs.with_early(early.target) {
            return;
        }
        let at = Instant::now() + EARLY_UNUSED_FOR;
        preopen::arm_timer(&mut self.timers, p, slot, gen, TimerKind::Early, at);
        if let Err(e) = preopen::attach_daemon(&mut self.reactor, conn, slot, gen, early.fd) {
            tracing::warn!(conn = conn.id, "cannot watch the early daemon socket: {e}");
            if let State::Pre(p) = &mut conn.state {
                p.hs.on_early_dropped(&mut Vec::new());
                p.timers[TimerKind::Early] = None;
            }
        }
    }

    /// Records that a socket may have data, so its pump will read it.
    fn mark_readable(&mut self, slot: usize, gen: u32, side: u8, hup: bool) {
        let Some(c) = self.conns.get_mut(slot).filter(|c| c.gen == gen) else {
            return;
        };
        let shuttle = c.tls.is_some();
        match side {
            s if s == Side::Daemon as u8 => {
                c.daemon_readable = true;
                c.daemon_hup |= hup;
            }
            s if s == Side::LocalClient as u8 || (s == Side::Accepted as u8 && !shuttle) => {
                c.client_readable = true;
                c.client_hup |= hup;
            }
            _ => {}
        }
    }

    fn service(&mut self, slot: usize, gen: u32) {
        match self.conns.get(slot) {
            Some(c) if c.gen == gen => {}
            _ => return, // stale event for a closed connection
        }
        let outcome = self.drive(slot);
        if !matches!(outcome, Outcome::Close(_)) {
            if let Err(e) = self.watch_blocked_writes(slot) {
                return self.close(slot, &format!("reactor update failed: {e}"));
            }
        }
        match outcome {
            Outcome::Keep => {}
            Outcome::Yield => {
                if let Some(c) = self.conns.get_mut(slot) {
                    if !c.queued {
                        c.queued = true;
                        self.runnable.push_back((slot, gen));
                    }
                }
            }
            Outcome::Close(why) => self.close(slot, &why),
        }
    }

    /// A connection watches a socket's writability only while bytes for it wait:
    /// otherwise every read the peer makes of what we sent would wake this worker for
    /// nothing. A userspace TLS client's own sockets keep watching everything (the
    /// shuttle's writes are not tracked here).
    fn watch_blocked_writes(&mut self, slot: usize) -> std::io::Result<()> {
        let Some(c) = self.conns.get_mut(slot) else {
            return Ok(());
        };
        let (client, daemon) = match &c.state {
            State::Relay { c2d, d2c, head, .. } => (
                !head.is_empty() || d2c.wants_writable(),
                c2d.wants_writable(),
            ),
            State::Pre(p) => (!p.c_tx.is_empty(), !p.d_tx.is_empty()),
            State::Layered(r) => (
                !r.pending_to_client().is_empty(),
                !r.pending_to_daemon().is_empty(),
            ),
        };
        let interest = |w: bool| {
            if w {
                Interest::ReadWrite
            } else {
                Interest::ReadOnly
            }
        };
        // A userspace TLS client's sockets stay watched for everything; its daemon socket
        // follows the rule like any other.
        if c.tls.is_none() && client != c.client_write_watched {
            self.reactor.modify(
                c.client.as_raw_fd(),
                token(slot, c.gen, Side::Accepted),
                interest(client),
            )?;
            c.client_write_watched = client;
        }
        if let Some(d) = c
            .daemon
            .as_ref()
            .filter(|_| daemon != c.daemon_write_watched)
        {
            self.reactor.modify(
                d.as_raw_fd(),
                token(slot, c.gen, Side::Daemon),
                interest(daemon),
            )?;
            c.daemon_write_watched = daemon;
        }
        Ok(())
    }

    fn drive(&mut self, slot: usize) -> Outcome {
        match self.drive_tls(slot) {
            Ok(true) => {}
            Ok(false) => return Outcome::Keep,
            Err(why) => return Outcome::Close(why),
        }
        let outcome = self.drive_plain(slot);
        // What the pre-open or relay just wrote for a userspace TLS client goes out now.
        if let Some(Conn { tls: Some(sh), .. }) = self.conns.get_mut(slot) {
            if let Flow::Closed(why) = sh.drive() {
                return Outcome::Close(format!("TLS: {why}"));
            }
        }
        outcome
    }

    /// The userspace TLS layer of a TLS client, if it has one. Ok(false): nothing to do.
    fn drive_tls(&mut self, slot: usize) -> Result<bool, String> {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Ok(false);
        };
        conn.drive_tls()
    }

    fn drive_plain(&mut self, slot: usize) -> Outcome {
        let is_pre = matches!(self.conns.get(slot).map(|c| &c.state), Some(State::Pre(_)));
        if is_pre {
            match self.drive_preopen(slot) {
                Ok(Pre::Relay) => {} // became a relay: fall through and drive it
                Ok(Pre::Keep) => return Outcome::Keep,
                Ok(Pre::Yield) => return Outcome::Yield,
                Err(why) => return Outcome::Close(why),
            }
        }
        let Self {
            conns,
            pools,
            shared,
            meter,
            ..
        } = self;
        let Some(conn) = conns.get_mut(slot) else {
            return Outcome::Keep;
        };
        let counters = meter.as_ref().map(|m| m.counters());
        match conn.state {
            State::Layered(_) => drive_layered(conn, pools, shared, counters),
            _ => drive_relay(conn, pools, shared, counters),
        }
    }

    fn close(&mut self, slot: usize, why: &str) {
        if !self.conns.contains(slot) {
            return;
        }
        let mut conn = self.conns.remove(slot);
        let client_side = match &mut conn.tls {
            Some(sh) => {
                sh.close_notify();
                self.reactor
                    .remove(sh.tcp.as_raw_fd(), token(slot, conn.gen, Side::Accepted));
                self.reactor.remove(
                    sh.local.as_raw_fd(),
                    token(slot, conn.gen, Side::LocalShuttle),
                );
                Side::LocalClient
            }
            _ => Side::Accepted,
        };
        self.reactor
            .remove(conn.client.as_raw_fd(), token(slot, conn.gen, client_side));
        if let Some(d) = &conn.daemon {
            self.reactor
                .remove(d.as_raw_fd(), token(slot, conn.gen, Side::Daemon));
        }
        let (mut moved, mut suppressed) = ((0, 0), 0);
        match &mut conn.state {
            State::Relay { c2d, d2c, .. } => {
                moved = (c2d.moved, d2c.moved);
                c2d.release(&mut self.pools);
                d2c.release(&mut self.pools);
            }
            State::Layered(r) => moved = (r.to_daemon_bytes, r.to_client_bytes),
            State::Pre(p) => suppressed = p.hs.log_suppressed(),
        }
        tracing::info!(
            conn = conn.id,
            uri = conn.uri.as_deref().unwrap_or(""),
            secs = conn.since.elapsed().as_secs_f32(),
            to_daemon = moved.0,
            to_client = moved.1,
            "connection closed: {why}{}",
            if suppressed > 0 {
                format!(" ({suppressed} log lines about it were suppressed)")
            } else {
                String::new()
            }
        );
        if let Some(m) = &self.meter {
            m.closed(
                conn.kind,
                conn.meter.as_deref_mut(),
                why,
                conn.since.elapsed(),
            );
        }
        self.shared.registry.remove(conn.id);
        drop(conn);
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }

    /// Answers from the polkit threads for this worker's connections.
    fn polkit_answers(&mut self) {
        self.offload_answers(|w| w.polkit.as_ref()?.rx.try_recv().ok());
    }

    /// Answers from the SASL threads: the session comes back to its connection.
    fn sasl_answers(&mut self) {
        self.offload_answers(|w| w.sasl.as_ref()?.rx.try_recv().ok());
    }

    /// Hands each answer `next` gives to its connection's handshake and carries out what the
    /// handshake does next. An answer for a client that left meanwhile (its slot empty or
    /// reused, or past pre-open) is dropped, with the SASL session it carries.
    fn offload_answers<A: OffloadAnswer>(&mut self, next: impl Fn(&Self) -> Option<A>) {
        while let Some(answer) = next(self) {
            let (slot, gen) = answer.conn();
            let mut out = Vec::new();
            match self.conns.get_mut(slot) {
                Some(c) if c.gen == gen && matches!(c.state, State::Pre(_)) => {
                    answer.deliver(c, &mut out)
                }
                _ => continue,
            }
            match self.apply(slot, &mut out) {
                Ok(()) => self.service(slot, gen),
                Err(why) => self.close(slot, &why),
            }
        }
    }

    /// Connections an admin client asked to disconnect (client-disconnect): closed like any
    /// other close, so the client sees EOF and the daemon side is shut.
    /// Its clients' own figures, when `/clients` (all of them) or client-info (one) asks.
    fn client_stats(&mut self) {
        let Some(ask) = self.shared.registry.stats_wanted(self.index) else {
            return;
        };
        // What `/clients` costs the relay: its bound is checked against this count.
        if let Some(m) = &self.meter {
            m.counters().client_stats.inc();
        }
        let now = Instant::now();
        let stats = self
            .conns
            .iter()
            .filter(|(_, c)| ask.only.map_or(true, |id| id == c.id))
            .filter_map(|(_, c)| {
                let m = c.meter.as_ref()?;
                Some(crate::registry::ClientStats {
                    id: c.id,
                    bytes_to_daemon: m.bytes[0],
                    bytes_to_client: m.bytes[1],
                    calls: m.calls,
                    idle_ms: m
                        .last_activity
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                })
            })
            .collect();
        self.shared.registry.give_stats(ask.round, stats);
    }

    fn admin_disconnects(&mut self) {
        for id in self.shared.registry.take_disconnects(self.index) {
            let slot = self.conns.iter().find(|(_, c)| c.id == id).map(|(k, _)| k);
            if let Some(slot) = slot {
                self.close(slot, "disconnected by an admin request");
            }
        }
    }
}
