//! The pre-open phase as a sans-IO state machine: client frames and daemon frames in, actions
//! out. See `conn/LIFECYCLE.md` for where it sits in a connection's life.
//!
//! Before CONNECT_OPEN the proxy answers the client itself the way virtproxyd does
//! (libvirt-rpc.md §3.4). On CONNECT_OPEN it connects to the driver daemon, performs the
//! downstream handshake (AUTH_LIST, AUTH_POLKIT if asked, SUPPORTS_FEATURE(10) if the client
//! asked for keepalive, the client's CONNECT_OPEN, CONNECT_SET_IDENTITY), consumes every reply
//! it caused, and only then releases the open reply and hands the connection to the relay
//! (pitfalls 1–3).

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Auth;
use crate::identity::Identity;
use crate::listen::ListenerKind;
use crate::polkit;
use crate::proto::msg::{self, err_code, err_domain, OpenArgs, RemoteError};
use crate::proto::{
    auth_type, feature, keepalive_proc, program, remote_proc, Header, MsgStatus, MsgType,
};
use crate::route::{RouteTable, Target};
use crate::sasl;

/// Something the I/O layer must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Queue bytes to the client.
    ToClient(Vec<u8>),
    /// Queue bytes to the daemon.
    ToDaemon(Vec<u8>),
    /// Connect to this daemon socket, then call `on_connected` or `on_connect_failed`.
    Connect(PathBuf),
    /// The client's open goes over the early connection: its downstream deadline starts now.
    UseEarly,
    /// Drop the downstream connection (the open failed); the client stays in pre-open.
    Disconnect,
    /// Handshake complete: relay from now on.
    StartRelay,
    /// Close the client once queued bytes are flushed.
    Close(String),
    /// Ask polkitd; the answer comes back through `on_polkit_answer`.
    AskPolkit(polkit::Query),
    /// The client's authentication is complete (it no longer counts as anonymous); its
    /// identity may have grown (the SASL user name).
    Authenticated,
    /// An authentication attempt by a client that still has to authenticate was refused
    /// (counted under the listener's method; the refusal itself follows as `ToClient`).
    AuthRefused,
    /// Run a Cyrus call on the SASL threads with the connection's session (moved there and
    /// back); the answer comes back through `on_sasl_answer`.
    Sasl(sasl::Op),
    /// The connection's SASL session is over: drop it.
    SaslEnd,
    /// SASL completed with a security layer (negotiated SSF > 0): every byte after the
    /// completing reply, queued just before this action, goes through the session's
    /// encode/decode (`relay::layer::SecurityLayer`); the session stays on the connection.
    SecurityLayer,
}

/// Highest procedure number known per program in libvirt 9.0.0 (appendix A).
fn proc_known(prog: u32, proc_: i32) -> bool {
    let max = match prog {
        program::REMOTE => 443,
        program::QEMU => 7,
        program::LXC => 1,
        _ => 0,
    };
    (1..=max).contains(&proc_)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Connecting,
    AuthList,
    AuthPolkit,
    Feature,
    Open,
    Identity,
}

#[derive(Debug)]
struct Pending {
    open_header: Header,
    target: Target,
    step: Step,
    /// Serial of the call we are waiting on downstream.
    serial: u32,
    open_reply: Option<Vec<u8>>,
    /// The downstream connection is an early one, not replaced yet: if it turns out to be
    /// gone (the daemon closed it while idle, or restarted), one fresh connect is tried.
    on_early: bool,
}

/// A downstream connection made before the client named its URI, on the guess that it opens
/// the same daemon as the listener's last client did: its connect and AUTH_LIST (the slow part
/// of a daemon's accept) overlap the client's own AUTH_LIST and authentication.
#[derive(Debug)]
struct Early {
    target: Target,
    serial: u32,
    /// The daemon's AUTH_LIST answer, once it came.
    auth_types: Option<Vec<i32>>,
}

/// Serial of the AUTH_LIST an early connection starts with (sent by the accept thread).
const EARLY_SERIAL: u32 = 0;

/// The first (and, until the client's open, only) call on an early connection.
pub fn early_auth_list() -> Vec<u8> {
    msg::call(program::REMOTE, remote_proc::AUTH_LIST, EARLY_SERIAL, &[])
}

/// Phase of the pre-open machine.
#[derive(Debug)]
enum Phase {
    PreOpen,
    /// AUTH_POLKIT asked polkitd; the header is the call to answer.
    Authorizing(Header),
    /// A SASL call is on the SASL threads; the header is the call to answer.
    Sasl(Header),
    Downstream(Box<Pending>),
    /// Opened: the relay has the connection.
    Done(Target),
}

/// What a SASL listener's clients are authenticated with.
#[derive(Debug, Clone)]
pub struct SaslParams {
    pub setup: sasl::Setup,
    /// `sasl_allowed_username_list`: `None` = everyone, empty = no one.
    pub allowed: Option<Arc<[String]>>,
}

/// Pre-open state of one client connection.
#[derive(Debug)]
pub struct Handshake {
    listener: ListenerKind,
    /// The listener's auth; `authenticated` says whether it is satisfied.
    auth: Auth,
    authenticated: bool,
    keepalive_asked: bool,
    identity: Identity,
    phase: Phase,
    next_serial: u32,
    sasl: Option<SaslParams>,
    /// A SASL session exists (after a successful AUTH_SASL_INIT, until it ends).
    sasl_session: bool,
    early: Option<Early>,
    /// Lines logged for this client's misbehaviour, and those suppressed past the budget.
    log_lines: u32,
    log_suppressed: u32,
}

/// Lines a client's own misbehaviour may put in the log; past them the lines are only counted
/// (see `Handshake::client_error`), so a peer repeating a refused call at line rate cannot
/// flood the log (libvirt writes one line per call).
pub const CLIENT_LOG_LINES: u32 = 5;

/// Every pre-open call the proxy refuses is logged with the reason the client is given.
fn refused(h: &Header, e: &RemoteError) {
    tracing::debug!(
        prog = format_args!("{:#x}", h.prog),
        proc_ = h.proc_,
        serial = h.serial,
        code = e.code,
        domain = e.domain,
        "pre-open call refused: {}",
        e.message
    );
}

fn rpc_error(detail: impl Into<String>) -> RemoteError {
    RemoteError::new(err_code::RPC, err_domain::RPC, detail)
}

impl Handshake {
    pub fn new(listener: ListenerKind, identity: Identity) -> Self {
        Self {
            listener,
            auth: Auth::None,
            authenticated: true,
            keepalive_asked: false,
            identity,
            phase: Phase::PreOpen,
            next_serial: 0,
            sasl: None,
            sasl_session: false,
            early: None,
            log_lines: 0,
            log_suppressed: 0,
        }
    }

    /// How SASL runs for this client (listeners with `auth_* = "sasl"`).
    pub fn with_sasl(mut self, params: SaslParams) -> Self {
        self.sasl = Some(params);
        self
    }

    /// Logs a line about the client's own misbehaviour, within `CLIENT_LOG_LINES` per client;
    /// the last one allowed says that the rest are suppressed.
    fn client_error(&mut self, warn: bool, what: std::fmt::Arguments<'_>) {
        if self.log_lines >= CLIENT_LOG_LINES || !crate::logging::client_line_allowed() {
            self.log_suppressed += 1;
            return;
        }
        self.log_lines += 1;
        let more = if self.log_lines == CLIENT_LOG_LINES {
            " (further such lines about this client are suppressed)"
        } else {
            ""
        };
        if warn {
            tracing::warn!("{what}{more}");
        } else {
            tracing::error!("{what}{more}");
        }
    }

    /// Lines about this client's misbehaviour that were not logged.
    pub fn log_suppressed(&self) -> u32 {
        self.log_suppressed
    }

    /// Lines about this client's misbehaviour that were logged.
    pub fn log_lines(&self) -> u32 {
        self.log_lines
    }

    /// The client's identity as it goes downstream.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// AUTH_SASL_INIT: a session is made on the SASL threads, unless the client has none to
    /// make (not a SASL listener, authenticated already, or a session open).
    fn sasl_init(&mut self, h: &Header, out: &mut Vec<Action>) {
        match &self.sasl {
            Some(p) if self.auth == Auth::Sasl && !self.authenticated && !self.sasl_session => {
                out.push(Action::Sasl(sasl::Op::Init(p.setup.clone())));
                self.phase = Phase::Sasl(*h);
            }
            _ => {
                self.client_error(
                    false,
                    format_args!("client tried invalid SASL init request"),
                );
                self.sasl_refuse(h, out);
            }
        }
    }

    /// AUTH_SASL_START / AUTH_SASL_STEP with decoded arguments.
    fn sasl_exchange(&mut self, h: &Header, op: sasl::Op, out: &mut Vec<Action>) {
        if self.auth != Auth::Sasl || self.authenticated || !self.sasl_session {
            self.client_error(
                false,
                format_args!("client tried invalid SASL start request"),
            );
            return self.sasl_refuse(h, out);
        }
        out.push(Action::Sasl(op));
        self.phase = Phase::Sasl(*h);
    }

    /// libvirt's answer to any failed SASL call; a session in progress ends with it.
    fn sasl_refuse(&mut self, h: &Header, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.sasl_session) {
            out.push(Action::SaslEnd);
        }
        // Every refusal of a client that has to authenticate by SASL is a failed attempt
        // (Cyrus's, the ACL's, the SSF's, or calls out of order); one already through is not.
        if self.auth == Auth::Sasl && !self.authenticated {
            out.push(Action::AuthRefused);
        }
        let e = sasl::auth_failed();
        refused(h, &e);
        out.push(Action::ToClient(msg::error_reply(h, &e)));
    }

    /// The SASL threads answered the call in progress.
    pub fn on_sasl_answer(&mut self, outcome: sasl::Outcome, out: &mut Vec<Action>) {
        let Phase::Sasl(h) = self.phase else {
            return;
        };
        self.phase = Phase::PreOpen;
        let (complete, data, ssf, username) = match outcome {
            sasl::Outcome::Mechanisms(list) => {
                tracing::debug!("Available mechanisms for client: '{list}'");
                self.sasl_session = true;
                out.push(Action::ToClient(msg::ok_reply(&h, &sasl::init_ret(&list))));
                return;
            }
            sasl::Outcome::Failed(_) => {
                // The session is gone already (the SASL thread logged why).
                self.sasl_session = false;
                return self.sasl_refuse(&h, out);
            }
            sasl::Outcome::Exchange {
                complete,
                data,
                ssf,
                username,
            } => (complete, data, ssf, username),
        };
        let len = data.as_ref().map_or(0, Vec::len);
        if len > sasl::DATA_MAX {
            self.client_error(false, format_args!("sasl reply data too long {len}"));
            return self.sasl_refuse(&h, out);
        }
        let body = sasl::exchange_ret(complete, data.as_deref());
        if !complete {
            out.push(Action::ToClient(msg::ok_reply(&h, &body)));
            return;
        }
        let Some(p) = &self.sasl else {
            return self.sasl_refuse(&h, out);
        };
        match sasl::finish(
            p.setup.secure,
            ssf,
            username.as_deref(),
            p.allowed.as_deref(),
        ) {
            Err(why) => {
                self.client_error(false, format_args!("{why}"));
                self.sasl_refuse(&h, out)
            }
            Ok(user) => {
                tracing::info!(ssf, "SASL authentication succeeded for '{user}'");
                self.sasl_session = false;
                self.authenticated = true;
                self.identity.sasl_user_name = Some(user);
                out.push(Action::Authenticated);
                out.push(Action::ToClient(msg::ok_reply(&h, &body)));
                out.push(if ssf > 0 {
                    Action::SecurityLayer
                } else {
                    Action::SaslEnd
                });
            }
        }
    }

    /// The listener asks for `auth`; until it is satisfied only AUTH_* and keepalive pass.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self.authenticated = auth == Auth::None;
        self
    }

    /// Whether the client still has to authenticate (it counts as anonymous until then).
    pub fn auth_pending(&self) -> bool {
        !self.authenticated
    }

    /// polkitd answered the AUTH_POLKIT call in progress.
    pub fn on_polkit_answer(&mut self, result: Result<(), RemoteError>, out: &mut Vec<Action>) {
        let Phase::Authorizing(h) = self.phase else {
            return;
        };
        self.phase = Phase::PreOpen;
        match result {
            Ok(()) => {
                self.authenticated = true;
                out.push(Action::Authenticated);
                out.push(Action::ToClient(msg::ok_reply(&h, &msg::i32_body(1))));
            }
            Err(e) => {
                refused(&h, &e);
                out.push(Action::AuthRefused);
                out.push(Action::ToClient(msg::error_reply(&h, &e)));
            }
        }
    }

    /// AUTH_LIST: root skips polkit (so root keeps access when polkit is broken), as in
    /// libvirt; everyone else is told to use it.
    fn auth_list(&mut self, h: &Header, out: &mut Vec<Action>) {
        let root = self.identity.unix.as_ref().filter(|u| u.uid == 0);
        let offered = match (self.authenticated, self.auth, root) {
            (false, Auth::Polkit, Some(u)) => {
                tracing::info!(
                    "Bypass polkit auth for privileged client pid:{},uid:0",
                    u.pid
                );
                self.authenticated = true;
                out.push(Action::Authenticated);
                auth_type::NONE
            }
            (true, _, _) | (_, Auth::None, _) => auth_type::NONE,
            (false, Auth::Polkit, None) => auth_type::POLKIT,
            (false, Auth::Sasl, _) => auth_type::SASL,
        };
        out.push(Action::ToClient(msg::ok_reply(
            h,
            &msg::auth_list_body(&[offered]),
        )));
    }

    /// AUTH_POLKIT: only a polkit client still waiting for its answer gets a question asked;
    /// anything else fails the way libvirt fails it (no error of its own).
    fn auth_polkit(&mut self, h: &Header, out: &mut Vec<Action>) {
        let peer = self.identity.unix.as_ref();
        match peer {
            Some(u) if self.auth == Auth::Polkit && !self.authenticated => {
                if u.process_time == 0 {
                    let pid = u.pid;
                    self.client_error(
                        true,
                        format_args!(
                            "Failing polkit auth due to missing client (pid={pid}) start time"
                        ),
                    );
                } else {
                    let action = if self.listener == ListenerKind::UnixRo {
                        polkit::ACTION_MONITOR
                    } else {
                        polkit::ACTION_MANAGE
                    };
                    out.push(Action::AskPolkit(polkit::Query {
                        action,
                        pid: u.pid as u32,
                        start_time: u.process_time,
                        uid: u.uid,
                    }));
                    self.phase = Phase::Authorizing(*h);
                    return;
                }
            }
            _ if self.auth != Auth::Polkit || self.authenticated => {
                self.client_error(
                    false,
                    format_args!("client tried invalid PolicyKit init request"),
                );
            }
            _ => {}
        }
        // Refused without asking polkitd (no start time to ask with): still a failed attempt
        // for a client that has to authenticate.
        if self.auth == Auth::Polkit && !self.authenticated {
            out.push(Action::AuthRefused);
        }
        let e = polkit::unexplained_failure();
        refused(h, &e);
        out.push(Action::ToClient(msg::error_reply(h, &e)));
    }

    /// The client is only read before open; once the downstream handshake runs, the client is
    /// blocked on its open reply and is not read until the relay starts.
    pub fn wants_client_input(&self) -> bool {
        matches!(self.phase, Phase::PreOpen)
    }

    /// Whether a downstream connection is being set up (a deadline applies).
    pub fn in_downstream(&self) -> bool {
        matches!(self.phase, Phase::Downstream(_))
    }

    /// Whether frames from the daemon are expected (an open in progress, or an early
    /// connection's AUTH_LIST).
    pub fn wants_daemon_input(&self) -> bool {
        self.in_downstream() || self.has_early()
    }

    /// The client comes with a downstream connection to `target`, made before its
    /// CONNECT_OPEN, on which `early_auth_list()` was sent. Nothing else is sent on it (the
    /// AUTH_LIST only authenticates virtproxyd itself) until the client has authenticated
    /// and opened that same daemon; any other open drops it. False if it cannot be taken
    /// (the pre-open exchange has begun).
    pub fn with_early(&mut self, target: Target) -> bool {
        if !matches!(self.phase, Phase::PreOpen) || self.early.is_some() {
            return false;
        }
        self.early = Some(Early {
            target,
            serial: EARLY_SERIAL,
            auth_types: None,
        });
        self.next_serial = self.next_serial.max(EARLY_SERIAL + 1);
        true
    }

    /// The early connection failed, went quiet too long, or was lost before the client's
    /// open used it: forget it (an open connects afresh, reporting its own errors).
    pub fn on_early_dropped(&mut self, out: &mut Vec<Action>) {
        if self.early.take().is_some() {
            out.push(Action::Disconnect);
        }
    }

    /// Whether an early connection waits for the client's open (it is set only before the
    /// open and taken by it, so never during or after a downstream handshake).
    pub fn has_early(&self) -> bool {
        self.early.is_some()
    }

    /// A daemon frame on the early connection, before the client's open.
    fn on_early_frame(&mut self, h: &Header, body: &[u8], out: &mut Vec<Action>) {
        let Some(e) = &mut self.early else {
            return;
        };
        if h.prog == program::KEEPALIVE {
            if h.mtype == MsgType::Message && h.proc_ == keepalive_proc::PING {
                out.push(Action::ToDaemon(msg::pong()));
            }
            return;
        }
        let answer = (h.mtype == MsgType::Reply
            && h.prog == program::REMOTE
            && h.serial == e.serial
            && h.status == MsgStatus::Ok
            && e.auth_types.is_none())
        .then(|| msg::decode_auth_list(body).ok())
        .flatten();
        match answer {
            Some(types) => e.auth_types = Some(types),
            None if h.mtype == MsgType::Message => {}
            None => {
                tracing::debug!("early downstream connection dropped: unexpected daemon frame");
                self.on_early_dropped(out);
            }
        }
    }

    /// The daemon the client opened, once it is open.
    pub fn opened(&self) -> Option<&Target> {
        match &self.phase {
            Phase::Done(t) => Some(t),
            _ => None,
        }
    }

    /// The URI being opened, for logs.
    pub fn target(&self) -> Option<&Target> {
        match &self.phase {
            Phase::Downstream(p) => Some(&p.target),
            _ => None,
        }
    }

    /// Handles one complete client frame.
    pub fn on_client_frame(
        &mut self,
        h: &Header,
        body: &[u8],
        routes: &RouteTable,
        exists: &dyn Fn(&std::path::Path) -> bool,
        out: &mut Vec<Action>,
    ) {
        if !matches!(self.phase, Phase::PreOpen) {
            out.push(Action::Close(
                "client sent a frame while its open was in progress".into(),
            ));
            return;
        }
        if h.prog == program::KEEPALIVE {
            if h.mtype == MsgType::Message && h.proc_ == keepalive_proc::PING {
                out.push(Action::ToClient(msg::pong()));
            }
            return;
        }
        match h.mtype {
            MsgType::Call => {}
            MsgType::CallWithFds => {
                // Its carrier bytes would follow; nothing before open takes fds.
                out.push(Action::Close("fd passing before CONNECT_OPEN".into()));
                return;
            }
            // libvirt drops every other type from a client silently (§1.7).
            _ => return,
        }
        let reply_err = |out: &mut Vec<Action>, e: RemoteError| {
            refused(h, &e);
            out.push(Action::ToClient(msg::error_reply(h, &e)))
        };
        if !matches!(h.prog, program::REMOTE | program::QEMU | program::LXC) || h.vers != 1 {
            return reply_err(
                out,
                rpc_error(format!("Cannot find program {} version {}", h.prog, h.vers)),
            );
        }
        if !proc_known(h.prog, h.proc_) {
            return reply_err(out, rpc_error(format!("unknown procedure: {}", h.proc_)));
        }
        if h.status != MsgStatus::Ok {
            return reply_err(
                out,
                rpc_error(format!("Unexpected message status {}", h.status.to_wire())),
            );
        }
        // Before authentication only the auth calls pass (libvirt's needAuth), in every program.
        let auth_call = h.prog == program::REMOTE
            && (remote_proc::AUTH_LIST..=remote_proc::AUTH_POLKIT).contains(&h.proc_);
        if !self.authenticated && !auth_call {
            return reply_err(out, rpc_error("authentication required"));
        }
        if h.prog != program::REMOTE {
            return reply_err(out, RemoteError::not_open());
        }
        match h.proc_ {
            remote_proc::AUTH_LIST => self.auth_list(h, out),
            remote_proc::AUTH_POLKIT => self.auth_polkit(h, out),
            remote_proc::AUTH_SASL_INIT => self.sasl_init(h, out),
            remote_proc::AUTH_SASL_START => match sasl::decode_start(body) {
                Ok(args) => self.sasl_exchange(h, sasl::Op::Start(args), out),
                Err(_) => reply_err(out, rpc_error("Unable to decode message payload")),
            },
            remote_proc::AUTH_SASL_STEP => match sasl::decode_step(body) {
                Ok(data) => self.sasl_exchange(h, sasl::Op::Step(data), out),
                Err(_) => reply_err(out, rpc_error("Unable to decode message payload")),
            },
            remote_proc::CONNECT_SUPPORTS_FEATURE => match msg::decode_i32(body) {
                Ok(feature::PROGRAM_KEEPALIVE) => {
                    self.keepalive_asked = true;
                    out.push(Action::ToClient(msg::ok_reply(h, &msg::i32_body(1))));
                }
                Ok(_) => reply_err(out, RemoteError::not_open()),
                Err(_) => reply_err(out, rpc_error("Unable to decode message payload")),
            },
            remote_proc::CONNECT_CLOSE => {
                out.push(Action::ToClient(msg::ok_reply(h, &[])));
                out.push(Action::Close(
                    "client closed before opening a connection".into(),
                ));
            }
            remote_proc::CONNECT_OPEN => self.start_open(h, body, routes, exists, out),
            _ => reply_err(out, RemoteError::not_open()),
        }
    }

    fn start_open(
        &mut self,
        h: &Header,
        body: &[u8],
        routes: &RouteTable,
        exists: &dyn Fn(&std::path::Path) -> bool,
        out: &mut Vec<Action>,
    ) {
        let args = match OpenArgs::decode(body) {
            Ok(a) => a,
            Err(why) => {
                let e = rpc_error("Unable to decode message payload");
                tracing::debug!(serial = h.serial, "CONNECT_OPEN arguments: {why}");
                refused(h, &e);
                out.push(Action::ToClient(msg::error_reply(h, &e)));
                return;
            }
        };
        // Only the read-only bit means anything to the daemon (§3.2); it is forced on the ro
        // listener, where the daemon socket is the -ro one as well (trap 5).
        let readonly = self.listener == ListenerKind::UnixRo || args.flags & 1 != 0;
        match routes.resolve(args.name.as_deref(), readonly, exists) {
            Err(e) => {
                let e = e.to_remote();
                refused(h, &e);
                out.push(Action::ToClient(msg::error_reply(h, &e)))
            }
            Ok(target) => {
                let early = self.early.take();
                let had_early = early.is_some();
                let reuse = early.filter(|e| e.target.socket == target.socket);
                let (step, serial) = match &reuse {
                    Some(e) => {
                        out.push(Action::UseEarly);
                        (Step::AuthList, e.serial)
                    }
                    None => {
                        if had_early {
                            out.push(Action::Disconnect);
                        }
                        out.push(Action::Connect(target.socket.clone()));
                        (Step::Connecting, 0)
                    }
                };
                let on_early = reuse.is_some();
                self.phase = Phase::Downstream(Box::new(Pending {
                    open_header: *h,
                    target,
                    step,
                    serial,
                    open_reply: None,
                    on_early,
                }));
                // An answer the early connection already has is this open's own.
                if let Some(types) = reuse.and_then(|e| e.auth_types) {
                    self.on_auth_list(Ok(types), out);
                }
            }
        }
    }

    fn call(&mut self, proc_: i32, body: &[u8]) -> (u32, Vec<u8>) {
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        (serial, msg::call(program::REMOTE, proc_, serial, body))
    }

    /// The downstream socket is connected.
    pub fn on_connected(&mut self, out: &mut Vec<Action>) {
        let (serial, frame) = self.call(remote_proc::AUTH_LIST, &[]);
        if let Phase::Downstream(p) = &mut self.phase {
            p.step = Step::AuthList;
            p.serial = serial;
            out.push(Action::ToDaemon(frame));
        }
    }

    /// Connecting downstream failed with `errno`.
    pub fn on_connect_failed(&mut self, errno: i32, out: &mut Vec<Action>) {
        if let Phase::Downstream(p) = &self.phase {
            let e = RemoteError::connect_failed(&p.target.socket, errno);
            self.fail(e, out);
        }
    }

    /// The downstream handshake did not finish in time, or the daemon went away.
    pub fn on_daemon_lost(&mut self, why: &str, out: &mut Vec<Action>) {
        if self.has_early() {
            tracing::debug!("early downstream connection dropped: daemon {why}");
            return self.on_early_dropped(out);
        }
        if let Phase::Downstream(p) = &mut self.phase {
            if std::mem::take(&mut p.on_early) {
                // The client has seen nothing of it: connect afresh, as without the guess.
                tracing::debug!("early downstream connection {why} at its use: reconnecting");
                p.step = Step::Connecting;
                p.serial = 0;
                p.open_reply = None;
                out.push(Action::Disconnect);
                out.push(Action::Connect(p.target.socket.clone()));
                return;
            }
            let e = RemoteError::new(
                err_code::INTERNAL_ERROR,
                err_domain::RPC,
                format!("driver daemon at '{}' {}", p.target.socket.display(), why),
            );
            self.fail(e, out);
        }
    }

    /// Fails the pending open: error to the client as the open's reply, daemon dropped.
    fn fail(&mut self, e: RemoteError, out: &mut Vec<Action>) {
        if let Phase::Downstream(p) = std::mem::replace(&mut self.phase, Phase::PreOpen) {
            out.push(Action::Disconnect);
            out.push(Action::ToClient(msg::error_reply(&p.open_header, &e)));
        }
    }

    /// Handles one complete daemon frame during the downstream handshake.
    pub fn on_daemon_frame(&mut self, h: &Header, body: &[u8], out: &mut Vec<Action>) {
        if self.has_early() {
            return self.on_early_frame(h, body, out);
        }
        let Phase::Downstream(p) = &mut self.phase else {
            return;
        };
        if p.step == Step::Connecting {
            // Nothing can come from a connection not made yet: this is what an abandoned
            // (early) connection sent before its disconnect took effect.
            return;
        }
        if h.prog == program::KEEPALIVE {
            if h.mtype == MsgType::Message && h.proc_ == keepalive_proc::PING {
                out.push(Action::ToDaemon(msg::pong()));
            }
            return;
        }
        if h.mtype != MsgType::Reply || h.serial != p.serial || h.prog != program::REMOTE {
            // Events cannot be registered yet; anything else is a daemon we do not understand.
            if h.mtype == MsgType::Message {
                return;
            }
            return self.fail(
                rpc_error("unexpected message from the driver daemon during open"),
                out,
            );
        }
        if h.status == MsgStatus::Error && p.step == Step::Open {
            // The daemon's own refusal of the client's open goes back verbatim.
            let frame = msg::build_frame(h, body);
            if let Phase::Downstream(_) = std::mem::replace(&mut self.phase, Phase::PreOpen) {
                out.push(Action::Disconnect);
                out.push(Action::ToClient(frame));
            }
            return;
        }
        if h.status != MsgStatus::Ok {
            let e = RemoteError::decode(&mut crate::proto::xdr::Decoder::new(body))
                .unwrap_or_else(|_| rpc_error("driver daemon sent an undecodable error"));
            return self.fail(e, out);
        }
        match p.step {
            Step::Connecting => {}
            Step::AuthList => self.on_auth_list(msg::decode_auth_list(body).map_err(drop), out),
            Step::AuthPolkit => match msg::decode_i32(body) {
                Ok(1) => self.after_auth(out),
                _ => self.fail(
                    RemoteError::new(
                        err_code::AUTH_FAILED,
                        err_domain::RPC,
                        "polkit authentication of virtproxyd failed",
                    ),
                    out,
                ),
            },
            Step::Feature => self.send_open(out),
            Step::Open => {
                p.open_reply = Some(msg::build_frame(h, body));
                let params = self.identity.params();
                let (serial, frame) = self.call(
                    remote_proc::CONNECT_SET_IDENTITY,
                    &msg::set_identity_body(&params),
                );
                if let Phase::Downstream(p) = &mut self.phase {
                    p.step = Step::Identity;
                    p.serial = serial;
                }
                out.push(Action::ToDaemon(frame));
            }
            Step::Identity => {
                let phase = std::mem::replace(&mut self.phase, Phase::PreOpen);
                if let Phase::Downstream(p) = phase {
                    if let Some(reply) = p.open_reply {
                        out.push(Action::ToClient(reply));
                    }
                    out.push(Action::StartRelay);
                    self.phase = Phase::Done(p.target);
                }
            }
        }
    }

    /// The daemon's AUTH_LIST answer: go on to the open, through AUTH_POLKIT if asked.
    fn on_auth_list(&mut self, types: Result<Vec<i32>, ()>, out: &mut Vec<Action>) {
        match types {
            Ok(types) if types.is_empty() || types.contains(&auth_type::NONE) => {
                self.after_auth(out)
            }
            Ok(types) if types.contains(&auth_type::POLKIT) => {
                let (serial, frame) = self.call(remote_proc::AUTH_POLKIT, &[]);
                if let Phase::Downstream(p) = &mut self.phase {
                    p.step = Step::AuthPolkit;
                    p.serial = serial;
                }
                out.push(Action::ToDaemon(frame));
            }
            _ => self.fail(
                RemoteError::new(
                    err_code::AUTH_FAILED,
                    err_domain::RPC,
                    "the driver daemon requires SASL, which virtproxyd cannot perform downstream",
                ),
                out,
            ),
        }
    }

    fn after_auth(&mut self, out: &mut Vec<Action>) {
        if self.keepalive_asked {
            // Keepalive becomes end-to-end after hand-over (trap 9): the daemon must know the
            // client speaks it.
            let (serial, frame) = self.call(
                remote_proc::CONNECT_SUPPORTS_FEATURE,
                &msg::i32_body(feature::PROGRAM_KEEPALIVE),
            );
            if let Phase::Downstream(p) = &mut self.phase {
                p.step = Step::Feature;
                p.serial = serial;
            }
            out.push(Action::ToDaemon(frame));
        } else {
            self.send_open(out);
        }
    }

    fn send_open(&mut self, out: &mut Vec<Action>) {
        if let Phase::Downstream(p) = &mut self.phase {
            let args = OpenArgs {
                name: Some(p.target.uri.clone()),
                flags: u32::from(p.target.readonly),
            };
            // The client's own serial, so the daemon's reply is the one the client waits for.
            p.serial = p.open_header.serial;
            p.step = Step::Open;
            out.push(Action::ToDaemon(msg::call(
                program::REMOTE,
                remote_proc::CONNECT_OPEN,
                p.serial,
                &args.encode(),
            )));
        }
    }
}

#[cfg(test)]
mod tests;
