//! Frame header: `check` answers "is a valid header here?" over bytes, nothing else.

use super::limits::{FRAME_MAX, HEADER_LEN};

/// Message type (libvirt-rpc.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Call,
    Reply,
    Message,
    Stream,
    CallWithFds,
    ReplyWithFds,
    StreamHole,
    /// Any other value: passed through, the receiver decides.
    Other(u32),
}

impl MsgType {
    pub fn from_wire(v: u32) -> Self {
        match v {
            0 => Self::Call,
            1 => Self::Reply,
            2 => Self::Message,
            3 => Self::Stream,
            4 => Self::CallWithFds,
            5 => Self::ReplyWithFds,
            6 => Self::StreamHole,
            other => Self::Other(other),
        }
    }
    pub fn to_wire(self) -> u32 {
        match self {
            Self::Call => 0,
            Self::Reply => 1,
            Self::Message => 2,
            Self::Stream => 3,
            Self::CallWithFds => 4,
            Self::ReplyWithFds => 5,
            Self::StreamHole => 6,
            Self::Other(v) => v,
        }
    }
}

/// Message status (libvirt-rpc.md §1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgStatus {
    Ok,
    Error,
    Continue,
    Other(u32),
}

impl MsgStatus {
    pub fn from_wire(v: u32) -> Self {
        match v {
            0 => Self::Ok,
            1 => Self::Error,
            2 => Self::Continue,
            other => Self::Other(other),
        }
    }
    pub fn to_wire(self) -> u32 {
        match self {
            Self::Ok => 0,
            Self::Error => 1,
            Self::Continue => 2,
            Self::Other(v) => v,
        }
    }
}

/// The length word and the 24-byte header that start every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Whole frame length including the length word itself.
    pub len: u32,
    pub prog: u32,
    pub vers: u32,
    pub proc_: i32,
    pub mtype: MsgType,
    pub serial: u32,
    pub status: MsgStatus,
}

/// Why bytes are not (yet) a usable frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer than 28 bytes so far.
    #[error("incomplete header")]
    Incomplete,
    /// The length word is outside 28..=33554436; libvirt closes the connection on this.
    #[error("frame length {0} outside {min}..={max}", min = HEADER_LEN, max = FRAME_MAX)]
    BadLength(u32),
}

impl Header {
    /// Byte size of the encoded header (length word included).
    pub const SIZE: usize = HEADER_LEN;

    /// Decodes and validates a header from the start of `buf`.
    pub fn check(buf: &[u8]) -> Result<Header, FrameError> {
        if buf.len() >= 4 {
            // Validate the length word as soon as it is known, so a bad frame is refused before
            // its header completes.
            let len = be32(buf, 0);
            if !(HEADER_LEN as u32..=FRAME_MAX).contains(&len) {
                return Err(FrameError::BadLength(len));
            }
        }
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Incomplete);
        }
        Ok(Header {
            len: be32(buf, 0),
            prog: be32(buf, 4),
            vers: be32(buf, 8),
            proc_: be32(buf, 12) as i32,
            mtype: MsgType::from_wire(be32(buf, 16)),
            serial: be32(buf, 20),
            status: MsgStatus::from_wire(be32(buf, 24)),
        })
    }

    /// Payload length (frame minus header).
    pub fn body_len(&self) -> usize {
        self.len as usize - HEADER_LEN
    }

    /// Encodes this header; `len` is written as given.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        for (i, v) in [
            self.len,
            self.prog,
            self.vers,
            self.proc_ as u32,
            self.mtype.to_wire(),
            self.serial,
            self.status.to_wire(),
        ]
        .into_iter()
        .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    /// Whether this frame is followed by fd carrier bytes in the given direction
    /// (libvirt-rpc.md §5.4: servers honour fds only on CALL_WITH_FDS, clients only on
    /// REPLY_WITH_FDS).
    pub fn carries_fds(&self, toward_daemon: bool) -> bool {
        if toward_daemon {
            self.mtype == MsgType::CallWithFds
        } else {
            self.mtype == MsgType::ReplyWithFds
        }
    }
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Builds a complete frame from a header template and a body, fixing up the length word.
pub fn build(mut header: Header, body: &[u8]) -> Vec<u8> {
    header.len = (HEADER_LEN + body.len()) as u32;
    let mut out = Vec::with_capacity(header.len as usize);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // CONNECT_OPEN for qemu:///system captured from virsh (libvirt-rpc.md §2.2).
    const OPEN_QEMU_SYSTEM: &[u8] = &[
        0x00, 0x00, 0x00, 0x38, 0x20, 0x00, 0x80, 0x86, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x01, 0x00, 0x00, 0x00, 0x0e, b'q', b'e', b'm', b'u', b':', b'/', b'/', b'/', b's',
        b'y', b's', b't', b'e', b'm', 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn parses_captured_connect_open_header() {
        let h = Header::check(OPEN_QEMU_SYSTEM).unwrap();
        assert_eq!(h.len, 56);
        assert_eq!(h.prog, crate::proto::program::REMOTE);
        assert_eq!(h.proc_, 1);
        assert_eq!(h.mtype, MsgType::Call);
        assert_eq!(h.serial, 2);
        assert_eq!(h.status, MsgStatus::Ok);
        assert_eq!(h.encode(), OPEN_QEMU_SYSTEM[..28]);
    }

    #[test]
    fn length_word_is_validated_before_header_completes() {
        for bad in [0u32, 4, 27, FRAME_MAX + 1, u32::MAX] {
            assert_eq!(
                Header::check(&bad.to_be_bytes()),
                Err(FrameError::BadLength(bad)),
                "len {bad}"
            );
        }
        assert_eq!(
            Header::check(&28u32.to_be_bytes()),
            Err(FrameError::Incomplete)
        );
        assert_eq!(Header::check(&[0, 0]), Err(FrameError::Incomplete));
    }

    #[test]
    fn largest_legal_frame_is_accepted() {
        let mut b = OPEN_QEMU_SYSTEM[..28].to_vec();
        b[..4].copy_from_slice(&FRAME_MAX.to_be_bytes());
        assert_eq!(Header::check(&b).unwrap().len, FRAME_MAX);
    }

    #[test]
    fn fd_carriers_depend_on_direction() {
        let mut h = Header::check(OPEN_QEMU_SYSTEM).unwrap();
        h.mtype = MsgType::CallWithFds;
        assert!(h.carries_fds(true));
        assert!(!h.carries_fds(false));
        h.mtype = MsgType::ReplyWithFds;
        assert!(!h.carries_fds(true));
        assert!(h.carries_fds(false));
    }
}
