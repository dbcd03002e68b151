//! The XDR subset libvirt uses (RFC 4506, big-endian, 4-byte aligned).

/// Decoding ran off the end of the buffer or met an out-of-range value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XdrError {
    #[error("truncated XDR data")]
    Truncated,
    #[error("XDR string longer than {0} bytes")]
    TooLong(usize),
    #[error("XDR string is not UTF-8")]
    NotUtf8,
    #[error("error reply carries a domain reference")]
    UnexpectedDomain,
}

/// Largest XDR string libvirt accepts (REMOTE_STRING_MAX).
pub const STRING_MAX: usize = 4_194_304;

/// Appends XDR-encoded values to a byte vector.
#[derive(Default, Debug)]
pub struct Encoder {
    pub buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.u32(v as u32)
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.u64(v as u64)
    }
    /// `remote_nonnull_string`: length, bytes, zero padding to 4.
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
        let pad = (4 - s.len() % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self
    }
    /// `remote_string`: an optional pointer to a string.
    pub fn opt_string(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            None => self.u32(0),
            Some(s) => self.u32(1).string(s),
        }
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads XDR values from a byte slice.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        let end = self.pos.checked_add(n).ok_or(XdrError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(XdrError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    pub fn u32(&mut self) -> Result<u32, XdrError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn i32(&mut self) -> Result<i32, XdrError> {
        Ok(self.u32()? as i32)
    }
    pub fn u64(&mut self) -> Result<u64, XdrError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    pub fn i64(&mut self) -> Result<i64, XdrError> {
        Ok(self.u64()? as i64)
    }
    pub fn string(&mut self) -> Result<String, XdrError> {
        let len = self.u32()? as usize;
        if len > STRING_MAX {
            return Err(XdrError::TooLong(STRING_MAX));
        }
        let bytes = self.take(len)?;
        self.take((4 - len % 4) % 4)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| XdrError::NotUtf8)
    }
    /// An XDR boolean as libtirpc's `xdr_bool` reads it: zero is false, any other word is
    /// true. go-libvirt, for one, writes true as `01 00 00 00`.
    pub fn bool(&mut self) -> Result<bool, XdrError> {
        Ok(self.u32()? != 0)
    }
    /// An optional pointer (`xdr_pointer`): its "present" word is read as a boolean.
    pub fn opt_string(&mut self) -> Result<Option<String>, XdrError> {
        if self.bool()? {
            Ok(Some(self.string()?))
        } else {
            Ok(None)
        }
    }
    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_padded_and_round_trip() {
        let mut e = Encoder::new();
        e.string("qemu:///system")
            .opt_string(None)
            .opt_string(Some("ab"));
        let bytes = e.finish();
        assert_eq!(bytes.len(), 4 + 16 + 4 + 4 + 4 + 4);
        let mut d = Decoder::new(&bytes);
        assert_eq!(d.string().unwrap(), "qemu:///system");
        assert_eq!(d.opt_string().unwrap(), None);
        assert_eq!(d.opt_string().unwrap().as_deref(), Some("ab"));
        assert_eq!(d.remaining(), 0);
    }

    #[test]
    fn truncated_and_hostile_input_is_an_error() {
        assert_eq!(Decoder::new(&[0, 0, 0]).u32(), Err(XdrError::Truncated));
        assert_eq!(
            Decoder::new(&[0, 0, 0, 9, b'a']).string(),
            Err(XdrError::Truncated)
        );
        assert_eq!(
            Decoder::new(&[0xff, 0xff, 0xff, 0xff]).string(),
            Err(XdrError::TooLong(STRING_MAX))
        );
    }

    #[test]
    fn any_nonzero_boolean_word_is_true_as_in_libtirpc() {
        // go-libvirt encodes "name present" as 01 00 00 00.
        let mut bytes = vec![1, 0, 0, 0];
        bytes.extend_from_slice(&[0, 0, 0, 1, b'x', 0, 0, 0]);
        assert_eq!(
            Decoder::new(&bytes).opt_string().unwrap().as_deref(),
            Some("x")
        );
        assert_eq!(
            Decoder::new(&[0, 0, 0, 2, 0, 0, 0, 0]).opt_string(),
            Ok(Some(String::new()))
        );
        assert!(Decoder::new(&[0x80, 0, 0, 0]).bool().unwrap());
        assert!(!Decoder::new(&[0, 0, 0, 0]).bool().unwrap());
    }
}
