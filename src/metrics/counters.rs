//! Per-worker counter blocks: the boundary between the relay (which counts) and the scrape
//! (which sums). Nothing here is wired into the relay yet; see "Wiring" below.
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
//! # Wiring (for the relay)
//! 1. `server::run` makes `let counters = WorkerCounters::set(nworkers);`, hands
//!    `counters.clone()` plus the worker's index to each `Worker::new` (the worker keeps
//!    `Arc<[WorkerCounters]>` and its index, or a reference into it), and calls
//!    `metrics.attach_workers(counters)` on the `metrics::Source` when metrics are on. The
//!    scrape only reports the `virtproxyd_worker_*`, `virtproxyd_relay_*` and
//!    `virtproxyd_calls_*` families once a set is attached, so nothing reads as a false zero
//!    before then.
//! 2. The worker bumps, on its own thread only:
//!    - `connections` when it adopts a connection;
//!    - `loop_iterations` once per reactor wake-up, `busy_nanos` with the time from the wake
//!      to the next wait;
//!    - `bytes[dir]`, `frames[dir][frame_slot(header.mtype)]` where the relay has just
//!      validated a frame header (`Direction::ClientToDaemon` for the client's frames);
//!    - `fds[dir]` per fd carried on a `*_WITH_FDS` frame;
//!    - `calls[names::slot(h.prog, h.proc_)][call_result(h.status)]` on each REPLY or
//!      REPLY_WITH_FDS from the daemon (a reply closes exactly one call, so counting replies
//!      needs no serial matching).

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
}

impl WorkerTotals {
    pub fn sum(blocks: &[WorkerCounters]) -> WorkerTotals {
        let mut t = WorkerTotals {
            per_worker: Vec::with_capacity(blocks.len()),
            bytes: [0; 2],
            frames: [[0; FRAME_TYPES.len()]; 2],
            fds: [0; 2],
            calls: Vec::new(),
        };
        let mut calls = vec![[0u64; CALL_RESULTS.len()]; names::SLOTS];
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
        }
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
