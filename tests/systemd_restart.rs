//! `systemctl restart virtproxyd.service` keeps every client: a real systemd 252 (booted in
//! private namespaces by scripts/systemd-box.sh) runs the project's own units, the proxy
//! hands its connections over through the fd store, and the clients of the activated
//! `libvirt-sock` and TCP socket go on — calls, events, a 1 GiB download and upload in
//! flight, a guest started with AUTODESTROY, an fd passed right after, a go-libvirt client
//! pipelining calls. `reload` keeps the
//! process; `stop` then `start` still closes the clients, as the fd store is emptied then,
//! and leaves no process; `--timeout` ends an idle service, which the next client starts.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::modular::{daemons_shared, testbed};
use support::pki::{client_dir, Ca};
use support::*;

const BOX_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/systemd-box.sh");

/// A systemd box with the project's units and binary installed; killed on drop.
struct SystemdBox {
    dir: tempfile::TempDir,
    pid: u32,
    tcp_port: u16,
    tls_port: u16,
}

impl SystemdBox {
    fn boot(bind: &[&Path]) -> SystemdBox {
        let dir = tempfile::Builder::new()
            .prefix("vpd-box-")
            .tempdir()
            .unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(BOX_SCRIPT).arg("start").arg(dir.path()).args(bind);
        let out = output_with_timeout(&mut cmd, Duration::from_secs(60));
        assert_success(&out, "systemd-box.sh start");
        let pid = stdout(&out).trim().parse().expect("box pid");
        SystemdBox {
            dir,
            pid,
            tcp_port: free_port(),
            tls_port: free_port(),
        }
    }

    fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid))
    }

    fn systemctl(&self, args: &[&str]) -> Output {
        let pid = self.pid.to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &pid, "-m", "-p", "-r", "-w", "systemctl"])
            .args(args);
        output_with_timeout(&mut cmd, Duration::from_secs(60))
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        stdout(&self.systemctl(&["show", "-p", prop, "--value", unit]))
            .trim()
            .to_string()
    }

    /// The binary, the shipped units (each made independent of the boot's early units, the
    /// TCP and TLS sockets on free ports), a server certificate and a config routing to the
    /// test bed's daemons. Returns the pkipath of a client certificate the server trusts.
    fn install(&self, driver_socket_dir: &Path) -> PathBuf {
        let root = self.root();
        let put = |path: &str, text: &str| self.put(path, text);
        std::fs::copy(
            env!("CARGO_BIN_EXE_virtproxyd"),
            root.join("usr/sbin/virtproxyd"),
        )
        .unwrap();
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        for e in std::fs::read_dir(&units).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(e.path()).unwrap();
            put(&format!("/etc/systemd/system/{name}"), &text);
            put(
                &format!("/etc/systemd/system/{name}.d/box.conf"),
                "[Unit]\nDefaultDependencies=no\n",
            );
        }
        put(
            "/etc/systemd/system/virtproxyd-tcp.socket.d/port.conf",
            &format!(
                "[Socket]\nListenStream=\nListenStream=127.0.0.1:{}\n",
                self.tcp_port
            ),
        );
        put(
            "/etc/systemd/system/virtproxyd-tls.socket.d/port.conf",
            &format!(
                "[Socket]\nListenStream=\nListenStream=127.0.0.1:{}\n",
                self.tls_port
            ),
        );
        let ca = Ca::new("Box CA");
        let (cert, key) = ca.server(false);
        put("/etc/pki/virtproxyd-box/ca.pem", &ca.cert_pem);
        put("/etc/pki/virtproxyd-box/server.pem", &cert);
        put("/etc/pki/virtproxyd-box/server.key", &key);
        put(
            "/etc/libvirt/virtproxyd.conf",
            &format!(
                "auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nauth_tcp = \"none\"\n\
                 driver_socket_dir = \"{}\"\nlog_level = 2\n\
                 log_outputs = \"2:file:/run/virtproxyd.log\"\n\
                 ca_file = \"/etc/pki/virtproxyd-box/ca.pem\"\n\
                 cert_file = \"/etc/pki/virtproxyd-box/server.pem\"\n\
                 key_file = \"/etc/pki/virtproxyd-box/server.key\"\n",
                driver_socket_dir.display()
            ),
        );
        assert_success(&self.systemctl(&["daemon-reload"]), "daemon-reload");
        assert_success(
            &self.systemctl(&[
                "start",
                "virtproxyd.socket",
                "virtproxyd-ro.socket",
                "virtproxyd-admin.socket",
                "virtproxyd-tcp.socket",
            ]),
            "start the sockets",
        );
        client_dir(self.dir.path(), "client", &ca, &ca.client("client1", 1001))
    }

    /// Writes a file inside the box.
    fn put(&self, path: &str, text: &str) {
        let p = self.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    }

    /// Pids of the box's processes called `name`.
    fn processes_named(&self, name: &str) -> Vec<String> {
        let pid = self.pid.to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &pid, "-m", "-p", "-r", "-w", "pgrep", "-x", name]);
        stdout(&output_with_timeout(&mut cmd, Duration::from_secs(10)))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("run/virtproxyd.log")).unwrap_or_default()
    }

    fn unix_uri(&self) -> String {
        unix_uri(
            "qemu:///system",
            &self.root().join("run/libvirt/libvirt-sock"),
        )
    }

    fn tcp_uri(&self) -> String {
        format!("qemu+tcp://127.0.0.1:{}/system", self.tcp_port)
    }
}

impl Drop for SystemdBox {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(BOX_SCRIPT)
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Runs restart_workload.py against `uri`; returns the child and its two flag files.
fn workload(
    uri: &str,
    pools: &Path,
    flags: &Path,
    tag: &str,
    size_mib: &str,
) -> (std::process::Child, PathBuf, PathBuf) {
    let (ready, restarted) = (
        flags.join(format!("{tag}-ready")),
        flags.join(format!("{tag}-restarted")),
    );
    let child = py_command(
        "restart_workload.py",
        &[
            uri,
            &pools.join(tag).display().to_string(),
            size_mib,
            &ready.display().to_string(),
            &restarted.display().to_string(),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    (child, ready, restarted)
}

#[test]
fn systemctl_restart_keeps_unix_and_tcp_clients_and_stop_closes_them() {
    let _shared = daemons_shared();
    let tb = testbed();
    let b = SystemdBox::boot(&[&tb.sock_dir]);
    let pki = b.install(&tb.sock_dir);
    // The first client activates the service.
    assert_success(
        &virsh(&b.unix_uri(), &["version"]),
        "virsh through the activated socket",
    );
    let first_pid = b.show("virtproxyd.service", "MainPID");
    assert_ne!(first_pid, "0", "virtproxyd.service is not running");

    let pools = pool_dir();
    let flags = tempfile::tempdir().unwrap();
    // Started one after the other, each once the previous is ready: the 1 GiB workload takes
    // a while to upload its volume, and the others' slow transfers must still run at the
    // restart.
    let ready_or_fail = |mut child: std::process::Child, ready: &Path| {
        if !wait_for(Duration::from_secs(120), || ready.exists()) {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = std::io::Read::read_to_string(e, &mut err);
            }
            panic!(
                "{} never got ready: {err}\nlog:\n{}",
                ready.display(),
                b.log()
            );
        }
        child
    };
    let (unix_child, unix_ready, unix_restarted) =
        workload(&b.unix_uri(), pools.path(), flags.path(), "unix", "1024");
    let unix_child = ready_or_fail(unix_child, &unix_ready);
    // A guest started with AUTODESTROY on a connection through the activated socket: it must
    // outlive the restart, and an fd passed on that connection right after it must arrive.
    let (guard_ready, guard_restarted) = (
        flags.path().join("autodestroy-ready"),
        flags.path().join("autodestroy-restarted"),
    );
    let guard = py_command(
        "restart_autodestroy.py",
        &[
            &b.unix_uri(),
            &tb.direct_uri("qemu:///system", "virtqemud"),
            &tb.pid("virtqemud").to_string(),
            &guard_ready.display().to_string(),
            &guard_restarted.display().to_string(),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let guard = ready_or_fail(guard, &guard_ready);
    let (tcp_child, tcp_ready, tcp_restarted) =
        workload(&b.tcp_uri(), pools.path(), flags.path(), "tcp", "32");
    let tcp_child = ready_or_fail(tcp_child, &tcp_ready);
    // go-libvirt (its own RPC implementation) pipelining calls from 8 goroutines on one
    // connection through libvirt-sock, with a domain event callback registered before.
    let (go_ready, go_restarted) = (
        flags.path().join("go-ready"),
        flags.path().join("go-restarted"),
    );
    let go = Command::new(golibvirt_bin())
        .arg("-socket")
        .arg(b.root().join("run/libvirt/libvirt-sock"))
        .arg("-across")
        .arg(format!("{},{}", go_ready.display(), go_restarted.display()))
        .args(["-timeout", "120s"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let go = ready_or_fail(go, &go_ready);
    // A read-only client of the activated libvirt-sock-ro, open across the restart: it still
    // reads afterwards, and a write is still refused.
    let ro_uri = unix_uri(
        "qemu:///system",
        &b.root().join("run/libvirt/libvirt-sock-ro"),
    );
    let (mut ro, line) = Held::start(
        "import libvirt,sys\n\
         libvirt.registerErrorHandler(lambda *a: None, None)\n\
         c=libvirt.openReadOnly(sys.argv[1])\n\
         print(c.getLibVersion(),flush=True)\n\
         sys.stdin.readline()\n\
         v=c.getLibVersion()\n\
         try:\n    c.defineXML('<domain/>'); print('write allowed')\n\
         except libvirt.libvirtError as e:\n    print('refused', e.get_error_code(), v)\n",
        &[&ro_uri],
    );
    assert!(line.trim().parse::<u64>().is_ok(), "ro client: {line:?}");
    let t = std::time::Instant::now();
    assert_success(
        &b.systemctl(&["restart", "virtproxyd.service"]),
        "systemctl restart virtproxyd.service",
    );
    let restart_took = t.elapsed();
    let second_pid = b.show("virtproxyd.service", "MainPID");
    assert_ne!(second_pid, first_pid, "no new process");
    assert!(
        wait_for(Duration::from_secs(10), || b
            .log()
            .contains("taking over from the previous process")),
        "the new process took nothing over; log:\n{}",
        b.log()
    );
    for f in [
        &unix_restarted,
        &tcp_restarted,
        &guard_restarted,
        &go_restarted,
    ] {
        std::fs::write(f, "yes").unwrap();
    }
    let line = ro.next();
    // VIR_ERR_OPERATION_DENIED (29): still a read-only connection.
    assert!(
        line.starts_with("refused 29 "),
        "ro client after the restart: {line:?}; log:\n{}",
        b.log()
    );
    assert!(ro.finish());
    for (what, child) in [("unix", unix_child), ("tcp", tcp_child)] {
        let out = child.wait_with_output().unwrap();
        assert_success(
            &out,
            &format!(
                "the {what} workload across systemctl restart (log:\n{})",
                b.log()
            ),
        );
        eprintln!("{what}: {}", stdout(&out).trim());
    }
    let go = go.wait_with_output().unwrap();
    assert_success(&go, "go-libvirt pipelining across systemctl restart");
    let v: serde_json::Value = serde_json::from_str(stdout(&go).trim()).unwrap();
    let (before, after) = (
        v["pipelined_ok"].as_u64().unwrap_or(0),
        v["pipelined_after_restart"].as_u64().unwrap_or(0),
    );
    assert!(
        v["ok"] == true
            && before > 0
            && after > 0
            && v["events"].as_array().map(Vec::len) == Some(2),
        "go-libvirt across the restart: {v}"
    );
    eprintln!(
        "go-libvirt: {before} pipelined calls before the restart, {after} after; events {}",
        v["events"]
    );
    assert_success(
        &guard.wait_with_output().unwrap(),
        &format!(
            "the AUTODESTROY guest and the fd passed across systemctl restart (log:\n{})",
            b.log()
        ),
    );
    let log = b.log();
    assert!(
        !log.contains("connection closed: restart"),
        "a client was closed:\n{log}"
    );
    assert_eq!(
        b.show("virtproxyd.service", "NFileDescriptorStore"),
        "0",
        "the new process left its hand-over in the store"
    );
    eprintln!("systemctl restart took {restart_took:?}");

    // reload (ExecReload: SIGHUP): the same process re-reads its configuration.
    assert_success(
        &b.systemctl(&["reload", "virtproxyd.service"]),
        "systemctl reload",
    );
    assert!(
        wait_for(Duration::from_secs(10), || b
            .log()
            .contains("Reloading configuration on SIGHUP")),
        "no reload in the log:\n{}",
        b.log()
    );
    assert_eq!(b.show("virtproxyd.service", "MainPID"), second_pid);

    // stop, then start: the store is emptied; a held client sees its connection end.
    let (mut held, line) = Held::start(
        "import libvirt,sys\n\
         libvirt.registerErrorHandler(lambda *a: None, None)\n\
         c=libvirt.open(sys.argv[1])\n\
         print('open',flush=True)\n\
         sys.stdin.readline()\n\
         try:\n    c.getLibVersion(); print('alive')\n\
         except libvirt.libvirtError: print('closed')\n",
        &[&b.unix_uri()],
    );
    assert_eq!(line.trim(), "open");
    assert_success(
        &b.systemctl(&["stop", "virtproxyd.service"]),
        "systemctl stop",
    );
    assert_eq!(b.show("virtproxyd.service", "NFileDescriptorStore"), "0");
    let line = held.next();
    assert_eq!(line.trim(), "closed", "a client survived systemctl stop");
    held.finish();
    // `systemctl start virtproxyd-tls.socket`, as the man page says for TLS: the next
    // activation passes it to the service, and a client with a certificate gets in.
    assert_success(
        &b.systemctl(&["start", "virtproxyd-tls.socket"]),
        "systemctl start virtproxyd-tls.socket",
    );
    // Nothing left behind: no process of the service in the box.
    assert_eq!(b.show("virtproxyd.service", "MainPID"), "0");
    assert_eq!(b.show("virtproxyd.service", "ActiveState"), "inactive");
    assert!(
        b.processes_named("virtproxyd").is_empty(),
        "virtproxyd processes left after stop: {:?}",
        b.processes_named("virtproxyd")
    );
    let tls_uri = format!(
        "qemu+tls://localhost:{}/system?pkipath={}",
        b.tls_port,
        pki.display()
    );
    assert_success(
        &virsh(&tls_uri, &["version"]),
        "virsh over the activated TLS socket after stop",
    );
    assert!(
        b.log().contains("name=virtproxyd-tls.socket kind=Tls"),
        "the TLS socket was not passed to the service:\n{}",
        b.log()
    );
    assert_success(
        &virsh(&b.unix_uri(), &["version"]),
        "virsh after stop and a new activation",
    );

    // Idle exit (--timeout, from the unit's $VIRTPROXYD_ARGS, here set in
    // /etc/sysconfig/virtproxyd as on Fedora): with no client the service ends by itself,
    // and the next client activates it again.
    b.put(
        "/etc/sysconfig/virtproxyd",
        "VIRTPROXYD_ARGS=\"--timeout 3\"\n",
    );
    assert_success(
        &b.systemctl(&["restart", "virtproxyd.service"]),
        "restart with --timeout 3",
    );
    let idle_pid = b.show("virtproxyd.service", "MainPID");
    assert_ne!(idle_pid, "0");
    assert!(
        wait_for(Duration::from_secs(20), || b
            .show("virtproxyd.service", "ActiveState")
            == "inactive"),
        "the service did not exit when idle; log:\n{}",
        b.log()
    );
    assert!(b.log().contains("no client for the idle timeout; exiting"));
    assert_success(
        &virsh(&b.unix_uri(), &["version"]),
        "virsh after the idle exit",
    );
    let again = b.show("virtproxyd.service", "MainPID");
    assert!(
        again != "0" && again != idle_pid,
        "not activated again: {again}"
    );
}
