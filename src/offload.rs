//! Work kept off the relay workers (polkit's D-Bus calls, Cyrus SASL exchanges): requests
//! go from every worker into one queue; each answer goes back to the worker that asked,
//! through that worker's own channel, then wakes it through its eventfd. A worker never
//! waits: it sends a request and goes on serving its other connections. SASL's blocking
//! calls run on a few threads ([`start`]); polkit's run as tasks on one thread of its own
//! (`polkit::start`), which takes the queue and the repliers from [`links`].

use std::io;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{channel, Receiver, SendError};

/// A request names the worker its answer goes to.
pub trait Request: Send + 'static {
    fn worker(&self) -> usize;
}

/// The requests' end of the queue, as a worker holds it.
pub struct Sender<R>(async_channel::Sender<R>);

impl<R> Sender<R> {
    /// Queues `r`; fails only when nothing takes requests any more. Never blocks: the queue
    /// is unbounded; the polkit thread takes each request as it comes, and a connection has
    /// one SASL step at a time.
    pub fn send(&self, r: R) -> Result<(), SendError<R>> {
        self.0.try_send(r).map_err(|e| SendError(e.into_inner()))
    }
}

/// A worker's line to a pool: requests out, answers back.
pub struct Link<R, A> {
    pub tx: Sender<R>,
    pub rx: Receiver<A>,
}

struct Replier<A> {
    tx: std::sync::mpsc::Sender<A>,
    waker: OwnedFd,
}

/// The way back to every worker, in the order of their eventfds.
pub struct Repliers<A>(Vec<Replier<A>>);

impl<A> Repliers<A> {
    /// Sends `answer` to `worker` and wakes it (unless that worker is gone).
    pub fn reply(&self, worker: usize, answer: A) {
        let Some(r) = self.0.get(worker) else {
            return;
        };
        if r.tx.send(answer).is_ok() {
            crate::sys::wake(&r.waker);
        }
    }
}

/// One link per worker, in the order of `wakers` (the workers' eventfds), and the other ends:
/// the queue every link feeds and the repliers. The queue closes when every link is gone.
#[allow(clippy::type_complexity)]
pub fn links<R, A>(
    wakers: &[OwnedFd],
) -> io::Result<(Vec<Link<R, A>>, async_channel::Receiver<R>, Repliers<A>)> {
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
    let (tx, rx) = async_channel::unbounded::<R>();
    let links = answers
        .into_iter()
        .map(|a| Link {
            tx: Sender(tx.clone()),
            rx: a,
        })
        .collect();
    Ok((links, rx, Repliers(repliers)))
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
    let (links, rx, repliers) = links::<R, A>(wakers)?;
    let repliers = std::sync::Arc::new(repliers);
    let work = std::sync::Arc::new(work);
    for i in 0..threads {
        let (rx, repliers, work) = (rx.clone(), repliers.clone(), work.clone());
        std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                while let Ok(req) = rx.recv_blocking() {
                    let worker = req.worker();
                    repliers.reply(worker, work(req));
                }
            })?;
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

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
        let wakers: Vec<OwnedFd> = (0..2).map(|_| crate::sys::eventfd().unwrap()).collect();
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
