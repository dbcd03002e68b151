//! TLS for the `virtproxyd-tls` listener (libvirt-rpc.md §6): rustls terminates TLS, client
//! certificates are checked the way libvirt checks them, and after the handshake the record
//! layer moves into the kernel (kTLS) where the kernel has it, so the relay splices TLS
//! traffic like plain traffic. Without kTLS a userspace shuttle keeps rustls in the path.
//!
//! Connection flow: `accept::TlsAccept` (handshake, one record at a time) →
//! `accept::finish` (DN allowlist, kTLS or not, the 0x01 confirmation byte) → the ordinary
//! pre-open and relay, on the TCP socket itself (kTLS) or on a socketpair fed by
//! `shuttle::Shuttle` (userspace).

pub mod accept;
pub mod dn;
pub mod handshaker;
pub mod ktls;
pub mod shuttle;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use crate::config::Config;

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Cannot read {what} '{path}': {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS sanity check failed: {0} (set tls_no_sanity_certificate = 1 to skip this check)")]
    Sanity(String),
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// Whether to move records into the kernel after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtlsMode {
    /// Use kTLS when the kernel has it (the default).
    Auto,
    /// Always stay in userspace (env `VIRTPROXYD_KTLS=off`).
    Off,
}

/// Everything a TLS accept needs; swapped whole on SIGHUP.
pub struct TlsSettings {
    pub config: Arc<ServerConfig>,
    pub allowed_dns: Option<Vec<String>>,
    pub no_verify: bool,
    pub ktls: KtlsMode,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TlsSettings")
            .field("no_verify", &self.no_verify)
            .field("ktls", &self.ktls)
            .finish()
    }
}

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + 'a {
    move |e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(read_err(what, path))?
        .collect::<Result<_, _>>()
        .map_err(read_err(what, path))?;
    if certs.is_empty() {
        return Err(TlsError::Read {
            what,
            path: path.to_path_buf(),
            reason: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

/// Accepts any client certificate (or none), logging why libvirt would have refused it:
/// `tls_no_verify_certificate = 1` (libvirt-rpc.md §6.2).
#[derive(Debug)]
struct LenientVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for LenientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self.0.verify_client_cert(end_entity, intermediates, now) {
            tracing::warn!("client certificate not valid ({e}); accepted because tls_no_verify_certificate = 1");
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl TlsSettings {
    /// Loads the CA, CRL, certificate and key named by the config and builds the server side.
    pub fn from_config(cfg: &Config) -> Result<TlsSettings, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = load_certs("CA certificate", &cfg.ca_file)?;
        let chain = load_certs("server certificate", &cfg.cert_file)?;
        let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
            .map_err(read_err("server key", &cfg.key_file))?;
        // libvirt loads its default CRL only when the file exists.
        let crl_path = cfg.crl_file.clone().or_else(|| {
            let default = PathBuf::from(if cfg.privileged {
                "/etc/pki/CA/cacrl.pem"
            } else {
                ""
            });
            default.exists().then_some(default)
        });
        let crls: Vec<CertificateRevocationListDer<'static>> = match &crl_path {
            Some(p) => CertificateRevocationListDer::pem_file_iter(p)
                .map_err(read_err("CRL", p))?
                .collect::<Result<_, _>>()
                .map_err(read_err("CRL", p))?,
            None => Vec::new(),
        };
        if !cfg.tls_no_sanity_certificate {
            sanity_check(&ca, &chain)?;
        }
        if cfg.tls_priority != "NORMAL" {
            tracing::info!(
                "tls_priority '{}' is GnuTLS syntax; virtproxyd uses rustls's defaults: TLS 1.3 and 1.2 with AES-GCM and ChaCha20-Poly1305",
                cfg.tls_priority
            );
        }
        let mut roots = RootCertStore::empty();
        for c in &ca {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Rustls(format!("CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let rustls_err = |e: rustls::Error| TlsError::Rustls(e.to_string());
        let verifier: Arc<dyn ClientCertVerifier> = if cfg.tls_no_verify_certificate {
            let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .with_crls(crls)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            Arc::new(LenientVerifier(inner))
        } else {
            WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .with_crls(crls)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(rustls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Sanity(format!("server certificate and key: {e}")))?;
        // Secrets go to the kernel after the handshake; tickets would be records kTLS cannot
        // send for us, and libvirt clients do not resume sessions.
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        let ktls = match std::env::var("VIRTPROXYD_KTLS").as_deref() {
            Ok("off") | Ok("0") => KtlsMode::Off,
            _ => KtlsMode::Auto,
        };
        Ok(TlsSettings {
            config: Arc::new(config),
            allowed_dns: cfg.tls_allowed_dn_list.clone(),
            no_verify: cfg.tls_no_verify_certificate,
            ktls,
        })
    }
}

/// libvirt's start-up check of its own certificate and CA: validity period, CA flags, key
/// usage, server purpose, and that the CA signed the certificate.
fn sanity_check(ca: &[CertificateDer<'_>], chain: &[CertificateDer<'_>]) -> Result<(), TlsError> {
    use x509_parser::prelude::*;
    let now = ASN1Time::now();
    fn parse<'a>(der: &'a CertificateDer<'_>, what: &str) -> Result<X509Certificate<'a>, TlsError> {
        X509Certificate::from_der(der.as_ref())
            .map(|(_, c)| c)
            .map_err(|e| TlsError::Sanity(format!("{what} cannot be parsed: {e}")))
    }
    let mut cas = Vec::new();
    for der in ca {
        let c = parse(der, "CA certificate")?;
        if !c.validity().is_valid_at(now) {
            return Err(TlsError::Sanity(format!(
                "CA certificate '{}' is not valid now",
                c.subject()
            )));
        }
        if !c.is_ca() {
            return Err(TlsError::Sanity(format!(
                "CA certificate '{}' is not a CA",
                c.subject()
            )));
        }
        cas.push(c);
    }
    let leaf = parse(&chain[0], "server certificate")?;
    let v = leaf.validity();
    if now < v.not_before {
        return Err(TlsError::Sanity(format!(
            "server certificate is not valid before {}",
            v.not_before
        )));
    }
    if now > v.not_after {
        return Err(TlsError::Sanity(format!(
            "server certificate expired on {}",
            v.not_after
        )));
    }
    if leaf.is_ca() {
        return Err(TlsError::Sanity(
            "server certificate is a CA certificate".into(),
        ));
    }
    if let Ok(Some(ku)) = leaf.key_usage() {
        if ku.critical && !(ku.value.digital_signature() && ku.value.key_encipherment()) {
            return Err(TlsError::Sanity(
                "server certificate key usage excludes digital signature or key encipherment"
                    .into(),
            ));
        }
    }
    if let Ok(Some(eku)) = leaf.extended_key_usage() {
        if eku.critical && !(eku.value.server_auth || eku.value.any) {
            return Err(TlsError::Sanity(
                "server certificate is not for TLS WWW server use".into(),
            ));
        }
    }
    let signed = cas
        .iter()
        .any(|c| leaf.verify_signature(Some(c.public_key())).is_ok());
    if !signed {
        return Err(TlsError::Sanity(format!(
            "server certificate '{}' is not signed by the CA",
            leaf.subject()
        )));
    }
    Ok(())
}
