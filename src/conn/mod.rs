//! One connection: its state (pre-open or relay), its sockets, and the functions that move
//! it: the userspace TLS shuttle step, the pre-open buffers and reads (`preopen`), and the
//! relay step that drives its two pumps. The worker (`worker/`) owns the connections and
//! their loop: the reactor, the inbox, deadlines, the runnable queue, pools, adopting and
//! closing. See `LIFECYCLE.md` beside this file.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use crate::listen::ListenerKind;
use crate::metrics::counters::WorkerCounters;
use crate::metrics::meter::ConnMeter;
use crate::proto::{program, remote_proc, Header, MsgType};
use crate::relay::owed::OWED_CAP;
use crate::relay::tracker::Verdict;
use crate::relay::{CopyDrive, CopyRelay, Drive, Owed, Pools, Pump, PumpError, SecurityLayer};
use crate::shared::{Shared, Unauthenticated};
use crate::sys::{self, FrameCutter};
use crate::tls::shuttle::{Flow, Shuttle};

pub(crate) mod preopen;
use preopen::{flush, PreOpen};

/// What the relay does with a client frame (also applied to bytes pipelined before hand-over).
pub(crate) fn client_frame_verdict(kind: ListenerKind, h: &Header) -> Verdict {
    let is_call = matches!(h.mtype, MsgType::Call | MsgType::CallWithFds);
    if h.prog == program::REMOTE && h.proc_ == remote_proc::CONNECT_OPEN && is_call {
        // libvirt 9.0.0 would tear the connection down on a second open (trap 5).
        Verdict::Refuse("client sent a second CONNECT_OPEN".into())
    } else if h.prog == program::REMOTE && h.proc_ == remote_proc::CONNECT_SET_IDENTITY && is_call {
        // Never relayed: the daemon would take the claimed identity for the client's own
        // (proto::set_identity). It takes no fds, and libvirt closes a client that sends some.
        if h.mtype == MsgType::Call {
            Verdict::Capture
        } else {
            Verdict::Refuse("CONNECT_SET_IDENTITY with fds".into())
        }
    } else if !kind.is_unix() && h.mtype == MsgType::CallWithFds {
        // libvirt closes IP clients that try to pass fds.
        Verdict::Refuse("fd passing is not possible over TCP".into())
    } else {
        Verdict::Forward
    }
}

// Relay is the long-lived state of nearly every connection, so it stays inline; the short
// pre-open state is boxed.
#[allow(clippy::large_enum_variant)]
pub(crate) enum State {
    Pre(Box<PreOpen>),
    Relay {
        c2d: Pump,
        d2c: Pump,
        daemon_shut: bool,
        /// Pre-open replies not yet written to the client (the open reply among them); they go
        /// out before anything the daemon→client pump moves.
        head: Vec<u8>,
        head_cutter: Option<FrameCutter>,
        /// The client's captured calls and the proxy's own replies to them, waiting for the
        /// daemon→client stream to reach a frame boundary; then they join `head`.
        owed: Owed,
    },
    /// A relay whose client bytes pass a SASL security layer: copied, not spliced
    /// (`relay::copy`).
    Layered(Box<CopyRelay>),
}

pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) gen: u32,
    pub(crate) kind: ListenerKind,
    /// Already on the runnable queue (one entry per connection at most).
    pub(crate) queued: bool,
    /// Its relayed sockets lack close-on-exec already (cleared when the relay started): a
    /// restart's `execve` then keeps them without a syscall each in the pause.
    pub(crate) inheritable: bool,
    /// The userspace TLS record layer (a TLS client without kTLS).
    pub(crate) tls: Option<Box<Shuttle>>,
    /// Whether the client / daemon socket may have data: set by readable events, cleared when
    /// a read finds nothing. Saves the EAGAIN read on the side that did not wake us.
    pub(crate) client_readable: bool,
    pub(crate) daemon_readable: bool,
    /// Whether the client / daemon socket's registration includes writability (see
    /// `Interest::ReadOnly`): a relaying connection watches it only while a write is blocked.
    pub(crate) client_write_watched: bool,
    pub(crate) daemon_write_watched: bool,
    /// The client / daemon socket reported its peer's close: from then on reads go on to
    /// EOF (a short read may hide it, and no new edge would report it).
    pub(crate) client_hup: bool,
    pub(crate) daemon_hup: bool,
    pub(crate) client: OwnedFd,
    pub(crate) daemon: Option<OwnedFd>,
    pub(crate) state: State,
    pub(crate) uri: Option<String>,
    /// The driver daemon socket the open went to.
    pub(crate) daemon_path: Option<std::path::PathBuf>,
    pub(crate) since: Instant,
    /// Held while the client counts against `max_anonymous_clients` (polkit pending);
    /// dropped on authentication or with the connection.
    pub(crate) unauthenticated: Option<Unauthenticated>,
    /// The client's SASL session while its exchange runs (absent while a SASL thread holds
    /// it); at `Action::SecurityLayer` it moves into the security layer (`install_layer`).
    pub(crate) sasl: Option<crate::sasl::cyrus::ServerSession>,
    /// Its metrics state, when metrics are on (`metrics::meter`).
    pub(crate) meter: Option<Box<ConnMeter>>,
}

impl Conn {
    /// Between frames in both directions with nothing buffered: closing loses nothing.
    pub(crate) fn at_rest(&self) -> bool {
        match &self.state {
            State::Pre(p) => !p.hs.in_downstream(),
            State::Relay {
                c2d,
                d2c,
                head,
                owed,
                ..
            } => head.is_empty() && owed.is_empty() && c2d.at_rest() && d2c.at_rest(),
            State::Layered(r) => r.at_rest(),
        }
    }

    /// Puts the client side under a SASL security layer (see `PreOpen::install_layer`): every
    /// client byte queued after those already queued is encoded, every byte read from now on
    /// decoded; at hand-over the connection takes the copy relay instead of splicing.
    pub(crate) fn install_layer(&mut self, layer: Box<dyn SecurityLayer>) -> Result<(), String> {
        if self.tls.is_some() {
            return Err("a SASL security layer on a TLS connection".into());
        }
        match &mut self.state {
            State::Pre(p) => p.install_layer(layer),
            _ => Err("a SASL security layer after the open".into()),
        }
    }

    /// The userspace TLS layer of a TLS client, if it has one (see `tls::shuttle`).
    pub(crate) fn drive_tls(&mut self) -> Result<bool, String> {
        match self.tls.as_mut() {
            None => Ok(true),
            Some(sh) => match sh.drive() {
                Flow::Open => Ok(true),
                Flow::Closed(why) => Err(format!("TLS: {why}")),
            },
        }
    }
}

pub(crate) enum Outcome {
    Keep,
    Yield,
    Close(String),
}

/// Which of a connection's sockets a reactor registration is for.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    /// The accepted socket (for a userspace TLS connection: its TCP socket, owned by the shuttle).
    Accepted = 0,
    Daemon = 1,
    /// Userspace TLS: the plaintext end the pre-open and relay read.
    LocalClient = 2,
    /// Userspace TLS: the shuttle's end of the socketpair.
    LocalShuttle = 3,
}

/// What a connection's deadline is for; each connection has at most one live deadline of each
/// kind, recorded in its `PreOpen::timers` (only pre-open connections have deadlines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TimerKind {
    /// The downstream handshake (connect included) must finish by then.
    Downstream = 0,
    /// Try the daemon's socket again (its backlog was full).
    ConnectRetry = 1,
    /// A TCP/TLS client must have completed its open by then.
    PreOpen = 2,
    /// An early downstream connection not used by then is dropped.
    Early = 3,
    /// A client past its free pre-open frames is read again then (see `worker::preopen`).
    Throttle = 4,
}

/// A pre-open connection's live deadline of each kind (`None`: not armed), indexed by
/// [`TimerKind`]. A field per kind and an exhaustive match, so that a new kind does not
/// compile until it has its place here (a hand-kept count indexed by `kind as usize` would
/// panic at run time instead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Deadlines {
    downstream: Option<Instant>,
    connect_retry: Option<Instant>,
    pre_open: Option<Instant>,
    early: Option<Instant>,
    throttle: Option<Instant>,
}

impl Deadlines {
    /// How many kinds there are, counted from the fields (all of one type, so no padding):
    /// the timer heap keeps at most this many live entries per connection.
    pub(crate) const KINDS: usize =
        std::mem::size_of::<Deadlines>() / std::mem::size_of::<Option<Instant>>();
}

impl std::ops::Index<TimerKind> for Deadlines {
    type Output = Option<Instant>;

    fn index(&self, kind: TimerKind) -> &Option<Instant> {
        match kind {
            TimerKind::Downstream => &self.downstream,
            TimerKind::ConnectRetry => &self.connect_retry,
            TimerKind::PreOpen => &self.pre_open,
            TimerKind::Early => &self.early,
            TimerKind::Throttle => &self.throttle,
        }
    }
}

impl std::ops::IndexMut<TimerKind> for Deadlines {
    fn index_mut(&mut self, kind: TimerKind) -> &mut Option<Instant> {
        match kind {
            TimerKind::Downstream => &mut self.downstream,
            TimerKind::ConnectRetry => &mut self.connect_retry,
            TimerKind::PreOpen => &mut self.pre_open,
            TimerKind::Early => &mut self.early,
            TimerKind::Throttle => &mut self.throttle,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TimerKey {
    pub(crate) slot: usize,
    pub(crate) gen: u32,
    pub(crate) kind: TimerKind,
}

pub(crate) fn token(slot: usize, gen: u32, side: Side) -> u64 {
    (u64::from(gen) << 32) | ((slot as u64) << 2) | side as u64
}

/// Moves the proxy's own replies into `head` once the daemon→client stream is between frames,
/// the only place they can join it. True when it moved some.
fn release_answers(answers: &mut Vec<u8>, head: &mut Vec<u8>, d2c: &Pump) -> bool {
    if answers.is_empty() || !d2c.at_rest() {
        return false;
    }
    head.append(answers);
    true
}

/// The proxy's reply to a client's own CONNECT_SET_IDENTITY (captured, never relayed).
pub(crate) fn answer_identity(conn_id: u64, shared: &Shared, frame: &[u8]) -> Vec<u8> {
    let Ok(h) = Header::check(frame) else {
        return Vec::new();
    };
    let answer = crate::proto::set_identity::answer(&h, &frame[Header::SIZE..]);
    tracing::debug!(
        conn = conn_id,
        accepted = answer.identity.is_some(),
        "client's own CONNECT_SET_IDENTITY answered by the proxy, not relayed"
    );
    if let Some(params) = answer.identity {
        // As libvirt's virtproxyd, client-info reports the identity the client set.
        shared.registry.set_claimed(conn_id, params);
    }
    answer.reply
}

/// A connection's meter and its worker's counters, when metrics are on.
pub(crate) fn metered<'a>(
    meter: &'a mut Option<Box<ConnMeter>>,
    counters: Option<&'a WorkerCounters>,
) -> Option<(&'a mut ConnMeter, &'a WorkerCounters)> {
    Some((meter.as_deref_mut()?, counters?))
}

/// The client-side verdict, with the frames it forwards counted.
pub(crate) fn counted_verdict(
    kind: ListenerKind,
    h: &Header,
    m: &mut Option<(&mut ConnMeter, &WorkerCounters)>,
) -> Verdict {
    let v = client_frame_verdict(kind, h);
    if let (Verdict::Forward, Some((m, c))) = (&v, m.as_mut()) {
        m.client_frame(c, h);
    }
    v
}

/// One step of a relay through a SASL security layer (`relay::copy`).
pub(crate) fn drive_layered(
    conn: &mut Conn,
    pools: &mut Pools,
    shared: &Shared,
    counters: Option<&WorkerCounters>,
) -> Outcome {
    let Conn {
        id,
        kind,
        client,
        daemon,
        state,
        client_readable,
        daemon_readable,
        meter,
        ..
    } = conn;
    let mut m = metered(meter, counters);
    let (id, kind) = (*id, *kind);
    let Some(daemon) = daemon.as_ref() else {
        return Outcome::Close("relay without a daemon socket".into());
    };
    let State::Layered(relay) = state else {
        return Outcome::Keep;
    };
    let mut scratch = pools.take_buf();
    // Both closures count through one meter: the relay calls them one at a time.
    let m = std::cell::RefCell::new(&mut m);
    let r = relay.drive_observed(
        client.as_fd(),
        daemon.as_fd(),
        &mut scratch,
        &mut |h| counted_verdict(kind, h, &mut m.borrow_mut()),
        &mut |frame| answer_identity(id, shared, frame),
        &mut |h| {
            if let Some((m, c)) = m.borrow_mut().as_mut() {
                m.daemon_frame(c, h);
            }
        },
        client_readable,
        daemon_readable,
    );
    pools.put_buf(scratch);
    match r {
        Ok(CopyDrive::Blocked) => Outcome::Keep,
        Ok(CopyDrive::Yield) => Outcome::Yield,
        Ok(CopyDrive::Finished) => Outcome::Close(if relay.client_closed() {
            "client closed".into()
        } else {
            "daemon closed the connection".into()
        }),
        Err(e) => Outcome::Close(e.to_string()),
    }
}

/// One step of an open connection's relay: client→daemon, the proxy's own answers, then
/// daemon→client.
pub(crate) fn drive_relay(
    conn: &mut Conn,
    pools: &mut Pools,
    shared: &Shared,
    counters: Option<&WorkerCounters>,
) -> Outcome {
    let Some(daemon) = conn.daemon.as_ref() else {
        return Outcome::Close("relay without a daemon socket".into());
    };
    let State::Relay {
        c2d,
        d2c,
        daemon_shut,
        head,
        head_cutter,
        owed,
    } = &mut conn.state
    else {
        return Outcome::Keep;
    };
    let (id, kind) = (conn.id, conn.kind);
    let mut m = metered(&mut conn.meter, counters);
    let answer = &mut |frame: &[u8]| answer_identity(id, shared, frame);
    if conn.client_hup {
        c2d.distrust_short_reads();
    }
    if conn.daemon_hup {
        d2c.distrust_short_reads();
    }
    // Frames captured before hand-over (pipelined behind the open) wait in the tracker.
    owed.push_captured(c2d.take_captured());
    owed.answer(head.len(), OWED_CAP, answer);
    // A client owed replies it does not read is not read either (`relay::owed`); its
    // readable flag is kept, so it is read again once it has caught up.
    let may_read = owed.may_read_client(head.len(), OWED_CAP);
    let mut client_readable = conn.client_readable && may_read;
    let mut upstream_failed = None;
    let fds_before = c2d.fds_passed;
    let up = c2d.drive(
        conn.client.as_fd(),
        daemon.as_fd(),
        pools,
        &mut |h| counted_verdict(kind, h, &mut m),
        &mut client_readable,
    );
    if let Some((_, c)) = &m {
        c.fds[0].add(c2d.fds_passed - fds_before);
    }
    let up = match up {
        // The daemon stopped reading (it is closing): still deliver what it already sent.
        Err(e @ PumpError::Write(_)) => {
            upstream_failed = Some(format!("daemon side: {e}"));
            Drive::Finished
        }
        Err(e) => return Outcome::Close(format!("client side: {e}")),
        Ok(d) => d,
    };
    if may_read {
        conn.client_readable = client_readable;
    }
    owed.push_captured(c2d.take_captured());
    owed.answer(head.len(), OWED_CAP, answer);
    if up == Drive::Finished && !*daemon_shut {
        // Half-close downstream; the daemon answers EOF by closing, which ends d2c.
        sys::shutdown_write(daemon.as_fd());
        *daemon_shut = true;
    }
    release_answers(&mut owed.answers, head, d2c);
    if !head.is_empty() {
        if let Err(e) = flush(&conn.client, head, head_cutter.as_mut()) {
            return Outcome::Close(format!("client write: {e}"));
        }
    }
    // Until the head is out, the daemon's bytes wait (the client's writability will wake
    // us: the flush above hit EAGAIN).
    let down = if !head.is_empty() {
        Drive::Blocked
    } else {
        let fds_before = d2c.fds_passed;
        let down = d2c.drive(
            daemon.as_fd(),
            conn.client.as_fd(),
            pools,
            &mut |h| {
                if let Some((m, c)) = m.as_mut() {
                    m.daemon_frame(c, h);
                }
                Verdict::Forward
            },
            &mut conn.daemon_readable,
        );
        if let Some((_, c)) = &m {
            c.fds[1].add(d2c.fds_passed - fds_before);
        }
        match down {
            Err(e) => return Outcome::Close(format!("daemon side: {e}")),
            Ok(d) => d,
        }
    };
    if head.is_empty() && release_answers(&mut owed.answers, head, d2c) {
        if let Err(e) = flush(&conn.client, head, head_cutter.as_mut()) {
            return Outcome::Close(format!("client write: {e}"));
        }
    }
    tracing::trace!(conn = conn.id, ?up, ?down, "relay driven");
    if let Some(why) = upstream_failed {
        return Outcome::Close(why);
    }
    if down == Drive::Finished {
        return Outcome::Close(if up == Drive::Finished {
            "client closed".into()
        } else {
            "daemon closed the connection".into()
        });
    }
    // The client caught up with what it was owed in this step: answer its waiting frames,
    // or read what it sent while it was not read, soon (no readiness report will come for
    // bytes already queued).
    let caught_up = owed.has_room(head.len(), OWED_CAP)
        && (!owed.all_answered() || (!may_read && conn.client_readable));
    if up == Drive::Yield || down == Drive::Yield || caught_up {
        Outcome::Yield
    } else {
        Outcome::Keep
    }
}
