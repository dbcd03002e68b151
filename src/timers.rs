//! Deadlines of a thread's connections: a binary heap with lazy cancellation.
//!
//! Arming pushes an entry; cancelling is done by the owner forgetting the deadline on its side
//! (the connection records the instant it armed). An entry is checked against its owner only
//! when it comes due, so a loop with nothing due costs one peek, and connections without a
//! deadline (every relayed one) cost nothing at all. Stale entries leave the heap when they
//! come due, or earlier through `compact` when they pile up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// A min-heap of `(deadline, key)`.
#[derive(Debug)]
pub struct Timers<K: Ord> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
}

impl<K: Ord> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
        }
    }
}

impl<K: Ord + Copy> Timers<K> {
    /// Adds a deadline. The owner must remember `at` to tell this entry from stale ones.
    pub fn arm(&mut self, at: Instant, key: K) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest deadline, stale or not (a stale one only causes an early wake-up).
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// How long a reactor may sleep: until the earliest deadline, at most `cap`.
    pub fn timeout(&self, now: Instant, cap: Duration) -> Duration {
        match self.next() {
            Some(at) => at.saturating_duration_since(now).min(cap),
            None => cap,
        }
    }

    /// Moves every entry due at `now` into `out`, earliest first.
    pub fn pop_due(&mut self, now: Instant, out: &mut Vec<(Instant, K)>) {
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse(e)) = self.heap.pop() {
                out.push(e);
            }
        }
    }

    /// Entries held, live and stale.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Drops the stale entries when they outnumber `live` (the owner's count of armed
    /// deadlines) by far; `is_live` says whether an entry is still armed. Amortised O(1) per
    /// arm: a rebuild happens only after the heap has doubled past the live count.
    pub fn compact(&mut self, live: usize, mut is_live: impl FnMut(Instant, &K) -> bool) {
        if self.heap.len() <= 2 * live + 256 {
            return;
        }
        let entries = std::mem::take(&mut self.heap).into_vec();
        self.heap = entries
            .into_iter()
            .filter(|Reverse((at, k))| is_live(*at, k))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn pops_due_entries_in_deadline_order_and_keeps_later_ones() {
        let base = t0();
        let mut t = Timers::default();
        for (ms, k) in [(30, 'c'), (10, 'a'), (50, 'e'), (20, 'b'), (40, 'd')] {
            t.arm(base + Duration::from_millis(ms), k);
        }
        assert_eq!(t.next(), Some(base + Duration::from_millis(10)));
        let mut out = Vec::new();
        t.pop_due(base + Duration::from_millis(30), &mut out);
        let keys: Vec<char> = out.iter().map(|(_, k)| *k).collect();
        assert_eq!(keys, ['a', 'b', 'c']);
        assert_eq!(t.len(), 2);
        out.clear();
        t.pop_due(base + Duration::from_millis(35), &mut out);
        assert!(out.is_empty());
        t.pop_due(base + Duration::from_secs(1), &mut out);
        assert_eq!(out.len(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn timeout_is_capped_and_never_negative() {
        let base = t0();
        let mut t = Timers::default();
        let cap = Duration::from_millis(500);
        assert_eq!(t.timeout(base, cap), cap);
        t.arm(base + Duration::from_millis(100), 1u32);
        assert_eq!(t.timeout(base, cap), Duration::from_millis(100));
        assert_eq!(
            t.timeout(base + Duration::from_secs(1), cap),
            Duration::ZERO
        );
        t.arm(base + Duration::from_secs(10), 2);
        let mut out = Vec::new();
        t.pop_due(base + Duration::from_millis(100), &mut out);
        assert_eq!(t.timeout(base, cap), cap);
    }

    #[test]
    fn lazy_cancellation_by_owner_record() {
        // The owner keeps the instant it armed last; a re-arm makes the older entry stale.
        let base = t0();
        let mut armed: [Option<Instant>; 2] = [None, None];
        let mut t = Timers::default();
        let first = base + Duration::from_millis(10);
        armed[0] = Some(first);
        t.arm(first, 0usize);
        let second = base + Duration::from_millis(20);
        armed[0] = Some(second); // re-armed later
        t.arm(second, 0);
        let other = base + Duration::from_millis(15);
        armed[1] = Some(other);
        t.arm(other, 1);
        armed[1] = None; // cancelled
        let mut out = Vec::new();
        t.pop_due(base + Duration::from_millis(25), &mut out);
        let fired: Vec<usize> = out
            .iter()
            .filter(|(at, k)| armed[*k] == Some(*at))
            .map(|(_, k)| *k)
            .collect();
        assert_eq!(fired, [0]);
    }

    #[test]
    fn equal_deadlines_all_fire() {
        let at = t0();
        let mut t = Timers::default();
        for k in 0..100u32 {
            t.arm(at, k);
        }
        let mut out = Vec::new();
        t.pop_due(at, &mut out);
        assert_eq!(out.len(), 100);
    }

    #[test]
    fn compaction_drops_stale_entries_only_when_they_pile_up() {
        let base = t0();
        let mut t = Timers::default();
        for k in 0..1000u32 {
            t.arm(base + Duration::from_secs(60), k);
        }
        // Few stale entries: nothing to do.
        t.compact(900, |_, _| unreachable!("no rebuild below the threshold"));
        assert_eq!(t.len(), 1000);
        // Only the even keys are still armed.
        t.compact(10, |_, k| k % 2 == 0);
        assert_eq!(t.len(), 500);
        let mut out = Vec::new();
        t.pop_due(base + Duration::from_secs(61), &mut out);
        assert!(out.iter().all(|(_, k)| k % 2 == 0));
        assert_eq!(out.len(), 500);
    }
}
