//! Moving a hand-over between processes: the state in a memfd, the fds in the queue of a
//! SOCK_SEQPACKET socketpair (SCM_RIGHTS, at most 253 a message; a connected pair is not
//! held to `max_dgram_qlen`), and both as activation fds: through `execve` for `SIGUSR2`,
//! through systemd's fd store otherwise.

use std::io::{self, IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// fds per message (the kernel's SCM_MAX_FD).
const FDS_PER_MSG: usize = 253;
/// Largest state a reader accepts (a few hundred bytes per connection).
const STATE_MAX: u64 = 256 << 20;

/// A hand-over ready to leave: the state's memfd and the receiving end of the fd queue.
pub struct Outgoing {
    pub state: OwnedFd,
    pub fds: OwnedFd,
}

/// Writes `state` to a memfd, read from its start.
pub fn pack_state(state: &[u8]) -> io::Result<OwnedFd> {
    let memfd = nix::sys::memfd::memfd_create(
        c"virtproxyd-handover",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(state)?;
    file.rewind()?;
    Ok(file.into())
}

/// Writes `state` to a memfd and queues `fds` on a fresh socketpair, in order.
pub fn pack(state: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<Outgoing> {
    let file = pack_state(state)?;
    let (tx, rx) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // Room for every message: each queues an skb of its own.
    let want = ((fds.len() / FDS_PER_MSG + 1) * 4096).max(1 << 20) as libc::c_int;
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: setsockopt with an int value on our own socket.
        let r = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&want as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            break;
        }
    }
    for chunk in fds.chunks(FDS_PER_MSG) {
        let raw: Vec<RawFd> = chunk.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(
            tx.as_raw_fd(),
            &[IoSlice::new(&[0u8])],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
    }
    drop(tx);
    Ok(Outgoing {
        state: file,
        fds: rx,
    })
}

/// Reads a state memfd (bounded).
pub fn read_state(fd: OwnedFd) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd);
    file.rewind()?;
    let mut out = Vec::new();
    file.take(STATE_MAX).read_to_end(&mut out)?;
    Ok(out)
}

/// Takes up to `count` fds from the queue, in order; fewer if the queue runs dry (the caller
/// decides what a short count means). Each received fd gets CLOEXEC.
pub fn receive_fds(queue: BorrowedFd<'_>, count: usize) -> io::Result<Vec<OwnedFd>> {
    let mut out = Vec::with_capacity(count.min(4096));
    while out.len() < count {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MSG]);
        let msg = match recvmsg::<()>(
            queue.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => return Err(e.into()),
        };
        if msg.bytes == 0 {
            break;
        }
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                out.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
    }
    Ok(out)
}

/// Clears CLOEXEC so `fd` survives an `execve`.
pub fn inherit(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Hands `out` to systemd's fd store (`FDSTORE=1`, named, `FDPOLL=0`: a queue whose writer
/// is gone reads as hung up) and waits until systemd has read the message (`BARRIER=1`), so
/// that exiting right after loses nothing.
pub fn store_in_systemd(out: &Outgoing) -> io::Result<()> {
    use sd_notify::NotifyState;
    for (fd, name) in [
        (out.state.as_fd(), super::STATE_NAME),
        (out.fds.as_fd(), super::FDS_NAME),
    ] {
        // Replace an older entry of the same name (a hand-over the last start did not take).
        let _ = sd_notify::notify(
            false,
            &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
        );
        sd_notify::notify_with_fds(
            false,
            &[
                NotifyState::FdStore,
                NotifyState::FdName(name),
                NotifyState::Custom("FDPOLL=0"),
            ],
            &[fd],
        )?;
    }
    barrier()
}

/// Removes a hand-over the new process has taken from systemd's fd store (else the next
/// restart would get it again beside its own); a no-op without systemd.
pub fn forget_in_systemd() {
    use sd_notify::NotifyState;
    for name in [super::STATE_NAME, super::FDS_NAME] {
        if let Err(e) = sd_notify::notify(
            false,
            &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
        ) {
            tracing::debug!("FDSTOREREMOVE {name}: {e}");
        }
    }
}

/// `BARRIER=1`: systemd closes the pipe's write end we send once it has processed every
/// earlier message; its read end then sees EOF.
fn barrier() -> io::Result<()> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    sd_notify::notify_with_fds(
        false,
        &[sd_notify::NotifyState::Custom("BARRIER=1")],
        &[w.as_fd()],
    )?;
    drop(w);
    let mut fds = [nix::poll::PollFd::new(
        r.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "systemd did not confirm the fd store within 5 s",
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn state_and_fds_arrive_intact_and_in_order() {
        // 600 fds: three messages' worth; each a socket with a byte that names it queued.
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for i in 0..600u32 {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(&i.to_be_bytes()).unwrap();
            ours.push(b);
            theirs.push(a);
        }
        let borrowed: Vec<BorrowedFd<'_>> = theirs.iter().map(|s| s.as_fd()).collect();
        let out = pack(b"the state", &borrowed).unwrap();
        drop(theirs); // only the queue holds them now
        assert_eq!(read_state(out.state).unwrap(), b"the state");
        let got = receive_fds(out.fds.as_fd(), 600).unwrap();
        assert_eq!(got.len(), 600);
        for (i, fd) in got.into_iter().enumerate() {
            let mut s = UnixStream::from(fd);
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            assert_eq!(u32::from_be_bytes(b), i as u32, "fd {i} out of order");
        }
        drop(ours);
    }

    #[test]
    fn a_short_queue_gives_what_it_has() {
        let (a, _b) = UnixStream::pair().unwrap();
        let out = pack(b"", &[a.as_fd()]).unwrap();
        assert_eq!(receive_fds(out.fds.as_fd(), 5).unwrap().len(), 1);
    }
}
