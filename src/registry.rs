//! The client registry the admin server reads: who is connected, since when, over what, and
//! which relay worker owns them. Written only when a client is accepted, when its identity
//! changes (TLS handshake) and when it closes — never per message — so a plain mutex is
//! enough. Disconnect requests travel to the owning worker through a per-worker inbox and the
//! worker's eventfd; the worker closes the connection itself, so no one else touches it. A
//! client not yet on its worker (in a TLS handshake, or queued for adoption) is marked instead:
//! the handshake threads (woken too) and the worker's adoption check the mark and close it.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::identity::Identity;
use crate::listen::ListenerKind;
use crate::proto::set_identity::TypedParam;
use crate::sys::wake;

/// `virClientTransport`.
pub mod transport {
    pub const UNIX: u32 = 0;
    pub const TCP: u32 = 1;
    pub const TLS: u32 = 2;
}

/// What the admin server knows about one relayed client.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRecord {
    pub id: u64,
    /// Connect time, seconds since the epoch.
    pub timestamp: i64,
    pub kind: ListenerKind,
    pub identity: Identity,
    /// `ip:port` of a TCP/TLS peer.
    pub peer_addr: Option<String>,
    /// Index of the relay worker that owns the connection.
    pub worker: usize,
    /// The identity the client set with its own CONNECT_SET_IDENTITY; it replaces `identity`
    /// for the admin server, as `virNetServerClientSetIdentity` does in libvirt.
    pub claimed: Option<Vec<TypedParam>>,
    /// The open that was relayed asked for VIR_CONNECT_RO (or was forced to it).
    pub opened_readonly: bool,
    /// An admin client asked to disconnect it (client-disconnect).
    pub disconnect_requested: bool,
}

impl ClientRecord {
    pub fn transport(&self) -> u32 {
        match self.kind {
            ListenerKind::Tcp => transport::TCP,
            ListenerKind::Tls => transport::TLS,
            _ => transport::UNIX,
        }
    }

    /// As `virNetServerClientGetReadonly`: the ro socket's clients, and any client whose
    /// open succeeded with VIR_CONNECT_RO (remoteDispatchConnectOpen sets it then).
    pub fn readonly(&self) -> bool {
        self.kind == ListenerKind::UnixRo || self.opened_readonly
    }
}

/// One relayed client's own figures (for the metrics endpoint's `/clients` page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientStats {
    pub id: u64,
    pub bytes_to_daemon: u64,
    pub bytes_to_client: u64,
    /// Replies relayed to it.
    pub calls: u64,
    /// Since its last call or reply, if it made one.
    pub idle_ms: Option<u64>,
}

impl ClientStats {
    /// Its last call or reply in seconds since the epoch, given `now_ms` (milliseconds since
    /// the epoch when the figures were read).
    pub fn last_activity(&self, now_ms: u64) -> i64 {
        let at = now_ms.saturating_sub(self.idle_ms.unwrap_or(0)) / 1000;
        i64::try_from(at).unwrap_or(i64::MAX)
    }
}

/// A collection of clients' figures in progress: which workers still owe theirs.
#[derive(Default)]
struct StatsRound {
    /// Numbers the rounds, so that a late answer to a round given up on is not taken for an
    /// answer to the next one.
    round: u64,
    owed: usize,
    got: Vec<ClientStats>,
}

/// What a worker is asked for (see [`Registry::stats_wanted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsAsk {
    /// To give back with the answer.
    pub round: u64,
    /// Only this client's figures (client-info); `None`: all of the worker's (`/clients`).
    pub only: Option<u64>,
}

/// One worker's queue of connection ids to close.
struct Inbox {
    /// The round of a collection that wants this worker's figures; 0 = none.
    stats_wanted: AtomicU64,
    /// The client that round asks about; 0 = every client (ids start at 1).
    stats_only: AtomicU64,
    /// Lets the worker skip the lock when nothing is queued (checked on every eventfd wake).
    pending: AtomicBool,
    ids: Mutex<Vec<u64>>,
    waker: OwnedFd,
}

/// The registry plus the little daemon state the admin protocol changes at run time.
#[derive(Default)]
pub struct Registry {
    clients: Mutex<BTreeMap<u64, ClientRecord>>,
    inboxes: OnceLock<Vec<Inbox>>,
    /// The TLS handshake threads' eventfds: a disconnect wakes them all (they are few, and
    /// disconnects rare), each closes the marked clients it holds.
    handshakers: OnceLock<Vec<OwnedFd>>,
    /// Bumped on each disconnect request, so a handshake thread rescans only after one and
    /// an adoption skips the lock while none was ever made.
    disconnect_gen: AtomicU64,
    /// Connected admin clients (they keep the daemon from idling out, as in libvirt).
    admin_clients: AtomicUsize,
    /// The `--timeout` idle exit in seconds; 0 = never. Set at start and by daemon-timeout.
    idle_timeout: AtomicU32,
    /// Set by activity that holds no client (a metrics scrape); the acceptor takes it and
    /// restarts its idle period.
    activity: AtomicBool,
    /// The collection being answered.
    stats: Mutex<StatsRound>,
    /// Held for a whole collection: the metrics thread (`/clients`) and the admin thread
    /// (client-info) take turns, so a round is never overwritten while it is waited for.
    stats_turn: Mutex<()>,
    stats_done: std::sync::Condvar,
    /// Connections refused before a relay worker took them on, by reason (for metrics).
    rejected: crate::metrics::counters::Rejections,
}

/// Milliseconds since the epoch, now.
pub fn now_epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the epoch, now.
pub fn now_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Registry {
    /// Gives the registry each worker's eventfd (index = worker index); once, at start.
    pub fn attach_workers(&self, wakers: Vec<OwnedFd>) {
        let inboxes = wakers
            .into_iter()
            .map(|waker| Inbox {
                stats_wanted: AtomicU64::new(0),
                stats_only: AtomicU64::new(0),
                pending: AtomicBool::new(false),
                ids: Mutex::new(Vec::new()),
                waker,
            })
            .collect();
        let _ = self.inboxes.set(inboxes);
    }

    /// The handshake threads' eventfds; once, at start.
    pub fn attach_handshakers(&self, wakers: Vec<OwnedFd>) {
        let _ = self.handshakers.set(wakers);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ClientRecord>> {
        // A panic while holding the lock leaves a consistent map (single inserts/removes).
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, rec: ClientRecord) {
        self.lock().insert(rec.id, rec);
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Removes clients' records and gives them back, under one lock (connections leaving
    /// for the next process).
    pub fn take_many(&self, ids: &[u64]) -> Vec<Option<ClientRecord>> {
        let mut clients = self.lock();
        ids.iter().map(|id| clients.remove(id)).collect()
    }

    pub fn set_identity(&self, id: u64, identity: Identity) {
        if let Some(r) = self.lock().get_mut(&id) {
            r.identity = identity;
        }
    }

    pub fn set_claimed(&self, id: u64, params: Vec<TypedParam>) {
        if let Some(r) = self.lock().get_mut(&id) {
            r.claimed = Some(params);
        }
    }

    /// Records the read-only flag of a client's successful open.
    pub fn set_opened_readonly(&self, id: u64, readonly: bool) {
        if let Some(r) = self.lock().get_mut(&id) {
            r.opened_readonly = readonly;
        }
    }

    /// Every client, by id (= accept order).
    pub fn list(&self) -> Vec<ClientRecord> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<ClientRecord> {
        self.lock().get(&id).cloned()
    }

    /// Asks whoever holds `id` to close it: its worker, or, before the worker has it, the
    /// handshake thread or the worker's adoption (through the mark). False: no such client.
    pub fn request_disconnect(&self, id: u64) -> bool {
        let worker = {
            let mut clients = self.lock();
            let Some(r) = clients.get_mut(&id) else {
                return false;
            };
            r.disconnect_requested = true;
            r.worker
        };
        // After the mark: whoever sees the new generation sees the mark.
        self.disconnect_gen.fetch_add(1, Ordering::AcqRel);
        if let Some(inbox) = self.inboxes.get().and_then(|v| v.get(worker)) {
            inbox.ids.lock().unwrap_or_else(|p| p.into_inner()).push(id);
            inbox.pending.store(true, Ordering::Release);
            wake(&inbox.waker);
        }
        for w in self.handshakers.get().into_iter().flatten() {
            wake(w);
        }
        true
    }

    /// Whether an admin client asked to disconnect `id` (checked where a client changes hands).
    pub fn disconnect_requested(&self, id: u64) -> bool {
        self.disconnect_gen.load(Ordering::Acquire) != 0
            && self.lock().get(&id).is_some_and(|r| r.disconnect_requested)
    }

    /// Changes after every disconnect request.
    pub fn disconnect_generation(&self) -> u64 {
        self.disconnect_gen.load(Ordering::Acquire)
    }

    /// The ids worker `index` must close (called on its eventfd wake).
    pub fn take_disconnects(&self, index: usize) -> Vec<u64> {
        match self.inboxes.get().and_then(|v| v.get(index)) {
            Some(inbox) if inbox.pending.swap(false, Ordering::AcqRel) => {
                std::mem::take(&mut *inbox.ids.lock().unwrap_or_else(|p| p.into_inner()))
            }
            _ => Vec::new(),
        }
    }

    /// Asks every worker for its clients' figures and waits for them (at most `limit`: a
    /// worker that does not answer in time is left out). For `/clients`.
    pub fn collect_stats(&self, limit: Duration) -> Vec<ClientStats> {
        let n = self.inboxes.get().map_or(0, Vec::len);
        self.collect(0..n, None, limit)
    }

    /// One client's figures, from its worker alone (client-info); `None` if it has none
    /// (not on a worker yet, metrics off) or its worker did not answer within `limit`.
    pub fn client_stats(&self, id: u64, limit: Duration) -> Option<ClientStats> {
        let worker = self.get(id)?.worker;
        self.collect(worker..worker + 1, Some(id), limit)
            .into_iter()
            .find(|s| s.id == id)
    }

    fn collect(
        &self,
        workers: std::ops::Range<usize>,
        only: Option<u64>,
        limit: Duration,
    ) -> Vec<ClientStats> {
        let Some(asked) = self.inboxes.get().and_then(|v| v.get(workers)) else {
            return Vec::new();
        };
        if asked.is_empty() {
            return Vec::new();
        }
        let _turn = self.stats_turn.lock().unwrap_or_else(|p| p.into_inner());
        let mut round = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let number = round.round.wrapping_add(1).max(1);
        *round = StatsRound {
            round: number,
            owed: asked.len(),
            got: Vec::new(),
        };
        for inbox in asked {
            inbox.stats_only.store(only.unwrap_or(0), Ordering::Release);
            // After `stats_only`: a worker that sees the round sees whom it is about.
            inbox.stats_wanted.store(number, Ordering::Release);
            wake(&inbox.waker);
        }
        let deadline = std::time::Instant::now() + limit;
        while round.owed > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            round = self
                .stats_done
                .wait_timeout(round, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        for inbox in asked {
            inbox.stats_wanted.store(0, Ordering::Release);
        }
        round.owed = 0;
        std::mem::take(&mut round.got)
    }

    /// What worker `index` owes, if anything (checked when its eventfd wakes it).
    pub fn stats_wanted(&self, index: usize) -> Option<StatsAsk> {
        let inbox = self.inboxes.get()?.get(index)?;
        let round = inbox.stats_wanted.swap(0, Ordering::AcqRel);
        (round != 0).then(|| StatsAsk {
            round,
            only: match inbox.stats_only.load(Ordering::Acquire) {
                0 => None,
                id => Some(id),
            },
        })
    }

    /// A worker's answer to round `round` of a collection.
    pub fn give_stats(&self, round: u64, mut stats: Vec<ClientStats>) {
        let mut r = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if r.owed == 0 || r.round != round {
            return; // the collection gave up waiting
        }
        r.got.append(&mut stats);
        r.owed -= 1;
        if r.owed == 0 {
            self.stats_done.notify_all();
        }
    }

    /// The records of the clients connected now (for `/clients`).
    pub fn records(&self) -> Vec<ClientRecord> {
        self.lock().values().cloned().collect()
    }

    pub fn admin_connected(&self) {
        self.admin_clients.fetch_add(1, Ordering::AcqRel);
    }

    pub fn admin_disconnected(&self) {
        self.admin_clients.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn admin_clients(&self) -> usize {
        self.admin_clients.load(Ordering::Acquire)
    }

    /// The listener kind of every client (for per-listener counts, without cloning records).
    pub fn kinds(&self) -> Vec<ListenerKind> {
        self.lock().values().map(|r| r.kind).collect()
    }

    /// Counts `n` connections refused for `why` before a worker took them on.
    pub fn rejected(&self, why: crate::metrics::counters::Rejected, n: u64) {
        self.rejected.add(why, n);
    }

    /// Rejections so far, by `Rejected` index.
    pub fn rejections(&self) -> [u64; crate::metrics::counters::Rejected::ALL.len()] {
        self.rejected.read()
    }

    /// Records activity that keeps the daemon from idling out without being a client.
    pub fn note_activity(&self) {
        self.activity.store(true, Ordering::Release);
    }

    /// Whether there was such activity since the last call (the acceptor's idle check).
    pub fn take_activity(&self) -> bool {
        self.activity.swap(false, Ordering::AcqRel)
    }

    pub fn set_idle_timeout(&self, secs: u32) {
        self.idle_timeout.store(secs, Ordering::Release);
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        match self.idle_timeout.load(Ordering::Acquire) {
            0 => None,
            s => Some(Duration::from_secs(s.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn eventfd() -> OwnedFd {
        crate::sys::eventfd().expect("eventfd")
    }

    fn rec(id: u64, worker: usize) -> ClientRecord {
        ClientRecord {
            id,
            timestamp: 1,
            kind: ListenerKind::UnixRw,
            identity: Identity::default(),
            peer_addr: None,
            worker,
            claimed: None,
            opened_readonly: false,
            disconnect_requested: false,
        }
    }

    #[test]
    fn disconnect_reaches_the_owning_worker_only() {
        let r = Registry::default();
        let w0 = eventfd();
        let w1 = eventfd();
        let probe = w1.try_clone().unwrap();
        r.attach_workers(vec![w0, w1]);
        r.insert(rec(7, 1));
        r.insert(rec(8, 0));
        assert!(!r.request_disconnect(99));
        assert!(r.request_disconnect(7));
        assert_eq!(r.take_disconnects(0), Vec::<u64>::new());
        assert_eq!(r.take_disconnects(1), vec![7]);
        assert_eq!(r.take_disconnects(1), Vec::<u64>::new());
        let mut b = [0u8; 8];
        // SAFETY: reading an eventfd counter into an 8-byte buffer.
        let n = unsafe { libc::read(probe.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        assert_eq!((n, u64::from_ne_bytes(b)), (8, 1));
        r.remove(7);
        assert_eq!(r.list().iter().map(|c| c.id).collect::<Vec<_>>(), vec![8]);
    }

    fn stats(id: u64) -> ClientStats {
        ClientStats {
            id,
            bytes_to_daemon: id,
            bytes_to_client: 0,
            calls: 0,
            idle_ms: None,
        }
    }

    /// Answers worker `index`'s next ask (and first a stale one for round `stale`).
    fn answer_once(
        r: std::sync::Arc<Registry>,
        index: usize,
        stale: u64,
    ) -> std::thread::JoinHandle<StatsAsk> {
        std::thread::spawn(move || loop {
            if let Some(ask) = r.stats_wanted(index) {
                r.give_stats(stale, vec![stats(99)]);
                let only = ask.only.unwrap_or(1);
                r.give_stats(ask.round, vec![stats(only)]);
                return ask;
            }
            std::thread::sleep(Duration::from_millis(1));
        })
    }

    #[test]
    fn client_info_asks_only_the_clients_worker_and_late_answers_are_dropped() {
        let r = std::sync::Arc::new(Registry::default());
        r.attach_workers(vec![eventfd(), eventfd()]);
        r.insert(rec(7, 1));
        let w1 = answer_once(r.clone(), 1, 0);
        let got = r.client_stats(7, Duration::from_secs(10));
        let ask = w1.join().unwrap();
        assert_eq!(ask.only, Some(7));
        assert_eq!(got, Some(stats(7)));
        assert!(r.stats_wanted(0).is_none(), "worker 0 was asked too");
        // Both workers for `/clients`; a stale answer (the last round's) is not counted.
        let old = ask.round;
        let w0 = answer_once(r.clone(), 0, old);
        let w1 = answer_once(r.clone(), 1, old);
        let mut all = r.collect_stats(Duration::from_secs(10));
        all.sort_by_key(|s| s.id);
        assert_eq!(all, vec![stats(1), stats(1)]);
        assert!(w0.join().unwrap().only.is_none() && w1.join().unwrap().round > old);
        assert_eq!(r.client_stats(12345, Duration::from_millis(10)), None);
    }

    #[test]
    fn activity_is_taken_once() {
        let r = Registry::default();
        assert!(!r.take_activity());
        r.note_activity();
        r.note_activity();
        assert!(r.take_activity());
        assert!(!r.take_activity());
    }

    #[test]
    fn a_read_only_open_makes_any_client_read_only() {
        let r = Registry::default();
        let mut tcp = rec(3, 0);
        tcp.kind = ListenerKind::Tcp;
        r.insert(rec(1, 0));
        r.insert(tcp);
        let mut ro = rec(2, 0);
        ro.kind = ListenerKind::UnixRo;
        r.insert(ro);
        let readonly = |id| r.get(id).is_some_and(|c| c.readonly());
        assert!(!readonly(1) && readonly(2) && !readonly(3));
        r.set_opened_readonly(1, true);
        r.set_opened_readonly(3, true);
        assert!(readonly(1) && readonly(2) && readonly(3));
    }

    #[test]
    fn a_disconnect_marks_the_client_and_wakes_the_handshakers() {
        let r = Registry::default();
        let hs = eventfd();
        let probe = hs.try_clone().unwrap();
        r.attach_workers(vec![eventfd()]);
        r.attach_handshakers(vec![hs]);
        r.insert(rec(5, 0));
        r.insert(rec(6, 0));
        assert!(!r.disconnect_requested(5));
        let g = r.disconnect_generation();
        assert!(r.request_disconnect(5));
        assert!(r.disconnect_requested(5) && !r.disconnect_requested(6));
        assert_ne!(r.disconnect_generation(), g);
        let mut b = [0u8; 8];
        // SAFETY: reading an eventfd counter into an 8-byte buffer.
        let n = unsafe { libc::read(probe.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        r.remove(5);
        assert!(!r.disconnect_requested(5));
    }
}
