//! A connection's pre-open state and its I/O: plain buffers (pre-open traffic is small and
//! rare; the relay's pumps take over at hand-over), bounded reads, frame-cut writes, and the
//! connect-retry back-off.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use super::Deadlines;
use crate::handshake::Handshake;
use crate::proto::Header;
use crate::relay::layer::{encode_all, SecurityLayer};
use crate::sys::{self, FrameCutter};

/// Pre-open state of one connection (boxed in `State::Pre`).
pub(crate) struct PreOpen {
    pub(crate) hs: Handshake,
    pub(crate) c_rx: Vec<u8>,
    pub(crate) c_tx: Vec<u8>,
    pub(crate) d_rx: Vec<u8>,
    pub(crate) d_tx: Vec<u8>,
    /// Live deadline of each `TimerKind` (an entry in the worker's heap counts only if its
    /// instant is the one recorded here).
    pub(crate) timers: Deadlines,
    /// Waiting to connect downstream again: the daemon's listen backlog was full.
    pub(crate) connecting: Option<Retry>,
    pub(crate) closing: Option<String>,
    /// kTLS clients: where writes must be cut (see `FrameCutter`).
    pub(crate) cutter: Option<FrameCutter>,
    /// The SASL security layer, once authentication negotiated one: `c_rx` then holds decoded
    /// bytes and `c_tx` encoded ones (see `install_layer`).
    pub(crate) layer: Option<Box<dyn SecurityLayer>>,
    /// Its source's pre-open rate (see `flood`), charged for each client frame.
    pub(crate) rate: Option<std::sync::Arc<crate::flood::SourceRate>>,
    /// Client frames handled (none: a restart can carry it as if just accepted).
    pub(crate) client_frames: u32,
}

impl PreOpen {
    /// Puts the client's traffic under a SASL security layer from here on: bytes already in
    /// `c_tx` (the reply completing authentication) leave as they are, everything queued later
    /// is encoded; bytes in `c_rx` (sent after that reply's call) and everything read later
    /// are decoded.
    pub(crate) fn install_layer(
        &mut self,
        mut layer: Box<dyn SecurityLayer>,
    ) -> Result<(), String> {
        if self.layer.is_some() {
            return Err("a second SASL security layer".into());
        }
        if self.cutter.is_some() {
            // libvirt offers no layer on TLS (max SSF 0 there); one here is a bug upstream of us.
            return Err("a SASL security layer on a TLS connection".into());
        }
        let wire = std::mem::take(&mut self.c_rx);
        layer
            .decode(&wire, &mut self.c_rx)
            .map_err(|e| e.to_string())?;
        self.layer = Some(layer);
        Ok(())
    }

    /// Queues a reply for the client, encoded when a security layer is installed.
    pub(crate) fn queue_client(&mut self, plain: &[u8]) -> Result<(), String> {
        match self.layer.as_mut() {
            None => {
                self.c_tx.extend_from_slice(plain);
                Ok(())
            }
            Some(l) => encode_all(&mut **l, plain, &mut self.c_tx).map_err(|e| e.to_string()),
        }
    }

    /// `read_some` into `c_rx`, decoding through the security layer when there is one.
    pub(crate) fn read_client(
        &mut self,
        fd: &OwnedFd,
        frame_max: usize,
        readable: &mut bool,
        trust_short: bool,
    ) -> io::Result<ReadState> {
        let Some(layer) = self.layer.as_mut() else {
            return read_some(fd, &mut self.c_rx, frame_max, readable, trust_short);
        };
        if self.c_rx.len() >= frame_max + READ_CHUNK {
            return Ok(ReadState::Full);
        }
        // At most one frame plus a chunk of wire bytes, whose plain form is no larger.
        let mut wire = Vec::new();
        let state = read_some(fd, &mut wire, frame_max, readable, trust_short)?;
        layer
            .decode(&wire, &mut self.c_rx)
            .map_err(io::Error::other)?;
        Ok(state)
    }
}

/// Largest single pre-open read.
const READ_CHUNK: usize = 16 * 1024;

/// A downstream connect waiting for room in the daemon's listen backlog.
pub(crate) struct Retry {
    pub(crate) path: std::path::PathBuf,
    pub(crate) attempts: u32,
}

/// First wait before connecting again after EAGAIN; doubled per attempt up to the cap. A
/// blocking libvirt client would sleep in connect() until the daemon accepts; we poll instead
/// (AF_UNIX offers no readiness for "backlog has room"), cheaply: a failed connect is a few µs.
const RETRY_FIRST: Duration = Duration::from_millis(1);
const RETRY_CAP: Duration = Duration::from_millis(50);

pub(crate) fn retry_delay(attempts: u32, conn_id: u64) -> Duration {
    let d = RETRY_FIRST
        .saturating_mul(1u32 << attempts.min(16))
        .min(RETRY_CAP);
    // Spread the clients that hit the same full backlog over the interval, so their retries do
    // not arrive together again.
    d + d * (conn_id % 8) as u32 / 8
}

/// Where a pre-open service ended.
pub(crate) enum Pre {
    Relay,
    Keep,
    Yield,
}

/// Writes as much of `buf` as the socket takes now; with a cutter, each write ends at a frame
/// end (the destination is a kTLS socket).
pub(crate) fn flush(
    fd: &OwnedFd,
    buf: &mut Vec<u8>,
    mut cutter: Option<&mut FrameCutter>,
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let stop = match &cutter {
            Some(c) => done + c.limit(&buf[done..]),
            None => buf.len(),
        };
        match sys::send(fd.as_fd(), &buf[done..stop]) {
            Ok(n) => {
                if let Some(c) = cutter.as_deref_mut() {
                    c.advance(&buf[done..done + n]);
                }
                done += n;
            }
            Err(e) if sys::would_block(&e) => break,
            Err(e) => return Err(e),
        }
    }
    buf.drain(..done);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadState {
    Data,
    Eof,
    /// EAGAIN: readiness will be reported again.
    Blocked,
    /// The pre-open buffer limit is reached; the caller must consume before reading more.
    Full,
}

/// Reads what is available into `buf`, never past a frame of `frame_max` plus one chunk. fds
/// sent before open are dropped, i.e. closed. `readable` is the connection's flag for this
/// socket: no syscall while it is down; it goes down at EAGAIN, and at a short read when
/// `trust_short` (a plain socket's short read means its queue is empty; not so for kTLS,
/// where a queued control record also ends a read early).
pub(crate) fn read_some(
    fd: &OwnedFd,
    buf: &mut Vec<u8>,
    frame_max: usize,
    readable: &mut bool,
    trust_short: bool,
) -> io::Result<ReadState> {
    if !*readable {
        return Ok(ReadState::Blocked);
    }
    let mut chunk = [0u8; READ_CHUNK];
    let limit = frame_max + chunk.len();
    let mut got = false;
    loop {
        let room = limit.saturating_sub(buf.len()).min(chunk.len());
        if room == 0 {
            return Ok(if got {
                ReadState::Data
            } else {
                ReadState::Full
            });
        }
        match sys::recv_with_fd(fd.as_fd(), &mut chunk[..room]) {
            Ok(r) if r.tls_record.is_some() => {
                // Before open only close_notify is acceptable from a kTLS client.
                if r.tls_record
                    .is_some_and(|t| crate::sys::tls_record::is_close_notify(t, &chunk[..r.n]))
                {
                    return Ok(if got { ReadState::Data } else { ReadState::Eof });
                }
                return Err(io::Error::other(format!(
                    "TLS record of type {:?} before open",
                    r.tls_record
                )));
            }
            Ok(r) if r.n == 0 => return Ok(if got { ReadState::Data } else { ReadState::Eof }),
            Ok(r) => {
                buf.extend_from_slice(&chunk[..r.n]);
                got = true;
                if trust_short && r.n < room {
                    *readable = false;
                    return Ok(ReadState::Data);
                }
            }
            Err(e) if sys::would_block(&e) => {
                *readable = false;
                return Ok(if got {
                    ReadState::Data
                } else {
                    ReadState::Blocked
                });
            }
            Err(e) => return Err(e),
        }
    }
}

/// The header of the complete frame at the start of `buf`, if one is there.
pub(crate) fn frame_at(buf: &[u8], frame_max: usize) -> Result<Option<Header>, String> {
    match Header::check(buf) {
        Err(crate::proto::FrameError::Incomplete) => Ok(None),
        Err(e) => Err(e.to_string()),
        Ok(h) if h.len as usize > frame_max => {
            Err(format!("frame of {} bytes before CONNECT_OPEN", h.len))
        }
        Ok(h) if buf.len() < h.len as usize => Ok(None),
        Ok(h) => Ok(Some(h)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::listen::ListenerKind;
    use crate::relay::layer::testing::XorLayer;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn preopen() -> PreOpen {
        PreOpen {
            hs: Handshake::new(ListenerKind::Tcp, Identity::default()),
            c_rx: Vec::new(),
            c_tx: Vec::new(),
            d_rx: Vec::new(),
            d_tx: Vec::new(),
            timers: Deadlines::default(),
            connecting: None,
            closing: None,
            cutter: None,
            layer: None,
            rate: None,
            client_frames: 0,
        }
    }

    fn wire(plain: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        encode_all(&mut XorLayer::new(7, max), plain, &mut out).unwrap();
        out
    }

    /// The reply completing authentication leaves plain; what is queued after the layer is
    /// installed leaves encoded (in pieces the layer accepts), and what the client sent after
    /// its call (already read) and sends later is decoded.
    #[test]
    fn layer_applies_to_bytes_after_the_completing_reply() {
        let mut p = preopen();
        p.queue_client(b"completing reply").unwrap();
        // Pipelined behind the completing call, already read, under the client's layer.
        p.c_rx = wire(b"open call", 4)[..9].to_vec();
        let rest = wire(b"open call", 4)[9..].to_vec();
        p.install_layer(Box::new(XorLayer::new(7, 4))).unwrap();
        assert_eq!(p.c_rx, b"open"); // one whole piece so far, the rest pending in the layer
        p.queue_client(b"open reply").unwrap();
        assert_eq!(
            p.c_tx,
            [&b"completing reply"[..], &wire(b"open reply", 4)].concat()
        );

        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.write_all(&rest).unwrap();
        let a: OwnedFd = a.into();
        assert_eq!(
            p.read_client(&a, 1024, &mut true, false).unwrap(),
            ReadState::Data
        );
        assert_eq!(p.c_rx, b"open call");
        assert_eq!(
            p.read_client(&a, 1024, &mut true, false).unwrap(),
            ReadState::Blocked
        );

        // Flushing sends the bytes as queued.
        flush(&a, &mut p.c_tx, None).unwrap();
        let mut got = vec![0u8; 64];
        let n = b.read(&mut got).unwrap();
        assert_eq!(
            &got[..n],
            &[&b"completing reply"[..], &wire(b"open reply", 4)].concat()[..]
        );

        // Undecodable input is a read error; a second layer or one over kTLS is refused.
        b.write_all(&[0xff; 8]).unwrap();
        assert!(p.read_client(&a, 1024, &mut true, false).is_err());
        assert!(p.install_layer(Box::new(XorLayer::new(7, 4))).is_err());
        let mut k = preopen();
        k.cutter = Some(FrameCutter::default());
        assert!(k.install_layer(Box::new(XorLayer::new(7, 4))).is_err());
    }
}
