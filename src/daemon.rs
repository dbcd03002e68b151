//! Process lifecycle: pid file with a lock, daemonizing (virtproxyd(8) `-d`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A held pid file: locked for as long as this value lives, unlinked on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    _file: File,
}

/// Why the pid file could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("Failed to acquire pid file '{path}': {source}")]
pub struct PidFileError {
    path: PathBuf,
    source: io::Error,
}

impl PidFile {
    /// Creates and locks `path` (a write lock on byte 0, as libvirt does), then writes our pid.
    /// A second instance fails with EAGAIN and leaves the file untouched.
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        let err = |source| PidFileError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        loop {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(err)?;
            let lock = libc::flock {
                l_type: libc::F_WRLCK as _,
                l_whence: libc::SEEK_SET as _,
                l_start: 0,
                l_len: 1,
                l_pid: 0,
            };
            // SAFETY: fcntl with a valid flock struct on our own fd.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } < 0 {
                return Err(err(io::Error::last_os_error()));
            }
            // The file may have been unlinked and recreated by an exiting holder between open
            // and lock; then our lock is on a dead inode. Retry on the new file.
            let same = match (std::fs::metadata(path), file.metadata()) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            file.set_len(0).map_err(err)?;
            write!(file, "{}", std::process::id()).map_err(err)?;
            return Ok(PidFile {
                path: path.to_path_buf(),
                _file: file,
            });
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The default pid file path (libvirt-rpc.md §8.6).
pub fn default_pid_file(
    privileged: bool,
    xdg_runtime_dir: Option<&Path>,
    home: Option<&Path>,
) -> PathBuf {
    if privileged {
        PathBuf::from("/run/virtproxyd.pid")
    } else {
        match (xdg_runtime_dir, home) {
            (Some(d), _) => d.join("libvirt/virtproxyd.pid"),
            (None, Some(h)) => h.join(".cache/libvirt/virtproxyd.pid"),
            (None, None) => PathBuf::from("virtproxyd.pid"),
        }
    }
}

/// The write end of the pipe the original parent waits on: one status byte once the daemon is
/// ready (0) or has failed (non-zero).
#[derive(Debug)]
pub struct ReadyPipe(File);

impl ReadyPipe {
    pub fn report(mut self, status: u8) {
        let _ = self.0.write_all(&[status]);
    }
}

/// Forks into the background the way libvirt daemons do: chdir /, fork, setsid, fork, stdio
/// to /dev/null. Returns in the daemon only; the original process exits with the status the
/// daemon reports (printing `argv0: error: …` on failure). Must run before any thread exists.
pub fn daemonize(argv0: &str) -> io::Result<ReadyPipe> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors from pipe2.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    std::env::set_current_dir("/")?;
    // SAFETY: single-threaded at this point (documented precondition).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(rd);
            // SAFETY: as above.
            unsafe {
                libc::setsid();
                match libc::fork() {
                    -1 => libc::_exit(1),
                    0 => {}
                    _ => libc::_exit(0),
                }
            }
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            for target in 0..3 {
                // SAFETY: dup2 onto the standard descriptors.
                unsafe { libc::dup2(null.as_raw_fd(), target) };
            }
            Ok(ReadyPipe(File::from(wr)))
        }
        _child => {
            drop(wr);
            let mut status = [1u8];
            let mut f = File::from(rd);
            let ok = matches!(f.read(&mut status), Ok(1)) && status[0] == 0;
            if !ok {
                eprintln!(
                    "{argv0}: error: Unable to start the daemon. Check /var/log/messages or run without --daemon for more info."
                );
                std::process::exit(1);
            }
            std::process::exit(0);
        }
    }
}
