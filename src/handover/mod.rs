//! Restart without dropping a client: the relayed connections, the listeners and the
//! registry's ids move to the next process, which goes on relaying them.
//!
//! 1. Trigger (`server`): `SIGUSR2` re-executes the binary in place (same PID); under systemd
//!    `SIGTERM` stores everything in the service's fd store, which a `restart` keeps and a
//!    `stop` empties (then the clients see EOF, as before).
//! 2. Quiesce (`worker::handover`): no listener accepts; every relay direction finishes the
//!    frame under way and reads nothing past it, so each connection comes to rest between
//!    frames with nothing buffered; what follows waits in the sockets' kernel queues and
//!    travels with them. What cannot move (userspace TLS, a SASL security layer, clients
//!    still before their open or not at rest within `GRACE`) is closed, each with a logged
//!    reason.
//! 3. Carry (`transfer`): one memfd with the `state` (versioned), and one socketpair whose
//!    queue holds the fds; both reach the new process as activation fds named `STATE_NAME`
//!    and `FDS_NAME`.
//! 4. Adopt (`main`, `server`, `worker`): the new process reads them, re-creates the
//!    registry entries with the same ids and hands each connection to a worker as a relay.

pub mod process;
pub mod state;
pub mod transfer;

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;

pub use state::{ConnRecord, ListenerRecord, State};

/// Activation names of the two fds that carry a hand-over.
pub const STATE_NAME: &str = "virtproxyd-handover-state";
pub const FDS_NAME: &str = "virtproxyd-handover-fds";

/// How long connections get to come to rest (and clients before their open to finish it)
/// once a hand-over starts; the rest are closed.
pub const GRACE: Duration = Duration::from_secs(2);

/// A relayed connection at rest (or a client that sent nothing yet), leaving a worker or
/// arriving at one.
#[derive(Debug)]
pub struct Carried {
    /// Its sockets lack close-on-exec already (see `exec_inheriting`).
    pub inheritable: bool,
    pub record: ConnRecord,
    pub client: OwnedFd,
    /// `None` for a `fresh` client.
    pub daemon: Option<OwnedFd>,
}

/// What a worker needs besides the client socket to adopt a carried connection.
#[derive(Debug)]
pub struct Resume {
    pub record: ConnRecord,
    pub daemon: OwnedFd,
}

/// The hand-over's shared part: the request the workers watch, and what they leave.
#[derive(Debug, Default)]
pub struct Handover {
    /// Set by the acceptor: each worker quiesces, carries what comes to rest, closes the
    /// rest at `GRACE`, and exits.
    pub requested: AtomicBool,
    /// When it was requested (`monotonic_ns`), for the pause figures in the log.
    began_ns: std::sync::atomic::AtomicU64,
    /// The workers' carried connections.
    pub carried: Mutex<Vec<Carried>>,
    /// Workers done with their part (their connections carried or closed); they still tear
    /// down, which the acceptor does not wait for (see `wait_for_workers`).
    left: Mutex<usize>,
    left_changed: std::sync::Condvar,
}

impl Handover {
    /// Asks every worker to quiesce, from now on.
    pub fn request(&self) -> u64 {
        *self.left.lock().unwrap_or_else(|e| e.into_inner()) = 0;
        let now = monotonic_ns();
        self.began_ns
            .store(now, std::sync::atomic::Ordering::Relaxed);
        self.requested
            .store(true, std::sync::atomic::Ordering::Release);
        now
    }

    pub fn began_ns(&self) -> u64 {
        self.began_ns.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds a worker's carried connections.
    pub fn leave(&self, mut conns: Vec<Carried>) {
        let mut all = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        all.append(&mut conns);
    }

    /// Called by a worker once its connections are carried or closed, before it tears down.
    pub fn worker_left(&self) {
        *self.left.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.left_changed.notify_all();
    }

    /// Waits until `n` workers left, or every thread in `threads` ended (a worker that died
    /// without saying so must not hold the hand-over up). Dropping a worker's reactor with
    /// 18,000 registrations and its buffers takes milliseconds that every client's pause
    /// would wait for; an `execve` ends that work instead, and a failed hand-over joins the
    /// threads before serving on.
    pub fn wait_for_workers(&self, n: usize, threads: &[std::thread::JoinHandle<()>]) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left < n && !threads.iter().all(|t| t.is_finished()) {
            left = self
                .left_changed
                .wait_timeout(left, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Takes every carried connection.
    pub fn take(&self) -> Vec<Carried> {
        std::mem::take(&mut *self.carried.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Connections a previous process carried over, with the id its next client would have got.
pub struct Resumed {
    pub carried: Vec<Carried>,
    pub next_id: u64,
    /// When the previous process began its quiesce (`monotonic_ns`), if it said: the pause
    /// its clients see is measured from there.
    pub began_ns: Option<u64>,
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock on both sides of an `execve`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; CLOCK_MONOTONIC cannot fail on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Milliseconds since `began_ns`, when that is a plausible recent moment (in the last ten
/// minutes, not in the future).
pub fn ms_since(began_ns: Option<u64>) -> Option<u64> {
    let ago = monotonic_ns().checked_sub(began_ns?)?;
    (ago < 600_000_000_000).then_some(ago / 1_000_000)
}

/// How a hand-over leaves this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOffMode {
    /// SIGUSR2: re-execute the binary in place.
    Exec,
    /// SIGTERM under systemd: into the service's fd store.
    FdStore,
}

/// What a hand-over takes to the next process: the listeners (their backlogs keep the
/// clients that arrived meanwhile), the connections at rest, and the next client id.
pub struct HandOff {
    pub mode: HandOffMode,
    pub listeners: Vec<crate::listen::Listener>,
    pub carried: Vec<Carried>,
    pub next_id: u64,
    /// When the quiesce began (`monotonic_ns`).
    pub began_ns: u64,
    /// Threads still stopping — the admin thread (it polls every 200 ms), relay workers
    /// tearing down: not waited for before leaving, only before serving on when the
    /// hand-over failed.
    pub stopping: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for HandOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandOff")
            .field("mode", &self.mode)
            .field("listeners", &self.listeners.len())
            .field("carried", &self.carried.len())
            .field("next_id", &self.next_id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_is_measured_only_from_a_plausible_start() {
        assert_eq!(ms_since(None), None);
        let now = monotonic_ns();
        assert!(ms_since(Some(now)).is_some_and(|ms| ms < 1_000));
        // A start in the future (a clock from elsewhere) is not a pause either.
        assert_eq!(ms_since(Some(now + 10_000_000_000)), None);
        if let Some(long_ago) = now.checked_sub(700_000_000_000) {
            assert_eq!(ms_since(Some(long_ago)), None);
        }
    }
}
