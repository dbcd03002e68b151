//! Per-worker counter blocks: the boundary between the relay (which counts) and the scrape
//! (which sums). The relay writes them through [`super::meter`]; see "Wiring" below.
//!
//! # Rules
//! - One block per relay worker; only that worker's thread writes it (single writer). A
//!   [`Counter`] is bumped with a relaxed load and store, not a locked read-modify-write, so
//!   counting costs a plain add on the worker's own cache lines. A second writer would lose
//!   counts, never corrupt memory.
//! - The scrape thread reads with relaxed loads and sums the blocks. A scrape may see one
//!   counter of a frame bumped and another not yet: each series is exact on its own and
//!   monotonic, which is all Prometheus asks.
//! - Blocks are allocated once, before the workers start; counting never allocates.
//! - No label grows with clients: indices are fixed enums and the procedure slots of
//!   [`super::names`], so a block has a fixed number of series.
//!
//! # Wiring (done)
//! `server::run` makes one block per worker when `ServerOpts::metrics` is set, attaches the
//! set to the `metrics::Source` and gives each `Worker` its `meter::WorkerMeter`. The worker
//! counts adoptions, loop turns and busy time, closes (by reason) and daemon connects; both
//! relays (`conn::drive_relay` over the splice pumps, `conn::drive_layered` over the SASL
//! copy relay) pass each validated header to the connection's `meter::ConnMeter`, which
//! counts bytes, frames, calls (on replies: a reply closes exactly one call), latency,
//! events and stream bytes; fds are counted as the pumps deliver them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::names;
use crate::proto::{MsgStatus, MsgType};

/// A monotonic counter with one writer (see the module rules).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the block's owning thread may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        // Load + store, not fetch_add: the single writer needs no lock prefix.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current value (any thread).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Which way a frame travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToDaemon = 0,
    DaemonToClient = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::ClientToDaemon, Direction::DaemonToClient];

    pub fn label(self) -> &'static str {
        match self {
            Direction::ClientToDaemon => "client_to_daemon",
            Direction::DaemonToClient => "daemon_to_client",
        }
    }
}

/// Frame type labels, indexed by [`frame_slot`].
pub const FRAME_TYPES: [&str; 8] = [
    "call",
    "reply",
    "message",
    "stream",
    "call_with_fds",
    "reply_with_fds",
    "stream_hole",
    "other",
];

/// The index of a frame type in [`FRAME_TYPES`].
#[inline]
pub fn frame_slot(t: MsgType) -> usize {
    match t {
        MsgType::Call => 0,
        MsgType::Reply => 1,
        MsgType::Message => 2,
        MsgType::Stream => 3,
        MsgType::CallWithFds => 4,
        MsgType::ReplyWithFds => 5,
        MsgType::StreamHole => 6,
        MsgType::Other(_) => 7,
    }
}

/// Call result labels, indexed by [`call_result`].
pub const CALL_RESULTS: [&str; 2] = ["ok", "error"];

/// The index of a reply's status in [`CALL_RESULTS`]: anything but OK is an error.
#[inline]
pub fn call_result(status: MsgStatus) -> usize {
    usize::from(status != MsgStatus::Ok)
}

/// Upper bounds (nanoseconds) of the call latency buckets: libvirt calls run from tens of
/// microseconds (a cached getter) to tens of seconds (a migration phase, a slow storage
/// pool); past 30 s only `+Inf` is left.
pub const LATENCY_BOUNDS_NS: [u64; 18] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];
/// Buckets of a latency histogram: the bounds plus `+Inf`.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// Upper bounds (nanoseconds) of the connection duration buckets: a virsh command lives
/// milliseconds, a management daemon's connection days.
pub const DURATION_BOUNDS_NS: [u64; 11] = [
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
    60_000_000_000,
    600_000_000_000,
    3_600_000_000_000,
    21_600_000_000_000,
    86_400_000_000_000,
    604_800_000_000_000,
];
pub const DURATION_BUCKETS: usize = DURATION_BOUNDS_NS.len() + 1;

/// A histogram with one writer: a counter per bucket (not cumulative; the scrape
/// accumulates) and the sum of the observations. The count is the sum of the buckets, so
/// the two can never disagree within one scrape.
#[derive(Debug)]
pub struct Histogram<const B: usize> {
    pub buckets: [Counter; B],
    pub sum_nanos: Counter,
}

impl<const B: usize> Default for Histogram<B> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| Counter::default()),
            sum_nanos: Counter::default(),
        }
    }
}

impl<const B: usize> Histogram<B> {
    /// Records `nanos`; `bounds` has `B - 1` entries (the last bucket is `+Inf`).
    #[inline]
    pub fn observe(&self, bounds: &[u64], nanos: u64) {
        // The first bucket whose bound is >= the value (Prometheus's `le`).
        let i = bounds.partition_point(|&b| b < nanos).min(B - 1);
        self.buckets[i].inc();
        self.sum_nanos.add(nanos);
    }

    fn read(&self) -> HistogramTotals<B> {
        HistogramTotals {
            buckets: std::array::from_fn(|i| self.buckets[i].get()),
            sum_nanos: self.sum_nanos.get(),
        }
    }
}

/// A histogram's values summed over workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistogramTotals<const B: usize> {
    /// Per bucket, not cumulative.
    pub buckets: [u64; B],
    pub sum_nanos: u64,
}

impl<const B: usize> Default for HistogramTotals<B> {
    fn default() -> Self {
        HistogramTotals {
            buckets: [0; B],
            sum_nanos: 0,
        }
    }
}

impl<const B: usize> HistogramTotals<B> {
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, &b| a.wrapping_add(b))
    }

    fn add(&mut self, o: &HistogramTotals<B>) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a = a.wrapping_add(b);
        }
        self.sum_nanos = self.sum_nanos.wrapping_add(o.sum_nanos);
    }
}

/// Why a connection closed (`virtproxyd_connections_closed_total{reason}`): a small fixed
/// set, whatever the log message said (see `meter::close_reason`).
pub const CLOSE_REASONS: [&str; 11] = [
    "client_closed",
    "daemon_closed",
    "client_error",
    "daemon_error",
    "protocol",
    "preopen",
    "deadline",
    "admin",
    "shutdown",
    "tls",
    "internal",
];

/// Why a connection was refused before a relay worker took it on
/// (`virtproxyd_connections_rejected_total{reason}`): a fixed set, whatever the client did.
/// Connections a worker took on and closed before their open are closes
/// ([`CLOSE_REASONS`]: `deadline`, `preopen`, `protocol`), not rejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Waited for room under `max_clients` (parked) past the pre-open deadline.
    MaxClients = 0,
    /// Waited for an anonymous slot under `max_anonymous_clients` past the pre-open deadline.
    MaxAnonymousClients,
    /// A UNIX peer whose credentials (SO_PEERCRED) could not be read.
    Credentials,
    /// The TLS handshake or the certificate checks failed, or did not finish by the
    /// pre-open deadline.
    Tls,
    /// client-disconnect before a worker had it.
    Admin,
    /// The daemon stopped (or restarted) while it waited.
    Shutdown,
    /// The proxy could not take it on (no relay worker, no socket pair, TLS not set up).
    Internal,
}

impl Rejected {
    pub const ALL: [Rejected; 7] = [
        Rejected::MaxClients,
        Rejected::MaxAnonymousClients,
        Rejected::Credentials,
        Rejected::Tls,
        Rejected::Admin,
        Rejected::Shutdown,
        Rejected::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejected::MaxClients => "max_clients",
            Rejected::MaxAnonymousClients => "max_anonymous_clients",
            Rejected::Credentials => "credentials",
            Rejected::Tls => "tls",
            Rejected::Admin => "admin",
            Rejected::Shutdown => "shutdown",
            Rejected::Internal => "internal",
        }
    }
}

/// Rejections by [`Rejected`]. Several threads count here (the acceptor, the TLS handshake
/// threads, a worker's adoption), so these are shared atomics, unlike [`Counter`]: a
/// rejection is rare and never on the relay path, so the locked add costs nothing that
/// matters. Counted whether or not metrics are on.
#[derive(Debug, Default)]
pub struct Rejections([AtomicU64; Rejected::ALL.len()]);

impl Rejections {
    pub fn add(&self, why: Rejected, n: u64) {
        self.0[why as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn read(&self) -> [u64; Rejected::ALL.len()] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// Listener labels, in `ListenerKind` order of `metrics::listener_index`.
pub const CONN_LISTENERS: [&str; 4] = ["unix_rw", "unix_ro", "tcp", "tls"];

/// Auth methods a listener can ask for (`auth_unix_rw` etc.), labels of
/// `virtproxyd_auth_attempts_total{method}`.
pub const AUTH_METHODS: [&str; 2] = ["polkit", "sasl"];
/// Auth results.
pub const AUTH_RESULTS: [&str; 2] = ["ok", "failed"];

/// Driver daemon labels: the drivers the route table knows by name, then `other` for any
/// socket the operator named in `driver_sockets` (so the count never follows the config).
pub fn driver_labels() -> &'static [&'static str] {
    crate::route::METRIC_DRIVERS
}
/// Number of driver labels (known drivers plus `other`).
pub const DRIVERS: usize = crate::route::METRIC_DRIVERS.len();

/// One driver daemon's figures as one worker saw them.
#[derive(Debug, Default)]
pub struct DaemonCounters {
    /// Connections made (or early connections taken over) to it.
    pub connects: Counter,
    /// Connect attempts that failed (not there, refused, backlog full to the deadline).
    pub connect_failures: Counter,
    /// Its connections that ended (the active count is `connects - closed`).
    pub closed: Counter,
    /// Relayed connections it closed between frames (EOF).
    pub eofs: Counter,
    /// Relayed connections that ended on an error on its side (read/write failure, a
    /// truncated or invalid frame).
    pub errors: Counter,
    /// From the first connect attempt to its open reply (connect retries and the downstream
    /// handshake included).
    pub open_latency: Histogram<LATENCY_BUCKETS>,
}

/// Connection-level counters of one worker.
#[derive(Debug)]
pub struct ConnCounters {
    /// Adopted connections by listener ([`CONN_LISTENERS`]).
    pub accepted: [Counter; 4],
    /// Closed connections by listener.
    pub closed: [Counter; 4],
    /// Closed connections by [`CLOSE_REASONS`].
    pub closed_by_reason: [Counter; CLOSE_REASONS.len()],
    /// From adoption to close.
    pub duration: Histogram<DURATION_BUCKETS>,
    /// By [`AUTH_METHODS`] and [`AUTH_RESULTS`].
    pub auth: [[Counter; 2]; AUTH_METHODS.len()],
    /// By driver ([`driver_labels`]).
    pub daemons: [DaemonCounters; DRIVERS],
}

impl Default for ConnCounters {
    fn default() -> Self {
        ConnCounters {
            accepted: Default::default(),
            closed: Default::default(),
            closed_by_reason: std::array::from_fn(|_| Counter::default()),
            duration: Histogram::default(),
            auth: Default::default(),
            daemons: std::array::from_fn(|_| DaemonCounters::default()),
        }
    }
}

/// [`DaemonCounters`] summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DaemonTotals {
    pub connects: u64,
    pub connect_failures: u64,
    pub closed: u64,
    pub eofs: u64,
    pub errors: u64,
    pub open_latency: HistogramTotals<LATENCY_BUCKETS>,
}

/// [`ConnCounters`] summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnTotals {
    pub accepted: [u64; 4],
    pub closed: [u64; 4],
    pub closed_by_reason: [u64; CLOSE_REASONS.len()],
    pub duration: HistogramTotals<DURATION_BUCKETS>,
    pub auth: [[u64; 2]; AUTH_METHODS.len()],
    pub daemons: [DaemonTotals; DRIVERS],
}

impl Default for ConnTotals {
    fn default() -> Self {
        ConnTotals {
            accepted: [0; 4],
            closed: [0; 4],
            closed_by_reason: [0; CLOSE_REASONS.len()],
            duration: HistogramTotals::default(),
            auth: [[0; 2]; AUTH_METHODS.len()],
            daemons: [DaemonTotals::default(); DRIVERS],
        }
    }
}

impl ConnTotals {
    fn add(&mut self, c: &ConnCounters) {
        let add = |a: &mut u64, c: &Counter| *a = a.wrapping_add(c.get());
        for i in 0..4 {
            add(&mut self.accepted[i], &c.accepted[i]);
            add(&mut self.closed[i], &c.closed[i]);
        }
        for (a, c) in self.closed_by_reason.iter_mut().zip(&c.closed_by_reason) {
            add(a, c);
        }
        self.duration.add(&c.duration.read());
        for (a, c) in self.auth.iter_mut().zip(&c.auth) {
            add(&mut a[0], &c[0]);
            add(&mut a[1], &c[1]);
        }
        for (a, c) in self.daemons.iter_mut().zip(&c.daemons) {
            add(&mut a.connects, &c.connects);
            add(&mut a.connect_failures, &c.connect_failures);
            add(&mut a.closed, &c.closed);
            add(&mut a.eofs, &c.eofs);
            add(&mut a.errors, &c.errors);
            a.open_latency.add(&c.open_latency.read());
        }
    }
}

/// One relay worker's counters. Aligned so that two workers' blocks never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerCounters {
    /// Connections this worker adopted.
    pub connections: Counter,
    /// Reactor wake-ups.
    pub loop_iterations: Counter,
    /// Nanoseconds between a wake-up and the next wait.
    pub busy_nanos: Counter,
    /// Frame bytes (header included) by [`Direction`].
    pub bytes: [Counter; 2],
    /// Frames by [`Direction`] and [`frame_slot`].
    pub frames: [[Counter; FRAME_TYPES.len()]; 2],
    /// File descriptors passed, by [`Direction`].
    pub fds: [Counter; 2],
    /// Replies by procedure slot ([`names::slot`]) and [`call_result`]; `SLOTS` long.
    pub calls: Box<[[Counter; CALL_RESULTS.len()]]>,
    /// Reply time of the calls matched by serial, by procedure slot; `SLOTS` long.
    pub latency: Box<[Histogram<LATENCY_BUCKETS>]>,
    /// Replies whose call was not in the connection's in-flight table (it was full, or the
    /// reply matched no call): counted in `calls`, not in `latency`.
    pub calls_untimed: Counter,
    /// Server-initiated MESSAGE frames (events, keepalive) by procedure slot; `SLOTS` long.
    pub events: Box<[Counter]>,
    /// STREAM and STREAM_HOLE body bytes by procedure slot and [`Direction`]; `SLOTS` long.
    pub stream_bytes: Box<[[Counter; 2]]>,
    /// Connection-level figures (closes, auth, daemon sockets).
    pub conns: ConnCounters,
    /// Times this worker gathered its clients' figures (`/clients`, client-info).
    pub client_stats: Counter,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters {
            connections: Counter::default(),
            loop_iterations: Counter::default(),
            busy_nanos: Counter::default(),
            bytes: Default::default(),
            frames: Default::default(),
            fds: Default::default(),
            calls: (0..names::SLOTS).map(|_| Default::default()).collect(),
            latency: (0..names::SLOTS).map(|_| Default::default()).collect(),
            calls_untimed: Counter::default(),
            events: (0..names::SLOTS).map(|_| Default::default()).collect(),
            stream_bytes: (0..names::SLOTS).map(|_| Default::default()).collect(),
            conns: ConnCounters::default(),
            client_stats: Counter::default(),
        }
    }
}

impl WorkerCounters {
    /// One zeroed block per worker, allocated now (never again).
    pub fn set(workers: usize) -> Arc<[WorkerCounters]> {
        (0..workers).map(|_| WorkerCounters::default()).collect()
    }
}

/// The sums over all workers that the scrape reports (plus the per-worker figures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerTotals {
    /// Per worker: (connections, loop iterations, busy nanoseconds).
    pub per_worker: Vec<(u64, u64, u64)>,
    pub bytes: [u64; 2],
    pub frames: [[u64; FRAME_TYPES.len()]; 2],
    pub fds: [u64; 2],
    /// Non-zero (slot, result, count) only, in slot order: untouched procedures add no series.
    pub calls: Vec<(usize, usize, u64)>,
    /// (slot, histogram) of the procedures with at least one timed call, in slot order.
    pub latency: Vec<(usize, HistogramTotals<LATENCY_BUCKETS>)>,
    pub calls_untimed: u64,
    /// Non-zero (slot, count) only.
    pub events: Vec<(usize, u64)>,
    /// (slot, bytes by direction) of the procedures with stream bytes.
    pub stream_bytes: Vec<(usize, [u64; 2])>,
    pub conns: ConnTotals,
    /// [`WorkerCounters::client_stats`] summed.
    pub client_stats: u64,
}

impl WorkerTotals {
    pub fn sum(blocks: &[WorkerCounters]) -> WorkerTotals {
        let mut t = WorkerTotals {
            per_worker: Vec::with_capacity(blocks.len()),
            bytes: [0; 2],
            frames: [[0; FRAME_TYPES.len()]; 2],
            fds: [0; 2],
            calls: Vec::new(),
            latency: Vec::new(),
            calls_untimed: 0,
            events: Vec::new(),
            stream_bytes: Vec::new(),
            conns: ConnTotals::default(),
            client_stats: 0,
        };
        let mut calls = vec![[0u64; CALL_RESULTS.len()]; names::SLOTS];
        let mut latency = vec![HistogramTotals::<LATENCY_BUCKETS>::default(); names::SLOTS];
        let mut events = vec![0u64; names::SLOTS];
        let mut stream = vec![[0u64; 2]; names::SLOTS];
        for b in blocks {
            t.per_worker.push((
                b.connections.get(),
                b.loop_iterations.get(),
                b.busy_nanos.get(),
            ));
            for d in 0..2 {
                t.bytes[d] = t.bytes[d].wrapping_add(b.bytes[d].get());
                t.fds[d] = t.fds[d].wrapping_add(b.fds[d].get());
                for (f, c) in b.frames[d].iter().enumerate() {
                    t.frames[d][f] = t.frames[d][f].wrapping_add(c.get());
                }
            }
            for (slot, per_result) in b.calls.iter().enumerate() {
                for (r, c) in per_result.iter().enumerate() {
                    calls[slot][r] = calls[slot][r].wrapping_add(c.get());
                }
            }
            for (slot, h) in b.latency.iter().enumerate() {
                latency[slot].add(&h.read());
            }
            for (slot, c) in b.events.iter().enumerate() {
                events[slot] = events[slot].wrapping_add(c.get());
            }
            for (slot, d) in b.stream_bytes.iter().enumerate() {
                for (a, c) in stream[slot].iter_mut().zip(d) {
                    *a = a.wrapping_add(c.get());
                }
            }
            t.calls_untimed = t.calls_untimed.wrapping_add(b.calls_untimed.get());
            t.conns.add(&b.conns);
            t.client_stats = t.client_stats.wrapping_add(b.client_stats.get());
        }
        t.latency = latency
            .into_iter()
            .enumerate()
            .filter(|(_, h)| h.count() != 0)
            .collect();
        t.events = events
            .into_iter()
            .enumerate()
            .filter(|&(_, n)| n != 0)
            .collect();
        t.stream_bytes = stream
            .into_iter()
            .enumerate()
            .filter(|(_, d)| d.iter().any(|&n| n != 0))
            .collect();
        for (slot, per_result) in calls.iter().enumerate() {
            for (r, &n) in per_result.iter().enumerate() {
                if n != 0 {
                    t.calls.push((slot, r, n));
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::program;

    #[test]
    fn blocks_sum_across_workers_and_skip_untouched_procedures() {
        let set = WorkerCounters::set(2);
        let open = names::slot(program::REMOTE, 1);
        set[0].calls[open][call_result(MsgStatus::Ok)].inc();
        set[1].calls[open][call_result(MsgStatus::Ok)].add(2);
        set[1].calls[open][call_result(MsgStatus::Error)].inc();
        set[1].calls[names::UNKNOWN_SLOT][0].inc();
        set[0].bytes[Direction::ClientToDaemon as usize].add(28);
        set[1].bytes[Direction::ClientToDaemon as usize].add(100);
        set[1].frames[Direction::DaemonToClient as usize][frame_slot(MsgType::Reply)].inc();
        set[0].connections.inc();
        set[0].busy_nanos.add(5);
        let t = WorkerTotals::sum(&set);
        assert_eq!(t.per_worker, [(1, 0, 5), (0, 0, 0)]);
        assert_eq!(t.bytes, [128, 0]);
        assert_eq!(t.frames[1][1], 1);
        assert_eq!(
            t.calls,
            [(open, 0, 3), (open, 1, 1), (names::UNKNOWN_SLOT, 0, 1)]
        );
    }

    #[test]
    fn blocks_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<WorkerCounters>(), 128);
        let set = WorkerCounters::set(2);
        let a = &set[0] as *const WorkerCounters as usize;
        let b = &set[1] as *const WorkerCounters as usize;
        assert!(b - a >= 128);
    }

    #[test]
    fn status_and_frame_type_slots() {
        assert_eq!(CALL_RESULTS[call_result(MsgStatus::Ok)], "ok");
        assert_eq!(CALL_RESULTS[call_result(MsgStatus::Error)], "error");
        assert_eq!(FRAME_TYPES[frame_slot(MsgType::StreamHole)], "stream_hole");
        assert_eq!(FRAME_TYPES[frame_slot(MsgType::Other(99))], "other");
    }
}
