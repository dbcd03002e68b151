//! The peer's distinguished name as libvirt sees it, and `tls_allowed_dn_list` matching
//! (libvirt-rpc.md §6.2).
//!
//! libvirt takes the DN from GnuTLS (`gnutls_x509_crt_get_dn`): RDNs in certificate order,
//! `SHORTNAME=value` joined with `,`, multi-valued RDNs joined with `+`, RFC 4514 escaping.
//! Patterns are glib `g_pattern_match_simple`: `*` any run (also empty), `?` one character,
//! no escapes, case-sensitive, whole string.

use x509_parser::prelude::*;

use crate::glob::glob_match;

/// GnuTLS's short names for the attribute types that appear in practice.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.5" => "serialNumber",
        "2.5.4.4" => "SN",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "2.5.4.17" => "postalCode",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

/// RFC 4514 escaping of an attribute value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == ' ' || c == '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The subject DN of a DER certificate in libvirt's (GnuTLS's) form.
pub fn subject_dn(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let name = short_name(&oid).map(str::to_string).unwrap_or(oid);
            let value = match attr.as_str() {
                Ok(s) => escape(s),
                // Non-string values are printed as #hex, as RFC 4514 does.
                Err(_) => format!(
                    "#{}",
                    attr.attr_value()
                        .data
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                ),
            };
            parts.push(format!("{name}={value}"));
        }
        rdns.push(parts.join("+"));
    }
    Some(rdns.join(","))
}

/// Whether `dn` passes the allowlist: unset allows everyone, an empty list no one.
pub fn dn_allowed(list: Option<&[String]>, dn: &str) -> bool {
    match list {
        None => true,
        Some(patterns) => patterns.iter().any(|p| glob_match(p, dn)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_glib() {
        // The case verified against libvirt (libvirt-rpc.md §6.2).
        let p = "C=GB,ST=London,*,CN=client?";
        assert!(glob_match(
            p,
            "C=GB,ST=London,L=London,O=Test Org,CN=client1"
        ));
        assert!(!glob_match(
            p,
            "C=GB,ST=London,L=London,O=Test Org,CN=client12"
        ));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(!glob_match("cn=x", "CN=x"), "case-sensitive");
        assert!(glob_match("a**", "a"));
    }

    #[test]
    fn empty_list_denies_and_unset_allows() {
        assert!(dn_allowed(None, "CN=x"));
        assert!(!dn_allowed(Some(&[]), "CN=x"));
        assert!(dn_allowed(Some(&["CN=*".to_string()]), "CN=x"));
    }

    #[test]
    fn dn_is_in_certificate_order_with_gnutls_names() {
        let mut params = rcgen::CertificateParams::new(vec!["client1".into()]).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CountryName, "GB");
        dn.push(rcgen::DnType::StateOrProvinceName, "London");
        dn.push(rcgen::DnType::LocalityName, "London");
        dn.push(rcgen::DnType::OrganizationName, "Test, Org");
        dn.push(rcgen::DnType::CommonName, "client1");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_dn(cert.der()).unwrap(),
            "C=GB,ST=London,L=London,O=Test\\, Org,CN=client1"
        );
    }
}
