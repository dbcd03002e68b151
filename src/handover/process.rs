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
    // Relayed sockets are inheritable (see `exec_inheriting`): the check must not hold them.
    // SAFETY: close_range is async-signal-safe; stdin/out/err are in place by now.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
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

/// The state of a hand-over without its connection records (encoded from `h.carried` by
/// `encode`) and with `inherited` empty, and its fds in stream order.
fn describe(h: &HandOff) -> (State, Vec<BorrowedFd<'_>>) {
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
        conns: Vec::new(),
        inherited: Vec::new(),
    };
    let mut fds: Vec<BorrowedFd<'_>> = h.listeners.iter().map(|l| l.fd.as_fd()).collect();
    for c in &h.carried {
        fds.push(c.client.as_fd());
        if let Some(d) = &c.daemon {
            fds.push(d.as_fd());
        }
    }
    (state, fds)
}

/// The whole state of `h`, given `describe`'s head.
fn encode(head: &State, h: &HandOff) -> Vec<u8> {
    state::encode_with(head, h.carried.iter().map(|c| &c.record))
}

/// Packs a hand-over for another process: the state in a memfd, every fd in the queue.
pub fn pack(h: &HandOff) -> std::io::Result<Outgoing> {
    let (state, fds) = describe(h);
    transfer::pack(&encode(&state, h), &fds)
}

/// Leaves for the next process. `Exec` only returns on failure (with this process's
/// `HandOff` intact, to serve on); `FdStore` returns once systemd holds everything.
pub fn leave(h: &HandOff, exe: &Path, args: &[OsString]) -> Result<(), String> {
    match h.mode {
        HandOffMode::FdStore => {
            let out = pack(h).map_err(|e| format!("cannot pack the hand-over: {e}"))?;
            transfer::store_in_systemd(&out)
                .map_err(|e| format!("cannot store the hand-over in systemd's fd store: {e}"))
        }
        HandOffMode::Exec => Err(exec_inheriting(h, exe, args)),
    }
}

/// `execve` keeps every fd without CLOEXEC where it is: the carried fds stay at their
/// numbers and the state lists them, so nothing crosses a socket queue (18,000 fds in flight
/// keep the kernel's AF_UNIX garbage collector busy for tens of milliseconds). Relayed
/// sockets are inheritable since their relay started (`Carried::inheritable`): clearing
/// CLOEXEC here, one fcntl per fd, cost 9,000 idle connections ~20 ms of the pause. Only
/// fd 3, where the state goes, is moved first. On failure every fd is as it was.
fn exec_inheriting(h: &HandOff, exe: &Path, args: &[OsString]) -> String {
    let (mut state, fds) = describe(h);
    // Which of `fds` (in their order) are inheritable already.
    let ready =
        h.listeners
            .iter()
            .map(|_| false)
            .chain(h.carried.iter().flat_map(|c| {
                std::iter::repeat(c.inheritable).take(1 + usize::from(c.daemon.is_some()))
            }));
    // Copies of fds that sat on 3 (kept until the exec), and the fds whose CLOEXEC we cleared.
    let mut moved: Vec<OwnedFd> = Vec::new();
    let mut cleared: Vec<i32> = Vec::with_capacity(fds.len());
    let restore = |cleared: &[i32]| {
        for &fd in cleared {
            // SAFETY: fcntl on descriptors we hold.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    };
    for (fd, ready) in fds.iter().zip(ready) {
        let mut raw = fd.as_raw_fd();
        if ready && raw != 3 {
            state.inherited.push(raw);
            continue;
        }
        if raw == 3 {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor we hold; the copy is ours.
            let copy = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 5) };
            if copy < 0 {
                restore(&cleared);
                return format!("cannot move fd 3: {}", std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor.
            moved.push(unsafe { std::os::fd::FromRawFd::from_raw_fd(copy) });
            raw = copy;
        }
        // SAFETY: fcntl on a descriptor we hold.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, 0) } < 0 {
            restore(&cleared);
            return format!("cannot keep fd {raw}: {}", std::io::Error::last_os_error());
        }
        cleared.push(raw);
        state.inherited.push(raw);
    }
    let memfd = match transfer::pack_state(&encode(&state, h)) {
        Ok(m) => m,
        Err(e) => {
            restore(&cleared);
            return format!("cannot pack the hand-over: {e}");
        }
    };
    let why = exec(exe, args, memfd.as_fd(), None, h.began_ns);
    restore(&cleared);
    drop(moved);
    why
}

/// `execve`s `exe` with the hand-over as activation fds: the state on 3 (and the fd queue
/// on 4, when there is one). Returns why it failed, with fds 3 and 4 as they were.
fn exec(
    exe: &Path,
    args: &[OsString],
    state_fd: BorrowedFd<'_>,
    queue: Option<BorrowedFd<'_>>,
    began_ns: u64,
) -> String {
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
    let (count, names) = match queue {
        Some(_) => (2, format!("{STATE_NAME}:{FDS_NAME}")),
        None => (1, STATE_NAME.to_string()),
    };
    for kv in [
        format!("LISTEN_PID={}", std::process::id()),
        format!("LISTEN_FDS={count}"),
        format!("LISTEN_FDNAMES={names}"),
        // When the quiesce began: the new process logs the pause from there.
        format!("{EXEC_ENV}={began_ns}:{}", super::monotonic_ns()),
    ] {
        match CString::new(kv) {
            Ok(c) => envp.push(c),
            Err(e) => return e.to_string(),
        }
    }
    // fds 3 and 4 are someone's now (the log file, an eventfd): keep copies to put back if
    // the exec fails, then put the hand-over there (dup2 clears CLOEXEC on the copy).
    let targets: &[i32] = if queue.is_some() { &[3, 4] } else { &[3] };
    let saved: Vec<Option<OwnedFd>> = targets
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
            libc::fcntl(state_fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10),
            queue.map_or(-2, |q| {
                libc::fcntl(q.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10)
            }),
        )
    };
    // SAFETY: dup2 onto 3 (and 4), then execve; on failure everything is put back below.
    let err = unsafe {
        if st < 0 || q == -1 || libc::dup2(st, 3) < 0 || (q >= 0 && libc::dup2(q, 4) < 0) {
            std::io::Error::last_os_error()
        } else {
            let _ = nix::unistd::execve(&path, &argv, &envp);
            std::io::Error::last_os_error()
        }
    };
    for (&fd, copy) in targets.iter().zip(saved) {
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
pub fn arrive(state_fd: OwnedFd, queue: Option<OwnedFd>) -> Result<Arrived, String> {
    let bytes = transfer::read_state(state_fd).map_err(|e| format!("reading the state: {e}"))?;
    let decoded = state::decode(&bytes);
    // Every fd comes out of the queue either way, so an unreadable state leaks nothing.
    let mut all = match &queue {
        Some(q) => transfer::receive_fds(q.as_fd(), usize::MAX >> 1)
            .map_err(|e| format!("receiving the fds: {e}"))?,
        None => Vec::new(),
    };
    let st = decoded.map_err(|e| format!("{e}; {} carried fds closed", all.len()))?;
    if queue.is_none() {
        all = inherited_fds(&st.inherited)?;
    }
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
        match check_client(&record, &client) {
            Ok(()) => carried.push(Carried {
                inheritable: false,
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
            began_ns: None,
        },
        producer: st.producer,
    })
}

/// Takes the fds an `execve` left at the numbers the state lists: distinct and above the
/// standard three. They get CLOEXEC back in one `close_range` call (every fd of this young
/// process should have it), so children do not inherit them.
fn inherited_fds(numbers: &[i32]) -> Result<Vec<OwnedFd>, String> {
    let mut seen = std::collections::HashSet::with_capacity(numbers.len());
    for &fd in numbers {
        if fd < 3 || !seen.insert(fd) {
            return Err(format!("inherited fd {fd} is not a carried descriptor"));
        }
    }
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on open descriptors.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 {
        for &fd in numbers {
            // SAFETY: as above, one descriptor at a time (kernels before 5.11).
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    // SAFETY: inherited by this process at these numbers (the state says so), owned by
    // nobody else here; one that is not open fails its first use, which closes only that
    // connection.
    Ok(numbers
        .iter()
        .map(|&fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
        .collect())
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

/// The client socket of a kTLS record still has the TLS ULP (a connection whose crypto
/// state did not come along would send plaintext). Other fds are taken as the state lists
/// them: a socket-type check per fd cost 9,000 idle connections ~10 ms of the pause, and a
/// wrong fd fails its first read or write, which closes that connection only.
fn check_client(r: &ConnRecord, client: &OwnedFd) -> Result<(), String> {
    if r.ktls && !crate::tls::ktls::has_tls_ulp(client.as_fd()) {
        return Err("its client socket lost kernel TLS".into());
    }
    Ok(())
}
