//! A client's own CONNECT_SET_IDENTITY after its open, answered by the proxy.
//!
//! libvirt's virtproxyd applies that call to its own record of the client and never sends it
//! to the driver daemon (`remoteDispatchConnectSetIdentity`; libvirt-rpc.md §4.5): relaying
//! it would let any client claim any uid (even `system.token`) at the daemon. So the relay
//! takes the frame out of the stream and this module decodes and checks it the way libvirt
//! does — XDR decoding, `virTypedParamsDeserialize`, `virIdentitySetParameters`'s
//! `virTypedParamsValidate` — and builds the same reply.

use super::frame::Header;
use super::msg::{self, err_code, err_domain, RemoteError};
use super::xdr::{Decoder, XdrError};

/// `REMOTE_CONNECT_IDENTITY_PARAMS_MAX`: the XDR array bound of the params.
const PARAMS_MAX: u32 = 20;
/// `VIR_TYPED_PARAM_FIELD_LENGTH`: a field name must fit with its NUL.
const FIELD_LENGTH: usize = 80;

/// One decoded `remote_typed_param`.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedParam {
    pub field: String,
    pub value: Value,
}

/// `remote_typed_param_value`, by `virTypedParameterType`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i32),
    UInt(u32),
    LLong(i64),
    ULLong(u64),
    Double(f64),
    Boolean(i32),
    Str(String),
}

impl Value {
    /// The type number and `virTypedParameterTypeToString` name.
    pub(crate) fn kind(&self) -> (i32, &'static str) {
        match self {
            Value::Int(_) => (1, "int"),
            Value::UInt(_) => (2, "uint"),
            Value::LLong(_) => (3, "llong"),
            Value::ULLong(_) => (4, "ullong"),
            Value::Double(_) => (5, "double"),
            Value::Boolean(_) => (6, "boolean"),
            Value::Str(_) => (7, "string"),
        }
    }
}

/// The names `virIdentitySetParameters` accepts, with their types.
const ALLOWED: &[(&str, i32, &str)] = &[
    ("user-name", 7, "string"),
    ("unix-user-id", 4, "ullong"),
    ("group-name", 7, "string"),
    ("unix-group-id", 4, "ullong"),
    ("process-id", 3, "llong"),
    ("process-time", 4, "ullong"),
    ("sasl-user-name", 7, "string"),
    ("x509-distinguished-name", 7, "string"),
    ("selinux-context", 7, "string"),
    ("system.token", 7, "string"),
];

fn decode_params(body: &[u8]) -> Result<Vec<TypedParam>, XdrError> {
    let mut d = Decoder::new(body);
    let params = decode_list(&mut d, PARAMS_MAX)?;
    let _flags = d.u32()?;
    Ok(params)
}

/// A `remote_typed_param` (or `admin_typed_param`, the same encoding) array of at most `max`.
pub(crate) fn decode_list(d: &mut Decoder<'_>, max: u32) -> Result<Vec<TypedParam>, XdrError> {
    let n = d.u32()?;
    if n > max {
        return Err(XdrError::TooLong(max as usize));
    }
    let mut params = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let field = d.string()?;
        // A discriminant without an arm fails xdr_union, hence the payload decode.
        let value = match d.i32()? {
            1 => Value::Int(d.i32()?),
            2 => Value::UInt(d.u32()?),
            3 => Value::LLong(d.i64()?),
            4 => Value::ULLong(d.u64()?),
            5 => Value::Double(f64::from_bits(d.u64()?)),
            6 => Value::Boolean(d.i32()?),
            7 => Value::Str(d.string()?),
            _ => return Err(XdrError::Truncated),
        };
        params.push(TypedParam { field, value });
    }
    Ok(params)
}

/// `virTypedParamsValidate` over the identity names: the same walk over both lists sorted by
/// name, so the same parameter is blamed when several are wrong.
fn validate(params: &[TypedParam]) -> Result<(), RemoteError> {
    validate_against(params, ALLOWED)
}

/// `virTypedParamsValidate` against `allowed` (name, type number, type name).
pub(crate) fn validate_against(
    params: &[TypedParam],
    allowed: &[(&str, i32, &str)],
) -> Result<(), RemoteError> {
    if let Some(p) = params.iter().find(|p| p.field.len() >= FIELD_LENGTH) {
        return Err(RemoteError::new(
            err_code::INTERNAL_ERROR,
            err_domain::NONE,
            format!("parameter {} too big for destination", p.field),
        ));
    }
    let mut sorted: Vec<&TypedParam> = params.iter().collect();
    sorted.sort_by(|a, b| a.field.cmp(&b.field));
    let mut keys: Vec<&(&str, i32, &str)> = allowed.iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    let (mut i, mut j) = (0, 0);
    let mut last: Option<&str> = None;
    while i < sorted.len() && j < keys.len() {
        let p = sorted[i];
        let (name, ty, ty_name) = *keys[j];
        if p.field != name {
            j += 1;
            continue;
        }
        if last == Some(p.field.as_str()) {
            return Err(RemoteError::new(
                err_code::INVALID_ARG,
                err_domain::NONE,
                format!("parameter '{}' occurs multiple times", p.field),
            ));
        }
        let (got, got_name) = p.value.kind();
        if got != ty {
            return Err(RemoteError::new(
                err_code::INVALID_ARG,
                err_domain::NONE,
                format!(
                    "invalid type '{got_name}' for parameter '{}', expected '{ty_name}'",
                    p.field
                ),
            ));
        }
        last = Some(p.field.as_str());
        i += 1;
    }
    if j == keys.len() && i != sorted.len() {
        return Err(RemoteError::new(
            err_code::ARGUMENT_UNSUPPORTED,
            err_domain::NONE,
            format!("parameter '{}' not supported", sorted[i].field),
        ));
    }
    Ok(())
}

/// What the proxy does with a client's CONNECT_SET_IDENTITY frame (`frame` = header + body).
#[derive(Debug)]
pub struct Answer {
    /// The reply frame for the client.
    pub reply: Vec<u8>,
    /// The new identity for the proxy's record of the client, when the call succeeded.
    pub identity: Option<Vec<TypedParam>>,
}

pub fn answer(h: &Header, body: &[u8]) -> Answer {
    // libvirt's dispatch checks come first and leave the connection open: no program is
    // (REMOTE, vers) but version 1 (virNetServerProgramUnknownError), and a call must have
    // status OK (virNetServerProgramDispatchCall). Both replies echo the request's header.
    let dispatch_error = if h.vers != 1 {
        Some(format!(
            "Cannot find program {} version {}",
            h.prog as i32, h.vers as i32
        ))
    } else if h.status != super::MsgStatus::Ok {
        Some(format!("Unexpected message status {}", h.status.to_wire()))
    } else {
        None
    };
    if let Some(detail) = dispatch_error {
        return Answer {
            reply: msg::error_reply(h, &RemoteError::new(err_code::RPC, err_domain::RPC, detail)),
            identity: None,
        };
    }
    let result = decode_params(body)
        .map_err(|_| {
            RemoteError::new(
                err_code::RPC,
                err_domain::RPC,
                "Unable to decode message payload",
            )
        })
        .and_then(|params| validate(&params).map(|()| params));
    match result {
        Ok(params) => Answer {
            reply: msg::ok_reply(h, &[]),
            identity: Some(params),
        },
        Err(e) => Answer {
            reply: msg::error_reply(h, &e),
            identity: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::{set_identity_body, TypedValue};
    use crate::proto::{program, remote_proc, MsgStatus, MsgType};

    fn header() -> Header {
        Header {
            len: 28,
            prog: program::REMOTE,
            vers: 1,
            proc_: remote_proc::CONNECT_SET_IDENTITY,
            mtype: MsgType::Call,
            serial: 7,
            status: MsgStatus::Ok,
        }
    }

    fn error_of(a: &Answer) -> RemoteError {
        assert!(a.identity.is_none());
        let h = Header::check(&a.reply).unwrap();
        assert_eq!(h.status, MsgStatus::Error);
        assert_eq!(h.serial, 7);
        RemoteError::decode(&mut Decoder::new(&a.reply[28..])).unwrap()
    }

    #[test]
    fn a_valid_identity_is_accepted_and_kept() {
        let body = set_identity_body(&[
            ("user-name", TypedValue::Str("root".into())),
            ("unix-user-id", TypedValue::ULLong(0)),
            ("process-id", TypedValue::LLong(1)),
        ]);
        let a = answer(&header(), &body);
        let h = Header::check(&a.reply).unwrap();
        assert_eq!(
            (h.status, h.mtype, h.serial),
            (MsgStatus::Ok, MsgType::Reply, 7)
        );
        assert_eq!(a.reply.len(), 28);
        let id = a.identity.unwrap();
        assert_eq!(id[1].value, Value::ULLong(0));
    }

    #[test]
    fn a_wrong_version_or_status_gets_libvirts_dispatch_errors() {
        // No program matches (REMOTE, 2): virNetServerProgramUnknownError.
        let body = set_identity_body(&[("unix-user-id", TypedValue::ULLong(0))]);
        let h = Header {
            vers: 2,
            ..header()
        };
        let a = answer(&h, &body);
        let reply = Header::check(&a.reply).unwrap();
        assert_eq!(
            (reply.prog, reply.vers, reply.proc_, reply.mtype),
            (
                program::REMOTE,
                2,
                remote_proc::CONNECT_SET_IDENTITY,
                MsgType::Reply
            )
        );
        let e = error_of(&a);
        assert_eq!((e.code, e.domain), (err_code::RPC, err_domain::RPC));
        assert_eq!(e.message, "Cannot find program 536903814 version 2");
        // A call whose status is not OK: virNetServerProgramDispatchCall's check.
        let h = Header {
            status: MsgStatus::Error,
            ..header()
        };
        let e = error_of(&answer(&h, &body));
        assert_eq!((e.code, e.domain), (err_code::RPC, err_domain::RPC));
        assert_eq!(e.message, "Unexpected message status 1");
    }

    #[test]
    fn wrong_types_unknown_names_and_duplicates_get_libvirts_errors() {
        // UINT for unix-user-id: the error test of libvirt-rpc.md §4.5.
        let mut body = vec![0, 0, 0, 1];
        body.extend_from_slice(&[0, 0, 0, 12]);
        body.extend_from_slice(b"unix-user-id");
        body.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
        let e = error_of(&answer(&header(), &body));
        assert_eq!((e.code, e.domain), (8, 0));
        assert_eq!(
            e.message,
            "invalid argument: invalid type 'uint' for parameter 'unix-user-id', expected 'ullong'"
        );

        let body = set_identity_body(&[("bogus", TypedValue::Str("x".into()))]);
        let e = error_of(&answer(&header(), &body));
        assert_eq!((e.code, e.domain), (74, 0));
        assert_eq!(
            e.message,
            "argument unsupported: parameter 'bogus' not supported"
        );

        let body = set_identity_body(&[
            ("unix-user-id", TypedValue::ULLong(0)),
            ("unix-user-id", TypedValue::ULLong(1)),
        ]);
        let e = error_of(&answer(&header(), &body));
        assert_eq!((e.code, e.domain), (8, 0));
        assert_eq!(
            e.message,
            "invalid argument: parameter 'unix-user-id' occurs multiple times"
        );
    }

    #[test]
    fn undecodable_or_oversized_params_are_payload_errors() {
        for body in [vec![0, 0, 0, 21], vec![0, 0, 0, 1, 0, 0], vec![]] {
            let e = error_of(&answer(&header(), &body));
            assert_eq!((e.code, e.domain), (39, 7));
            assert_eq!(e.message, "Unable to decode message payload");
        }
        // A type with no union arm fails the XDR decode too.
        let mut body = vec![0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 0, 0, 0, 0, 0, 9];
        body.extend_from_slice(&[0; 8]);
        assert_eq!(error_of(&answer(&header(), &body)).code, 39);
    }
}
