//! The server side of the TLS handshake, non-blocking, reading the socket one record at a
//! time: when the client's Finished has been read, not a byte more has left the kernel, so the
//! switch to kTLS cannot lose anything the client sent after it.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustls::ServerConnection;

use super::{dn, ktls, KtlsMode, TlsSettings};
use crate::sys;

/// Largest TLS record on the wire (2^14 plaintext + 2048 expansion + 5-byte header).
const RECORD_MAX: usize = 16384 + 2048 + 5;

/// `io::Write` over a non-blocking socket, for rustls.
pub(crate) struct FdIo<'a>(pub BorrowedFd<'a>);

impl io::Write for FdIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.0, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Read for FdIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv_with_fd(self.0, buf).map(|r| r.n)
    }
}

/// An accepted TCP connection going through the TLS handshake.
pub struct TlsAccept {
    conn: ServerConnection,
    record: Vec<u8>,
    settings: Arc<TlsSettings>,
}

/// Where the handshake stands.
pub enum Step {
    /// Waiting for the socket.
    Blocked,
    /// Handshake done.
    Done,
}

/// How the connection continues after a successful handshake and check.
pub enum Established {
    /// Records are in the kernel: the socket now carries plaintext for us. The confirmation
    /// byte must still be sent (it is the first plaintext byte).
    Kernel {
        dn: Option<String>,
        /// The cipher's key size in bits (SASL's external SSF).
        key_bits: Option<u32>,
    },
    /// rustls stays in userspace; the confirmation byte is already queued in `conn`.
    User {
        conn: Box<ServerConnection>,
        dn: Option<String>,
    },
}

impl TlsAccept {
    pub fn new(settings: Arc<TlsSettings>) -> Result<TlsAccept, String> {
        let conn = ServerConnection::new(settings.config.clone()).map_err(|e| e.to_string())?;
        Ok(TlsAccept {
            conn,
            record: Vec::with_capacity(512),
            settings,
        })
    }

    /// Advances the handshake. Err: the connection must be closed (nothing further is sent
    /// beyond rustls's own alert).
    pub fn drive(&mut self, fd: BorrowedFd<'_>) -> Result<Step, String> {
        loop {
            while self.conn.wants_write() {
                match self.conn.write_tls(&mut FdIo(fd)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Blocked),
                    Err(e) => return Err(format!("TLS write: {e}")),
                }
            }
            if !self.conn.is_handshaking() {
                return Ok(Step::Done);
            }
            let want = if self.record.len() < 5 {
                5 - self.record.len()
            } else {
                let len = u16::from_be_bytes([self.record[3], self.record[4]]) as usize + 5;
                if len > RECORD_MAX {
                    return Err(format!("TLS record of {len} bytes"));
                }
                len - self.record.len()
            };
            let mut chunk = [0u8; RECORD_MAX];
            match sys::recv_with_fd(fd, &mut chunk[..want]) {
                Ok(r) if r.n == 0 => return Err("peer closed during the TLS handshake".into()),
                Ok(r) => self.record.extend_from_slice(&chunk[..r.n]),
                Err(e) if sys::would_block(&e) => return Ok(Step::Blocked),
                Err(e) => return Err(format!("TLS read: {e}")),
            }
            let complete = self.record.len() >= 5
                && self.record.len()
                    == u16::from_be_bytes([self.record[3], self.record[4]]) as usize + 5;
            if complete {
                let mut rec = &self.record[..];
                self.conn
                    .read_tls(&mut rec)
                    .map_err(|e| format!("TLS: {e}"))?;
                self.record.clear();
                if let Err(e) = self.conn.process_new_packets() {
                    // Let rustls's alert go out, then give up.
                    let _ = self.conn.write_tls(&mut FdIo(fd));
                    return Err(format!("TLS handshake failed: {e}"));
                }
            }
        }
    }

    /// After the handshake: the DN check, then kTLS if the kernel takes it.
    pub fn finish(self, fd: &OwnedFd) -> Result<Established, String> {
        let TlsAccept {
            mut conn, settings, ..
        } = self;
        let dn = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| dn::subject_dn(c));
        if !dn::dn_allowed(settings.allowed_dns.as_deref(), dn.as_deref().unwrap_or("")) {
            let shown = dn.as_deref().unwrap_or("(no certificate)");
            if settings.no_verify {
                tracing::warn!("client DN '{shown}' is not in tls_allowed_dn_list; accepted because tls_no_verify_certificate = 1");
            } else {
                return Err(format!("client DN '{shown}' is not in tls_allowed_dn_list"));
            }
        }
        let suite = conn.negotiated_cipher_suite();
        let key_bits = suite.and_then(key_bits);
        let suite_ok = suite.is_some_and(ktls::suite_supported);
        if settings.ktls == KtlsMode::Auto && suite_ok && ktls::attach_ulp(fd.as_fd()).is_ok() {
            let tls13 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
            let secrets = conn
                .dangerous_extract_secrets()
                .map_err(|e| format!("TLS secrets: {e}"))?;
            ktls::install(fd.as_fd(), tls13, secrets).map_err(|e| format!("kTLS set-up: {e}"))?;
            return Ok(Established::Kernel { dn, key_bits });
        }
        ktls::USERSPACE.fetch_add(1, Ordering::Relaxed);
        conn.writer().write_all(&[1]).map_err(|e| e.to_string())?;
        Ok(Established::User {
            conn: Box::new(conn),
            dn,
        })
    }
}

/// The bulk cipher's key size in bits, as gnutls reports it to libvirt (which gives it to
/// SASL as the external SSF): AES-128 128, AES-256 and ChaCha20 256.
pub fn key_bits(suite: rustls::SupportedCipherSuite) -> Option<u32> {
    use rustls::CipherSuite as C;
    match suite.suite() {
        C::TLS13_AES_128_GCM_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(128),
        C::TLS13_AES_256_GCM_SHA384
        | C::TLS13_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(256),
        _ => None,
    }
}
