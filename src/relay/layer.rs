//! The SASL security layer seen from the data path: a codec every client byte passes through
//! once authentication has negotiated one (GSSAPI on plain TCP; libvirt-dropin.md §3). The SASL
//! code implements it for its Cyrus session; the pre-open buffers and the copy relay
//! (`relay::copy`) only call it.

/// A SASL security layer: what Cyrus's sasl_encode/sasl_decode do to every client byte
/// after authentication completes with a negotiated SSF > 0.
pub trait SecurityLayer: Send {
    /// Encodes `plain` (at most `max_plain()` bytes) into wire bytes appended to `out`.
    fn encode(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), LayerError>;
    /// Feeds wire bytes (split anywhere); appends the plain bytes that complete to `out`.
    fn decode(&mut self, wire: &[u8], out: &mut Vec<u8>) -> Result<(), LayerError>;
    /// Largest plain chunk one `encode` accepts (Cyrus's SASL_MAXOUTBUF).
    fn max_plain(&self) -> usize;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerError(pub String);

impl std::fmt::Display for LayerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SASL security layer: {}", self.0)
    }
}

impl std::error::Error for LayerError {}

/// Encodes all of `plain`, in pieces no larger than the layer accepts.
pub fn encode_all(
    layer: &mut dyn SecurityLayer,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), LayerError> {
    // A layer reporting 0 would never make progress; treat it as one byte per piece.
    let max = layer.max_plain().max(1);
    for piece in plain.chunks(max) {
        layer.encode(piece, out)?;
    }
    Ok(())
}

/// A stand-in codec for tests (unit and fuzz): each encoded piece is a 4-byte big-endian
/// length and the piece XORed with a key, like Cyrus's GSSAPI framing with a trivial cipher,
/// so a test can tell encoded bytes from plain ones and decode them back.
#[doc(hidden)]
pub mod testing {
    use super::{LayerError, SecurityLayer};

    pub struct XorLayer {
        pub key: u8,
        pub max: usize,
        /// Wire bytes of a piece not complete yet.
        pending: Vec<u8>,
    }

    impl XorLayer {
        pub fn new(key: u8, max: usize) -> XorLayer {
            XorLayer {
                key,
                max,
                pending: Vec::new(),
            }
        }
    }

    impl SecurityLayer for XorLayer {
        fn encode(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), LayerError> {
            if plain.len() > self.max {
                return Err(LayerError(format!(
                    "{} bytes to encode, more than {}",
                    plain.len(),
                    self.max
                )));
            }
            out.extend_from_slice(&(plain.len() as u32).to_be_bytes());
            out.extend(plain.iter().map(|b| b ^ self.key));
            Ok(())
        }

        fn decode(&mut self, wire: &[u8], out: &mut Vec<u8>) -> Result<(), LayerError> {
            self.pending.extend_from_slice(wire);
            let mut at = 0;
            while self.pending.len() - at >= 4 {
                let mut len = [0u8; 4];
                len.copy_from_slice(&self.pending[at..at + 4]);
                let len = u32::from_be_bytes(len) as usize;
                if len > self.max {
                    return Err(LayerError(format!("piece of {len} bytes")));
                }
                if self.pending.len() - at - 4 < len {
                    break;
                }
                out.extend(
                    self.pending[at + 4..at + 4 + len]
                        .iter()
                        .map(|b| b ^ self.key),
                );
                at += 4 + len;
            }
            self.pending.drain(..at);
            Ok(())
        }

        fn max_plain(&self) -> usize {
            self.max
        }
    }
}
