//! Picks the splice threshold: moves STREAM frames of one body size through the relay's `Pump`
//! between two AF_UNIX socket pairs, once with every body copied through userspace and once
//! with every body spliced, and reports throughput and the pump thread's CPU per GiB.
//!
//! `cargo bench --bench splice_threshold` (env VPD_BENCH_MIB sets the volume per run).

#[path = "util.rs"]
mod util;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;
use util::{median, thread_cpu};

use virtproxyd::relay::tracker::Verdict;
use virtproxyd::relay::{Direction, Drive, Pools, Pump};

fn frame(body: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(28 + body);
    for v in [(28 + body) as u32, 0x2000_8086, 1, 209, 3, 6, 2] {
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.resize(28 + body, 0xa5);
    f
}

/// Returns (GB/s, pump CPU seconds per GiB).
fn run(body: usize, threshold: usize, total: usize) -> (f64, f64) {
    let (mut src_w, src_r) = UnixStream::pair().unwrap();
    let (dst_w, mut dst_r) = UnixStream::pair().unwrap();
    src_r.set_nonblocking(true).unwrap();
    dst_w.set_nonblocking(true).unwrap();
    let frames = total / (body + 28);
    let f = frame(body);
    let writer = std::thread::spawn(move || {
        for _ in 0..frames {
            src_w.write_all(&f).unwrap();
        }
    });
    let expect = frames * (body + 28);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < expect {
            got += dst_r.read(&mut buf).unwrap();
        }
    });
    let mut pools = Pools::new(64 * 1024, 1 << 20, threshold);
    let mut pump = Pump::new(Direction::ToClient, &pools);
    let t0 = Instant::now();
    let c0 = thread_cpu();
    while pump.moved < expect as u64 {
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
                        fd: std::os::fd::AsRawFd::as_raw_fd(&src_r),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(&dst_w),
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
    let secs = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu() - c0;
    writer.join().unwrap();
    reader.join().unwrap();
    let gib = expect as f64 / (1u64 << 30) as f64;
    (expect as f64 / secs / 1e9, cpu / gib)
}

fn main() {
    if !util::measuring("splice_threshold") {
        return;
    }
    let mib: usize = util::env_or("VPD_BENCH_MIB", 512);
    let total = mib << 20;
    println!("body size | copy GB/s | splice GB/s | copy CPU s/GiB | splice CPU s/GiB  (median of 5, {mib} MiB each)");
    for body in [
        1024usize,
        4096,
        16 * 1024,
        32 * 1024,
        64 * 1024,
        128 * 1024,
        262_120,
    ] {
        let mut c = (vec![], vec![]);
        let mut s = (vec![], vec![]);
        for _ in 0..5 {
            // Interleaved so both modes see the same machine noise.
            let (g, cpu) = run(body, usize::MAX, total);
            c.0.push(g);
            c.1.push(cpu);
            let (g, cpu) = run(body, 1, total);
            s.0.push(g);
            s.1.push(cpu);
        }
        println!(
            "{body:>9} | {:>9.2} | {:>11.2} | {:>14.3} | {:>16.3}",
            median(c.0),
            median(s.0),
            median(c.1),
            median(s.1)
        );
    }
}
