//! Blocking work kept off the relay workers (polkit's D-Bus calls, Cyrus SASL exchanges): a
//! few threads take requests from one queue and send each answer back to the worker that
//! asked, through that worker's own channel, then wake it through its eventfd. A worker
//! never waits: it sends a request and goes on serving its other connections.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// A request names the worker its answer goes to.
pub trait Request: Send + 'static {
    fn worker(&self) -> usize;
}

/// A worker's line to a pool: requests out, answers back.
pub struct Link<R, A> {
    pub tx: Sender<R>,
    pub rx: Receiver<A>,
}

struct Replier<A> {
    tx: Sender<A>,
    waker: OwnedFd,
}

/// Starts `threads` threads named `{name}-{i}` that run `work` on each request, and returns
/// one link per worker, in the order of `wakers` (the workers' eventfds). The threads end
/// when every link's sender is gone.
pub fn start<R, A, F>(
    name: &str,
    threads: usize,
    wakers: &[OwnedFd],
    work: F,
) -> io::Result<Vec<Link<R, A>>>
where
    R: Request,
    A: Send + 'static,
    F: Fn(R) -> A + Send + Sync + 'static,
{
    let mut repliers = Vec::with_capacity(wakers.len());
    let mut answers = Vec::with_capacity(wakers.len());
    for w in wakers {
        let (tx, rx) = channel();
        repliers.push(Replier {
            tx,
            waker: w.try_clone()?,
        });
        answers.push(rx);
    }
    let (tx, rx) = channel::<R>();
    let rx = Arc::new(Mutex::new(rx));
    let repliers = Arc::new(repliers);
    let work = Arc::new(work);
    for i in 0..threads {
        let (rx, repliers, work) = (rx.clone(), repliers.clone(), work.clone());
        std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || serve(&rx, &repliers, &*work))?;
    }
    Ok(answers
        .into_iter()
        .map(|rx| Link { tx: tx.clone(), rx })
        .collect())
}

fn serve<R: Request, A>(rx: &Mutex<Receiver<R>>, repliers: &[Replier<A>], work: &dyn Fn(R) -> A) {
    loop {
        // The lock is held only while waiting for the next request, never during the work.
        let req = match rx.lock().map(|r| r.recv()) {
            Ok(Ok(r)) => r,
            _ => return,
        };
        let worker = req.worker();
        let answer = work(req);
        let Some(r) = repliers.get(worker) else {
            continue;
        };
        if r.tx.send(answer).is_ok() {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes to an eventfd.
            unsafe { libc::write(r.waker.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ask(usize, u32);
    impl Request for Ask {
        fn worker(&self) -> usize {
            self.0
        }
    }

    /// Each answer reaches the worker that asked, and wakes it.
    #[test]
    fn answers_go_to_the_asking_worker() {
        let wakers: Vec<OwnedFd> = (0..2).map(|_| crate::worker::eventfd().unwrap()).collect();
        let links = start("test", 2, &wakers, |a: Ask| a.1 * 10).unwrap();
        links[1].tx.send(Ask(1, 4)).unwrap();
        links[0].tx.send(Ask(0, 7)).unwrap();
        let timeout = std::time::Duration::from_secs(5);
        assert_eq!(links[1].rx.recv_timeout(timeout), Ok(40));
        assert_eq!(links[0].rx.recv_timeout(timeout), Ok(70));
        for w in &wakers {
            // The wake follows the answer: wait for it rather than race it.
            let mut pfd = libc::pollfd {
                fd: w.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(n, 1, "the worker's eventfd was signalled");
        }
    }
}
