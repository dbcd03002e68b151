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

use super::tracker::{Direction, TrackError, Tracker, Verdict};
use crate::proto::Header;
use crate::sys::tls_record;
use crate::sys::{self, FrameCutter, Pipe};

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
    pub fn take_buf(&mut self) -> Box<[u8]> {
        self.bufs
            .pop()
            .unwrap_or_else(|| vec![0u8; self.buf_size].into_boxed_slice())
    }
    pub fn put_buf(&mut self, b: Box<[u8]>) {
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
    /// A kTLS socket delivered a record that is not data or close_notify (an alert, or a
    /// KeyUpdate the kernel cannot follow).
    #[error("TLS record of type {0} cannot be relayed")]
    TlsRecord(u8),
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
    /// The last `hold` bytes before `end` are a header not yet complete: they wait until its
    /// verdict is known (a captured frame must not leave in part).
    hold: usize,
    /// fds received with carrier bytes, keyed by the byte's position in `buf`.
    fds: VecDeque<(usize, OwnedFd)>,
    splicing: Option<Splicing>,
    /// The source refused a splice (a kTLS non-data record is next): copy once.
    splice_refused: bool,
    /// Set when the destination is a kTLS socket: writes end at frame ends.
    cutter: Option<FrameCutter>,
    /// Whether a short read proves the source empty (see `drive`).
    trust_short_reads: bool,
    finished: bool,
    /// A restart is handing the connection over: finish the frame under way, read nothing
    /// past its end (see `quiesce`).
    quiescing: bool,
    /// Bytes delivered to the destination so far.
    pub moved: u64,
    /// fds delivered to the destination so far (metrics read the growth).
    pub fds_passed: u64,
}

/// Bytes one `drive` may move before yielding to other connections.
const DRIVE_BUDGET: usize = 1 << 20;

impl Pump {
    pub fn new(direction: Direction, pools: &Pools) -> Self {
        Self {
            tracker: Tracker::new(direction, pools.splice_threshold),
            buf: None,
            start: 0,
            end: 0,
            hold: 0,
            fds: VecDeque::new(),
            splicing: None,
            splice_refused: false,
            cutter: None,
            trust_short_reads: true,
            finished: false,
            quiescing: false,
            moved: 0,
            fds_passed: 0,
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
        self.apply_cuts(0);
        self.hold = self.tracker.partial_header_len();
        Ok(())
    }

    /// Makes every write end at a frame end or inside one frame, for a destination where each
    /// write becomes a TLS record (see `FrameCutter`).
    pub fn cut_writes_at_frames(&mut self) {
        self.cutter = Some(FrameCutter::default());
    }

    /// For a kTLS source: a short read may leave a control record queued.
    pub fn distrust_short_reads(&mut self) {
        self.trust_short_reads = false;
    }

    /// From now on reads stop at the end of the frame under way, so the direction comes to
    /// rest at a frame boundary with nothing buffered (what follows stays in the source's
    /// kernel queue, which travels with the socket to the next process).
    pub fn quiesce(&mut self) {
        self.quiescing = true;
    }

    /// The source closed between frames and everything was delivered.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Marks the direction finished (a carried connection whose source had closed).
    pub fn set_finished(&mut self) {
        self.finished = true;
    }

    /// At a frame boundary with nothing buffered or in a pipe.
    pub fn at_rest(&self) -> bool {
        self.finished
            || (self.tracker.at_boundary()
                && self.start == self.end
                && self.splicing.is_none()
                && self.fds.is_empty())
    }

    /// Holds bytes for the destination that it did not take yet (a write hit EAGAIN): only
    /// then is the destination's writability worth a wake-up. A held-back partial header
    /// waits for the source, not the destination.
    pub fn wants_writable(&self) -> bool {
        !self.finished
            && (self.start + self.hold < self.end
                || self.splicing.as_ref().is_some_and(|s| s.in_pipe > 0))
    }

    /// Moves what can be moved now. Returns on EAGAIN, on budget exhaustion or at EOF.
    pub fn drive(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        pools: &mut Pools,
        inspect: &mut dyn FnMut(&Header) -> Verdict,
        src_readable: &mut bool,
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
                match self.splice_body(src, dst, pools, &mut budget, src_readable)? {
                    Some(d) => return Ok(d),
                    None => continue,
                }
            }
            if budget == 0 {
                return Ok(Drive::Yield);
            }
            if let Some(left) = self
                .tracker
                .spliceable_body()
                .filter(|_| !no_pipe && !self.splice_refused)
            {
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
            if !*src_readable || (self.quiescing && self.tracker.at_boundary()) {
                // Nothing was reported since the last read came up empty: no syscall. Or
                // quiescing between frames: the rest stays in the source's queue.
                self.release_buf(pools);
                return Ok(Drive::Blocked);
            }
            let mut buf = self.buf.take().unwrap_or_else(|| pools.take_buf());
            // After a held-back partial header (at the buffer's start, see `flush`).
            let at = self.end;
            let mut limit = self.tracker.read_limit(buf.len() - at);
            if self.quiescing {
                limit = self.tracker.frame_piece(limit);
            }
            let res = sys::recv_with_fd(src, &mut buf[at..at + limit]);
            self.buf = Some(buf);
            match res {
                Err(e) if sys::would_block(&e) => {
                    *src_readable = false;
                    self.release_buf(pools);
                    return Ok(Drive::Blocked);
                }
                Err(e) => return Err(PumpError::Read(e)),
                Ok(r) if r.n == 0 || r.tls_record.is_some() => {
                    if let Some(t) = r.tls_record {
                        let buf = self.buf.as_deref().unwrap_or_default();
                        // close_notify is EOF; any other record cannot be relayed.
                        if !tls_record::is_close_notify(t, &buf[..r.n]) {
                            self.release_buf(pools);
                            return Err(PumpError::TlsRecord(t));
                        }
                    }
                    self.release_buf(pools);
                    if self.tracker.at_boundary() {
                        self.finished = true;
                        return Ok(Drive::Finished);
                    }
                    return Err(PumpError::Truncated);
                }
                Ok(crate::sys::Received { n, fd, .. }) => {
                    let got_fd = fd.is_some();
                    let buf = self.buf.as_deref().unwrap_or_default();
                    let carrier = self.tracker.consume(&buf[at..at + n], |h| inspect(h))?;
                    match (carrier, fd) {
                        (None, None) => {}
                        // Not on a carrier byte: libvirt would silently close it; so do we.
                        (None, Some(_stray)) => {}
                        (Some(c), Some(fd)) if c == n - 1 => self.fds.push_back((at + c, fd)),
                        (Some(_), _) => return Err(PumpError::CarrierWithoutFd),
                    }
                    // A short read from an AF_UNIX or TCP socket means its queue was empty
                    // (the kernel only stops early at an fd-bearing segment, which we would
                    // have received): the next read would be an EAGAIN, so skip it. Not for
                    // kTLS, where a queued control record also ends a read early.
                    if self.trust_short_reads && !got_fd && n < limit {
                        *src_readable = false;
                    }
                    self.end = at + n;
                    self.apply_cuts(at);
                    self.hold = self.tracker.partial_header_len();
                    self.splice_refused = false;
                    budget = budget.saturating_sub(n);
                    if self.tracker.has_captured() {
                        // The owner answers captured frames and decides whether this source
                        // may be read again (`relay::owed`): a read's worth of them at most.
                        return Ok(Drive::Yield);
                    }
                }
            }
        }
    }

    /// Writes buffered bytes (and their fds). Ok(true) when nothing is left.
    fn flush(&mut self, dst: BorrowedFd<'_>) -> Result<bool, PumpError> {
        let Some(buf) = self.buf.as_deref() else {
            return Ok(true);
        };
        let flushable = self.end - self.hold;
        while self.start < flushable {
            let next_fd = self.fds.front().map(|(at, _)| *at);
            let res = match next_fd {
                Some(at) if at == self.start => {
                    let fd = self.fds.front().map(|(_, fd)| fd.as_fd());
                    match fd {
                        Some(fd) => sys::send_with_fd(dst, buf[self.start], fd),
                        None => Ok(0),
                    }
                }
                _ => {
                    let mut stop = next_fd.unwrap_or(flushable);
                    if let Some(c) = &self.cutter {
                        stop = self.start + c.limit(&buf[self.start..stop]);
                    }
                    sys::send(dst, &buf[self.start..stop])
                }
            };
            match res {
                Ok(n) => {
                    if next_fd == Some(self.start) && n == 1 {
                        // The fd is now in flight in the peer's queue; our copy can go.
                        self.fds.pop_front();
                        self.fds_passed += 1;
                    }
                    if let Some(c) = &mut self.cutter {
                        c.advance(&buf[self.start..self.start + n]);
                    }
                    self.start += n;
                    self.moved += n as u64;
                }
                Err(e) if sys::would_block(&e) => {
                    tracing::trace!(pending = self.end - self.start, "copy: destination full");
                    return Ok(false);
                }
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        // A held-back header moves to the front; the next read appends to it.
        if self.hold > 0 {
            if let Some(buf) = self.buf.as_deref_mut() {
                buf.copy_within(self.start..self.end, 0);
            }
        }
        self.start = 0;
        self.end = self.hold;
        Ok(true)
    }

    /// Takes the bytes of captured frames out of what was just read (`buf[at..end]`, plus a
    /// held-back header before it), so they are never forwarded.
    fn apply_cuts(&mut self, at: usize) {
        let cuts = self.tracker.take_cuts();
        let Some(buf) = self.buf.as_deref_mut() else {
            return;
        };
        for &(rel_start, rel_end) in cuts.iter().rev() {
            let start = (at as isize + rel_start).max(self.start as isize) as usize;
            let end = at + rel_end;
            buf.copy_within(end..self.end, start);
            let len = end - start;
            self.end -= len;
            for (pos, _) in self.fds.iter_mut() {
                if *pos >= end {
                    *pos -= len;
                }
            }
        }
    }

    /// Frames taken out of the stream for the owner to answer (`Verdict::Capture`), one after
    /// the other.
    pub fn take_captured(&mut self) -> Vec<u8> {
        self.tracker.take_captured()
    }

    /// Drives an in-progress body splice. `None` means the body is done and the pipe returned.
    fn splice_body(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        pools: &mut Pools,
        budget: &mut usize,
        src_readable: &mut bool,
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
                        if let Some(c) = &mut self.cutter {
                            c.advance_body(n);
                        }
                        *budget = budget.saturating_sub(n);
                    }
                    Err(e) if sys::would_block(&e) => {
                        tracing::trace!(
                            in_pipe = sp.in_pipe,
                            to_read = sp.to_read,
                            "splice: destination full"
                        );
                        return Ok(Some(Drive::Blocked));
                    }
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
            if sp.to_read > 0 && sp.in_pipe < sp.pipe.capacity && !*src_readable {
                if sp.in_pipe == 0 {
                    // Nothing reported on the source since it came up empty.
                    if let Some(sp) = self.splicing.take() {
                        pools.put_pipe(sp.pipe);
                    }
                    return Ok(Some(Drive::Blocked));
                }
                continue; // write out what the pipe holds first
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
                    // With bytes in the pipe, EAGAIN may only mean "pipe slots full": the
                    // pipe counts one slot per socket buffer, so small segments fill it long
                    // before `capacity` bytes. Write the pipe out and ask the source again;
                    // only an EAGAIN into an empty pipe proves the source drained. (Marking
                    // it drained here stalled the body: edge-triggered readiness never
                    // reports bytes that were already queued.) Then the pipe goes back to
                    // the pool, so a peer stalling mid-body holds none.
                    Err(e) if sys::would_block(&e) => {
                        if sp.in_pipe == 0 {
                            *src_readable = false;
                            tracing::trace!(to_read = sp.to_read, "splice: source empty");
                            if let Some(sp) = self.splicing.take() {
                                pools.put_pipe(sp.pipe);
                            }
                            return Ok(Some(Drive::Blocked));
                        }
                    }
                    // kTLS refuses to splice a record that is not data (an alert, a KeyUpdate):
                    // read that one with recvmsg, which reports its type.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) && sp.in_pipe == 0 => {
                        if let Some(sp) = self.splicing.take() {
                            pools.put_pipe(sp.pipe);
                        }
                        self.splice_refused = true;
                        return Ok(None);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn stream_frame(body: usize) -> Vec<u8> {
        let mut f = Vec::new();
        for v in [(28 + body) as u32, 0x2000_8086, 1, 209, 3, 6, 2] {
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.resize(28 + body, 0x5a);
        f
    }

    /// Moves `frames` stream frames through a pump whose reader takes `chunk` bytes at a time;
    /// returns the bytes the reader got before `deadline` passed.
    fn relay_with_reader_chunks(frames: usize, chunk: usize) -> (usize, usize) {
        let (mut src_w, src_r) = UnixStream::pair().unwrap();
        let (dst_w, mut dst_r) = UnixStream::pair().unwrap();
        src_r.set_nonblocking(true).unwrap();
        dst_w.set_nonblocking(true).unwrap();
        let f = stream_frame(262_120);
        let total = f.len() * frames;
        let writer = std::thread::spawn(move || {
            for _ in 0..frames {
                src_w.write_all(&f).unwrap();
            }
        });
        dst_r
            .set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; chunk];
            let mut got = 0;
            while got < total {
                match dst_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        });
        let mut pools = Pools::new(64 * 1024, 1 << 20, 16 * 1024);
        let mut pump = Pump::new(Direction::ToClient, &pools);
        let start = std::time::Instant::now();
        while (pump.moved as usize) < total && start.elapsed() < std::time::Duration::from_secs(3) {
            match pump
                .drive(
                    src_r.as_fd(),
                    dst_w.as_fd(),
                    &mut pools,
                    &mut |_| Verdict::Forward,
                    &mut true,
                )
                .unwrap()
            {
                Drive::Blocked => {
                    let mut fds = [
                        libc::pollfd {
                            fd: src_r.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: dst_w.as_raw_fd(),
                            events: libc::POLLOUT,
                            revents: 0,
                        },
                    ];
                    // SAFETY: valid pollfd array.
                    unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                }
                Drive::Yield => {}
                Drive::Finished => break,
            }
        }
        writer.join().unwrap();
        (reader.join().unwrap(), total)
    }

    fn call_frame(proc_: i32, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        for v in [
            (28 + body.len()) as u32,
            0x2000_8086,
            1,
            proc_ as u32,
            0,
            5,
            0,
        ] {
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(body);
        f
    }

    /// A captured frame leaves the stream whole, however the reads split it, and the frames
    /// around it pass unchanged.
    /// Writability matters only while bytes wait for the destination: a delivered call and a
    /// held-back partial header (which waits for the source) do not ask for it.
    #[test]
    fn wants_writable_only_while_a_write_is_blocked() {
        let (mut src_w, src_r) = UnixStream::pair().unwrap();
        let (dst_w, mut dst_r) = UnixStream::pair().unwrap();
        src_r.set_nonblocking(true).unwrap();
        dst_w.set_nonblocking(true).unwrap();
        let mut pools = Pools::new(64 * 1024, 1 << 20, 16 * 1024);
        let mut pump = Pump::new(Direction::ToDaemon, &pools);
        let drive = |pump: &mut Pump, pools: &mut Pools| {
            pump.drive(
                src_r.as_fd(),
                dst_w.as_fd(),
                pools,
                &mut |_| Verdict::Forward,
                &mut true,
            )
            .unwrap()
        };
        let call = call_frame(4, &[7; 100]);
        src_w.write_all(&call).unwrap();
        src_w.write_all(&call[..10]).unwrap(); // the next call's header, in part
        assert_eq!(drive(&mut pump, &mut pools), Drive::Blocked);
        assert!(
            !pump.wants_writable(),
            "delivered; only a partial header held"
        );
        let mut got = vec![0u8; call.len()];
        dst_r.read_exact(&mut got).unwrap();
        assert_eq!(got, call);
        // Fill the destination until a write blocks: then (and only then) it wants writability.
        src_w.write_all(&call[10..]).unwrap();
        for _ in 0..100_000 {
            src_w.write_all(&call).unwrap();
            drive(&mut pump, &mut pools);
            if pump.wants_writable() {
                break;
            }
        }
        assert!(
            pump.wants_writable(),
            "a full destination must ask for writability"
        );
    }

    /// A restart's quiesce (`Pump::quiesce`), begun at any byte offset of a stream of small
    /// and spliced frames — a header split, mid-body, mid-splice — delivers exactly up to the
    /// end of the frame under way, leaves the pump at rest with nothing buffered, and leaves
    /// every later byte in the source's queue (where the next process reads it).
    #[test]
    fn quiescing_stops_exactly_at_the_end_of_the_frame_under_way() {
        let frames = [
            call_frame(4, &[1; 100]),
            stream_frame(64 * 1024),
            call_frame(5, &[]),
            call_frame(6, &[3; 40]),
            stream_frame(20_000),
        ];
        let stream = frames.concat();
        let ends: Vec<usize> = frames
            .iter()
            .scan(0, |at, f| {
                *at += f.len();
                Some(*at)
            })
            .collect();
        let offsets: Vec<usize> = (0..200)
            .chain((200..stream.len()).step_by(997))
            .chain(ends.iter().flat_map(|&e| [e - 1, e, e + 1]))
            .filter(|&k| k < stream.len())
            .collect();
        for k in offsets {
            let (mut src_w, src_r) = UnixStream::pair().unwrap();
            let (dst_w, mut dst_r) = UnixStream::pair().unwrap();
            src_r.set_nonblocking(true).unwrap();
            dst_w.set_nonblocking(true).unwrap();
            dst_r.set_nonblocking(true).unwrap();
            let mut pools = Pools::new(64 * 1024, 1 << 20, 16 * 1024);
            let mut pump = Pump::new(Direction::ToDaemon, &pools);
            let mut got = Vec::new();
            let mut run = |pump: &mut Pump, pools: &mut Pools, got: &mut Vec<u8>| {
                for _ in 0..10_000 {
                    let d = pump
                        .drive(
                            src_r.as_fd(),
                            dst_w.as_fd(),
                            pools,
                            &mut |_| Verdict::Forward,
                            &mut true,
                        )
                        .unwrap();
                    let mut buf = vec![0u8; 1 << 20];
                    let drained = match dst_r.read(&mut buf) {
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            n
                        }
                        Err(_) => 0,
                    };
                    if d == Drive::Blocked && drained == 0 && !pump.wants_writable() {
                        return;
                    }
                }
                panic!("the pump never settled");
            };
            src_w.write_all(&stream[..k]).unwrap();
            run(&mut pump, &mut pools, &mut got);
            pump.quiesce();
            // Everything else arrives while quiescing: only the frame under way may pass.
            let feeder = {
                let rest = stream[k..].to_vec();
                let mut w = src_w.try_clone().unwrap();
                std::thread::spawn(move || w.write_all(&rest).unwrap())
            };
            let end = ends.iter().copied().find(|&e| e >= k).unwrap_or(0);
            let end = if ends.contains(&k) || k == 0 { k } else { end };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while got.len() < end && std::time::Instant::now() < deadline {
                run(&mut pump, &mut pools, &mut got);
            }
            feeder.join().unwrap();
            run(&mut pump, &mut pools, &mut got);
            assert_eq!(
                got.len(),
                end,
                "quiesce at byte {k}: delivered up to {}",
                got.len()
            );
            assert_eq!(got[..], stream[..end], "quiesce at byte {k}: bytes differ");
            assert!(pump.at_rest(), "quiesce at byte {k}: not at rest");
            let mut left = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            while let Ok(n) = (&src_r).read(&mut buf) {
                if n == 0 {
                    break;
                }
                left.extend_from_slice(&buf[..n]);
            }
            assert_eq!(
                left[..],
                stream[end..],
                "quiesce at byte {k}: the source lost bytes"
            );
            pump.release(&mut pools);
        }
    }

    #[test]
    fn captured_frames_are_taken_out_of_the_stream_whole() {
        let a = call_frame(4, &[1; 40]);
        let b = call_frame(419, &[2; 64]);
        let c = call_frame(5, &[3; 8]);
        let d = call_frame(419, &[]);
        let stream = [a.clone(), b.clone(), c.clone(), d.clone(), a.clone()].concat();
        let want = [a.clone(), c.clone(), a.clone()].concat();
        for chunk in [1, 3, 5, 27, 28, 29, 100, stream.len()] {
            let (mut src_w, src_r) = UnixStream::pair().unwrap();
            let (dst_w, mut dst_r) = UnixStream::pair().unwrap();
            src_r.set_nonblocking(true).unwrap();
            dst_w.set_nonblocking(true).unwrap();
            dst_r.set_nonblocking(true).unwrap();
            let mut pools = Pools::new(64 * 1024, 1 << 20, 16 * 1024);
            let mut pump = Pump::new(Direction::ToDaemon, &pools);
            let mut got = Vec::new();
            let mut captured = Vec::new();
            let mut buf = vec![0u8; 4096];
            for piece in stream.chunks(chunk) {
                src_w.write_all(piece).unwrap();
                let mut readable = true;
                // A read that captured a frame yields to the owner, who drives again.
                while pump
                    .drive(
                        src_r.as_fd(),
                        dst_w.as_fd(),
                        &mut pools,
                        &mut |h| {
                            if h.proc_ == 419 {
                                Verdict::Capture
                            } else {
                                Verdict::Forward
                            }
                        },
                        &mut readable,
                    )
                    .unwrap()
                    == Drive::Yield
                {
                    captured.extend(pump.take_captured());
                }
                captured.extend(pump.take_captured());
                while let Ok(n) = dst_r.read(&mut buf) {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            assert_eq!(got, want, "chunk {chunk}");
            assert_eq!(captured, [b.clone(), d.clone()].concat(), "chunk {chunk}");
            assert!(pump.at_rest());
        }
    }

    /// Deterministic form of the stall: a one-slot pipe holding the rest of a short write
    /// into the destination is "full" although it holds far less than `capacity` bytes. The
    /// source got all its bytes before the first drive, so (edge-triggered, as the worker
    /// sees it) no event will ever report them again: taking that EAGAIN for a drained source
    /// strands them.
    #[test]
    fn one_slot_pipe_full_is_not_a_drained_source() {
        let (mut src_w, src_r) = UnixStream::pair().unwrap();
        // A TCP destination with small buffers: splices into it come up short.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst_w = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (dst_r, _) = l.accept().unwrap();
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&dst_w, sockopt::SndBuf, &4096).unwrap();
        setsockopt(&dst_r, sockopt::RcvBuf, &4096).unwrap();
        src_r.set_nonblocking(true).unwrap();
        dst_w.set_nonblocking(true).unwrap();
        dst_r.set_nonblocking(true).unwrap();
        let frame = stream_frame(16 * 4000);
        // Header alone first: the body is then spliced, one 4000-byte segment per splice.
        src_w.write_all(&frame[..28]).unwrap();
        let mut pools = Pools::new(64 * 1024, 4096, 1024);
        let mut pump = Pump::new(Direction::ToClient, &pools);
        let mut readable = true;
        pump.drive(
            src_r.as_fd(),
            dst_w.as_fd(),
            &mut pools,
            &mut |_| Verdict::Forward,
            &mut readable,
        )
        .unwrap();
        for piece in frame[28..].chunks(4000) {
            src_w.write_all(piece).unwrap();
        }
        readable = true; // the one edge for all of it
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut dst_r = dst_r;
        let mut last_progress = std::time::Instant::now();
        while got.len() < frame.len() && last_progress.elapsed() < std::time::Duration::from_secs(3)
        {
            let before = (pump.moved, got.len());
            pump.drive(
                src_r.as_fd(),
                dst_w.as_fd(),
                &mut pools,
                &mut |_| Verdict::Forward,
                &mut readable,
            )
            .unwrap();
            while let Ok(n) = dst_r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            if (pump.moved, got.len()) != before {
                last_progress = std::time::Instant::now();
            } else {
                // Wait for the destination to drain (TCP window updates), not the source.
                let mut fds = [libc::pollfd {
                    fd: dst_w.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                // SAFETY: valid pollfd array.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, 10) };
            }
        }
        assert_eq!(
            got.len(),
            frame.len(),
            "relay stalled with bytes in the source: got {} of {}, moved {}, readable {readable}",
            got.len(),
            frame.len(),
            pump.moved
        );
        assert_eq!(got, frame);
    }

    /// A pipe counts one slot per socket buffer, so TCP segments fill its slots long before
    /// `capacity` bytes; an EAGAIN then must not count as a drained source. Readiness is
    /// emulated edge-triggered, as the worker sees it: the readable flag is set only when the
    /// writer has written more since the last look. A 4 MiB stream frame in 4 KiB writes over
    /// loopback TCP to a slow reader, as go-libvirt sends them.
    #[test]
    fn full_pipe_slots_do_not_count_as_a_drained_source() {
        use std::net::{TcpListener, TcpStream};
        use std::time::{Duration, Instant};
        fn tcp_pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (b, _) = l.accept().unwrap();
            (a, b)
        }
        let (mut src_w, src_r) = tcp_pair();
        let (dst_w, mut dst_r) = tcp_pair();
        src_r.set_nonblocking(true).unwrap();
        dst_w.set_nonblocking(true).unwrap();
        let frame = stream_frame(4 << 20);
        let total = frame.len();
        let writer = std::thread::spawn(move || {
            for piece in frame.chunks(4096) {
                src_w.write_all(piece).unwrap();
            }
            src_w
        });
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            let mut got = 0;
            dst_r
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            // A slow consumer: the destination fills, so splices into it come up short and
            // bytes stay in the pipe while the source is asked for more.
            let mut next_pause = 0;
            while got < total {
                match dst_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
                if got >= next_pause {
                    next_pause = got + 32 * 1024;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            got
        });
        // Edge-triggered readiness of the source, as the worker's reactor reports it.
        // SAFETY: plain epoll calls on fds this test owns.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, src_r.as_raw_fd(), &mut ev) },
            0
        );
        let mut pools = Pools::new(64 * 1024, 64 * 1024, 16 * 1024);
        let mut pump = Pump::new(Direction::ToClient, &pools);
        let mut readable = false;
        let mut last_progress = Instant::now();
        let mut last_moved = 0;
        while (pump.moved as usize) < total && last_progress.elapsed() < Duration::from_secs(5) {
            let mut out = [libc::epoll_event { events: 0, u64: 0 }];
            // SAFETY: as above.
            if unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 1, 1) } == 1 {
                readable = true;
            }
            pump.drive(
                src_r.as_fd(),
                dst_w.as_fd(),
                &mut pools,
                &mut |_| Verdict::Forward,
                &mut readable,
            )
            .unwrap();
            if pump.moved != last_moved {
                last_moved = pump.moved;
                last_progress = Instant::now();
            }
        }
        // SAFETY: closing our own epoll fd.
        unsafe { libc::close(ep) };
        let _src_w = writer.join().unwrap();
        assert_eq!(
            pump.moved as usize, total,
            "relay stalled with bytes in the source"
        );
        assert_eq!(reader.join().unwrap(), total);
    }

    #[test]
    fn splice_into_a_socket_read_in_small_chunks_completes() {
        for chunk in [16 * 1024, 256 * 1024] {
            let (got, total) = relay_with_reader_chunks(16, chunk);
            assert_eq!(
                got, total,
                "reader with {chunk}-byte reads got {got} of {total}"
            );
        }
    }
}
