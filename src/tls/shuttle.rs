//! Userspace TLS when the kernel has no kTLS: rustls between the client's TCP socket and one
//! end of a socketpair whose other end goes through the ordinary pre-open and relay. This
//! costs a copy per direction; it is the fallback, kTLS is the fast path.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use rustls::ServerConnection;

use super::accept::FdIo;
use crate::sys::{self, FrameCutter};

/// Plaintext held for the local side before we stop reading the network.
const PLAIN_CAP: usize = 256 * 1024;

/// One TLS connection's userspace record layer.
pub struct Shuttle {
    conn: Box<ServerConnection>,
    pub tcp: OwnedFd,
    pub local: OwnedFd,
    /// Decrypted bytes not yet written to `local`.
    plain: Vec<u8>,
    tcp_eof: bool,
    local_eof: bool,
    local_shut: bool,
    /// Where frames end in the local→TLS stream (see `FrameCutter`).
    cutter: FrameCutter,
    /// Plaintext taken from the local side and handed to rustls.
    pub to_tls: u64,
    /// Encrypted bytes written to the network.
    pub to_net: u64,
}

/// Whether the shuttle is still moving bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Open,
    Closed(String),
}

impl Shuttle {
    pub fn new(conn: Box<ServerConnection>, tcp: OwnedFd, local: OwnedFd) -> Shuttle {
        Shuttle {
            conn,
            tcp,
            local,
            plain: Vec::new(),
            tcp_eof: false,
            local_eof: false,
            local_shut: false,
            cutter: FrameCutter::default(),
            to_tls: 0,
            to_net: 0,
        }
    }

    /// Moves what can be moved in both directions until every source would block.
    pub fn drive(&mut self) -> Flow {
        match self.pump() {
            Ok(f) => f,
            Err(e) => Flow::Closed(e),
        }
    }

    fn pump(&mut self) -> Result<Flow, String> {
        loop {
            let mut progress = false;
            // Encrypted output to the network.
            while self.conn.wants_write() {
                match self.conn.write_tls(&mut FdIo(self.tcp.as_fd())) {
                    Ok(n) => {
                        progress |= n > 0;
                        self.to_net += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("TLS write: {e}")),
                }
            }
            // Plaintext to the local side.
            let mut done = 0;
            while done < self.plain.len() {
                match sys::send(self.local.as_fd(), &self.plain[done..]) {
                    Ok(n) => done += n,
                    Err(e) if sys::would_block(&e) => break,
                    Err(e) => return Err(format!("local write: {e}")),
                }
            }
            progress |= done > 0;
            self.plain.drain(..done);
            if self.tcp_eof && self.plain.is_empty() && !self.local_shut {
                sys::shutdown_write(self.local.as_fd());
                self.local_shut = true;
            }
            // Network → plaintext, while the local side keeps up.
            if !self.tcp_eof && self.plain.len() < PLAIN_CAP {
                match self.conn.read_tls(&mut FdIo(self.tcp.as_fd())) {
                    Ok(0) => {
                        self.tcp_eof = true;
                        progress = true;
                    }
                    Ok(_) => {
                        progress = true;
                        self.conn
                            .process_new_packets()
                            .map_err(|e| format!("TLS: {e}"))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(format!("TLS read: {e}")),
                }
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match self.conn.reader().read(&mut chunk) {
                        Ok(0) => {
                            self.tcp_eof = true; // close_notify
                            break;
                        }
                        Ok(n) => {
                            self.plain.extend_from_slice(&chunk[..n]);
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(format!("TLS: {e}")),
                    }
                }
            }
            // Local → encrypted, while rustls's send buffer has drained.
            if !self.local_eof && !self.conn.wants_write() {
                let mut chunk = [0u8; 16 * 1024];
                match sys::recv_with_fd(self.local.as_fd(), &mut chunk) {
                    Ok(r) if r.n == 0 => {
                        self.local_eof = true;
                        self.conn.send_close_notify();
                        progress = true;
                    }
                    Ok(r) => {
                        // One rustls write per frame piece: no record spans two frames.
                        let mut rest = &chunk[..r.n];
                        while !rest.is_empty() {
                            let k = self.cutter.limit(rest);
                            self.conn
                                .writer()
                                .write_all(&rest[..k])
                                .map_err(|e| e.to_string())?;
                            self.cutter.advance(&rest[..k]);
                            rest = &rest[k..];
                        }
                        self.to_tls += r.n as u64;
                        progress = true;
                    }
                    Err(e) if sys::would_block(&e) => {}
                    Err(e) => return Err(format!("local read: {e}")),
                }
            }
            if self.local_eof && !self.conn.wants_write() {
                return Ok(Flow::Closed("relay closed".into()));
            }
            if self.tcp_eof && self.local_shut && self.local_eof {
                return Ok(Flow::Closed("client closed".into()));
            }
            if !progress {
                tracing::trace!(
                    plain = self.plain.len(),
                    wants_write = self.conn.wants_write(),
                    tcp_eof = self.tcp_eof,
                    local_eof = self.local_eof,
                    "tls shuttle idle"
                );
                return Ok(Flow::Open);
            }
        }
    }

    /// Best-effort close_notify when the connection is torn down from the other side.
    pub fn close_notify(&mut self) {
        tracing::debug!(
            to_tls = self.to_tls,
            to_net = self.to_net,
            "tls shuttle closing"
        );
        self.conn.send_close_notify();
        let _ = self.conn.write_tls(&mut FdIo(self.tcp.as_fd()));
    }
}
