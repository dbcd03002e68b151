//! The threads the acceptor starts and stops: relay workers (with the polkit and SASL
//! threads they need), TLS handshake threads, the admin thread.

use std::io;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::ServerOpts;
use crate::listen::{Listener, ListenerKind};
use crate::reactor::Reactor;
use crate::shared::{Inbox, Shared};
use crate::sys::{eventfd, wake};
use crate::tls::handshaker::Handshaker;
use crate::worker::Worker;

pub(super) struct WorkerHandle {
    pub(super) inbox: Inbox,
    pub(super) thread: JoinHandle<()>,
}

impl WorkerHandle {
    /// Starts a thread named `name` that takes clients from `inbox`.
    fn spawn(name: String, inbox: Inbox, run: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        let thread = std::thread::Builder::new().name(name).spawn(run)?;
        Ok(WorkerHandle { inbox, thread })
    }
}

/// The threads the acceptor feeds: relay workers, TLS handshake threads, the admin thread.
pub(super) struct Threads {
    pub(super) workers: Vec<WorkerHandle>,
    pub(super) handshakers: Vec<WorkerHandle>,
    pub(super) admin: Option<JoinHandle<()>>,
}

impl Threads {
    /// Starts them all for `opts.listeners` (the relay ones) and `admin_listeners`.
    pub(super) fn start(
        opts: &mut ServerOpts,
        admin_listeners: Vec<Listener>,
    ) -> io::Result<Threads> {
        let nworkers = opts.workers.max(1);
        let (workers, (backend_name, backend_path)) = start_workers(opts, nworkers)?;
        let handshakers = start_handshakers(&opts.shared, &opts.listeners, &workers)?;
        tracing::info!(
            workers = workers.len(),
            backend = backend_name,
            path = %backend_path,
            since_quiesce_began_ms = opts
                .resumed
                .as_ref()
                .and_then(|r| crate::handover::ms_since(r.began_ns)),
            "relay workers started"
        );
        let admin = if admin_listeners.is_empty() {
            None
        } else {
            Some(crate::admin::serve::spawn(
                admin_listeners,
                opts.shared.clone(),
                nworkers,
                std::mem::take(&mut opts.admin),
            )?)
        };
        Ok(Threads {
            workers,
            handshakers,
            admin,
        })
    }

    /// For a hand-over: stops the handshake threads, then waits until every worker has
    /// carried or closed its connections (not for its teardown). Returns the threads still
    /// stopping: the workers and the admin thread.
    pub(super) fn leave_relay(self, shared: &Shared) -> Vec<JoinHandle<()>> {
        for w in &self.handshakers {
            wake(&w.inbox.waker);
        }
        for w in self.handshakers {
            drop(w.inbox);
            let _ = w.thread.join();
        }
        for w in &self.workers {
            wake(&w.inbox.waker);
        }
        let n = self.workers.len();
        let mut stopping: Vec<JoinHandle<()>> = self
            .workers
            .into_iter()
            .map(|w| {
                drop(w.inbox);
                w.thread
            })
            .collect();
        shared.handover.wait_for_workers(n, &stopping);
        stopping.extend(self.admin);
        stopping
    }

    /// Stops the handshake threads, then the workers (`shared.shutdown` set), and returns
    /// the admin thread, still running. Handshakes in progress are dropped first, so no
    /// client reaches a worker after it left.
    pub(super) fn stop_relay(self) -> Option<JoinHandle<()>> {
        for group in [self.handshakers, self.workers] {
            for w in &group {
                wake(&w.inbox.waker);
            }
            for w in group {
                drop(w.inbox);
                let _ = w.thread.join();
            }
        }
        self.admin
    }
}

/// Whether a relay listener asks for `auth`.
fn uses_auth(opts: &ServerOpts, auth: crate::config::Auth) -> bool {
    opts.listeners
        .iter()
        .any(|l| opts.shared.auth.of(l.kind) == auth)
}

/// One link per worker to an offload thread (polkit, SASL) when `used`, else none.
fn offload_links<T>(
    used: bool,
    nworkers: usize,
    start: impl FnOnce() -> io::Result<Vec<T>>,
) -> io::Result<Vec<Option<T>>> {
    let mut links: Vec<Option<T>> = Vec::new();
    if used {
        links = start()?.into_iter().map(Some).collect();
    }
    links.resize_with(nworkers, || None);
    Ok(links)
}

/// Starts the relay workers, with the polkit and SASL threads they need; returns them and
/// the reactor backend's name.
fn start_workers(
    opts: &ServerOpts,
    nworkers: usize,
) -> io::Result<(Vec<WorkerHandle>, (&'static str, String))> {
    let mut workers = Vec::with_capacity(opts.workers);
    let mut backend_name = ("", String::new());
    let wakers = (0..nworkers)
        .map(|_| eventfd())
        .collect::<io::Result<Vec<_>>>()?;
    // polkit threads only when a listener uses polkit; answers reach a worker through its
    // own channel and eventfd.
    let links = offload_links(
        uses_auth(opts, crate::config::Auth::Polkit),
        nworkers,
        || crate::polkit::start(&wakers),
    )?;
    // SASL threads likewise, when a listener uses SASL.
    let sasl_links = offload_links(uses_auth(opts, crate::config::Auth::Sasl), nworkers, || {
        crate::sasl::start(&wakers)
    })?;
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
        backend_name = (reactor.name(), reactor.path());
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
        workers.push(WorkerHandle::spawn(
            format!("relay-{index}"),
            Inbox { tx, waker },
            move || worker.run(),
        )?);
    }
    Ok((workers, backend_name))
}

/// TLS handshakes run on their own threads (tls/handshaker.rs): one per two relay workers,
/// none without a TLS listener.
fn start_handshakers(
    shared: &Arc<Shared>,
    listeners: &[Listener],
    workers: &[WorkerHandle],
) -> io::Result<Vec<WorkerHandle>> {
    let mut handshakers = Vec::new();
    if !listeners.iter().any(|l| l.kind == ListenerKind::Tls) {
        return Ok(handshakers);
    }
    for index in 0..workers.len().div_ceil(2) {
        let (tx, rx) = channel();
        let waker = eventfd()?;
        let inboxes = workers
            .iter()
            .map(|w| w.inbox.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let h = Handshaker::new(index, rx, waker.try_clone()?, shared.clone(), inboxes)?;
        handshakers.push(WorkerHandle::spawn(
            format!("tls-handshake-{index}"),
            Inbox { tx, waker },
            move || h.run(),
        )?);
    }
    shared.registry.attach_handshakers(
        handshakers
            .iter()
            .map(|h| h.inbox.waker.try_clone())
            .collect::<io::Result<Vec<_>>>()?,
    );
    Ok(handshakers)
}
