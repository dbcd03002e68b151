//! polkit authorisation of UNIX clients (`auth_unix_* = "polkit"`), as libvirt's
//! `virpolkit.c` does it: the sans-IO part (the question, and polkitd's answer mapped to
//! libvirt's errors) and the threads that ask polkitd over the system D-Bus.
//!
//! A relay worker never waits for polkitd: it sends a [`Request`] down a channel and goes on
//! serving its other connections; a polkit thread makes the blocking D-Bus call and sends the
//! [`Answer`] back to that worker's channel, then wakes the worker through its eventfd.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use crate::proto::msg::{err_code, err_domain, RemoteError};

/// The action a read-write client must be allowed.
pub const ACTION_MANAGE: &str = "org.libvirt.unix.manage";
/// The action a read-only client must be allowed.
pub const ACTION_MONITOR: &str = "org.libvirt.unix.monitor";

/// libvirt's D-Bus call timeout (`VIR_DBUS_METHOD_CALL_TIMEOUT_MILIS`).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks in flight at once: one slow answer must not hold up everyone's login.
const THREADS: usize = 4;

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

/// Starts the polkit threads; one link per worker eventfd in `wakers`.
pub fn start(wakers: &[OwnedFd]) -> io::Result<Vec<crate::offload::Link<Request, Answer>>> {
    let bus: Mutex<Option<zbus::blocking::Connection>> = Mutex::new(None);
    crate::offload::start("polkit", THREADS, wakers, move |req: Request| {
        let result = check(&bus, &req);
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
        Answer {
            slot: req.slot,
            gen: req.gen,
            result,
        }
    })
}

/// The system bus, connected on first use and again after a failure (libvirt keeps its
/// first failure for the life of the daemon; a bus that comes back is used here).
fn connection(
    bus: &Mutex<Option<zbus::blocking::Connection>>,
) -> Result<zbus::blocking::Connection, RemoteError> {
    let mut guard = bus.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = guard.as_ref() {
        return Ok(c.clone());
    }
    let c = zbus::blocking::connection::Builder::system()
        .map(|b| b.method_timeout(CALL_TIMEOUT))
        .and_then(|b| b.build())
        .map_err(|e| bus_unavailable(&e))?;
    *guard = Some(c.clone());
    Ok(c)
}

type Subject<'a> = (&'a str, HashMap<&'a str, zbus::zvariant::Value<'a>>);

fn check(
    bus: &Mutex<Option<zbus::blocking::Connection>>,
    req: &Request,
) -> Result<(), RemoteError> {
    let conn = connection(bus)?;
    let q = &req.query;
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
    let reply = conn.call_method(
        Some("org.freedesktop.PolicyKit1"),
        "/org/freedesktop/PolicyKit1/Authority",
        Some("org.freedesktop.PolicyKit1.Authority"),
        "CheckAuthorization",
        &body,
    );
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, zbus::Error::InputOutput(_)) {
                // The bus itself went away: reconnect on the next check.
                *bus.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
