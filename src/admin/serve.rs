//! The admin thread: it owns the `libvirt-admin-sock` listeners and their clients, so admin
//! calls never run on a relay worker. Admin traffic is rare and tiny; one thread with poll(2)
//! serves it. Clients whose uid is not the daemon's euid are dropped at accept, as
//! libvirt's `remoteAdmClientNew` drops them.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{Action, ClientInfo, ClientRef, Host, Limits, Pool, Server, Session};
use crate::identity::{Identity, NameCache};
use crate::listen::Listener;
use crate::logging::{self, LogControl};
use crate::proto::msg::{err_code, err_domain, RemoteError};
use crate::proto::{FrameError, Header};
use crate::registry::{now_epoch, transport};
use crate::shared::{over_max_clients, Shared};
use crate::tls::TlsSettings;

/// Re-reads the TLS files (certificate, key, CA, CRL) named by the running configuration.
pub type TlsReload = Box<dyn Fn() -> Result<TlsSettings, String> + Send>;

/// What the admin server needs from the rest of the daemon besides `Shared`.
#[derive(Default)]
pub struct AdminOpts {
    /// None when logging was not installed through `logging::install` (tests).
    pub log: Option<LogControl>,
    /// For the default output when outputs are reset to "".
    pub log_settings: logging::Settings,
    pub tls_reload: Option<TlsReload>,
    /// `admin_max_clients`.
    pub max_clients: u32,
}

/// Largest admin frame (the biggest real call, a log filter or output list, is a few KiB):
/// a client whose pending frame says more is dropped.
const RX_LIMIT: usize = 256 * 1024;
/// Replies queued for an admin client beyond which it is neither read nor answered until it
/// reads (a client that never reads cannot grow this).
const TX_CAP: usize = 64 * 1024;

struct AdminConn {
    stream: UnixStream,
    session: Session,
    rx: Vec<u8>,
    tx: Vec<u8>,
    closing: Option<String>,
    timestamp: i64,
    identity: Identity,
}

struct AdminServer {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    opts: AdminOpts,
    workers: u32,
    conns: BTreeMap<u64, AdminConn>,
    next_id: u64,
    /// `admin` server limits (its unauth limit has no meaning: auth is always none there).
    max_clients: u32,
    unauth_max: u32,
    names: NameCache,
}

/// Starts the admin thread on `listeners`; it stops when `shared.shutdown` is set.
pub fn spawn(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    workers: usize,
    opts: AdminOpts,
) -> io::Result<JoinHandle<()>> {
    // 0 is kept: as for the proxy server, libvirt then lets one client in and no more.
    let max_clients = opts.max_clients;
    let mut server = AdminServer {
        listeners,
        shared,
        opts,
        workers: workers as u32,
        conns: BTreeMap::new(),
        next_id: 1,
        max_clients,
        unauth_max: 0,
        names: NameCache::default(),
    };
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || server.run())
}

impl AdminServer {
    fn run(&mut self) {
        while !self.shared.shutdown.load(Ordering::Acquire) {
            self.turn();
        }
        // A hand-over passes the admin sockets on (a copy of each): their files stay.
        if !self.shared.handover.requested.load(Ordering::Acquire) {
            for l in &self.listeners {
                l.unlink();
            }
        }
        for _ in 0..self.conns.len() {
            self.shared.registry.admin_disconnected();
        }
    }

    fn turn(&mut self) {
        let accepting = !over_max_clients(
            self.conns.len(),
            self.max_clients as usize,
            self.next_id > 1,
        );
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        let mut ready: Vec<bool> = Vec::new();
        {
            let mut fds = Vec::new();
            if accepting {
                fds.extend(
                    self.listeners
                        .iter()
                        .map(|l| PollFd::new(l.fd.as_fd(), PollFlags::POLLIN)),
                );
            }
            for c in self.conns.values() {
                // poll is level-triggered: a client not read now must not be polled for input.
                let mut f = if c.tx.len() < TX_CAP {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                };
                if !c.tx.is_empty() {
                    f |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(c.stream.as_fd(), f));
            }
            // Short timeout: the shutdown flag is checked between polls.
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("admin poll failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    return;
                }
            }
            ready.extend(
                fds.iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty())),
            );
        }
        let nl = if accepting { self.listeners.len() } else { 0 };
        let listeners_ready: Vec<usize> = (0..nl).filter(|&i| ready[i]).collect();
        for i in listeners_ready {
            self.accept(i);
        }
        for (k, id) in ids.into_iter().enumerate() {
            if ready.get(nl + k).copied().unwrap_or(false) {
                self.service(id);
            }
        }
    }

    fn accept(&mut self, index: usize) {
        loop {
            let raw = match nix::sys::socket::accept4(
                self.listeners[index].fd.as_raw_fd(),
                nix::sys::socket::SockFlag::SOCK_NONBLOCK
                    | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            ) {
                Ok(raw) => raw,
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => return,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    return;
                }
            };
            // SAFETY: accept4 returned a fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let identity = match Identity::of_unix_peer_cached(fd.as_fd(), &mut self.names) {
                Ok(id) => id,
                Err(e) => {
                    tracing::info!("dropping admin client whose credentials cannot be read: {e}");
                    continue;
                }
            };
            let (uid, pid) = identity
                .unix
                .as_ref()
                .map_or((u32::MAX, -1), |u| (u.uid, u.pid));
            let euid = nix::unistd::geteuid().as_raw();
            if uid != euid {
                // libvirt's words (remoteAdmClientNew); the socket is then simply closed.
                tracing::error!("Disallowing client {pid} with uid {uid}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            tracing::info!(admin_client = id, uid, pid, "admin client connected");
            self.shared.registry.admin_connected();
            self.conns.insert(
                id,
                AdminConn {
                    stream: UnixStream::from(fd),
                    session: Session::new(),
                    rx: Vec::new(),
                    tx: Vec::new(),
                    closing: None,
                    timestamp: now_epoch(),
                    identity,
                },
            );
            if over_max_clients(self.conns.len(), self.max_clients as usize, true) {
                return;
            }
        }
    }

    fn service(&mut self, id: u64) {
        if let Err(why) = self.drive(id) {
            self.drop_conn(id, &why);
        }
    }

    fn drop_conn(&mut self, id: u64, why: &str) {
        if self.conns.remove(&id).is_some() {
            self.shared.registry.admin_disconnected();
            tracing::info!(admin_client = id, "admin connection closed: {why}");
        }
    }

    fn drive(&mut self, id: u64) -> Result<(), String> {
        let mut eof = false;
        {
            let c = self.conns.get_mut(&id).ok_or("gone")?;
            let mut chunk = [0u8; 16 * 1024];
            // Read only while the client takes its replies; at most one frame past the
            // frames it has complete.
            while c.tx.len() < TX_CAP && c.rx.len() <= RX_LIMIT {
                match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        c.rx.extend_from_slice(&chunk[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        }
        // Answer and write until the client stops taking replies or has no whole frame left.
        loop {
            // Frames are handled one at a time: a frame may close another admin client.
            loop {
                let Some(c) = self.conns.get_mut(&id) else {
                    return Ok(());
                };
                if c.closing.is_some() || c.tx.len() >= TX_CAP {
                    break;
                }
                let h = match Header::check(&c.rx) {
                    Ok(h) if h.len as usize > RX_LIMIT => {
                        return Err(format!("admin frame of {} bytes is too large", h.len))
                    }
                    Ok(h) if c.rx.len() >= h.len as usize => h,
                    Ok(_) | Err(FrameError::Incomplete) => break,
                    Err(e) => return Err(format!("bad frame: {e}")),
                };
                let frame: Vec<u8> = c.rx.drain(..h.len as usize).collect();
                let mut session = std::mem::take(&mut c.session);
                let mut out = Vec::new();
                let mut to_close = Vec::new();
                {
                    let mut host = self.host(&mut to_close);
                    session.on_frame(&h, &frame[Header::SIZE..], &mut host, &mut out);
                    let (max, unauth) = (host.admin_max, host.admin_unauth_max);
                    self.max_clients = max;
                    self.unauth_max = unauth;
                }
                if let Some(c) = self.conns.get_mut(&id) {
                    c.session = session;
                    for a in out {
                        match a {
                            Action::ToClient(b) => c.tx.extend_from_slice(&b),
                            Action::Close(why) => c.closing = Some(why),
                        }
                    }
                }
                for other in to_close {
                    if other == id {
                        if let Some(c) = self.conns.get_mut(&id) {
                            c.closing.get_or_insert_with(|| "closed by itself".into());
                        }
                    } else {
                        self.drop_conn(other, "closed by an admin request");
                    }
                }
            }
            let c = self.conns.get_mut(&id).ok_or("gone")?;
            while !c.tx.is_empty() {
                match c.stream.write(&c.tx) {
                    Ok(n) => {
                        c.tx.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("write: {e}")),
                }
            }
            let whole_frame = Header::check(&c.rx).is_ok_and(|h| c.rx.len() >= h.len as usize);
            if c.closing.is_some() || c.tx.len() >= TX_CAP || !whole_frame {
                break;
            }
        }
        let c = self.conns.get_mut(&id).ok_or("gone")?;
        if c.tx.is_empty() {
            if let Some(why) = c.closing.take() {
                return Err(why);
            }
        }
        if eof {
            return Err("admin client closed".into());
        }
        Ok(())
    }

    fn host<'a>(&'a self, to_close: &'a mut Vec<u64>) -> Live<'a> {
        Live {
            server: self,
            to_close,
            admin_max: self.max_clients,
            admin_unauth_max: self.unauth_max,
        }
    }
}

/// The live daemon behind the admin protocol, for one call.
struct Live<'a> {
    server: &'a AdminServer,
    /// Admin clients to close after the call (they are owned by the loop).
    to_close: &'a mut Vec<u64>,
    admin_max: u32,
    admin_unauth_max: u32,
}

fn info_of(identity: &Identity, local: bool, readonly: bool, addr: Option<String>) -> ClientInfo {
    let u = identity.unix.as_ref();
    ClientInfo {
        readonly,
        sasl_user_name: identity.sasl_user_name.clone(),
        local,
        sock_addr: addr,
        x509_dname: identity.x509_dname.clone(),
        uid: u.map(|u| u.uid),
        user_name: u.and_then(|u| u.user_name.clone()),
        gid: u.map(|u| u.gid),
        group_name: u.and_then(|u| u.group_name.clone()),
        pid: u.map(|u| u.pid),
        selinux_context: identity.selinux_context.clone(),
        stats: None,
    }
}

impl Host for Live<'_> {
    fn clients(&self, srv: Server) -> Vec<ClientRef> {
        match srv {
            Server::Proxy => self
                .server
                .shared
                .registry
                .list()
                .into_iter()
                .map(|r| ClientRef {
                    id: r.id,
                    timestamp: r.timestamp,
                    transport: r.transport(),
                })
                .collect(),
            Server::Admin => self
                .server
                .conns
                .iter()
                .map(|(id, c)| ClientRef {
                    id: *id,
                    timestamp: c.timestamp,
                    transport: transport::UNIX,
                })
                .collect(),
        }
    }

    fn client_info(&self, srv: Server, id: u64) -> Option<ClientInfo> {
        match srv {
            Server::Proxy => {
                let registry = &self.server.shared.registry;
                let r = registry.get(id)?;
                let local = r.kind.is_unix();
                let mut info = match &r.claimed {
                    Some(params) => super::claimed_info(params, local, r.readonly(), r.peer_addr),
                    None => info_of(&r.identity, local, r.readonly(), r.peer_addr.clone()),
                };
                // Asks the client's worker alone, and waits for it at most this long.
                info.stats = registry
                    .client_stats(id, std::time::Duration::from_millis(500))
                    .map(|s| (s, crate::registry::now_epoch_ms()));
                Some(info)
            }
            Server::Admin => {
                let c = self.server.conns.get(&id)?;
                Some(info_of(&c.identity, true, false, None))
            }
        }
    }

    fn has_client(&self, srv: Server, id: u64) -> bool {
        match srv {
            Server::Proxy => self.server.shared.registry.get(id).is_some(),
            Server::Admin => self.server.conns.contains_key(&id),
        }
    }

    fn close_client(&mut self, srv: Server, id: u64) -> bool {
        match srv {
            Server::Proxy => self.server.shared.registry.request_disconnect(id),
            Server::Admin => {
                let known = self.server.conns.contains_key(&id);
                if known {
                    self.to_close.push(id);
                }
                known
            }
        }
    }

    fn limits(&self, srv: Server) -> Limits {
        let s = &self.server.shared;
        let n = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Acquire) as u32;
        match srv {
            Server::Proxy => Limits {
                max: n(&s.max_clients),
                current: n(&s.clients),
                unauth_max: n(&s.max_anonymous_clients),
                unauth_current: n(&s.unauthenticated),
            },
            Server::Admin => Limits {
                max: self.admin_max,
                current: self.server.conns.len() as u32,
                unauth_max: self.admin_unauth_max,
                unauth_current: 0,
            },
        }
    }

    fn set_limits(&mut self, srv: Server, max: u32, unauth_max: u32) {
        match srv {
            Server::Proxy => {
                let s = &self.server.shared;
                s.max_clients.store(max as usize, Ordering::Release);
                s.max_anonymous_clients
                    .store(unauth_max as usize, Ordering::Release);
                s.limits_set.store(true, Ordering::Release);
                tracing::info!(
                    max_clients = max,
                    max_anonymous_clients = unauth_max,
                    "client limits changed by an admin call"
                );
            }
            Server::Admin => {
                self.admin_max = max;
                self.admin_unauth_max = unauth_max;
            }
        }
    }

    fn pool(&self, srv: Server) -> Pool {
        // A relay worker never holds a job the way libvirt's dispatch threads do: every worker
        // is always free to take more connections, and nothing queues.
        let n = match srv {
            Server::Proxy => self.server.workers,
            Server::Admin => 1,
        };
        Pool {
            min: n,
            max: n,
            current: n,
            free: n,
            prio: 0,
            queue: 0,
        }
    }

    fn log_filters(&self) -> String {
        self.server
            .opts
            .log
            .as_ref()
            .map(|l| l.filters())
            .unwrap_or_default()
    }

    fn log_outputs(&self) -> String {
        self.server
            .opts
            .log
            .as_ref()
            .map(|l| l.outputs())
            .unwrap_or_default()
    }

    fn set_log_filters(&mut self, filters: &str) -> Result<(), String> {
        let log = self
            .server
            .opts
            .log
            .as_ref()
            .ok_or("logging is not adjustable")?;
        log.set_filters(filters).map_err(|e| e.0)?;
        tracing::info!("log filters set by an admin call: '{filters}'");
        Ok(())
    }

    fn set_log_outputs(&mut self, outputs: &str) -> Result<(), String> {
        let log = self
            .server
            .opts
            .log
            .as_ref()
            .ok_or("logging is not adjustable")?;
        log.set_outputs(outputs, &self.server.opts.log_settings)
            .map_err(|e| e.0)?;
        tracing::info!("log outputs set by an admin call: '{outputs}'");
        Ok(())
    }

    fn set_daemon_timeout(&mut self, secs: u32) {
        tracing::info!(secs, "idle timeout set by an admin call");
        self.server.shared.registry.set_idle_timeout(secs);
    }

    fn update_tls(&mut self, _srv: Server) -> Result<(), RemoteError> {
        let shared = &self.server.shared;
        let reload = match (&self.server.opts.tls_reload, shared.tls.load().is_some()) {
            (Some(r), true) => r,
            _ => return Err(super::no_tls_service()),
        };
        match reload() {
            Ok(t) => {
                shared.tls.store(Some(Arc::new(t)));
                tracing::info!("TLS files re-read by an admin call (for new connections)");
                Ok(())
            }
            Err(e) => Err(RemoteError::new(
                err_code::INTERNAL_ERROR,
                err_domain::RPC,
                format!("cannot update tls files: {e}"),
            )),
        }
    }
}
