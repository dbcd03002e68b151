//! The acceptor (main thread) and the relay workers it feeds.
//!
//! The acceptor owns the listeners, reads signals from a signalfd, captures each client's
//! credentials at accept time, and hands the socket to a worker round-robin. Workers never
//! share a connection, so the per-message path has no lock (design.md "Reactor and threads").

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::flood::{Source, SourceRates};
use crate::handover::{HandOff, HandOffMode, Resumed};
use crate::identity::{Identity, NameCache};
use crate::listen::{Listener, ListenerKind};
use crate::metrics::counters::Rejected;
use crate::reactor::{self, Reactor};
use crate::shared::{over_max_clients, Inbox, NewConn, Shared, Unauthenticated};
use crate::sys::{drain_eventfd, eventfd, wake};
use crate::tls::handshaker::Handshaker;
use crate::worker::Worker;

/// How the server is to run.
pub struct ServerOpts {
    pub listeners: Vec<Listener>,
    pub workers: usize,
    pub backend: reactor::Kind,
    /// Exit when no client has been connected for this long.
    pub idle_timeout: Option<Duration>,
    pub shared: Arc<Shared>,
    /// Called on SIGHUP (config reload).
    pub on_reload: Box<dyn FnMut(&Shared)>,
    /// What the admin server on `libvirt-admin-sock` listeners needs.
    pub admin: crate::admin::serve::AdminOpts,
    /// Connections carried from the previous process, adopted before anything is accepted.
    pub resumed: Option<Resumed>,
    /// Whether restarts hand connections over (`restart_handover`); under systemd SIGTERM
    /// then stores them in the fd store.
    pub handover: bool,
    /// Asks the binary that would take over whether it can (see `HandOff`); an error keeps
    /// this process serving.
    pub handover_check: Box<dyn FnMut() -> Result<(), String>>,
    /// The metrics endpoint's source when metrics are on: the workers count into blocks it
    /// reads (`metrics::counters`); `None` and the relay counts nothing.
    pub metrics: Option<Arc<crate::metrics::Source>>,
}

/// Tells systemd (Type=notify) about our state; a no-op without NOTIFY_SOCKET.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// Why the server stopped.
#[derive(Debug)]
pub enum Stopped {
    Signal(i32),
    IdleTimeout,
    /// A restart: everything that can move is in here for the next process.
    HandOver(Box<HandOff>),
}

struct WorkerHandle {
    inbox: Inbox,
    thread: JoinHandle<()>,
}

/// Who the client is, captured at accept time. `None`: drop the client.
fn client_identity(kind: ListenerKind, fd: &OwnedFd, names: &mut NameCache) -> Option<Identity> {
    if !kind.is_unix() {
        // TCP without auth: libvirt sends such clients downstream with an empty identity.
        let _ = nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
        return Some(Identity::default());
    }
    match Identity::of_unix_peer_cached(fd.as_fd(), names) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::info!("dropping client whose credentials cannot be read: {e}");
            None
        }
    }
}

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

/// Whether a client counts against `max_anonymous_clients` when it arrives: TLS clients until
/// their handshake and certificate checks are done, and the clients of a listener with an
/// auth step (polkit, SASL) until it succeeds. Root on a polkit socket is authenticated by
/// AUTH_LIST alone (the handshake's bypass), so it never counts.
fn starts_anonymous(shared: &Shared, kind: ListenerKind, identity: &Identity) -> bool {
    let auth = shared.auth.of(kind);
    let root = identity.unix.as_ref().is_some_and(|u| u.uid == 0);
    kind == ListenerKind::Tls
        || auth == crate::config::Auth::Sasl
        || (auth == crate::config::Auth::Polkit && !root)
}

/// Local clients accepted while `max_anonymous_clients` is reached wait here at most this many
/// (libvirt's default `max_queued_clients`); beyond it the local listeners pause too.
const PARKED_MAX: usize = 1000;

/// A local client that would count as anonymous, accepted while the anonymous limit is
/// reached. libvirt leaves every client in the listen backlog then, root's included; here the
/// local listeners keep accepting so that clients who are not anonymous (root on a polkit
/// socket, clients of an auth "none" socket) get in, and the others wait in this queue in
/// arrival order, as they would have in the backlog, for at most the pre-open deadline.
struct Parked {
    fd: OwnedFd,
    kind: ListenerKind,
    identity: Identity,
    since: Instant,
}

/// Hands accepted clients to the relay workers (through a TLS handshake thread for TLS).
struct Admission<'a> {
    shared: &'a Arc<Shared>,
    workers: &'a [WorkerHandle],
    handshakers: &'a [WorkerHandle],
    next_worker: usize,
    next_handshaker: usize,
    next_id: u64,
    /// Whether a client was admitted yet (see `over_max_clients`).
    admitted_any: bool,
    /// The pre-open rate of each source (see `flood`).
    rates: SourceRates,
}

impl Admission<'_> {
    /// Takes in the connections a previous process carried over: the same ids in the
    /// registry, each straight to a worker's relay.
    fn resume(&mut self, r: Resumed) {
        let shared = self.shared;
        let t = Instant::now();
        self.next_id = self.next_id.max(r.next_id);
        let n = r.carried.len();
        let mut sent = 0;
        let mut first_ms = None;
        for c in busy_first(r.carried) {
            let rec = c.record;
            let Some(daemon) = c.daemon else {
                // A client that had sent nothing yet: as if just accepted.
                self.admit(c.client, rec.kind, rec.identity);
                continue;
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
            }
            // The first (busiest) connections go at once; the rest in one wake-up per worker.
            if sent < self.workers.len() {
                wake(&self.workers[owner].inbox.waker);
                first_ms = first_ms.or_else(|| crate::handover::ms_since(r.began_ns));
            }
            sent += 1;
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

    fn admit(&mut self, fd: OwnedFd, kind: ListenerKind, identity: Identity) {
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

/// Whether `max_clients` keeps the listeners from accepting now (`checked`: see
/// `over_max_clients`).
fn at_max_clients(shared: &Shared, checked: bool) -> bool {
    over_max_clients(
        shared.clients.load(Ordering::Acquire),
        shared.max_clients.load(Ordering::Acquire),
        checked || shared.limits_set.load(Ordering::Acquire),
    )
}

/// Carried connections with bytes waiting on either socket first: a client in the middle of
/// a call waits for its connection's adoption, an idle one does not (one poll() over every
/// socket, not a syscall per connection).
fn busy_first(carried: Vec<crate::handover::Carried>) -> Vec<crate::handover::Carried> {
    let busy: Vec<bool> = {
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(carried.len() * 2);
        for c in &carried {
            fds.push(PollFd::new(c.client.as_fd(), PollFlags::POLLIN));
            if let Some(d) = &c.daemon {
                fds.push(PollFd::new(d.as_fd(), PollFlags::POLLIN));
            }
        }
        if poll(&mut fds, PollTimeout::ZERO).is_err() {
            return carried;
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
    };
    let (mut first, rest): (Vec<_>, Vec<_>) =
        carried.into_iter().zip(busy).partition(|(_, busy)| *busy);
    first.extend(rest);
    first.into_iter().map(|(c, _)| c).collect()
}

/// Whether a signal hands the connections over, and how: SIGUSR2 always (when hand-over is
/// on), SIGTERM only under systemd with an fd store (`$FDSTORE`, its size: systemd sets it
/// from v254, the shipped unit for older ones), which keeps them across a restart.
fn handoff_for(signo: i32, enabled: bool) -> Option<HandOffMode> {
    if !enabled {
        return None;
    }
    match signo {
        libc::SIGUSR2 => Some(HandOffMode::Exec),
        libc::SIGTERM if std::env::var_os("NOTIFY_SOCKET").is_some() && fd_store_size() > 0 => {
            Some(HandOffMode::FdStore)
        }
        _ => None,
    }
}

fn fd_store_size() -> u32 {
    std::env::var("FDSTORE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the client limits leave room: `max_clients` for anyone, `max_anonymous_clients`
/// for a client that would count as anonymous.
fn has_room(shared: &Shared, anonymous: bool, checked: bool) -> bool {
    let max_anonymous = shared.max_anonymous_clients.load(Ordering::Acquire);
    let anonymous_full =
        max_anonymous != 0 && shared.unauthenticated.load(Ordering::Acquire) >= max_anonymous;
    !(at_max_clients(shared, checked) || (anonymous && anonymous_full))
}

/// Admits parked clients while the limits leave room, and drops those that waited past the
/// pre-open deadline (they would have been closed by it once admitted).
fn admit_parked(parked: &mut VecDeque<Parked>, admission: &mut Admission<'_>) {
    let shared = admission.shared;
    while let Some(front) = parked.front() {
        if front.since.elapsed() >= shared.preopen_deadline {
            if let Some(p) = parked.pop_front() {
                // Charged to the limit that keeps it out now: max_clients if that one is
                // reached (it holds back everyone), else the anonymous limit.
                let why = if at_max_clients(shared, admission.admitted_any) {
                    Rejected::MaxClients
                } else {
                    Rejected::MaxAnonymousClients
                };
                shared.registry.rejected(why, 1);
                tracing::info!(
                    listener = ?p.kind,
                    uid = p.identity.unix.as_ref().map(|u| u.uid),
                    "dropping a local client that waited {:?} for an anonymous slot",
                    shared.preopen_deadline
                );
            }
            continue;
        }
        if !has_room(shared, true, admission.admitted_any) {
            return;
        }
        if let Some(p) = parked.pop_front() {
            admission.admit(p.fd, p.kind, p.identity);
        }
    }
}

/// Signals the acceptor handles; blocked in every thread so only the signalfd sees them.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Runs until a terminating signal or the idle timeout.
pub fn run(mut opts: ServerOpts) -> io::Result<Stopped> {
    let signals = handled_signals();
    signals.thread_block().map_err(io::Error::from)?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(io::Error::from)?;

    // The admin socket is served by its own thread, never by a relay worker.
    let (admin_listeners, relay_listeners): (Vec<Listener>, Vec<Listener>) =
        std::mem::take(&mut opts.listeners)
            .into_iter()
            .partition(|l| l.kind == ListenerKind::UnixAdmin);
    opts.listeners = relay_listeners;
    // Copies of the admin sockets, for a hand-over (the admin thread owns the originals).
    let admin_copies = admin_listeners
        .iter()
        .map(|l| {
            Ok(Listener {
                fd: l.fd.try_clone()?,
                kind: l.kind,
                path: l.path.clone(),
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    opts.shared
        .registry
        .set_idle_timeout(opts.idle_timeout.map_or(0, |d| d.as_secs() as u32));

    let mut workers = Vec::with_capacity(opts.workers);
    let mut backend_name = "";
    let nworkers = opts.workers.max(1);
    let wakers = (0..nworkers)
        .map(|_| eventfd())
        .collect::<io::Result<Vec<_>>>()?;
    // polkit threads only when a listener uses polkit; answers reach a worker through its
    // own channel and eventfd.
    let uses_polkit = opts
        .listeners
        .iter()
        .any(|l| opts.shared.auth.of(l.kind) == crate::config::Auth::Polkit);
    let mut links: Vec<Option<crate::worker::PolkitLink>> = Vec::new();
    if uses_polkit {
        links = crate::polkit::start(&wakers)?
            .into_iter()
            .map(Some)
            .collect();
    }
    links.resize_with(nworkers, || None);
    // SASL threads likewise, when a listener uses SASL.
    let uses_sasl = opts
        .listeners
        .iter()
        .any(|l| opts.shared.auth.of(l.kind) == crate::config::Auth::Sasl);
    let mut sasl_links: Vec<Option<crate::worker::SaslLink>> = Vec::new();
    if uses_sasl {
        sasl_links = crate::sasl::start(&wakers)?.into_iter().map(Some).collect();
    }
    sasl_links.resize_with(nworkers, || None);
    opts.shared.registry.attach_workers(
        wakers
            .iter()
            .map(|w| w.try_clone())
            .collect::<io::Result<Vec<_>>>()?,
    );
    let counters = opts.metrics.as_ref().map(|source| {
        let set = crate::metrics::counters::WorkerCounters::set(nworkers);
        source.attach_workers(set.clone());
        set
    });
    for (index, ((waker, link), sasl_link)) in
        wakers.into_iter().zip(links).zip(sasl_links).enumerate()
    {
        let reactor = Reactor::new(opts.backend)?;
        backend_name = reactor.name();
        let (tx, rx) = channel();
        let worker = Worker::new(
            index,
            reactor,
            rx,
            waker.try_clone()?,
            opts.shared.clone(),
            link,
            sasl_link,
        )?
        .with_metrics(
            counters
                .clone()
                .and_then(|set| crate::metrics::meter::WorkerMeter::new(set, index)),
        );
        let thread = std::thread::Builder::new()
            .name(format!("relay-{index}"))
            .spawn(move || worker.run())?;
        workers.push(WorkerHandle {
            inbox: Inbox { tx, waker },
            thread,
        });
    }
    // TLS handshakes run on their own threads (tls/handshaker.rs): one per two relay workers.
    let mut handshakers = Vec::new();
    if opts.listeners.iter().any(|l| l.kind == ListenerKind::Tls) {
        for index in 0..workers.len().div_ceil(2) {
            let (tx, rx) = channel();
            let waker = eventfd()?;
            let inboxes = workers
                .iter()
                .map(|w| w.inbox.try_clone())
                .collect::<io::Result<Vec<_>>>()?;
            let h = Handshaker::new(index, rx, waker.try_clone()?, opts.shared.clone(), inboxes)?;
            let thread = std::thread::Builder::new()
                .name(format!("tls-handshake-{index}"))
                .spawn(move || h.run())?;
            handshakers.push(WorkerHandle {
                inbox: Inbox { tx, waker },
                thread,
            });
        }
        opts.shared.registry.attach_handshakers(
            handshakers
                .iter()
                .map(|h| h.inbox.waker.try_clone())
                .collect::<io::Result<Vec<_>>>()?,
        );
    }
    tracing::info!(
        workers = workers.len(),
        backend = backend_name,
        since_quiesce_began_ms = opts
            .resumed
            .as_ref()
            .and_then(|r| crate::handover::ms_since(r.began_ns)),
        "relay workers started"
    );
    let admin_thread = if admin_listeners.is_empty() {
        None
    } else {
        Some(crate::admin::serve::spawn(
            admin_listeners,
            opts.shared.clone(),
            nworkers,
            std::mem::take(&mut opts.admin),
        )?)
    };
    // Every listener is live (bound and listening) before this point.
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("0 clients"),
    ]);
    let mut last_status = (0usize, Instant::now());

    let shared = &opts.shared;
    let mut admission = Admission {
        shared,
        workers: &workers,
        handshakers: &handshakers,
        next_worker: 0,
        next_handshaker: 0,
        next_id: 1,
        admitted_any: false,
        rates: SourceRates::default(),
    };
    if let Some(r) = opts.resumed.take() {
        admission.resume(r);
    }
    let mut handoff_mode = None;
    let mut parked: VecDeque<Parked> = VecDeque::new();
    let mut idle_since = Some(Instant::now());
    let mut accept_backoff: Option<Instant> = None;
    let mut names = NameCache::default();
    let stopped = loop {
        admit_parked(&mut parked, &mut admission);
        let clients = shared.clients.load(Ordering::Acquire);
        if clients != last_status.0 && last_status.1.elapsed() >= Duration::from_secs(1) {
            notify(&[sd_notify::NotifyState::Status(&format!(
                "{clients} clients"
            ))]);
            last_status = (clients, Instant::now());
        }
        // As libvirt's virNetServerCheckLimits: at max_clients no listener accepts. At
        // max_anonymous_clients libvirt pauses every listener too; here the remote listeners
        // pause (a TCP/TLS client counts as anonymous until it authenticates), and the local
        // ones go on accepting: a client that would count as anonymous waits in `parked`, and
        // root on a polkit socket gets in (see `Parked`). The kernel keeps new clients of a
        // paused listener in its backlog until a client leaves or authenticates.
        // The limits are read at each accept, not once per wakeup: an admin call lowering
        // them while poll() waits must hold for the client that wakes it.
        let paused = |kind: ListenerKind, parked: usize, admitted_any: bool| {
            if kind.is_unix() {
                at_max_clients(shared, admitted_any) || parked >= PARKED_MAX
            } else {
                let anonymous = starts_anonymous(shared, kind, &Identity::default());
                !has_room(shared, anonymous, admitted_any)
            }
        };
        // Admin clients keep the daemon up too, as in libvirt; the limit can change at run
        // time (daemon-timeout).
        // A metrics scrape is activity too (it restarts the idle period).
        if clients == 0
            && parked.is_empty()
            && shared.registry.admin_clients() == 0
            && !shared.registry.take_activity()
        {
            idle_since.get_or_insert_with(Instant::now);
        } else {
            idle_since = None;
        }
        let idle_timeout = shared.registry.idle_timeout();
        if let (Some(limit), Some(since)) = (idle_timeout, idle_since) {
            if since.elapsed() >= limit {
                break Stopped::IdleTimeout;
            }
        }
        let backing_off = accept_backoff.is_some_and(|t| t > Instant::now());
        // Indices of the listeners accepting now.
        let open: Vec<usize> = if backing_off {
            Vec::new()
        } else {
            (0..opts.listeners.len())
                .filter(|&i| !paused(opts.listeners[i].kind, parked.len(), admission.admitted_any))
                .collect()
        };
        let accepting = open.len() == opts.listeners.len();
        let mut fds = vec![
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.limit_waker.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            open.iter()
                .map(|&i| PollFd::new(opts.listeners[i].fd.as_fd(), PollFlags::POLLIN)),
        );
        // Wake periodically while we cannot accept or clients are parked (a client may have
        // left, a parked one may expire) or to check the idle timer.
        let timeout = if !accepting || !parked.is_empty() || idle_timeout.is_some() {
            200u16
        } else {
            1000u16
        };
        match poll(&mut fds, PollTimeout::from(timeout)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[1] {
            // A client left the anonymous set at the limit: re-evaluate the pauses now.
            drain_eventfd(&shared.limit_waker);
        }
        if ready[0] {
            if let Ok(Some(info)) = sigfd.read_signal() {
                let signo = info.ssi_signo as i32;
                if signo == libc::SIGHUP {
                    tracing::info!("Reloading configuration on SIGHUP");
                    notify(&[sd_notify::NotifyState::Reloading]);
                    (opts.on_reload)(shared);
                    notify(&[sd_notify::NotifyState::Ready]);
                } else if let Some(mode) = handoff_for(signo, opts.handover) {
                    match (opts.handover_check)() {
                        Ok(()) => {
                            tracing::info!(
                                signal = signo,
                                ?mode,
                                "restarting: handing connections over"
                            );
                            handoff_mode = Some(mode);
                            break Stopped::Signal(signo);
                        }
                        Err(why) if mode == HandOffMode::Exec => {
                            tracing::error!("not restarting on SIGUSR2: {why}; still serving");
                        }
                        Err(why) => {
                            tracing::error!("shutting down without hand-over: {why}");
                            break Stopped::Signal(signo);
                        }
                    }
                } else if signo == libc::SIGUSR2 {
                    tracing::warn!("SIGUSR2 ignored: restart_handover is off");
                } else {
                    tracing::info!(signal = signo, "shutting down on signal");
                    break Stopped::Signal(signo);
                }
            }
        }
        for (n, &i) in open.iter().enumerate() {
            if !ready[n + 2] {
                continue;
            }
            let l = &opts.listeners[i];
            loop {
                if paused(l.kind, parked.len(), admission.admitted_any) {
                    break;
                }
                match nix::sys::socket::accept4(
                    l.fd.as_raw_fd(),
                    nix::sys::socket::SockFlag::SOCK_NONBLOCK
                        | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                ) {
                    Ok(raw) => {
                        // SAFETY: accept4 returned a fresh descriptor.
                        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                        let Some(identity) = client_identity(l.kind, &fd, &mut names) else {
                            shared.registry.rejected(Rejected::Credentials, 1);
                            continue;
                        };
                        let anonymous = starts_anonymous(shared, l.kind, &identity);
                        let checked = admission.admitted_any;
                        if l.kind.is_unix()
                            && (!parked.is_empty() || !has_room(shared, anonymous, checked))
                        {
                            // Behind those already waiting, unless it is not anonymous and
                            // there is room for it.
                            if anonymous || !has_room(shared, false, checked) {
                                tracing::debug!(
                                    listener = ?l.kind,
                                    uid = identity.unix.as_ref().map(|u| u.uid),
                                    "client limit reached: the client waits"
                                );
                                parked.push_back(Parked {
                                    fd,
                                    kind: l.kind,
                                    identity,
                                    since: Instant::now(),
                                });
                                continue;
                            }
                        }
                        admission.admit(fd, l.kind, identity);
                    }
                    Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => break,
                    Err(e @ (nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE)) => {
                        // Out of descriptors: pause accepting instead of spinning on the backlog.
                        tracing::warn!("accept failed: {e}; pausing accepts for 100 ms");
                        accept_backoff = Some(Instant::now() + Duration::from_millis(100));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        break;
                    }
                }
            }
        }
    };
    // Clients still waiting for an anonymous slot were never admitted: they just close.
    shared
        .registry
        .rejected(Rejected::Shutdown, parked.len() as u64);
    drop(parked);
    if let Some(mode) = handoff_mode {
        let next_id = admission.next_id;
        drop(admission);
        // Handshakes in progress are dropped; the workers quiesce, carry and exit; the admin
        // thread stops (its clients reconnect) and leaves its socket files in place.
        let began_ns = shared.handover.request();
        shared.shutdown.store(true, Ordering::Release);
        let started = Instant::now();
        for group in [handshakers, workers] {
            for w in &group {
                wake(&w.inbox.waker);
            }
            for w in group {
                drop(w.inbox);
                let _ = w.thread.join();
            }
        }
        let carried = shared.handover.take();
        tracing::info!(
            carried = carried.len(),
            quiesce_ms = started.elapsed().as_millis() as u64,
            began_ns,
            "connections ready to hand over"
        );
        let mut listeners = std::mem::take(&mut opts.listeners);
        listeners.extend(admin_copies);
        return Ok(Stopped::HandOver(Box::new(HandOff {
            mode,
            listeners,
            carried,
            next_id,
            began_ns,
            admin_thread,
        })));
    }
    drop(admin_copies);

    notify(&[sd_notify::NotifyState::Stopping]);
    // Stop accepting first: close the listeners (unlinking only the sockets we created).
    for l in opts.listeners.drain(..) {
        l.unlink();
    }
    shared.shutdown.store(true, Ordering::Release);
    // Handshakes in progress are dropped first, so no client reaches a worker after it left.
    for group in [handshakers, workers] {
        for w in &group {
            wake(&w.inbox.waker);
        }
        for w in group {
            drop(w.inbox);
            let _ = w.thread.join();
        }
    }
    if let Some(t) = admin_thread {
        let _ = t.join();
    }
    Ok(stopped)
}
