//! The metrics endpoint (issue 18): `GET /metrics` in OpenMetrics or the Prometheus text
//! format, served by its own thread, never a relay worker. Off unless `metrics_listen` is set
//! or `virtproxyd-metrics.socket` is activated.
//!
//! - [`names`] and the generated [`procedures`]: procedure labels and counter slots;
//! - [`counters`]: the per-worker counter blocks the relay writes (the hot-path boundary);
//! - [`meter`]: what the worker and relay call to count, and a connection's in-flight table;
//! - [`encode`]: a [`encode::Snapshot`] of the values and its exposition;
//! - [`http`]: the request parser and format negotiation (sans-IO);
//! - [`serve`]: the thread, its listeners and its deadlines.
//!
//! The rest is read from state the daemon keeps anyway (`Shared`, the client registry); the
//! relay's blocks are summed by the metrics thread, so a scrape costs the relay nothing.

pub mod clients;
pub mod counters;
pub mod encode;
pub mod http;
pub mod meter;
pub mod names;
#[rustfmt::skip]
pub mod procedures;
pub mod serve;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use counters::{Counter, WorkerCounters, WorkerTotals};
use encode::{Snapshot, CLIENTS_PAGE_ANSWERS, LISTENERS, REQUEST_RESULTS};

use crate::listen::ListenerKind;
use crate::shared::Shared;

/// What a scrape reads: the daemon's shared state, plus the relay's counter blocks once
/// attached (see [`counters`] for how the relay is to wire them).
pub struct Source {
    shared: Arc<Shared>,
    started: SystemTime,
    workers: usize,
    relay: OnceLock<Arc<[WorkerCounters]>>,
    /// Written by the metrics thread only.
    requests: [Counter; REQUEST_RESULTS.len()],
    /// `/clients` answers by [`CLIENTS_PAGE_ANSWERS`]; metrics thread only.
    clients_pages: [Counter; CLIENTS_PAGE_ANSWERS.len()],
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("started", &self.started)
            .field("workers", &self.workers)
            .field("relay_attached", &self.relay.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Source {
    /// The `/clients` page: the registry's clients with each worker's figures for them
    /// (waits at most 1 s for the workers). Each call costs every relay worker a collection;
    /// `serve` bounds how often it is made.
    pub fn clients_json(&self) -> String {
        let stats = self
            .shared
            .registry
            .collect_stats(std::time::Duration::from_secs(1));
        clients::render(
            &self.shared.registry.records(),
            stats,
            crate::registry::now_epoch_ms(),
        )
    }

    /// Counts a `/clients` answer: `collected` for it, or reused. Metrics thread only.
    pub(crate) fn count_clients_page(&self, collected: bool) {
        self.clients_pages[usize::from(!collected)].inc();
    }

    /// `started`: when the daemon started; `workers`: the relay worker count.
    pub fn new(shared: Arc<Shared>, started: SystemTime, workers: usize) -> Source {
        Source {
            shared,
            started,
            workers,
            relay: OnceLock::new(),
            requests: Default::default(),
            clients_pages: Default::default(),
        }
    }

    /// Gives the scrape the relay's counter blocks (once; a second set is ignored).
    pub fn attach_workers(&self, blocks: Arc<[WorkerCounters]>) {
        if self.relay.set(blocks).is_err() {
            tracing::warn!("metrics: relay counters attached twice; keeping the first set");
        }
    }

    /// Counts a request to the endpoint (`result` indexes [`REQUEST_RESULTS`]). Metrics
    /// thread only.
    pub(crate) fn count_request(&self, result: usize) {
        if let Some(c) = self.requests.get(result) {
            c.inc();
        }
    }

    /// Tells the acceptor a scrape happened (it restarts the `--timeout` idle period).
    pub(crate) fn note_activity(&self) {
        self.shared.registry.note_activity();
    }

    /// Reads every value once.
    pub fn snapshot(&self) -> Snapshot {
        let s = &self.shared;
        let n = |a: &AtomicUsize| a.load(Ordering::Acquire) as u64;
        let mut by_listener = [0u64; LISTENERS.len()];
        for kind in s.registry.kinds() {
            let i = match kind {
                ListenerKind::UnixRw => 0,
                ListenerKind::UnixRo => 1,
                ListenerKind::Tcp => 2,
                ListenerKind::Tls => 3,
                // Admin clients are never in the registry; counted apart.
                ListenerKind::UnixAdmin => continue,
            };
            by_listener[i] += 1;
        }
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            start_time: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            clients: n(&s.clients),
            clients_max: n(&s.max_clients),
            clients_unauth: n(&s.unauthenticated),
            clients_unauth_max: n(&s.max_anonymous_clients),
            by_listener,
            admin_clients: s.registry.admin_clients() as u64,
            workers: self.workers as u64,
            idle_timeout: s.registry.idle_timeout().map_or(0, |d| d.as_secs()),
            requests: std::array::from_fn(|i| self.requests[i].get()),
            rejected: s.registry.rejections(),
            clients_pages: std::array::from_fn(|i| self.clients_pages[i].get()),
            relay: self.relay.get().map(|b| WorkerTotals::sum(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_the_shared_state() {
        let shared = Arc::new(crate::shared::test_shared());
        shared.clients.store(2, Ordering::Release);
        shared.unauthenticated.store(1, Ordering::Release);
        shared.registry.set_idle_timeout(30);
        for (id, kind) in [(1, ListenerKind::UnixRo), (2, ListenerKind::Tcp)] {
            shared.registry.insert(crate::registry::ClientRecord {
                id,
                timestamp: 0,
                kind,
                identity: Default::default(),
                peer_addr: None,
                worker: 0,
                claimed: None,
                opened_readonly: false,
                disconnect_requested: false,
            });
        }
        let src = Source::new(
            shared.clone(),
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(10),
            3,
        );
        src.count_request(0);
        shared
            .registry
            .rejected(crate::metrics::counters::Rejected::Tls, 2);
        let s = src.snapshot();
        assert_eq!(
            (
                s.clients,
                s.clients_max,
                s.clients_unauth,
                s.clients_unauth_max
            ),
            (2, 5000, 1, 20)
        );
        assert_eq!(s.by_listener, [0, 1, 1, 0]);
        assert_eq!((s.workers, s.idle_timeout, s.start_time), (3, 30, 10.0));
        assert_eq!(s.requests[0], 1);
        assert_eq!(s.rejected, [0, 0, 0, 2, 0, 0, 0]);
        assert!(s.relay.is_none());
        src.attach_workers(WorkerCounters::set(3));
        assert_eq!(src.snapshot().relay.map(|r| r.per_worker.len()), Some(3));
        assert!(!shared.registry.take_activity());
        src.note_activity();
        assert!(shared.registry.take_activity());
    }
}
