//! Per-source pre-open rates: the pre-open frames of all the connections of one source (a
//! remote peer's IP address, a local user's uid) share one rate, a burst of `BURST` frames
//! and then `PER_SEC` a second. A connection whose source is over it waits before its next
//! frame is read (`worker::preopen`), so neither reconnecting nor opening many connections at
//! once buys a flooding peer more of a relay worker's time; other sources are not slowed.
//!
//! The rate is GCRA (the virtual-scheduling form of a token bucket): one atomic "theoretical
//! arrival time" per source, charged with a compare-and-swap by whichever worker handles the
//! frame, so the workers share it without a lock. The acceptor owns the table of sources.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Who a connection's pre-open frames are charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Ip(IpAddr),
    Uid(u32),
}

/// Frames a source may send at once: a real client's handshake takes a few (AUTH_LIST, a SASL
/// exchange, CONNECT_OPEN), so this is a management host opening a few hundred connections.
pub const BURST: u64 = 1024;
/// Frames a second a source may send for ever (some 60 opens a second).
pub const PER_SEC: u64 = 256;
const INTERVAL_NS: u64 = 1_000_000_000 / PER_SEC;
/// How far ahead of now a source's arrival time may run before it must wait.
const TOLERANCE_NS: u64 = (BURST - 1) * INTERVAL_NS;
/// Sources remembered; sources at rest (their burst back in full) are forgotten first, as a
/// new entry would say the same.
const SOURCES_MAX: usize = 4096;

/// One source's rate, shared by its connections.
#[derive(Debug)]
pub struct SourceRate {
    epoch: Instant,
    /// Nanoseconds after `epoch` at which the source's next frame is due on its own pace.
    due_ns: AtomicU64,
}

impl SourceRate {
    fn new(epoch: Instant) -> Self {
        SourceRate {
            epoch,
            due_ns: AtomicU64::new(0),
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Charges one frame handled at `now`; returns how long the connection must wait before
    /// its next frame is read (zero while the source is within its burst).
    pub fn charge(&self, now: Instant) -> Duration {
        let now_ns = self.ns(now);
        let mut due = self.due_ns.load(Ordering::Relaxed);
        loop {
            let next = due.max(now_ns) + INTERVAL_NS;
            match self
                .due_ns
                .compare_exchange_weak(due, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Duration::from_nanos(next.saturating_sub(now_ns + TOLERANCE_NS)),
                Err(seen) => due = seen,
            }
        }
    }

    /// Whether the source has its whole burst back (nothing to remember about it).
    fn at_rest(&self, now: Instant) -> bool {
        self.due_ns.load(Ordering::Relaxed) <= self.ns(now)
    }

    /// How far the source is ahead of its pace (what forgetting it would forgive).
    fn debt_ns(&self, now: Instant) -> u64 {
        self.due_ns
            .load(Ordering::Relaxed)
            .saturating_sub(self.ns(now))
    }
}

/// The rates of the sources seen lately (owned by the acceptor).
#[derive(Debug)]
pub struct SourceRates {
    epoch: Instant,
    rates: HashMap<Source, Arc<SourceRate>>,
}

impl Default for SourceRates {
    fn default() -> Self {
        SourceRates {
            epoch: Instant::now(),
            rates: HashMap::new(),
        }
    }
}

impl SourceRates {
    /// The rate a new connection from `source` is charged to.
    pub fn of(&mut self, source: Source, now: Instant) -> Arc<SourceRate> {
        if !self.rates.contains_key(&source) && self.rates.len() >= SOURCES_MAX {
            self.forget(now);
        }
        let epoch = self.epoch;
        self.rates
            .entry(source)
            .or_insert_with(|| Arc::new(SourceRate::new(epoch)))
            .clone()
    }

    /// Forgets the sources at rest, or when none is, the half least in debt (their
    /// connections keep charging their own copy; a new connection from them starts afresh).
    fn forget(&mut self, now: Instant) {
        self.rates.retain(|_, r| !r.at_rest(now));
        if self.rates.len() >= SOURCES_MAX {
            let mut debts: Vec<u64> = self.rates.values().map(|r| r.debt_ns(now)).collect();
            debts.sort_unstable();
            let median = debts[debts.len() / 2];
            self.rates.retain(|_, r| r.debt_ns(now) > median);
        }
    }

    /// Sources remembered now.
    pub fn len(&self) -> usize {
        self.rates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rates.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const PEER: Source = Source::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));

    /// Frames charged at `at` before the first that must wait.
    fn free_frames(r: &SourceRate, at: Instant) -> u64 {
        let mut n = 0;
        while r.charge(at).is_zero() {
            n += 1;
        }
        n + 1
    }

    #[test]
    fn the_burst_is_shared_by_all_of_a_sources_connections() {
        let mut rates = SourceRates::default();
        let t = Instant::now();
        let (a, b) = (rates.of(PEER, t), rates.of(PEER, t));
        for _ in 0..BURST / 2 {
            assert!(a.charge(t).is_zero());
        }
        for _ in 0..BURST / 2 - 1 {
            assert!(b.charge(t).is_zero());
        }
        // The burst's last frame is handled at once, and its connection then waits one
        // interval before the next; each further frame of the source one more.
        let c = rates.of(PEER, t);
        assert_eq!(c.charge(t), Duration::from_nanos(INTERVAL_NS));
        assert_eq!(a.charge(t), Duration::from_nanos(2 * INTERVAL_NS));
        assert_eq!(b.charge(t), Duration::from_nanos(3 * INTERVAL_NS));
    }

    #[test]
    fn a_source_over_its_rate_waits_its_pace_and_recovers() {
        let mut rates = SourceRates::default();
        let t = Instant::now();
        let r = rates.of(PEER, t);
        assert_eq!(free_frames(&r, t), BURST);
        // A second later PER_SEC frames came back, no more.
        let later = t + Duration::from_secs(1);
        assert_eq!(free_frames(&r, later), PER_SEC);
        // An hour later the whole burst, no more.
        let much_later = t + Duration::from_secs(3600);
        assert_eq!(free_frames(&r, much_later), BURST);
    }

    #[test]
    fn sources_are_charged_apart() {
        let mut rates = SourceRates::default();
        let t = Instant::now();
        free_frames(&rates.of(PEER, t), t);
        assert!(rates.of(Source::Uid(1000), t).charge(t).is_zero());
        let other = Source::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(rates.of(other, t).charge(t).is_zero());
        assert!(!rates.of(PEER, t).charge(t).is_zero());
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_the_floods() {
        let mut rates = SourceRates::default();
        let t = Instant::now();
        free_frames(&rates.of(PEER, t), t);
        for uid in 0..3 * SOURCES_MAX as u32 {
            rates.of(Source::Uid(uid), t).charge(t);
            assert!(rates.len() <= SOURCES_MAX);
        }
        assert!(
            !rates.of(PEER, t).charge(t).is_zero(),
            "the flooding source was forgotten"
        );
    }
}
