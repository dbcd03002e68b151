//! virtproxyd.service drop-in behaviour: socket activation, readiness, idle exit, reload,
//! daemon mode, and the shipped units.

mod support;

use std::io::Write;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{daemon, virsh, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_virtproxyd");

fn conf_for(dir: &Path, extra: &str) -> PathBuf {
    let d = &daemon().rw_sock;
    let conf = dir.join("virtproxyd.conf");
    std::fs::write(
        &conf,
        format!(
            // Auth "none" everywhere (after `extra`, which wins): raw clients skip AUTH_LIST
            // and the activation test passes a TCP socket.
            "{extra}\nunix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0777\"\ndriver_sockets = [ \"test={}\", \"qemu={}\" ]\n\
             auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nauth_tcp = \"none\"\n",
            dir.join("s").display(),
            d.display(),
            d.display()
        ),
    )
    .unwrap();
    conf
}

fn spawn(args: &[&str], dir: &Path, envs: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

fn tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("vpd-life-")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn raw_open(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut body = vec![0, 0, 0, 1, 0, 0, 0, 15];
    body.extend_from_slice(b"test:///default\0\0\0\0\0");
    s.write_all(&support::frame(1, 0, 1, &body)).unwrap();
    let r = support::read_frame(&mut s).expect("open reply");
    assert_eq!(&r[24..28], &[0, 0, 0, 0], "open failed");
    s
}

/// The proxy with `conf` and -v, in `dir`; returns it once its rw socket exists.
fn spawn_verbose(dir: &Path, conf: &Path) -> (Child, PathBuf) {
    let p = spawn(
        &[
            "-v",
            "-f",
            conf.to_str().unwrap(),
            "-p",
            dir.join("pid").to_str().unwrap(),
        ],
        dir,
        &[],
    );
    let sock = dir.join("s/libvirt-sock");
    assert!(wait_for(Duration::from_secs(10), || sock.exists()));
    (p, sock)
}

/// A client of `sock` whose AUTH_LIST is not answered within 600 ms (it waits in the
/// backlog); `why` is the failure message if it is answered.
fn waiting_client(sock: &Path, why: &str) -> UnixStream {
    let mut b = UnixStream::connect(sock).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    b.write_all(&support::frame(66, 0, 0, &[])).unwrap();
    assert!(support::read_frame(&mut b).is_none(), "{why}");
    b
}

fn lib_version_works(s: &mut UnixStream, serial: u32) -> bool {
    s.write_all(&support::frame(157, 0, serial, &[])).is_ok()
        && support::read_frame(s)
            .is_some_and(|r| r[20..24] == serial.to_be_bytes() && r[24..28] == [0, 0, 0, 0])
}

#[test]
fn socket_activation_serves_passed_fds_and_never_unlinks_them() {
    let dir = tempdir();
    let conf = conf_for(dir.path(), "");
    let (rw, ro, admin) = (
        dir.path().join("act-rw"),
        dir.path().join("act-ro"),
        dir.path().join("act-admin"),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
    // systemd-socket-activate binds, then execs the proxy on the first connection.
    let mut act = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&rw)
        .arg("-l")
        .arg(&ro)
        .arg("-l")
        .arg(&admin)
        .arg("-l")
        .arg(&tcp)
        .arg("--fdname=virtproxyd.socket:virtproxyd-ro.socket:virtproxyd-admin.socket:virtproxyd-tcp.socket")
        .args([
            BIN,
            "-v",
            "-f",
            conf.to_str().unwrap(),
            "-p",
            dir.path().join("pid").to_str().unwrap(),
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || rw.exists() && ro.exists()));
    let uri = format!("test+unix:///default?socket={}", rw.display());
    let o = virsh(&uri, &["list", "--all"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = virsh(
        &format!("test+unix:///default?socket={}", ro.display()),
        &["list"],
    );
    assert!(
        o.status.success(),
        "ro: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Plain TCP with auth none, as `qemu+tcp://` clients use it.
    let o = virsh(&format!("test+tcp://{tcp}/default"), &["list", "--all"]);
    assert!(
        o.status.success(),
        "tcp: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The activated admin socket is served by the admin thread.
    let o = support::virt_admin_sock(&admin, &["srv-list"]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("virtproxyd"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The config's unix_sock_dir was ignored: no socket created there.
    assert!(!dir.path().join("s/libvirt-sock").exists());
    sigterm(act.id());
    let st = wait_exit(&mut act, Duration::from_secs(10)).expect("proxy did not exit on SIGTERM");
    assert!(st.success(), "exit {st:?}");
    assert!(
        rw.exists() && ro.exists(),
        "activated sockets were unlinked"
    );
}

/// Runs the proxy under systemd-socket-activate with one rw socket of `mode` (and the TCP
/// socket too when `tcp`), triggers it, and returns (exit status if it exited, log).
fn activate_rw(extra: &str, mode: u32, tcp: bool) -> (Option<std::process::ExitStatus>, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let conf = dir.path().join("virtproxyd.conf");
    std::fs::write(
        &conf,
        format!(
            "{extra}\ndriver_sockets = [ \"test={}\" ]\n",
            daemon().rw_sock.display()
        ),
    )
    .unwrap();
    let sock = dir.path().join("act-rw");
    let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(&sock);
    let mut names = "virtproxyd.socket".to_string();
    if tcp {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        cmd.arg("-l").arg(format!("127.0.0.1:{port}"));
        names.push_str(":virtproxyd-tcp.socket");
    }
    let mut act = cmd
        .arg(format!("--fdname={names}"))
        .args([
            BIN,
            "-v",
            "-f",
            conf.to_str().unwrap(),
            "-p",
            dir.path().join("pid").to_str().unwrap(),
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || sock.exists()));
    // What SocketMode= would have made it.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(mode)).unwrap();
    let _trigger = UnixStream::connect(&sock).unwrap();
    let log_path = dir.path().join("proxy.log");
    let started = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("relay workers started"))
    });
    sigterm(act.id());
    let st = wait_exit(&mut act, Duration::from_secs(10));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(started, "{log}");
    (st, log)
}

#[test]
fn activated_rw_socket_open_to_others_without_auth_is_warned_about() {
    let (_, log) = activate_rw("auth_unix_rw = \"none\"", 0o666, false);
    assert!(
        log.contains("has mode 0666 and auth_unix_rw = \"none\""),
        "{log}"
    );
    assert!(log.contains("SocketMode=0600"), "{log}");
    // The distribution's 0666 unit with polkit (the default), or a 0600 socket: no warning.
    for (extra, mode) in [("", 0o666), ("auth_unix_rw = \"none\"", 0o600)] {
        let (_, log) = activate_rw(extra, mode, false);
        assert!(!log.contains("SocketMode=0600"), "{extra} {mode:o}: {log}");
    }
}

#[test]
fn activated_tcp_socket_with_default_sasl_auth_starts() {
    // SASL exists now: libvirt's default auth_tcp is served, not refused.
    let (st, log) = activate_rw("", 0o666, true);
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{log}");
    assert!(!log.contains("needs SASL"), "{log}");
}

#[test]
fn socket_activation_refuses_an_unknown_fd_name() {
    let dir = tempdir();
    let conf = conf_for(dir.path(), "");
    let sock = dir.path().join("act-x");
    let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
    let mut act = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg("--fdname=libvirtd.socket")
        .args([
            BIN,
            "-f",
            conf.to_str().unwrap(),
            "-p",
            dir.path().join("pid").to_str().unwrap(),
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || sock.exists()));
    let _trigger = UnixStream::connect(&sock).unwrap();
    let st = wait_exit(&mut act, Duration::from_secs(10))
        .expect("proxy kept running with an unknown fd");
    assert_eq!(st.code(), Some(6));
    let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap();
    assert!(log.contains("unclaimed: libvirtd.socket"), "{log}");
}

#[test]
fn notify_socket_gets_ready_after_listeners_and_stopping_on_sigterm() {
    let dir = tempdir();
    let conf = conf_for(dir.path(), "");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut p = spawn(
        &[
            "-f",
            conf.to_str().unwrap(),
            "-p",
            dir.path().join("pid").to_str().unwrap(),
        ],
        dir.path(),
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("no READY=1");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // When READY=1 arrives, the sockets already accept clients.
    assert!(UnixStream::connect(dir.path().join("s/libvirt-sock")).is_ok());
    assert!(UnixStream::connect(dir.path().join("s/libvirt-sock-ro")).is_ok());
    sigterm(p.id());
    let mut stopping = false;
    while let Ok(n) = notify.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1")
        {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
    assert!(wait_exit(&mut p, Duration::from_secs(10)).is_some_and(|s| s.success()));
    assert!(
        !dir.path().join("s/libvirt-sock").exists(),
        "own socket not unlinked"
    );
}

#[test]
fn idle_timeout_exits_only_when_no_client_is_connected() {
    let dir = tempdir();
    let conf = conf_for(dir.path(), "");
    let mut p = spawn(
        &[
            "-t",
            "2",
            "-f",
            conf.to_str().unwrap(),
            "-p",
            dir.path().join("pid").to_str().unwrap(),
        ],
        dir.path(),
        &[],
    );
    let sock = dir.path().join("s/libvirt-sock");
    assert!(wait_for(Duration::from_secs(10), || sock.exists()));
    let mut c = raw_open(&sock);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        p.try_wait().unwrap().is_none(),
        "exited while a client was connected"
    );
    assert!(lib_version_works(&mut c, 2));
    let closed_at = Instant::now();
    drop(c);
    let st = wait_exit(&mut p, Duration::from_secs(10)).expect("did not exit when idle");
    assert!(st.success(), "{st:?}");
    let idle = closed_at.elapsed();
    assert!(
        idle >= Duration::from_millis(1800),
        "exited after only {idle:?} idle"
    );
}

#[test]
fn sighup_applies_a_new_client_limit_without_dropping_clients() {
    let dir = tempdir();
    let conf = conf_for(dir.path(), "max_clients = 1");
    let (mut p, sock) = spawn_verbose(dir.path(), &conf);
    let mut a = raw_open(&sock);
    // A second client waits in the backlog while the limit is 1.
    let mut b = waiting_client(&sock, "second client served over max_clients = 1");

    conf_for(dir.path(), "max_clients = 5");
    let _ = Command::new("kill")
        .args(["-HUP", &p.id().to_string()])
        .status();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(
        support::read_frame(&mut b).is_some(),
        "second client not served after reload"
    );
    assert!(
        lib_version_works(&mut a, 3),
        "first client dropped by reload"
    );
    let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap();
    assert!(log.contains("applied max_clients 1 -> 5"), "{log}");
    sigterm(p.id());
    assert!(wait_exit(&mut p, Duration::from_secs(10)).is_some());
}

/// libvirt's `max_clients = 0` from the config file: its listeners start enabled and the limit
/// is first checked when a client is added, so exactly one client gets in.
#[test]
fn config_max_clients_zero_admits_the_first_client_only() {
    let dir = tempdir();
    let conf = conf_for(dir.path(), "max_clients = 0\nmax_anonymous_clients = 0");
    let (mut p, sock) = spawn_verbose(dir.path(), &conf);
    let mut a = raw_open(&sock);
    let _waiting = waiting_client(&sock, "second client served with max_clients = 0");
    assert!(lib_version_works(&mut a, 3), "first client not served");
    sigterm(p.id());
    assert!(wait_exit(&mut p, Duration::from_secs(10)).is_some());
}

#[test]
fn daemon_mode_writes_a_locked_pid_file_and_removes_it() {
    let dir = tempdir();
    let conf = conf_for(dir.path(), "");
    let pidf = dir.path().join("virtproxyd.pid");
    let args = [
        "-d",
        "-f",
        conf.to_str().unwrap(),
        "-p",
        pidf.to_str().unwrap(),
    ];
    let o = Command::new(BIN).args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pid: u32 = std::fs::read_to_string(&pidf)
        .unwrap()
        .parse()
        .expect("pid without newline");
    assert!(support::process_alive(pid));
    assert!(dir.path().join("s/libvirt-sock").exists());

    // A second instance with the same pid file refuses to start and leaves the file alone.
    let second_dir = tempdir();
    let conf2 = conf_for(second_dir.path(), "");
    let o = Command::new(BIN)
        .args(["-f", conf2.to_str().unwrap(), "-p", pidf.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Failed to acquire pid file"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(&pidf).unwrap(), pid.to_string());

    sigterm(pid);
    assert!(
        wait_for(Duration::from_secs(10), || !pidf.exists()),
        "pid file not removed"
    );
    assert!(wait_for(Duration::from_secs(10), || {
        !support::process_alive(pid)
    }));
}

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let dir = tempdir();
    let units = dir.path().join("units");
    let man = dir.path().join("man/man8");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(&man).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("doc/virtproxyd.8"), man.join("virtproxyd.8")).unwrap();
    let mut files = Vec::new();
    for e in std::fs::read_dir(root.join("systemd")).unwrap().flatten() {
        // ExecStart must point at an existing binary for verify.
        let text = std::fs::read_to_string(e.path())
            .unwrap()
            .replace("/usr/sbin/virtproxyd", BIN);
        let dst = units.join(e.file_name());
        std::fs::write(&dst, text).unwrap();
        files.push(dst);
    }
    assert_eq!(files.len(), 7, "service plus six sockets");
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn make_install_puts_binary_units_conf_and_man_page_in_place() {
    let dir = tempdir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let staged = dir.path().join("stage");
    // CARGO=true: the binary under test is already built; install that one.
    let o = Command::new("make")
        .current_dir(root)
        .args([
            "install",
            "CARGO=true",
            &format!("BIN={BIN}"),
            &format!("DESTDIR={}", staged.display()),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(staged.join("usr/local/sbin/virtproxyd").exists());
    for u in [
        "virtproxyd.service",
        "virtproxyd.socket",
        "virtproxyd-ro.socket",
        "virtproxyd-admin.socket",
        "virtproxyd-tcp.socket",
        "virtproxyd-tls.socket",
        "virtproxyd-metrics.socket",
    ] {
        assert!(staged.join("etc/systemd/system").join(u).exists(), "{u}");
    }
    let unit =
        std::fs::read_to_string(staged.join("etc/systemd/system/virtproxyd.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/sbin/virtproxyd $VIRTPROXYD_ARGS"),
        "{unit}"
    );
    assert!(staged.join("etc/libvirt/virtproxyd.conf").exists());
    assert!(staged
        .join("usr/local/share/man/man8/virtproxyd.8")
        .exists());
    // A second install keeps the operator's edited configuration.
    std::fs::write(
        staged.join("etc/libvirt/virtproxyd.conf"),
        "max_clients = 7\n",
    )
    .unwrap();
    let o = Command::new("make")
        .current_dir(root)
        .args([
            "install",
            "CARGO=true",
            &format!("BIN={BIN}"),
            &format!("DESTDIR={}", staged.display()),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(
        std::fs::read_to_string(staged.join("etc/libvirt/virtproxyd.conf")).unwrap(),
        "max_clients = 7\n"
    );
}

#[test]
fn service_reads_debian_and_fedora_environment_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/virtproxyd.service")).unwrap();
    let files: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EnvironmentFile="))
        .collect();
    // "-": a missing file is not an error, as in libvirt's units.
    assert_eq!(
        files,
        ["-/etc/default/virtproxyd", "-/etc/sysconfig/virtproxyd"],
        "{unit}"
    );
}

/// `make install` onto a host (no DESTDIR) with files under `dir`, the modular-daemon check
/// looking at `probe_root`.
fn make_install_into(dir: &Path, probe_root: &Path, extra: &[&str]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = vec![
        "install".to_string(),
        "CARGO=true".into(),
        format!("BIN={BIN}"),
        format!("PREFIX={}", dir.join("usr").display()),
        format!("UNITDIR={}", dir.join("units").display()),
        format!("SYSCONFDIR={}", dir.join("etc").display()),
        format!("MODULAR_ROOT={}", probe_root.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new("make")
        .current_dir(root)
        .args(&args)
        .output()
        .unwrap()
}

#[test]
fn make_install_refuses_a_host_without_modular_daemons() {
    let dir = tempdir();
    let bare = dir.path().join("bare-root");
    std::fs::create_dir_all(bare.join("usr/sbin")).unwrap();
    std::fs::write(bare.join("usr/sbin/libvirtd"), "").unwrap();
    let target = dir.path().join("t1");
    let o = make_install_into(&target, &bare, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "installed without modular daemons");
    assert!(
        err.contains("none of libvirt's modular driver daemons")
            && err.contains("FORCE_NO_MODULAR=1"),
        "{err}"
    );
    assert!(!target.exists(), "files were installed before the refusal");

    // The explicit opt-in installs anyway.
    let target = dir.path().join("t2");
    let o = make_install_into(&target, &bare, &["FORCE_NO_MODULAR=1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(target.join("usr/sbin/virtproxyd").exists());
    assert!(target.join("units/virtproxyd.service").exists());

    // A host with a driver daemon's socket unit (or binary) is what the install is for.
    for marker in [
        "usr/lib/systemd/system/virtqemud.socket",
        "usr/sbin/virtnetworkd",
    ] {
        let modular = dir
            .path()
            .join(format!("root-{}", marker.replace('/', "_")));
        let m = modular.join(marker);
        std::fs::create_dir_all(m.parent().unwrap()).unwrap();
        std::fs::write(&m, "").unwrap();
        let target = dir.path().join(format!("t-{}", marker.replace('/', "_")));
        let o = make_install_into(&target, &modular, &[]);
        assert!(
            o.status.success(),
            "{marker}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(target.join("usr/sbin/virtproxyd").exists(), "{marker}");
    }
}
