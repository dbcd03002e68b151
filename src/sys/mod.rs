//! The bottom layer under `relay`, `tls` and `conn`: thin, safe wrappers over the few socket
//! syscalls issued inline after readiness, what a kTLS reader needs to know about records
//! ([`tls_record`]), where writes toward a TLS client are cut ([`cutter`]), and the eventfds
//! the threads wake each other with. It imports nothing from the modules above it.

pub mod cutter;
pub mod tls_record;

pub use cutter::FrameCutter;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Runs a syscall, retrying on EINTR (which, unlike EAGAIN, promises no readiness event).
fn cvt(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let r = call();
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// What one `recvmsg` brought.
#[derive(Debug)]
pub struct Received {
    pub n: usize,
    /// An fd that arrived with the last byte (AF_UNIX).
    pub fd: Option<OwnedFd>,
    /// On a kTLS socket: the content type of a record that is not application data (an
    /// alert, a KeyUpdate); its plaintext is in the buffer and must not be relayed.
    pub tls_record: Option<u8>,
}

/// `recvmsg` that also collects at most one SCM_RIGHTS fd and kTLS's record-type cmsg.
/// AF_UNIX stream reads stop right after a segment that carried fds, so any fd received
/// belongs to the last byte returned. Extra fds beyond the first (a hostile sender) are
/// closed here. kTLS never merges records of different types into one read.
pub fn recv_with_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    // Room for a few fds so an over-full carrier is truncated by us (and closed), not leaked.
    const SPACE: usize = 64;
    #[repr(C, align(8))]
    struct Cmsg([u8; SPACE]);
    let mut cmsg = Cmsg([0; SPACE]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = SPACE as _;
    // SAFETY: every pointer in msg refers to live buffers of the stated sizes.
    let n = cvt(|| unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    })?;
    let mut first: Option<OwnedFd> = None;
    let mut tls_record = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let owned = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if first.is_none() {
                        first = Some(owned);
                    } // else: dropped, i.e. closed
                }
            } else if (*c).cmsg_level == tls_record::SOL_TLS
                && (*c).cmsg_type == tls_record::TLS_GET_RECORD_TYPE
            {
                let t = *libc::CMSG_DATA(c);
                if t != tls_record::content_type::APPLICATION_DATA {
                    tls_record = Some(t);
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        n,
        fd: first,
        tls_record,
    })
}

/// Sends `byte` with one fd attached (the carrier format of libvirt-rpc.md §5.4).
pub fn send_with_fd(sock: BorrowedFd<'_>, byte: u8, pass: BorrowedFd<'_>) -> io::Result<usize> {
    #[repr(C, align(8))]
    struct Cmsg([u8; 24]);
    let mut cmsg = Cmsg([0; 24]);
    let mut b = [byte];
    let mut iov = libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: as above; the control buffer is CMSG_SPACE(sizeof(int)) = 24 bytes.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, pass.as_raw_fd());
        cvt(|| {
            libc::sendmsg(
                sock.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        })
    }
}

/// Non-blocking send that never raises SIGPIPE.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid readable slice.
    cvt(|| unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

/// Non-blocking `splice`, moving pages rather than copying where the kernel can.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets are valid for pipes and sockets.
    cvt(|| unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    })
}

/// `shutdown(SHUT_WR)`, ignoring a peer that is already gone.
pub fn shutdown_write(fd: BorrowedFd<'_>) {
    // SAFETY: plain syscall on a valid fd.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

/// A pipe used as the in-kernel buffer between two sockets.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    pub capacity: usize,
}

impl Pipe {
    pub fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds has room for two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors we now own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe means fewer splice calls per stream frame; the kernel may refuse (pipe
        // quota), in which case the default size is kept.
        // SAFETY: fcntl on our own fd.
        let got =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        let capacity = if got > 0 {
            got as usize
        } else {
            // SAFETY: as above.
            let cur = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if cur > 0 {
                cur as usize
            } else {
                65536
            }
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// Whether an I/O error only means "not now".
pub fn would_block(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

/// Sets or clears `fd`'s close-on-exec flag; false if fcntl failed.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> bool {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: fcntl on a descriptor the caller holds.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags) == 0 }
}

/// A non-blocking eventfd: how a thread that may sleep in its reactor is woken by another (a
/// new client, a polkit or SASL answer, an admin request, a client leaving under the limit).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bumps an eventfd. Nothing to report on failure: the counter can only be full after 2^64-2
/// wakes nobody drained, and the woken thread looks at its queues whatever the count.
pub fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes to an eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Empties an eventfd (non-blocking: an empty one reads EAGAIN, which is fine).
pub fn drain_eventfd(fd: &OwnedFd) {
    let mut b = [0u8; 8];
    // SAFETY: reading an eventfd counter into an 8-byte buffer.
    unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
}
