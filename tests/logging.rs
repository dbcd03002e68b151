//! libvirt's logging controls: `log_filters`, `log_outputs`, `LIBVIRT_*`, malformed values
//! refused at start-up, a `file:` output, and journald's native protocol with real PRIORITY
//! values (read from a datagram socket the test owns, bound over journald's path inside a
//! private mount namespace).

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::modular::proxy;
use support::*;

fn start_fails(conf: &str, envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("virtproxyd.conf");
    std::fs::write(
        &path,
        format!("unix_sock_dir = \"{}\"\n{conf}\n", dir.path().display()),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtproxyd"));
    cmd.arg("-f")
        .arg(&path)
        .arg("-p")
        .arg(dir.path().join("pid"))
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let o = output_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(!o.status.success(), "started with {conf} {envs:?}");
    assert!(
        !dir.path().join("libvirt-sock").exists(),
        "a listener was created before the failure"
    );
    stderr(&o)
}

#[test]
fn malformed_logging_settings_stop_start_up_with_key_and_reason() {
    let e = start_fails("log_outputs = \"9:bogus\"", &[]);
    assert!(
        e.contains("log_outputs: Invalid log priority '9' for log output '9:bogus'"),
        "{e}"
    );
    let e = start_fails("log_outputs = \"1:journald:x\"", &[]);
    assert!(e.contains("does not meet the format requirements"), "{e}");
    let e = start_fails("log_filters = \"x\"", &[]);
    assert!(
        e.contains("log_filters: Malformed format for filter 'x'"),
        "{e}"
    );
    let e = start_fails("", &[("LIBVIRT_DEBUG", "loud")]);
    assert!(
        e.contains("LIBVIRT_DEBUG: Failed to set logging priority"),
        "{e}"
    );
    let e = start_fails("", &[("LIBVIRT_LOG_OUTPUTS", "1:nowhere")]);
    assert!(
        e.contains("LIBVIRT_LOG_OUTPUTS: Invalid log destination"),
        "{e}"
    );
}

/// `1:remote` lets the pre-open machine's debug lines through to a `file:` output while every
/// other module stays at the default (info here: the harness passes `-v`).
#[test]
fn filters_select_modules_and_a_file_output_gets_their_debug_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vpd.log");
    let p = proxy(
        &format!(
            "log_filters = \"1:remote\"\nlog_outputs = \"1:file:{}\"",
            file.display()
        ),
        &[],
    );
    let o = virsh(&p.uri("bogus:///system"), &["list"]);
    assert!(!o.status.success());
    let ok = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains("pre-open call refused")
    });
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(ok, "no debug line from the handshake in {text}");
    for line in text.lines() {
        // `<timestamp>: <tid>: <priority> : <source>:<line> : <message>`
        let fields: Vec<&str> = line.splitn(5, ": ").collect();
        assert_eq!(fields.len(), 5, "not libvirt's line format: {line}");
        if fields[2].trim() == "debug" {
            assert!(
                fields[3].starts_with("virtproxyd::handshake")
                    || fields[3].starts_with("virtproxyd::route")
                    || fields[3].starts_with("virtproxyd::identity"),
                "a module outside the filter logged at debug: {line}"
            );
        }
    }
    assert!(
        text.contains(": info : "),
        "the default level's lines are missing: {text}"
    );
}

#[test]
fn environment_overrides_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("env.log");
    let out = format!("2:file:{}", file.display());
    let p = proxy(
        "log_outputs = \"4:stderr\"",
        &[("LIBVIRT_LOG_OUTPUTS", &out), ("LIBVIRT_DEBUG", "info")],
    );
    assert!(virsh(&p.uri("qemu:///system"), &["version"])
        .status
        .success());
    let ok = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains("handed to the relay")
    });
    assert!(ok, "{}", std::fs::read_to_string(&file).unwrap_or_default());
}

/// One journald datagram (native protocol: `KEY=value` lines, or a length-prefixed value).
fn journal_fields(d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = d;
    while !rest.is_empty() {
        let nl = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            rest = rest.get(nl + 1..).unwrap_or_default();
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let len_at = nl + 1;
            let len = u64::from_le_bytes(rest[len_at..len_at + 8].try_into().unwrap()) as usize;
            let v = &rest[len_at + 8..len_at + 8 + len];
            out.push((key, String::from_utf8_lossy(v).into_owned()));
            rest = rest.get(len_at + 8 + len + 1..).unwrap_or_default();
        }
    }
    out
}

/// Without `log_outputs`, a daemon whose stdin is not a terminal logs to journald when its
/// socket is writable (libvirt's default output), at info even with debug on, with
/// PRIORITY per level and libvirt's fields.
#[test]
fn default_output_is_journald_with_real_priorities() {
    let tb = support::modular::testbed();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("journal.sock");
    let journal = UnixDatagram::bind(&sock_path).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let conf = dir.path().join("virtproxyd.conf");
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        &conf,
        format!(
            "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0777\"\ndriver_socket_dir = \"{}\"\n",
            run.display(),
            tb.sock_dir.display()
        ),
    )
    .unwrap();
    // A private /run/systemd/journal whose socket is the test's.
    let script = format!(
        "set -e; mount -t tmpfs vpd-journal /run/systemd 2>/dev/null || \
         {{ mkdir -p /run/systemd && mount -t tmpfs vpd-journal /run/systemd; }}; \
         mkdir -p /run/systemd/journal; touch /run/systemd/journal/socket; \
         mount --bind {} /run/systemd/journal/socket; exec {} -v -f {} -p {}",
        sock_path.display(),
        env!("CARGO_BIN_EXE_virtproxyd"),
        conf.display(),
        dir.path().join("pid").display()
    );
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = run.join("libvirt-sock");
    let up = wait_for(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    assert!(up, "proxy did not start");
    let uri = unix_uri("qemu:///system", &sock);
    assert!(virsh(&uri, &["version"]).status.success());
    // An error-level line: a reload of a config that no longer parses.
    std::fs::write(&conf, "unix_sock_dir = [\n").unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 65536];
    let got_all = wait_for(Duration::from_secs(10), || {
        while let Ok(n) = journal.recv(&mut buf) {
            entries.push(journal_fields(&buf[..n]));
        }
        let has = |prio: &str, text: &str| {
            entries.iter().any(|e| {
                e.iter().any(|(k, v)| k == "PRIORITY" && v == prio)
                    && e.iter().any(|(k, v)| k == "MESSAGE" && v.contains(text))
            })
        };
        has("6", "handed to the relay") && has("3", "reload failed")
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(got_all, "journald entries: {entries:?}");
    let opened = entries
        .iter()
        .find(|e| e.iter().any(|(_, v)| v.contains("handed to the relay")))
        .unwrap();
    let field = |k: &str| opened.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(field("SYSLOG_FACILITY"), Some("3"));
    assert_eq!(field("LIBVIRT_SOURCE"), Some("virtproxyd::worker::preopen"));
    assert!(field("CODE_LINE").is_some_and(|l| l.parse::<u32>().is_ok()));
    // Debug is kept out of journald by default.
    assert!(
        !entries
            .iter()
            .any(|e| e.iter().any(|(k, v)| k == "PRIORITY" && v == "7")),
        "{entries:?}"
    );
}
