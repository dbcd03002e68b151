#![no_main]
//! Arbitrary byte streams, split at arbitrary points, through the relay's frame tracker:
//! it must never panic, and a stream split differently must be judged the same.
use libfuzzer_sys::fuzz_target;
use virtproxyd::relay::tracker::{Direction, Tracker, Verdict};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize;
    let bytes = &data[1..];
    for direction in [Direction::ToDaemon, Direction::ToClient] {
        let mut whole = Tracker::new(direction, 16 * 1024);
        let a = whole.consume(bytes, |_| Verdict::Forward).is_ok();
        let mut parts = Tracker::new(direction, 16 * 1024);
        let mut b = true;
        for chunk in bytes.chunks(split.max(1)) {
            if b {
                b = parts.consume(chunk, |_| Verdict::Forward).is_ok();
            }
        }
        assert_eq!(a, b);
        if a {
            assert_eq!(whole.at_boundary(), parts.at_boundary());
        }
    }
});
