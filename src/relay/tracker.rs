//! Frame-boundary tracking over a byte stream, sans-IO.
//!
//! The relay moves bytes without parsing bodies, but it must always know where it is: at a
//! header (to validate the length word before anything is forwarded), inside a body (to splice
//! it), or on an fd carrier byte (which must be moved with `recvmsg`/`sendmsg`, never spliced;
//! libvirt-rpc.md §5.4).

use crate::proto::{limits, FrameError, Header};

/// Which way a relay direction's bytes go: the frames that may carry fds differ (a call
/// toward the daemon, a reply toward the client; see `Header::carries_fds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to daemon.
    ToDaemon,
    /// Daemon to client.
    ToClient,
}

/// Where the next byte of the stream falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a header; `got` bytes of it so far.
    Header { got: usize },
    /// Inside the body of a frame that announces fds: collecting the 4-byte fd count first.
    FdCount { got: usize, body_left: usize },
    /// Inside a body; `left` bytes to go, then `carriers` carrier bytes.
    Body { left: usize, carriers: u32 },
    /// `left` fd carrier bytes (one fd each) follow the frame.
    Carriers { left: u32 },
    /// Inside the body of a frame the proxy takes out of the stream (`Verdict::Capture`).
    Capture { left: usize },
}

/// Largest frame the relay takes out of the stream to answer itself. The only such frame is a
/// client's own CONNECT_SET_IDENTITY (at most 20 short parameters, a few hundred bytes from
/// real clients); a larger one closes the connection, so a client cannot make the proxy hold
/// more than this for a frame it is still sending, nor keep more as its claimed identity.
pub const CAPTURE_MAX: usize = 64 * 1024;

/// Why the stream must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("frame announces {0} fds, more than {max}", max = limits::NUM_FDS_MAX)]
    TooManyFds(u32),
    #[error("frame announces fds but is too short to hold their count")]
    FdCountMissing,
    #[error("{0}")]
    Refused(String),
    #[error("frame of {0} bytes is too large to be answered by the proxy")]
    CaptureTooLarge(usize),
}

/// What the owner wants done with a frame whose header was just seen.
pub enum Verdict {
    Forward,
    /// Stop the connection: the frame (and everything after it) is not forwarded.
    Refuse(String),
    /// Take the whole frame out of the stream: the proxy answers it (see `take_captured`).
    Capture,
}

/// Tracks frame boundaries for one direction.
#[derive(Debug, Clone)]
pub struct Tracker {
    toward_daemon: bool,
    state: State,
    hdr: [u8; Header::SIZE],
    fd_count: [u8; 4],
    /// Whether the last body was large: the next header is then read on its own so the body
    /// after it is not pulled into userspace (see `Pump`).
    last_body_large: bool,
    large_threshold: usize,
    /// The frame being captured, header first.
    capturing: Vec<u8>,
    /// Captured frames, complete, for the owner to answer: one after the other, each starting
    /// with its length word (one buffer, not one allocation per frame: a read of header-only
    /// frames holds thousands).
    captured: Vec<u8>,
    /// Byte ranges of the last `consume` input that belong to captured frames and must not be
    /// forwarded, relative to that input's start. A start may be negative: the header began
    /// in bytes the owner held back (see `partial_header_len`).
    cuts: Vec<(isize, usize)>,
}

impl Tracker {
    pub fn new(direction: Direction, large_threshold: usize) -> Self {
        Self {
            toward_daemon: direction == Direction::ToDaemon,
            state: State::Header { got: 0 },
            hdr: [0; Header::SIZE],
            fd_count: [0; 4],
            last_body_large: false,
            large_threshold,
            capturing: Vec::new(),
            captured: Vec::new(),
            cuts: Vec::new(),
        }
    }

    /// Bytes of a header seen so far but not complete: the owner holds them back, since a
    /// header's verdict is known only once it is whole.
    pub fn partial_header_len(&self) -> usize {
        match self.state {
            State::Header { got } => got,
            _ => 0,
        }
    }

    /// Ranges of the last `consume` input not to forward (captured frames), in order.
    pub fn take_cuts(&mut self) -> Vec<(isize, usize)> {
        std::mem::take(&mut self.cuts)
    }

    /// Frames captured so far, complete, one after the other (see `relay::owed::frames`).
    pub fn take_captured(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.captured)
    }

    /// The frame being captured is complete: it joins `captured`, and its buffer is freed (a
    /// connection that sent one identity keeps no capture buffer).
    fn finish_capture(&mut self) {
        let frame = std::mem::take(&mut self.capturing);
        self.captured.extend_from_slice(&frame);
    }

    /// Whether a complete captured frame waits to be taken.
    pub fn has_captured(&self) -> bool {
        !self.captured.is_empty()
    }

    /// True between frames (the only place a clean EOF may happen).
    pub fn at_boundary(&self) -> bool {
        self.state == State::Header { got: 0 }
    }

    /// Body bytes left in the current frame when positioned inside a body that may be spliced
    /// (no fd count pending, and only for bodies at or above the threshold).
    pub fn spliceable_body(&self) -> Option<usize> {
        match self.state {
            State::Body { left, carriers: 0 } if left >= self.large_threshold => Some(left),
            _ => None,
        }
    }

    /// How many bytes the next read may take so that it never runs past a position the pump
    /// must handle on its own: a carrier byte, the end of an fd frame's body, or (after a large
    /// body) the end of the next header.
    pub fn read_limit(&self, room: usize) -> usize {
        match self.state {
            State::Header { got } if self.last_body_large => room.min(Header::SIZE - got),
            State::FdCount { got, .. } => room.min(4 - got),
            State::Body { left, carriers } if carriers > 0 => room.min(left),
            State::Carriers { .. } => room.min(1),
            _ => room,
        }
    }

    /// How many of the next `avail` bytes may be consumed without passing the end of the
    /// current frame (at most to the end of a header while it is incomplete), so an owner can
    /// stop exactly at a frame boundary.
    pub fn frame_piece(&self, avail: usize) -> usize {
        let piece = match self.state {
            State::Header { got } => Header::SIZE - got,
            State::FdCount { got, .. } => 4 - got,
            State::Body { left, .. } | State::Capture { left } => left,
            State::Carriers { .. } => 1,
        };
        avail.min(piece)
    }

    /// Whether the next byte is an fd carrier.
    pub fn at_carrier(&self) -> bool {
        matches!(self.state, State::Carriers { .. })
    }

    /// Consumes bytes that were just read. `on_header` sees each completed header.
    /// Returns the offset within `bytes` of the last carrier byte consumed, if any.
    pub fn consume(
        &mut self,
        mut bytes: &[u8],
        mut on_header: impl FnMut(&Header) -> Verdict,
    ) -> Result<Option<usize>, TrackError> {
        let total = bytes.len();
        let mut last_carrier = None;
        // Start of the captured bytes in this input, while a capture is open.
        let mut cut_open: Option<isize> = match self.state {
            State::Capture { .. } => Some(0),
            _ => None,
        };
        while !bytes.is_empty() {
            match self.state {
                State::Header { got } => {
                    let n = bytes.len().min(Header::SIZE - got);
                    self.hdr[got..got + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    let got = got + n;
                    match Header::check(&self.hdr[..got]) {
                        Err(FrameError::Incomplete) => self.state = State::Header { got },
                        Err(e) => return Err(e.into()),
                        Ok(h) => {
                            let body = h.body_len();
                            match on_header(&h) {
                                Verdict::Forward => {}
                                Verdict::Refuse(why) => return Err(TrackError::Refused(why)),
                                Verdict::Capture => {
                                    if h.len as usize > CAPTURE_MAX {
                                        return Err(TrackError::CaptureTooLarge(h.len as usize));
                                    }
                                    let end = total - bytes.len();
                                    cut_open = Some(end as isize - Header::SIZE as isize);
                                    self.capturing = self.hdr.to_vec();
                                    self.last_body_large = false;
                                    if body == 0 {
                                        self.finish_capture();
                                        self.cuts.push((cut_open.take().unwrap_or(0), end));
                                        self.state = State::Header { got: 0 };
                                    } else {
                                        self.state = State::Capture { left: body };
                                    }
                                    continue;
                                }
                            }
                            self.last_body_large = body >= self.large_threshold;
                            self.state = if h.carries_fds(self.toward_daemon) {
                                if body < 4 {
                                    return Err(TrackError::FdCountMissing);
                                }
                                State::FdCount {
                                    got: 0,
                                    body_left: body,
                                }
                            } else if body == 0 {
                                State::Header { got: 0 }
                            } else {
                                State::Body {
                                    left: body,
                                    carriers: 0,
                                }
                            };
                        }
                    }
                }
                State::FdCount { got, body_left } => {
                    let n = bytes.len().min(4 - got);
                    self.fd_count[got..got + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    let (got, body_left) = (got + n, body_left - n);
                    if got < 4 {
                        self.state = State::FdCount { got, body_left };
                        continue;
                    }
                    let nfds = u32::from_be_bytes(self.fd_count);
                    if nfds > limits::NUM_FDS_MAX {
                        return Err(TrackError::TooManyFds(nfds));
                    }
                    self.state = match (body_left, nfds) {
                        (0, 0) => State::Header { got: 0 },
                        (0, n) => State::Carriers { left: n },
                        (left, carriers) => State::Body { left, carriers },
                    };
                }
                State::Body { left, carriers } => {
                    let n = bytes.len().min(left);
                    bytes = &bytes[n..];
                    let left = left - n;
                    self.state = match (left, carriers) {
                        (0, 0) => State::Header { got: 0 },
                        (0, c) => State::Carriers { left: c },
                        (l, c) => State::Body {
                            left: l,
                            carriers: c,
                        },
                    };
                }
                State::Capture { left } => {
                    let n = bytes.len().min(left);
                    self.capturing.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if left == n {
                        self.finish_capture();
                        self.cuts
                            .push((cut_open.take().unwrap_or(0), total - bytes.len()));
                        self.state = State::Header { got: 0 };
                    } else {
                        self.state = State::Capture { left: left - n };
                    }
                }
                State::Carriers { left } => {
                    last_carrier = Some(total - bytes.len());
                    bytes = &bytes[1..];
                    self.state = if left == 1 {
                        State::Header { got: 0 }
                    } else {
                        State::Carriers { left: left - 1 }
                    };
                }
            }
        }
        if let Some(start) = cut_open {
            self.cuts.push((start, total));
        }
        Ok(last_carrier)
    }

    /// Records that `n` body bytes were moved without passing through `consume` (spliced).
    pub fn skip_body(&mut self, n: usize) {
        if let State::Body { left, carriers } = self.state {
            let left = left.saturating_sub(n);
            self.state = match (left, carriers) {
                (0, 0) => State::Header { got: 0 },
                (0, c) => State::Carriers { left: c },
                (l, c) => State::Body {
                    left: l,
                    carriers: c,
                },
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::build;
    use crate::proto::{MsgStatus, MsgType};

    fn frame(mtype: MsgType, body: &[u8]) -> Vec<u8> {
        build(
            Header {
                len: 0,
                prog: crate::proto::program::REMOTE,
                vers: 1,
                proc_: 443,
                mtype,
                serial: 9,
                status: MsgStatus::Ok,
            },
            body,
        )
    }

    fn fwd(_: &Header) -> Verdict {
        Verdict::Forward
    }

    #[test]
    fn headers_split_across_reads_are_seen_once() {
        let f = frame(MsgType::Call, &[1, 2, 3, 4]);
        let mut t = Tracker::new(Direction::ToDaemon, 4096);
        let mut seen = 0;
        for b in f.chunks(3) {
            t.consume(b, |_| {
                seen += 1;
                Verdict::Forward
            })
            .unwrap();
        }
        assert_eq!(seen, 1);
        assert!(t.at_boundary());
    }

    #[test]
    fn carriers_follow_call_with_fds_toward_daemon_only() {
        let mut f = frame(MsgType::CallWithFds, &[0, 0, 0, 2, 7, 7, 7, 7]);
        f.extend_from_slice(&[0, 0]); // two carrier bytes
        let mut t = Tracker::new(Direction::ToDaemon, 4096);
        assert_eq!(t.consume(&f[..f.len() - 2], fwd).unwrap(), None);
        assert!(t.at_carrier());
        assert_eq!(t.read_limit(100), 1);
        assert_eq!(
            t.consume(&f[f.len() - 2..f.len() - 1], fwd).unwrap(),
            Some(0)
        );
        assert_eq!(t.consume(&f[f.len() - 1..], fwd).unwrap(), Some(0));
        assert!(t.at_boundary());

        // The same frame coming from the daemon has no carriers (libvirt ignores them).
        let mut t = Tracker::new(Direction::ToClient, 4096);
        t.consume(&frame(MsgType::CallWithFds, &[0, 0, 0, 2]), fwd)
            .unwrap();
        assert!(t.at_boundary());
    }

    #[test]
    fn fd_frame_body_reads_stop_before_carriers() {
        let f = frame(MsgType::ReplyWithFds, &[0, 0, 0, 1, 5, 5, 5, 5, 5, 5]);
        let mut t = Tracker::new(Direction::ToClient, 4096);
        t.consume(&f[..30], fwd).unwrap();
        assert_eq!(t.read_limit(1000), 2); // rest of the fd count
        t.consume(&f[30..32], fwd).unwrap();
        assert_eq!(t.read_limit(1000), 6); // rest of the body, not a byte more
        t.consume(&f[32..], fwd).unwrap();
        assert!(t.at_carrier());
    }

    #[test]
    fn too_many_fds_and_bad_lengths_close_the_stream() {
        let f = frame(MsgType::CallWithFds, &33u32.to_be_bytes());
        assert_eq!(
            Tracker::new(Direction::ToDaemon, 4096).consume(&f, fwd),
            Err(TrackError::TooManyFds(33))
        );
        let f = frame(MsgType::CallWithFds, &[]);
        assert_eq!(
            Tracker::new(Direction::ToDaemon, 4096).consume(&f, fwd),
            Err(TrackError::FdCountMissing)
        );
        for len in [0u32, 27, u32::MAX] {
            assert!(matches!(
                Tracker::new(Direction::ToDaemon, 4096).consume(&len.to_be_bytes(), fwd),
                Err(TrackError::Frame(FrameError::BadLength(l))) if l == len
            ));
        }
    }

    #[test]
    fn large_bodies_are_spliceable_and_the_next_header_is_read_alone() {
        let mut t = Tracker::new(Direction::ToClient, 4096);
        let f = frame(MsgType::Stream, &vec![0u8; 10_000]);
        t.consume(&f[..28], fwd).unwrap();
        assert_eq!(t.spliceable_body(), Some(10_000));
        t.skip_body(10_000);
        assert!(t.at_boundary());
        assert_eq!(t.read_limit(65536), 28);
        // A small frame resets the policy.
        t.consume(&frame(MsgType::Reply, &[0; 8]), fwd).unwrap();
        assert_eq!(t.read_limit(65536), 65536);
    }

    #[test]
    fn refusal_stops_the_stream() {
        let f = frame(MsgType::Call, &[]);
        let r =
            Tracker::new(Direction::ToDaemon, 4096).consume(&f, |_| Verdict::Refuse("no".into()));
        assert_eq!(r, Err(TrackError::Refused("no".into())));
    }
}
