//! The signals the acceptor reads and what each means.

use std::io;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::handover::HandOffMode;

/// What a signal asks of the acceptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SignalAction {
    /// SIGHUP: re-read the configuration.
    Reload,
    /// Hand the connections over (after the check that the next binary can take them).
    HandOff(HandOffMode),
    /// SIGUSR2 while `restart_handover` is off.
    IgnoreRestart,
    Shutdown,
}

/// What a signal means (`fd_store`: see `fd_store_available`).
pub(super) fn signal_action(signo: i32, handover: bool, fd_store: bool) -> SignalAction {
    if signo == libc::SIGHUP {
        SignalAction::Reload
    } else if let Some(mode) = handoff_for(signo, handover, fd_store) {
        SignalAction::HandOff(mode)
    } else if signo == libc::SIGUSR2 {
        SignalAction::IgnoreRestart
    } else {
        SignalAction::Shutdown
    }
}

/// Whether a signal hands the connections over, and how: SIGUSR2 always (when hand-over is
/// on), SIGTERM only under systemd with an fd store (`fd_store`: see `fd_store_available`),
/// which keeps them across a restart.
fn handoff_for(signo: i32, enabled: bool, fd_store: bool) -> Option<HandOffMode> {
    if !enabled {
        return None;
    }
    match signo {
        libc::SIGUSR2 => Some(HandOffMode::Exec),
        libc::SIGTERM if fd_store => Some(HandOffMode::FdStore),
        _ => None,
    }
}

/// Whether systemd keeps an fd store for us: `$NOTIFY_SOCKET` and `$FDSTORE`, its size
/// (systemd sets it from v254, the shipped unit for older ones).
pub(super) fn fd_store_available() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some() && fd_store_size() > 0
}

fn fd_store_size() -> u32 {
    std::env::var("FDSTORE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What the hand-over check's answer leaves the acceptor to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum CheckOutcome {
    HandOver,
    /// A failed SIGUSR2 restart: this process goes on as if nothing happened.
    ServeOn(String),
    /// A failed SIGTERM hand-over still stops: the service is stopping either way.
    ShutDown(String),
}

pub(super) fn check_outcome(mode: HandOffMode, check: Result<(), String>) -> CheckOutcome {
    match check {
        Ok(()) => CheckOutcome::HandOver,
        Err(why) if mode == HandOffMode::Exec => CheckOutcome::ServeOn(why),
        Err(why) => CheckOutcome::ShutDown(why),
    }
}

/// Signals the acceptor handles; blocked in every thread so only the signalfd sees them.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// The signalfd the acceptor reads, after blocking its signals in this thread (the threads
/// it starts inherit the mask).
pub(super) fn signal_fd() -> io::Result<SignalFd> {
    let signals = handled_signals();
    signals.thread_block().map_err(io::Error::from)?;
    SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(io::Error::from)
}
