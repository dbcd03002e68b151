//! The accept loop: listeners, signals, parked clients and the idle timer between
//! wake-ups.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;

use super::admission::Admission;
use super::limits::{admit_parked, listener_paused, must_park, starts_anonymous, Parked};
use super::signals::{
    check_outcome, fd_store_available, signal_action, CheckOutcome, SignalAction,
};
use super::{notify, Stopped};
use crate::handover::HandOffMode;
use crate::identity::{Identity, NameCache};
use crate::listen::{Listener, ListenerKind};
use crate::metrics::counters::Rejected;
use crate::shared::Shared;
use crate::sys::drain_eventfd;

/// Who the client is, captured at accept time. `None`: drop the client.
fn client_identity(kind: ListenerKind, fd: &OwnedFd, names: &mut NameCache) -> Option<Identity> {
    if !kind.is_unix() {
        // TCP without auth: libvirt sends such clients downstream with an empty identity.
        let _ = nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
        return Some(Identity::default());
    }
    match Identity::of_unix_peer_cached(fd.as_fd(), names) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::info!("dropping client whose credentials cannot be read: {e}");
            None
        }
    }
}

/// When the daemon has had no client for the idle timeout.
pub(super) struct IdleClock {
    /// Since when nothing kept the daemon busy; `None` while something does.
    pub(super) since: Option<Instant>,
}

impl IdleClock {
    /// Notes whether something keeps the daemon busy now, and answers whether the idle
    /// timeout (`limit`, which can change at run time: daemon-timeout) has run out.
    pub(super) fn expired(&mut self, busy: bool, limit: Option<Duration>, now: Instant) -> bool {
        if busy {
            self.since = None;
        } else {
            self.since.get_or_insert(now);
        }
        match (limit, self.since) {
            (Some(limit), Some(since)) => now.saturating_duration_since(since) >= limit,
            _ => false,
        }
    }
}

/// How long poll() waits (ms): briefly while we cannot accept or clients are parked (a client
/// may have left, a parked one may expire) or to check the idle timer.
pub(super) fn poll_timeout_ms(accepting: bool, parked: bool, idle_timeout: bool) -> u16 {
    if !accepting || parked || idle_timeout {
        200
    } else {
        1000
    }
}

/// The client count systemd shows (`STATUS=`), sent at most once a second.
pub(super) struct StatusLine {
    pub(super) sent: usize,
    pub(super) at: Instant,
}

impl StatusLine {
    /// Whether `clients` is to be sent now (and notes it as sent).
    pub(super) fn due(&mut self, clients: usize, now: Instant) -> bool {
        if clients == self.sent || now.saturating_duration_since(self.at) < Duration::from_secs(1) {
            return false;
        }
        (self.sent, self.at) = (clients, now);
        true
    }
}

/// The accept loop: its listeners, the clients waiting for a slot, and the timers between
/// wake-ups.
pub(super) struct Acceptor<'a> {
    pub(super) shared: &'a Arc<Shared>,
    /// The relay listeners (the admin thread owns the admin ones).
    pub(super) listeners: &'a [Listener],
    pub(super) sigfd: &'a SignalFd,
    pub(super) on_reload: &'a mut dyn FnMut(&Shared),
    pub(super) handover: bool,
    pub(super) handover_check: &'a mut dyn FnMut() -> Result<(), String>,
    pub(super) admission: Admission<'a>,
    pub(super) parked: VecDeque<Parked>,
    pub(super) idle: IdleClock,
    pub(super) status: StatusLine,
    /// Accepting is paused until then (out of descriptors).
    pub(super) accept_backoff: Option<Instant>,
    pub(super) names: NameCache,
}

impl Acceptor<'_> {
    /// Accepts until a signal or the idle timeout stops it; the hand-over mode when the
    /// connections are to move to the next process.
    pub(super) fn serve(&mut self) -> io::Result<(Stopped, Option<HandOffMode>)> {
        let shared = self.shared;
        loop {
            admit_parked(&mut self.parked, &mut self.admission);
            let clients = shared.clients.load(Ordering::Acquire);
            if self.status.due(clients, Instant::now()) {
                notify(&[sd_notify::NotifyState::Status(&format!(
                    "{clients} clients"
                ))]);
            }
            // Admin clients keep the daemon up too, as in libvirt. A metrics scrape is
            // activity too (it restarts the idle period); asked last, as asking clears it.
            let busy = clients != 0
                || !self.parked.is_empty()
                || shared.registry.admin_clients() != 0
                || shared.registry.take_activity();
            let idle_timeout = shared.registry.idle_timeout();
            if self.idle.expired(busy, idle_timeout, Instant::now()) {
                return Ok((Stopped::IdleTimeout, None));
            }
            let open = self.open_listeners();
            let timeout = poll_timeout_ms(
                open.len() == self.listeners.len(),
                !self.parked.is_empty(),
                idle_timeout.is_some(),
            );
            let Some(ready) = self.wait(&open, timeout)? else {
                continue;
            };
            if ready[1] {
                // A client left the anonymous set at the limit: re-evaluate the pauses now.
                drain_eventfd(&shared.limit_waker);
            }
            if ready[0] {
                if let Ok(Some(info)) = self.sigfd.read_signal() {
                    if let Some(stop) = self.on_signal(info.ssi_signo as i32) {
                        return Ok(stop);
                    }
                }
            }
            let listeners = self.listeners;
            for (n, &i) in open.iter().enumerate() {
                if ready[n + 2] {
                    self.accept_from(&listeners[i]);
                }
            }
        }
    }

    /// Indices of the listeners accepting now.
    fn open_listeners(&self) -> Vec<usize> {
        if self.accept_backoff.is_some_and(|t| t > Instant::now()) {
            return Vec::new();
        }
        (0..self.listeners.len())
            .filter(|&i| {
                !listener_paused(
                    self.shared,
                    self.listeners[i].kind,
                    self.parked.len(),
                    self.admission.admitted_any,
                )
            })
            .collect()
    }

    /// Polls the signalfd, the limit waker and the `open` listeners; which are ready, in
    /// that order, or `None` when a signal interrupted the wait.
    fn wait(&self, open: &[usize], timeout_ms: u16) -> io::Result<Option<Vec<bool>>> {
        let mut fds = vec![
            PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.shared.limit_waker.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            open.iter()
                .map(|&i| PollFd::new(self.listeners[i].fd.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, PollTimeout::from(timeout_ms)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        Ok(Some(
            fds.iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect(),
        ))
    }

    /// Does what a signal asks; `Some` stops the loop.
    fn on_signal(&mut self, signo: i32) -> Option<(Stopped, Option<HandOffMode>)> {
        match signal_action(signo, self.handover, fd_store_available()) {
            SignalAction::Reload => {
                tracing::info!("Reloading configuration on SIGHUP");
                notify(&[sd_notify::NotifyState::Reloading]);
                (self.on_reload)(self.shared);
                notify(&[sd_notify::NotifyState::Ready]);
                None
            }
            SignalAction::HandOff(mode) => match check_outcome(mode, (self.handover_check)()) {
                CheckOutcome::HandOver => {
                    tracing::info!(
                        signal = signo,
                        ?mode,
                        "restarting: handing connections over"
                    );
                    Some((Stopped::Signal(signo), Some(mode)))
                }
                CheckOutcome::ServeOn(why) => {
                    tracing::error!("not restarting on SIGUSR2: {why}; still serving");
                    None
                }
                CheckOutcome::ShutDown(why) => {
                    tracing::error!("shutting down without hand-over: {why}");
                    Some((Stopped::Signal(signo), None))
                }
            },
            SignalAction::IgnoreRestart => {
                tracing::warn!("SIGUSR2 ignored: restart_handover is off");
                None
            }
            SignalAction::Shutdown => {
                tracing::info!(signal = signo, "shutting down on signal");
                Some((Stopped::Signal(signo), None))
            }
        }
    }

    /// Accepts from a ready listener until its backlog is empty or it pauses.
    fn accept_from(&mut self, l: &Listener) {
        use nix::errno::Errno;
        use nix::sys::socket::SockFlag;
        while !listener_paused(
            self.shared,
            l.kind,
            self.parked.len(),
            self.admission.admitted_any,
        ) {
            match nix::sys::socket::accept4(
                l.fd.as_raw_fd(),
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            ) {
                // SAFETY: accept4 returned a fresh descriptor.
                Ok(raw) => self.take_client(unsafe { OwnedFd::from_raw_fd(raw) }, l.kind),
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => break,
                Err(e @ (Errno::EMFILE | Errno::ENFILE)) => {
                    // Out of descriptors: pause accepting instead of spinning on the backlog.
                    tracing::warn!("accept failed: {e}; pausing accepts for 100 ms");
                    self.accept_backoff = Some(Instant::now() + Duration::from_millis(100));
                    break;
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    break;
                }
            }
        }
    }

    /// A client just accepted: admitted, parked, or dropped when its credentials cannot be
    /// read.
    fn take_client(&mut self, fd: OwnedFd, kind: ListenerKind) {
        let shared = self.shared;
        let Some(identity) = client_identity(kind, &fd, &mut self.names) else {
            shared.registry.rejected(Rejected::Credentials, 1);
            return;
        };
        let anonymous = starts_anonymous(shared, kind, &identity);
        let checked = self.admission.admitted_any;
        if must_park(shared, kind, anonymous, !self.parked.is_empty(), checked) {
            tracing::debug!(
                listener = ?kind,
                uid = identity.unix.as_ref().map(|u| u.uid),
                "client limit reached: the client waits"
            );
            self.parked.push_back(Parked {
                fd,
                kind,
                identity,
                since: Instant::now(),
            });
            return;
        }
        self.admission.admit(fd, kind, identity);
    }
}
