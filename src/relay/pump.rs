//! One direction of a relayed connection: bytes from `src` to `dst`, frame-aware.
//!
//! Small frames go through a pooled userspace buffer with one read and one write for as many
//! frames as arrive together. A body at or above the splice threshold moves
//! `src → pipe → dst` with non-blocking splice issued only after readiness, so an idle
//! connection never holds a pipe, a buffer or a kernel worker (design.md traps 1, 2, 10).
//! fd carriers are re-sent one by one with their fd (trap 3).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::sys::{self, Pipe};
use super::tracker::{TrackError, Tracker, Verdict};
use crate::proto::Header;

/// Per-worker reusable resources: no pump owns a buffer or pipe while it is idle.
#[derive(Debug)]
pub struct Pools {
    bufs: Vec<Box<[u8]>>,
    pipes: Vec<Pipe>,
    pub buf_size: usize,
    pub pipe_size: usize,
    /// Bodies at least this large are spliced.
    pub splice_threshold: usize,
}

const MAX_SPARE_BUFS: usize = 32;
const MAX_SPARE_PIPES: usize = 8;

impl Pools {
    pub fn new(buf_size: usize, pipe_size: usize, splice_threshold: usize) -> Self {
        Self {
            bufs: Vec::new(),
            pipes: Vec::new(),
            buf_size,
            pipe_size,
            splice_threshold,
        }
    }
    fn take_buf(&mut self) -> Box<[u8]> {
        self.bufs
            .pop()
            .unwrap_or_else(|| vec![0u8; self.buf_size].into_boxed_slice())
    }
    fn put_buf(&mut self, b: Box<[u8]>) {
        if self.bufs.len() < MAX_SPARE_BUFS {
            self.bufs.push(b);
        }
    }
    fn take_pipe(&mut self) -> io::Result<Pipe> {
        match self.pipes.pop() {
            Some(p) => Ok(p),
            None => Pipe::new(self.pipe_size),
        }
    }
    fn put_pipe(&mut self, p: Pipe) {
        if self.pipes.len() < MAX_SPARE_PIPES {
            self.pipes.push(p);
        }
    }
}

/// Why a direction stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("read failed: {0}")]
    Read(io::Error),
    #[error("write failed: {0}")]
    Write(io::Error),

    #[error("peer closed in the middle of a frame")]
    Truncated,
    #[error("fd carrier byte arrived without exactly one fd")]
    CarrierWithoutFd,
    #[error(transparent)]
    Protocol(#[from] TrackError),
}

/// What a `drive` call ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// Waiting for readiness (an EAGAIN was seen on the side that matters).
    Blocked,
    /// Used its budget with work left: drive again soon, after other connections.
    Yield,
    /// The source closed between frames and everything was delivered.
    Finished,
}

#[derive(Debug)]
struct Splicing {
    pipe: Pipe,
    in_pipe: usize,
    to_read: usize,
}

/// One direction's state.
#[derive(Debug)]
pub struct Pump {
    tracker: Tracker,
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// fds received with carrier bytes, keyed by the byte's position in `buf`.
    fds: VecDeque<(usize, OwnedFd)>,
    splicing: Option<Splicing>,
    finished: bool,
    /// Bytes delivered to the destination so far.
    pub moved: u64,
}

/// Bytes one `drive` may move before yielding to other connections.
const DRIVE_BUDGET: usize = 1 << 20;

impl Pump {
    pub fn new(toward_daemon: bool, pools: &Pools) -> Self {
        Self {
            tracker: Tracker::new(toward_daemon, pools.splice_threshold),
            buf: None,
            start: 0,
            end: 0,
            fds: VecDeque::new(),
            splicing: None,
            finished: false,
            moved: 0,
        }
    }

    /// Seeds the pump with bytes already read during the handshake.
    pub fn preload(
        &mut self,
        bytes: &[u8],
        pools: &mut Pools,
        inspect: &mut dyn FnMut(&Header) -> Verdict,
    ) -> Result<(), PumpError> {
        if bytes.is_empty() {
            return Ok(());
        }
        // Bytes read before hand-over went through a plain read: any fds are already gone,
        // so a carrier here cannot be honoured.
        if self.tracker.consume(bytes, |h| inspect(h))?.is_some() {
            return Err(PumpError::CarrierWithoutFd);
        }
        let mut buf = self.buf.take().unwrap_or_else(|| pools.take_buf());
        if buf.len() < bytes.len() {
            buf = vec![0u8; bytes.len()].into_boxed_slice();
        }
        buf[..bytes.len()].copy_from_slice(bytes);
        self.buf = Some(buf);
        self.start = 0;
        self.end = bytes.len();
        Ok(())
    }

    /// At a frame boundary with nothing buffered or in a pipe.
    pub fn at_rest(&self) -> bool {
        self.finished
            || (self.tracker.at_boundary()
                && self.start == self.end
                && self.splicing.is_none()
                && self.fds.is_empty())
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Moves what can be moved now. Returns on EAGAIN, on budget exhaustion or at EOF.
    pub fn drive(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        pools: &mut Pools,
        inspect: &mut dyn FnMut(&Header) -> Verdict,
    ) -> Result<Drive, PumpError> {
        if self.finished {
            return Ok(Drive::Finished);
        }
        let mut budget = DRIVE_BUDGET;
        let mut no_pipe = false;
        loop {
            if !self.flush(dst)? {
                return Ok(Drive::Blocked);
            }
            if self.splicing.is_some() {
                match self.splice_body(src, dst, pools, &mut budget)? {
                    Some(d) => return Ok(d),
                    None => continue,
                }
            }
            if budget == 0 {
                return Ok(Drive::Yield);
            }
            if let Some(left) = self.tracker.spliceable_body().filter(|_| !no_pipe) {
                self.release_buf(pools);
                match pools.take_pipe() {
                    Ok(pipe) => {
                        self.splicing = Some(Splicing {
                            pipe,
                            in_pipe: 0,
                            to_read: left,
                        });
                        continue;
                    }
                    // Out of fds or pipe quota: copy this body instead of failing the client.
                    Err(e) => {
                        tracing::debug!("no pipe for splice ({e}); copying");
                        no_pipe = true;
                    }
                }
            }
            let mut buf = self.buf.take().unwrap_or_else(|| pools.take_buf());
            let limit = self.tracker.read_limit(buf.len());
            let res = sys::recv_with_fd(src, &mut buf[..limit]);
            self.buf = Some(buf);
            match res {
                Err(e) if sys::would_block(&e) => {
                    self.release_buf(pools);
                    return Ok(Drive::Blocked);
                }
                Err(e) => return Err(PumpError::Read(e)),
                Ok((0, _)) => {
                    self.release_buf(pools);
                    if self.tracker.at_boundary() {
                        self.finished = true;
                        return Ok(Drive::Finished);
                    }
                    return Err(PumpError::Truncated);
                }
                Ok((n, fd)) => {
                    let buf = self.buf.as_deref().unwrap_or_default();
                    let carrier = self.tracker.consume(&buf[..n], |h| inspect(h))?;
                    match (carrier, fd) {
                        (None, None) => {}
                        // Not on a carrier byte: libvirt would silently close it; so do we.
                        (None, Some(_stray)) => {}
                        (Some(at), Some(fd)) if at == n - 1 => self.fds.push_back((at, fd)),
                        (Some(_), _) => return Err(PumpError::CarrierWithoutFd),
                    }
                    self.start = 0;
                    self.end = n;
                    budget = budget.saturating_sub(n);
                }
            }
        }
    }

    /// Writes buffered bytes (and their fds). Ok(true) when nothing is left.
    fn flush(&mut self, dst: BorrowedFd<'_>) -> Result<bool, PumpError> {
        let Some(buf) = self.buf.as_deref() else {
            return Ok(true);
        };
        while self.start < self.end {
            let next_fd = self.fds.front().map(|(at, _)| *at);
            let res = match next_fd {
                Some(at) if at == self.start => {
                    let fd = self.fds.front().map(|(_, fd)| fd.as_fd());
                    match fd {
                        Some(fd) => sys::send_with_fd(dst, buf[self.start], fd),
                        None => Ok(0),
                    }
                }
                _ => sys::send(dst, &buf[self.start..next_fd.unwrap_or(self.end)]),
            };
            match res {
                Ok(n) => {
                    if next_fd == Some(self.start) && n == 1 {
                        // The fd is now in flight in the peer's queue; our copy can go.
                        self.fds.pop_front();
                    }
                    self.start += n;
                    self.moved += n as u64;
                }
                Err(e) if sys::would_block(&e) => return Ok(false),
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        self.start = 0;
        self.end = 0;
        Ok(true)
    }

    /// Drives an in-progress body splice. `None` means the body is done and the pipe returned.
    fn splice_body(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        pools: &mut Pools,
        budget: &mut usize,
    ) -> Result<Option<Drive>, PumpError> {
        let Some(sp) = self.splicing.as_mut() else {
            return Ok(None);
        };
        loop {
            if sp.in_pipe > 0 {
                match sys::splice(sp.pipe.read.as_fd(), dst, sp.in_pipe) {
                    Ok(n) => {
                        sp.in_pipe -= n;
                        self.moved += n as u64;
                        *budget = budget.saturating_sub(n);
                    }
                    Err(e) if sys::would_block(&e) => return Ok(Some(Drive::Blocked)),
                    Err(e) => return Err(PumpError::Write(e)),
                }
            }
            if sp.to_read == 0 && sp.in_pipe == 0 {
                if let Some(sp) = self.splicing.take() {
                    pools.put_pipe(sp.pipe);
                }
                return Ok(None);
            }
            if *budget == 0 {
                return Ok(Some(Drive::Yield));
            }
            if sp.to_read > 0 && sp.in_pipe < sp.pipe.capacity {
                let want = sp.to_read.min(sp.pipe.capacity - sp.in_pipe);
                match sys::splice(src, sp.pipe.write.as_fd(), want) {
                    Ok(0) => return Err(PumpError::Truncated),
                    Ok(n) => {
                        sp.to_read -= n;
                        sp.in_pipe += n;
                        self.tracker.skip_body(n);
                    }
                    // Source empty (or pipe slots full): only a real wait when nothing is
                    // left to write out. Then the pipe goes back to the pool, so a peer
                    // stalling mid-body holds none; the tracker remembers the position.
                    Err(e) if sys::would_block(&e) => {
                        if sp.in_pipe == 0 {
                            if let Some(sp) = self.splicing.take() {
                                pools.put_pipe(sp.pipe);
                            }
                            return Ok(Some(Drive::Blocked));
                        }
                    }
                    Err(e) => return Err(PumpError::Read(e)),
                }
            }
        }
    }

    fn release_buf(&mut self, pools: &mut Pools) {
        if self.start == self.end && self.fds.is_empty() {
            if let Some(b) = self.buf.take() {
                pools.put_buf(b);
            }
        }
    }

    /// Returns pooled resources when the connection closes.
    pub fn release(&mut self, pools: &mut Pools) {
        if let Some(b) = self.buf.take() {
            pools.put_buf(b);
        }
        // A pipe with data in it is dropped (closed), never reused.
        if let Some(sp) = self.splicing.take() {
            if sp.in_pipe == 0 {
                pools.put_pipe(sp.pipe);
            }
        }
        self.fds.clear();
    }
}
