//! SASL authentication of clients (`auth_* = "sasl"`), as libvirt's remote dispatcher does it
//! (procedures 67–69): the wire encodings and the checks after completion (sans-IO, used by
//! the handshake), and the threads that run the Cyrus calls so a relay worker never waits for
//! a KDC, a sasldb or a slow plugin.
//!
//! A worker sends a [`Request`] carrying the connection's [`cyrus::ServerSession`] (moved,
//! never shared); a SASL thread runs the call and sends the [`Answer`] with the session back
//! to that worker's channel, then wakes it through its eventfd (as `polkit.rs` does).

pub mod cyrus;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::proto::msg::{err_code, err_domain, RemoteError};
use crate::proto::xdr::{Decoder, Encoder, XdrError};
use cyrus::ServerSession;

/// REMOTE_AUTH_SASL_DATA_MAX: the longest token either side may send.
pub const DATA_MAX: usize = 65536;

/// The lowest SSF libvirt accepts on plain TCP once SASL completes (fixed in
/// `remoteSASLFinish`, whatever `tcp_min_ssf` says; that one bounds the negotiation).
pub const TCP_FINISH_MIN_SSF: u32 = 56;

/// Exchanges in flight at once.
const THREADS: usize = 2;

/// The only error a client ever sees from the SASL calls: libvirt resets whatever went wrong
/// and reports this (the reason is logged).
pub fn auth_failed() -> RemoteError {
    RemoteError::new(
        err_code::AUTH_FAILED,
        err_domain::RPC,
        "authentication failed",
    )
}

/// Token data as libvirt's protocol declares it (`char data<65536>`): rpcgen turns a
/// variable-length `char` array into `xdr_array` of `xdr_char`, so each byte travels as a
/// 4-byte big-endian int (sign-extended), not as XDR opaque.
fn put_data(e: &mut Encoder, data: &[u8]) {
    e.u32(data.len() as u32);
    for &b in data {
        e.i32(i32::from(b as i8));
    }
}

fn take_data(d: &mut Decoder<'_>) -> Result<Vec<u8>, XdrError> {
    let n = d.u32()? as usize;
    if n > DATA_MAX {
        return Err(XdrError::TooLong(DATA_MAX));
    }
    if d.remaining() < n.saturating_mul(4) {
        return Err(XdrError::Truncated);
    }
    // xdr_char keeps the low byte of each int.
    (0..n).map(|_| d.u32().map(|w| w as u8)).collect()
}

/// `{nil, data}` as libvirt reads it: `None` when nil is set. libtirpc leaves a zero-length
/// array as a NULL pointer, so an empty token reaches Cyrus as NULL in libvirt as well; the
/// caller decides (see [`cyrus_input`]).
fn take_opt_data(d: &mut Decoder<'_>) -> Result<Option<Vec<u8>>, XdrError> {
    let nil = d.i32()?;
    let data = take_data(d)?;
    Ok(if nil != 0 { None } else { Some(data) })
}

/// AUTH_SASL_START arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartArgs {
    pub mech: String,
    pub data: Option<Vec<u8>>,
}

pub fn decode_start(body: &[u8]) -> Result<StartArgs, XdrError> {
    let mut d = Decoder::new(body);
    let mech = d.string()?;
    let data = take_opt_data(&mut d)?;
    Ok(StartArgs { mech, data })
}

/// AUTH_SASL_STEP arguments.
pub fn decode_step(body: &[u8]) -> Result<Option<Vec<u8>>, XdrError> {
    take_opt_data(&mut Decoder::new(body))
}

/// The token handed to Cyrus for a client token: libvirt's XDR layer turns an empty array
/// into a NULL pointer, so `Some(empty)` is passed as NULL just as libvirt passes it.
pub fn cyrus_input(data: Option<&[u8]>) -> Option<&[u8]> {
    data.filter(|d| !d.is_empty())
}

/// AUTH_SASL_INIT reply body.
pub fn init_ret(mechlist: &str) -> Vec<u8> {
    let mut e = Encoder::new();
    e.string(mechlist);
    e.finish()
}

/// AUTH_SASL_START/STEP reply body: `{complete, nil, data}`, NULL (nil = 1) kept apart from
/// an empty token.
pub fn exchange_ret(complete: bool, data: Option<&[u8]>) -> Vec<u8> {
    let mut e = Encoder::new();
    e.i32(i32::from(complete));
    e.i32(i32::from(data.is_none()));
    put_data(&mut e, data.unwrap_or(&[]));
    e.finish()
}

/// Encodes START arguments (tests, and clients written in Rust).
pub fn start_args(mech: &str, data: Option<&[u8]>) -> Vec<u8> {
    let mut e = Encoder::new();
    e.string(mech);
    e.i32(i32::from(data.is_none()));
    put_data(&mut e, data.unwrap_or(&[]));
    e.finish()
}

/// Encodes STEP arguments.
pub fn step_args(data: Option<&[u8]>) -> Vec<u8> {
    let mut e = Encoder::new();
    e.i32(i32::from(data.is_none()));
    put_data(&mut e, data.unwrap_or(&[]));
    e.finish()
}

/// Decodes a START/STEP reply (tests).
pub fn decode_exchange_ret(body: &[u8]) -> Result<(bool, Option<Vec<u8>>), XdrError> {
    let mut d = Decoder::new(body);
    let complete = d.i32()? != 0;
    Ok((complete, take_opt_data(&mut d)?))
}

/// Why a completed exchange is still refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("negotiated SSF {0} was not strong enough")]
    WeakSsf(u32),
    #[error("no client username was found")]
    NoUsername,
    #[error("SASL client identity '{0}' not allowed by ACL")]
    NotAllowed(String),
}

/// The checks after Cyrus says the client is authenticated: on plain TCP the negotiated SSF
/// must reach 56; the user name must match `sasl_allowed_username_list` (unset: everyone;
/// empty: no one). Returns the user name.
pub fn finish(
    secure: bool,
    ssf: u32,
    username: Option<&str>,
    allowed: Option<&[String]>,
) -> Result<String, Denied> {
    if !secure && ssf < TCP_FINISH_MIN_SSF {
        return Err(Denied::WeakSsf(ssf));
    }
    let user = username.ok_or(Denied::NoUsername)?;
    match allowed {
        Some(list) if !list.iter().any(|p| crate::glob::glob_match(p, user)) => {
            Err(Denied::NotAllowed(user.to_string()))
        }
        _ => Ok(user.to_string()),
    }
}

/// A socket address as Cyrus wants it and libvirt formats it: "ip;port" (IPv6 without
/// brackets); a UNIX socket is "127.0.0.1;0".
pub fn sasl_addr(sa: &nix::sys::socket::SockaddrStorage) -> Option<String> {
    if let Some(v4) = sa.as_sockaddr_in() {
        Some(format!("{};{}", v4.ip(), v4.port()))
    } else if let Some(v6) = sa.as_sockaddr_in6() {
        Some(format!("{};{}", v6.ip(), v6.port()))
    } else if sa.as_unix_addr().is_some() {
        Some("127.0.0.1;0".into())
    } else {
        None
    }
}

/// Our end's and the client's address of a client socket, for `sasl_server_new`.
pub fn addresses(fd: &OwnedFd) -> (Option<String>, Option<String>) {
    use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
    let raw = fd.as_raw_fd();
    let local = getsockname::<SockaddrStorage>(raw).ok();
    let remote = getpeername::<SockaddrStorage>(raw).ok();
    (
        local.as_ref().and_then(sasl_addr),
        remote.as_ref().and_then(sasl_addr),
    )
}

/// How a session is set up (AUTH_SASL_INIT), from the listener the client came through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// "ip;port" of our end and the client's ("127.0.0.1;0" for UNIX sockets, as libvirt).
    pub local: Option<String>,
    pub remote: Option<String>,
    /// TLS: the cipher's key size in bits, the strength under SASL.
    pub external_ssf: Option<u32>,
    /// UNIX or TLS: no SSF needed and anonymous allowed; plain TCP: `tcp_min_ssf`..100000,
    /// no anonymous or plaintext mechanisms.
    pub secure: bool,
    pub tcp_min_ssf: u32,
}

/// A Cyrus call for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Init(Setup),
    Start(StartArgs),
    Step(Option<Vec<u8>>),
}

/// What came of an [`Op`] (the reason of a failure is for the log only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Mechanisms(String),
    Exchange {
        complete: bool,
        data: Option<Vec<u8>>,
        /// Read when complete: the negotiated SSF and SASL_USERNAME.
        ssf: u32,
        username: Option<String>,
    },
    Failed(String),
}

/// Runs one call. Init makes the session; any failure ends it (the client may start over
/// with AUTH_SASL_INIT, as with libvirt).
pub fn run(op: Op, session: Option<ServerSession>) -> (Outcome, Option<ServerSession>) {
    match op {
        Op::Init(setup) => match init(&setup) {
            Ok((s, list)) => (Outcome::Mechanisms(list), Some(s)),
            Err(why) => (Outcome::Failed(why), None),
        },
        Op::Start(args) => {
            let Some(mut s) = session else {
                return (Outcome::Failed("no SASL session".into()), None);
            };
            let r = s.start(&args.mech, cyrus_input(args.data.as_deref()));
            exchange(s, r, "Failed to start SASL negotiation")
        }
        Op::Step(data) => {
            let Some(mut s) = session else {
                return (Outcome::Failed("no SASL session".into()), None);
            };
            let r = s.step(cyrus_input(data.as_deref()));
            exchange(s, r, "Failed to step SASL negotiation")
        }
    }
}

fn init(setup: &Setup) -> Result<(ServerSession, String), String> {
    let fail = |what: &str, e: cyrus::SaslError| format!("{what}: {e}");
    let mut s = ServerSession::new(setup.local.as_deref(), setup.remote.as_deref())
        .map_err(|e| fail("Failed to create SASL server context", e))?;
    if let Some(ssf) = setup.external_ssf {
        s.set_external_ssf(ssf)
            .map_err(|e| fail("cannot set external SSF", e))?;
    }
    if setup.secure {
        s.set_security(0, 0, true)
    } else {
        s.set_security(setup.tcp_min_ssf, 100_000, false)
    }
    .map_err(|e| fail("cannot set security props", e))?;
    let list = s
        .mechanisms()
        .map_err(|e| fail("cannot list SASL mechanisms", e))?;
    if list.is_empty() {
        return Err("no SASL mechanisms are available".into());
    }
    Ok((s, list))
}

fn exchange(
    s: ServerSession,
    r: Result<cyrus::Exchange, cyrus::SaslError>,
    what: &str,
) -> (Outcome, Option<ServerSession>) {
    let x = match r {
        Ok(x) => x,
        Err(e) => return (Outcome::Failed(format!("{what}: {e}")), None),
    };
    let (mut ssf, mut username) = (0, None);
    if x.complete {
        match (s.ssf(), s.username()) {
            (Ok(v), Ok(u)) => (ssf, username) = (v, u),
            (Err(e), _) | (_, Err(e)) => {
                return (
                    Outcome::Failed(format!("cannot query SASL ssf or username: {e}")),
                    None,
                )
            }
        }
    }
    (
        Outcome::Exchange {
            complete: x.complete,
            data: x.data,
            ssf,
            username,
        },
        Some(s),
    )
}

/// A call asked by a worker for one of its connections.
#[derive(Debug)]
pub struct Request {
    pub worker: usize,
    pub slot: usize,
    pub gen: u32,
    pub conn: u64,
    pub op: Op,
    pub session: Option<ServerSession>,
}

/// The outcome, with the session, sent back to the worker that asked.
#[derive(Debug)]
pub struct Answer {
    pub slot: usize,
    pub gen: u32,
    pub outcome: Outcome,
    pub session: Option<ServerSession>,
}

impl crate::offload::Request for Request {
    fn worker(&self) -> usize {
        self.worker
    }
}

/// Starts the SASL threads; one link per worker eventfd in `wakers`.
pub fn start(wakers: &[OwnedFd]) -> io::Result<Vec<crate::offload::Link<Request, Answer>>> {
    // Fail early, at start-up, if libsasl2 cannot be initialised (bad plugin dir, …).
    if let Err(e) = cyrus::server_init() {
        return Err(io::Error::other(format!(
            "failed to initialize SASL library: {e}"
        )));
    }
    crate::offload::start("sasl", THREADS, wakers, |req: Request| {
        let (outcome, session) = run(req.op, req.session);
        if let Outcome::Failed(why) = &outcome {
            tracing::info!(conn = req.conn, "SASL authentication failed: {why}");
        }
        Answer {
            slot: req.slot,
            gen: req.gen,
            outcome,
            session,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_travel_as_xdr_char_arrays_with_nil_kept_apart() {
        // complete=0, nil=0, two bytes, each a 4-byte int (0xff sign-extended as xdr_char does).
        let b = exchange_ret(false, Some(&[0x41, 0xff]));
        assert_eq!(
            b,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0x41, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            decode_exchange_ret(&b).unwrap(),
            (false, Some(vec![0x41, 0xff]))
        );
        // NULL: nil=1, no bytes; empty: nil=0, no bytes.
        assert_eq!(
            exchange_ret(true, None),
            [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(
            exchange_ret(true, Some(&[])),
            [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let s = decode_start(&start_args("SCRAM-SHA-256", Some(b"n,,n=u"))).unwrap();
        assert_eq!(s.mech, "SCRAM-SHA-256");
        assert_eq!(s.data.as_deref(), Some(&b"n,,n=u"[..]));
        assert_eq!(decode_start(&start_args("X", None)).unwrap().data, None);
        assert_eq!(decode_step(&step_args(Some(&[]))).unwrap(), Some(vec![]));
        assert_eq!(decode_step(&step_args(None)).unwrap(), None);
        // Empty reaches Cyrus as NULL, as libtirpc hands it to libvirt.
        assert_eq!(cyrus_input(Some(&[])), None);
        assert_eq!(cyrus_input(Some(b"x")), Some(&b"x"[..]));
        assert_eq!(init_ret("A,B"), [0, 0, 0, 3, b'A', b',', b'B', 0]);
    }

    #[test]
    fn oversized_or_short_tokens_do_not_decode() {
        let mut e = Encoder::new();
        e.i32(0).u32(DATA_MAX as u32 + 1);
        assert_eq!(decode_step(&e.finish()), Err(XdrError::TooLong(DATA_MAX)));
        let mut e = Encoder::new();
        e.i32(0).u32(3).i32(1);
        assert_eq!(decode_step(&e.finish()), Err(XdrError::Truncated));
        // A huge claimed length with little behind it fails without allocating for it.
        let mut e = Encoder::new();
        e.string("M").i32(0).u32(DATA_MAX as u32);
        assert_eq!(decode_start(&e.finish()), Err(XdrError::Truncated));
    }

    #[test]
    fn completion_checks_ssf_on_tcp_and_the_username_list() {
        let list = vec!["bars*".to_string(), "admin".to_string()];
        assert_eq!(
            finish(true, 0, Some("barsuser"), Some(&list)),
            Ok("barsuser".into())
        );
        assert_eq!(finish(true, 0, Some("other"), None), Ok("other".into()));
        assert_eq!(
            finish(true, 0, Some("other"), Some(&list)),
            Err(Denied::NotAllowed("other".into()))
        );
        // An empty list lets nobody in.
        assert_eq!(
            finish(true, 0, Some("admin"), Some(&[])),
            Err(Denied::NotAllowed("admin".into()))
        );
        assert_eq!(
            finish(false, 0, Some("admin"), None),
            Err(Denied::WeakSsf(0))
        );
        assert_eq!(
            Denied::WeakSsf(55).to_string(),
            "negotiated SSF 55 was not strong enough"
        );
        assert_eq!(finish(false, 56, Some("admin"), None), Ok("admin".into()));
        assert_eq!(finish(true, 0, None, None), Err(Denied::NoUsername));
    }

    #[test]
    fn every_failure_reaches_the_client_as_libvirts_auth_failed() {
        let e = auth_failed();
        assert_eq!((e.code, e.domain), (45, 7));
        assert_eq!(e.message, "authentication failed: authentication failed");
    }

    #[test]
    fn addresses_are_formatted_as_libvirt_gives_them_to_cyrus() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let fd: OwnedFd = a.into();
        let (l, _) = addresses(&fd);
        assert_eq!(l.as_deref(), Some("127.0.0.1;0"));
        let v6: std::net::SocketAddr = "[::1]:16509".parse().unwrap();
        let ss = nix::sys::socket::SockaddrStorage::from(v6);
        assert_eq!(sasl_addr(&ss).as_deref(), Some("::1;16509"));
        let v4: std::net::SocketAddr = "10.0.0.1:16514".parse().unwrap();
        let ss = nix::sys::socket::SockaddrStorage::from(v4);
        assert_eq!(sasl_addr(&ss).as_deref(), Some("10.0.0.1;16514"));
    }

    #[test]
    fn calls_without_a_session_fail_and_an_init_lists_mechanisms() {
        let (o, s) = run(Op::Step(None), None);
        assert!(matches!(o, Outcome::Failed(_)) && s.is_none());
        let setup = Setup {
            local: Some("127.0.0.1;0".into()),
            remote: Some("127.0.0.1;0".into()),
            external_ssf: None,
            secure: true,
            tcp_min_ssf: 56,
        };
        // Depends on the installed plugins: either a list and a session, or a failure.
        match run(Op::Init(setup), None) {
            (Outcome::Mechanisms(l), Some(_)) => assert!(!l.is_empty()),
            (Outcome::Failed(_), None) => {}
            other => panic!("{other:?}"),
        }
    }
}
