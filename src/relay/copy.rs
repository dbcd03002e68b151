//! The relay of a connection with a SASL security layer (GSSAPI on plain TCP): splicing is
//! impossible because every client byte is encoded on the wire, so both directions are copied
//! through userspace.
//!
//! client → daemon: wire bytes → `decode` → frame tracking with the same verdicts the splice
//! relay applies (a CONNECT_SET_IDENTITY captured whole, refusals) → the daemon.
//! daemon → client: plain frames (tracked, so the proxy's own answers join at a frame boundary)
//! → `encode` in pieces of at most `max_plain` → the client.
//!
//! `CopyRelay` is sans-IO (bytes in, bytes out) apart from `drive`, which moves it between two
//! non-blocking sockets. Back-pressure: a side is read only while the buffer toward the other
//! side is under `OUT_CAP`; when it is not, the write that left it there met EAGAIN, so the
//! other side's writability wakes the connection, and the readable flag of the side not read
//! stays set (edge-triggered readiness reports nothing new for bytes already queued).

use std::io;
use std::os::fd::BorrowedFd;

use super::layer::{encode_all, LayerError, SecurityLayer};
use super::owed::Owed;
use super::tracker::{Direction, TrackError, Tracker, Verdict};
use crate::proto::Header;
use crate::sys;

/// Bytes waiting for one side beyond which the other side is not read.
pub const OUT_CAP: usize = 256 * 1024;
/// Largest single read from either socket.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes one `drive` may read before yielding to other connections.
const DRIVE_BUDGET: usize = 1 << 20;
/// An emptied buffer that grew beyond this is given back to the allocator, so an idle
/// connection keeps no large buffer.
const KEEP_CAPACITY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Protocol(#[from] TrackError),
    #[error("frame carries fds, which a TCP client can neither send nor receive")]
    Fds,
    #[error("client closed in the middle of a frame")]
    ClientTruncated,
    #[error("daemon closed in the middle of a frame")]
    DaemonTruncated,
    #[error("client read: {0}")]
    ClientRead(io::Error),
    #[error("client write: {0}")]
    ClientWrite(io::Error),
    #[error("daemon read: {0}")]
    DaemonRead(io::Error),
    #[error("daemon write: {0}")]
    DaemonWrite(io::Error),
}

/// Bytes queued for one socket, written from `start`.
#[derive(Debug, Default)]
struct Outbox {
    buf: Vec<u8>,
    start: usize,
}

impl Outbox {
    fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
    fn consumed(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.start = 0;
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        } else if self.start >= KEEP_CAPACITY && self.start * 2 >= self.buf.len() {
            // Keep appends from growing the buffer without bound behind a slow writer.
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// What a `drive` ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDrive {
    /// Waiting for readiness on some socket.
    Blocked,
    /// Used its budget with work left.
    Yield,
    /// The daemon closed between frames and all its bytes reached the client.
    Finished,
}

pub struct CopyRelay {
    layer: Box<dyn SecurityLayer>,
    c2d: Tracker,
    d2c: Tracker,
    to_daemon: Outbox,
    /// The last `hold` bytes of `to_daemon` are a client header not complete yet: held until
    /// its verdict is known, as the splice relay holds them.
    hold: usize,
    to_client: Outbox,
    /// The client's captured calls and the proxy's own replies to them (waiting for the
    /// daemon→client stream to reach a frame boundary). Answered while `to_client` holds
    /// under `OUT_CAP`; the client is read only when all are answered (`relay::owed`).
    owed: Owed,
    /// Decoded client bytes, reused between reads.
    plain: Vec<u8>,
    client_eof: bool,
    daemon_shut: bool,
    daemon_eof: bool,
    /// Plain bytes delivered to the daemon and taken from it.
    pub to_daemon_bytes: u64,
    pub to_client_bytes: u64,
}

impl CopyRelay {
    pub fn new(layer: Box<dyn SecurityLayer>) -> CopyRelay {
        CopyRelay {
            layer,
            // Nothing is ever spliced here: no body counts as large.
            c2d: Tracker::new(Direction::ToDaemon, usize::MAX),
            d2c: Tracker::new(Direction::ToClient, usize::MAX),
            to_daemon: Outbox::default(),
            hold: 0,
            to_client: Outbox::default(),
            owed: Owed::default(),
            plain: Vec::new(),
            client_eof: false,
            daemon_shut: false,
            daemon_eof: false,
            to_daemon_bytes: 0,
            to_client_bytes: 0,
        }
    }

    /// Wire bytes already encoded for the client (the pre-open replies, the open reply last):
    /// they go out before anything else.
    pub fn queue_client_wire(&mut self, wire: &[u8]) {
        self.to_client.buf.extend_from_slice(wire);
    }

    /// Wire bytes from the client.
    pub fn client_wire(
        &mut self,
        wire: &[u8],
        inspect: &mut dyn FnMut(&Header) -> Verdict,
    ) -> Result<(), CopyError> {
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let r = self
            .layer
            .decode(wire, &mut plain)
            .map_err(CopyError::from)
            .and_then(|()| self.client_plain(&plain, inspect));
        if plain.capacity() <= KEEP_CAPACITY {
            self.plain = plain;
        }
        r
    }

    /// Plain client bytes (decoded; also those decoded before hand-over).
    pub fn client_plain(
        &mut self,
        plain: &[u8],
        inspect: &mut dyn FnMut(&Header) -> Verdict,
    ) -> Result<(), CopyError> {
        if plain.is_empty() {
            return Ok(());
        }
        if self.c2d.consume(plain, |h| inspect(h))?.is_some() {
            return Err(CopyError::Fds);
        }
        let at = self.to_daemon.buf.len();
        self.to_daemon.buf.extend_from_slice(plain);
        // Captured frames leave the stream whole; a cut may start in the held-back header.
        let cuts = self.c2d.take_cuts();
        for &(rel_start, rel_end) in cuts.iter().rev() {
            let start = (at as isize + rel_start).max(self.to_daemon.start as isize) as usize;
            self.to_daemon.buf.drain(start..at + rel_end);
        }
        self.hold = self.c2d.partial_header_len();
        Ok(())
    }

    /// Answers the client frames taken out of the stream (`Verdict::Capture`) with `reply`, in
    /// order, while the bytes queued for the client stay under `OUT_CAP`; the replies join the
    /// daemon→client stream at its next frame boundary.
    pub fn answer_captured(
        &mut self,
        reply: &mut dyn FnMut(&[u8]) -> Vec<u8>,
    ) -> Result<(), CopyError> {
        self.owed.push_captured(self.c2d.take_captured());
        self.owed.answer(self.to_client.pending(), OUT_CAP, reply);
        self.release_answers()
    }

    fn release_answers(&mut self) -> Result<(), CopyError> {
        if !self.owed.answers.is_empty() && self.d2c.at_boundary() {
            encode_all(
                &mut *self.layer,
                &self.owed.answers,
                &mut self.to_client.buf,
            )?;
            self.owed.answers = Vec::new();
        }
        Ok(())
    }

    /// Plain bytes from the daemon.
    pub fn daemon_plain(&mut self, plain: &[u8]) -> Result<(), CopyError> {
        self.daemon_plain_observed(plain, &mut |_| {})
    }

    /// Plain bytes from the daemon; `observe` sees each of its frame headers (metrics).
    pub fn daemon_plain_observed(
        &mut self,
        mut plain: &[u8],
        observe: &mut dyn FnMut(&Header),
    ) -> Result<(), CopyError> {
        while !plain.is_empty() {
            // With answers waiting, stop at the end of the current frame to slot them in.
            let n = if self.owed.answers.is_empty() {
                plain.len()
            } else {
                self.d2c.frame_piece(plain.len())
            };
            if self
                .d2c
                .consume(&plain[..n], |h| {
                    observe(h);
                    Verdict::Forward
                })?
                .is_some()
            {
                return Err(CopyError::Fds);
            }
            encode_all(&mut *self.layer, &plain[..n], &mut self.to_client.buf)?;
            self.to_client_bytes += n as u64;
            plain = &plain[n..];
            self.release_answers()?;
        }
        Ok(())
    }

    /// Plain bytes ready for the daemon (a held-back partial header excluded).
    pub fn pending_to_daemon(&self) -> &[u8] {
        &self.to_daemon.buf[self.to_daemon.start..self.to_daemon.buf.len() - self.hold]
    }

    pub fn wrote_to_daemon(&mut self, n: usize) {
        self.to_daemon.consumed(n);
        self.to_daemon_bytes += n as u64;
    }

    /// Wire bytes ready for the client.
    pub fn pending_to_client(&self) -> &[u8] {
        &self.to_client.buf[self.to_client.start..]
    }

    pub fn wrote_to_client(&mut self, n: usize) {
        self.to_client.consumed(n);
    }

    /// Whether the client may be read: its decoded bytes have room toward the daemon, and
    /// every frame it had captured is answered (which happens only while what is queued for
    /// it is under `OUT_CAP`: a client that does not read is not read).
    pub fn may_read_client(&self) -> bool {
        !self.client_eof && self.to_daemon.pending() < OUT_CAP && self.owed.all_answered()
    }

    /// Whether the daemon may be read: its encoded bytes have room toward the client.
    pub fn may_read_daemon(&self) -> bool {
        !self.daemon_eof && self.to_client.pending() < OUT_CAP
    }

    /// The client closed its sending side. Fine between frames only.
    pub fn client_eof(&mut self) -> Result<(), CopyError> {
        if !self.c2d.at_boundary() {
            return Err(CopyError::ClientTruncated);
        }
        self.client_eof = true;
        Ok(())
    }

    /// The daemon closed. Fine between frames only.
    pub fn daemon_eof(&mut self) -> Result<(), CopyError> {
        if !self.d2c.at_boundary() {
            return Err(CopyError::DaemonTruncated);
        }
        self.daemon_eof = true;
        // Answers still waiting for a boundary go out before the close.
        self.release_answers()
    }

    /// Whether the daemon should be half-closed now: the client is gone and all it sent is
    /// delivered.
    pub fn should_shut_daemon(&self) -> bool {
        self.client_eof && !self.daemon_shut && self.to_daemon.pending() == 0
    }

    /// Between frames both ways with nothing buffered: closing loses nothing.
    pub fn at_rest(&self) -> bool {
        self.c2d.at_boundary()
            && self.d2c.at_boundary()
            && self.to_daemon.pending() == 0
            && self.to_client.pending() == 0
            && self.owed.is_empty()
    }

    /// Whether the client has closed its sending side.
    pub fn client_closed(&self) -> bool {
        self.client_eof
    }

    /// Whether the daemon has closed and everything it sent reached the client.
    pub fn finished(&self) -> bool {
        self.daemon_eof && self.to_client.pending() == 0
    }

    /// Moves what can be moved now between the client and daemon sockets. `on_captured` answers
    /// a captured client frame (the reply joins the stream toward the client). `scratch` is a
    /// read buffer lent by the worker (no idle connection holds one).
    #[allow(clippy::too_many_arguments)]
    pub fn drive(
        &mut self,
        client: BorrowedFd<'_>,
        daemon: BorrowedFd<'_>,
        scratch: &mut [u8],
        inspect: &mut dyn FnMut(&Header) -> Verdict,
        on_captured: &mut dyn FnMut(&[u8]) -> Vec<u8>,
        client_readable: &mut bool,
        daemon_readable: &mut bool,
    ) -> Result<CopyDrive, CopyError> {
        self.drive_observed(
            client,
            daemon,
            scratch,
            inspect,
            on_captured,
            &mut |_| {},
            client_readable,
            daemon_readable,
        )
    }

    /// [`CopyRelay::drive`], with `observe_daemon` seeing each daemon frame header (metrics).
    #[allow(clippy::too_many_arguments)]
    pub fn drive_observed(
        &mut self,
        client: BorrowedFd<'_>,
        daemon: BorrowedFd<'_>,
        scratch: &mut [u8],
        inspect: &mut dyn FnMut(&Header) -> Verdict,
        on_captured: &mut dyn FnMut(&[u8]) -> Vec<u8>,
        observe_daemon: &mut dyn FnMut(&Header),
        client_readable: &mut bool,
        daemon_readable: &mut bool,
    ) -> Result<CopyDrive, CopyError> {
        let mut budget = DRIVE_BUDGET;
        let n = scratch.len().min(READ_CHUNK);
        let chunk = &mut scratch[..n];
        // The daemon stopped reading (it is closing): what it already sent still goes to the
        // client in this pass, as the splice relay does; then the connection ends.
        let mut daemon_write_failed = None;
        let done = |r: CopyDrive, failed: Option<io::Error>| match failed {
            Some(e) => Err(CopyError::DaemonWrite(e)),
            None => Ok(r),
        };
        loop {
            let mut progress = false;
            // Writes first: they make room for reads.
            while daemon_write_failed.is_none() && !self.pending_to_daemon().is_empty() {
                match sys::send(daemon, self.pending_to_daemon()) {
                    Ok(n) => {
                        self.wrote_to_daemon(n);
                        progress = true;
                    }
                    Err(e) if sys::would_block(&e) => break,
                    Err(e) => daemon_write_failed = Some(e),
                }
            }
            if self.should_shut_daemon() {
                // The daemon answers EOF by closing, which ends the other direction.
                sys::shutdown_write(daemon);
                self.daemon_shut = true;
            }
            while !self.pending_to_client().is_empty() {
                match sys::send(client, self.pending_to_client()) {
                    Ok(n) => {
                        self.wrote_to_client(n);
                        progress = true;
                    }
                    Err(e) if sys::would_block(&e) => break,
                    Err(e) => return Err(CopyError::ClientWrite(e)),
                }
            }
            if !self.owed.all_answered() {
                // The client took some of what it is owed: answer more of its frames.
                self.answer_captured(on_captured)?;
            }
            if self.finished() {
                return done(CopyDrive::Finished, daemon_write_failed);
            }
            if budget == 0 {
                return done(CopyDrive::Yield, daemon_write_failed);
            }
            if daemon_write_failed.is_none() && *client_readable && self.may_read_client() {
                match sys::recv_with_fd(client, chunk) {
                    Err(e) if sys::would_block(&e) => *client_readable = false,
                    Err(e) => return Err(CopyError::ClientRead(e)),
                    Ok(r) if r.n == 0 => {
                        self.client_eof()?;
                        progress = true;
                    }
                    Ok(r) => {
                        // A TCP socket carries no fds; nothing to drop.
                        self.client_wire(&chunk[..r.n], inspect)?;
                        self.answer_captured(on_captured)?;
                        budget = budget.saturating_sub(r.n);
                        progress = true;
                    }
                }
            }
            if *daemon_readable && self.may_read_daemon() {
                match sys::recv_with_fd(daemon, chunk) {
                    Err(e) if sys::would_block(&e) => *daemon_readable = false,
                    Err(e) => return Err(CopyError::DaemonRead(e)),
                    Ok(r) if r.n == 0 => {
                        self.daemon_eof()?;
                        progress = true;
                    }
                    Ok(r) => {
                        // An fd the daemon passed (dropped here, i.e. closed) comes with a
                        // frame that announces it; the tracker refuses that frame.
                        self.daemon_plain_observed(&chunk[..r.n], observe_daemon)?;
                        budget = budget.saturating_sub(r.n);
                        progress = true;
                    }
                }
            }
            if !progress {
                return done(CopyDrive::Blocked, daemon_write_failed);
            }
        }
    }
}

#[cfg(test)]
mod tests;
