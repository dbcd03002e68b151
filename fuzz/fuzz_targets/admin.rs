#![no_main]
//! Arbitrary admin client frames fed to the admin protocol's sans-IO `Session`, against a fake
//! daemon whose clients, limits and log settings come from the input too. Invariants:
//! - no panic;
//! - after a CONNECT_CLOSE (or fd passing) the session says nothing more;
//! - a keepalive PING gets exactly a PONG, every other keepalive or non-call frame nothing;
//! - CALL_WITH_FDS gets exactly a Close, no reply;
//! - every CALL gets exactly one reply, first: a well-formed frame (`Header::check` passes, its
//!   length word is its size) echoing the call's program, version, procedure and serial, type
//!   REPLY, status OK or ERROR; an ERROR body is one whole `remote_error`;
//! - a call to another program or version, or to an unknown procedure, is an ERROR;
//! - only an admin CONNECT_CLOSE is followed by a Close;
//! - the host is only asked what its contract allows: `set_limits` with max ≥ unauth max,
//!   `close_client` only for a client `client_info` knows.
use libfuzzer_sys::fuzz_target;
use virtproxyd::admin::{
    proc_, Action, ClientInfo, ClientRef, Host, Limits, Pool, Server, Session,
};
use virtproxyd::proto::msg::RemoteError;
use virtproxyd::proto::xdr::{Decoder, Encoder};
use virtproxyd::proto::{keepalive_proc, program, Header, MsgStatus, MsgType};

#[path = "input.rs"]
mod input;
use input::Input;

/// Longest string drawn from the input.
const STRING_MAX: usize = 24;

/// A daemon whose state is drawn from the input.
struct Fake {
    clients: Vec<ClientRef>,
    /// Ids (on the proxy server) that have info; the rest vanish between list and lookup.
    with_info: Vec<u64>,
    close_ok: bool,
    limits: (u32, u32),
    pool: Pool,
    filters: String,
    outputs: String,
    tls: bool,
}

impl Fake {
    fn new(inp: &mut Input<'_>) -> Self {
        let n = inp.u8() % 5;
        let clients: Vec<ClientRef> = (0..n)
            .map(|i| ClientRef {
                id: u64::from(inp.u8() % 8),
                timestamp: i64::from(inp.u32() as i32),
                transport: u32::from(i % 3),
            })
            .collect();
        let with_info = clients
            .iter()
            .map(|c| c.id)
            .filter(|_| inp.u8() & 1 == 1)
            .collect();
        let flags = inp.u8();
        let (min, max) = (u32::from(inp.u8() % 4), u32::from(inp.u8() % 4));
        Fake {
            clients,
            with_info,
            close_ok: flags & 1 == 1,
            limits: (u32::from(inp.u8()), u32::from(inp.u8())),
            pool: Pool {
                min,
                max,
                current: max,
                free: 0,
                prio: u32::from(inp.u8() % 2),
                queue: 0,
            },
            filters: inp.string(STRING_MAX),
            outputs: inp.string(STRING_MAX),
            tls: flags & 2 == 2,
        }
    }
}

impl Host for Fake {
    fn clients(&self, _srv: Server) -> Vec<ClientRef> {
        self.clients.clone()
    }
    fn client_info(&self, srv: Server, id: u64) -> Option<ClientInfo> {
        (srv == Server::Proxy && self.with_info.contains(&id)).then(|| ClientInfo {
            local: id % 2 == 0,
            uid: Some(id as u32),
            pid: Some(id as i32),
            sock_addr: Some("127.0.0.1;5555".into()),
            sasl_user_name: (id % 3 == 0).then(|| "user".into()),
            x509_dname: Some("CN=x".into()),
            ..ClientInfo::default()
        })
    }
    fn close_client(&mut self, srv: Server, id: u64) -> bool {
        assert!(
            self.client_info(srv, id).is_some(),
            "close_client for a client the host does not know: {srv:?} {id}"
        );
        self.close_ok
    }
    fn limits(&self, _srv: Server) -> Limits {
        Limits {
            max: self.limits.0,
            current: 1,
            unauth_max: self.limits.1,
            unauth_current: 0,
        }
    }
    fn set_limits(&mut self, _srv: Server, max: u32, unauth_max: u32) {
        assert!(
            max >= unauth_max,
            "set_limits({max}, {unauth_max}) not checked"
        );
        self.limits = (max, unauth_max);
    }
    fn pool(&self, _srv: Server) -> Pool {
        self.pool
    }
    fn log_filters(&self) -> String {
        self.filters.clone()
    }
    fn log_outputs(&self) -> String {
        self.outputs.clone()
    }
    fn set_log_filters(&mut self, filters: &str) -> Result<(), String> {
        let parsed = virtproxyd::logging::spec::parse_filters(filters).map_err(|e| e.0)?;
        self.filters = virtproxyd::logging::spec::format_filters(&parsed);
        Ok(())
    }
    fn set_log_outputs(&mut self, outputs: &str) -> Result<(), String> {
        virtproxyd::logging::spec::parse_outputs(outputs).map_err(|e| e.0)?;
        self.outputs = outputs.into();
        Ok(())
    }
    fn set_daemon_timeout(&mut self, _secs: u32) {}
    fn update_tls(&mut self, _srv: Server) -> Result<(), RemoteError> {
        if self.tls {
            Ok(())
        } else {
            Err(virtproxyd::admin::no_tls_service())
        }
    }
}

/// A server name: mostly one of ours, sometimes anything.
fn server_name(inp: &mut Input<'_>, e: &mut Encoder) {
    match inp.u8() % 4 {
        0 | 1 => e.string("virtproxyd"),
        2 => e.string("admin"),
        _ => e.string(&inp.string(STRING_MAX)),
    };
}

/// An `admin_typed_param` array, mostly of the names the setters know.
fn params(inp: &mut Input<'_>, e: &mut Encoder) {
    const NAMES: &[&str] = &[
        "minWorkers",
        "maxWorkers",
        "prioWorkers",
        "nclients_max",
        "nclients_unauth_max",
    ];
    let n = inp.u8() % 4;
    e.u32(u32::from(n));
    for _ in 0..n {
        let sel = inp.u8();
        if sel & 0x80 == 0 {
            e.string(NAMES[sel as usize % NAMES.len()]);
        } else {
            e.string(&inp.string(STRING_MAX));
        }
        // Mostly UINT; any other discriminant now and then (one without an arm too).
        match inp.u8() % 8 {
            0 => e.i32(1).i32(inp.u32() as i32),
            1 => e.i32(7).string(&inp.string(STRING_MAX)),
            2 => e.i32(9),
            _ => e.i32(2).u32(u32::from(inp.u8())),
        };
    }
}

/// Arguments shaped for procedure `p`, with flags mostly zero.
fn structured_body(p: i32, inp: &mut Input<'_>) -> Vec<u8> {
    let mut e = Encoder::new();
    let flags = |inp: &mut Input<'_>| {
        let f = inp.u8();
        if f < 0xf0 {
            0
        } else {
            u32::from(f & 0xf)
        }
    };
    match p {
        proc_::CONNECT_OPEN
        | proc_::CONNECT_GET_LOGGING_OUTPUTS
        | proc_::CONNECT_GET_LOGGING_FILTERS => {
            e.u32(flags(inp));
        }
        proc_::CONNECT_LIST_SERVERS => {
            e.u32(u32::from(inp.u8() % 3)).u32(flags(inp));
        }
        proc_::CONNECT_LOOKUP_SERVER
        | proc_::SERVER_GET_THREADPOOL_PARAMETERS
        | proc_::SERVER_GET_CLIENT_LIMITS
        | proc_::SERVER_UPDATE_TLS_FILES => {
            server_name(inp, &mut e);
            e.u32(flags(inp));
        }
        proc_::SERVER_SET_THREADPOOL_PARAMETERS | proc_::SERVER_SET_CLIENT_LIMITS => {
            server_name(inp, &mut e);
            params(inp, &mut e);
            e.u32(flags(inp));
        }
        proc_::SERVER_LIST_CLIENTS => {
            server_name(inp, &mut e);
            e.u32(u32::from(inp.u8() % 3)).u32(flags(inp));
        }
        proc_::SERVER_LOOKUP_CLIENT => {
            server_name(inp, &mut e);
            e.u64(u64::from(inp.u8() % 8)).u32(flags(inp));
        }
        proc_::CLIENT_GET_INFO | proc_::CLIENT_CLOSE => {
            server_name(inp, &mut e);
            e.u64(u64::from(inp.u8() % 8)).i64(0).u32(0).u32(flags(inp));
        }
        proc_::CONNECT_SET_LOGGING_OUTPUTS | proc_::CONNECT_SET_LOGGING_FILTERS => {
            let s = inp.string(STRING_MAX);
            e.opt_string((inp.u8() & 1 == 0).then_some(s.as_str()));
            e.u32(flags(inp));
        }
        proc_::CONNECT_SET_DAEMON_TIMEOUT => {
            e.u32(inp.u32()).u32(flags(inp));
        }
        _ => {}
    }
    let mut body = e.finish();
    // Now and then cut the arguments short, or leave garbage after them.
    match inp.u8() % 8 {
        0 => {
            let keep = inp.u8() as usize % (body.len() + 1);
            body.truncate(keep);
        }
        1 => {
            let n = inp.u8() as usize % 8;
            body.extend_from_slice(inp.bytes(n));
        }
        _ => {}
    }
    body
}

/// The next frame: a control byte picks a well-formed admin call with shaped arguments, or a
/// header and body taken raw from the input (any program, type, status).
fn next_frame(inp: &mut Input<'_>, serial: &mut u32) -> Vec<u8> {
    let ctl = inp.u8();
    let (mut h, body) = if ctl & 0x80 == 0 {
        *serial = serial.wrapping_add(1 + u32::from(ctl & 3));
        let p = i32::from(inp.u8() % 21);
        let mut h = Header {
            len: 0,
            prog: program::ADMIN,
            vers: 1,
            proc_: p,
            mtype: MsgType::Call,
            serial: *serial,
            status: MsgStatus::Ok,
        };
        match ctl & 0x70 {
            0x10 => h.prog = program::KEEPALIVE,
            0x20 => h.mtype = MsgType::from_wire(inp.u32() % 8),
            0x30 => h.status = MsgStatus::from_wire(inp.u32() % 4),
            0x40 => h.vers = inp.u32(),
            _ => {}
        }
        (h, structured_body(p, inp))
    } else {
        let mut raw = [0u8; Header::SIZE];
        let src = inp.bytes(Header::SIZE - 4);
        raw[4..4 + src.len()].copy_from_slice(src);
        raw[..4].copy_from_slice(&(Header::SIZE as u32).to_be_bytes());
        let h = Header::check(&raw).expect("a 28-byte frame has a valid length");
        let n = inp.u8() as usize * 4 + (ctl as usize & 3);
        (h, inp.bytes(n).to_vec())
    };
    h.len = 0;
    virtproxyd::proto::frame::build(h, &body)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mut host = Fake::new(&mut inp);
    let mut session = Session::new();
    let mut closed = false;
    let mut serial = 0u32;
    let mut out = Vec::new();
    while !inp.is_empty() {
        let frame = next_frame(&mut inp, &mut serial);
        let h = Header::check(&frame).expect("built frames are valid");
        assert_eq!(h.len as usize, frame.len());
        out.clear();
        session.on_frame(&h, &frame[Header::SIZE..], &mut host, &mut out);
        if closed {
            assert!(out.is_empty(), "output after close: {out:?}");
            continue;
        }
        if h.prog == program::KEEPALIVE {
            if h.mtype == MsgType::Message && h.proc_ == keepalive_proc::PING {
                assert_eq!(out, vec![Action::ToClient(virtproxyd::proto::msg::pong())]);
            } else {
                assert!(out.is_empty(), "{out:?}");
            }
            continue;
        }
        match h.mtype {
            MsgType::Call => {}
            MsgType::CallWithFds => {
                assert!(matches!(out.as_slice(), [Action::Close(_)]), "{out:?}");
                closed = true;
                continue;
            }
            _ => {
                assert!(out.is_empty(), "{out:?}");
                continue;
            }
        }
        let Some(Action::ToClient(reply)) = out.first() else {
            panic!("a call without a reply: {out:?}");
        };
        let rh = Header::check(reply).expect("the reply has a valid header");
        assert_eq!(
            rh.len as usize,
            reply.len(),
            "length word is the reply's size"
        );
        assert_eq!(
            (rh.prog, rh.vers, rh.proc_, rh.serial, rh.mtype),
            (h.prog, h.vers, h.proc_, h.serial, MsgType::Reply),
            "the reply echoes the call"
        );
        let body = &reply[Header::SIZE..];
        match rh.status {
            MsgStatus::Ok => {
                assert!(h.prog == program::ADMIN && h.vers == 1 && h.status == MsgStatus::Ok);
                assert!(
                    (1..=19).contains(&h.proc_),
                    "unknown procedure {} answered OK",
                    h.proc_
                );
                if h.proc_ == proc_::CONNECT_GET_LIB_VERSION {
                    let mut d = Decoder::new(body);
                    assert_eq!(d.u64().ok(), Some(virtproxyd::admin::LIB_VERSION));
                    assert_eq!(d.remaining(), 0);
                }
            }
            MsgStatus::Error => {
                // A whole `remote_error`: it decodes, and encodes back to the same bytes (the
                // fields `decode` skips are constants of `encode`).
                let e =
                    RemoteError::decode(&mut Decoder::new(body)).expect("the error body decodes");
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
        let close = h.prog == program::ADMIN && h.proc_ == proc_::CONNECT_CLOSE;
        match &out[1..] {
            [] => assert!(!close, "CONNECT_CLOSE without a Close"),
            [Action::Close(_)] => {
                assert!(close, "Close after {h:?}");
                closed = true;
            }
            other => panic!("more than a reply: {other:?}"),
        }
    }
});
