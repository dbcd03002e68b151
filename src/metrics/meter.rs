//! What the relay calls to count: a worker's handle on its counter block ([`WorkerMeter`])
//! and a connection's own state ([`ConnMeter`]: the in-flight table that times calls, and
//! the per-client figures for `/clients`). The worker and `conn` only call these; the logic
//! is here so that the data path stays a few calls long.
//!
//! Hot path: per frame, a few relaxed add-stores on the worker's own block; per call and per
//! reply, one clock read and a scan of a table of [`INFLIGHT`] entries. Nothing allocates
//! after the connection's meter is made (at adoption).

use std::sync::Arc;
use std::time::Instant;

use super::counters::{
    call_result, frame_slot, Direction, WorkerCounters, AUTH_METHODS, CLOSE_REASONS,
    DURATION_BOUNDS_NS, LATENCY_BOUNDS_NS,
};
use super::names;
use crate::listen::ListenerKind;
use crate::proto::{Header, MsgType};

/// Calls timed at once per connection. libvirt's daemons run 5 calls of a client at a time
/// by default (`max_client_requests`); a client with more outstanding than this has the
/// excess counted in `calls_untimed` instead of growing the table.
pub const INFLIGHT: usize = 16;

/// A free in-flight entry.
const FREE: u32 = u32::MAX;

/// A worker's counter block, shared with the scrape.
#[derive(Debug, Clone)]
pub struct WorkerMeter {
    set: Arc<[WorkerCounters]>,
    index: usize,
}

impl WorkerMeter {
    /// Worker `index`'s block of `set`; `None` if the set is too short.
    pub fn new(set: Arc<[WorkerCounters]>, index: usize) -> Option<WorkerMeter> {
        (index < set.len()).then_some(WorkerMeter { set, index })
    }

    #[inline]
    pub fn counters(&self) -> &WorkerCounters {
        // `new` checked the index; the set never shrinks.
        &self.set[self.index]
    }

    /// One loop turn that woke at `woke` and is about to wait again.
    #[inline]
    pub fn loop_turn(&self, woke: Instant) {
        let c = self.counters();
        c.loop_iterations.inc();
        c.busy_nanos.add(nanos(woke.elapsed()));
    }

    /// A connection from `kind` was adopted: counts it, and makes its meter (the only
    /// allocation metrics make per connection).
    pub fn adopted(&self, kind: ListenerKind) -> Box<ConnMeter> {
        let c = self.counters();
        c.connections.inc();
        if let Some(i) = listener_index(kind) {
            c.conns.accepted[i].inc();
        }
        Box::new(ConnMeter::new())
    }

    /// A connection closed for `why` (the log text), after `lived`.
    pub fn closed(
        &self,
        kind: ListenerKind,
        meter: Option<&mut ConnMeter>,
        why: &str,
        lived: std::time::Duration,
    ) {
        let c = &self.counters().conns;
        if let Some(i) = listener_index(kind) {
            c.closed[i].inc();
        }
        let reason = close_reason(why);
        c.closed_by_reason[reason].inc();
        c.duration.observe(&DURATION_BOUNDS_NS, nanos(lived));
        if let Some(m) = meter {
            if let Some(d) = m.driver.take() {
                let d = &c.daemons[d as usize];
                d.closed.inc();
                match CLOSE_REASONS[reason] {
                    "daemon_closed" => d.eofs.inc(),
                    "daemon_error" => d.errors.inc(),
                    _ => {}
                }
            }
        }
    }

    /// The connection started connecting to the daemon of `uri` (or took an early
    /// connection to it); `ok` whether the socket is connected.
    pub fn daemon_connect(&self, meter: Option<&mut ConnMeter>, uri: Option<&str>, ok: bool) {
        let d = driver_index(uri.unwrap_or(""));
        let dc = &self.counters().conns.daemons[d];
        if !ok {
            dc.connect_failures.inc();
            return;
        }
        dc.connects.inc();
        if let Some(m) = meter {
            if let Some(old) = m.driver.replace(d as u8) {
                // A reconnect in the pre-open phase without a `daemon_dropped` first.
                self.counters().conns.daemons[old as usize].closed.inc();
            }
        }
    }

    /// The first connect attempt of a downstream handshake (connect retries follow).
    pub fn downstream_started(meter: Option<&mut ConnMeter>) {
        if let Some(m) = meter {
            m.downstream_since.get_or_insert_with(Instant::now);
        }
    }

    /// The pre-open phase dropped its daemon connection.
    pub fn daemon_dropped(&self, meter: Option<&mut ConnMeter>) {
        if let Some(m) = meter {
            m.downstream_since = None;
            if let Some(d) = m.driver.take() {
                self.counters().conns.daemons[d as usize].closed.inc();
            }
        }
    }

    /// The daemon answered the open: the relay starts.
    pub fn opened(&self, meter: Option<&mut ConnMeter>) {
        if let Some(m) = meter {
            if let (Some(since), Some(d)) = (m.downstream_since.take(), m.driver) {
                self.counters().conns.daemons[d as usize]
                    .open_latency
                    .observe(&LATENCY_BOUNDS_NS, nanos(since.elapsed()));
            }
        }
    }

    /// A client authenticated (`ok`) or was refused by `method` (`"polkit"`, `"sasl"`).
    pub fn auth(&self, method: &str, ok: bool) {
        if let Some(i) = AUTH_METHODS.iter().position(|m| *m == method) {
            self.counters().conns.auth[i][usize::from(!ok)].inc();
        }
    }
}

/// A connection's own metering state.
#[derive(Debug)]
pub struct ConnMeter {
    /// Calls waiting for their reply: (serial, slot), FREE slot = unused.
    inflight: [(u32, u32); INFLIGHT],
    /// When each call was seen (same index as `inflight`).
    started: [Option<Instant>; INFLIGHT],
    /// Used entries of `inflight`: a scan is skipped when none is.
    used: u8,
    /// Driver label index of the daemon it is connected to, if connected.
    driver: Option<u8>,
    /// When its first downstream connect was tried (cleared at the open).
    downstream_since: Option<Instant>,
    /// Frame bytes by [`Direction`] (for `/clients`).
    pub bytes: [u64; 2],
    /// Replies relayed to it.
    pub calls: u64,
    /// Its last call or reply.
    pub last_activity: Option<Instant>,
}

impl Default for ConnMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnMeter {
    pub fn new() -> ConnMeter {
        ConnMeter {
            inflight: [(0, FREE); INFLIGHT],
            started: [None; INFLIGHT],
            used: 0,
            driver: None,
            downstream_since: None,
            bytes: [0; 2],
            calls: 0,
            last_activity: None,
        }
    }

    /// A frame from the client whose header the relay just validated and forwards.
    #[inline]
    pub fn client_frame(&mut self, c: &WorkerCounters, h: &Header) {
        let dir = Direction::ClientToDaemon as usize;
        self.frame(c, dir, h);
        match h.mtype {
            MsgType::Call | MsgType::CallWithFds => {
                let now = Instant::now();
                self.last_activity = Some(now);
                let slot = names::slot(h.prog, h.proc_) as u32;
                if let Some(i) = self.inflight.iter().position(|e| e.1 == FREE) {
                    self.inflight[i] = (h.serial, slot);
                    self.started[i] = Some(now);
                    self.used += 1;
                }
                // Table full: the reply will find no entry and count as untimed.
            }
            MsgType::Stream | MsgType::StreamHole => {
                self.stream(c, dir, h);
            }
            _ => {}
        }
    }

    /// A frame from the daemon whose header the relay just validated.
    #[inline]
    pub fn daemon_frame(&mut self, c: &WorkerCounters, h: &Header) {
        let dir = Direction::DaemonToClient as usize;
        self.frame(c, dir, h);
        match h.mtype {
            MsgType::Reply | MsgType::ReplyWithFds => {
                let slot = names::slot(h.prog, h.proc_);
                if let Some(per_result) = c.calls.get(slot) {
                    per_result[call_result(h.status)].inc();
                }
                self.calls += 1;
                let now = Instant::now();
                self.last_activity = Some(now);
                let key = (h.serial, slot as u32);
                let found = if self.used == 0 {
                    None
                } else {
                    self.inflight.iter().position(|e| *e == key)
                };
                match found.and_then(|i| {
                    self.inflight[i].1 = FREE;
                    self.used -= 1;
                    self.started[i].take()
                }) {
                    Some(t) => {
                        if let Some(hist) = c.latency.get(slot) {
                            hist.observe(&LATENCY_BOUNDS_NS, nanos(now.duration_since(t)));
                        }
                    }
                    None => c.calls_untimed.inc(),
                }
            }
            MsgType::Message => {
                if let Some(e) = c.events.get(names::slot(h.prog, h.proc_)) {
                    e.inc();
                }
            }
            MsgType::Stream | MsgType::StreamHole => self.stream(c, dir, h),
            _ => {}
        }
    }

    #[inline]
    fn frame(&mut self, c: &WorkerCounters, dir: usize, h: &Header) {
        let len = u64::from(h.len);
        c.bytes[dir].add(len);
        c.frames[dir][frame_slot(h.mtype)].inc();
        self.bytes[dir] += len;
    }

    #[inline]
    fn stream(&mut self, c: &WorkerCounters, dir: usize, h: &Header) {
        if let Some(s) = c.stream_bytes.get(names::slot(h.prog, h.proc_)) {
            s[dir].add(h.body_len() as u64);
        }
    }

    /// Calls waiting for a reply (for tests and `/clients`).
    pub fn in_flight(&self) -> usize {
        usize::from(self.used)
    }
}

/// A duration in nanoseconds, saturated.
#[inline]
fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The index of a relayed client's listener in `CONN_LISTENERS`.
pub fn listener_index(kind: ListenerKind) -> Option<usize> {
    match kind {
        ListenerKind::UnixRw => Some(0),
        ListenerKind::UnixRo => Some(1),
        ListenerKind::Tcp => Some(2),
        ListenerKind::Tls => Some(3),
        ListenerKind::UnixAdmin => None,
    }
}

/// The driver label index of a connection URI's scheme (`qemu:///system` → qemu); `other`
/// for schemes without a conventional daemon.
pub fn driver_index(uri: &str) -> usize {
    let drivers = super::counters::driver_labels();
    let scheme = uri.split(':').next().unwrap_or("");
    drivers[..drivers.len() - 1]
        .iter()
        .position(|d| d.eq_ignore_ascii_case(scheme))
        .unwrap_or(drivers.len() - 1)
}

/// The [`CLOSE_REASONS`] index of a close, from the worker's log text for it. The texts are
/// the worker's and relay's own (`Outcome::Close`, `Worker::close` callers); anything not
/// recognised is `internal`, so a new text costs a label's precision, never a new series.
pub fn close_reason(why: &str) -> usize {
    let reason = if why == "client closed" {
        "client_closed"
    } else if why == "daemon closed the connection" {
        "daemon_closed"
    } else if why.starts_with("proxy shut") {
        "shutdown"
    } else if why.starts_with("disconnected by an admin") {
        "admin"
    } else if why.contains("deadline") {
        "deadline"
    } else if why.starts_with("TLS") {
        "tls"
    } else if why.contains("second CONNECT_OPEN")
        || why.contains("CONNECT_SET_IDENTITY with fds")
        || why.contains("fd passing is not possible")
        || why.contains("frame length")
        || why.contains("announces")
        || why.contains("too large to be answered")
    {
        "protocol"
    } else if why.starts_with("daemon side") || why.starts_with("daemon ") {
        "daemon_error"
    } else if why.starts_with("client side") || why.starts_with("client write") {
        "client_error"
    } else if why.starts_with("client ") || why.contains("before open") {
        "preopen"
    } else {
        "internal"
    };
    CLOSE_REASONS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(CLOSE_REASONS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{program, MsgStatus};

    fn header(mtype: MsgType, proc_: i32, serial: u32, status: MsgStatus, len: u32) -> Header {
        Header {
            len,
            prog: program::REMOTE,
            vers: 1,
            proc_,
            mtype,
            serial,
            status,
        }
    }

    #[test]
    fn replies_are_timed_by_serial_and_counted_by_result() {
        let set = WorkerCounters::set(1);
        let c = &set[0];
        let mut m = ConnMeter::new();
        // Two calls of the same procedure in flight, answered out of order.
        m.client_frame(c, &header(MsgType::Call, 4, 7, MsgStatus::Ok, 40));
        m.client_frame(c, &header(MsgType::Call, 4, 8, MsgStatus::Ok, 40));
        assert_eq!(m.in_flight(), 2);
        m.daemon_frame(c, &header(MsgType::Reply, 4, 8, MsgStatus::Error, 100));
        m.daemon_frame(c, &header(MsgType::Reply, 4, 7, MsgStatus::Ok, 60));
        // A reply that matches no call is counted but not timed.
        m.daemon_frame(c, &header(MsgType::Reply, 4, 99, MsgStatus::Ok, 60));
        assert_eq!(m.in_flight(), 0);
        let slot = names::slot(program::REMOTE, 4);
        assert_eq!((c.calls[slot][0].get(), c.calls[slot][1].get()), (2, 1));
        let count: u64 = c.latency[slot].buckets.iter().map(|b| b.get()).sum();
        assert_eq!(count, 2);
        assert_eq!(c.calls_untimed.get(), 1);
        assert_eq!((c.bytes[0].get(), c.bytes[1].get()), (80, 220));
        assert_eq!(m.bytes, [80, 220]);
        assert_eq!(m.calls, 3);
    }

    #[test]
    fn a_full_inflight_table_counts_untimed_calls_and_stays_bounded() {
        let set = WorkerCounters::set(1);
        let c = &set[0];
        let mut m = ConnMeter::new();
        for serial in 0..(INFLIGHT as u32 + 5) {
            m.client_frame(c, &header(MsgType::Call, 2, serial, MsgStatus::Ok, 28));
        }
        assert_eq!(m.in_flight(), INFLIGHT);
        for serial in 0..(INFLIGHT as u32 + 5) {
            m.daemon_frame(c, &header(MsgType::Reply, 2, serial, MsgStatus::Ok, 28));
        }
        assert_eq!(m.in_flight(), 0);
        assert_eq!(c.calls_untimed.get(), 5);
        let slot = names::slot(program::REMOTE, 2);
        let timed: u64 = c.latency[slot].buckets.iter().map(|b| b.get()).sum();
        assert_eq!(timed, INFLIGHT as u64);
        assert_eq!(c.calls[slot][0].get(), INFLIGHT as u64 + 5);
    }

    #[test]
    fn events_and_stream_bytes_by_procedure() {
        let set = WorkerCounters::set(1);
        let c = &set[0];
        let mut m = ConnMeter::new();
        m.daemon_frame(c, &header(MsgType::Message, 107, 0, MsgStatus::Ok, 60));
        m.client_frame(
            c,
            &header(MsgType::Stream, 208, 3, MsgStatus::Continue, 28 + 1000),
        );
        m.daemon_frame(
            c,
            &header(MsgType::Stream, 209, 4, MsgStatus::Continue, 28 + 500),
        );
        assert_eq!(c.events[names::slot(program::REMOTE, 107)].get(), 1);
        assert_eq!(
            c.stream_bytes[names::slot(program::REMOTE, 208)][0].get(),
            1000
        );
        assert_eq!(
            c.stream_bytes[names::slot(program::REMOTE, 209)][1].get(),
            500
        );
        assert_eq!(c.frames[0][frame_slot(MsgType::Stream)].get(), 1);
    }

    #[test]
    fn latency_buckets_follow_le() {
        let h = super::super::counters::Histogram::<{ super::super::counters::LATENCY_BUCKETS }>::default();
        for ns in [0, 50_000, 50_001, 30_000_000_000, 30_000_000_001, u64::MAX] {
            h.observe(&LATENCY_BOUNDS_NS, ns);
        }
        let b: Vec<u64> = h.buckets.iter().map(|b| b.get()).collect();
        assert_eq!(b[0], 2, "0 and 50us are <= 50us");
        assert_eq!(b[1], 1);
        assert_eq!(b[LATENCY_BOUNDS_NS.len() - 1], 1, "30 s is <= 30 s");
        assert_eq!(b[LATENCY_BOUNDS_NS.len()], 2, "+Inf");
    }

    #[test]
    fn close_texts_map_to_a_fixed_reason() {
        for (why, want) in [
            ("client closed", "client_closed"),
            ("daemon closed the connection", "daemon_closed"),
            (
                "client side: peer closed in the middle of a frame",
                "client_error",
            ),
            ("client side: client sent a second CONNECT_OPEN", "protocol"),
            ("daemon side: read failed: x", "daemon_error"),
            ("proxy shutting down", "shutdown"),
            ("proxy shut down (grace period over)", "shutdown"),
            ("disconnected by an admin request", "admin"),
            (
                "no connection opened within 60s of connecting (pre-open deadline)",
                "deadline",
            ),
            ("TLS: bad record", "tls"),
            ("client closed before open", "preopen"),
            ("reactor registration failed", "internal"),
        ] {
            assert_eq!(CLOSE_REASONS[close_reason(why)], want, "{why}");
        }
    }

    #[test]
    fn drivers_by_scheme() {
        let labels = super::super::counters::driver_labels();
        assert_eq!(labels[driver_index("qemu:///system")], "qemu");
        assert_eq!(labels[driver_index("QEMU:///session")], "qemu");
        assert_eq!(labels[driver_index("storage:///system")], "storage");
        assert_eq!(labels[driver_index("test:///default")], "other");
        assert_eq!(labels[driver_index("")], "other");
    }
}
