//! The metrics thread: its listeners (TCP, UNIX, or activated), one poll(2) loop over them and
//! up to [`MAX_CONNS`] connections, each with a deadline. One request per connection, then
//! `Connection: close`. A client that is slow, sends too much or sends garbage loses only its
//! own connection: the others are polled alongside it, and at [`MAX_CONNS`] the listeners
//! wait in the kernel backlog until a slot frees (at the latest at the oldest deadline).

use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{accept4, recv, send, MsgFlags, SockFlag};

use super::encode::{render, REQUEST_RESULTS};
use super::http::{self, Parsed, Request, Status};
use super::Source;
use crate::config::MetricsListen;
use crate::listen::{ListenError, ListenerKind};

/// Connections served at once.
pub const MAX_CONNS: usize = 64;
/// From accept to the last byte of the response. Prometheus's default scrape timeout is
/// 10 s; a client slower than that gets nothing. `VIRTPROXYD_METRICS_DEADLINE_MS` overrides it.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// How long a `/clients` answer is reused. A fresh one wakes every relay worker to walk its
/// connections; reused, a client polling `/clients` in a loop costs the relay at most one
/// such collection per interval (per worker), and it sees figures at most this old.
pub const CLIENTS_PAGE_REUSE: Duration = Duration::from_secs(1);
/// listen(2) backlog of the sockets we create.
const BACKLOG: i32 = 64;
/// Mode of a UNIX metrics socket: the owner and `unix_sock_group` may scrape.
const UNIX_MODE: u32 = 0o660;

/// One listening socket of the endpoint.
#[derive(Debug)]
pub struct MetricsSocket {
    fd: OwnedFd,
    /// A socket file we created (unlinked when the thread stops).
    path: Option<PathBuf>,
    /// For logs.
    what: String,
}

impl MetricsSocket {
    /// An activated socket (systemd owns the file, if any).
    pub fn activated(fd: OwnedFd) -> MetricsSocket {
        MetricsSocket {
            fd,
            path: None,
            what: "virtproxyd-metrics.socket".into(),
        }
    }
}

/// Binds every `metrics_listen` address; a UNIX socket gets [`UNIX_MODE`] and `group`.
pub fn bind(
    addrs: &[MetricsListen],
    group: Option<&str>,
) -> Result<Vec<MetricsSocket>, ListenError> {
    let mut out = Vec::new();
    for addr in addrs {
        let what = addr.to_string();
        let err = |source: io::Error| ListenError::Io {
            path: PathBuf::from(&what),
            source,
        };
        match addr {
            MetricsListen::Unix(path) => {
                // The kind only tags the Listener; this socket never reaches the acceptor.
                let l = crate::listen::bind_unix(
                    path,
                    UNIX_MODE,
                    group,
                    BACKLOG as u32,
                    ListenerKind::UnixRo,
                )?;
                out.push(MetricsSocket {
                    fd: l.fd,
                    path: l.path,
                    what,
                });
            }
            MetricsListen::Tcp { host, port } => {
                let resolved: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(err)?
                    .collect();
                if resolved.is_empty() {
                    return Err(err(io::Error::new(io::ErrorKind::NotFound, "no address")));
                }
                for sa in resolved {
                    let l = std::net::TcpListener::bind(sa).map_err(|e| ListenError::Io {
                        path: PathBuf::from(sa.to_string()),
                        source: e,
                    })?;
                    l.set_nonblocking(true).map_err(err)?;
                    out.push(MetricsSocket {
                        fd: OwnedFd::from(l),
                        path: None,
                        what: sa.to_string(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The running thread.
pub struct Handle {
    stop: Arc<AtomicBool>,
    waker: OwnedFd,
    thread: JoinHandle<()>,
}

impl Handle {
    /// Stops the thread (its socket files are unlinked) and waits for it.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        crate::sys::wake(&self.waker);
        let _ = self.thread.join();
    }
}

/// The per-request deadline, from the environment or [`DEADLINE`].
pub fn deadline_from_env() -> Duration {
    match std::env::var("VIRTPROXYD_METRICS_DEADLINE_MS") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                tracing::warn!(
                    "ignoring VIRTPROXYD_METRICS_DEADLINE_MS={v:?} (want milliseconds > 0)"
                );
                DEADLINE
            }
        },
        Err(_) => DEADLINE,
    }
}

/// Starts the `metrics` thread on `sockets`.
pub fn spawn(
    sockets: Vec<MetricsSocket>,
    source: Arc<Source>,
    deadline: Duration,
) -> io::Result<Handle> {
    let waker = crate::sys::eventfd()?;
    let stop = Arc::new(AtomicBool::new(false));
    for s in &sockets {
        tracing::info!("metrics endpoint listening on {}", s.what);
    }
    let mut server = Server {
        sockets,
        source,
        deadline,
        conns: Vec::new(),
        clients_page: None,
        waker: waker.try_clone()?,
        stop: stop.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || server.run())?;
    Ok(Handle {
        stop,
        waker,
        thread,
    })
}

struct Conn {
    fd: OwnedFd,
    rx: Vec<u8>,
    /// The response once the request is complete, and how much of it is sent.
    tx: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// What to do with a connection after an I/O step.
enum Step {
    Keep,
    Close,
}

struct Server {
    sockets: Vec<MetricsSocket>,
    source: Arc<Source>,
    deadline: Duration,
    conns: Vec<Conn>,
    /// The last `/clients` body and when its collection ended (see [`CLIENTS_PAGE_REUSE`]).
    clients_page: Option<(Instant, String)>,
    waker: OwnedFd,
    stop: Arc<AtomicBool>,
}

/// The `/clients` body: the last one if it is younger than `reuse`, else a fresh collection
/// (each counted by how it was answered).
fn clients_page<'a>(
    source: &Source,
    cache: &'a mut Option<(Instant, String)>,
    reuse: Duration,
) -> &'a str {
    let fresh = cache.as_ref().is_some_and(|(at, _)| at.elapsed() < reuse);
    source.count_clients_page(!fresh);
    if !fresh {
        let body = source.clients_json();
        // Stamped when the collection ended: a slow one (a worker late to answer) is not
        // followed at once by another.
        *cache = Some((Instant::now(), body));
    }
    cache.as_ref().map_or("", |(_, b)| b.as_str())
}

fn result_index(name: &str) -> usize {
    REQUEST_RESULTS.iter().position(|r| *r == name).unwrap_or(0)
}

impl Server {
    fn run(&mut self) {
        while !self.stop.load(Ordering::Acquire) {
            if let Err(e) = self.turn() {
                tracing::error!("metrics endpoint stopped: {e}");
                break;
            }
        }
        for s in &self.sockets {
            if let Some(p) = &s.path {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn turn(&mut self) -> io::Result<()> {
        let now = Instant::now();
        // Expired connections go first: their slots are the ones the listeners wait for.
        let before = self.conns.len();
        self.conns.retain(|c| c.deadline > now);
        for _ in self.conns.len()..before {
            self.source.count_request(result_index("timeout"));
        }
        let accepting = self.conns.len() < MAX_CONNS;
        let mut fds = vec![PollFd::new(self.waker.as_fd(), PollFlags::POLLIN)];
        let nsock = if accepting { self.sockets.len() } else { 0 };
        fds.extend(
            self.sockets[..nsock]
                .iter()
                .map(|s| PollFd::new(s.fd.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(self.conns.iter().map(|c| {
            let ev = if c.tx.is_some() {
                PollFlags::POLLOUT
            } else {
                PollFlags::POLLIN
            };
            PollFd::new(c.fd.as_fd(), ev)
        }));
        let wait = self
            .conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        // Round up so a deadline is not polled for in a busy loop of 0 ms waits.
        let ms = u16::try_from(wait.as_millis() + 1).unwrap_or(1000);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            crate::sys::drain_eventfd(&self.waker);
        }
        // Connections first (their indices are the poll order), then new ones.
        let mut i = self.conns.len();
        while i > 0 {
            i -= 1;
            if ready[1 + nsock + i] {
                if let Step::Close = self.step(i) {
                    self.conns.swap_remove(i);
                }
            }
        }
        for s in 0..nsock {
            if ready[1 + s] {
                self.accept(s);
            }
        }
        Ok(())
    }

    fn accept(&mut self, s: usize) {
        while self.conns.len() < MAX_CONNS {
            match accept4(
                self.sockets[s].fd.as_raw_fd(),
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            ) {
                Ok(raw) => {
                    // SAFETY: accept4 returned a fresh descriptor.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    self.conns.push(Conn {
                        fd,
                        rx: Vec::new(),
                        tx: None,
                        deadline: Instant::now() + self.deadline,
                    });
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => {
                    // EMFILE and the like: the next turn tries again; nothing else suffers.
                    tracing::debug!("metrics accept on {} failed: {e}", self.sockets[s].what);
                    return;
                }
            }
        }
    }

    fn step(&mut self, i: usize) -> Step {
        let source = &self.source;
        let cache = &mut self.clients_page;
        let c = &mut self.conns[i];
        if c.tx.is_none() {
            let mut buf = [0u8; 2048];
            let n = match recv(c.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => return Step::Close,
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Step::Keep,
                Err(_) => return Step::Close,
            };
            c.rx.extend_from_slice(&buf[..n]);
            let out = match http::parse(&c.rx) {
                Parsed::Incomplete => return Step::Keep,
                Parsed::Bad(status) => {
                    source.count_request(result_index(match status {
                        Status::TooLarge => "too_large",
                        Status::VersionNotSupported => "version_not_supported",
                        _ => "bad_request",
                    }));
                    http::error_response(status, false)
                }
                Parsed::Done(Request::NotFound { head }) => {
                    source.count_request(result_index("not_found"));
                    http::error_response(Status::NotFound, head)
                }
                Parsed::Done(Request::Clients { head }) => {
                    source.count_request(result_index("ok"));
                    source.note_activity();
                    let body = clients_page(source, cache, CLIENTS_PAGE_REUSE);
                    http::response(Status::Ok, "application/json", body.as_bytes(), head)
                }
                Parsed::Done(Request::MethodNotAllowed) => {
                    source.count_request(result_index("method_not_allowed"));
                    http::error_response(Status::MethodNotAllowed, false)
                }
                Parsed::Done(Request::Metrics { head, format }) => {
                    // Counted before the snapshot, so a scrape sees itself (as in most
                    // exporters); the idle timer restarts.
                    source.count_request(result_index("ok"));
                    source.note_activity();
                    let body = render(&source.snapshot(), format);
                    http::response(Status::Ok, format.content_type(), body.as_bytes(), head)
                }
            };
            c.rx = Vec::new();
            c.tx = Some((out, 0));
        }
        let Some((out, sent)) = c.tx.as_mut() else {
            return Step::Keep;
        };
        while *sent < out.len() {
            match send(c.fd.as_raw_fd(), &out[*sent..], MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => *sent += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Step::Keep,
                Err(_) => return Step::Close,
            }
        }
        // All sent: half-close so the client reads the end of the body, then drop.
        let _ = nix::sys::socket::shutdown(c.fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        Step::Close
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_page_is_reused_within_its_interval() {
        let shared = Arc::new(crate::shared::test_shared());
        let source = Source::new(shared, std::time::SystemTime::now(), 1);
        let mut cache = None;
        let reuse = Duration::from_millis(200);
        for _ in 0..5 {
            assert_eq!(
                clients_page(&source, &mut cache, reuse),
                "{\"clients\":[]}\n"
            );
        }
        assert_eq!(source.snapshot().clients_pages, [1, 4]);
        std::thread::sleep(reuse + Duration::from_millis(20));
        clients_page(&source, &mut cache, reuse);
        assert_eq!(source.snapshot().clients_pages, [2, 4]);
    }
}
