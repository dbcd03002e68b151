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
