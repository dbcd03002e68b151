//! A small safe wrapper over the system's Cyrus SASL (libsasl2, through `sasl2-sys`), used the
//! way libvirt's server uses it: the application name and service are `libvirt`, so
//! `/etc/sasl2/libvirt.conf` (or `$SASL_CONF_PATH/libvirt.conf`), sasldb, keytabs and the
//! installed plugins behave as they do for libvirt's own daemons.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::ptr::{self, NonNull};
use std::sync::OnceLock;

use sasl2_sys::prelude::*;

use crate::relay::layer::{LayerError, SecurityLayer};

/// What Cyrus asks a server session to read from SASL_SEC_PROPS and to encode in one block
/// (libvirt's fixed 64 KiB).
pub const MAX_BUF: u32 = 1 << 16;

/// A libsasl2 failure: its result code and the text Cyrus gives for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslError {
    pub code: i32,
    pub detail: String,
}

impl std::fmt::Display for SaslError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code, self.detail)
    }
}

impl std::error::Error for SaslError {}

/// `sasl_errstring` for a result code (no connection needed).
pub fn errstring(code: c_int) -> String {
    // SAFETY: sasl_errstring returns a static string (never NULL for known codes; checked).
    let p = unsafe { sasl_errstring(code, ptr::null(), ptr::null_mut()) };
    cstr_lossy(p).unwrap_or_else(|| format!("SASL error {code}"))
}

fn cstr_lossy(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: Cyrus returns NUL-terminated strings that live at least until the next call on
    // the same connection; we copy at once.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// `sasl_server_init(NULL, "libvirt")`, once per process; its outcome is kept (Cyrus cannot
/// be initialised twice).
pub fn server_init() -> Result<(), SaslError> {
    static INIT: OnceLock<Result<(), SaslError>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: no callbacks; the app name is a static C string Cyrus keeps a pointer to.
        let rc = unsafe { sasl_server_init(ptr::null(), c"libvirt".as_ptr()) };
        if rc == SASL_OK {
            Ok(())
        } else {
            Err(SaslError {
                code: rc,
                detail: errstring(rc),
            })
        }
    })
    .clone()
}

/// The outcome of one start or step that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// SASL_OK (true) rather than SASL_CONTINUE.
    pub complete: bool,
    /// The server's token; `None` when Cyrus gave a NULL pointer (distinct from empty).
    pub data: Option<Vec<u8>>,
}

/// One server-side SASL conversation (`sasl_conn_t`), freed with `sasl_dispose` on drop.
pub struct ServerSession {
    conn: NonNull<sasl_conn_t>,
    /// SASL_MAXOUTBUF, read when the exchange completes (64 KiB until then).
    max_outbuf: u32,
}

// SAFETY: a sasl_conn_t has no thread affinity; the session is owned (never shared) and moved
// between the relay worker and the SASL threads, so only one thread touches it at a time.
unsafe impl Send for ServerSession {}

impl std::fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSession").finish_non_exhaustive()
    }
}

impl Drop for ServerSession {
    fn drop(&mut self) {
        let mut p = self.conn.as_ptr();
        // SAFETY: the connection came from sasl_server_new and is disposed exactly once.
        unsafe { sasl_dispose(&mut p) };
    }
}

fn c_string(s: &str) -> Result<CString, SaslError> {
    CString::new(s).map_err(|_| SaslError {
        code: SASL_BADPARAM,
        detail: "string with a NUL byte".into(),
    })
}

impl ServerSession {
    /// `sasl_server_new("libvirt", NULL, NULL, local, remote, NULL, SASL_SUCCESS_DATA)`;
    /// the addresses are "ip;port" strings (UNIX clients: "127.0.0.1;0", as libvirt gives).
    pub fn new(local: Option<&str>, remote: Option<&str>) -> Result<ServerSession, SaslError> {
        server_init()?;
        let local = local.map(c_string).transpose()?;
        let remote = remote.map(c_string).transpose()?;
        let mut conn: *mut sasl_conn_t = ptr::null_mut();
        // SAFETY: every pointer is NULL or a valid C string that outlives the call (Cyrus
        // copies the address strings).
        let rc = unsafe {
            sasl_server_new(
                c"libvirt".as_ptr(),
                ptr::null(),
                ptr::null(),
                local.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
                remote.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
                ptr::null(),
                SASL_SUCCESS_DATA,
                &mut conn,
            )
        };
        match NonNull::new(conn) {
            Some(conn) if rc == SASL_OK => Ok(ServerSession {
                conn,
                max_outbuf: MAX_BUF,
            }),
            other => {
                if let Some(c) = other {
                    let mut p = c.as_ptr();
                    // SAFETY: a connection Cyrus allocated before failing is still ours.
                    unsafe { sasl_dispose(&mut p) };
                }
                Err(SaslError {
                    code: rc,
                    detail: errstring(rc),
                })
            }
        }
    }

    fn err(&self, rc: c_int) -> SaslError {
        // SAFETY: the connection is live; sasl_errdetail returns a string owned by it.
        let detail = cstr_lossy(unsafe { sasl_errdetail(self.conn.as_ptr()) })
            .unwrap_or_else(|| errstring(rc));
        SaslError { code: rc, detail }
    }

    /// The strength of the layer under SASL (TLS key size in bits).
    pub fn set_external_ssf(&mut self, ssf: u32) -> Result<(), SaslError> {
        let v: sasl_ssf_t = ssf;
        // SAFETY: SASL_SSF_EXTERNAL takes a pointer to a sasl_ssf_t, copied by Cyrus.
        let rc = unsafe {
            sasl_setprop(
                self.conn.as_ptr(),
                SASL_SSF_EXTERNAL as c_int,
                (&v as *const sasl_ssf_t).cast::<c_void>(),
            )
        };
        if rc == SASL_OK {
            Ok(())
        } else {
            Err(self.err(rc))
        }
    }

    /// Security properties: an SSF range, 64 KiB buffers, and whether anonymous and
    /// plaintext mechanisms may be used.
    pub fn set_security(
        &mut self,
        min_ssf: u32,
        max_ssf: u32,
        allow_anonymous: bool,
    ) -> Result<(), SaslError> {
        let props = sasl_security_properties_t {
            min_ssf,
            max_ssf,
            maxbufsize: MAX_BUF,
            security_flags: if allow_anonymous {
                0
            } else {
                SASL_SEC_NOANONYMOUS | SASL_SEC_NOPLAINTEXT
            },
            property_names: ptr::null_mut(),
            property_values: ptr::null_mut(),
        };
        // SAFETY: SASL_SEC_PROPS takes a pointer to the struct, copied by Cyrus.
        let rc = unsafe {
            sasl_setprop(
                self.conn.as_ptr(),
                SASL_SEC_PROPS as c_int,
                (&props as *const sasl_security_properties_t).cast::<c_void>(),
            )
        };
        if rc == SASL_OK {
            Ok(())
        } else {
            Err(self.err(rc))
        }
    }

    /// The mechanisms this session may use, comma-separated, no prefix or suffix.
    pub fn mechanisms(&mut self) -> Result<String, SaslError> {
        let mut out: *const c_char = ptr::null();
        // SAFETY: the result points into the connection and is copied before any other call.
        let rc = unsafe {
            sasl_listmech(
                self.conn.as_ptr(),
                ptr::null(),
                c"".as_ptr(),
                c",".as_ptr(),
                c"".as_ptr(),
                &mut out,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        if rc != SASL_OK {
            return Err(self.err(rc));
        }
        Ok(cstr_lossy(out).unwrap_or_default())
    }

    fn exchange(
        &mut self,
        rc: c_int,
        out: *const c_char,
        outlen: c_uint,
    ) -> Result<Exchange, SaslError> {
        let complete = match rc {
            SASL_OK => true,
            SASL_CONTINUE => false,
            _ => return Err(self.err(rc)),
        };
        let data = (!out.is_null()).then(|| {
            // SAFETY: Cyrus gives `outlen` bytes at `out`, valid until the next call.
            unsafe { std::slice::from_raw_parts(out.cast::<u8>(), outlen as usize) }.to_vec()
        });
        if complete {
            self.max_outbuf = self.prop_uint(SASL_MAXOUTBUF)?;
        }
        Ok(Exchange { complete, data })
    }

    /// `sasl_server_start`; `data: None` is a NULL pointer (no initial response).
    pub fn start(&mut self, mech: &str, data: Option<&[u8]>) -> Result<Exchange, SaslError> {
        let mech = c_string(mech)?;
        let (inp, inlen) = in_ptr(data)?;
        let mut out: *const c_char = ptr::null();
        let mut outlen: c_uint = 0;
        // SAFETY: input pointer/length describe `data` (or NULL, 0); outputs are ours.
        let rc = unsafe {
            sasl_server_start(
                self.conn.as_ptr(),
                mech.as_ptr(),
                inp,
                inlen,
                &mut out,
                &mut outlen,
            )
        };
        self.exchange(rc, out, outlen)
    }

    /// `sasl_server_step`; `data: None` is a NULL pointer.
    pub fn step(&mut self, data: Option<&[u8]>) -> Result<Exchange, SaslError> {
        let (inp, inlen) = in_ptr(data)?;
        let mut out: *const c_char = ptr::null();
        let mut outlen: c_uint = 0;
        // SAFETY: as in `start`.
        let rc = unsafe { sasl_server_step(self.conn.as_ptr(), inp, inlen, &mut out, &mut outlen) };
        self.exchange(rc, out, outlen)
    }

    fn prop_uint(&self, prop: c_uint) -> Result<u32, SaslError> {
        let mut v: *const c_void = ptr::null();
        // SAFETY: SSF and MAXOUTBUF point at an unsigned int inside the connection.
        let rc = unsafe { sasl_getprop(self.conn.as_ptr(), prop as c_int, &mut v) };
        if rc != SASL_OK {
            return Err(self.err(rc));
        }
        if v.is_null() {
            return Err(SaslError {
                code: SASL_FAIL,
                detail: "property not set".into(),
            });
        }
        // SAFETY: non-NULL, points at a c_uint owned by the connection.
        Ok(unsafe { *v.cast::<c_uint>() })
    }

    /// The security strength negotiated (0: no security layer).
    pub fn ssf(&self) -> Result<u32, SaslError> {
        self.prop_uint(SASL_SSF)
    }

    /// The authenticated user name (SASL_USERNAME); `None` if Cyrus has none.
    pub fn username(&self) -> Result<Option<String>, SaslError> {
        let mut v: *const c_void = ptr::null();
        // SAFETY: SASL_USERNAME points at a C string owned by the connection; copied at once.
        let rc = unsafe { sasl_getprop(self.conn.as_ptr(), SASL_USERNAME as c_int, &mut v) };
        if rc != SASL_OK {
            return Err(self.err(rc));
        }
        Ok(cstr_lossy(v.cast::<c_char>()))
    }

    /// Largest plain block one `sasl_encode` takes (SASL_MAXOUTBUF, read at completion).
    pub fn max_outbuf(&self) -> u32 {
        self.max_outbuf
    }
}

fn in_ptr(data: Option<&[u8]>) -> Result<(*const c_char, c_uint), SaslError> {
    match data {
        None => Ok((ptr::null(), 0)),
        Some(d) => {
            let len = c_uint::try_from(d.len()).map_err(|_| SaslError {
                code: SASL_BADPARAM,
                detail: "token too long".into(),
            })?;
            Ok((d.as_ptr().cast::<c_char>(), len))
        }
    }
}

fn layer_err(what: &str, rc: c_int) -> LayerError {
    LayerError(format!(
        "failed to {what} SASL data: {rc} ({})",
        errstring(rc)
    ))
}

impl SecurityLayer for ServerSession {
    fn encode(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), LayerError> {
        if plain.len() > self.max_plain() {
            return Err(LayerError(format!(
                "SASL data length {} too long, max {}",
                plain.len(),
                self.max_plain()
            )));
        }
        let mut o: *const c_char = ptr::null();
        let mut olen: c_uint = 0;
        // SAFETY: `plain` fits a c_uint (checked against max_plain); the output is valid
        // until the next call on this connection and is copied at once.
        let rc = unsafe {
            sasl_encode(
                self.conn.as_ptr(),
                plain.as_ptr().cast(),
                plain.len() as c_uint,
                &mut o,
                &mut olen,
            )
        };
        if rc != SASL_OK {
            return Err(layer_err("encode", rc));
        }
        if !o.is_null() {
            // SAFETY: as above.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(o.cast(), olen as usize) });
        }
        Ok(())
    }

    fn decode(&mut self, wire: &[u8], out: &mut Vec<u8>) -> Result<(), LayerError> {
        // Cyrus keeps a partial packet between calls; fed in blocks no larger than the
        // buffer size it was given, as libvirt feeds it.
        for chunk in wire.chunks(MAX_BUF as usize) {
            let mut o: *const c_char = ptr::null();
            let mut olen: c_uint = 0;
            // SAFETY: the chunk is at most 64 KiB; the output is copied before the next call.
            let rc = unsafe {
                sasl_decode(
                    self.conn.as_ptr(),
                    chunk.as_ptr().cast(),
                    chunk.len() as c_uint,
                    &mut o,
                    &mut olen,
                )
            };
            if rc != SASL_OK {
                return Err(layer_err("decode", rc));
            }
            if !o.is_null() && olen > 0 {
                // SAFETY: as above.
                out.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(o.cast(), olen as usize)
                });
            }
        }
        Ok(())
    }

    fn max_plain(&self) -> usize {
        self.max_outbuf as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lists_mechanisms_under_libvirts_properties() {
        // Whatever plugins are installed, the calls succeed and the list is comma-separated.
        let mut s = ServerSession::new(Some("127.0.0.1;0"), Some("127.0.0.1;0")).unwrap();
        s.set_security(0, 0, true).unwrap();
        s.set_external_ssf(256).unwrap();
        match s.mechanisms() {
            Ok(list) => assert!(!list.contains(' '), "{list}"),
            Err(e) => assert_eq!(e.code, SASL_NOMECH, "{e}"),
        }
        assert_eq!(s.max_plain(), MAX_BUF as usize);
    }

    #[test]
    fn an_unknown_mechanism_is_refused_with_cyrus_detail() {
        let mut s = ServerSession::new(None, None).unwrap();
        s.set_security(0, 0, true).unwrap();
        let e = s.start("NO-SUCH-MECH", None).unwrap_err();
        assert_eq!(e.code, SASL_NOMECH, "{e}");
        assert!(e.detail.contains("no mechanism available"), "{e}");
        let e = s.start("A\0B", None).unwrap_err();
        assert_eq!(e.code, SASL_BADPARAM);
    }
}
