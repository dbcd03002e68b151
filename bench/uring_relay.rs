//! Readiness or completions for the relay's small messages? The same one-thread relay between
//! ping-pong clients and an echo "daemon" over AF_UNIX socket pairs, three ways:
//!
//! - `epoll`: edge-triggered epoll, then recv and send syscalls (the proxy's epoll backend);
//! - `uring-poll`: io_uring multishot POLL_ADD for readiness, then recv and send syscalls
//!   (the proxy's io_uring backend);
//! - `uring-ops`: the bytes move through the ring: multishot RECV into provided buffers; each
//!   message's SEND linked to its buffer's return, neither posting a completion on success,
//!   all queued and submitted with the next wait: one `io_uring_enter` per loop turn.
//!
//! Reports the relay thread's CPU and voluntary context switches per relayed message, and the
//! round-trip rate, at 1 and 8 clients; repetitions interleaved, medians.
//! `cargo bench --bench uring_relay` (VPD_BENCH_SECS per run, default 1.5; VPD_BENCH_REPS,
//! default 5).

#[path = "util.rs"]
mod util;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use util::{median, thread_cpu};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// A libvirt call header's size: the relay's typical small message.
const MSG: usize = 28;

fn voluntary_switches() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn recv(fd: RawFd, buf: &mut [u8]) -> isize {
    // SAFETY: buf is valid for buf.len() bytes.
    unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) }
}

fn send_all(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: data is valid for data.len() bytes.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            data = &data[n as usize..];
        } else {
            thread::yield_now(); // a full socket: the peer drains it soon
        }
    }
}

/// The relay's sockets: `ends[2i]` faces client i, `ends[2i+1]` its daemon side.
struct Ends {
    ends: Vec<UnixStream>,
}

impl Ends {
    fn fd(&self, i: usize) -> RawFd {
        self.ends[i].as_raw_fd()
    }
    fn peer(&self, i: usize) -> RawFd {
        self.fd(i ^ 1)
    }
    /// Reads what `i` holds and writes it to its peer, until a short read.
    fn forward(&self, i: usize, buf: &mut [u8]) {
        loop {
            let n = recv(self.fd(i), buf);
            if n <= 0 {
                return;
            }
            send_all(self.peer(i), &buf[..n as usize]);
            if (n as usize) < buf.len() {
                return;
            }
        }
    }
}

/// Edge-triggered epoll over every socket of `ends`, calling `ready(i)` for each readable
/// one, until `stop`.
fn epoll_loop(ends: &Ends, stop: &AtomicBool, mut ready: impl FnMut(usize)) {
    // SAFETY: plain syscalls on fds we own for the duration.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    for i in 0..ends.ends.len() {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        // SAFETY: ev is valid.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, ends.fd(i), &mut ev) };
    }
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: evs has room for 64 events.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 64, 50) };
        for ev in evs.iter().take(n.max(0) as usize) {
            ready(ev.u64 as usize);
        }
    }
    // SAFETY: closing our epoll fd.
    unsafe { libc::close(ep) };
}

fn relay_epoll(ends: &Ends, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    epoll_loop(ends, stop, |i| ends.forward(i, &mut buf));
}

fn wait(ring: &mut IoUring) {
    let ts = types::Timespec::new().nsec(50_000_000);
    let args = types::SubmitArgs::new().timespec(&ts);
    let _ = ring.submitter().submit_with_args(1, &args);
}

fn relay_uring_poll(ends: &Ends, stop: &AtomicBool) {
    let mut ring = IoUring::builder().setup_coop_taskrun().build(256).unwrap();
    for i in 0..ends.ends.len() {
        let e = opcode::PollAdd::new(types::Fd(ends.fd(i)), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(i as u64);
        // SAFETY: a poll references no user memory.
        unsafe { ring.submission().push(&e).unwrap() };
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut ready = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        wait(&mut ring);
        ready.clear();
        ready.extend(ring.completion().map(|c| c.user_data() as usize));
        for &i in &ready {
            ends.forward(i, &mut buf);
        }
    }
}

const BUF_LEN: usize = 4096;
const NBUFS: u16 = 256;
const GROUP: u16 = 1;
const RECV: u64 = 1 << 62;
const SEND: u64 = 1 << 61;
const PROVIDE: u64 = 1 << 60;

/// Each message: its SEND linked to the return of its buffer, both without a completion on
/// success, so the only completions are receives and one enter per turn both submits the
/// turn's sends and waits for the next receive.
fn relay_uring_ops(ends: &Ends, stop: &AtomicBool) {
    let mut ring = IoUring::builder().setup_coop_taskrun().build(1024).unwrap();
    let mut pool = vec![0u8; BUF_LEN * NBUFS as usize];
    let base = pool.as_mut_ptr();
    let provide = |bid: u16, n: u16| {
        // SAFETY: the region lies in `pool`, which outlives the ring's use of it.
        opcode::ProvideBuffers::new(
            unsafe { base.add(bid as usize * BUF_LEN) },
            BUF_LEN as i32,
            n,
            GROUP,
            bid,
        )
        .build()
        .user_data(PROVIDE | bid as u64)
    };
    let recv_multi = |i: usize| {
        opcode::RecvMulti::new(types::Fd(ends.fd(i)), GROUP)
            .build()
            .user_data(RECV | i as u64)
    };
    // SAFETY (pushes below): every entry references `pool`, alive until the ring is dropped.
    unsafe { ring.submission().push(&provide(0, NBUFS)).unwrap() };
    ring.submit_and_wait(1).unwrap();
    ring.completion().for_each(drop);
    for i in 0..ends.ends.len() {
        unsafe { ring.submission().push(&recv_multi(i)).unwrap() };
    }
    let mut queue = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        wait(&mut ring);
        queue.clear();
        for c in ring.completion() {
            let (tag, flags, res) = (c.user_data(), c.flags(), c.result());
            if tag & RECV != 0 {
                let i = (tag & !RECV) as usize;
                if let Some(bid) = cqueue::buffer_select(flags) {
                    if res > 0 {
                        // SAFETY: the kernel filled `res` bytes of buffer `bid`; it stays
                        // ours until the linked provide after the send returns it.
                        let ptr = unsafe { base.add(bid as usize * BUF_LEN) };
                        queue.push(
                            opcode::Send::new(types::Fd(ends.peer(i)), ptr, res as u32)
                                .flags(libc::MSG_NOSIGNAL)
                                .build()
                                .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
                                .user_data(SEND | bid as u64),
                        );
                        queue.push(provide(bid, 1).flags(squeue::Flags::SKIP_SUCCESS));
                    } else {
                        queue.push(provide(bid, 1).flags(squeue::Flags::SKIP_SUCCESS));
                    }
                }
                // res 0 is EOF: the client left, nothing more to receive.
                if !cqueue::more(flags) && res != 0 {
                    queue.push(recv_multi(i));
                }
            } else if tag & PROVIDE != 0 && res < 0 {
                // Its send failed, so the linked return was cancelled: return it now.
                let bid = (tag & !PROVIDE) as u16;
                queue.push(provide(bid, 1).flags(squeue::Flags::SKIP_SUCCESS));
            }
        }
        for e in &queue {
            while unsafe { ring.submission().push(e) }.is_err() {
                ring.submit().unwrap();
            }
        }
    }
    // Cancel what is in flight before `pool` goes.
    unsafe {
        ring.submission()
            .push(&opcode::AsyncCancel2::new(types::CancelBuilder::any()).build())
            .unwrap()
    };
    let _ = ring.submit_and_wait(1);
    drop(ring);
    drop(pool);
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Epoll,
    UringPoll,
    UringOps,
}

struct Sample {
    rate: f64,
    cpu_us_per_msg: f64,
    switches_per_msg: f64,
}

fn run(mode: Mode, clients: usize, secs: f64) -> Sample {
    let mut ends = Vec::new();
    let mut client_ends = Vec::new();
    let mut daemon_ends = Vec::new();
    for _ in 0..clients {
        let (c, rc) = UnixStream::pair().unwrap();
        let (rd, d) = UnixStream::pair().unwrap();
        rc.set_nonblocking(true).unwrap();
        rd.set_nonblocking(true).unwrap();
        d.set_nonblocking(true).unwrap();
        ends.push(rc);
        ends.push(rd);
        client_ends.push(c);
        daemon_ends.push(d);
    }
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_rest = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = stop_rest.clone();
        thread::spawn(move || {
            let ends = Ends { ends: daemon_ends };
            // The echo side answers each message back on its own socket.
            let mut buf = vec![0u8; 64 * 1024];
            epoll_loop(&ends, &stop, |i| loop {
                let n = recv(ends.fd(i), &mut buf);
                if n <= 0 {
                    break;
                }
                send_all(ends.fd(i), &buf[..n as usize]);
            });
        })
    };
    let relay = {
        let stop = stop_rest.clone();
        thread::spawn(move || {
            let ends = Ends { ends };
            let (c0, s0) = (thread_cpu(), voluntary_switches());
            match mode {
                Mode::Epoll => relay_epoll(&ends, &stop),
                Mode::UringPoll => relay_uring_poll(&ends, &stop),
                Mode::UringOps => relay_uring_ops(&ends, &stop),
            }
            (thread_cpu() - c0, voluntary_switches() - s0)
        })
    };
    let t0 = Instant::now();
    let workers: Vec<JoinHandle<u64>> = client_ends
        .into_iter()
        .map(|mut c| {
            let stop = stop_clients.clone();
            thread::spawn(move || {
                let msg = [0x5au8; MSG];
                let mut back = [0u8; MSG];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    c.write_all(&msg).unwrap();
                    c.read_exact(&mut back).unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(secs));
    stop_clients.store(true, Ordering::Relaxed);
    let trips: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let elapsed = t0.elapsed().as_secs_f64();
    stop_rest.store(true, Ordering::Relaxed);
    let (cpu, switches) = relay.join().unwrap();
    echo.join().unwrap();
    let msgs = (2 * trips) as f64;
    Sample {
        rate: trips as f64 / elapsed,
        cpu_us_per_msg: cpu * 1e6 / msgs,
        switches_per_msg: switches as f64 / msgs,
    }
}

fn main() {
    if !util::measuring("uring_relay") {
        return;
    }
    let secs: f64 = util::env_or("VPD_BENCH_SECS", 1.5);
    let reps: usize = util::env_or("VPD_BENCH_REPS", 5);
    let modes = [Mode::Epoll, Mode::UringPoll, Mode::UringOps];
    println!(
        "relay of {MSG}-byte ping-pong messages, one relay thread, {reps} interleaved \
         repetitions x {secs} s, medians"
    );
    println!("| clients | mode | round trips/s | relay CPU µs/message | relay switches/message |");
    println!("|--:|:--|--:|--:|--:|");
    for clients in [1usize, 8] {
        let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
        for rep in 0..reps {
            for k in 0..modes.len() {
                let m = (k + rep) % modes.len(); // rotate the order every repetition
                samples[m].push(run(modes[m], clients, secs));
            }
        }
        for (m, s) in modes.iter().zip(samples) {
            println!(
                "| {clients} | {m:?} | {:.0} | {:.2} | {:.2} |",
                median(s.iter().map(|x| x.rate).collect()),
                median(s.iter().map(|x| x.cpu_us_per_msg).collect()),
                median(s.iter().map(|x| x.switches_per_msg).collect()),
            );
        }
    }
}
