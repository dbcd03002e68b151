//! The process side of a hand-over: asking the next binary whether it can take over,
//! packing and leaving (`execve` in place, or systemd's fd store), and in the new process,
//! unpacking what arrived.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::state::{self, ConnRecord, ListenerRecord, State};
use super::transfer::{self, Outgoing};
use super::{Carried, HandOff, HandOffMode, Resumed, FDS_NAME, STATE_NAME};
use crate::listen::Listener;

/// Set in the environment of a process started by `SIGUSR2`'s `execve`: it must not fork
/// again (`--daemon`), it is the daemon already.
pub const EXEC_ENV: &str = "VIRTPROXYD_HANDOVER_EXEC";

/// What this build writes as its producer string.
fn producer() -> String {
    format!("virtproxyd-rs {}", env!("CARGO_PKG_VERSION"))
}

/// The answer of `--handover-check`.
pub fn check_answer() -> String {
    format!("handover-format {}", state::FORMAT_VERSION)
}

/// Runs `exe --handover-check` (with the config file this process uses): the binary must
/// start, read the config and read this build's state format, within 10 s.
pub fn check_binary(exe: &Path, config: Option<&Path>) -> Result<(), String> {
    let mut cmd = Command::new(exe);
    cmd.arg("--handover-check");
    if let Some(c) = config {
        cmd.arg("-f").arg(c);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --handover-check did not answer in 10 s",
                    exe.display()
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", exe.display())),
        }
    };
    let out = child
        .wait_with_output()
        .map_err(|e| format!("reading {}: {e}", exe.display()))?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(format!(
            "{} --handover-check failed ({status}): {err}",
            exe.display()
        ));
    }
    if said != check_answer() {
        return Err(format!(
            "{} cannot read this state: it said {said:?}, this process writes {:?}",
            exe.display(),
            check_answer()
        ));
    }
    Ok(())
}

/// Packs a hand-over: the state and, in its order, every fd.
pub fn pack(h: &HandOff) -> std::io::Result<Outgoing> {
    let state = State {
        producer: producer(),
        next_id: h.next_id,
        listeners: h
            .listeners
            .iter()
            .map(|l| ListenerRecord {
                kind: l.kind,
                path: l.path.as_ref().map(|p| p.to_string_lossy().into_owned()),
            })
            .collect(),
        conns: h.carried.iter().map(|c| c.record.clone()).collect(),
    };
    let mut fds: Vec<BorrowedFd<'_>> = h.listeners.iter().map(|l| l.fd.as_fd()).collect();
    for c in &h.carried {
        fds.push(c.client.as_fd());
        if let Some(d) = &c.daemon {
            fds.push(d.as_fd());
        }
    }
    transfer::pack(&state::encode(&state), &fds)
}

/// Leaves for the next process. `Exec` only returns on failure (with this process's
/// `HandOff` intact, to serve on); `FdStore` returns once systemd holds everything.
pub fn leave(h: &HandOff, exe: &Path, args: &[OsString]) -> Result<(), String> {
    let out = pack(h).map_err(|e| format!("cannot pack the hand-over: {e}"))?;
    match h.mode {
        HandOffMode::FdStore => transfer::store_in_systemd(&out)
            .map_err(|e| format!("cannot store the hand-over in systemd's fd store: {e}")),
        HandOffMode::Exec => Err(exec(exe, args, &out)),
    }
}

/// `execve`s `exe` with the hand-over as activation fds 3 and 4. Returns why it failed,
/// with fds 3 and 4 as they were.
fn exec(exe: &Path, args: &[OsString], out: &Outgoing) -> String {
    let cstr = |b: &[u8]| CString::new(b).map_err(|e| e.to_string());
    let path = match cstr(exe.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut argv = vec![path.clone()];
    for a in args {
        match cstr(a.as_bytes()) {
            Ok(a) => argv.push(a),
            Err(e) => return e,
        }
    }
    let mut envp = Vec::new();
    for (k, v) in std::env::vars_os() {
        let k = k.as_bytes();
        if k.starts_with(b"LISTEN_") || k == EXEC_ENV.as_bytes() {
            continue;
        }
        let mut kv = k.to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        match CString::new(kv) {
            Ok(c) => envp.push(c),
            Err(e) => return e.to_string(),
        }
    }
    for kv in [
        format!("LISTEN_PID={}", std::process::id()),
        "LISTEN_FDS=2".to_string(),
        format!("LISTEN_FDNAMES={STATE_NAME}:{FDS_NAME}"),
        format!("{EXEC_ENV}=1"),
    ] {
        match CString::new(kv) {
            Ok(c) => envp.push(c),
            Err(e) => return e.to_string(),
        }
    }
    // fds 3 and 4 are someone's now (the log file, an eventfd): keep copies to put back if
    // the exec fails, then put the hand-over there (dup2 clears CLOEXEC on the copy).
    let saved: Vec<Option<OwnedFd>> = [3, 4]
        .iter()
        .map(|&fd| {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; -1 if it is not open.
            let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            // SAFETY: a fresh descriptor we own.
            (r >= 0).then(|| unsafe { std::os::fd::FromRawFd::from_raw_fd(r) })
        })
        .collect();
    // SAFETY: F_DUPFD_CLOEXEC copies; the originals may sit on 3 or 4 themselves.
    let (st, q) = unsafe {
        (
            libc::fcntl(out.state.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10),
            libc::fcntl(out.fds.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10),
        )
    };
    // SAFETY: dup2 onto 3 and 4, then execve; on failure everything is put back below.
    let err = unsafe {
        if st < 0 || q < 0 || libc::dup2(st, 3) < 0 || libc::dup2(q, 4) < 0 {
            std::io::Error::last_os_error()
        } else {
            let _ = nix::unistd::execve(&path, &argv, &envp);
            std::io::Error::last_os_error()
        }
    };
    for (fd, copy) in [3, 4].into_iter().zip(saved) {
        match copy {
            // SAFETY: putting our own descriptor back on its number.
            Some(c) => unsafe {
                libc::dup3(c.as_raw_fd(), fd, libc::O_CLOEXEC);
            },
            // SAFETY: it was not open before.
            None => unsafe {
                libc::close(fd);
            },
        }
    }
    // SAFETY: closing the two copies made above.
    unsafe {
        if st >= 0 {
            libc::close(st);
        }
        if q >= 0 {
            libc::close(q);
        }
    }
    format!("cannot execute {}: {err}", exe.display())
}

/// What a new process found in a hand-over.
pub struct Arrived {
    pub listeners: Vec<Listener>,
    pub resumed: Resumed,
    pub producer: String,
}

/// Unpacks a hand-over (the activation fds named `STATE_NAME` and `FDS_NAME`). A state this
/// build cannot read closes every fd it carried (their clients see EOF; logged by the
/// caller); an fd that is missing or not what its record says closes that connection only.
pub fn arrive(state_fd: OwnedFd, queue: OwnedFd) -> Result<Arrived, String> {
    let bytes = transfer::read_state(state_fd).map_err(|e| format!("reading the state: {e}"))?;
    let decoded = state::decode(&bytes);
    // Every fd comes out of the queue either way, so an unreadable state leaks nothing.
    let all = transfer::receive_fds(queue.as_fd(), usize::MAX >> 1)
        .map_err(|e| format!("receiving the fds: {e}"))?;
    let st = decoded.map_err(|e| format!("{e}; {} carried fds closed", all.len()))?;
    let want = st.listeners.len() + st.conns.iter().map(ConnRecord::fds).sum::<usize>();
    if all.len() != want {
        return Err(format!(
            "the state names {want} fds but {} arrived; all closed",
            all.len()
        ));
    }
    let mut fds = all.into_iter();
    let mut listeners = Vec::new();
    for l in st.listeners {
        if let Some(fd) = fds.next() {
            set_nonblocking(&fd);
            listeners.push(Listener {
                fd,
                kind: l.kind,
                path: l.path.map(PathBuf::from),
            });
        }
    }
    let mut carried = Vec::with_capacity(st.conns.len());
    for record in st.conns {
        let Some(client) = fds.next() else {
            break;
        };
        let daemon = if record.fresh { None } else { fds.next() };
        if !record.fresh && daemon.is_none() {
            break;
        }
        match check_sockets(&record, &client, daemon.as_ref()) {
            Ok(()) => carried.push(Carried {
                record,
                client,
                daemon,
            }),
            Err(why) => tracing::warn!(conn = record.id, "carried connection closed: {why}"),
        }
    }
    Ok(Arrived {
        listeners,
        resumed: Resumed {
            carried,
            next_id: st.next_id,
        },
        producer: st.producer,
    })
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl flags on our own descriptor.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

/// Both fds are stream sockets (a record whose fds were swapped or replaced would otherwise
/// relay between the wrong peers); the client socket of a kTLS record has the TLS ULP.
fn check_sockets(r: &ConnRecord, client: &OwnedFd, daemon: Option<&OwnedFd>) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt};
    for (what, fd) in [("client", Some(client)), ("daemon", daemon)] {
        let Some(fd) = fd else { continue };
        match getsockopt(fd, sockopt::SockType) {
            Ok(nix::sys::socket::SockType::Stream) => {}
            Ok(t) => return Err(format!("its {what} fd is a {t:?} socket")),
            Err(e) => return Err(format!("its {what} fd is not a socket ({e})")),
        }
        // O_NONBLOCK is the open file's, so it came along with it.
    }
    if r.ktls && !crate::tls::ktls::has_tls_ulp(client.as_fd()) {
        return Err("its client socket lost kernel TLS".into());
    }
    Ok(())
}
