//! What a reader of a kTLS socket needs to know about records: the cmsg that carries a
//! record's content type, and which records mean EOF. Setting kTLS up stays in `tls::ktls`.

/// `SOL_TLS` from linux/socket.h.
pub const SOL_TLS: libc::c_int = 282;
/// cmsg type carrying a received record's content type.
pub const TLS_GET_RECORD_TYPE: libc::c_int = 2;

/// TLS record content types.
pub mod content_type {
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}

/// Whether a non-data record read from a kTLS socket is close_notify, TLS's EOF: an alert
/// whose second byte (its description) is 0.
pub fn is_close_notify(record_type: u8, plaintext: &[u8]) -> bool {
    record_type == content_type::ALERT && plaintext.get(1) == Some(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_alert_with_description_zero_is_close_notify() {
        assert!(is_close_notify(content_type::ALERT, &[1, 0]));
        assert!(!is_close_notify(content_type::ALERT, &[2, 40])); // fatal handshake_failure
        assert!(!is_close_notify(content_type::ALERT, &[1]));
        assert!(!is_close_notify(content_type::HANDSHAKE, &[24, 0])); // KeyUpdate
    }
}
