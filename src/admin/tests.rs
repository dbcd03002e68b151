use super::*;

/// A daemon with two relayed clients and one admin client, recording what calls changed.
#[derive(Default)]
struct Fake {
    limits: Option<(u32, u32)>,
    closed: Vec<u64>,
    filters: String,
    outputs: String,
    timeout: Option<u32>,
    tls: bool,
    tls_updated: bool,
}

impl Host for Fake {
    fn clients(&self, srv: Server) -> Vec<ClientRef> {
        match srv {
            Server::Proxy => vec![
                ClientRef {
                    id: 1,
                    timestamp: 1_700_000_000,
                    transport: 0,
                },
                ClientRef {
                    id: 2,
                    timestamp: 1_700_000_001,
                    transport: 2,
                },
            ],
            Server::Admin => vec![ClientRef {
                id: 1,
                timestamp: 5,
                transport: 0,
            }],
        }
    }
    fn client_info(&self, srv: Server, id: u64) -> Option<ClientInfo> {
        match (srv, id) {
            (Server::Proxy, 1) => Some(ClientInfo {
                local: true,
                uid: Some(1000),
                user_name: Some("vpdtest".into()),
                gid: Some(1000),
                group_name: Some("vpdtest".into()),
                pid: Some(4242),
                ..ClientInfo::default()
            }),
            (Server::Proxy, 2) => Some(ClientInfo {
                readonly: false,
                local: false,
                sock_addr: Some("127.0.0.1:5555".into()),
                x509_dname: Some("CN=client1".into()),
                ..ClientInfo::default()
            }),
            _ => None,
        }
    }
    fn close_client(&mut self, _srv: Server, id: u64) -> bool {
        self.closed.push(id);
        true
    }
    fn limits(&self, srv: Server) -> Limits {
        let (max, unauth) = self.limits.unwrap_or((5000, 20));
        match srv {
            Server::Proxy => Limits {
                max,
                current: 2,
                unauth_max: unauth,
                unauth_current: 0,
            },
            Server::Admin => Limits {
                max: 5000,
                current: 1,
                unauth_max: 0,
                unauth_current: 0,
            },
        }
    }
    fn set_limits(&mut self, _srv: Server, max: u32, unauth_max: u32) {
        self.limits = Some((max, unauth_max));
    }
    fn pool(&self, _srv: Server) -> Pool {
        Pool {
            min: 2,
            max: 2,
            current: 2,
            free: 2,
            prio: 0,
            queue: 0,
        }
    }
    fn log_filters(&self) -> String {
        self.filters.clone()
    }
    fn log_outputs(&self) -> String {
        self.outputs.clone()
    }
    fn set_log_filters(&mut self, f: &str) -> Result<(), String> {
        let parsed = crate::logging::spec::parse_filters(f).map_err(|e| e.0)?;
        self.filters = crate::logging::spec::format_filters(&parsed);
        Ok(())
    }
    fn set_log_outputs(&mut self, o: &str) -> Result<(), String> {
        self.outputs = o.into();
        Ok(())
    }
    fn set_daemon_timeout(&mut self, secs: u32) {
        self.timeout = Some(secs);
    }
    fn update_tls(&mut self, _srv: Server) -> Result<(), RemoteError> {
        if !self.tls {
            return Err(no_tls_service());
        }
        self.tls_updated = true;
        Ok(())
    }
}

fn call(proc_: i32, body: &[u8]) -> Vec<u8> {
    msg::call(program::ADMIN, proc_, 9, body)
}

/// Runs one call; Ok(reply body) or Err(error).
fn run(host: &mut Fake, frame: &[u8]) -> (Result<Vec<u8>, RemoteError>, Vec<Action>) {
    let h = Header::check(frame).unwrap();
    let mut out = Vec::new();
    Session::new().on_frame(&h, &frame[Header::SIZE..], host, &mut out);
    let Some(Action::ToClient(reply)) = out.first() else {
        panic!("no reply: {out:?}");
    };
    let rh = Header::check(reply).unwrap();
    let req = Header::check(frame).unwrap();
    assert_eq!(
        (rh.prog, rh.proc_, rh.serial, rh.mtype),
        (req.prog, req.proc_, 9, MsgType::Reply)
    );
    let body = reply[Header::SIZE..].to_vec();
    let r = if rh.status == MsgStatus::Ok {
        Ok(body)
    } else {
        Err(RemoteError::decode(&mut Decoder::new(&body)).unwrap())
    };
    (r, out)
}

fn srv_flags(name: &str) -> Vec<u8> {
    let mut e = Encoder::new();
    e.string(name).u32(0);
    e.finish()
}

fn decode_params(d: &mut Decoder<'_>) -> Vec<TypedParam> {
    decode_list(d, 64).unwrap()
}

#[test]
fn servers_are_listed_and_looked_up() {
    let mut h = Fake::default();
    let mut e = Encoder::new();
    e.u32(1).u32(0);
    let body = run(&mut h, &call(proc_::CONNECT_LIST_SERVERS, &e.finish()))
        .0
        .unwrap();
    let mut d = Decoder::new(&body);
    assert_eq!(d.u32().unwrap(), 2);
    assert_eq!(
        (d.string().unwrap(), d.string().unwrap()),
        ("virtproxyd".into(), "admin".into())
    );
    assert_eq!((d.u32().unwrap(), d.remaining()), (2, 0));

    let body = run(
        &mut h,
        &call(proc_::CONNECT_LOOKUP_SERVER, &srv_flags("admin")),
    )
    .0
    .unwrap();
    assert_eq!(Decoder::new(&body).string().unwrap(), "admin");
    let e = run(
        &mut h,
        &call(proc_::CONNECT_LOOKUP_SERVER, &srv_flags("nope")),
    )
    .0
    .unwrap_err();
    assert_eq!((e.code, e.domain), (95, 7));
    assert_eq!(e.message, "Server not found: No server named 'nope'");
}

#[test]
fn lib_version_open_and_close() {
    let mut h = Fake::default();
    let body = run(&mut h, &call(proc_::CONNECT_GET_LIB_VERSION, &[]))
        .0
        .unwrap();
    assert_eq!(Decoder::new(&body).u64().unwrap(), 9_000_000);
    let mut e = Encoder::new();
    e.u32(0);
    assert_eq!(
        run(&mut h, &call(proc_::CONNECT_OPEN, &e.finish()))
            .0
            .unwrap(),
        Vec::<u8>::new()
    );
    let mut e = Encoder::new();
    e.u32(4);
    let err = run(&mut h, &call(proc_::CONNECT_OPEN, &e.finish()))
        .0
        .unwrap_err();
    assert_eq!((err.code, err.domain), (8, 62));
    assert_eq!(
        err.message,
        "invalid argument: unsupported flags (0x4) in function adminDispatchConnectOpen"
    );
    let (r, out) = run(&mut h, &call(proc_::CONNECT_CLOSE, &[]));
    assert!(r.is_ok());
    assert!(matches!(out.last(), Some(Action::Close(_))));
}

#[test]
fn threadpool_reports_typed_params_and_refuses_changes() {
    let mut h = Fake::default();
    let body = run(
        &mut h,
        &call(
            proc_::SERVER_GET_THREADPOOL_PARAMETERS,
            &srv_flags("virtproxyd"),
        ),
    )
    .0
    .unwrap();
    let p = decode_params(&mut Decoder::new(&body));
    let names: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        names,
        [
            "minWorkers",
            "maxWorkers",
            "nWorkers",
            "freeWorkers",
            "prioWorkers",
            "jobQueueDepth"
        ]
    );
    assert_eq!(p[0].value, Value::UInt(2));

    let set = |params: &[(&str, Value)]| {
        let mut e = Encoder::new();
        e.string("virtproxyd");
        encode_params(&mut e, params);
        e.u32(0);
        call(proc_::SERVER_SET_THREADPOOL_PARAMETERS, &e.finish())
    };
    assert!(run(&mut h, &set(&[("maxWorkers", Value::UInt(2))]))
        .0
        .is_ok());
    let e = run(&mut h, &set(&[("maxWorkers", Value::UInt(9))]))
        .0
        .unwrap_err();
    assert_eq!((e.code, e.domain), (8, 0));
    let e = run(&mut h, &set(&[("minWorkers", Value::UInt(9))]))
        .0
        .unwrap_err();
    assert_eq!(
        e.message,
        "invalid argument: minWorkers cannot be larger than maxWorkers"
    );
    let e = run(&mut h, &set(&[("maxWorkers", Value::Int(2))]))
        .0
        .unwrap_err();
    assert_eq!(
        e.message,
        "invalid argument: invalid type 'int' for parameter 'maxWorkers', expected 'uint'"
    );
    let e = run(&mut h, &set(&[("bogus", Value::UInt(2))]))
        .0
        .unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (74, "argument unsupported: parameter 'bogus' not supported")
    );
}

#[test]
fn client_limits_get_and_set_with_libvirts_check() {
    let mut h = Fake::default();
    let body = run(
        &mut h,
        &call(proc_::SERVER_GET_CLIENT_LIMITS, &srv_flags("virtproxyd")),
    )
    .0
    .unwrap();
    let p = decode_params(&mut Decoder::new(&body));
    let got: Vec<(&str, Value)> = p
        .iter()
        .map(|p| (p.field.as_str(), p.value.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("nclients_max", Value::UInt(5000)),
            ("nclients", Value::UInt(2)),
            ("nclients_unauth_max", Value::UInt(20)),
            ("nclients_unauth", Value::UInt(0))
        ]
    );
    let set = |srv: &str, params: &[(&str, Value)]| {
        let mut e = Encoder::new();
        e.string(srv);
        encode_params(&mut e, params);
        e.u32(0);
        call(proc_::SERVER_SET_CLIENT_LIMITS, &e.finish())
    };
    assert!(run(
        &mut h,
        &set("virtproxyd", &[("nclients_max", Value::UInt(30))])
    )
    .0
    .is_ok());
    assert_eq!(h.limits, Some((30, 20)));
    let e = run(
        &mut h,
        &set("virtproxyd", &[("nclients_max", Value::UInt(10))]),
    )
    .0
    .unwrap_err();
    assert_eq!((e.code, e.domain), (8, 7));
    assert!(e
        .message
        .starts_with("invalid argument: The overall maximum number of clients waiting"));
    let e = run(&mut h, &set("x", &[])).0.unwrap_err();
    assert_eq!(
        (e.code, e.domain, e.message.as_str()),
        (
            95,
            62,
            "Server not found: no server with matching name 'x' found"
        )
    );
}

fn client_arg(srv: &str, id: u64) -> Vec<u8> {
    let mut e = Encoder::new();
    e.string(srv).u64(id).i64(0).u32(0).u32(0);
    e.finish()
}

#[test]
fn clients_are_listed_looked_up_described_and_closed() {
    let mut h = Fake::default();
    let mut e = Encoder::new();
    e.string("virtproxyd").u32(1).u32(0);
    let body = run(&mut h, &call(proc_::SERVER_LIST_CLIENTS, &e.finish()))
        .0
        .unwrap();
    let mut d = Decoder::new(&body);
    assert_eq!(d.u32().unwrap(), 2);
    assert_eq!(d.string().unwrap(), "virtproxyd");
    assert_eq!(
        (d.u64().unwrap(), d.i64().unwrap(), d.u32().unwrap()),
        (1, 1_700_000_000, 0)
    );
    let _ = (d.string(), d.u64(), d.i64(), d.u32());
    assert_eq!((d.u32().unwrap(), d.remaining()), (2, 0));

    let mut e = Encoder::new();
    e.string("virtproxyd").u64(2).u32(0);
    let body = run(&mut h, &call(proc_::SERVER_LOOKUP_CLIENT, &e.finish()))
        .0
        .unwrap();
    let mut d = Decoder::new(&body);
    assert_eq!(
        (d.string().unwrap(), d.u64().unwrap()),
        ("virtproxyd".into(), 2)
    );
    let mut e = Encoder::new();
    e.string("virtproxyd").u64(7).u32(0);
    let err = run(&mut h, &call(proc_::SERVER_LOOKUP_CLIENT, &e.finish()))
        .0
        .unwrap_err();
    assert_eq!(
        (err.code, err.domain, err.message.as_str()),
        (96, 7, "Client not found: No client with matching ID '7'")
    );

    let body = run(
        &mut h,
        &call(proc_::CLIENT_GET_INFO, &client_arg("virtproxyd", 1)),
    )
    .0
    .unwrap();
    let p = decode_params(&mut Decoder::new(&body));
    let got: Vec<(&str, Value)> = p
        .iter()
        .map(|p| (p.field.as_str(), p.value.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("readonly", Value::Boolean(0)),
            ("unix_user_id", Value::Int(1000)),
            ("unix_user_name", Value::Str("vpdtest".into())),
            ("unix_group_id", Value::Int(1000)),
            ("unix_group_name", Value::Str("vpdtest".into())),
            ("unix_process_id", Value::Int(4242)),
        ]
    );
    let body = run(
        &mut h,
        &call(proc_::CLIENT_GET_INFO, &client_arg("virtproxyd", 2)),
    )
    .0
    .unwrap();
    let p = decode_params(&mut Decoder::new(&body));
    let names: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(names, ["readonly", "sock_addr", "tls_x509_dname"]);
    let err = run(
        &mut h,
        &call(proc_::CLIENT_GET_INFO, &client_arg("virtproxyd", 9)),
    )
    .0
    .unwrap_err();
    assert_eq!(
        (err.code, err.domain, err.message.as_str()),
        (
            96,
            62,
            "Client not found: no client with matching id '9' found"
        )
    );

    assert!(run(
        &mut h,
        &call(proc_::CLIENT_CLOSE, &client_arg("virtproxyd", 2))
    )
    .0
    .is_ok());
    assert_eq!(h.closed, vec![2]);
    let err = run(
        &mut h,
        &call(proc_::CLIENT_CLOSE, &client_arg("virtproxyd", 9)),
    )
    .0
    .unwrap_err();
    assert_eq!(err.code, 96);
}

#[test]
fn logging_filters_and_outputs_round_trip() {
    let mut h = Fake::default();
    let body = run(
        &mut h,
        &call(proc_::CONNECT_GET_LOGGING_FILTERS, &0u32.to_be_bytes()),
    )
    .0
    .unwrap();
    let mut d = Decoder::new(&body);
    assert_eq!((d.opt_string().unwrap(), d.u32().unwrap()), (None, 0));
    let mut e = Encoder::new();
    e.opt_string(Some("1:rpc 3:util")).u32(0);
    assert!(run(
        &mut h,
        &call(proc_::CONNECT_SET_LOGGING_FILTERS, &e.finish())
    )
    .0
    .is_ok());
    let body = run(
        &mut h,
        &call(proc_::CONNECT_GET_LOGGING_FILTERS, &0u32.to_be_bytes()),
    )
    .0
    .unwrap();
    let mut d = Decoder::new(&body);
    assert_eq!(
        (d.opt_string().unwrap(), d.u32().unwrap()),
        (Some("1:*rpc* 3:*util* ".into()), 2)
    );
    let mut e = Encoder::new();
    e.opt_string(Some("x")).u32(0);
    let err = run(
        &mut h,
        &call(proc_::CONNECT_SET_LOGGING_FILTERS, &e.finish()),
    )
    .0
    .unwrap_err();
    assert_eq!(
        (err.code, err.domain, err.message.as_str()),
        (8, 0, "invalid argument: Malformed format for filter 'x'")
    );

    let mut e = Encoder::new();
    e.opt_string(Some("1:file:/tmp/a.log")).u32(0);
    assert!(run(
        &mut h,
        &call(proc_::CONNECT_SET_LOGGING_OUTPUTS, &e.finish())
    )
    .0
    .is_ok());
    let body = run(
        &mut h,
        &call(proc_::CONNECT_GET_LOGGING_OUTPUTS, &0u32.to_be_bytes()),
    )
    .0
    .unwrap();
    let mut d = Decoder::new(&body);
    assert_eq!(
        (d.string().unwrap(), d.u32().unwrap()),
        ("1:file:/tmp/a.log".into(), 1)
    );
}

#[test]
fn timeout_tls_unknown_procedures_and_bad_payloads() {
    let mut h = Fake::default();
    let mut e = Encoder::new();
    e.u32(7).u32(0);
    assert!(run(
        &mut h,
        &call(proc_::CONNECT_SET_DAEMON_TIMEOUT, &e.finish())
    )
    .0
    .is_ok());
    assert_eq!(h.timeout, Some(7));

    let err = run(
        &mut h,
        &call(proc_::SERVER_UPDATE_TLS_FILES, &srv_flags("virtproxyd")),
    )
    .0
    .unwrap_err();
    assert_eq!((err.code, err.domain), (1, 7));
    assert_eq!(
        err.message,
        "internal error: no tls service found, unable to update tls files"
    );
    h.tls = true;
    assert!(run(
        &mut h,
        &call(proc_::SERVER_UPDATE_TLS_FILES, &srv_flags("virtproxyd"))
    )
    .0
    .is_ok());
    assert!(h.tls_updated);
    assert!(run(
        &mut h,
        &call(proc_::SERVER_UPDATE_TLS_FILES, &srv_flags("admin"))
    )
    .0
    .is_err());

    let err = run(&mut h, &call(20, &[])).0.unwrap_err();
    assert_eq!(
        (err.code, err.domain, err.message.as_str()),
        (39, 7, "unknown procedure: 20")
    );
    let err = run(&mut h, &call(proc_::CONNECT_SET_DAEMON_TIMEOUT, &[0, 0]))
        .0
        .unwrap_err();
    assert_eq!(err.message, "Unable to decode message payload");
    let err = run(&mut h, &msg::call(program::REMOTE, 1, 9, &[])).0;
    assert!(err.is_err());
}

#[test]
fn keepalive_pings_are_answered_and_fds_close() {
    let mut h = Fake::default();
    let ping = {
        let mut f = msg::pong();
        // PING is procedure 1.
        f[12..16].copy_from_slice(&1u32.to_be_bytes());
        f
    };
    let hdr = Header::check(&ping).unwrap();
    let mut out = Vec::new();
    Session::new().on_frame(&hdr, &[], &mut h, &mut out);
    assert_eq!(out, vec![Action::ToClient(msg::pong())]);

    let mut f = call(proc_::CONNECT_GET_LIB_VERSION, &[]);
    f[16..20].copy_from_slice(&4u32.to_be_bytes()); // VIR_NET_CALL_WITH_FDS
    let hdr = Header::check(&f).unwrap();
    let mut out = Vec::new();
    let mut s = Session::new();
    s.on_frame(&hdr, &[], &mut h, &mut out);
    assert!(matches!(out.as_slice(), [Action::Close(_)]), "{out:?}");
}

#[test]
fn a_claimed_identity_is_described_by_what_was_set() {
    let params = vec![
        TypedParam {
            field: "user-name".into(),
            value: Value::Str("root".into()),
        },
        TypedParam {
            field: "unix-user-id".into(),
            value: Value::ULLong(0),
        },
        TypedParam {
            field: "process-id".into(),
            value: Value::LLong(77),
        },
        TypedParam {
            field: "sasl-user-name".into(),
            value: Value::Str("fred".into()),
        },
    ];
    let i = claimed_info(&params, true, true, None);
    let names: Vec<&str> = client_info_params(&i).iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "readonly",
            "sasl_user_name",
            "unix_user_id",
            "unix_user_name",
            "unix_process_id"
        ]
    );
    assert_eq!(i.pid, Some(77));
}

#[test]
fn the_relays_figures_follow_libvirts_parameters_with_their_types() {
    let mut i = ClientInfo {
        local: true,
        uid: Some(0),
        ..ClientInfo::default()
    };
    let mut stats = crate::registry::ClientStats {
        id: 3,
        bytes_to_daemon: 280,
        bytes_to_client: 360,
        calls: 10,
        idle_ms: None,
    };
    i.stats = Some((stats.clone(), 1_700_000_010_250));
    // No call yet: no last activity.
    let names: Vec<&str> = client_info_params(&i).iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "readonly",
            "unix_user_id",
            "bytes_to_daemon",
            "bytes_to_client",
            "calls"
        ]
    );
    stats.idle_ms = Some(2_500);
    i.stats = Some((stats, 1_700_000_010_250));
    let p = client_info_params(&i);
    assert_eq!(
        &p[2..],
        [
            ("bytes_to_daemon", Value::ULLong(280)),
            ("bytes_to_client", Value::ULLong(360)),
            ("calls", Value::ULLong(10)),
            ("last_activity", Value::LLong(1_700_000_007)),
        ]
    );
}

/// Any body for any procedure gets exactly one reply and never a panic.
#[test]
fn arbitrary_payloads_get_one_reply_each() {
    let mut h = Fake::default();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for proc_ in 0..=21 {
        for len in 0..96usize {
            let body: Vec<u8> = (0..len)
                .map(|i| {
                    if i % 4 == 3 {
                        next() as u8 & 0x3
                    } else {
                        next() as u8
                    }
                })
                .collect();
            let f = call(proc_, &body);
            let hdr = Header::check(&f).unwrap();
            let mut out = Vec::new();
            Session::new().on_frame(&hdr, &body, &mut h, &mut out);
            let replies = out
                .iter()
                .filter(|a| matches!(a, Action::ToClient(_)))
                .count();
            assert_eq!(replies, 1, "proc {proc_} len {len}: {out:?}");
        }
    }
}
