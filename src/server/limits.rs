//! The client limits (`max_clients`, `max_anonymous_clients`): when listeners pause, which
//! local clients wait, and when a waiting one gets in.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::admission::Admission;
use crate::identity::Identity;
use crate::listen::ListenerKind;
use crate::metrics::counters::Rejected;
use crate::shared::{over_max_clients, Shared};

/// Whether a client counts against `max_anonymous_clients` when it arrives: TLS clients until
/// their handshake and certificate checks are done, and the clients of a listener with an
/// auth step (polkit, SASL) until it succeeds. Root on a polkit socket is authenticated by
/// AUTH_LIST alone (the handshake's bypass), so it never counts.
pub(super) fn starts_anonymous(shared: &Shared, kind: ListenerKind, identity: &Identity) -> bool {
    let auth = shared.auth.of(kind);
    let root = identity.unix.as_ref().is_some_and(|u| u.uid == 0);
    kind == ListenerKind::Tls
        || auth == crate::config::Auth::Sasl
        || (auth == crate::config::Auth::Polkit && !root)
}

/// Local clients accepted while `max_anonymous_clients` is reached wait here at most this many
/// (libvirt's default `max_queued_clients`); beyond it the local listeners pause too.
pub(super) const PARKED_MAX: usize = 1000;

/// A local client that would count as anonymous, accepted while the anonymous limit is
/// reached. libvirt leaves every client in the listen backlog then, root's included; here the
/// local listeners keep accepting so that clients who are not anonymous (root on a polkit
/// socket, clients of an auth "none" socket) get in, and the others wait in this queue in
/// arrival order, as they would have in the backlog, for at most the pre-open deadline.
pub(super) struct Parked {
    pub(super) fd: OwnedFd,
    pub(super) kind: ListenerKind,
    pub(super) identity: Identity,
    pub(super) since: Instant,
}

/// Whether `max_clients` keeps the listeners from accepting now (`checked`: see
/// `over_max_clients`).
fn at_max_clients(shared: &Shared, checked: bool) -> bool {
    over_max_clients(
        shared.clients.load(Ordering::Acquire),
        shared.max_clients.load(Ordering::Acquire),
        checked || shared.limits_set.load(Ordering::Acquire),
    )
}

/// Whether the client limits leave room: `max_clients` for anyone, `max_anonymous_clients`
/// for a client that would count as anonymous.
fn has_room(shared: &Shared, anonymous: bool, checked: bool) -> bool {
    let max_anonymous = shared.max_anonymous_clients.load(Ordering::Acquire);
    let anonymous_full =
        max_anonymous != 0 && shared.unauthenticated.load(Ordering::Acquire) >= max_anonymous;
    !(at_max_clients(shared, checked) || (anonymous && anonymous_full))
}

/// Whether a listener of `kind` stops accepting now, with `parked` clients waiting.
///
/// As libvirt's virNetServerCheckLimits: at max_clients no listener accepts. At
/// max_anonymous_clients libvirt pauses every listener too; here the remote listeners pause
/// (a TCP/TLS client counts as anonymous until it authenticates), and the local ones go on
/// accepting: a client that would count as anonymous waits in `parked`, and root on a polkit
/// socket gets in (see `Parked`). The kernel keeps new clients of a paused listener in its
/// backlog until a client leaves or authenticates. Called at each accept, not once per
/// wakeup: an admin call lowering the limits while poll() waits must hold for the client
/// that wakes it.
pub(super) fn listener_paused(
    shared: &Shared,
    kind: ListenerKind,
    parked: usize,
    checked: bool,
) -> bool {
    if kind.is_unix() {
        at_max_clients(shared, checked) || parked >= PARKED_MAX
    } else {
        let anonymous = starts_anonymous(shared, kind, &Identity::default());
        !has_room(shared, anonymous, checked)
    }
}

/// Whether a client just accepted on a `kind` listener waits in `parked` instead of being
/// admitted: a local client goes behind those already waiting, unless it is not anonymous
/// and there is room for it. Remote clients never park (their listeners pause instead).
pub(super) fn must_park(
    shared: &Shared,
    kind: ListenerKind,
    anonymous: bool,
    others_waiting: bool,
    checked: bool,
) -> bool {
    kind.is_unix()
        && (others_waiting || !has_room(shared, anonymous, checked))
        && (anonymous || !has_room(shared, false, checked))
}

/// What becomes of the first parked client.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ParkedStep {
    Admit,
    /// No room yet: it (and everyone behind it) waits on.
    Wait,
    /// It waited past the pre-open deadline (which would have closed it once admitted):
    /// dropped, charged to the limit that keeps it out now.
    Drop(Rejected),
}

pub(super) fn parked_step(shared: &Shared, waited: Duration, checked: bool) -> ParkedStep {
    if waited >= shared.preopen_deadline {
        // max_clients if that one is reached (it holds back everyone), else the anonymous
        // limit.
        return ParkedStep::Drop(if at_max_clients(shared, checked) {
            Rejected::MaxClients
        } else {
            Rejected::MaxAnonymousClients
        });
    }
    if has_room(shared, true, checked) {
        ParkedStep::Admit
    } else {
        ParkedStep::Wait
    }
}

/// Admits parked clients while the limits leave room, and drops those that waited past the
/// pre-open deadline.
pub(super) fn admit_parked(parked: &mut VecDeque<Parked>, admission: &mut Admission<'_>) {
    let shared = admission.shared;
    while let Some(front) = parked.front() {
        match parked_step(shared, front.since.elapsed(), admission.admitted_any) {
            ParkedStep::Wait => return,
            ParkedStep::Admit => {
                if let Some(p) = parked.pop_front() {
                    admission.admit(p.fd, p.kind, p.identity);
                }
            }
            ParkedStep::Drop(why) => {
                if let Some(p) = parked.pop_front() {
                    shared.registry.rejected(why, 1);
                    tracing::info!(
                        listener = ?p.kind,
                        uid = p.identity.unix.as_ref().map(|u| u.uid),
                        "dropping a local client that waited {:?} for an anonymous slot",
                        shared.preopen_deadline
                    );
                }
            }
        }
    }
}
