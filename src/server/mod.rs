//! The acceptor (main thread) and the relay workers it feeds.
//!
//! The acceptor owns the listeners, reads signals from a signalfd, captures each client's
//! credentials at accept time, and hands the socket to a worker round-robin. Workers never
//! share a connection, so the per-message path has no lock (design.md "Reactor and threads").
//!
//! Here: `run` (start the threads, serve, then hand over or shut down). The accept loop is in
//! `acceptor`, the client limits and parked clients in `limits`, handing clients to a worker
//! in `admission`, what a signal means in `signals`, starting and stopping the threads in
//! `threads`.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::flood::SourceRates;
use crate::handover::{HandOff, HandOffMode, Resumed};
use crate::identity::NameCache;
use crate::listen::{Listener, ListenerKind};
use crate::metrics::counters::Rejected;
use crate::reactor;
use crate::shared::Shared;

mod acceptor;
mod admission;
mod limits;
mod signals;
#[cfg(test)]
mod tests;
mod threads;

use acceptor::{Acceptor, IdleClock, StatusLine};
use admission::Admission;
pub use signals::handled_signals;
use signals::signal_fd;
use threads::Threads;

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

/// Takes the admin listeners out of `listeners`, with copies of them for a hand-over (the
/// admin thread owns the originals): the admin socket is served by its own thread, never by
/// a relay worker.
fn split_admin(listeners: &mut Vec<Listener>) -> io::Result<(Vec<Listener>, Vec<Listener>)> {
    let (admin, relay): (Vec<Listener>, Vec<Listener>) = std::mem::take(listeners)
        .into_iter()
        .partition(|l| l.kind == ListenerKind::UnixAdmin);
    *listeners = relay;
    let copies = admin
        .iter()
        .map(|l| {
            Ok(Listener {
                fd: l.fd.try_clone()?,
                kind: l.kind,
                path: l.path.clone(),
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok((admin, copies))
}

/// Runs until a terminating signal or the idle timeout.
pub fn run(mut opts: ServerOpts) -> io::Result<Stopped> {
    let sigfd = signal_fd()?;
    let (admin_listeners, admin_copies) = split_admin(&mut opts.listeners)?;
    opts.shared
        .registry
        .set_idle_timeout(opts.idle_timeout.map_or(0, |d| d.as_secs() as u32));
    let threads = Threads::start(&mut opts, admin_listeners)?;
    // Every listener is live (bound and listening) before this point.
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("0 clients"),
    ]);
    // Counted from READY's "0 clients", before carried connections are resumed.
    let status = StatusLine {
        sent: 0,
        at: Instant::now(),
    };
    let shared = &opts.shared;
    let mut admission = Admission {
        shared,
        workers: &threads.workers,
        handshakers: &threads.handshakers,
        next_worker: 0,
        next_handshaker: 0,
        next_id: 1,
        admitted_any: false,
        rates: SourceRates::default(),
    };
    if let Some(r) = opts.resumed.take() {
        admission.resume(r);
    }
    let mut acceptor = Acceptor {
        shared,
        listeners: &opts.listeners,
        sigfd: &sigfd,
        on_reload: &mut *opts.on_reload,
        handover: opts.handover,
        handover_check: &mut *opts.handover_check,
        admission,
        parked: VecDeque::new(),
        idle: IdleClock {
            since: Some(Instant::now()),
        },
        status,
        accept_backoff: None,
        names: NameCache::default(),
    };
    let (stopped, handoff_mode) = acceptor.serve()?;
    let Acceptor {
        parked, admission, ..
    } = acceptor;
    // Clients still waiting for an anonymous slot were never admitted: they just close.
    shared
        .registry
        .rejected(Rejected::Shutdown, parked.len() as u64);
    drop(parked);
    let next_id = admission.next_id;
    drop(admission);
    if let Some(mode) = handoff_mode {
        let mut listeners = std::mem::take(&mut opts.listeners);
        listeners.extend(admin_copies);
        return Ok(hand_over(mode, next_id, &opts.shared, threads, listeners));
    }
    drop(admin_copies);
    shut_down(&opts.shared, threads, std::mem::take(&mut opts.listeners));
    Ok(stopped)
}

/// A restart's exit: handshakes in progress are dropped; the workers quiesce, carry and
/// exit; the admin thread stops (its clients reconnect) and leaves its socket files in
/// place. `listeners` go to the next process, admin ones included.
fn hand_over(
    mode: HandOffMode,
    next_id: u64,
    shared: &Shared,
    threads: Threads,
    listeners: Vec<Listener>,
) -> Stopped {
    let began_ns = shared.handover.request();
    shared.shutdown.store(true, Ordering::Release);
    let started = Instant::now();
    let stopping = threads.leave_relay(shared);
    let carried = shared.handover.take();
    tracing::info!(
        carried = carried.len(),
        quiesce_ms = started.elapsed().as_millis() as u64,
        began_ns,
        "connections ready to hand over"
    );
    Stopped::HandOver(Box::new(HandOff {
        mode,
        listeners,
        carried,
        next_id,
        began_ns,
        stopping,
    }))
}

/// A shutdown: stop accepting first (closing the listeners, unlinking only the sockets we
/// created), then the threads.
fn shut_down(shared: &Shared, threads: Threads, listeners: Vec<Listener>) {
    notify(&[sd_notify::NotifyState::Stopping]);
    for l in listeners {
        l.unlink();
    }
    shared.shutdown.store(true, Ordering::Release);
    if let Some(t) = threads.stop_relay() {
        let _ = t.join();
    }
}
