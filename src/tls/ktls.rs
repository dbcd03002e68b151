//! Kernel TLS: after rustls finishes the handshake, the record layer moves into the kernel so
//! the relay can splice TLS traffic like plain traffic (design.md trap 7).
//!
//! Detection is at runtime: attaching the `tls` ULP fails (ENOENT) on kernels without
//! CONFIG_TLS, such as this project's build machine; the caller then keeps rustls in
//! userspace.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

use crate::sys::tls_record::SOL_TLS;

const SOL_TCP: libc::c_int = 6;
const TCP_ULP: libc::c_int = 31;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;

const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// Connections whose records are handled by the kernel (tests assert on it).
pub static ENGAGED: AtomicU64 = AtomicU64::new(0);
/// Connections that stayed in userspace rustls.
pub static USERSPACE: AtomicU64 = AtomicU64::new(0);

/// `setsockopt` with a byte buffer as the option value.
fn setsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: setsockopt with a valid buffer of the stated length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attaches the `tls` ULP. Err(ENOENT) = the kernel has no kTLS; the socket is unchanged.
/// Whether a TCP socket has the kernel TLS ULP attached (a carried kTLS connection must).
pub fn has_tls_ulp(fd: BorrowedFd<'_>) -> bool {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: getsockopt into a 16-byte buffer with its length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_TCP,
            TCP_ULP,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    r == 0 && name.starts_with(b"tls")
}

pub fn attach_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_bytes(fd, SOL_TCP, TCP_ULP, b"tls")
}

/// `struct tls12_crypto_info_*` laid out as the kernel expects.
fn crypto_info(version: u16, seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<Vec<u8>> {
    let mut v = Vec::with_capacity(64);
    let head = |v: &mut Vec<u8>, cipher: u16| {
        v.extend_from_slice(&version.to_ne_bytes());
        v.extend_from_slice(&cipher.to_ne_bytes());
    };
    match secrets {
        // GCM: the 12-byte IV is a 4-byte salt then 8 bytes the kernel calls `iv`.
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            head(&mut v, TLS_CIPHER_AES_GCM_128);
            v.extend_from_slice(&iv.as_ref()[4..12]);
            v.extend_from_slice(key.as_ref());
            v.extend_from_slice(&iv.as_ref()[..4]);
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            head(&mut v, TLS_CIPHER_AES_GCM_256);
            v.extend_from_slice(&iv.as_ref()[4..12]);
            v.extend_from_slice(key.as_ref());
            v.extend_from_slice(&iv.as_ref()[..4]);
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            head(&mut v, TLS_CIPHER_CHACHA20_POLY1305);
            v.extend_from_slice(iv.as_ref());
            v.extend_from_slice(key.as_ref());
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cipher suite not supported by kTLS",
            ))
        }
    }
    v.extend_from_slice(&seq.to_be_bytes());
    Ok(v)
}

/// Whether rustls negotiated a suite the kernel can take.
pub fn suite_supported(suite: rustls::SupportedCipherSuite) -> bool {
    use rustls::CipherSuite::*;
    matches!(
        suite.suite(),
        TLS13_AES_128_GCM_SHA256
            | TLS13_AES_256_GCM_SHA384
            | TLS13_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
            | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    )
}

/// Hands both directions' keys to the kernel (the ULP must already be attached).
pub fn install(fd: BorrowedFd<'_>, tls13: bool, secrets: ExtractedSecrets) -> io::Result<()> {
    let version = if tls13 {
        TLS_1_3_VERSION
    } else {
        TLS_1_2_VERSION
    };
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    setsockopt_bytes(fd, SOL_TLS, TLS_TX, &crypto_info(version, tx_seq, &tx)?)?;
    setsockopt_bytes(fd, SOL_TLS, TLS_RX, &crypto_info(version, rx_seq, &rx)?)?;
    ENGAGED.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    #[test]
    fn crypto_info_layout_matches_linux_tls_h() {
        let key = AeadKey::from([7u8; 32]);
        let iv = Iv::new([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        // tls12_crypto_info_aes_gcm_256: 4 + iv 8 + key 32 + salt 4 + rec_seq 8 = 56 bytes.
        let v = crypto_info(
            TLS_1_3_VERSION,
            5,
            &ConnectionTrafficSecrets::Aes256Gcm { key, iv },
        )
        .unwrap();
        assert_eq!(v.len(), 56);
        assert_eq!(&v[4..12], &[5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(&v[44..48], &[1, 2, 3, 4]);
        assert_eq!(&v[48..], &5u64.to_be_bytes());
        // chacha20_poly1305: 4 + iv 12 + key 32 + rec_seq 8 = 56.
        let key = AeadKey::from([7u8; 32]);
        let iv = Iv::new([0; 12]);
        let v = crypto_info(
            TLS_1_2_VERSION,
            0,
            &ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
        )
        .unwrap();
        assert_eq!(v.len(), 56);
    }

    #[test]
    fn ulp_attach_fails_cleanly_without_a_tcp_connection() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        assert!(attach_ulp(a.as_fd()).is_err());
    }
}
