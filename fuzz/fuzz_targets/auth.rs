#![no_main]
//! The pre-open machine on a polkit or SASL listener, driven through its authentication steps:
//! client calls (AUTH_LIST, AUTH_POLKIT, AUTH_SASL_INIT/START/STEP, CONNECT_OPEN, others) from
//! the input, each question the machine asks (polkitd, the SASL threads) answered with an
//! outcome the input picks (stray answers too), then a downstream daemon that answers well or
//! badly. Invariants, from what `handshake.rs` promises:
//! - no panic;
//! - every frame to the client is well-formed (`Header::check` passes, its length word is its
//!   size), type REPLY (or a PONG to a PING), and answers the call that caused it: the same
//!   serial, and program and procedure too when the proxy wrote it (a daemon's reply to the
//!   open is passed on as the daemon wrote it);
//! - `Authenticated` comes at most once; before it `auth_pending()`, after it not;
//! - once authenticated no more auth is offered: AUTH_LIST answers NONE, no polkit question,
//!   no SASL call; before it, AUTH_LIST offers the listener's auth (root on polkit excepted);
//! - polkit is only asked on a polkit listener, SASL only run on a SASL one; INIT only
//!   without a session, START/STEP only with one; SaslEnd/SecurityLayer only end a session;
//! - a completed SASL exchange authenticates exactly when `sasl::finish` accepts it and its
//!   token fits; other exchange replies carry the token given;
//! - a stray answer (nothing asked) does nothing;
//! - while a question or the open is in progress the client is not read;
//! - nothing downstream before authentication: no `Connect`/`UseEarly`, only PONGs on an
//!   early connection; `StartRelay` only once authenticated.
use libfuzzer_sys::fuzz_target;
use virtproxyd::config::Auth;
use virtproxyd::handshake::{Action, Handshake, SaslParams};
use virtproxyd::identity::{Identity, UnixPeer};
use virtproxyd::listen::ListenerKind;
use virtproxyd::proto::msg::{self, OpenArgs, RemoteError};
use virtproxyd::proto::xdr::Decoder;
use virtproxyd::proto::{
    auth_type, keepalive_proc, program, remote_proc, Header, MsgStatus, MsgType,
};
use virtproxyd::route::{RouteTable, Target};
use virtproxyd::sasl;

#[path = "input.rs"]
mod input;
use input::Input;

/// Longest string drawn from the input.
const STRING_MAX: usize = 16;

/// What the machine waits for besides the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Polkit,
    /// A SASL call; whether it is INIT (answered with mechanisms) or START/STEP (an exchange).
    Sasl {
        init: bool,
    },
}

/// What the fuzzer knows of the machine, from the actions it emitted.
struct Model {
    auth: Auth,
    secure: bool,
    allowed: Option<Vec<String>>,
    authenticated: bool,
    /// A SASL session exists (a successful INIT, until SaslEnd, a failure or completion).
    session: bool,
    /// The question in flight and the call it answers.
    asked: Option<(Asked, Header)>,
    /// The client's CONNECT_OPEN being performed downstream.
    open: Option<Header>,
    /// The daemon call awaiting an answer (downstream or on the early connection).
    daemon_call: Option<Header>,
    early: bool,
    /// The open in progress went over the early connection and may reconnect once if that
    /// connection turns out to be gone.
    open_on_early: bool,
    /// Close or StartRelay: the pre-open machine is done with this client.
    over: bool,
}

/// What caused a batch of actions.
#[derive(Clone, Copy)]
enum Cause {
    /// A client frame.
    Client(Header),
    /// An answer to a question about this call.
    Answer(Header),
    /// Something downstream; replies to the client answer the open.
    Daemon,
    /// A stray answer: nothing may happen.
    Stray,
}

fn check(model: &mut Model, cause: Cause, out: Vec<Action>) {
    if matches!(cause, Cause::Stray) {
        assert!(out.is_empty(), "a stray answer did something: {out:?}");
        return;
    }
    for a in out {
        match a {
            Action::ToClient(f) => check_client_frame(model, cause, &f),
            Action::ToDaemon(f) => {
                let h = Header::check(&f).expect("daemon frame has a valid header");
                assert_eq!(h.len as usize, f.len());
                if h.prog == program::KEEPALIVE {
                    assert_eq!(f, msg::pong(), "only PONGs as keepalive");
                    continue;
                }
                assert!(
                    model.authenticated,
                    "a call downstream before authentication: {h:?}"
                );
                assert_eq!((h.mtype, h.prog), (MsgType::Call, program::REMOTE));
                model.daemon_call = Some(h);
            }
            Action::Connect(_) | Action::UseEarly => {
                assert!(model.authenticated, "downstream open before authentication");
                match cause {
                    Cause::Client(h) => {
                        assert_eq!(
                            (h.prog, h.proc_),
                            (program::REMOTE, remote_proc::CONNECT_OPEN)
                        );
                        model.open = Some(h);
                        model.open_on_early = false;
                    }
                    // The early connection was gone at its use: one fresh connect.
                    Cause::Daemon if matches!(a, Action::Connect(_)) && model.open_on_early => {
                        assert!(model.open.is_some());
                        model.open_on_early = false;
                    }
                    _ => panic!("open started by something else than the client's call"),
                }
                if matches!(a, Action::UseEarly) {
                    assert!(model.early);
                    model.open_on_early = true;
                } else {
                    model.daemon_call = None;
                }
                model.early = false;
            }
            Action::Disconnect => {
                model.daemon_call = None;
                model.early = false;
            }
            Action::StartRelay => {
                assert!(model.authenticated, "relay before authentication");
                assert!(model.open.is_some());
                model.over = true;
            }
            Action::Close(_) => model.over = true,
            // Counted as a failed attempt: only for a client that still has to authenticate.
            Action::AuthRefused => assert!(
                !model.authenticated,
                "an auth refusal counted for an authenticated client"
            ),
            Action::AskPolkit(q) => {
                assert_eq!(
                    model.auth,
                    Auth::Polkit,
                    "polkit asked on a {:?} listener",
                    model.auth
                );
                assert!(!model.authenticated, "polkit asked once authenticated");
                assert!(model.asked.is_none());
                assert!(q.start_time != 0, "polkit asked without a start time");
                let Cause::Client(h) = cause else {
                    panic!("question without a call")
                };
                assert_eq!(h.proc_, remote_proc::AUTH_POLKIT);
                model.asked = Some((Asked::Polkit, h));
            }
            Action::Sasl(op) => {
                assert_eq!(
                    model.auth,
                    Auth::Sasl,
                    "SASL run on a {:?} listener",
                    model.auth
                );
                assert!(!model.authenticated, "SASL run once authenticated");
                assert!(model.asked.is_none());
                let Cause::Client(h) = cause else {
                    panic!("SASL call without a client call")
                };
                match op {
                    sasl::Op::Init(_) => {
                        assert!(!model.session, "INIT over a session");
                        assert_eq!(h.proc_, remote_proc::AUTH_SASL_INIT);
                    }
                    sasl::Op::Start(_) | sasl::Op::Step(_) => {
                        assert!(model.session, "START/STEP without a session");
                        assert!(matches!(
                            h.proc_,
                            remote_proc::AUTH_SASL_START | remote_proc::AUTH_SASL_STEP
                        ));
                    }
                }
                let init = matches!(op, sasl::Op::Init(_));
                model.asked = Some((Asked::Sasl { init }, h));
            }
            Action::SaslEnd => {
                assert!(model.session, "SaslEnd without a session");
                model.session = false;
            }
            Action::SecurityLayer => {
                assert!(
                    model.session && model.authenticated,
                    "SecurityLayer out of place"
                );
                model.session = false;
            }
            Action::Authenticated => {
                assert!(!model.authenticated, "Authenticated twice");
                model.authenticated = true;
            }
        }
    }
}

fn check_client_frame(model: &Model, cause: Cause, f: &[u8]) {
    let rh = Header::check(f).expect("client frame has a valid header");
    assert_eq!(rh.len as usize, f.len(), "length word is the frame's size");
    if rh.prog == program::KEEPALIVE {
        assert_eq!(f, msg::pong());
        let Cause::Client(h) = cause else {
            panic!("unasked PONG")
        };
        assert!(h.prog == program::KEEPALIVE && h.proc_ == keepalive_proc::PING);
        return;
    }
    assert_eq!(rh.mtype, MsgType::Reply);
    let body = &f[Header::SIZE..];
    let h = match cause {
        Cause::Client(h) | Cause::Answer(h) => {
            assert_eq!(
                (rh.prog, rh.vers, rh.proc_, rh.serial),
                (h.prog, h.vers, h.proc_, h.serial),
                "reply does not echo its call"
            );
            h
        }
        Cause::Daemon => {
            let open = model.open.expect("a reply from downstream without an open");
            assert_eq!(
                (rh.prog, rh.serial),
                (program::REMOTE, open.serial),
                "not the open's reply"
            );
            return;
        }
        Cause::Stray => unreachable!(),
    };
    match rh.status {
        MsgStatus::Ok => {
            assert!(
                model.authenticated
                    || (h.prog == program::REMOTE
                        && (remote_proc::AUTH_LIST..=remote_proc::AUTH_POLKIT).contains(&h.proc_)),
                "call {} answered OK before authentication",
                h.proc_
            );
            if h.prog == program::REMOTE && h.proc_ == remote_proc::AUTH_LIST {
                let offered = msg::decode_auth_list(body).expect("AUTH_LIST reply decodes");
                let expect = match (model.authenticated, model.auth) {
                    (true, _) | (_, Auth::None) => auth_type::NONE,
                    (false, Auth::Polkit) => auth_type::POLKIT,
                    (false, Auth::Sasl) => auth_type::SASL,
                };
                assert_eq!(offered, vec![expect], "AUTH_LIST offers the wrong auth");
            }
        }
        MsgStatus::Error => {
            // A whole `remote_error`: it decodes, and encodes back to the same bytes (the
            // fields `decode` skips are constants of `encode`).
            let e = RemoteError::decode(&mut Decoder::new(body)).expect("the error body decodes");
            let mut enc = virtproxyd::proto::xdr::Encoder::new();
            e.encode(&mut enc);
            assert_eq!(
                enc.finish(),
                body,
                "the error body is one whole remote_error"
            );
        }
        other => panic!("reply status {other:?}"),
    }
}

const PROCS: [i32; 10] = [
    remote_proc::AUTH_LIST,
    remote_proc::AUTH_POLKIT,
    remote_proc::AUTH_SASL_INIT,
    remote_proc::AUTH_SASL_START,
    remote_proc::AUTH_SASL_STEP,
    remote_proc::AUTH_SASL_STEP,
    remote_proc::CONNECT_OPEN,
    remote_proc::CONNECT_SUPPORTS_FEATURE,
    remote_proc::CONNECT_CLOSE,
    3,
];

/// A token: none, empty, a few bytes, or around REMOTE_AUTH_SASL_DATA_MAX.
fn token(inp: &mut Input<'_>) -> Option<Vec<u8>> {
    match inp.u8() % 8 {
        0 => None,
        1 => Some(Vec::new()),
        2 => Some(vec![0x41; sasl::DATA_MAX]),
        3 => Some(vec![0x42; sasl::DATA_MAX + 1]),
        _ => {
            let n = inp.u8() as usize % 32;
            Some(inp.bytes(n).to_vec())
        }
    }
}

fn client_frame(inp: &mut Input<'_>, serial: &mut u32) -> (Header, Vec<u8>) {
    let ctl = inp.u8();
    *serial = serial.wrapping_add(1);
    let p = if ctl & 0x0f == 0x0f {
        inp.u32() as i32 % 500
    } else {
        PROCS[(ctl & 0x0f) as usize % PROCS.len()]
    };
    let mut h = Header {
        len: 0,
        prog: program::REMOTE,
        vers: 1,
        proc_: p,
        mtype: MsgType::Call,
        serial: *serial,
        status: MsgStatus::Ok,
    };
    match ctl >> 4 {
        0 => {
            h.prog = program::KEEPALIVE;
            h.mtype = MsgType::Message;
            h.proc_ = keepalive_proc::PING;
        }
        1 => h.mtype = MsgType::from_wire(inp.u32() % 8),
        2 => h.status = MsgStatus::from_wire(inp.u32() % 4),
        3 => h.prog = [program::QEMU, program::LXC, program::ADMIN][inp.u8() as usize % 3],
        4 => h.serial = inp.u32(),
        _ => {}
    }
    let body = match (inp.u8() % 8, h.proc_) {
        // Now and then the arguments are anything at all.
        (0, _) => {
            let n = inp.u8() as usize % 64;
            inp.bytes(n).to_vec()
        }
        (_, remote_proc::AUTH_SASL_START) => {
            let mech = ["SCRAM-SHA-256", "PLAIN", "GSSAPI", ""][inp.u8() as usize % 4];
            sasl::start_args(mech, token(inp).as_deref())
        }
        (_, remote_proc::AUTH_SASL_STEP) => sasl::step_args(token(inp).as_deref()),
        (_, remote_proc::CONNECT_OPEN) => {
            let name = match inp.u8() % 4 {
                0 => None,
                1 => Some("test:///default".to_string()),
                2 => Some("qemu:///system".to_string()),
                _ => Some(inp.string(STRING_MAX)),
            };
            OpenArgs {
                name,
                flags: u32::from(inp.u8() % 3),
            }
            .encode()
        }
        (_, remote_proc::CONNECT_SUPPORTS_FEATURE) => {
            msg::i32_body(if inp.u8() & 1 == 0 { 10 } else { 7 })
        }
        _ => Vec::new(),
    };
    (h, body)
}

/// What the SASL threads may answer (`sasl::run`): INIT gives mechanisms or fails, START and
/// STEP give an exchange or fail.
fn sasl_outcome(inp: &mut Input<'_>, init: bool) -> sasl::Outcome {
    match inp.u8() % 8 {
        0 => sasl::Outcome::Failed("SASL(-13): authentication failure".into()),
        _ if init => {
            sasl::Outcome::Mechanisms(["SCRAM-SHA-256,PLAIN", "X"][inp.u8() as usize % 2].into())
        }
        _ => sasl::Outcome::Exchange {
            complete: inp.u8() & 1 == 1,
            data: token(inp),
            ssf: [0, 1, 55, 56, 256][inp.u8() as usize % 5],
            username: match inp.u8() % 4 {
                0 => None,
                1 => Some("user".into()),
                2 => Some("admin".into()),
                _ => Some(inp.string(STRING_MAX)),
            },
        },
    }
}

fn polkit_answer(inp: &mut Input<'_>) -> Result<(), RemoteError> {
    let b = inp.u8();
    let details: std::collections::HashMap<String, String> = if b & 4 == 4 {
        [("polkit.dismissed".to_string(), "true".to_string())].into()
    } else {
        Default::default()
    };
    virtproxyd::polkit::verdict(
        b & 1 == 1,
        b & 2 == 2,
        &details,
        virtproxyd::polkit::ACTION_MANAGE,
    )
}

/// A daemon frame: mostly a good answer to the outstanding call, else a refusal, a PING, an
/// event, or anything.
fn daemon_frame(inp: &mut Input<'_>, call: Option<Header>) -> (Header, Vec<u8>) {
    let ctl = inp.u8();
    let mut h = call.unwrap_or(Header {
        len: 0,
        prog: program::REMOTE,
        vers: 1,
        proc_: remote_proc::AUTH_LIST,
        mtype: MsgType::Call,
        serial: 0,
        status: MsgStatus::Ok,
    });
    h.mtype = MsgType::Reply;
    match ctl % 8 {
        0 => {
            h.status = MsgStatus::Error;
            let e = RemoteError::new(1, 7, "daemon says no");
            let mut enc = virtproxyd::proto::xdr::Encoder::new();
            e.encode(&mut enc);
            (h, enc.finish())
        }
        1 => {
            h.prog = program::KEEPALIVE;
            h.proc_ = keepalive_proc::PING;
            h.mtype = MsgType::Message;
            (h, Vec::new())
        }
        2 => {
            h.mtype = MsgType::from_wire(u32::from(inp.u8() % 8));
            h.status = MsgStatus::from_wire(u32::from(inp.u8() % 3));
            h.proc_ = i32::from(inp.u8());
            if inp.u8() & 1 == 1 {
                h.serial = inp.u32();
            }
            let n = inp.u8() as usize % 16;
            (h, inp.bytes(n).to_vec())
        }
        _ => {
            let body = match h.proc_ {
                remote_proc::AUTH_LIST => {
                    let t = [auth_type::NONE, auth_type::POLKIT, auth_type::SASL]
                        [inp.u8() as usize % 3];
                    msg::auth_list_body(&[t])
                }
                remote_proc::AUTH_POLKIT | remote_proc::CONNECT_SUPPORTS_FEATURE => {
                    msg::i32_body(i32::from(inp.u8() % 4 != 0))
                }
                _ => Vec::new(),
            };
            (h, body)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let setup = inp.u8();
    let who = inp.u8();
    let kinds = [
        ListenerKind::UnixRw,
        ListenerKind::UnixRo,
        ListenerKind::Tcp,
        ListenerKind::Tls,
    ];
    let kind = kinds[(setup >> 1) as usize % kinds.len()];
    let auth = if setup & 1 == 0 {
        Auth::Polkit
    } else {
        Auth::Sasl
    };
    let unix = (who & 1 == 1).then(|| UnixPeer {
        uid: if who & 2 == 2 { 0 } else { 1000 },
        gid: 1000,
        pid: 42,
        user_name: None,
        group_name: None,
        process_time: if who & 4 == 4 { 0 } else { 7 },
    });
    let secure = who & 16 == 16;
    let allowed: Option<Vec<String>> = match (who >> 5) % 4 {
        0 => None,
        1 => Some(vec![]),
        2 => Some(vec!["u*".into()]),
        _ => Some(vec!["admin".into(), "x?".into()]),
    };
    let mut hs = Handshake::new(
        kind,
        Identity {
            unix,
            ..Identity::default()
        },
    )
    .with_auth(auth);
    // SASL parameters exist on SASL listeners; now and then on a polkit one too (never used).
    if auth == Auth::Sasl || setup & 0x80 == 0x80 {
        hs = hs.with_sasl(SaslParams {
            setup: sasl::Setup {
                local: Some("127.0.0.1;0".into()),
                remote: Some("127.0.0.1;0".into()),
                external_ssf: None,
                secure,
                tcp_min_ssf: 56,
            },
            allowed: allowed.clone().map(Into::into),
        });
    }
    let mut model = Model {
        auth,
        secure,
        allowed,
        authenticated: false,
        session: false,
        asked: None,
        open: None,
        daemon_call: None,
        early: false,
        open_on_early: false,
        over: false,
    };
    // An early downstream connection to the daemon the client may open, its AUTH_LIST sent.
    if who & 8 == 8 {
        let socket = if setup & 0x40 == 0x40 {
            "/nonexistent/s"
        } else {
            "/nonexistent/other"
        };
        assert!(hs.with_early(Target {
            uri: "test:///default".into(),
            socket: socket.into(),
            readonly: false
        }));
        model.early = true;
        model.daemon_call = Some(Header::check(&virtproxyd::handshake::early_auth_list()).unwrap());
    }
    let routes = RouteTable::new(
        "/nonexistent".into(),
        vec![("test".into(), "/nonexistent/s".into())],
        false,
    );
    let mut serial = 0u32;
    let mut connecting = false;
    while !inp.is_empty() && !model.over {
        assert_eq!(
            hs.auth_pending(),
            !model.authenticated,
            "auth_pending disagrees"
        );
        let mut out = Vec::new();
        let ctl = inp.u8();
        if let Some((asked, call)) = model.asked {
            assert!(
                !hs.wants_client_input(),
                "client read while a question is out"
            );
            // Mostly the answer; now and then the other kind arrives (stray).
            let stray = ctl % 16 == 0;
            match (asked, stray) {
                (Asked::Polkit, false) | (Asked::Sasl { .. }, true) => {
                    let r = polkit_answer(&mut inp);
                    let ok = r.is_ok();
                    hs.on_polkit_answer(r, &mut out);
                    if stray {
                        check(&mut model, Cause::Stray, out);
                        continue;
                    }
                    model.asked = None;
                    check(&mut model, Cause::Answer(call), out);
                    assert_eq!(model.authenticated, ok, "polkit's answer decides");
                }
                (Asked::Sasl { init }, false) | (Asked::Polkit, init @ true) => {
                    let o = sasl_outcome(&mut inp, init);
                    hs.on_sasl_answer(o.clone(), &mut out);
                    if stray {
                        check(&mut model, Cause::Stray, out);
                        continue;
                    }
                    model.asked = None;
                    let reply = out.iter().find_map(|a| match a {
                        Action::ToClient(f) => Some(f.clone()),
                        _ => None,
                    });
                    check(&mut model, Cause::Answer(call), out);
                    let reply = reply.expect("every SASL answer is replied to");
                    let ok = Header::check(&reply).unwrap().status == MsgStatus::Ok;
                    match o {
                        sasl::Outcome::Mechanisms(list) => {
                            assert!(ok);
                            assert_eq!(&reply[Header::SIZE..], sasl::init_ret(&list));
                            model.session = true;
                        }
                        sasl::Outcome::Failed(_) => {
                            assert!(!ok && !model.authenticated);
                            model.session = false;
                        }
                        sasl::Outcome::Exchange {
                            complete,
                            data,
                            ssf,
                            username,
                        } => {
                            let fits = data.as_ref().map_or(0, Vec::len) <= sasl::DATA_MAX;
                            let accepted = fits
                                && (!complete
                                    || sasl::finish(
                                        model.secure,
                                        ssf,
                                        username.as_deref(),
                                        model.allowed.as_deref(),
                                    )
                                    .is_ok());
                            assert_eq!(ok, accepted, "exchange reply status");
                            assert_eq!(
                                model.authenticated,
                                complete && accepted,
                                "completion authenticates"
                            );
                            if ok {
                                assert_eq!(
                                    &reply[Header::SIZE..],
                                    sasl::exchange_ret(complete, data.as_deref())
                                );
                            } else {
                                assert!(!model.session, "a refused exchange ends the session");
                            }
                        }
                    }
                }
            }
            continue;
        }
        if connecting {
            // The Connect is out: it succeeds or fails.
            connecting = false;
            if ctl & 3 == 0 {
                hs.on_connect_failed(111, &mut out);
                check(&mut model, Cause::Daemon, out);
                model.open = None;
            } else {
                hs.on_connected(&mut out);
                check(&mut model, Cause::Daemon, out);
            }
            continue;
        }
        if hs.in_downstream() {
            assert!(
                !hs.wants_client_input(),
                "client read while its open is in progress"
            );
            if ctl % 16 == 0 {
                hs.on_daemon_lost("went away", &mut out);
                connecting = out.iter().any(|a| matches!(a, Action::Connect(_)));
            } else {
                let (h, body) = daemon_frame(&mut inp, model.daemon_call);
                let frame = virtproxyd::proto::frame::build(h, &body);
                let h = Header::check(&frame).unwrap();
                hs.on_daemon_frame(&h, &body, &mut out);
            }
            check(&mut model, Cause::Daemon, out);
            if !hs.in_downstream() && !model.over {
                model.open = None;
            }
            continue;
        }
        assert!(hs.wants_client_input());
        match ctl % 16 {
            // A stray polkit or SASL answer: nothing was asked.
            0 => {
                hs.on_polkit_answer(polkit_answer(&mut inp), &mut out);
                check(&mut model, Cause::Stray, out);
            }
            1 => {
                let init = inp.u8() & 1 == 1;
                hs.on_sasl_answer(sasl_outcome(&mut inp, init), &mut out);
                check(&mut model, Cause::Stray, out);
            }
            // The early connection speaks.
            2 | 3 if hs.has_early() => {
                if ctl % 16 == 2 {
                    hs.on_early_dropped(&mut out);
                } else {
                    let (h, body) = daemon_frame(&mut inp, model.daemon_call);
                    let frame = virtproxyd::proto::frame::build(h, &body);
                    let h = Header::check(&frame).unwrap();
                    hs.on_daemon_frame(&h, &body, &mut out);
                }
                for a in &out {
                    assert!(
                        matches!(a, Action::Disconnect) || *a == Action::ToDaemon(msg::pong()),
                        "early connection did {a:?} before the open"
                    );
                }
                check(&mut model, Cause::Daemon, out);
            }
            _ => {
                let (h, body) = client_frame(&mut inp, &mut serial);
                let frame = virtproxyd::proto::frame::build(h, &body);
                let h = Header::check(&frame).unwrap();
                hs.on_client_frame(&h, &body, &routes, &|_| true, &mut out);
                connecting = out.iter().any(|a| matches!(a, Action::Connect(_)));
                check(&mut model, Cause::Client(h), out);
            }
        }
    }
});
