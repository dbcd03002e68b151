#![no_main]
//! The copy relay of a connection with a SASL security layer, fed arbitrary client wire bytes
//! and daemon bytes in arbitrary pieces with the test codec: it must never panic, and what it
//! sends the client must decode into whole frames once the daemon side ends between frames.
use libfuzzer_sys::fuzz_target;
use virtproxyd::relay::layer::testing::XorLayer;
use virtproxyd::relay::layer::SecurityLayer;
use virtproxyd::relay::tracker::Verdict;
use virtproxyd::relay::CopyRelay;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let max = 1 + (ctl as usize % 64);
    let mut r = CopyRelay::new(Box::new(XorLayer::new(0x42, max)));
    let mut to_client = Vec::new();
    let mut daemon_ok = true;
    // Each piece: a length byte, a direction bit, then that many bytes.
    let mut s = rest;
    while let Some((&head, tail)) = s.split_first() {
        let n = (head as usize >> 1).min(tail.len());
        let (piece, next) = tail.split_at(n);
        s = next;
        if head & 1 == 0 {
            let res = r.client_wire(piece, &mut |h| {
                if h.proc_ == 419 {
                    Verdict::Capture
                } else {
                    Verdict::Forward
                }
            });
            if res.is_err() {
                return;
            }
            // The answer: the captured call's header as a body-less frame.
            let res = r.answer_captured(&mut |f| {
                let mut answer = f[..28].to_vec();
                answer[..4].copy_from_slice(&28u32.to_be_bytes());
                answer
            });
            if res.is_err() {
                return;
            }
            let k = r.pending_to_daemon().len();
            r.wrote_to_daemon(k);
        } else if daemon_ok {
            daemon_ok = r.daemon_plain(piece).is_ok();
        }
        to_client.extend_from_slice(r.pending_to_client());
        let k = r.pending_to_client().len();
        r.wrote_to_client(k);
    }
    if daemon_ok && r.daemon_eof().is_ok() {
        to_client.extend_from_slice(r.pending_to_client());
        let mut plain = Vec::new();
        XorLayer::new(0x42, max)
            .decode(&to_client, &mut plain)
            .expect("our own encoding decodes");
        let mut at = 0;
        while at + 4 <= plain.len() {
            let len = u32::from_be_bytes([plain[at], plain[at + 1], plain[at + 2], plain[at + 3]]);
            at += len as usize;
        }
        assert_eq!(at, plain.len(), "client stream ends between frames");
    }
});
