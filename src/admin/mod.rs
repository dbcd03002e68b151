//! libvirt's admin protocol (program 0x06900690, procedures 1–19 of libvirt 9.0.0) as a
//! sans-IO machine: a complete frame and a [`Host`] in, reply frames and a close out. The
//! encodings, typed parameter names and error texts are libvirt's (`admin_protocol.x`,
//! `admin_server_dispatch.c`, `admin_server.c`, `virnetserver.c`, `virnetdaemon.c`).
//! [`serve`] runs it on the admin thread against the live daemon.

pub mod serve;

use crate::proto::msg::{self, err_code, err_domain, RemoteError};
use crate::proto::set_identity::{decode_list, validate_against, TypedParam, Value};
use crate::proto::xdr::{Decoder, Encoder, XdrError};
use crate::proto::{keepalive_proc, program, Header, MsgStatus, MsgType};

/// `LIBVIR_VERSION_NUMBER` of the libvirt this daemon replaces (9.0.0).
pub const LIB_VERSION: u64 = 9_000_000;

/// `admin_procedure`.
pub mod proc_ {
    pub const CONNECT_OPEN: i32 = 1;
    pub const CONNECT_CLOSE: i32 = 2;
    pub const CONNECT_GET_LIB_VERSION: i32 = 3;
    pub const CONNECT_LIST_SERVERS: i32 = 4;
    pub const CONNECT_LOOKUP_SERVER: i32 = 5;
    pub const SERVER_GET_THREADPOOL_PARAMETERS: i32 = 6;
    pub const SERVER_SET_THREADPOOL_PARAMETERS: i32 = 7;
    pub const SERVER_LIST_CLIENTS: i32 = 8;
    pub const SERVER_LOOKUP_CLIENT: i32 = 9;
    pub const CLIENT_GET_INFO: i32 = 10;
    pub const CLIENT_CLOSE: i32 = 11;
    pub const SERVER_GET_CLIENT_LIMITS: i32 = 12;
    pub const SERVER_SET_CLIENT_LIMITS: i32 = 13;
    pub const CONNECT_GET_LOGGING_OUTPUTS: i32 = 14;
    pub const CONNECT_GET_LOGGING_FILTERS: i32 = 15;
    pub const CONNECT_SET_LOGGING_OUTPUTS: i32 = 16;
    pub const CONNECT_SET_LOGGING_FILTERS: i32 = 17;
    pub const SERVER_UPDATE_TLS_FILES: i32 = 18;
    pub const CONNECT_SET_DAEMON_TIMEOUT: i32 = 19;
}

/// XDR array bounds of `admin_protocol.x`.
const THREADPOOL_PARAMETERS_MAX: u32 = 32;
const CLIENT_LIST_MAX: u32 = 16384;
const CLIENT_LIMITS_MAX: u32 = 32;

use err_code::{NO_CLIENT as ERR_NO_CLIENT, NO_SERVER as ERR_NO_SERVER};

/// The two servers of libvirt's virtproxyd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// `virtproxyd`: the relayed clients.
    Proxy,
    /// `admin`: the admin socket's clients.
    Admin,
}

impl Server {
    /// The order of srv-list. libvirt's follows a hash table with a per-run random seed
    /// (`util/virhash.c`), so either order is libvirt's on some run; ours is fixed.
    pub const ALL: [Server; 2] = [Server::Proxy, Server::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Server::Proxy => "virtproxyd",
            Server::Admin => "admin",
        }
    }

    fn lookup(name: &str) -> Option<Server> {
        Server::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// `admin_nonnull_client` without its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRef {
    pub id: u64,
    pub timestamp: i64,
    pub transport: u32,
}

/// What `adminClientGetInfo` reports about a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    pub readonly: bool,
    /// The SASL user name (SASL authentication, or a client's own CONNECT_SET_IDENTITY).
    pub sasl_user_name: Option<String>,
    /// UNIX socket client (uid/gid/pid are reported) or not (address and DN are).
    pub local: bool,
    pub sock_addr: Option<String>,
    pub x509_dname: Option<String>,
    pub uid: Option<u32>,
    pub user_name: Option<String>,
    pub gid: Option<u32>,
    pub group_name: Option<String>,
    pub pid: Option<i32>,
    pub selinux_context: Option<String>,
    /// The relay's own figures for it (metrics on, and the client is on a worker), with the
    /// time they were read (milliseconds since the epoch).
    pub stats: Option<(crate::registry::ClientStats, u64)>,
}

/// `virNetServerGetThreadPoolParameters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub min: u32,
    pub max: u32,
    pub current: u32,
    pub free: u32,
    pub prio: u32,
    pub queue: u32,
}

/// Client counts and limits of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max: u32,
    pub current: u32,
    pub unauth_max: u32,
    pub unauth_current: u32,
}

/// The daemon as the admin protocol sees it.
pub trait Host {
    fn clients(&self, srv: Server) -> Vec<ClientRef>;
    fn client_info(&self, srv: Server, id: u64) -> Option<ClientInfo>;
    /// Whether the client exists (without the cost of its info's figures).
    fn has_client(&self, srv: Server, id: u64) -> bool {
        self.client_info(srv, id).is_some()
    }
    /// Closes a client; false if there is none with that id.
    fn close_client(&mut self, srv: Server, id: u64) -> bool;
    fn limits(&self, srv: Server) -> Limits;
    /// Already checked (max ≥ unauth max).
    fn set_limits(&mut self, srv: Server, max: u32, unauth_max: u32);
    fn pool(&self, srv: Server) -> Pool;
    /// The relay's workers are fixed at start; anything but the current values is refused.
    fn set_pool(
        &mut self,
        srv: Server,
        min: Option<u32>,
        max: Option<u32>,
        prio: Option<u32>,
    ) -> Result<(), RemoteError> {
        let p = self.pool(srv);
        let min_v = min.unwrap_or(p.min);
        let max_v = max.unwrap_or(p.max);
        if min_v > max_v {
            return Err(RemoteError::new(
                err_code::INVALID_ARG,
                err_domain::NONE,
                "minWorkers cannot be larger than maxWorkers",
            ));
        }
        if (min_v, max_v, prio.unwrap_or(p.prio)) != (p.min, p.max, p.prio) {
            return Err(RemoteError::new(
                err_code::INVALID_ARG,
                err_domain::NONE,
                format!(
                    "server '{}' has {} workers fixed at start-up ({}) and {} priority workers",
                    srv.name(),
                    p.max,
                    match srv {
                        Server::Proxy => "worker_threads",
                        Server::Admin => "one admin thread",
                    },
                    p.prio
                ),
            ));
        }
        Ok(())
    }
    /// Filters and outputs as `virLogGetFilters` / `virLogGetOutputs` print them.
    fn log_filters(&self) -> String;
    fn log_outputs(&self) -> String;
    /// The message is libvirt's (`virLogParseFilter`...).
    fn set_log_filters(&mut self, filters: &str) -> Result<(), String>;
    fn set_log_outputs(&mut self, outputs: &str) -> Result<(), String>;
    fn set_daemon_timeout(&mut self, secs: u32);
    /// Re-reads certificate, key, CA and CRL for new TLS connections.
    fn update_tls(&mut self, srv: Server) -> Result<(), RemoteError>;
}

/// What the I/O layer must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    ToClient(Vec<u8>),
    /// Close once the queued bytes are out.
    Close(String),
}

/// One admin connection's protocol state.
#[derive(Debug, Default)]
pub struct Session {
    closing: bool,
}

fn decode_failed() -> RemoteError {
    RemoteError::new(
        err_code::RPC,
        err_domain::RPC,
        "Unable to decode message payload",
    )
}

/// `virNetDaemonGetServer`'s error.
fn no_server_rpc(name: &str) -> RemoteError {
    RemoteError::new(
        ERR_NO_SERVER,
        err_domain::RPC,
        format!("No server named '{name}'"),
    )
}

/// The dispatchers that report their own, later error over `virNetDaemonGetServer`'s.
fn no_server_admin(name: &str) -> RemoteError {
    RemoteError::new(
        ERR_NO_SERVER,
        err_domain::ADMIN,
        format!("no server with matching name '{name}' found"),
    )
}

/// `virNetServerGetClient`'s error.
fn no_client_rpc(id: u64) -> RemoteError {
    RemoteError::new(
        ERR_NO_CLIENT,
        err_domain::RPC,
        format!("No client with matching ID '{id}'"),
    )
}

/// `virCheckFlags` in `func` (all admin calls take no flags).
fn check_flags(flags: u32, func: &str) -> Result<(), RemoteError> {
    if flags == 0 {
        Ok(())
    } else {
        Err(RemoteError::new(
            err_code::INVALID_ARG,
            err_domain::ADMIN,
            format!("unsupported flags (0x{flags:x}) in function {func}"),
        ))
    }
}

/// The "no TLS listener" error (libvirt's, when the server has no TLS service).
pub fn no_tls_service() -> RemoteError {
    RemoteError::new(
        err_code::INTERNAL_ERROR,
        err_domain::RPC,
        "no tls service found, unable to update tls files",
    )
}

/// `admin_typed_param` array encoding.
fn encode_params(e: &mut Encoder, params: &[(&str, Value)]) {
    e.u32(params.len() as u32);
    for (name, v) in params {
        e.string(name);
        match v {
            Value::Int(x) => e.i32(1).i32(*x),
            Value::UInt(x) => e.i32(2).u32(*x),
            Value::LLong(x) => e.i32(3).i64(*x),
            Value::ULLong(x) => e.i32(4).u64(*x),
            Value::Double(x) => e.i32(5).u64(x.to_bits()),
            Value::Boolean(x) => e.i32(6).i32(*x),
            Value::Str(s) => e.i32(7).string(s),
        };
    }
}

/// A reply that is one `admin_typed_param` array.
fn params_reply(params: &[(&str, Value)]) -> Vec<u8> {
    let mut e = Encoder::new();
    encode_params(&mut e, params);
    e.finish()
}

fn encode_client(e: &mut Encoder, srv: Server, c: &ClientRef) {
    e.string(srv.name())
        .u64(c.id)
        .i64(c.timestamp)
        .u32(c.transport);
}

/// The typed parameters of `adminClientGetInfo`, in its order.
pub fn client_info_params(i: &ClientInfo) -> Vec<(&'static str, Value)> {
    let mut p = vec![("readonly", Value::Boolean(i32::from(i.readonly)))];
    if let Some(n) = &i.sasl_user_name {
        p.push(("sasl_user_name", Value::Str(n.clone())));
    }
    if i.local {
        if let Some(uid) = i.uid {
            p.push(("unix_user_id", Value::Int(uid as i32)));
        }
        if let Some(n) = &i.user_name {
            p.push(("unix_user_name", Value::Str(n.clone())));
        }
        if let Some(gid) = i.gid {
            p.push(("unix_group_id", Value::Int(gid as i32)));
        }
        if let Some(n) = &i.group_name {
            p.push(("unix_group_name", Value::Str(n.clone())));
        }
        if let Some(pid) = i.pid {
            p.push(("unix_process_id", Value::Int(pid)));
        }
    } else {
        p.push((
            "sock_addr",
            Value::Str(i.sock_addr.clone().unwrap_or_default()),
        ));
        if let Some(dn) = &i.x509_dname {
            p.push(("tls_x509_dname", Value::Str(dn.clone())));
        }
    }
    if let Some(c) = &i.selinux_context {
        p.push(("selinux_context", Value::Str(c.clone())));
    }
    // Ours, after libvirt's (virt-admin prints every parameter the server returns): the
    // same figures and names as the metrics endpoint's `/clients` page.
    if let Some((s, now_ms)) = &i.stats {
        p.push(("bytes_to_daemon", Value::ULLong(s.bytes_to_daemon)));
        p.push(("bytes_to_client", Value::ULLong(s.bytes_to_client)));
        p.push(("calls", Value::ULLong(s.calls)));
        if s.idle_ms.is_some() {
            p.push(("last_activity", Value::LLong(s.last_activity(*now_ms))));
        }
    }
    p
}

/// The info of a client that set its own identity: only what it set (libvirt builds a new
/// identity from the parameters, `virIdentitySetParameters`).
pub fn claimed_info(
    params: &[TypedParam],
    local: bool,
    readonly: bool,
    sock_addr: Option<String>,
) -> ClientInfo {
    let mut i = ClientInfo {
        readonly,
        local,
        sock_addr,
        ..ClientInfo::default()
    };
    for p in params {
        match (p.field.as_str(), &p.value) {
            ("user-name", Value::Str(s)) => i.user_name = Some(s.clone()),
            ("unix-user-id", Value::ULLong(v)) => i.uid = Some(*v as u32),
            ("group-name", Value::Str(s)) => i.group_name = Some(s.clone()),
            ("unix-group-id", Value::ULLong(v)) => i.gid = Some(*v as u32),
            ("process-id", Value::LLong(v)) => i.pid = Some(*v as i32),
            ("sasl-user-name", Value::Str(s)) => i.sasl_user_name = Some(s.clone()),
            ("x509-distinguished-name", Value::Str(s)) => i.x509_dname = Some(s.clone()),
            ("selinux-context", Value::Str(s)) => i.selinux_context = Some(s.clone()),
            _ => {}
        }
    }
    i
}

/// Reads a `nonnull_server` name and resolves it.
/// The server a call names, then its flags, checked in the order libvirt checks them: an
/// unknown server (with the dispatcher's own error) before unsupported flags.
fn known_server(
    srv: Result<Server, String>,
    no_server: fn(&str) -> RemoteError,
    flags: u32,
    func: &str,
) -> Result<Server, RemoteError> {
    let srv = srv.map_err(|name| no_server(&name))?;
    check_flags(flags, func)?;
    Ok(srv)
}

fn server_arg(d: &mut Decoder<'_>) -> Result<Result<Server, String>, XdrError> {
    let name = d.string()?;
    Ok(Server::lookup(&name).ok_or(name))
}

/// The `UINT` values of the validated parameters named `names`.
fn uints(params: &[TypedParam], names: &[&str]) -> Vec<Option<u32>> {
    names
        .iter()
        .map(|n| {
            params
                .iter()
                .find(|p| p.field == *n)
                .and_then(|p| match p.value {
                    Value::UInt(v) => Some(v),
                    _ => None,
                })
        })
        .collect()
}

/// Why a call gets an error reply.
#[derive(Debug)]
enum CallError {
    /// Its arguments did not decode.
    Decode,
    /// It was refused or failed, with this error.
    Remote(RemoteError),
}

impl From<XdrError> for CallError {
    fn from(_: XdrError) -> Self {
        CallError::Decode
    }
}

impl From<RemoteError> for CallError {
    fn from(e: RemoteError) -> Self {
        CallError::Remote(e)
    }
}

impl From<CallError> for RemoteError {
    fn from(e: CallError) -> Self {
        match e {
            // libvirt's words whatever went wrong in the XDR (virNetMessageDecodePayload).
            CallError::Decode => decode_failed(),
            CallError::Remote(e) => e,
        }
    }
}

/// A successful call's reply body, or why there is none.
type Reply = Result<Vec<u8>, CallError>;

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one complete frame from the admin client.
    pub fn on_frame(
        &mut self,
        h: &Header,
        body: &[u8],
        host: &mut dyn Host,
        out: &mut Vec<Action>,
    ) {
        if self.closing {
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
                out.push(Action::Close("fd passing on the admin socket".into()));
                self.closing = true;
                return;
            }
            // libvirt drops every other message type from a client.
            _ => return,
        }
        let result = if h.prog != program::ADMIN || h.vers != 1 {
            Err(RemoteError::new(
                err_code::RPC,
                err_domain::RPC,
                format!("Cannot find program {} version {}", h.prog, h.vers),
            ))
        } else if h.status != MsgStatus::Ok {
            Err(RemoteError::new(
                err_code::RPC,
                err_domain::RPC,
                format!("Unexpected message status {}", h.status.to_wire()),
            ))
        } else {
            dispatch(h.proc_, &mut Decoder::new(body), host).map_err(RemoteError::from)
        };
        match result {
            Ok(body) => out.push(Action::ToClient(msg::ok_reply(h, &body))),
            Err(e) => {
                tracing::debug!(
                    proc_ = h.proc_,
                    code = e.code,
                    "admin call failed: {}",
                    e.message
                );
                out.push(Action::ToClient(msg::error_reply(h, &e)));
            }
        }
        if h.proc_ == proc_::CONNECT_CLOSE && h.prog == program::ADMIN {
            // virNetServerClientDelayedClose: the reply goes out, then the connection closes.
            self.closing = true;
            out.push(Action::Close("admin client closed its connection".into()));
        }
    }
}

/// Runs one call. Each procedure decodes all its arguments before it acts, as libvirt
/// decodes them before its dispatcher runs (virNetServerProgramDispatchCall): a malformed
/// body gets the decode error whatever else is wrong with the call.
fn dispatch(proc_: i32, d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    use proc_::*;
    match proc_ {
        CONNECT_OPEN => connect_open(d),
        CONNECT_CLOSE => Ok(Vec::new()),
        CONNECT_GET_LIB_VERSION => Ok(lib_version()),
        CONNECT_LIST_SERVERS => list_servers(d),
        CONNECT_LOOKUP_SERVER => lookup_server(d),
        SERVER_GET_THREADPOOL_PARAMETERS => get_threadpool(d, host),
        SERVER_SET_THREADPOOL_PARAMETERS => set_threadpool(d, host),
        SERVER_LIST_CLIENTS => list_clients(d, host),
        SERVER_LOOKUP_CLIENT => lookup_client(d, host),
        CLIENT_GET_INFO => client_info(d, host),
        CLIENT_CLOSE => client_close(d, host),
        SERVER_GET_CLIENT_LIMITS => get_client_limits(d, host),
        SERVER_SET_CLIENT_LIMITS => set_client_limits(d, host),
        CONNECT_GET_LOGGING_OUTPUTS => get_logging_outputs(d, host),
        CONNECT_GET_LOGGING_FILTERS => get_logging_filters(d, host),
        CONNECT_SET_LOGGING_OUTPUTS => set_logging(d, host, Logging::Outputs),
        CONNECT_SET_LOGGING_FILTERS => set_logging(d, host, Logging::Filters),
        SERVER_UPDATE_TLS_FILES => update_tls_files(d, host),
        CONNECT_SET_DAEMON_TIMEOUT => set_daemon_timeout(d, host),
        _ => Err(RemoteError::new(
            err_code::RPC,
            err_domain::RPC,
            format!("unknown procedure: {proc_}"),
        )
        .into()),
    }
}

fn connect_open(d: &mut Decoder<'_>) -> Reply {
    let flags = d.u32()?;
    check_flags(flags, "adminDispatchConnectOpen")?;
    Ok(Vec::new())
}

fn lib_version() -> Vec<u8> {
    let mut e = Encoder::new();
    e.u64(LIB_VERSION);
    e.finish()
}

fn list_servers(d: &mut Decoder<'_>) -> Reply {
    let need = d.u32()?;
    let flags = d.u32()?;
    check_flags(flags, "adminConnectListServers")?;
    let n = if need > 0 { Server::ALL.len() } else { 0 };
    let mut e = Encoder::new();
    e.u32(n as u32);
    for s in &Server::ALL[..n] {
        e.string(s.name());
    }
    e.u32(Server::ALL.len() as u32);
    Ok(e.finish())
}

fn lookup_server(d: &mut Decoder<'_>) -> Reply {
    let name = d.string()?;
    let flags = d.u32()?;
    check_flags(flags, "adminConnectLookupServer")?;
    let s = Server::lookup(&name).ok_or_else(|| no_server_rpc(&name))?;
    let mut e = Encoder::new();
    e.string(s.name());
    Ok(e.finish())
}

fn get_threadpool(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let srv = server_arg(d)?;
    let flags = d.u32()?;
    let srv = known_server(
        srv,
        no_server_rpc,
        flags,
        "adminServerGetThreadPoolParameters",
    )?;
    let p = host.pool(srv);
    Ok(params_reply(&[
        ("minWorkers", Value::UInt(p.min)),
        ("maxWorkers", Value::UInt(p.max)),
        ("nWorkers", Value::UInt(p.current)),
        ("freeWorkers", Value::UInt(p.free)),
        ("prioWorkers", Value::UInt(p.prio)),
        ("jobQueueDepth", Value::UInt(p.queue)),
    ]))
}

fn set_threadpool(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let srv = server_arg(d)?;
    let params = decode_list(d, THREADPOOL_PARAMETERS_MAX)?;
    let flags = d.u32()?;
    let srv = known_server(
        srv,
        no_server_admin,
        flags,
        "adminServerSetThreadPoolParameters",
    )?;
    const ALLOWED: &[(&str, i32, &str)] = &[
        ("minWorkers", 2, "uint"),
        ("maxWorkers", 2, "uint"),
        ("prioWorkers", 2, "uint"),
    ];
    validate_against(&params, ALLOWED)?;
    let v = uints(&params, &["minWorkers", "maxWorkers", "prioWorkers"]);
    host.set_pool(srv, v[0], v[1], v[2])?;
    Ok(Vec::new())
}

fn list_clients(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let srv = server_arg(d)?;
    let need = d.u32()?;
    let flags = d.u32()?;
    let srv = known_server(srv, no_server_rpc, flags, "adminServerListClients")?;
    let clients = host.clients(srv);
    if clients.len() > CLIENT_LIST_MAX as usize {
        return Err(RemoteError::new(
            err_code::INTERNAL_ERROR,
            err_domain::ADMIN,
            format!(
                "Too many clients '{}' for limit '{CLIENT_LIST_MAX}'",
                clients.len()
            ),
        )
        .into());
    }
    let listed: &[ClientRef] = if need > 0 { &clients } else { &[] };
    let mut e = Encoder::new();
    e.u32(listed.len() as u32);
    for c in listed {
        encode_client(&mut e, srv, c);
    }
    e.u32(clients.len() as u32);
    Ok(e.finish())
}

fn lookup_client(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let srv = server_arg(d)?;
    let id = d.u64()?;
    let flags = d.u32()?;
    let srv = known_server(srv, no_server_rpc, flags, "adminServerLookupClient")?;
    let c = host
        .clients(srv)
        .into_iter()
        .find(|c| c.id == id)
        .ok_or_else(|| no_client_rpc(id))?;
    let mut e = Encoder::new();
    encode_client(&mut e, srv, &c);
    Ok(e.finish())
}

/// An `admin_nonnull_client` argument: its server (looked up later, see `known_server`), id
/// and flags; the timestamp and transport are not checked, as in libvirt.
fn client_args(d: &mut Decoder<'_>) -> Result<(Result<Server, String>, u64, u32), XdrError> {
    let srv = server_arg(d)?;
    let id = d.u64()?;
    let _timestamp = d.i64()?;
    let _transport = d.u32()?;
    let flags = d.u32()?;
    Ok((srv, id, flags))
}

fn client_info(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let (srv, id, flags) = client_args(d)?;
    let srv = srv.map_err(|name| no_server_admin(&name))?;
    // libvirt looks the client up before it checks the flags.
    let info = host.client_info(srv, id).ok_or_else(|| {
        RemoteError::new(
            ERR_NO_CLIENT,
            err_domain::ADMIN,
            format!("no client with matching id '{id}' found"),
        )
    })?;
    check_flags(flags, "adminClientGetInfo")?;
    Ok(params_reply(&client_info_params(&info)))
}

fn client_close(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let (srv, id, flags) = client_args(d)?;
    let srv = srv.map_err(|name| no_server_rpc(&name))?;
    if !host.has_client(srv, id) {
        return Err(no_client_rpc(id).into());
    }
    check_flags(flags, "adminClientClose")?;
    if !host.close_client(srv, id) {
        return Err(no_client_rpc(id).into());
    }
    Ok(Vec::new())
}

fn get_client_limits(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let srv = server_arg(d)?;
    let flags = d.u32()?;
    let srv = known_server(srv, no_server_rpc, flags, "adminServerGetClientLimits")?;
    let l = host.limits(srv);
    Ok(params_reply(&[
        ("nclients_max", Value::UInt(l.max)),
        ("nclients", Value::UInt(l.current)),
        ("nclients_unauth_max", Value::UInt(l.unauth_max)),
        ("nclients_unauth", Value::UInt(l.unauth_current)),
    ]))
}

fn set_client_limits(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let srv = server_arg(d)?;
    let params = decode_list(d, CLIENT_LIMITS_MAX)?;
    let flags = d.u32()?;
    let srv = known_server(srv, no_server_admin, flags, "adminServerSetClientLimits")?;
    const ALLOWED: &[(&str, i32, &str)] = &[
        ("nclients_max", 2, "uint"),
        ("nclients_unauth_max", 2, "uint"),
    ];
    validate_against(&params, ALLOWED)?;
    let v = uints(&params, &["nclients_max", "nclients_unauth_max"]);
    let cur = host.limits(srv);
    let max = v[0].unwrap_or(cur.max);
    let unauth = v[1].unwrap_or(cur.unauth_max);
    if max < unauth {
        return Err(RemoteError::new(
            err_code::INVALID_ARG,
            err_domain::RPC,
            "The overall maximum number of clients waiting for authentication must \
             not be less than the overall maximum number of clients",
        )
        .into());
    }
    host.set_limits(srv, max, unauth);
    Ok(Vec::new())
}

fn get_logging_outputs(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let flags = d.u32()?;
    check_flags(flags, "adminConnectGetLoggingOutputs")?;
    let outputs = host.log_outputs();
    let n = outputs.split(' ').filter(|w| !w.is_empty()).count();
    let mut e = Encoder::new();
    e.string(&outputs).u32(n as u32);
    Ok(e.finish())
}

fn get_logging_filters(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let flags = d.u32()?;
    check_flags(flags, "adminConnectGetLoggingFilters")?;
    let filters = host.log_filters();
    let n = filters.split(' ').filter(|w| !w.is_empty()).count();
    // No filters travel as a NULL string.
    let mut e = Encoder::new();
    e.opt_string((n > 0).then_some(filters.as_str()))
        .u32(n as u32);
    Ok(e.finish())
}

/// Which of the two logging settings a set call changes.
#[derive(Clone, Copy)]
enum Logging {
    Outputs,
    Filters,
}

fn set_logging(d: &mut Decoder<'_>, host: &mut dyn Host, which: Logging) -> Reply {
    let text = d.opt_string()?;
    let flags = d.u32()?;
    let func = match which {
        Logging::Outputs => "adminConnectSetLoggingOutputs",
        Logging::Filters => "adminConnectSetLoggingFilters",
    };
    check_flags(flags, func)?;
    let text = text.unwrap_or_default();
    match which {
        Logging::Outputs => host.set_log_outputs(&text),
        Logging::Filters => host.set_log_filters(&text),
    }
    .map_err(|m| RemoteError::new(err_code::INVALID_ARG, err_domain::NONE, m))?;
    Ok(Vec::new())
}

fn update_tls_files(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let srv = server_arg(d)?;
    let flags = d.u32()?;
    let srv = known_server(srv, no_server_rpc, flags, "adminServerUpdateTlsFiles")?;
    match srv {
        Server::Admin => return Err(no_tls_service().into()),
        Server::Proxy => host.update_tls(srv)?,
    }
    Ok(Vec::new())
}

fn set_daemon_timeout(d: &mut Decoder<'_>, host: &mut dyn Host) -> Reply {
    let timeout = d.u32()?;
    let flags = d.u32()?;
    check_flags(flags, "adminConnectSetDaemonTimeout")?;
    host.set_daemon_timeout(timeout);
    Ok(Vec::new())
}

#[cfg(test)]
mod tests;
