use super::*;
use crate::relay::layer::testing::XorLayer;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

const KEY: u8 = 0xa5;
const SET_IDENTITY: u32 = 419;

fn frame(proc_: u32, mtype: u32, serial: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(28 + body.len());
    for v in [
        (28 + body.len()) as u32,
        0x2000_8086,
        1,
        proc_,
        mtype,
        serial,
        0,
    ] {
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(body);
    f
}

fn encoded(plain: &[u8], max: usize) -> Vec<u8> {
    let mut l = XorLayer::new(KEY, max);
    let mut out = Vec::new();
    encode_all(&mut l, plain, &mut out).unwrap();
    out
}

fn decoded(wire: &[u8], max: usize) -> Vec<u8> {
    let mut l = XorLayer::new(KEY, max);
    let mut out = Vec::new();
    l.decode(wire, &mut out).unwrap();
    out
}

fn capture_identity(h: &Header) -> Verdict {
    if h.proc_ == SET_IDENTITY as i32 {
        Verdict::Capture
    } else {
        Verdict::Forward
    }
}

/// Splits a plain stream into whole frames.
fn frames_of(mut s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while s.len() >= 4 {
        let len = u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize;
        assert!(len >= 28 && len <= s.len(), "broken framing");
        out.push(s[..len].to_vec());
        s = &s[len..];
    }
    assert!(s.is_empty(), "trailing partial frame");
    out
}

/// Client frames arrive encoded and split anywhere (every chunk size from one byte to all of
/// it): the daemon gets them decoded, with the CONNECT_SET_IDENTITY calls taken out whole.
#[test]
fn decoded_client_frames_reach_the_daemon_with_identity_calls_captured() {
    let a = frame(4, 0, 1, &[1; 40]);
    let b = frame(SET_IDENTITY, 0, 2, &[2; 64]);
    let c = frame(5, 0, 3, &[3; 8]);
    let d = frame(SET_IDENTITY, 0, 4, &[]);
    let plain = [a.clone(), b.clone(), c.clone(), d.clone(), a.clone()].concat();
    let want = [a.clone(), c.clone(), a.clone()].concat();
    // Pieces of 7 plain bytes: layer boundaries fall inside headers and bodies.
    let wire = encoded(&plain, 7);
    for chunk in 1..=wire.len() {
        let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, 7)));
        let mut got = Vec::new();
        let mut captured = Vec::new();
        for piece in wire.chunks(chunk) {
            r.client_wire(piece, &mut capture_identity).unwrap();
            r.answer_captured(&mut |f| {
                captured.extend_from_slice(f);
                Vec::new()
            })
            .unwrap();
            // A partial header is never released: it might belong to a captured frame.
            let out = r.pending_to_daemon().to_vec();
            assert!(!out.windows(8).any(|w| w == &b[..8]), "chunk {chunk}");
            r.wrote_to_daemon(out.len());
            got.extend(out);
        }
        assert_eq!(got, want, "chunk {chunk}");
        assert_eq!(captured, [b.clone(), d.clone()].concat(), "chunk {chunk}");
        assert!(r.at_rest(), "chunk {chunk}");
    }
}

/// Daemon frames fed in any split leave encoded in pieces of at most `max_plain` (the test
/// layer refuses larger ones), and the proxy's own answer joins at the next frame boundary,
/// never inside a frame.
#[test]
fn daemon_frames_are_encoded_and_answers_join_at_a_frame_boundary() {
    let x = frame(7, 1, 1, &[7; 100]);
    let y = frame(209, 3, 2, &[8; 300]);
    let z = frame(8, 1, 3, &[]);
    let answer = frame(SET_IDENTITY, 1, 99, &[0; 4]);
    let daemon = [x.clone(), y.clone(), z.clone()].concat();
    for max in [1, 5, 64, 4096] {
        for chunk in 1..=daemon.len() {
            let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, max)));
            let mut wire = Vec::new();
            let mut fed = 0;
            let mut answered_at = None;
            for piece in daemon.chunks(chunk) {
                r.daemon_plain(piece).unwrap();
                fed += piece.len();
                // The answer is produced once the daemon is past the start of y.
                if answered_at.is_none() && fed > x.len() + 10 {
                    let call = frame(SET_IDENTITY, 0, 99, &[]);
                    r.client_plain(&call, &mut capture_identity).unwrap();
                    r.answer_captured(&mut |_| answer.clone()).unwrap();
                    answered_at = Some(fed);
                }
                let out = r.pending_to_client().to_vec();
                r.wrote_to_client(out.len());
                wire.extend(out);
            }
            let got = frames_of(&decoded(&wire, max));
            // Inside y or at its end: right after y; inside z or after it: after z.
            let want = if answered_at.is_some_and(|a| a <= x.len() + y.len()) {
                vec![x.clone(), y.clone(), answer.clone(), z.clone()]
            } else {
                vec![x.clone(), y.clone(), z.clone(), answer.clone()]
            };
            assert_eq!(got, want, "max {max} chunk {chunk}");
            assert!(r.at_rest(), "max {max} chunk {chunk}");
        }
    }
}

#[test]
fn refusals_and_truncation_end_the_relay() {
    let open = frame(1, 0, 5, &[0; 12]);
    let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, 64)));
    let e = r
        .client_wire(&encoded(&open, 64), &mut |h| {
            if h.proc_ == 1 {
                Verdict::Refuse("second open".into())
            } else {
                Verdict::Forward
            }
        })
        .unwrap_err();
    assert!(
        matches!(e, CopyError::Protocol(TrackError::Refused(_))),
        "{e}"
    );
    assert!(r.pending_to_daemon().is_empty());

    // A frame with fds cannot go to or come from a TCP client.
    let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, 64)));
    let fds = frame(300, 4, 1, &[0, 0, 0, 1]);
    assert!(matches!(
        r.client_plain(&[fds.clone(), vec![0]].concat(), &mut |_| Verdict::Forward),
        Err(CopyError::Fds)
    ));

    let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, 64)));
    r.client_plain(&open[..30], &mut |_| Verdict::Forward)
        .unwrap();
    assert!(matches!(r.client_eof(), Err(CopyError::ClientTruncated)));
    r.daemon_plain(&open[..3]).unwrap();
    assert!(matches!(r.daemon_eof(), Err(CopyError::DaemonTruncated)));

    // Garbage on the wire is the layer's error, reported as such.
    let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, 64)));
    assert!(matches!(
        r.client_wire(&[0xff; 8], &mut |_| Verdict::Forward),
        Err(CopyError::Layer(_))
    ));
}

/// Neither side is read while the buffer toward the other is full, and reading resumes once
/// it drains: buffers stay bounded by the cap plus one read.
#[test]
fn a_full_buffer_stops_reading_that_side_until_it_drains() {
    let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, 65536)));
    let big = frame(209, 3, 1, &vec![9; 8 << 20]);
    let wire = encoded(&big, 65536);
    let mut fed = 0;
    while r.may_read_client() {
        let n = READ_CHUNK.min(wire.len() - fed);
        r.client_wire(&wire[fed..fed + n], &mut |_| Verdict::Forward)
            .unwrap();
        fed += n;
    }
    assert!(fed < wire.len());
    assert!(r.pending_to_daemon().len() < OUT_CAP + READ_CHUNK);
    let n = r.pending_to_daemon().len();
    r.wrote_to_daemon(n);
    assert!(r.may_read_client());

    let mut fed = 0;
    while r.may_read_daemon() {
        let n = READ_CHUNK.min(big.len() - fed);
        r.daemon_plain(&big[fed..fed + n]).unwrap();
        fed += n;
    }
    assert!(fed < big.len());
    // One read's worth of encoding overhead (4 bytes per piece) at most beyond the cap.
    assert!(r.pending_to_client().len() < OUT_CAP + READ_CHUNK + 4 * READ_CHUNK / 65536 + 4);
    let n = r.pending_to_client().len();
    r.wrote_to_client(n);
    assert!(r.may_read_daemon());
}

fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

fn pattern(frames: usize, body: usize, seed: u32, proc_: u32) -> Vec<u8> {
    let mut s = Vec::new();
    for i in 0..frames {
        let b: Vec<u8> = (0..body)
            .map(|k| (k as u32).wrapping_mul(31).wrapping_add(seed + i as u32) as u8)
            .collect();
        s.extend(frame(proc_, 3, i as u32, &b));
    }
    s
}

/// 16 MiB each way at once over real sockets, with slow readers on both ends (so both
/// buffers hit the cap) and readiness as the worker sees it: edge-triggered epoll, a side's
/// readable flag set only by a new edge. The client also sends a CONNECT_SET_IDENTITY in the
/// middle; its answer must arrive whole between two daemon frames.
#[test]
fn sixteen_mib_both_ways_with_edge_triggered_readiness_and_slow_peers() {
    let max = 65536;
    let body = 256 * 1024 - 28;
    let frames = 64; // 64 × 256 KiB = 16 MiB
    let up_plain = {
        let mut s = pattern(frames / 2, body, 1, 209);
        s.extend(frame(SET_IDENTITY, 0, 7777, &[1, 2, 3, 4]));
        s.extend(pattern(frames / 2, body, 2, 209));
        s
    };
    let up_want: Vec<u8> = {
        let mut s = pattern(frames / 2, body, 1, 209);
        s.extend(pattern(frames / 2, body, 2, 209));
        s
    };
    let down_plain = pattern(frames, body, 3, 210);
    let answer = frame(SET_IDENTITY, 1, 7777, &[0; 4]);

    let (client_peer, client_proxy) = tcp_pair();
    let (daemon_proxy, daemon_peer) = std::os::unix::net::UnixStream::pair().unwrap();
    client_proxy.set_nonblocking(true).unwrap();
    daemon_proxy.set_nonblocking(true).unwrap();

    // The client: encodes and sends, and separately reads and decodes, slowly.
    let wire_up = encoded(&up_plain, max);
    let mut cw = client_peer.try_clone().unwrap();
    let client_writer = std::thread::spawn(move || {
        for piece in wire_up.chunks(4096) {
            cw.write_all(piece).unwrap();
        }
        cw.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut cr = client_peer;
    cr.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let client_reader = std::thread::spawn(move || {
        let mut l = XorLayer::new(KEY, max);
        let mut plain = Vec::new();
        let mut buf = vec![0u8; 8192];
        let mut n_reads = 0u32;
        loop {
            match cr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => l.decode(&buf[..n], &mut plain).unwrap(),
            }
            n_reads += 1;
            if n_reads % 4 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        plain
    });
    // The daemon: sends its stream, reads slowly, and closes once the client's EOF reached it
    // and its own stream is out, as libvirt's daemons close on EOF.
    let mut dw = daemon_peer.try_clone().unwrap();
    let down = down_plain.clone();
    let daemon_writer = std::thread::spawn(move || {
        for piece in down.chunks(16384) {
            dw.write_all(piece).unwrap();
        }
    });
    let mut dr = daemon_peer;
    dr.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let daemon_reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 8192];
        let mut n_reads = 0u32;
        loop {
            match dr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            n_reads += 1;
            if n_reads % 4 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        daemon_writer.join().unwrap();
        got
    });

    // SAFETY: plain epoll calls on fds this test owns.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    for (fd, tok) in [
        (client_proxy.as_raw_fd(), 0u64),
        (daemon_proxy.as_raw_fd(), 1),
    ] {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32,
            u64: tok,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
            0
        );
    }
    let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, max)));
    let (mut c_readable, mut d_readable) = (false, false);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut captured = 0;
    let mut peak = (0, 0);
    let mut peak_len = 0;
    let mut last_progress = Instant::now();
    let mut last = (0, 0);
    let mut outcome = CopyDrive::Blocked;
    while last_progress.elapsed() < Duration::from_secs(10) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: as above.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, 10) };
        for ev in &evs[..n.max(0) as usize] {
            if ev.events & libc::EPOLLIN as u32 != 0 {
                if ev.u64 == 0 {
                    c_readable = true;
                } else {
                    d_readable = true;
                }
            }
        }
        outcome = r
            .drive(
                client_proxy.as_fd(),
                daemon_proxy.as_fd(),
                &mut scratch,
                &mut capture_identity,
                &mut |f| {
                    assert_eq!(&f[20..24], &7777u32.to_be_bytes());
                    captured += 1;
                    answer.clone()
                },
                &mut c_readable,
                &mut d_readable,
            )
            .unwrap();
        peak.0 = peak.0.max(r.to_daemon.pending());
        peak.1 = peak.1.max(r.to_client.pending());
        peak_len = peak_len
            .max(r.to_daemon.buf.len())
            .max(r.to_client.buf.len());
        let now = (r.to_daemon_bytes, r.to_client_bytes);
        if now != last {
            last = now;
            last_progress = Instant::now();
        }
        if outcome == CopyDrive::Finished {
            break;
        }
    }
    assert_eq!(
        outcome,
        CopyDrive::Finished,
        "relay stalled: {} of {} bytes to the daemon, {} of {} to the client",
        r.to_daemon_bytes,
        up_want.len(),
        r.to_client_bytes,
        down_plain.len()
    );
    client_writer.join().unwrap();
    let got_up = daemon_reader.join().unwrap();
    drop(client_proxy);
    let got_down = client_reader.join().unwrap();
    // SAFETY: closing our own epoll fd.
    unsafe { libc::close(ep) };

    assert_eq!(captured, 1);
    assert_eq!(got_up.len(), up_want.len());
    assert!(got_up == up_want, "client→daemon bytes differ");
    let down_frames = frames_of(&got_down);
    assert_eq!(down_frames.iter().filter(|f| **f == answer).count(), 1);
    let rest: Vec<u8> = down_frames
        .into_iter()
        .filter(|f| *f != answer)
        .flatten()
        .collect();
    assert!(rest == down_plain, "daemon→client bytes differ");
    // Bounded buffers: the cap plus one read (and its encoding overhead) pending; with the
    // written prefix not compacted yet, at most twice that allocated.
    assert!(
        peak_len <= 2 * (OUT_CAP + READ_CHUNK + 64),
        "a buffer grew to {peak_len}"
    );
    assert!(
        peak.0 <= OUT_CAP + READ_CHUNK,
        "to_daemon peaked at {}",
        peak.0
    );
    assert!(
        peak.1 <= OUT_CAP + READ_CHUNK + 64,
        "to_client peaked at {}",
        peak.1
    );
}

/// A daemon that stops reading (it is closing) after its last reply: that reply still
/// reaches the client, then the relay ends with the write error.
#[test]
fn the_daemons_last_reply_reaches_the_client_when_writing_to_it_fails() {
    let (client_peer, client_proxy) = std::os::unix::net::UnixStream::pair().unwrap();
    let (daemon_proxy, mut daemon_peer) = std::os::unix::net::UnixStream::pair().unwrap();
    client_proxy.set_nonblocking(true).unwrap();
    daemon_proxy.set_nonblocking(true).unwrap();
    client_peer.set_nonblocking(true).unwrap();
    let reply = frame(7, 1, 1, &[5; 40]);
    daemon_peer.write_all(&reply).unwrap();
    drop(daemon_peer);
    (&client_peer)
        .write_all(&encoded(&frame(8, 0, 2, &[6; 40]), 64))
        .unwrap();
    let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, 64)));
    let mut scratch = vec![0u8; 4096];
    let res = r.drive(
        client_proxy.as_fd(),
        daemon_proxy.as_fd(),
        &mut scratch,
        &mut |_| Verdict::Forward,
        &mut |_| Vec::new(),
        &mut true,
        &mut true,
    );
    assert!(matches!(res, Err(CopyError::DaemonWrite(_))), "{res:?}");
    let mut wire = vec![0u8; 4096];
    let n = (&client_peer).read(&mut wire).unwrap();
    assert_eq!(decoded(&wire[..n], 64), reply);
}

/// A client that writes header-only CONNECT_SET_IDENTITY calls under the security layer and
/// never reads: the proxy's answers fill what is queued for it up to `OUT_CAP`, then the
/// client is not read any more (so it cannot make the relay hold more), until it reads.
#[test]
fn identity_flood_from_a_client_that_never_reads_is_bounded() {
    let (client_peer, client_proxy) = std::os::unix::net::UnixStream::pair().unwrap();
    let (_daemon_peer, daemon_proxy) = std::os::unix::net::UnixStream::pair().unwrap();
    for s in [&client_peer, &client_proxy, &daemon_proxy] {
        s.set_nonblocking(true).unwrap();
    }
    let plain: Vec<u8> = (0..40_000)
        .flat_map(|i| frame(SET_IDENTITY, 0, i, &[]))
        .collect();
    let wire = encoded(&plain, 4096);
    let mut sent = 0;
    let mut r = CopyRelay::new(Box::new(XorLayer::new(KEY, 4096)));
    let mut scratch = vec![0u8; 64 * 1024];
    let mut answered = 0usize;
    let reply = frame(SET_IDENTITY, 1, 0, &[0; 100]);
    // The attacker writes as much as the socket takes.
    let write_more = |sent: &mut usize| {
        while *sent < wire.len() {
            match (&client_peer).write(&wire[*sent..]) {
                Ok(n) => *sent += n,
                Err(_) => break,
            }
        }
    };
    let mut drive = |r: &mut CopyRelay, answered: &mut usize| {
        let (mut cr, mut dr) = (true, false);
        r.drive(
            client_proxy.as_fd(),
            daemon_proxy.as_fd(),
            &mut scratch,
            &mut capture_identity,
            &mut |_| {
                *answered += 1;
                reply.clone()
            },
            &mut cr,
            &mut dr,
        )
        .unwrap();
    };
    let mut peak = 0;
    for _ in 0..200 {
        write_more(&mut sent);
        drive(&mut r, &mut answered);
        peak = peak.max(r.to_client.pending() + r.owed.answers.len());
    }
    assert!(answered > 1000, "the relay answered only {answered} calls");
    assert!(
        sent < wire.len(),
        "the relay took the whole flood ({sent} bytes)"
    );
    assert!(
        !r.may_read_client(),
        "a client that does not read is still read"
    );
    // OUT_CAP, plus one socket buffer's worth of replies written before the cap was hit.
    assert!(
        peak <= OUT_CAP + 2 * reply.len() + 64 * 1024,
        "{peak} bytes queued for the client"
    );
    // The client reads everything: it is answered in full and read again.
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..10_000 {
        while (&client_peer).read(&mut buf).is_ok_and(|n| n > 0) {}
        write_more(&mut sent);
        drive(&mut r, &mut answered);
        if answered == 40_000 {
            break;
        }
    }
    assert_eq!(
        answered, 40_000,
        "every call is answered once the client reads"
    );
}
