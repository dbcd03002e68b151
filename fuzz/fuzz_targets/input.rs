//! The fuzz input as a source of choices, shared by the targets that draw from it.

/// Bytes taken from the front of the input; zeros once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
    /// A string of fewer than `max` bytes (invalid UTF-8 replaced).
    pub fn string(&mut self, max: usize) -> String {
        let n = self.u8() as usize % max;
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
