//! The pre-open half of a worker: feeding the handshake machine from the client and daemon
//! sockets, carrying out its actions (connect downstream, polkit, hand over to the relay),
//! and the deadlines. The connection's pre-open state and its bounded reads and writes are in
//! `conn::preopen`.

use std::path::PathBuf;

use super::*;
use crate::conn::preopen::{flush, frame_at, read_some, retry_delay, ReadState, Retry};
use crate::handshake::Action;
use crate::metrics::meter::WorkerMeter;
use crate::proto::Header;
use crate::relay::CopyRelay;

impl Worker {
    /// Runs the pre-open exchange until it blocks, switches to relaying, or uses its budget.
    pub(super) fn drive_preopen(&mut self, slot: usize) -> Result<Pre, String> {
        let mut actions = Vec::new();
        let mut frames_left = PREOPEN_FRAMES_PER_DRIVE;
        let routes = self.shared.routes.load_full();
        let frame_max = match self.conns.get(slot).map(|c| c.kind) {
            Some(k) if self.shared.auth.of(k) == Auth::Sasl => PREOPEN_FRAME_MAX_SASL,
            _ => PREOPEN_FRAME_MAX,
        };
        loop {
            let mut progress = false;
            let conn = self.conns.get_mut(slot).ok_or("gone")?;
            let State::Pre(p) = &mut conn.state else {
                return Ok(Pre::Relay);
            };

            flush(&conn.client, &mut p.c_tx, p.cutter.as_mut())
                .map_err(|e| format!("client write: {e}"))?;
            if p.c_tx.is_empty() {
                if let Some(why) = p.closing.take() {
                    return Err(why);
                }
            }
            if let Some(d) = &conn.daemon {
                flush(d, &mut p.d_tx, None).map_err(|e| format!("daemon write: {e}"))?;
            }
            // Read the client only while the handshake wants input and our replies are not
            // piling up (a client that sends without reading must not grow c_tx): past the
            // cap a flush has hit EAGAIN, so writability will wake us.
            let throttled = p.timers[TimerKind::Throttle].is_some();
            if p.hs.wants_client_input()
                && p.closing.is_none()
                && p.c_tx.len() < PREOPEN_TX_CAP
                && !throttled
            {
                let trust_short = p.cutter.is_none() && !conn.client_hup;
                let read = p
                    .read_client(
                        &conn.client,
                        frame_max,
                        &mut conn.client_readable,
                        trust_short,
                    )
                    .map_err(|e| format!("client read: {e}"))?;
                progress |= read == ReadState::Data;
                let mut used = 0;
                while frames_left > 0 && p.hs.wants_client_input() && p.closing.is_none() {
                    match frame_at(&p.c_rx[used..], frame_max) {
                        Ok(Some(h)) => {
                            let end = used + h.len as usize;
                            p.hs.on_client_frame(
                                &h,
                                &p.c_rx[used + Header::SIZE..end],
                                &routes,
                                &|path: &Path| crate::route::driver_socket_exists(path),
                                &mut actions,
                            );
                            used = end;
                            frames_left -= 1;
                            p.client_frames = p.client_frames.saturating_add(1);
                            progress = true;
                            let wait = p.rate.as_ref().map(|r| r.charge(Instant::now()));
                            if let Some(wait) = wait.filter(|w| !w.is_zero()) {
                                // The source is over its pre-open rate: the rest wait in
                                // `c_rx` (bounded), the socket is not read meanwhile.
                                let at = Instant::now() + wait;
                                arm_timer(
                                    &mut self.timers,
                                    p,
                                    slot,
                                    conn.gen,
                                    TimerKind::Throttle,
                                    at,
                                );
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Err(format!("client sent a bad frame: {e}")),
                    }
                }
                p.c_rx.drain(..used);
                if read == ReadState::Eof && p.closing.is_none() {
                    // Answer what arrived before the EOF (a half-closed client still reads).
                    p.closing = Some("client closed before open".into());
                    progress = true;
                }
            }
            if let Some(d) = &conn.daemon {
                let trust_short = !conn.daemon_hup;
                match read_some(
                    d,
                    &mut p.d_rx,
                    PREOPEN_DAEMON_FRAME_MAX,
                    &mut conn.daemon_readable,
                    trust_short,
                ) {
                    Ok(ReadState::Eof) => {
                        p.hs.on_daemon_lost("closed the connection during open", &mut actions)
                    }
                    Ok(ReadState::Data) => progress = true,
                    Ok(_) => {}
                    Err(e) => p.hs.on_daemon_lost(&format!("failed: {e}"), &mut actions),
                }
                let mut used = 0;
                while p.hs.wants_daemon_input() {
                    match frame_at(&p.d_rx[used..], PREOPEN_DAEMON_FRAME_MAX) {
                        Ok(Some(h)) => {
                            let end = used + h.len as usize;
                            p.hs.on_daemon_frame(
                                &h,
                                &p.d_rx[used + Header::SIZE..end],
                                &mut actions,
                            );
                            used = end;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            p.hs.on_daemon_lost(&format!("sent a bad frame: {e}"), &mut actions)
                        }
                    }
                }
                p.d_rx.drain(..used.min(p.d_rx.len()));
            }
            if !actions.is_empty() {
                progress = true;
                self.apply(slot, &mut actions)?;
            }
            let conn = self.conns.get_mut(slot).ok_or("gone")?;
            if !matches!(conn.state, State::Pre(_)) {
                return Ok(Pre::Relay);
            }
            if frames_left == 0 {
                return Ok(Pre::Yield);
            }
            if !progress {
                return Ok(Pre::Keep);
            }
        }
    }

    /// Carries out the handshake's actions for the connection in `slot`, in order. An action
    /// the handshake answers at once (a connect, a missing polkit or SASL thread) puts that
    /// answer before the rest of the batch. Stops when the connection leaves pre-open.
    pub(super) fn apply(&mut self, slot: usize, actions: &mut Vec<Action>) -> Result<(), String> {
        let mut queue: VecDeque<Action> = actions.drain(..).collect();
        while let Some(action) = queue.pop_front() {
            let conn = self.conns.get_mut(slot).ok_or("gone")?;
            let State::Pre(p) = &mut conn.state else {
                return Ok(());
            };
            let next = match action {
                Action::ToClient(b) => p.queue_client(&b).map(|()| Vec::new())?,
                Action::ToDaemon(b) => {
                    p.d_tx.extend_from_slice(&b);
                    Vec::new()
                }
                Action::Close(why) => {
                    p.closing = Some(why);
                    Vec::new()
                }
                Action::AuthRefused => {
                    if let Some(m) = &self.meter {
                        m.auth(auth_label(self.shared.auth.of(conn.kind)), false);
                    }
                    Vec::new()
                }
                Action::SaslEnd => {
                    conn.sasl = None;
                    Vec::new()
                }
                Action::Authenticated => self.authenticated(slot),
                Action::Sasl(op) => self.ask_sasl(slot, op),
                Action::SecurityLayer => self.security_layer(slot)?,
                Action::AskPolkit(query) => self.ask_polkit(slot, query),
                Action::Connect(path) => self.connect_downstream(slot, path)?,
                Action::UseEarly => self.use_early(slot),
                Action::Disconnect => self.disconnect_downstream(slot),
                Action::StartRelay => self.start_relay(slot)?,
            };
            push_front_in_order(&mut queue, next);
        }
        Ok(())
    }

    /// No longer anonymous: stops counting against max_anonymous_clients. SASL adds the user
    /// name, which client-info shows from now on.
    fn authenticated(&mut self, slot: usize) -> Vec<Action> {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Vec::new();
        };
        let State::Pre(p) = &mut conn.state else {
            return Vec::new();
        };
        if let Some(m) = &self.meter {
            m.auth(auth_label(self.shared.auth.of(conn.kind)), true);
        }
        drop(conn.unauthenticated.take());
        if p.hs.identity().sasl_user_name.is_some() {
            self.shared
                .registry
                .set_identity(conn.id, p.hs.identity().clone());
        }
        Vec::new()
    }

    /// Sends a SASL step to the SASL threads with the connection's session; without them,
    /// the handshake's answer to the failure.
    fn ask_sasl(&mut self, slot: usize, op: crate::sasl::Op) -> Vec<Action> {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Vec::new();
        };
        let State::Pre(p) = &mut conn.state else {
            return Vec::new();
        };
        let req = crate::sasl::Request {
            worker: self.index,
            slot,
            gen: conn.gen,
            conn: conn.id,
            op,
            session: conn.sasl.take(),
        };
        let sent = match self.sasl.as_ref() {
            Some(l) => l.tx.send(req).map_err(|e| e.0.session),
            None => Err(req.session),
        };
        let mut out = Vec::new();
        if let Err(session) = sent {
            // No SASL thread: the call fails as a Cyrus failure would.
            conn.sasl = session;
            p.hs.on_sasl_answer(
                crate::sasl::Outcome::Failed("SASL is not running".into()),
                &mut out,
            );
        }
        out
    }

    /// The session leaves the connection for the layer that encodes and decodes every later
    /// client byte (pre-open buffers, then the copy relay).
    fn security_layer(&mut self, slot: usize) -> Result<Vec<Action>, String> {
        let conn = self.conns.get_mut(slot).ok_or("gone")?;
        let Some(session) = conn.sasl.take() else {
            return Err("SASL security layer without a session".into());
        };
        conn.install_layer(Box::new(session))?;
        tracing::debug!(conn = conn.id, "SASL security layer on");
        Ok(Vec::new())
    }

    /// Sends a polkit check to the polkit threads; without them, the handshake's answer to
    /// the failure.
    fn ask_polkit(&mut self, slot: usize, query: crate::polkit::Query) -> Vec<Action> {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Vec::new();
        };
        let State::Pre(p) = &mut conn.state else {
            return Vec::new();
        };
        let req = crate::polkit::Request {
            worker: self.index,
            slot,
            gen: conn.gen,
            conn: conn.id,
            query,
        };
        let sent = self.polkit.as_ref().map(|l| l.tx.send(req).is_ok());
        let mut out = Vec::new();
        if sent != Some(true) {
            // No polkit thread: fail the call as a D-Bus failure would.
            p.hs.on_polkit_answer(
                Err(crate::proto::msg::RemoteError::new(
                    crate::proto::msg::err_code::INTERNAL_ERROR,
                    crate::proto::msg::err_domain::DBUS,
                    "Unable to get system bus connection: polkit is not running in this virtproxyd",
                )),
                &mut out,
            );
        }
        out
    }

    /// Connects to the daemon at `path`: attached when it answers, retried shortly while its
    /// backlog is full, reported to the handshake when it cannot be reached.
    fn connect_downstream(&mut self, slot: usize, path: PathBuf) -> Result<Vec<Action>, String> {
        let conn = self.conns.get_mut(slot).ok_or("gone")?;
        let gen = conn.gen;
        let State::Pre(p) = &mut conn.state else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let first = p.connecting.is_none();
        WorkerMeter::downstream_started(conn.meter.as_deref_mut());
        if first {
            // The deadline covers the connect, its retries and the handshake (a failed
            // connect disconnects, which cancels it).
            let at = Instant::now() + DOWNSTREAM_DEADLINE;
            arm_timer(&mut self.timers, p, slot, gen, TimerKind::Downstream, at);
        }
        match crate::route::connect_nonblocking(&path) {
            Ok(sock) => {
                conn.uri = p.hs.target().map(|t| t.uri.clone());
                conn.daemon_path = Some(path.clone());
                p.connecting = None;
                p.timers[TimerKind::ConnectRetry] = None;
                p.hs.on_connected(&mut out);
                if let Some(m) = &self.meter {
                    m.daemon_connect(conn.meter.as_deref_mut(), conn.uri.as_deref(), true);
                }
                attach_daemon(&mut self.reactor, conn, slot, gen, sock)
                    .map_err(|e| e.to_string())?;
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                // The daemon's listen backlog is full: park (the client is blocked on its
                // open reply and is not read) and try again shortly, within the downstream
                // deadline.
                let now = Instant::now();
                let attempts = p.connecting.as_ref().map_or(0, |r| r.attempts);
                if first {
                    tracing::debug!(
                        conn = conn.id,
                        "{} is busy (backlog full); retrying",
                        path.display()
                    );
                }
                let at = now + retry_delay(attempts, conn.id);
                p.connecting = Some(Retry {
                    path,
                    attempts: attempts.saturating_add(1),
                });
                arm_timer(&mut self.timers, p, slot, gen, TimerKind::ConnectRetry, at);
            }
            Err(e) => {
                tracing::info!(conn = conn.id, "cannot reach {}: {e}", path.display());
                p.connecting = None;
                if let Some(m) = &self.meter {
                    let uri = p.hs.target().map(|t| t.uri.as_str());
                    m.daemon_connect(None, uri, false);
                }
                p.hs.on_connect_failed(e.raw_os_error().unwrap_or(libc::EIO), &mut out);
            }
        }
        Ok(out)
    }

    /// The open goes to the daemon connected as the client was accepted: it now counts as
    /// the downstream connection, under the downstream deadline.
    fn use_early(&mut self, slot: usize) -> Vec<Action> {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Vec::new();
        };
        let gen = conn.gen;
        let State::Pre(p) = &mut conn.state else {
            return Vec::new();
        };
        conn.uri = p.hs.target().map(|t| t.uri.clone());
        conn.daemon_path = p.hs.target().map(|t| t.socket.clone());
        if let Some(m) = &self.meter {
            WorkerMeter::downstream_started(conn.meter.as_deref_mut());
            m.daemon_connect(conn.meter.as_deref_mut(), conn.uri.as_deref(), true);
        }
        p.timers[TimerKind::Early] = None;
        let at = Instant::now() + DOWNSTREAM_DEADLINE;
        arm_timer(&mut self.timers, p, slot, gen, TimerKind::Downstream, at);
        Vec::new()
    }

    /// Drops the daemon connection and everything pending on it.
    fn disconnect_downstream(&mut self, slot: usize) -> Vec<Action> {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Vec::new();
        };
        let gen = conn.gen;
        let State::Pre(p) = &mut conn.state else {
            return Vec::new();
        };
        // Every timer of the downstream side; a remote client's own open deadline stays.
        for kind in [
            TimerKind::Downstream,
            TimerKind::ConnectRetry,
            TimerKind::Early,
        ] {
            p.timers[kind] = None;
        }
        p.connecting = None;
        p.d_rx.clear();
        p.d_tx.clear();
        if let Some(m) = &self.meter {
            m.daemon_dropped(conn.meter.as_deref_mut());
        }
        if let Some(d) = conn.daemon.take() {
            self.reactor
                .remove(d.as_raw_fd(), token(slot, gen, Side::Daemon));
        }
        conn.uri = None;
        Vec::new()
    }

    /// The open succeeded: the connection is handed to the splice relay (or, under a SASL
    /// security layer, the copy relay) with what both sides sent past the handshake.
    fn start_relay(&mut self, slot: usize) -> Result<Vec<Action>, String> {
        let conn = self.conns.get_mut(slot).ok_or("gone")?;
        let State::Pre(p) = &mut conn.state else {
            return Ok(Vec::new());
        };
        // As libvirt, the open's RO flag makes the client read-only for the admin interface.
        if let Some(t) = p.hs.opened() {
            self.shared
                .registry
                .set_opened_readonly(conn.id, t.readonly);
        }
        if let Some(m) = &self.meter {
            m.opened(conn.meter.as_deref_mut());
        }
        // Bytes the client pipelined behind its open must pass the relay's checks; if they
        // do not, the client still gets its open reply, then the close.
        let kind = conn.kind;
        let mut probe = Tracker::new(Direction::ToDaemon, usize::MAX);
        if let Err(e) = probe.consume(&p.c_rx, |h| client_frame_verdict(kind, h)) {
            p.closing = Some(format!("client side: {e}"));
            return Ok(Vec::new());
        }
        if p.layer.is_some() {
            self.start_layered(slot)?;
            return Ok(Vec::new());
        }
        let ktls_client = p.cutter.is_some();
        let State::Pre(p) = std::mem::replace(
            &mut conn.state,
            State::Relay {
                c2d: Pump::new(Direction::ToDaemon, &self.pools),
                d2c: Pump::new(Direction::ToClient, &self.pools),
                daemon_shut: false,
                head: Vec::new(),
                head_cutter: None,
                owed: Default::default(),
            },
        ) else {
            return Ok(Vec::new());
        };
        let State::Relay {
            c2d,
            d2c,
            head,
            head_cutter,
            ..
        } = &mut conn.state
        else {
            return Ok(Vec::new());
        };
        // Replies still queued for the client (the open reply last) go out first, as they
        // are; then what the daemon sent past the handshake, which starts at a frame boundary.
        *head = p.c_tx;
        *head_cutter = p.cutter;
        if ktls_client {
            d2c.cut_writes_at_frames();
            c2d.distrust_short_reads();
        }
        conn.client_readable = true;
        conn.daemon_readable = true;
        if let Some(d) = &conn.daemon {
            conn.inheritable = super::handover::inheritable(&conn.client, d);
        }
        // What the relay takes over is counted as if it had read it.
        let counters = self.meter.as_ref().map(|m| m.counters());
        let mut m = crate::conn::metered(&mut conn.meter, counters);
        d2c.preload(&p.d_rx, &mut self.pools, &mut |h| {
            if let Some((m, c)) = m.as_mut() {
                m.daemon_frame(c, h);
            }
            Verdict::Forward
        })
        .map_err(|e| e.to_string())?;
        c2d.preload(&p.c_rx, &mut self.pools, &mut |h| {
            crate::conn::counted_verdict(kind, h, &mut m)
        })
        .map_err(|e| format!("client side: {e}"))?;
        tracing::info!(
            conn = conn.id,
            uri = conn.uri.as_deref().unwrap_or(""),
            daemon = %conn.daemon_path.as_deref().unwrap_or(Path::new("")).display(),
            "connection opened and handed to the relay"
        );
        if let Some(target) = p.hs.opened() {
            self.shared.last_open.note(conn.kind, target);
        }
        Ok(Vec::new())
    }

    /// Hand-over of a connection under a SASL security layer: the copy relay instead of the
    /// splice pumps. The pre-open replies (already encoded) go out first, then what the daemon
    /// sent past the handshake; what the client pipelined (already decoded) passes the relay's
    /// checks like any later frame.
    fn start_layered(&mut self, slot: usize) -> Result<(), String> {
        let shared = self.shared.clone();
        let conn = self.conns.get_mut(slot).ok_or("gone")?;
        let State::Pre(p) = &mut conn.state else {
            return Ok(());
        };
        let Some(layer) = p.layer.take() else {
            return Ok(());
        };
        let mut relay = Box::new(CopyRelay::new(layer));
        relay.queue_client_wire(&p.c_tx);
        // What the relay takes over is counted as if it had read it.
        let counters = self.meter.as_ref().map(|m| m.counters());
        let mut m = crate::conn::metered(&mut conn.meter, counters);
        relay
            .daemon_plain_observed(&p.d_rx, &mut |h| {
                if let Some((m, c)) = m.as_mut() {
                    m.daemon_frame(c, h);
                }
            })
            .map_err(|e| format!("daemon side: {e}"))?;
        let kind = conn.kind;
        relay
            .client_plain(&p.c_rx, &mut |h| {
                crate::conn::counted_verdict(kind, h, &mut m)
            })
            .map_err(|e| format!("client side: {e}"))?;
        let id = conn.id;
        relay
            .answer_captured(&mut |frame| crate::conn::answer_identity(id, &shared, frame))
            .map_err(|e| format!("client side: {e}"))?;
        conn.state = State::Layered(relay);
        conn.client_readable = true;
        conn.daemon_readable = true;
        tracing::info!(
            conn = conn.id,
            uri = conn.uri.as_deref().unwrap_or(""),
            daemon = %conn.daemon_path.as_deref().unwrap_or(Path::new("")).display(),
            "connection opened and handed to the relay (SASL security layer: copied)"
        );
        Ok(())
    }

    /// Runs the deadlines that are due. Cost per loop: one heap peek unless something is due.
    pub(super) fn fire_timers(&mut self) {
        let now = Instant::now();
        if !self.timers.next().is_some_and(|t| t <= now) {
            return;
        }
        let mut due = Vec::new();
        self.timers.pop_due(now, &mut due);
        for (at, key) in due {
            let Some(Conn {
                state: State::Pre(p),
                gen,
                id,
                kind,
                unauthenticated,
                ..
            }) = self.conns.get_mut(key.slot)
            else {
                continue;
            };
            if *gen != key.gen || p.timers[key.kind] != Some(at) {
                continue; // cancelled or re-armed: a stale entry
            }
            p.timers[key.kind] = None;
            let mut out = Vec::new();
            match key.kind {
                TimerKind::Downstream => {
                    if p.connecting.take().is_some() {
                        // Still no room in the daemon's backlog: the client gets EAGAIN's
                        // error, as a connect() that gave up would report it.
                        p.timers[TimerKind::ConnectRetry] = None;
                        p.hs.on_connect_failed(libc::EAGAIN, &mut out);
                    } else {
                        p.hs.on_daemon_lost("did not answer in time", &mut out);
                    }
                }
                TimerKind::ConnectRetry => match &p.connecting {
                    Some(r) => out.push(Action::Connect(r.path.clone())),
                    None => continue,
                },
                TimerKind::Early => {
                    tracing::debug!(conn = *id, "early downstream connection unused: dropped");
                    p.hs.on_early_dropped(&mut out);
                }
                // The client's next frame may be handled now: the service below does it.
                TimerKind::Throttle => {}
                TimerKind::PreOpen => {
                    // A local client that authenticated may take its time to open, as with
                    // libvirt; only one still counted as anonymous is stalling the others.
                    if kind.is_unix() && unauthenticated.is_none() {
                        continue;
                    }
                    // libvirt drops dead peers by keepalive, which only runs once a client
                    // asks for it; an anonymous peer gets a fixed time to open instead.
                    let what = if kind.is_unix() {
                        "not authenticated"
                    } else {
                        "no connection opened"
                    };
                    let why = format!(
                        "{what} within {:?} of connecting (pre-open deadline)",
                        self.shared.preopen_deadline
                    );
                    self.close(key.slot, &why);
                    continue;
                }
            }
            let r = self.apply(key.slot, &mut out);
            match r {
                Ok(()) => self.service(key.slot, key.gen),
                Err(why) => self.close(key.slot, &why),
            }
        }
        let Self { timers, conns, .. } = self;
        timers.compact(conns.len() * Deadlines::KINDS, |at, k| {
            matches!(conns.get(k.slot), Some(Conn { gen, state: State::Pre(p), .. })
                if *gen == k.gen && p.timers[k.kind] == Some(at))
        });
    }
}

/// The metrics label of a listener's auth method.
/// Puts `next` at the front of `queue`, keeping its order: what the handshake answers to an
/// action happens before the rest of the batch it came in.
fn push_front_in_order(queue: &mut VecDeque<Action>, next: Vec<Action>) {
    for a in next.into_iter().rev() {
        queue.push_front(a);
    }
}

fn auth_label(auth: Auth) -> &'static str {
    match auth {
        Auth::Polkit => "polkit",
        Auth::Sasl => "sasl",
        Auth::None => "none",
    }
}

fn timer_key(slot: usize, gen: u32, kind: TimerKind) -> TimerKey {
    TimerKey { slot, gen, kind }
}

/// Arms a pre-open deadline: the connection records it (to tell the live entry from stale
/// ones) and the worker's heap holds it.
pub(super) fn arm_timer(
    timers: &mut Timers<TimerKey>,
    p: &mut PreOpen,
    slot: usize,
    gen: u32,
    kind: TimerKind,
    at: Instant,
) {
    p.timers[kind] = Some(at);
    timers.arm(at, timer_key(slot, gen, kind));
}

/// Makes `sock` the connection's daemon socket, watched for reading only until a write to it
/// blocks (`watch_blocked_writes`).
pub(super) fn attach_daemon(
    reactor: &mut Reactor,
    conn: &mut Conn,
    slot: usize,
    gen: u32,
    sock: OwnedFd,
) -> io::Result<()> {
    reactor.add(
        sock.as_raw_fd(),
        token(slot, gen, Side::Daemon),
        Interest::ReadOnly,
    )?;
    conn.daemon = Some(sock);
    conn.daemon_write_watched = false;
    conn.daemon_readable = true;
    conn.daemon_hup = false;
    Ok(())
}
