//! Restart without dropping a client (`handover`): SIGUSR2 re-executes the proxy in place
//! and every relayed connection goes on — calls, events registered before, a volume
//! download in flight — through the modular test bed's real daemons, on both io backends.

#[macro_use]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::modular::{daemons_shared, proxy};
use support::*;

/// Lines of the proxy's log that say a hand-over happened, and how many it carried.
fn carried_count(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .filter(|l| l.contains("taking over from the previous process"))
        .filter_map(|l| {
            let at = l.find("conns=")? + "conns=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .next()
}

/// Starts a workload script and waits until it wrote `ready`.
fn start_until_ready(
    mut cmd: Command,
    ready: &Path,
    p: &support::Proxy,
    what: &str,
) -> std::process::Child {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || ready.exists()),
        "{what} never got ready; proxy log:\n{}",
        p.log_text()
    );
    child
}

/// Whether the proxy logs, within 15 s, that it refused a SIGUSR2 restart and serves on.
fn refused(p: &support::Proxy) -> bool {
    wait_for(Duration::from_secs(15), || {
        p.log_text().contains("not restarting on SIGUSR2")
    })
}

/// SIGUSR2, then waits until the new process says it took over.
fn restart(p: &support::Proxy, backend: &str) {
    p.signal("USR2");
    assert!(
        wait_for(Duration::from_secs(20), || carried_count(&p.log_text())
            .is_some()),
        "{backend}: no hand-over within 20 s; log:\n{}",
        p.log_text()
    );
}

/// SIGUSR2 while a workload runs: same PID, every connection carried (none re-opened), every
/// call answered, the download's sha256 right, and events registered before still arrive.
fn sigusr2_keeps_every_connection(backend: &str) {
    let _shared = daemons_shared();
    let mut p = proxy("", &[("VIRTPROXYD_IO_BACKEND", backend)]);
    workload_across_sigusr2(&mut p, backend, || {});
}

/// A package upgrade without systemd: the proxy runs the previous commit's binary, the new
/// one is put at its path, and SIGUSR2 carries every connection of the workload into it.
/// (Should the two ever write different hand-over formats, the old one must refuse and
/// serve on, which is asserted instead.)
fn upgrading_from_the_previous_commits_binary_keeps_every_connection(backend: &str) {
    let _shared = daemons_shared();
    let built = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/previous-binary.sh"
        ))
        .output()
        .unwrap();
    assert_success(&built, "scripts/previous-binary.sh");
    let previous = std::path::PathBuf::from(stdout(&built).trim());
    let current = Path::new(env!("CARGO_BIN_EXE_virtproxyd"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("virtproxyd");
    std::fs::copy(&previous, &exe).unwrap();
    let check = |bin: &Path| stdout(&Command::new(bin).arg("--handover-check").output().unwrap());
    let same_format = check(&previous) == check(current);
    let mut p =
        support::modular::proxy_with_binary(&exe, "", &[("VIRTPROXYD_IO_BACKEND", backend)]);
    let install = || {
        // As a package manager does: a new file renamed over the old path.
        let staged = dir.path().join("virtproxyd.new");
        std::fs::copy(current, &staged).unwrap();
        std::fs::rename(&staged, &exe).unwrap();
    };
    if !same_format {
        install();
        p.signal("USR2");
        assert!(
            refused(&p),
            "{backend}: formats differ ({:?} against {:?}) and no refusal was logged:\n{}",
            check(&previous),
            check(current),
            p.log_text()
        );
        assert_success(&virsh(&p.uri("qemu:///system"), &["version"]), "serving on");
        return;
    }
    workload_across_sigusr2(&mut p, backend, install);
    // The process now runs the new binary.
    let running = std::fs::read(format!("/proc/{}/exe", p.pid())).unwrap();
    assert!(
        running == std::fs::read(current).unwrap(),
        "{backend}: after the upgrade the proxy does not run this tree's binary"
    );
    assert!(
        running != std::fs::read(&previous).unwrap(),
        "{backend}: the previous commit's binary is this one: nothing was upgraded"
    );
}

/// Runs restart_workload.py through `p`, calls `before_signal`, restarts with SIGUSR2 and
/// checks that every connection went on in the same process.
fn workload_across_sigusr2(p: &mut support::Proxy, backend: &str, before_signal: impl FnOnce()) {
    let pid = p.pid();
    let pools = pool_dir();
    let flags = tempfile::tempdir().unwrap();
    let (ready, restarted) = (flags.path().join("ready"), flags.path().join("restarted"));
    let workload = py_command(
        "restart_workload.py",
        &[
            &p.uri("qemu:///system"),
            &pools.path().display().to_string(),
            "64",
            &ready.display().to_string(),
            &restarted.display().to_string(),
        ],
    );
    let child = start_until_ready(workload, &ready, p, backend);
    before_signal();
    let t = Instant::now();
    restart(p, backend);
    let took = t.elapsed();
    std::fs::write(&restarted, "yes").unwrap();
    let out = child.wait_with_output().unwrap();
    let log = p.log_text();
    assert_success(
        &out,
        &format!("{backend}: the workload across SIGUSR2 (proxy log:\n{log})"),
    );
    // The busy four, the event watcher, the downloader and the uploader, at least.
    let carried = carried_count(&log).unwrap_or(0);
    assert!(
        carried >= 7,
        "{backend}: {carried} connections carried\n{log}"
    );
    assert!(p.running(), "{backend}: the proxy is gone");
    assert_eq!(p.pid(), pid);
    assert!(
        !log.contains("connection closed: restart"),
        "{backend}: a connection was closed by the restart:\n{log}"
    );
    // The new process serves new clients too.
    let v = virsh(&p.uri("qemu:///system"), &["version"]);
    assert_success(&v, &format!("{backend}: virsh version after the restart"));
    eprintln!(
        "{backend}: {carried} connections carried, hand-over seen in the log after {took:?}; {}",
        stdout(&out).trim()
    );
}

/// The time the old process took to quiesce, from its log.
fn quiesce_ms(log: &str) -> Option<u64> {
    let l = log
        .lines()
        .rev()
        .find(|l| l.contains("connections ready to hand over"))?;
    let at = l.find("quiesce_ms=")? + "quiesce_ms=".len();
    l[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A client connected but silent before its open (a raw socket that sent nothing) does not
/// hold the restart up to the grace period, and is served by the next process: its open
/// and a call after it work.
fn a_client_that_sent_nothing_is_carried_too(backend: &str) {
    let _shared = daemons_shared();
    let p = proxy("", &[("VIRTPROXYD_IO_BACKEND", backend)]);
    let mut silent = std::os::unix::net::UnixStream::connect(&p.rw_sock).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Let the worker adopt it.
    std::thread::sleep(Duration::from_millis(100));
    restart(&p, backend);
    let log = p.log_text();
    let ms = quiesce_ms(&log).unwrap_or(u64::MAX);
    assert!(ms < 1000, "{backend}: the quiesce took {ms} ms:\n{log}");
    assert_eq!(carried_count(&log), Some(1), "{backend}:\n{log}");
    // CONNECT_OPEN("qemu:///system", 0), then CONNECT_GET_LIB_VERSION (157).
    let uri = "qemu:///system";
    let mut body = vec![0, 0, 0, 1];
    body.extend((uri.len() as u32).to_be_bytes());
    body.extend(uri.as_bytes());
    body.resize(body.len().div_ceil(4) * 4, 0);
    body.extend([0, 0, 0, 0]);
    use std::io::Write;
    silent.write_all(&frame(1, 0, 1, &body)).unwrap();
    let r = read_frame(&mut silent).expect("open reply");
    assert_eq!(&r[24..28], &[0, 0, 0, 0], "{backend}: the open failed");
    silent.write_all(&frame(157, 0, 2, &[])).unwrap();
    let r = read_frame(&mut silent).expect("version reply");
    assert_eq!(&r[24..28], &[0, 0, 0, 0], "{backend}: the call failed");
}

/// A guest started with VIR_DOMAIN_START_AUTODESTROY on a proxied connection (virtqemud, a
/// disk-less TCG guest) survives SIGUSR2 — libvirt's virtproxyd would have killed it — an fd
/// passed on that connection right after the restart reaches the daemon, and the guest still
/// goes when the connection closes.
fn an_autodestroy_guest_survives_the_restart(backend: &str) {
    let _shared = daemons_shared();
    let p = proxy("", &[("VIRTPROXYD_IO_BACKEND", backend)]);
    let tb = support::modular::testbed();
    let flags = tempfile::tempdir().unwrap();
    let (ready, restarted) = (flags.path().join("ready"), flags.path().join("restarted"));
    let script = py_command(
        "restart_autodestroy.py",
        &[
            &p.uri("qemu:///system"),
            &tb.direct_uri("qemu:///system", "virtqemud"),
            &tb.pid("virtqemud").to_string(),
            &ready.display().to_string(),
            &restarted.display().to_string(),
        ],
    );
    let child = start_until_ready(script, &ready, &p, backend);
    restart(&p, backend);
    std::fs::write(&restarted, "yes").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_success(
        &out,
        &format!(
            "{backend}: AUTODESTROY across SIGUSR2 (log:\n{})",
            p.log_text()
        ),
    );
}

/// A binary that cannot take over (here: one that exits at once) is asked first and the
/// running proxy goes on serving, its connections untouched.
fn a_binary_that_cannot_start_leaves_the_old_one_serving(backend: &str) {
    let _shared = daemons_shared();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("virtproxyd");
    std::fs::copy(env!("CARGO_BIN_EXE_virtproxyd"), &exe).unwrap();
    let mut p =
        support::modular::proxy_with_binary(&exe, "", &[("VIRTPROXYD_IO_BACKEND", backend)]);
    let uri = p.uri("qemu:///system");
    // A connection open across the failed restart.
    let (mut held, line) = Held::start(
        "import libvirt,sys,time\n\
         c=libvirt.open(sys.argv[1])\n\
         print('open',flush=True)\n\
         sys.stdin.readline()\n\
         print(c.getLibVersion(),flush=True)\n",
        &[&uri],
    );
    assert_eq!(line.trim(), "open");
    // The "upgrade": a binary that exits at once.
    std::fs::remove_file(&exe).unwrap();
    std::fs::write(&exe, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    p.signal("USR2");
    assert!(
        refused(&p),
        "{backend}: no refusal logged:\n{}",
        p.log_text()
    );
    let line = held.next();
    assert!(
        line.trim().parse::<u64>().is_ok_and(|v| v > 0),
        "{backend}: the held connection failed after the refused restart: {line:?}\n{}",
        p.log_text()
    );
    assert!(held.finish());
    assert!(p.running());
    let v = virsh(&uri, &["version"]);
    assert_success(
        &v,
        &format!("{backend}: virsh version after the refused restart"),
    );
}

/// A state this build cannot read (another format's version, as systemd's fd store could
/// hold after a downgrade): the connections it carried are closed — their clients see EOF —
/// with the reason in the log, and the process serves new clients as usual.
fn a_state_of_an_unknown_format_closes_its_connections_and_serves_the_rest(backend: &str) {
    use std::io::Read;
    use std::os::fd::{AsFd, AsRawFd};
    use virtproxyd::handover::{state, transfer, ConnRecord, State};
    let _shared = daemons_shared();
    let (mut client, carried) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut bytes = state::encode(&State {
        producer: "a later virtproxyd-rs".into(),
        next_id: 10,
        listeners: Vec::new(),
        conns: vec![ConnRecord {
            id: 5,
            kind: virtproxyd::listen::ListenerKind::UnixRw,
            timestamp: 0,
            age_ms: 0,
            identity: Default::default(),
            peer_addr: None,
            claimed: None,
            opened_readonly: false,
            uri: None,
            daemon_path: None,
            client_done: false,
            daemon_done: false,
            daemon_shut: false,
            ktls: false,
            fresh: true,
        }],
        inherited: Vec::new(),
    });
    bytes[11] = 9; // the version word's low byte: format 9
    let out = transfer::pack(&bytes, &[carried.as_fd()]).unwrap();
    drop(carried);
    // The two fds reach the proxy as systemd passes a hand-over: activation fds 3 and 4 by
    // name. They are inheritable only while the wrapper is spawned.
    let (st, q) = (out.state.as_raw_fd(), out.fds.as_raw_fd());
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("virtproxyd");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\n\
             exec 100<&{st} 101<&{q}\n\
             exec {st}<&- {q}<&-\n\
             exec 3<&100 4<&101 100<&- 101<&-\n\
             LISTEN_PID=$$ LISTEN_FDS=2 \
             LISTEN_FDNAMES=virtproxyd-handover-state:virtproxyd-handover-fds \
             exec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_virtproxyd")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let inheritable = |on: bool| {
        for fd in [st, q] {
            // SAFETY: fcntl on descriptors this test owns.
            unsafe { libc::fcntl(fd, libc::F_SETFD, if on { 0 } else { libc::FD_CLOEXEC }) };
        }
    };
    inheritable(true);
    let p = std::panic::catch_unwind(|| {
        support::modular::proxy_with_binary(&wrapper, "", &[("VIRTPROXYD_IO_BACKEND", backend)])
    });
    inheritable(false);
    let p = p.unwrap_or_else(|e| std::panic::resume_unwind(e));
    drop(out);
    assert!(
        wait_for(Duration::from_secs(10), || p
            .log_text()
            .contains("cannot take the previous process's connections over")),
        "{backend}: no reason logged:\n{}",
        p.log_text()
    );
    assert!(
        p.log_text().contains("format 9 is not known here"),
        "{backend}: the reason does not name the format:\n{}",
        p.log_text()
    );
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        client.read(&mut buf).unwrap(),
        0,
        "{backend}: the carried client did not see EOF"
    );
    assert_success(
        &virsh(&p.uri("qemu:///system"), &["version"]),
        &format!("{backend}: virsh after an unreadable hand-over"),
    );
}

on_both_backends!(
    sigusr2_keeps_every_connection,
    a_state_of_an_unknown_format_closes_its_connections_and_serves_the_rest,
    upgrading_from_the_previous_commits_binary_keeps_every_connection,
    a_client_that_sent_nothing_is_carried_too,
    an_autodestroy_guest_survives_the_restart,
    a_binary_that_cannot_start_leaves_the_old_one_serving,
);
