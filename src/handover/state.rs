//! The hand-over state: what a new process needs, besides the fds, to go on relaying the
//! connections of the old one. Sans-IO: records in, bytes out and back, versioned.
//!
//! Layout (XDR, big-endian): magic `VPDHOVER`, format version, the producer's version
//! string, the next connection id, the listeners, then the connections. The fds travel apart
//! (`transfer`), in the order of the records: one per listener, then per connection the
//! client socket and the daemon socket. Only connections at rest are carried (between frames both ways, nothing
//! buffered, see `worker::handover`), so a record holds no bytes in flight: those stay in
//! the sockets' kernel queues and travel with them.

use crate::identity::{Identity, UnixPeer};
use crate::listen::ListenerKind;
use crate::proto::set_identity::{TypedParam, Value};
use crate::proto::xdr::{Decoder, Encoder, XdrError};

const MAGIC: &[u8; 8] = b"VPDHOVER";
/// Bumped whenever a record's layout changes: a new process that does not know the version
/// closes the connections it describes (logged) and serves everything else.
pub const FORMAT_VERSION: u32 = 1;
/// Bounds on what a state may claim, so a corrupt file cannot make the reader allocate much.
const CONNS_MAX: u32 = 1 << 20;
const CLAIMED_MAX: u32 = 64;
const LISTENERS_MAX: u32 = 64;

/// One relayed connection at rest.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnRecord {
    pub id: u64,
    pub kind: ListenerKind,
    /// Connect time, seconds since the epoch (as the registry shows it).
    pub timestamp: i64,
    /// How long it had been connected, in milliseconds (for its close line).
    pub age_ms: u64,
    pub identity: Identity,
    pub peer_addr: Option<String>,
    pub claimed: Option<Vec<TypedParam>>,
    pub opened_readonly: bool,
    pub uri: Option<String>,
    pub daemon_path: Option<String>,
    /// The client closed its side (the client→daemon direction is finished).
    pub client_done: bool,
    /// The daemon closed its side.
    pub daemon_done: bool,
    /// The daemon's write side was shut down after the client's close.
    pub daemon_shut: bool,
    /// The client socket is a kernel TLS socket (writes must end at frame ends).
    pub ktls: bool,
    /// A client that had sent nothing yet, before its open: no daemon socket; the next
    /// process takes it as if it had just been accepted.
    pub fresh: bool,
}

/// A listening socket handed over (one fd in the stream, before the connections').
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerRecord {
    pub kind: ListenerKind,
    /// The socket file, when the old process created it (and the new one must unlink it at
    /// exit).
    pub path: Option<String>,
}

/// Everything but the fds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    /// The producer's version (for the log).
    pub producer: String,
    /// The id the next accepted client gets (ids stay unique across the hand-over).
    pub next_id: u64,
    pub listeners: Vec<ListenerRecord>,
    pub conns: Vec<ConnRecord>,
    /// Where the fds are when they were inherited through `execve` (their numbers, in the
    /// stream's order); empty when they travel in the fd queue.
    pub inherited: Vec<i32>,
}

/// Why a state cannot be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    #[error("not a hand-over state (bad magic)")]
    Magic,
    #[error("hand-over state format {0} is not known here (this build reads {FORMAT_VERSION})")]
    Version(u32),
    #[error("hand-over state is corrupt: {0}")]
    Corrupt(String),
}

impl From<XdrError> for StateError {
    fn from(e: XdrError) -> Self {
        StateError::Corrupt(e.to_string())
    }
}

impl ConnRecord {
    /// Fds the record has in the fd stream: the client socket, and the daemon socket unless
    /// it is `fresh`.
    pub fn fds(&self) -> usize {
        if self.fresh {
            1
        } else {
            2
        }
    }
}

fn kind_code(k: ListenerKind) -> u32 {
    match k {
        ListenerKind::UnixRw => 0,
        ListenerKind::UnixRo => 1,
        ListenerKind::UnixAdmin => 2,
        ListenerKind::Tcp => 3,
        ListenerKind::Tls => 4,
    }
}

fn kind_of(code: u32) -> Result<ListenerKind, StateError> {
    Ok(match code {
        0 => ListenerKind::UnixRw,
        1 => ListenerKind::UnixRo,
        2 => ListenerKind::UnixAdmin,
        3 => ListenerKind::Tcp,
        4 => ListenerKind::Tls,
        n => return Err(StateError::Corrupt(format!("listener kind {n}"))),
    })
}

fn put_bool(e: &mut Encoder, b: bool) {
    e.u32(u32::from(b));
}

fn put_identity(e: &mut Encoder, id: &Identity) {
    match &id.unix {
        None => {
            e.u32(0);
        }
        Some(u) => {
            e.u32(1).u32(u.uid).u32(u.gid).i32(u.pid);
            e.opt_string(u.user_name.as_deref());
            e.opt_string(u.group_name.as_deref());
            e.u64(u.process_time);
        }
    }
    e.opt_string(id.x509_dname.as_deref());
    e.opt_string(id.selinux_context.as_deref());
    e.opt_string(id.sasl_user_name.as_deref());
}

fn get_identity(d: &mut Decoder<'_>) -> Result<Identity, StateError> {
    let unix = if d.bool()? {
        Some(UnixPeer {
            uid: d.u32()?,
            gid: d.u32()?,
            pid: d.i32()?,
            user_name: d.opt_string()?,
            group_name: d.opt_string()?,
            process_time: d.u64()?,
        })
    } else {
        None
    };
    Ok(Identity {
        unix,
        x509_dname: d.opt_string()?,
        selinux_context: d.opt_string()?,
        sasl_user_name: d.opt_string()?,
    })
}

fn put_params(e: &mut Encoder, params: &[TypedParam]) {
    e.u32(params.len() as u32);
    for p in params {
        e.string(&p.field);
        e.i32(p.value.kind().0);
        match &p.value {
            Value::Int(v) | Value::Boolean(v) => {
                e.i32(*v);
            }
            Value::UInt(v) => {
                e.u32(*v);
            }
            Value::LLong(v) => {
                e.i64(*v);
            }
            Value::ULLong(v) => {
                e.u64(*v);
            }
            Value::Double(v) => {
                e.u64(v.to_bits());
            }
            Value::Str(s) => {
                e.string(s);
            }
        }
    }
}

/// Encodes `state` (pure).
pub fn encode(state: &State) -> Vec<u8> {
    encode_with(state, state.conns.iter())
}

/// Encodes `head` with `conns` instead of its own (pure): a hand-over's records are
/// encoded where they are, not copied into a `State` first.
pub fn encode_with<'a>(
    head: &State,
    conns: impl ExactSizeIterator<Item = &'a ConnRecord>,
) -> Vec<u8> {
    let mut e = Encoder::new();
    e.buf.extend_from_slice(MAGIC);
    e.u32(FORMAT_VERSION);
    e.string(&head.producer);
    e.u64(head.next_id);
    e.u32(head.listeners.len() as u32);
    for l in &head.listeners {
        e.u32(kind_code(l.kind));
        e.opt_string(l.path.as_deref());
    }
    e.u32(head.inherited.len() as u32);
    for &fd in &head.inherited {
        e.i32(fd);
    }
    e.u32(conns.len() as u32);
    for c in conns {
        e.u64(c.id)
            .u32(kind_code(c.kind))
            .i64(c.timestamp)
            .u64(c.age_ms);
        put_identity(&mut e, &c.identity);
        e.opt_string(c.peer_addr.as_deref());
        match &c.claimed {
            None => {
                e.u32(0);
            }
            Some(p) => {
                e.u32(1);
                put_params(&mut e, p);
            }
        }
        put_bool(&mut e, c.opened_readonly);
        e.opt_string(c.uri.as_deref());
        e.opt_string(c.daemon_path.as_deref());
        for b in [c.client_done, c.daemon_done, c.daemon_shut, c.ktls, c.fresh] {
            put_bool(&mut e, b);
        }
    }
    e.finish()
}

/// Decodes a state (pure); a known magic with another version is `StateError::Version`.
pub fn decode(buf: &[u8]) -> Result<State, StateError> {
    let body = buf
        .strip_prefix(MAGIC.as_slice())
        .ok_or(StateError::Magic)?;
    let mut d = Decoder::new(body);
    let version = d.u32()?;
    if version != FORMAT_VERSION {
        return Err(StateError::Version(version));
    }
    let producer = d.string()?;
    let next_id = d.u64()?;
    let n = d.u32()?;
    if n > LISTENERS_MAX {
        return Err(StateError::Corrupt(format!("{n} listeners")));
    }
    let mut listeners = Vec::with_capacity(n as usize);
    for _ in 0..n {
        listeners.push(ListenerRecord {
            kind: kind_of(d.u32()?)?,
            path: d.opt_string()?,
        });
    }
    let n = d.u32()?;
    if n > 2 * CONNS_MAX {
        return Err(StateError::Corrupt(format!("{n} inherited fds")));
    }
    let mut inherited = Vec::with_capacity(n.min(4096) as usize);
    for _ in 0..n {
        inherited.push(d.i32()?);
    }
    let n = d.u32()?;
    if n > CONNS_MAX {
        return Err(StateError::Corrupt(format!("{n} connections")));
    }
    let mut conns = Vec::with_capacity(n.min(4096) as usize);
    for _ in 0..n {
        let id = d.u64()?;
        let kind = kind_of(d.u32()?)?;
        let timestamp = d.i64()?;
        let age_ms = d.u64()?;
        let identity = get_identity(&mut d)?;
        let peer_addr = d.opt_string()?;
        let claimed = if d.bool()? {
            Some(crate::proto::set_identity::decode_list(
                &mut d,
                CLAIMED_MAX,
            )?)
        } else {
            None
        };
        let opened_readonly = d.bool()?;
        let uri = d.opt_string()?;
        let daemon_path = d.opt_string()?;
        let (client_done, daemon_done, daemon_shut, ktls, fresh) =
            (d.bool()?, d.bool()?, d.bool()?, d.bool()?, d.bool()?);
        conns.push(ConnRecord {
            id,
            kind,
            timestamp,
            age_ms,
            identity,
            peer_addr,
            claimed,
            opened_readonly,
            uri,
            daemon_path,
            client_done,
            daemon_done,
            daemon_shut,
            ktls,
            fresh,
        });
    }
    if d.remaining() != 0 {
        return Err(StateError::Corrupt(format!(
            "{} bytes after the last record",
            d.remaining()
        )));
    }
    Ok(State {
        producer,
        next_id,
        listeners,
        conns,
        inherited,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> ConnRecord {
        ConnRecord {
            id,
            kind: ListenerKind::UnixRw,
            timestamp: 1_700_000_000,
            age_ms: 1234,
            identity: Identity {
                unix: Some(UnixPeer {
                    uid: 1000,
                    gid: 100,
                    pid: 4242,
                    user_name: Some("alice".into()),
                    group_name: None,
                    process_time: 99,
                }),
                selinux_context: Some("unconfined_u:unconfined_r:unconfined_t:s0".into()),
                ..Identity::default()
            },
            peer_addr: None,
            claimed: None,
            opened_readonly: false,
            uri: Some("qemu:///system".into()),
            daemon_path: Some("/run/libvirt/virtqemud-sock".into()),
            client_done: false,
            daemon_done: false,
            daemon_shut: false,
            ktls: false,
            fresh: false,
        }
    }

    #[test]
    fn a_state_survives_the_round_trip() {
        let mut tcp = record(7);
        tcp.kind = ListenerKind::Tls;
        tcp.identity = Identity {
            x509_dname: Some("CN=client".into()),
            ..Identity::default()
        };
        tcp.peer_addr = Some("192.0.2.1:40000".into());
        tcp.ktls = true;
        tcp.client_done = true;
        tcp.daemon_shut = true;
        tcp.opened_readonly = true;
        tcp.claimed = Some(vec![
            TypedParam {
                field: "user-name".into(),
                value: Value::Str("bob".into()),
            },
            TypedParam {
                field: "unix-user-id".into(),
                value: Value::ULLong(1001),
            },
            TypedParam {
                field: "process-id".into(),
                value: Value::LLong(-1),
            },
        ]);
        let state = State {
            producer: "virtproxyd-rs 0.1.0".into(),
            next_id: 42,
            listeners: vec![
                ListenerRecord {
                    kind: ListenerKind::UnixRw,
                    path: Some("/run/libvirt/libvirt-sock".into()),
                },
                ListenerRecord {
                    kind: ListenerKind::Tcp,
                    path: None,
                },
            ],
            inherited: vec![7, 8, 9, 10, 11],
            conns: vec![
                record(1),
                tcp,
                ConnRecord {
                    fresh: true,
                    uri: None,
                    daemon_path: None,
                    ..record(9)
                },
            ],
        };
        assert_eq!(decode(&encode(&state)), Ok(state));
    }

    #[test]
    fn an_unknown_version_or_magic_is_refused_by_name() {
        let mut bytes = encode(&State::default());
        bytes[11] = 9; // the version word's low byte
        assert_eq!(decode(&bytes), Err(StateError::Version(9)));
        assert_eq!(decode(b"something else"), Err(StateError::Magic));
    }

    #[test]
    fn every_truncation_and_trailing_garbage_is_an_error_not_a_panic() {
        let state = State {
            producer: "p".into(),
            next_id: 3,
            listeners: vec![ListenerRecord {
                kind: ListenerKind::UnixRo,
                path: Some("/run/x".into()),
            }],
            conns: vec![record(1), record(2)],
            inherited: Vec::new(),
        };
        let bytes = encode(&state);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
        let mut long = bytes.clone();
        long.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(decode(&long), Err(StateError::Corrupt(_))));
    }

    #[test]
    fn a_corrupt_count_does_not_allocate_for_it() {
        let mut bytes = encode(&State::default());
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode(&bytes), Err(StateError::Corrupt(_))));
    }
}
