use super::*;
use crate::proto::frame::build;
use crate::proto::xdr::Decoder;
use std::path::Path;

fn hdr(prog: u32, proc_: i32, mtype: MsgType, serial: u32, status: MsgStatus) -> Header {
    Header {
        len: 0,
        prog,
        vers: 1,
        proc_,
        mtype,
        serial,
        status,
    }
}
fn call(proc_: i32, serial: u32) -> Header {
    hdr(program::REMOTE, proc_, MsgType::Call, serial, MsgStatus::Ok)
}
fn reply_to(frame: &[u8], status: MsgStatus) -> Header {
    let h = Header::check(frame).unwrap();
    hdr(h.prog, h.proc_, MsgType::Reply, h.serial, status)
}
fn routes() -> RouteTable {
    RouteTable::new(
        "/run/libvirt".into(),
        vec![("test".into(), "/d/sock".into())],
        false,
    )
}
fn no_files(_: &Path) -> bool {
    false
}
fn client(hs: &mut Handshake, h: Header, body: &[u8]) -> Vec<Action> {
    let mut out = vec![];
    hs.on_client_frame(&h, body, &routes(), &no_files, &mut out);
    out
}
fn daemon(hs: &mut Handshake, h: Header, body: &[u8]) -> Vec<Action> {
    let mut out = vec![];
    hs.on_daemon_frame(&h, body, &mut out);
    out
}
fn only_daemon_frame(out: Vec<Action>) -> Vec<u8> {
    match out.as_slice() {
        [Action::ToDaemon(f)] => f.clone(),
        other => panic!("expected one daemon frame, got {other:?}"),
    }
}
fn error_of(frame: &[u8]) -> RemoteError {
    assert_eq!(Header::check(frame).unwrap().status, MsgStatus::Error);
    RemoteError::decode(&mut Decoder::new(&frame[28..])).unwrap()
}
fn open_body(name: Option<&str>, flags: u32) -> Vec<u8> {
    OpenArgs {
        name: name.map(Into::into),
        flags,
    }
    .encode()
}

#[test]
fn auth_list_and_keepalive_feature_are_answered_locally() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    let out = client(&mut hs, call(remote_proc::AUTH_LIST, 0), &[]);
    assert_eq!(
        out,
        vec![Action::ToClient(msg::ok_reply(
            &call(66, 0),
            &[0, 0, 0, 1, 0, 0, 0, 0]
        ))]
    );
    let out = client(&mut hs, call(60, 1), &msg::i32_body(10));
    assert_eq!(
        out,
        vec![Action::ToClient(msg::ok_reply(
            &call(60, 1),
            &msg::i32_body(1)
        ))]
    );
}

#[test]
fn calls_before_open_get_libvirts_errors() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    let out = client(&mut hs, call(3, 7), &[]);
    let [Action::ToClient(f)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(error_of(f), RemoteError::not_open());
    let out = client(&mut hs, call(60, 2), &msg::i32_body(14));
    let [Action::ToClient(f)] = out.as_slice() else {
        panic!()
    };
    assert_eq!(
        error_of(f).message,
        "internal error: hypervisor connection not open"
    );
    let out = client(&mut hs, call(9999, 3), &[]);
    let [Action::ToClient(f)] = out.as_slice() else {
        panic!()
    };
    assert_eq!(error_of(f).message, "unknown procedure: 9999");
    let out = client(
        &mut hs,
        hdr(0x1234, 1, MsgType::Call, 4, MsgStatus::Ok),
        &[],
    );
    let [Action::ToClient(f)] = out.as_slice() else {
        panic!()
    };
    assert_eq!(error_of(f).message, "Cannot find program 4660 version 1");
    // Non-call types are dropped without a word.
    assert!(client(
        &mut hs,
        hdr(program::REMOTE, 3, MsgType::Reply, 5, MsgStatus::Ok),
        &[]
    )
    .is_empty());
}

#[test]
fn keepalive_ping_is_answered_before_open() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    let out = client(
        &mut hs,
        hdr(program::KEEPALIVE, 1, MsgType::Message, 0, MsgStatus::Ok),
        &[],
    );
    assert_eq!(out, vec![Action::ToClient(msg::pong())]);
}

#[test]
fn full_open_forwards_ro_bit_identity_and_releases_reply_last() {
    let id = Identity {
        unix: Some(crate::identity::UnixPeer {
            uid: 1000,
            gid: 100,
            pid: 42,
            user_name: Some("u".into()),
            group_name: None,
            process_time: 9,
        }),
        ..Default::default()
    };
    let mut hs = Handshake::new(ListenerKind::UnixRo, id.clone());
    client(&mut hs, call(60, 1), &msg::i32_body(10));
    let out = client(&mut hs, call(1, 2), &open_body(Some("test:///default"), 0));
    assert_eq!(out, vec![Action::Connect("/d/sock-ro".into())]);
    assert!(!hs.wants_client_input());

    let mut out = vec![];
    hs.on_connected(&mut out);
    let auth = only_daemon_frame(out);
    assert_eq!(Header::check(&auth).unwrap().proc_, remote_proc::AUTH_LIST);

    let feat = only_daemon_frame(daemon(
        &mut hs,
        reply_to(&auth, MsgStatus::Ok),
        &msg::auth_list_body(&[0]),
    ));
    assert_eq!(&feat[28..], &msg::i32_body(10));

    let open = only_daemon_frame(daemon(
        &mut hs,
        reply_to(&feat, MsgStatus::Ok),
        &msg::i32_body(1),
    ));
    let oh = Header::check(&open).unwrap();
    assert_eq!((oh.proc_, oh.serial), (1, 2));
    assert_eq!(
        OpenArgs::decode(&open[28..]).unwrap(),
        OpenArgs {
            name: Some("test:///default".into()),
            flags: 1
        }
    );

    let open_reply = build(reply_to(&open, MsgStatus::Ok), &[]);
    let ident = only_daemon_frame(daemon(&mut hs, reply_to(&open, MsgStatus::Ok), &[]));
    assert_eq!(&ident[28..], &msg::set_identity_body(&id.params()));

    let out = daemon(&mut hs, reply_to(&ident, MsgStatus::Ok), &[]);
    assert_eq!(out, vec![Action::ToClient(open_reply), Action::StartRelay]);
}

#[test]
fn daemon_refusing_open_is_passed_back_and_client_may_retry() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    client(&mut hs, call(1, 0), &open_body(Some("qemu:///system"), 0));
    let mut out = vec![];
    hs.on_connected(&mut out);
    let auth = only_daemon_frame(out);
    let open = only_daemon_frame(daemon(
        &mut hs,
        reply_to(&auth, MsgStatus::Ok),
        &msg::auth_list_body(&[0]),
    ));
    let mut e = crate::proto::xdr::Encoder::new();
    RemoteError::new(1, 10, "nope").encode(&mut e);
    let body = e.finish();
    let out = daemon(&mut hs, reply_to(&open, MsgStatus::Error), &body);
    assert_eq!(out[0], Action::Disconnect);
    let Action::ToClient(f) = &out[1] else {
        panic!()
    };
    assert_eq!(error_of(f).message, "internal error: nope");
    assert!(hs.wants_client_input());
}

#[test]
fn identity_refusal_fails_the_open() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    client(&mut hs, call(1, 5), &open_body(Some("qemu:///system"), 0));
    let mut out = vec![];
    hs.on_connected(&mut out);
    let auth = only_daemon_frame(out);
    let open = only_daemon_frame(daemon(
        &mut hs,
        reply_to(&auth, MsgStatus::Ok),
        &msg::auth_list_body(&[0]),
    ));
    let ident = only_daemon_frame(daemon(&mut hs, reply_to(&open, MsgStatus::Ok), &[]));
    let mut e = crate::proto::xdr::Encoder::new();
    RemoteError::new(74, 53, "parameter 'x' not supported").encode(&mut e);
    let out = daemon(&mut hs, reply_to(&ident, MsgStatus::Error), &e.finish());
    assert_eq!(out[0], Action::Disconnect);
    let Action::ToClient(f) = &out[1] else {
        panic!()
    };
    let h = Header::check(f).unwrap();
    assert_eq!(
        (h.proc_, h.serial),
        (1, 5),
        "error must answer the client's open"
    );
}

#[test]
fn missing_daemon_names_the_socket() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    client(&mut hs, call(1, 2), &open_body(Some("qemu:///system"), 0));
    let mut out = vec![];
    hs.on_connect_failed(libc::ENOENT, &mut out);
    let Action::ToClient(f) = &out[1] else {
        panic!()
    };
    assert_eq!(
        error_of(f).message,
        "Failed to connect socket to '/run/libvirt/virtqemud-sock': No such file or directory"
    );
}

#[test]
fn unroutable_names_are_refused_without_connecting() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    for name in [
        "qemu+ssh://h/system",
        "foo:///system",
        "qemu:///system?socket=/x",
    ] {
        let out = client(&mut hs, call(1, 2), &open_body(Some(name), 0));
        assert!(
            matches!(out.as_slice(), [Action::ToClient(_)]),
            "{name}: {out:?}"
        );
    }
    let out = client(&mut hs, call(1, 2), &open_body(Some(""), 0));
    let [Action::ToClient(f)] = out.as_slice() else {
        panic!()
    };
    assert_eq!(error_of(f).message, "internal error: connection not open");
}

#[test]
fn polkit_downstream_is_performed() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    client(&mut hs, call(1, 0), &open_body(Some("qemu:///system"), 0));
    let mut out = vec![];
    hs.on_connected(&mut out);
    let auth = only_daemon_frame(out);
    let open = polkit_then_open(&mut hs, &auth);
    assert_eq!(Header::check(&open).unwrap().proc_, 1);
}

/// The daemon answers `auth` (AUTH_LIST) with polkit: AUTH_POLKIT goes down, and once it
/// succeeds the open; returns the open's frame.
fn polkit_then_open(hs: &mut Handshake, auth: &[u8]) -> Vec<u8> {
    let pk = only_daemon_frame(daemon(
        hs,
        reply_to(auth, MsgStatus::Ok),
        &msg::auth_list_body(&[2]),
    ));
    assert_eq!(Header::check(&pk).unwrap().proc_, remote_proc::AUTH_POLKIT);
    only_daemon_frame(daemon(hs, reply_to(&pk, MsgStatus::Ok), &msg::i32_body(1)))
}

fn peer(uid: u32, process_time: u64) -> Identity {
    Identity {
        unix: Some(crate::identity::UnixPeer {
            uid,
            gid: uid,
            pid: 4242,
            user_name: None,
            group_name: None,
            process_time,
        }),
        ..Default::default()
    }
}
fn one_reply(out: &[Action]) -> &[u8] {
    match out {
        [Action::ToClient(f)] => f,
        other => panic!("expected one client frame, got {other:?}"),
    }
}
/// A refused authentication attempt: counted (`AuthRefused`), then the error to the client.
fn refused_reply(out: &[Action]) -> &[u8] {
    match out {
        [Action::AuthRefused, Action::ToClient(f)] => f,
        other => panic!("expected a counted refusal and its reply, got {other:?}"),
    }
}
fn offered(out: &[Action]) -> Vec<i32> {
    let f = out
        .iter()
        .find_map(|a| match a {
            Action::ToClient(f) => Some(f),
            _ => None,
        })
        .expect("a reply");
    msg::decode_auth_list(&f[28..]).unwrap()
}

#[test]
fn polkit_client_must_authenticate_before_anything_else() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, peer(1000, 77)).with_auth(Auth::Polkit);
    assert!(hs.auth_pending());
    // libvirt's needAuth: every non-auth call, keepalive feature and open included.
    for (proc_, body) in [
        (60, msg::i32_body(10)),
        (1, open_body(Some("test:///default"), 0)),
        (2, vec![]),
    ] {
        let e = error_of(one_reply(&client(&mut hs, call(proc_, 1), &body)));
        assert_eq!((e.code, e.domain), (39, 7));
        assert_eq!(e.message, "authentication required");
    }
    let e = error_of(one_reply(&client(
        &mut hs,
        hdr(program::QEMU, 1, MsgType::Call, 2, MsgStatus::Ok),
        &[],
    )));
    assert_eq!(e.message, "authentication required");
    // Keepalive pings are still answered.
    let ping = hdr(program::KEEPALIVE, 1, MsgType::Message, 0, MsgStatus::Ok);
    assert_eq!(client(&mut hs, ping, &[]).len(), 1);

    assert_eq!(offered(&client(&mut hs, call(66, 3), &[])), vec![2]);
    let out = client(&mut hs, call(70, 4), &[]);
    assert_eq!(
        out,
        vec![Action::AskPolkit(polkit::Query {
            action: "org.libvirt.unix.manage",
            pid: 4242,
            start_time: 77,
            uid: 1000,
        })]
    );
    // The client is not read while polkitd thinks.
    assert!(!hs.wants_client_input());
    let mut out = vec![];
    hs.on_polkit_answer(Ok(()), &mut out);
    assert_eq!(
        out,
        vec![
            Action::Authenticated,
            Action::ToClient(msg::ok_reply(&call(70, 4), &msg::i32_body(1)))
        ]
    );
    assert!(!hs.auth_pending() && hs.wants_client_input());
    assert_eq!(offered(&client(&mut hs, call(66, 5), &[])), vec![0]);
    let out = client(&mut hs, call(1, 6), &open_body(Some("test:///default"), 0));
    assert_eq!(out, vec![Action::Connect("/d/sock".into())]);
}

#[test]
fn polkit_denial_keeps_the_client_unauthenticated() {
    let mut hs = Handshake::new(ListenerKind::UnixRo, peer(1000, 77)).with_auth(Auth::Polkit);
    let out = client(&mut hs, call(70, 1), &[]);
    assert!(
        matches!(&out[..], [Action::AskPolkit(q)] if q.action == "org.libvirt.unix.monitor"),
        "{out:?}"
    );
    let mut out = vec![];
    hs.on_polkit_answer(
        polkit::verdict(false, true, &Default::default(), polkit::ACTION_MONITOR),
        &mut out,
    );
    let e = error_of(refused_reply(&out));
    assert_eq!((e.code, e.domain), (94, 60));
    assert!(hs.auth_pending() && hs.wants_client_input());
    let e = error_of(one_reply(&client(&mut hs, call(60, 2), &msg::i32_body(10))));
    assert_eq!(e.message, "authentication required");
}

#[test]
fn root_bypasses_polkit_at_auth_list() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, peer(0, 77)).with_auth(Auth::Polkit);
    let out = client(&mut hs, call(66, 1), &[]);
    assert_eq!(out[0], Action::Authenticated);
    assert_eq!(offered(&out), vec![0]);
    assert!(!hs.auth_pending());
    // AUTH_POLKIT after that (or on a listener without polkit) fails as libvirt fails it.
    let e = error_of(one_reply(&client(&mut hs, call(70, 2), &[])));
    assert_eq!((e.code, e.domain), (1, 7));
    assert_eq!(
        e.message,
        "Library function returned error but did not set virError"
    );
    let mut none = Handshake::new(ListenerKind::UnixRw, peer(1000, 77));
    let e = error_of(one_reply(&client(&mut none, call(70, 1), &[])));
    assert_eq!((e.code, e.domain), (1, 7));
}

#[test]
fn polkit_without_a_start_time_fails_without_asking() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, peer(1000, 0)).with_auth(Auth::Polkit);
    let e = error_of(refused_reply(&client(&mut hs, call(70, 1), &[])));
    assert_eq!((e.code, e.domain), (1, 7));
    assert!(hs.auth_pending());
}

fn sasl_hs(secure: bool, allowed: Option<Vec<String>>) -> Handshake {
    let kind = if secure {
        ListenerKind::UnixRw
    } else {
        ListenerKind::Tcp
    };
    Handshake::new(kind, peer(1000, 9))
        .with_auth(Auth::Sasl)
        .with_sasl(SaslParams {
            setup: sasl::Setup {
                local: Some("127.0.0.1;0".into()),
                remote: Some("127.0.0.1;0".into()),
                external_ssf: None,
                secure,
                tcp_min_ssf: 56,
            },
            allowed: allowed.map(Into::into),
        })
}

fn answer(hs: &mut Handshake, o: sasl::Outcome) -> Vec<Action> {
    let mut out = vec![];
    hs.on_sasl_answer(o, &mut out);
    out
}

fn done(ssf: u32, user: &str, data: Option<&[u8]>) -> sasl::Outcome {
    sasl::Outcome::Exchange {
        complete: true,
        data: data.map(<[u8]>::to_vec),
        ssf,
        username: Some(user.into()),
    }
}

/// INIT, then START up to the point where the SASL threads hold the call.
fn through_start(hs: &mut Handshake) {
    let out = client(hs, call(remote_proc::AUTH_SASL_INIT, 1), &[]);
    assert!(
        matches!(out.as_slice(), [Action::Sasl(sasl::Op::Init(_))]),
        "{out:?}"
    );
    assert!(
        !hs.wants_client_input(),
        "the client waits for its INIT reply"
    );
    let out = answer(hs, sasl::Outcome::Mechanisms("SCRAM-SHA-256".into()));
    let [Action::ToClient(f)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(&f[28..], sasl::init_ret("SCRAM-SHA-256"));
    let out = client(
        hs,
        call(remote_proc::AUTH_SASL_START, 2),
        &sasl::start_args("SCRAM-SHA-256", Some(b"n,,n=u")),
    );
    assert_eq!(
        out,
        vec![Action::Sasl(sasl::Op::Start(sasl::StartArgs {
            mech: "SCRAM-SHA-256".into(),
            data: Some(b"n,,n=u".to_vec())
        }))]
    );
}

#[test]
fn sasl_listener_offers_sasl_and_blocks_other_calls() {
    let mut hs = sasl_hs(true, None);
    let out = client(&mut hs, call(remote_proc::AUTH_LIST, 0), &[]);
    assert_eq!(
        &one_reply(&out)[28..],
        msg::auth_list_body(&[auth_type::SASL])
    );
    let out = client(
        &mut hs,
        call(remote_proc::CONNECT_OPEN, 1),
        &open_body(None, 0),
    );
    assert_eq!(error_of(one_reply(&out)).message, "authentication required");
    assert!(hs.auth_pending());
}

#[test]
fn sasl_success_sets_the_user_name_and_ends_the_session() {
    let mut hs = sasl_hs(true, Some(vec!["bars*".into()]));
    through_start(&mut hs);
    let out = answer(
        &mut hs,
        sasl::Outcome::Exchange {
            complete: false,
            data: Some(vec![]),
            ssf: 0,
            username: None,
        },
    );
    // An empty server token stays distinct from NULL: nil = 0, length 0.
    assert_eq!(&one_reply(&out)[28..], sasl::exchange_ret(false, Some(&[])));
    assert!(hs.auth_pending());
    let out = client(
        &mut hs,
        call(remote_proc::AUTH_SASL_STEP, 3),
        &sasl::step_args(None),
    );
    assert_eq!(out, vec![Action::Sasl(sasl::Op::Step(None))]);
    let out = answer(&mut hs, done(0, "barsuser", None));
    match out.as_slice() {
        [Action::Authenticated, Action::ToClient(f), Action::SaslEnd] => {
            let h = Header::check(f).unwrap();
            assert_eq!((h.proc_, h.serial, h.status), (69, 3, MsgStatus::Ok));
            assert_eq!(&f[28..], sasl::exchange_ret(true, None));
        }
        other => panic!("{other:?}"),
    }
    assert!(!hs.auth_pending());
    assert_eq!(hs.identity().sasl_user_name.as_deref(), Some("barsuser"));
    let names: Vec<_> = hs.identity().params().iter().map(|(n, _)| *n).collect();
    assert_eq!(names.last(), Some(&"sasl-user-name"));
    // Authenticated: AUTH_LIST says none, a new INIT is refused as libvirt refuses it.
    let out = client(&mut hs, call(remote_proc::AUTH_LIST, 4), &[]);
    assert_eq!(
        &one_reply(&out)[28..],
        msg::auth_list_body(&[auth_type::NONE])
    );
    let out = client(&mut hs, call(remote_proc::AUTH_SASL_INIT, 5), &[]);
    let e = error_of(one_reply(&out));
    assert_eq!((e.code, e.domain), (45, 7));
}

#[test]
fn sasl_user_outside_the_list_is_refused_and_may_start_over() {
    let mut hs = sasl_hs(true, Some(vec!["barsuser".into()]));
    through_start(&mut hs);
    let out = answer(&mut hs, done(0, "intruder", None));
    match out.as_slice() {
        [Action::SaslEnd, Action::AuthRefused, Action::ToClient(f)] => {
            let e = error_of(f);
            assert_eq!((e.code, e.domain), (45, 7));
            assert_eq!(e.message, "authentication failed: authentication failed");
        }
        other => panic!("{other:?}"),
    }
    assert!(hs.auth_pending());
    // The session is gone: STEP fails, INIT starts a new one.
    let out = client(
        &mut hs,
        call(remote_proc::AUTH_SASL_STEP, 3),
        &sasl::step_args(None),
    );
    assert_eq!(error_of(refused_reply(&out)).code, 45);
    let out = client(&mut hs, call(remote_proc::AUTH_SASL_INIT, 4), &[]);
    assert!(matches!(out.as_slice(), [Action::Sasl(sasl::Op::Init(_))]));
}

#[test]
fn sasl_failures_and_misuse_map_to_auth_failed() {
    let mut hs = sasl_hs(true, None);
    // START before INIT, STEP before INIT.
    for (p, body) in [
        (remote_proc::AUTH_SASL_START, sasl::start_args("X", None)),
        (remote_proc::AUTH_SASL_STEP, sasl::step_args(None)),
    ] {
        let out = client(&mut hs, call(p, 1), &body);
        assert_eq!(
            error_of(refused_reply(&out)).message,
            "authentication failed: authentication failed"
        );
    }
    // An undecodable START is the dispatcher's error, the session untouched.
    let out = client(&mut hs, call(remote_proc::AUTH_SASL_START, 2), &[0, 0]);
    let e = error_of(one_reply(&out));
    assert_eq!(
        (e.code, e.message.as_str()),
        (39, "Unable to decode message payload")
    );
    // Cyrus failing a step (wrong password): the session ends, auth failed.
    through_start(&mut hs);
    let out = answer(
        &mut hs,
        sasl::Outcome::Failed("SASL(-13): user not found".into()),
    );
    assert_eq!(error_of(refused_reply(&out)).code, 45);
    // A server token over 64 KiB is refused rather than sent.
    through_start(&mut hs);
    let big = sasl::Outcome::Exchange {
        complete: false,
        data: Some(vec![0; sasl::DATA_MAX + 1]),
        ssf: 0,
        username: None,
    };
    let out = answer(&mut hs, big);
    assert!(
        matches!(
            out.as_slice(),
            [Action::SaslEnd, Action::AuthRefused, Action::ToClient(_)]
        ),
        "{out:?}"
    );
    // INIT on a listener that is not SASL.
    let mut hs = Handshake::new(ListenerKind::UnixRw, peer(1000, 9)).with_auth(Auth::Polkit);
    let out = client(&mut hs, call(remote_proc::AUTH_SASL_INIT, 1), &[]);
    assert_eq!(error_of(one_reply(&out)).code, 45);
}

#[test]
fn sasl_on_plain_tcp_needs_a_security_layer() {
    let mut hs = sasl_hs(false, None);
    through_start(&mut hs);
    let out = answer(&mut hs, done(0, "u", None));
    assert!(
        matches!(
            out.as_slice(),
            [Action::SaslEnd, Action::AuthRefused, Action::ToClient(_)]
        ),
        "{out:?}"
    );
    assert!(hs.auth_pending());
    through_start(&mut hs);
    let out = answer(&mut hs, done(256, "u@REALM", Some(b"fin")));
    match out.as_slice() {
        [Action::Authenticated, Action::ToClient(f), Action::SecurityLayer] => {
            assert_eq!(&f[28..], sasl::exchange_ret(true, Some(b"fin")));
        }
        other => panic!("{other:?}"),
    }
}

fn test_target(socket: &str) -> Target {
    Target {
        uri: "test:///default".into(),
        socket: socket.into(),
        readonly: false,
    }
}

/// An early connection asks for AUTH_LIST and nothing else until the client opens that same
/// daemon; its answer, arriving before the open, is used as the open's own.
#[test]
fn early_connection_answered_before_the_open_is_used_by_it() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    let auth = early_auth_list();
    assert_eq!(Header::check(&auth).unwrap().proc_, remote_proc::AUTH_LIST);
    assert!(hs.with_early(test_target("/d/sock")));
    assert!(hs.wants_daemon_input() && hs.wants_client_input());
    // The answer is kept; nothing goes to the daemon or the client.
    let out = daemon(
        &mut hs,
        reply_to(&auth, MsgStatus::Ok),
        &msg::auth_list_body(&[0]),
    );
    assert!(out.is_empty(), "{out:?}");
    // The client's own pre-open calls are still answered locally.
    let out = client(&mut hs, call(remote_proc::AUTH_LIST, 0), &[]);
    assert!(matches!(out.as_slice(), [Action::ToClient(_)]), "{out:?}");
    // Its open goes straight to CONNECT_OPEN on the early connection.
    let out = client(&mut hs, call(1, 1), &open_body(Some("test:///default"), 0));
    let [Action::UseEarly, Action::ToDaemon(open)] = out.as_slice() else {
        panic!("expected the open on the early connection, got {out:?}");
    };
    let oh = Header::check(open).unwrap();
    assert_eq!((oh.proc_, oh.serial), (1, 1));
    let ident = only_daemon_frame(daemon(&mut hs, reply_to(open, MsgStatus::Ok), &[]));
    let ih = Header::check(&ident).unwrap();
    assert_eq!(ih.proc_, remote_proc::CONNECT_SET_IDENTITY);
    assert_ne!(ih.serial, Header::check(&auth).unwrap().serial);
    let out = daemon(&mut hs, reply_to(&ident, MsgStatus::Ok), &[]);
    assert_eq!(out.last(), Some(&Action::StartRelay));
    assert_eq!(
        hs.opened().map(|t| t.socket.clone()),
        Some("/d/sock".into())
    );
}

/// An open that comes before the early AUTH_LIST answer waits for it, and goes through
/// AUTH_POLKIT when the daemon asks for it, as a fresh connection would.
#[test]
fn early_connection_still_waiting_takes_the_usual_steps() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    assert!(hs.with_early(test_target("/d/sock")));
    let auth = early_auth_list();
    let out = client(&mut hs, call(1, 5), &open_body(Some("test:///default"), 0));
    assert_eq!(out, vec![Action::UseEarly]);
    assert!(hs.in_downstream() && !hs.wants_client_input());
    let open = polkit_then_open(&mut hs, &auth);
    assert_eq!(Header::check(&open).unwrap().serial, 5);
}

/// A guess that was wrong costs a disconnect and a fresh connect to the right daemon.
#[test]
fn early_connection_to_another_daemon_is_dropped_at_open() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    assert!(hs.with_early(test_target("/d/other-sock")));
    let out = client(&mut hs, call(1, 1), &open_body(Some("test:///default"), 0));
    assert_eq!(
        out,
        vec![Action::Disconnect, Action::Connect("/d/sock".into())]
    );
    assert!(!hs.has_early());
}

/// A daemon that fails, closes or sends nonsense on the early connection is forgotten
/// quietly: the client's open connects afresh and reports its own errors.
#[test]
fn early_connection_failures_are_silent() {
    for case in 0..4 {
        let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
        assert!(hs.with_early(test_target("/d/sock")));
        let auth = early_auth_list();
        let out = match case {
            0 => daemon(&mut hs, reply_to(&auth, MsgStatus::Error), &[]),
            1 => {
                let mut out = vec![];
                hs.on_daemon_lost("closed the connection during open", &mut out);
                out
            }
            2 => daemon(&mut hs, call(1, 0), &[]),
            _ => {
                let mut out = vec![];
                hs.on_early_dropped(&mut out);
                out
            }
        };
        assert_eq!(out, vec![Action::Disconnect], "case {case}");
        assert!(!hs.has_early() && !hs.wants_daemon_input(), "case {case}");
        let out = client(&mut hs, call(1, 1), &open_body(Some("test:///default"), 0));
        assert_eq!(out, vec![Action::Connect("/d/sock".into())], "case {case}");
    }
}

/// No early connection once an open is under way, and a dropped-early event during an open
/// does not touch the open's connection.
#[test]
fn early_connection_never_disturbs_an_open_in_progress() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    client(&mut hs, call(1, 1), &open_body(Some("test:///default"), 0));
    assert!(!hs.with_early(test_target("/d/sock")));
    let mut out = vec![];
    hs.on_early_dropped(&mut out);
    assert!(out.is_empty());
    assert!(hs.in_downstream());
}

/// A peer repeating a refused AUTH_POLKIT at line rate gets every error reply, but only
/// `CLIENT_LOG_LINES` log lines; the rest are counted for the close line.
#[test]
fn repeated_refused_calls_log_a_bounded_number_of_lines() {
    let mut hs = Handshake::new(ListenerKind::Tcp, Identity::default());
    for serial in 1..=1000 {
        let e = error_of(one_reply(&client(&mut hs, call(70, serial), &[])));
        assert_eq!((e.code, e.domain), (1, 7));
    }
    // The process-wide limit (`logging::client_line_allowed`) may take some of the five
    // when other tests log at the same time.
    assert!(hs.log_lines() <= CLIENT_LOG_LINES);
    assert_eq!(hs.log_lines() + hs.log_suppressed(), 1000);
}

/// A frame still arriving on an early connection the client's open abandoned (another
/// daemon) is not this open's: an error reply there must not fail it, and the open goes on
/// once its own connection is up.
#[test]
fn frames_left_on_an_abandoned_early_connection_do_not_touch_the_open() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    assert!(hs.with_early(test_target("/d/other-sock")));
    let auth = early_auth_list();
    let out = client(&mut hs, call(1, 1), &open_body(Some("test:///default"), 0));
    assert_eq!(
        out,
        vec![Action::Disconnect, Action::Connect("/d/sock".into())]
    );
    // The abandoned connection's answers, read before the disconnect took effect.
    for status in [MsgStatus::Error, MsgStatus::Ok] {
        let out = daemon(&mut hs, reply_to(&auth, status), &[]);
        assert!(out.is_empty(), "{status:?}: {out:?}");
        assert!(hs.in_downstream(), "{status:?}: the open failed");
    }
    let mut out = vec![];
    hs.on_connected(&mut out);
    let auth2 = only_daemon_frame(out);
    assert_eq!(Header::check(&auth2).unwrap().proc_, remote_proc::AUTH_LIST);
}

/// The early connection was gone by the time the client's open used it (the daemon closed an
/// idle connection, or restarted): the open connects afresh instead of failing.
#[test]
fn an_early_connection_lost_right_after_use_reconnects() {
    let mut hs = Handshake::new(ListenerKind::UnixRw, Identity::default());
    assert!(hs.with_early(test_target("/d/sock")));
    let out = client(&mut hs, call(1, 3), &open_body(Some("test:///default"), 0));
    assert_eq!(out, vec![Action::UseEarly]);
    let mut out = vec![];
    hs.on_daemon_lost("closed the connection during open", &mut out);
    assert_eq!(
        out,
        vec![Action::Disconnect, Action::Connect("/d/sock".into())]
    );
    assert!(hs.in_downstream());
    // The fresh connection takes the usual steps, to the client's open.
    let mut out = vec![];
    hs.on_connected(&mut out);
    let auth = only_daemon_frame(out);
    let open = polkit_then_open(&mut hs, &auth);
    assert_eq!(Header::check(&open).unwrap().serial, 3);
    // A second loss is the daemon's real failure: the open fails.
    let mut out = vec![];
    hs.on_daemon_lost("closed the connection during open", &mut out);
    assert!(
        matches!(out.as_slice(), [Action::Disconnect, Action::ToClient(_)]),
        "{out:?}"
    );
}
