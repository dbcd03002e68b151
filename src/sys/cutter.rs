//! Cutting a stream of frames into writes that end at frame ends (toward a TLS client).

use crate::proto::Header;

/// Where writes toward a TLS client must be cut so that no TLS record carries the end of one
/// frame and the start of the next.
///
/// libvirt's client (9.0 `virNetSocketHasCachedData`) polls the socket before reading again
/// and does not ask GnuTLS for data it already decrypted: if one record held the tail of a
/// frame and the head of the next, the client would sit in poll() with that next frame
/// buffered inside GnuTLS. libvirt servers send each message with its own record writes; each
/// of our writes (rustls `write`, or `send` on a kTLS socket) becomes its own record(s), so
/// cutting writes at frame ends reproduces that. Input must be valid frames (the relay has
/// validated them).
#[derive(Debug, Clone, Default)]
pub struct FrameCutter {
    /// Length of the frame being written, once its length word is known.
    len: Option<usize>,
    /// Bytes of that frame already written.
    sent: usize,
    lenbuf: [u8; 4],
    lengot: usize,
}

impl FrameCutter {
    /// How many leading bytes of `avail` belong to the frame being written.
    pub fn limit(&self, avail: &[u8]) -> usize {
        if let Some(len) = self.len {
            return avail.len().min(len - self.sent);
        }
        let need = 4 - self.lengot;
        if avail.len() < need {
            return avail.len();
        }
        let mut word = self.lenbuf;
        word[self.lengot..].copy_from_slice(&avail[..need]);
        let len = (u32::from_be_bytes(word) as usize).max(Header::SIZE);
        avail.len().min(len - self.lengot)
    }

    /// Records that `bytes` were written.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.len {
                None => {
                    let take = bytes.len().min(4 - self.lengot);
                    self.lenbuf[self.lengot..self.lengot + take].copy_from_slice(&bytes[..take]);
                    self.lengot += take;
                    bytes = &bytes[take..];
                    if self.lengot == 4 {
                        self.len =
                            Some((u32::from_be_bytes(self.lenbuf) as usize).max(Header::SIZE));
                        self.sent = 4;
                        self.finish_if_done();
                    }
                }
                Some(len) => {
                    let take = bytes.len().min(len - self.sent);
                    self.sent += take;
                    bytes = &bytes[take..];
                    self.finish_if_done();
                }
            }
        }
    }

    /// Records `n` body bytes written without passing through userspace (spliced).
    pub fn advance_body(&mut self, n: usize) {
        if let Some(len) = self.len {
            self.sent = (self.sent + n).min(len);
            self.finish_if_done();
        }
    }

    fn finish_if_done(&mut self) {
        if self.len == Some(self.sent) {
            *self = FrameCutter::default();
        }
    }
}

#[cfg(test)]
mod cutter_tests {
    use super::*;

    fn f(len: u32) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.resize(len as usize, 7);
        v
    }

    #[test]
    fn writes_never_cross_a_frame_end() {
        let stream: Vec<u8> = [f(28), f(100), f(40)].concat();
        // Feed it in odd chunks, as reads would deliver it; collect the write sizes.
        let mut c = FrameCutter::default();
        let mut writes = Vec::new();
        for chunk in stream.chunks(30) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let k = c.limit(rest);
                writes.push(k);
                c.advance(&rest[..k]);
                rest = &rest[k..];
            }
        }
        // Running sums must hit every frame end (28, 128, 168) exactly.
        let mut sum = 0;
        let ends: Vec<usize> = writes
            .iter()
            .map(|w| {
                sum += w;
                sum
            })
            .collect();
        for end in [28, 128, 168] {
            assert!(ends.contains(&end), "no write ends at {end}: {writes:?}");
        }
        assert_eq!(sum, stream.len());
    }

    #[test]
    fn split_length_word_is_handled() {
        let stream = [f(32), f(28)].concat();
        let mut c = FrameCutter::default();
        c.advance(&stream[..2]);
        assert_eq!(c.limit(&stream[2..]), 30);
        c.advance(&stream[2..32]);
        assert_eq!(c.limit(&stream[32..]), 28);
        c.advance(&stream[32..36]);
        c.advance_body(24);
        assert_eq!(c.limit(&f(28)), 28, "spliced body ended the frame");
    }
}
