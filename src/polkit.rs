//! polkit authorisation of UNIX clients (`auth_unix_* = "polkit"`), as libvirt's
//! `virpolkit.c` does it: the sans-IO part (the question, and polkitd's answer mapped to
//! libvirt's errors) and the thread that asks polkitd over the system D-Bus.
//!
//! A relay worker never waits for polkitd: it sends a [`Request`] down a channel and goes on
//! serving its other connections; the polkit thread makes the D-Bus call as one task among
//! many and sends the [`Answer`] back to that worker's channel, then wakes the worker through
//! its eventfd. A check waiting on polkitd (a user's agent that never answers keeps it waiting
//! for the whole call timeout) holds no thread, so it delays nobody else's.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use async_executor::LocalExecutor;
use futures_lite::FutureExt;

use crate::proto::msg::{err_code, err_domain, RemoteError};

/// The action a read-write client must be allowed.
pub const ACTION_MANAGE: &str = "org.libvirt.unix.manage";
/// The action a read-only client must be allowed.
pub const ACTION_MONITOR: &str = "org.libvirt.unix.monitor";

/// libvirt's D-Bus call timeout (`VIR_DBUS_METHOD_CALL_TIMEOUT_MILIS`).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks in flight on one bus connection: the system bus's default
/// `max_replies_per_connection`, beyond which dbus-daemon fails the call (LimitsExceeded).
const PER_CONNECTION: usize = 128;
/// Bus connections, each opened only once those before it are full.
const CONNECTIONS: usize = 16;
/// Checks in flight at once; beyond it a check fails at once, as one beyond the bus's own limit
/// would (waiting instead would let the queue grow with every client that asks and leaves).
const IN_FLIGHT: usize = PER_CONNECTION * CONNECTIONS;
/// Checks in flight for one uid: one user's stuck checks (or connections that left while
/// waiting, whose checks run on) cannot take every place.
const PER_UID: usize = 128;

/// One CheckAuthorization question: may this process perform `action`?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub action: &'static str,
    pub pid: u32,
    pub start_time: u64,
    pub uid: u32,
}

/// Maps polkitd's `(is_authorized, is_challenge, details)` to libvirt's outcome
/// (`virPolkitCheckAuth`): dismissed → cancelled, challenge → no agent, else denied.
pub fn verdict(
    is_authorized: bool,
    is_challenge: bool,
    details: &HashMap<String, String>,
    action: &str,
) -> Result<(), RemoteError> {
    if is_authorized {
        return Ok(());
    }
    let dismissed = details.get("polkit.dismissed").map(String::as_str) == Some("true");
    Err(if dismissed {
        RemoteError::new(
            err_code::AUTH_CANCELLED,
            err_domain::POLKIT,
            "user cancelled authentication process",
        )
    } else if is_challenge {
        RemoteError::new(
            err_code::AUTH_UNAVAILABLE,
            err_domain::POLKIT,
            format!("no polkit agent available to authenticate action '{action}'"),
        )
    } else {
        RemoteError::new(
            err_code::AUTH_FAILED,
            err_domain::POLKIT,
            "access denied by policy",
        )
    })
}

/// A failed D-Bus call, worded as libvirt's GDBus wording reaches the client
/// (`virGDBusCallMethod`: VIR_ERR_DBUS_SERVICE in VIR_FROM_DBUS with GError's message).
pub fn call_failed(e: &zbus::Error) -> RemoteError {
    let text = match e {
        zbus::Error::MethodError(name, msg, _) => {
            format!(
                "GDBus.Error:{}: {}",
                name.as_str(),
                msg.as_deref().unwrap_or("")
            )
        }
        zbus::Error::InputOutput(_) => "The connection is closed".to_string(),
        other => other.to_string(),
    };
    RemoteError::new(err_code::DBUS_SERVICE, err_domain::DBUS, text)
}

/// No system bus, worded as libvirt's `virGDBusGetSystemBus`.
pub fn bus_unavailable(e: &zbus::Error) -> RemoteError {
    let text = match e {
        zbus::Error::InputOutput(io) => format!("Could not connect: {}", strerror(io)),
        other => other.to_string(),
    };
    RemoteError::new(
        err_code::INTERNAL_ERROR,
        err_domain::DBUS,
        format!("Unable to get system bus connection: {text}"),
    )
}

fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// What libvirt answers when an auth call fails without saying why (no uid, no start time,
/// AUTH_POLKIT on a client that does not need it): `virNetMessageSaveError`'s fallback.
pub fn unexplained_failure() -> RemoteError {
    RemoteError {
        code: err_code::INTERNAL_ERROR,
        domain: err_domain::RPC,
        message: "Library function returned error but did not set virError".into(),
        str1: None,
        str2: None,
        int1: -1,
    }
}

/// A check asked by a worker for one of its connections.
#[derive(Debug)]
pub struct Request {
    pub worker: usize,
    pub slot: usize,
    pub gen: u32,
    pub conn: u64,
    pub query: Query,
}

/// The outcome, sent back to the worker that asked.
#[derive(Debug)]
pub struct Answer {
    pub slot: usize,
    pub gen: u32,
    pub result: Result<(), RemoteError>,
}

impl crate::offload::Request for Request {
    fn worker(&self) -> usize {
        self.worker
    }
}

/// Starts the polkit thread; one link per worker eventfd in `wakers`.
pub fn start(wakers: &[OwnedFd]) -> io::Result<Vec<crate::offload::Link<Request, Answer>>> {
    let (links, requests, repliers) = crate::offload::links(wakers)?;
    std::thread::Builder::new()
        .name("polkit".into())
        .spawn(move || {
            let ex = Rc::new(LocalExecutor::new());
            async_io::block_on(ex.run(serve(ex.clone(), requests, repliers)));
        })?;
    Ok(links)
}

/// Runs each request as a task as it comes; ends when every worker's link is gone.
async fn serve(
    ex: Rc<LocalExecutor<'static>>,
    requests: async_channel::Receiver<Request>,
    repliers: crate::offload::Repliers<Answer>,
) {
    let pool = Rc::new(Pool::new(Rc::downgrade(&ex)));
    let repliers = Rc::new(repliers);
    while let Ok(req) = requests.recv().await {
        let (pool, repliers) = (pool.clone(), repliers.clone());
        ex.spawn(async move {
            let answer = answer(&pool, req).await;
            repliers.reply(answer.0, answer.1);
        })
        .detach();
    }
}

async fn answer(pool: &Pool, req: Request) -> (usize, Answer) {
    let result = if pool.in_flight.get() >= IN_FLIGHT {
        Err(too_many(format!(
            "{IN_FLIGHT} polkit checks already in progress"
        )))
    } else {
        let _place = Use::new(&pool.in_flight);
        check(pool, &req).await
    };
    match &result {
        Ok(()) => tracing::info!(
            conn = req.conn,
            "Policy allowed action {} from pid {}, uid {}",
            req.query.action,
            req.query.pid,
            req.query.uid
        ),
        Err(e) => tracing::info!(
            conn = req.conn,
            pid = req.query.pid,
            uid = req.query.uid,
            "polkit refused action {}: {}",
            req.query.action,
            e.message
        ),
    }
    (
        req.worker,
        Answer {
            slot: req.slot,
            gen: req.gen,
            result,
        },
    )
}

/// The bus connections and who is using them; the polkit thread's alone.
struct Pool {
    /// Weak: the executor holds the tasks that hold the pool.
    ex: Weak<LocalExecutor<'static>>,
    lanes: Vec<Lane>,
    in_flight: Cell<usize>,
    per_uid: RefCell<HashMap<u32, usize>>,
}

/// One system bus connection, connected on first use and again after a failure (libvirt
/// keeps its first failure for the life of the daemon; a bus that comes back is used here).
#[derive(Default)]
struct Lane {
    conn: RefCell<Option<zbus::Connection>>,
    /// One connect at a time; the checks waiting for it share its outcome.
    connecting: async_lock::Mutex<()>,
    attempts: Cell<u64>,
    failure: RefCell<Option<RemoteError>>,
    busy: Cell<usize>,
}

/// Counts one use while alive.
struct Use<'a>(&'a Cell<usize>);

impl<'a> Use<'a> {
    fn new(c: &'a Cell<usize>) -> Self {
        c.set(c.get() + 1);
        Use(c)
    }
}

impl Drop for Use<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// One check counted against its uid while alive.
struct UidUse<'a>(&'a RefCell<HashMap<u32, usize>>, u32);

impl Drop for UidUse<'_> {
    fn drop(&mut self) {
        let mut m = self.0.borrow_mut();
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl Pool {
    fn new(ex: Weak<LocalExecutor<'static>>) -> Self {
        Pool {
            ex,
            lanes: (0..CONNECTIONS).map(|_| Lane::default()).collect(),
            in_flight: Cell::new(0),
            per_uid: RefCell::new(HashMap::new()),
        }
    }

    fn enter_uid(&self, uid: u32) -> Option<UidUse<'_>> {
        let mut m = self.per_uid.borrow_mut();
        let n = m.entry(uid).or_insert(0);
        if *n >= PER_UID {
            return None;
        }
        *n += 1;
        Some(UidUse(&self.per_uid, uid))
    }
}

/// What a check beyond a bound gets: the error libvirt reports when the bus refuses a call
/// for too many pending replies.
fn too_many(what: String) -> RemoteError {
    RemoteError::new(
        err_code::DBUS_SERVICE,
        err_domain::DBUS,
        format!("GDBus.Error:org.freedesktop.DBus.Error.LimitsExceeded: {what}"),
    )
}

impl Lane {
    async fn connection(
        &self,
        ex: &Weak<LocalExecutor<'static>>,
    ) -> Result<zbus::Connection, RemoteError> {
        if let Some(c) = self.conn.borrow().as_ref() {
            return Ok(c.clone());
        }
        let seen = self.attempts.get();
        let _one = self.connecting.lock().await;
        if let Some(c) = self.conn.borrow().as_ref() {
            return Ok(c.clone());
        }
        if self.attempts.get() != seen {
            // An attempt failed while this check waited for it: a bus that does not answer
            // would otherwise cost each waiting check a timeout of its own, one after another.
            if let Some(e) = self.failure.borrow().as_ref() {
                return Err(e.clone());
            }
        }
        self.attempts.set(self.attempts.get() + 1);
        let result = connect(ex).await;
        match &result {
            Ok(c) => *self.conn.borrow_mut() = Some(c.clone()),
            Err(e) => *self.failure.borrow_mut() = Some(e.clone()),
        }
        result
    }
}

async fn connect(ex: &Weak<LocalExecutor<'static>>) -> Result<zbus::Connection, RemoteError> {
    let build = async {
        zbus::connection::Builder::system()?
            .method_timeout(CALL_TIMEOUT)
            // zbus's own tasks (the socket reader) run on this thread too, driven below.
            .internal_executor(false)
            .build()
            .await
    };
    let c = build
        .or(async {
            // A bus that accepts but never finishes the handshake.
            async_io::Timer::after(CALL_TIMEOUT).await;
            Err(zbus::Error::InputOutput(Arc::new(
                io::Error::from_raw_os_error(libc::ETIMEDOUT),
            )))
        })
        .await
        .map_err(|e| bus_unavailable(&e))?;
    let zbus_ex = c.executor().clone();
    // The thread is ending: nothing will ask on this connection.
    let Some(ex) = ex.upgrade() else {
        return Err(unexplained_failure());
    };
    // As zbus's own executor thread does: run while the connection has tasks.
    ex.spawn(async move {
        while !zbus_ex.is_empty() {
            zbus_ex.tick().await;
        }
    })
    .detach();
    Ok(c)
}

type Subject<'a> = (&'a str, HashMap<&'a str, zbus::zvariant::Value<'a>>);

async fn check(pool: &Pool, req: &Request) -> Result<(), RemoteError> {
    let q = &req.query;
    let Some(_uid) = pool.enter_uid(q.uid) else {
        return Err(too_many(format!(
            "{PER_UID} polkit checks already in progress for uid {}",
            q.uid
        )));
    };
    // The first connection with room (there is one: IN_FLIGHT places in all, one per check).
    let Some(lane) = pool.lanes.iter().find(|l| l.busy.get() < PER_CONNECTION) else {
        return Err(too_many(format!(
            "{IN_FLIGHT} polkit checks already in progress"
        )));
    };
    let _busy = Use::new(&lane.busy);
    let conn = lane.connection(&pool.ex).await?;
    tracing::info!(
        conn = req.conn,
        "Checking PID {} running as {}",
        q.pid,
        q.uid
    );
    let mut fields = HashMap::new();
    fields.insert("pid", zbus::zvariant::Value::U32(q.pid));
    fields.insert("start-time", zbus::zvariant::Value::U64(q.start_time));
    // polkit takes the uid as int32, as libvirt sends it.
    fields.insert("uid", zbus::zvariant::Value::I32(q.uid as i32));
    let subject: Subject<'_> = ("unix-process", fields);
    let details: HashMap<&str, &str> = HashMap::new();
    // Flags 1 = AllowUserInteraction, as libvirt asks.
    let body = (subject, q.action, details, 1u32, "");
    let reply = conn
        .call_method(
            Some("org.freedesktop.PolicyKit1"),
            "/org/freedesktop/PolicyKit1/Authority",
            Some("org.freedesktop.PolicyKit1.Authority"),
            "CheckAuthorization",
            &body,
        )
        .await;
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            if let zbus::Error::InputOutput(io) = &e {
                // The bus itself went away: reconnect on the next check. A timeout is only
                // this check's (polkitd still thinking), and the others share the connection.
                if io.kind() != io::ErrorKind::TimedOut {
                    lane.conn.borrow_mut().take();
                }
            }
            return Err(call_failed(&e));
        }
    };
    let (authorized, challenge, details): (bool, bool, HashMap<String, String>) = reply
        .body()
        .deserialize::<((bool, bool, HashMap<String, String>),)>()
        .map(|(r,)| r)
        .map_err(|e| call_failed(&e))?;
    verdict(authorized, challenge, &details, q.action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polkit_answers_map_to_libvirts_errors() {
        let none = HashMap::new();
        assert!(verdict(true, false, &none, ACTION_MANAGE).is_ok());
        let e = verdict(false, false, &none, ACTION_MANAGE).unwrap_err();
        assert_eq!((e.domain, e.code), (60, 45));
        assert_eq!(e.message, "authentication failed: access denied by policy");
        let e = verdict(false, true, &none, ACTION_MANAGE).unwrap_err();
        assert_eq!((e.domain, e.code), (60, 94));
        assert_eq!(
            e.message,
            "authentication unavailable: no polkit agent available to authenticate action 'org.libvirt.unix.manage'"
        );
        let mut d = HashMap::new();
        d.insert("polkit.dismissed".to_string(), "true".to_string());
        let e = verdict(false, true, &d, ACTION_MANAGE).unwrap_err();
        assert_eq!((e.domain, e.code), (60, 79));
        assert_eq!(
            e.message,
            "authentication cancelled: user cancelled authentication process"
        );
    }

    /// One uid gets PER_UID places, no more; others are unaffected, and a place comes back.
    #[test]
    fn one_uid_cannot_take_every_place() {
        let pool = Pool::new(Weak::new());
        let mut held: Vec<_> = (0..PER_UID).map(|_| pool.enter_uid(1000)).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(pool.enter_uid(1000).is_none());
        assert!(pool.enter_uid(1001).is_some());
        held.pop();
        assert!(pool.enter_uid(1000).is_some());
        drop(held);
        assert!(
            pool.per_uid.borrow().is_empty(),
            "no entry outlives its checks"
        );
        let e = too_many("x".into());
        assert_eq!((e.domain, e.code), (47, 89));
        assert_eq!(
            e.message,
            "error from service: GDBus.Error:org.freedesktop.DBus.Error.LimitsExceeded: x"
        );
    }

    #[test]
    fn dbus_failures_are_worded_as_gdbus_words_them() {
        let e = call_failed(&zbus::Error::MethodError(
            zbus::names::OwnedErrorName::try_from("org.freedesktop.DBus.Error.ServiceUnknown")
                .unwrap(),
            Some("The name is not activatable".into()),
            zbus::message::Message::method_call("/", "x")
                .unwrap()
                .build(&())
                .unwrap(),
        ));
        assert_eq!((e.domain, e.code), (47, 89));
        assert_eq!(
            e.message,
            "error from service: GDBus.Error:org.freedesktop.DBus.Error.ServiceUnknown: The name is not activatable"
        );
        let e = bus_unavailable(&zbus::Error::InputOutput(std::sync::Arc::new(
            io::Error::from_raw_os_error(libc::ENOENT),
        )));
        assert_eq!((e.domain, e.code), (47, 1));
        assert_eq!(
            e.message,
            "internal error: Unable to get system bus connection: Could not connect: No such file or directory"
        );
    }
}
