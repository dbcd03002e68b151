//! The acceptor's decisions without a socket: client limits and parked clients, what a
//! signal means, the idle timer, how long poll() waits.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::acceptor::{poll_timeout_ms, IdleClock, StatusLine};
use super::limits::{listener_paused, must_park, parked_step, ParkedStep, PARKED_MAX};
use super::signals::{check_outcome, signal_action, CheckOutcome, SignalAction};
use crate::config::Auth;
use crate::handover::HandOffMode;
use crate::listen::ListenerKind;
use crate::metrics::counters::Rejected;
use crate::shared::{test_shared, Shared};

/// A server with `clients` connected (`anonymous` of them unauthenticated) under these limits.
fn server(max_clients: usize, max_anonymous: usize, clients: usize, anonymous: usize) -> Shared {
    let shared = test_shared();
    shared.max_clients.store(max_clients, Ordering::Release);
    shared
        .max_anonymous_clients
        .store(max_anonymous, Ordering::Release);
    shared.clients.store(clients, Ordering::Release);
    shared.unauthenticated.store(anonymous, Ordering::Release);
    shared
}

/// The anonymous limit reached, max_clients not.
fn anonymous_full() -> Shared {
    server(10, 2, 2, 2)
}

#[test]
fn anonymous_limit_pauses_tls_but_not_local_or_plain_tcp() {
    let shared = anonymous_full();
    assert!(listener_paused(&shared, ListenerKind::Tls, 0, true));
    // Local listeners keep accepting: their anonymous clients park instead.
    assert!(!listener_paused(&shared, ListenerKind::UnixRw, 0, true));
    // TCP with auth none: its clients never count as anonymous.
    assert!(!listener_paused(&shared, ListenerKind::Tcp, 0, true));
    let room = server(10, 2, 1, 1);
    assert!(!listener_paused(&room, ListenerKind::Tls, 0, true));
}

#[test]
fn max_clients_pauses_every_listener() {
    let shared = server(3, 0, 3, 0);
    for kind in [ListenerKind::UnixRw, ListenerKind::Tcp, ListenerKind::Tls] {
        assert!(listener_paused(&shared, kind, 0, true), "{kind:?}");
    }
}

#[test]
fn max_clients_zero_lets_the_first_client_in_until_checked() {
    let shared = server(0, 0, 0, 0);
    assert!(!listener_paused(&shared, ListenerKind::UnixRw, 0, false));
    assert!(listener_paused(&shared, ListenerKind::UnixRw, 0, true));
    // Limits set at run time (SIGHUP, admin) count as checked.
    shared.limits_set.store(true, Ordering::Release);
    assert!(listener_paused(&shared, ListenerKind::UnixRw, 0, false));
}

#[test]
fn local_listeners_pause_when_the_parked_queue_is_full() {
    let shared = anonymous_full();
    assert!(!listener_paused(
        &shared,
        ListenerKind::UnixRw,
        PARKED_MAX - 1,
        true
    ));
    assert!(listener_paused(
        &shared,
        ListenerKind::UnixRw,
        PARKED_MAX,
        true
    ));
}

#[test]
fn anonymous_local_client_waits_at_the_anonymous_limit() {
    let shared = anonymous_full();
    assert!(must_park(&shared, ListenerKind::UnixRw, true, false, true));
    // Not anonymous (root on a polkit socket, an auth "none" socket): straight in.
    assert!(!must_park(
        &shared,
        ListenerKind::UnixRw,
        false,
        false,
        true
    ));
    assert!(!must_park(&shared, ListenerKind::UnixRw, false, true, true));
}

#[test]
fn anonymous_local_client_queues_behind_those_waiting() {
    // Room again, but others arrived first: arrival order holds.
    let shared = server(10, 2, 1, 1);
    assert!(must_park(&shared, ListenerKind::UnixRo, true, true, true));
    assert!(!must_park(&shared, ListenerKind::UnixRo, true, false, true));
}

#[test]
fn local_client_waits_at_max_clients_even_when_not_anonymous() {
    let shared = server(2, 0, 2, 0);
    assert!(must_park(&shared, ListenerKind::UnixRw, false, false, true));
}

#[test]
fn remote_clients_never_park() {
    let shared = anonymous_full();
    assert!(!must_park(&shared, ListenerKind::Tls, true, true, true));
    assert!(!must_park(&shared, ListenerKind::Tcp, true, true, true));
}

#[test]
fn parked_client_gets_in_when_an_anonymous_slot_frees() {
    let full = anonymous_full();
    assert_eq!(
        parked_step(&full, Duration::from_secs(1), true),
        ParkedStep::Wait
    );
    full.unauthenticated.store(1, Ordering::Release);
    assert_eq!(
        parked_step(&full, Duration::from_secs(1), true),
        ParkedStep::Admit
    );
}

#[test]
fn parked_client_past_the_deadline_is_charged_to_the_limit_keeping_it_out() {
    let deadline = test_shared().preopen_deadline;
    assert_eq!(
        parked_step(&anonymous_full(), deadline, true),
        ParkedStep::Drop(Rejected::MaxAnonymousClients)
    );
    assert_eq!(
        parked_step(&server(2, 2, 2, 2), deadline, true),
        ParkedStep::Drop(Rejected::MaxClients)
    );
    // Dropped even when a slot just freed: the deadline would close it once admitted.
    assert_eq!(
        parked_step(&server(10, 2, 0, 0), deadline, true),
        ParkedStep::Drop(Rejected::MaxAnonymousClients)
    );
}

#[test]
fn polkit_socket_lets_root_in_at_the_anonymous_limit() {
    let mut shared = anonymous_full();
    shared.auth.unix_rw = Auth::Polkit;
    let user = crate::identity::Identity {
        unix: Some(crate::identity::UnixPeer {
            uid: 1000,
            gid: 1000,
            pid: 1,
            user_name: None,
            group_name: None,
            process_time: 0,
        }),
        ..Default::default()
    };
    let mut root = user.clone();
    if let Some(u) = root.unix.as_mut() {
        u.uid = 0;
    }
    let kind = ListenerKind::UnixRw;
    let parks = |id| {
        let anonymous = super::limits::starts_anonymous(&shared, kind, id);
        must_park(&shared, kind, anonymous, false, true)
    };
    assert!(parks(&user));
    assert!(!parks(&root));
}

#[test]
fn signals_mean_what_libvirt_and_systemd_expect() {
    use libc::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR2};
    assert_eq!(signal_action(SIGHUP, true, true), SignalAction::Reload);
    assert_eq!(
        signal_action(SIGUSR2, true, false),
        SignalAction::HandOff(HandOffMode::Exec)
    );
    assert_eq!(
        signal_action(SIGUSR2, false, true),
        SignalAction::IgnoreRestart
    );
    // SIGTERM hands over only into an fd store, and only with hand-over on.
    assert_eq!(
        signal_action(SIGTERM, true, true),
        SignalAction::HandOff(HandOffMode::FdStore)
    );
    assert_eq!(signal_action(SIGTERM, true, false), SignalAction::Shutdown);
    assert_eq!(signal_action(SIGTERM, false, true), SignalAction::Shutdown);
    for signo in [SIGINT, SIGQUIT] {
        assert_eq!(signal_action(signo, true, true), SignalAction::Shutdown);
    }
}

#[test]
fn failed_check_serves_on_for_sigusr2_and_stops_for_sigterm() {
    assert_eq!(
        check_outcome(HandOffMode::Exec, Ok(())),
        CheckOutcome::HandOver
    );
    assert_eq!(
        check_outcome(HandOffMode::Exec, Err("bad".into())),
        CheckOutcome::ServeOn("bad".into())
    );
    assert_eq!(
        check_outcome(HandOffMode::FdStore, Err("bad".into())),
        CheckOutcome::ShutDown("bad".into())
    );
}

#[test]
fn idle_timeout_fires_after_the_limit_without_clients() {
    let t0 = Instant::now();
    let limit = Some(Duration::from_secs(30));
    let mut idle = IdleClock { since: Some(t0) };
    assert!(!idle.expired(false, limit, t0 + Duration::from_secs(29)));
    assert!(idle.expired(false, limit, t0 + Duration::from_secs(30)));
}

#[test]
fn activity_restarts_the_idle_period() {
    let t0 = Instant::now();
    let limit = Some(Duration::from_secs(30));
    let mut idle = IdleClock { since: Some(t0) };
    assert!(!idle.expired(true, limit, t0 + Duration::from_secs(20)));
    // Idle again from here: 30 s more.
    assert!(!idle.expired(false, limit, t0 + Duration::from_secs(25)));
    assert!(!idle.expired(false, limit, t0 + Duration::from_secs(54)));
    assert!(idle.expired(false, limit, t0 + Duration::from_secs(55)));
}

#[test]
fn no_idle_timeout_never_fires() {
    let t0 = Instant::now();
    let mut idle = IdleClock { since: Some(t0) };
    assert!(!idle.expired(false, None, t0 + Duration::from_secs(86_400)));
}

#[test]
fn poll_wakes_often_only_when_something_may_change() {
    assert_eq!(poll_timeout_ms(true, false, false), 1000);
    assert_eq!(poll_timeout_ms(false, false, false), 200);
    assert_eq!(poll_timeout_ms(true, true, false), 200);
    assert_eq!(poll_timeout_ms(true, false, true), 200);
}

#[test]
fn status_reports_a_changed_count_at_most_once_a_second() {
    let t0 = Instant::now();
    let mut status = StatusLine { sent: 0, at: t0 };
    assert!(!status.due(5, t0 + Duration::from_millis(500)));
    assert!(status.due(5, t0 + Duration::from_secs(1)));
    // Unchanged: nothing to say however long it has been.
    assert!(!status.due(5, t0 + Duration::from_secs(10)));
    assert!(!status.due(6, t0 + Duration::from_millis(1500)));
    assert!(status.due(6, t0 + Duration::from_secs(2)));
}
