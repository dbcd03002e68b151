//! What the acceptor, the TLS handshake threads, the relay workers and the admin and metrics
//! servers share, and what they hand each other: the limits and counters ([`Shared`]), the
//! count of clients not yet authenticated ([`Unauthenticated`]), a new client on its way to a
//! worker ([`NewConn`] through an [`Inbox`]), and the early daemon connection made for it.
//!
//! It sits below every thread's loop (`server`, `tls::handshaker`, `worker`, `conn`, `admin`,
//! `metrics`) so that none of them imports another only to reach these; above it are only the
//! settings and records it holds (`config`, `route`, `tls`'s settings, `registry`,
//! `handover`'s records) and the early AUTH_LIST frame (`handshake`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Auth, Config};
use crate::handover::Handover;
use crate::identity::Identity;
use crate::listen::ListenerKind;
use crate::registry::Registry;
use crate::route::{RouteTable, Target};
use crate::sys::wake;
use crate::tls::accept::Established;
use crate::tls::TlsSettings;

/// State shared by the acceptor and all workers (read-mostly; counters are atomics).
pub struct Shared {
    /// Swapped whole on SIGHUP; read once per CONNECT_OPEN, never per message.
    pub routes: arc_swap::ArcSwap<RouteTable>,
    /// Connected clients on all listeners.
    pub clients: AtomicUsize,
    /// No listener accepts at this many clients; 0 lets none in (see
    /// `over_max_clients`). Changed by SIGHUP and the admin interface.
    pub max_clients: AtomicUsize,
    /// Set when SIGHUP or the admin interface changed the client limits: from then on
    /// `max_clients = 0` applies even before the first client (libvirt checks it then).
    pub limits_set: AtomicBool,
    /// Clients holding an `Unauthenticated`.
    pub unauthenticated: AtomicUsize,
    /// 0 = unlimited; changed by SIGHUP and the admin interface. At the limit the listeners
    /// whose clients arrive unauthenticated stop accepting, the local ones park new anonymous
    /// clients (see `server::limits::starts_anonymous` and `server::limits::Parked`).
    pub max_anonymous_clients: AtomicUsize,
    /// How long a TCP/TLS client may stay before its open completes (TLS handshake included).
    pub preopen_deadline: Duration,
    /// Wakes the acceptor when a client stops counting against `max_anonymous_clients` while
    /// the limit is reached (an eventfd).
    pub limit_waker: OwnedFd,
    pub shutdown: AtomicBool,
    /// How long in-flight frames may take to finish once shutdown starts.
    pub drain_grace: Duration,
    pub splice_threshold: usize,
    /// Present when a TLS listener exists; swapped on SIGHUP (new connections only).
    pub tls: arc_swap::ArcSwapOption<TlsSettings>,
    /// Auth per listener kind.
    pub auth: ListenerAuth,
    /// Who is connected, for the admin server (written at open, identity change, close).
    pub registry: Registry,
    /// SASL settings (fixed at start, as libvirt reads them once).
    pub sasl: SaslSettings,
    /// Where local clients' opens went lately, for early connections.
    pub last_open: LastOpen,
    /// A restart's hand-over: its request, and the connections the workers carry.
    pub handover: Handover,
}

/// What the process sets rather than the configuration file (the binary reads some from its
/// environment, tests pick short ones).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// See [`Shared::preopen_deadline`].
    pub preopen_deadline: Duration,
    /// See [`Shared::drain_grace`].
    pub drain_grace: Duration,
    /// See [`Shared::splice_threshold`].
    pub splice_threshold: usize,
}

impl Shared {
    /// The state a server starts with under `cfg`: no client yet, limits and auth from the
    /// file. Fails only when the kernel gives no eventfd.
    pub fn new(
        cfg: &Config,
        routes: RouteTable,
        tls: Option<Arc<TlsSettings>>,
        tuning: Tuning,
    ) -> io::Result<Shared> {
        Ok(Shared {
            routes: arc_swap::ArcSwap::from_pointee(routes),
            clients: AtomicUsize::new(0),
            max_clients: AtomicUsize::new(cfg.max_clients as usize),
            limits_set: AtomicBool::new(false),
            unauthenticated: AtomicUsize::new(0),
            max_anonymous_clients: AtomicUsize::new(cfg.max_anonymous_clients as usize),
            preopen_deadline: tuning.preopen_deadline,
            limit_waker: crate::sys::eventfd()?,
            shutdown: AtomicBool::new(false),
            drain_grace: tuning.drain_grace,
            splice_threshold: tuning.splice_threshold,
            tls: arc_swap::ArcSwapOption::new(tls),
            auth: ListenerAuth {
                unix_rw: cfg.auth_unix_rw,
                unix_ro: cfg.auth_unix_ro,
                tcp: cfg.auth_tcp,
                tls: cfg.auth_tls,
            },
            registry: Default::default(),
            sasl: SaslSettings {
                tcp_min_ssf: cfg.tcp_min_ssf,
                allowed: cfg.sasl_allowed_username_list.clone().map(Into::into),
            },
            last_open: Default::default(),
            handover: Default::default(),
        })
    }
}

/// A `Shared` with a session daemon's defaults, auth none everywhere and no TLS, for unit
/// tests.
#[cfg(test)]
pub(crate) fn test_shared() -> Shared {
    let mut cfg = Config::defaults(&crate::config::Env::default());
    // A session daemon's TCP listener asks for SASL; the unit tests want no auth anywhere.
    cfg.auth_tcp = Auth::None;
    let tuning = Tuning {
        preopen_deadline: Duration::from_secs(60),
        drain_grace: Duration::from_secs(1),
        splice_threshold: 16 * 1024,
    };
    let routes = RouteTable::new("/nonexistent".into(), Vec::new(), false);
    Shared::new(&cfg, routes, None, tuning).expect("eventfd")
}

/// Whether `max_clients` keeps the listeners from accepting, as libvirt's
/// virNetServerCheckLimits decides it: `nclients >= nclients_max`, so 0 lets no client in (it
/// is not "unlimited"). libvirt's listeners start enabled and that check only runs once a
/// client comes, goes or authenticates or the limits are set, so a config file's
/// `max_clients = 0` still lets the first client in; `checked` says whether that has happened.
pub fn over_max_clients(clients: usize, max: usize, checked: bool) -> bool {
    clients >= max && (max != 0 || checked)
}

/// The auth each listener kind asks for (fixed at start; a change needs a restart).
#[derive(Debug, Clone, Copy)]
pub struct ListenerAuth {
    pub unix_rw: Auth,
    pub unix_ro: Auth,
    pub tcp: Auth,
    pub tls: Auth,
}

impl ListenerAuth {
    pub fn of(&self, kind: ListenerKind) -> Auth {
        match kind {
            ListenerKind::UnixRw => self.unix_rw,
            ListenerKind::UnixRo => self.unix_ro,
            ListenerKind::UnixAdmin => Auth::None,
            ListenerKind::Tcp => self.tcp,
            ListenerKind::Tls => self.tls,
        }
    }
}

/// A client not yet authenticated, counted against `max_anonymous_clients` for as long as
/// this lives (libvirt's `nclients_unauth`). With auth "none" everywhere, only TLS clients
/// in their handshake count; an authentication step (polkit, SASL) would keep it until the
/// client is through.
pub struct Unauthenticated(Arc<Shared>);

impl Unauthenticated {
    pub fn new(shared: &Arc<Shared>) -> Unauthenticated {
        shared.unauthenticated.fetch_add(1, Ordering::AcqRel);
        Unauthenticated(shared.clone())
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let was = self.0.unauthenticated.fetch_sub(1, Ordering::AcqRel);
        let max = self.0.max_anonymous_clients.load(Ordering::Acquire);
        if max != 0 && was >= max {
            // The acceptor has paused the listeners whose clients count: resume them now, as
            // libvirt does, rather than at its next periodic check.
            wake(&self.0.limit_waker);
        }
    }
}

/// `tcp_min_ssf` and `sasl_allowed_username_list`.
#[derive(Debug, Clone)]
pub struct SaslSettings {
    pub tcp_min_ssf: u32,
    /// `None` = every user; empty = no one.
    pub allowed: Option<Arc<[String]>>,
}

/// The daemon the last local client of each listener opened, and when: the accept thread
/// connects a new client of that listener to that daemon right away if it was recent
/// (`EARLY_GUESS_FOR`), so that the daemon's accept and first call overlap the client's own
/// pre-open calls. Written once per open, read once per accept: never on a relay path.
#[derive(Debug, Default)]
pub struct LastOpen(std::sync::Mutex<[Option<(Target, Instant)>; 2]>);

impl LastOpen {
    fn index(kind: ListenerKind) -> Option<usize> {
        match kind {
            ListenerKind::UnixRw => Some(0),
            ListenerKind::UnixRo => Some(1),
            _ => None,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, [Option<(Target, Instant)>; 2]> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn note(&self, kind: ListenerKind, target: &Target) {
        if let Some(i) = Self::index(kind) {
            let mut slots = self.slots();
            match &mut slots[i] {
                Some((t, at)) if t == target => *at = Instant::now(),
                slot => *slot = Some((target.clone(), Instant::now())),
            }
        }
    }

    /// Where a new client of `kind` most likely goes, if a client of it opened recently.
    pub fn guess(&self, kind: ListenerKind) -> Option<Target> {
        let i = Self::index(kind)?;
        let slots = self.slots();
        let (target, at) = slots[i].as_ref()?;
        (at.elapsed() < EARLY_GUESS_FOR).then(|| target.clone())
    }
}

/// A local client is connected downstream as it arrives when the last open on its listener
/// was this recent: that daemon is up, and most likely the one it opens. A daemon's idle exit
/// is delayed by this at most (plus `EARLY_UNUSED_FOR`).
const EARLY_GUESS_FOR: Duration = Duration::from_secs(10);

/// A freshly accepted client, handed from the acceptor to a worker (TLS clients: to a
/// handshake thread first, which hands them on with `tls` set).
pub struct NewConn {
    pub id: u64,
    pub fd: OwnedFd,
    pub kind: ListenerKind,
    pub identity: Identity,
    /// TCP/TLS clients: when the pre-open phase (TLS handshake included) must be over.
    pub deadline: Option<Instant>,
    /// A TLS client whose handshake and certificate checks are done.
    pub tls: Option<Established>,
    /// Held while the client counts against `max_anonymous_clients`.
    pub unauthenticated: Option<Unauthenticated>,
    /// Index of the relay worker that owns it (the registry routes disconnects there).
    pub worker: usize,
    /// The listener's auth; with anything but none the client keeps `unauthenticated` until
    /// it has authenticated.
    pub auth: Auth,
    /// A downstream connection made on accepting it (see `LastOpen`).
    pub early: Option<EarlyConn>,
    /// The pre-open rate of its source, which each of its pre-open frames is charged to
    /// (`None`: root, never slowed).
    pub rate: Option<Arc<crate::flood::SourceRate>>,
    /// A relayed connection carried from the previous process (`fd` is its client socket):
    /// adopted straight into the relay.
    pub carried: Option<Box<crate::handover::Resume>>,
}

/// Where a thread sends a client to a worker (or a handshake thread): its channel and the
/// eventfd that wakes it.
pub struct Inbox {
    pub tx: Sender<NewConn>,
    pub waker: OwnedFd,
}

impl Inbox {
    /// Hands `nc` over; gives it back if the receiving thread is gone.
    pub fn send(&self, nc: NewConn) -> Result<(), Box<NewConn>> {
        self.tx.send(nc).map_err(|e| Box::new(e.0))?;
        wake(&self.waker);
        Ok(())
    }

    /// Hands `nc` over without waking the thread (a batch wakes it once with `wake`).
    pub fn send_quiet(&self, nc: NewConn) -> Result<(), Box<NewConn>> {
        self.tx.send(nc).map_err(|e| Box::new(e.0))
    }

    pub fn try_clone(&self) -> io::Result<Inbox> {
        Ok(Inbox {
            tx: self.tx.clone(),
            waker: self.waker.try_clone()?,
        })
    }
}

/// A daemon connection made as its client was accepted, with `handshake::early_auth_list()`
/// sent on it.
#[derive(Debug)]
pub struct EarlyConn {
    pub target: Target,
    pub fd: OwnedFd,
}

/// Connects to `target` and sends the early AUTH_LIST; `None` (logged) when the daemon
/// cannot be reached now: the client's open will connect and report for itself.
pub fn connect_early(target: Target) -> Option<EarlyConn> {
    let fd = match crate::route::connect_nonblocking(&target.socket) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!("early connect to {}: {e}", target.socket.display());
            return None;
        }
    };
    let frame = crate::handshake::early_auth_list();
    // A fresh UNIX socket takes a 28-byte write whole.
    match nix::sys::socket::send(
        fd.as_raw_fd(),
        &frame,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    ) {
        Ok(n) if n == frame.len() => Some(EarlyConn { target, fd }),
        r => {
            tracing::debug!("early AUTH_LIST to {}: {r:?}", target.socket.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::over_max_clients;

    #[test]
    fn max_clients_zero_is_a_limit_not_unlimited() {
        // Set at run time (or once a client came): nothing is accepted, as in libvirt.
        assert!(over_max_clients(0, 0, true));
        assert!(over_max_clients(3, 0, true));
        // From the config file, before any client: libvirt's listeners start enabled.
        assert!(!over_max_clients(0, 0, false));
        assert!(over_max_clients(2, 2, false));
        assert!(!over_max_clients(1, 2, true));
        assert!(!over_max_clients(usize::MAX - 1, usize::MAX, true));
    }
}
