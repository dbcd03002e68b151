//! The message bodies the proxy encodes or decodes itself: errors, AUTH_LIST, feature checks,
//! CONNECT_OPEN arguments, CONNECT_SET_IDENTITY, keepalive. Everything else is relayed unread.

use super::frame::{build, Header, MsgStatus, MsgType};
use super::xdr::{Decoder, Encoder, XdrError};
use super::{keepalive_proc, program};

/// `virErrorNumber` values used in replies we generate (libvirt-rpc.md §2.6).
pub mod err_code {
    pub const INTERNAL_ERROR: i32 = 1;
    pub const NO_SUPPORT: i32 = 3;
    pub const NO_CONNECT: i32 = 5;
    pub const INVALID_ARG: i32 = 8;
    pub const OPERATION_DENIED: i32 = 29;
    pub const SYSTEM_ERROR: i32 = 38;
    pub const RPC: i32 = 39;
    pub const AUTH_FAILED: i32 = 45;
    pub const AUTH_CANCELLED: i32 = 79;
    pub const DBUS_SERVICE: i32 = 89;
    pub const AUTH_UNAVAILABLE: i32 = 94;
    pub const ARGUMENT_UNSUPPORTED: i32 = 74;
    pub const NO_SERVER: i32 = 95;
    pub const NO_CLIENT: i32 = 96;
}

/// `virErrorDomain` values used in replies we generate.
pub mod err_domain {
    pub const NONE: i32 = 0;
    pub const RPC: i32 = 7;
    pub const REMOTE: i32 = 13;
    pub const DBUS: i32 = 47;
    pub const POLKIT: i32 = 60;
    pub const ADMIN: i32 = 62;
}

/// `remote_error` (libvirt-rpc.md §2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub code: i32,
    pub domain: i32,
    pub message: String,
    pub str1: Option<String>,
    pub str2: Option<String>,
    pub int1: i32,
}

impl RemoteError {
    /// An error whose text is prefixed like libvirt's `virReportError` does for its code.
    pub fn new(code: i32, domain: i32, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let prefix = match code {
            err_code::INTERNAL_ERROR => Some("internal error"),
            err_code::NO_SUPPORT => Some("this function is not supported by the connection driver"),
            err_code::NO_CONNECT => Some("no connection driver available for"),
            err_code::OPERATION_DENIED => Some("operation forbidden"),
            err_code::AUTH_FAILED => Some("authentication failed"),
            err_code::AUTH_CANCELLED => Some("authentication cancelled"),
            err_code::AUTH_UNAVAILABLE => Some("authentication unavailable"),
            err_code::DBUS_SERVICE => Some("error from service"),
            err_code::INVALID_ARG => Some("invalid argument"),
            err_code::ARGUMENT_UNSUPPORTED => Some("argument unsupported"),
            err_code::NO_SERVER => Some("Server not found"),
            err_code::NO_CLIENT => Some("Client not found"),
            _ => None,
        };
        let (message, str1) = match prefix {
            // NO_CONNECT's text reads "... available for <uri>", without a colon.
            Some(p) if code == err_code::NO_CONNECT => (format!("{p} {detail}"), format!("{p} %s")),
            Some(p) => (format!("{p}: {detail}"), format!("{p}: %s")),
            None => (detail.clone(), "%s".to_string()),
        };
        Self {
            code,
            domain,
            message,
            str1: Some(str1),
            str2: Some(detail),
            int1: -1,
        }
    }

    /// libvirt's reply to any call other than open/auth before CONNECT_OPEN (§3.4).
    pub fn not_open() -> Self {
        Self::new(
            err_code::INTERNAL_ERROR,
            err_domain::RPC,
            "hypervisor connection not open",
        )
    }

    /// A failed `connect()` to a driver daemon socket, worded as libvirt words it.
    pub fn connect_failed(path: &std::path::Path, errno: i32) -> Self {
        let os = std::io::Error::from_raw_os_error(errno);
        let text = os.to_string();
        // std appends " (os error N)"; libvirt prints only strerror().
        let text = text.split(" (os error").next().unwrap_or(&text).to_string();
        let mut e = Self::new(
            err_code::SYSTEM_ERROR,
            err_domain::RPC,
            format!("Failed to connect socket to '{}': {}", path.display(), text),
        );
        e.int1 = errno;
        e
    }

    pub fn encode(&self, enc: &mut Encoder) {
        enc.i32(self.code)
            .i32(self.domain)
            .opt_string(Some(&self.message))
            .i32(2) // level: VIR_ERR_ERROR
            .u32(0) // dom: NULL
            .opt_string(self.str1.as_deref())
            .opt_string(self.str2.as_deref())
            .opt_string(None)
            .i32(self.int1)
            .i32(-1)
            .u32(0); // net: NULL
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        let code = d.i32()?;
        let domain = d.i32()?;
        let message = d.opt_string()?.unwrap_or_default();
        let _level = d.i32()?;
        if d.bool()? {
            // A domain reference is never sent by libvirt; do not try to decode one.
            return Err(XdrError::UnexpectedDomain);
        }
        let str1 = d.opt_string()?;
        let str2 = d.opt_string()?;
        let _str3 = d.opt_string()?;
        let int1 = d.i32()?;
        Ok(Self {
            code,
            domain,
            message,
            str1,
            str2,
            int1,
        })
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (code {}, domain {})",
            self.message, self.code, self.domain
        )
    }
}

/// Reply header echoing a request: stream-typed requests get STREAM errors (§1.7).
fn reply_header(req: &Header, status: MsgStatus) -> Header {
    let mtype = match req.mtype {
        MsgType::Stream | MsgType::StreamHole => MsgType::Stream,
        _ => MsgType::Reply,
    };
    Header {
        len: 0,
        prog: req.prog,
        vers: req.vers,
        proc_: req.proc_,
        mtype,
        serial: req.serial,
        status,
    }
}

/// An ERROR reply to `req`.
pub fn error_reply(req: &Header, err: &RemoteError) -> Vec<u8> {
    let mut e = Encoder::new();
    err.encode(&mut e);
    build(reply_header(req, MsgStatus::Error), &e.finish())
}

/// An OK reply to `req` with the given body.
pub fn ok_reply(req: &Header, body: &[u8]) -> Vec<u8> {
    build(reply_header(req, MsgStatus::Ok), body)
}

/// Body of the AUTH_LIST reply: `remote_auth_type types<>`.
pub fn auth_list_body(types: &[i32]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u32(types.len() as u32);
    for t in types {
        e.i32(*t);
    }
    e.finish()
}

/// Decodes an AUTH_LIST reply body.
pub fn decode_auth_list(body: &[u8]) -> Result<Vec<i32>, XdrError> {
    let mut d = Decoder::new(body);
    let n = d.u32()?.min(20);
    (0..n).map(|_| d.i32()).collect()
}

/// A single i32 body (SUPPORTS_FEATURE argument and reply, AUTH_POLKIT reply).
pub fn i32_body(v: i32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// Decodes a single leading i32.
pub fn decode_i32(body: &[u8]) -> Result<i32, XdrError> {
    Decoder::new(body).i32()
}

/// `remote_connect_open_args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenArgs {
    pub name: Option<String>,
    pub flags: u32,
}

impl OpenArgs {
    pub fn decode(body: &[u8]) -> Result<Self, XdrError> {
        let mut d = Decoder::new(body);
        let name = d.opt_string()?;
        let flags = d.u32()?;
        Ok(Self { name, flags })
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.opt_string(self.name.as_deref()).u32(self.flags);
        e.finish()
    }
}

/// A typed parameter value of the kinds identity uses (§2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypedValue {
    LLong(i64),
    ULLong(u64),
    Str(String),
}

/// `remote_connect_set_identity_args` body.
pub fn set_identity_body(params: &[(&'static str, TypedValue)]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u32(params.len() as u32);
    for (name, value) in params {
        e.string(name);
        match value {
            TypedValue::LLong(v) => e.i32(3).i64(*v),
            TypedValue::ULLong(v) => e.i32(4).u64(*v),
            TypedValue::Str(s) => e.i32(7).string(s),
        };
    }
    e.u32(0); // flags
    e.finish()
}

/// A CALL frame from the proxy itself.
pub fn call(prog: u32, proc_: i32, serial: u32, body: &[u8]) -> Vec<u8> {
    build(
        Header {
            len: 0,
            prog,
            vers: 1,
            proc_,
            mtype: MsgType::Call,
            serial,
            status: MsgStatus::Ok,
        },
        body,
    )
}

/// The keepalive PONG (§5.1).
pub fn pong() -> Vec<u8> {
    build(
        Header {
            len: 0,
            prog: program::KEEPALIVE,
            vers: 1,
            proc_: keepalive_proc::PONG,
            mtype: MsgType::Message,
            serial: 0,
            status: MsgStatus::Ok,
        },
        &[],
    )
}

/// Re-encodes a received frame from its header and body.
pub fn build_frame(h: &Header, body: &[u8]) -> Vec<u8> {
    build(*h, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::remote_proc;

    /// The ERROR reply captured from libvirtd for CONNECT_GET_TYPE before open (§2.4).
    #[test]
    fn not_open_error_matches_libvirtd_bytes() {
        let req = Header {
            len: 28,
            prog: program::REMOTE,
            vers: 1,
            proc_: 3,
            mtype: MsgType::Call,
            serial: 7,
            status: MsgStatus::Ok,
        };
        let frame = error_reply(&req, &RemoteError::not_open());
        assert_eq!(frame.len(), 184);
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        let want = concat!(
            "000000b8200080860000000100000003000000010000000700000001",
            "0000000100000007",
            "000000010000002e",
            "696e7465726e616c206572726f723a2068797065727669736f",
            "7220636f6e6e656374696f6e206e6f74206f70656e0000",
            "0000000200000000",
            "0000000100000012696e7465726e616c206572726f723a2025730000",
            "000000010000001e68797065727669736f722063",
            "6f6e6e656374696f6e206e6f74206f70656e0000",
            "00000000ffffffffffffffff00000000"
        );
        assert_eq!(hex, want);
        let back = RemoteError::decode(&mut Decoder::new(&frame[28..])).unwrap();
        assert_eq!(back, RemoteError::not_open());
    }

    #[test]
    fn identity_body_matches_capture() {
        let body = set_identity_body(&[
            ("user-name", TypedValue::Str("root".into())),
            ("unix-user-id", TypedValue::ULLong(0)),
            ("group-name", TypedValue::Str("root".into())),
            ("unix-group-id", TypedValue::ULLong(0)),
            ("process-id", TypedValue::LLong(23590)),
            ("process-time", TypedValue::ULLong(66957)),
        ]);
        let frame = call(program::REMOTE, remote_proc::CONNECT_SET_IDENTITY, 5, &body);
        // Length captured from the real virtproxyd (§2.5).
        assert_eq!(frame.len(), 0xd0);
        assert_eq!(&frame[28..32], &[0, 0, 0, 6]);
        assert_eq!(&frame[frame.len() - 4..], &[0, 0, 0, 0]);
    }

    #[test]
    fn open_args_round_trip_including_empty_name() {
        for a in [
            OpenArgs {
                name: Some("qemu:///system".into()),
                flags: 1,
            },
            OpenArgs {
                name: Some(String::new()),
                flags: 6,
            },
            OpenArgs {
                name: None,
                flags: 0,
            },
        ] {
            assert_eq!(OpenArgs::decode(&a.encode()).unwrap(), a);
        }
    }

    #[test]
    fn connect_failed_reads_like_libvirt() {
        let e = RemoteError::connect_failed(std::path::Path::new("/run/libvirt/virtfood-sock"), 2);
        assert_eq!(
            e.message,
            "Failed to connect socket to '/run/libvirt/virtfood-sock': No such file or directory"
        );
        assert_eq!((e.code, e.domain, e.int1), (38, 7, 2));
    }
}
