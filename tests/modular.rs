//! The proxy in front of libvirt 9.0.0's modular daemons (virtqemud, virtstoraged,
//! virtnetworkd, virtsecretd), routed by `driver_socket_dir` alone as on a Fedora/RHEL host,
//! with libvirt's own virtproxyd from the same build as the reference
//! (`scripts/modular-testbed.sh`). Every test runs on both io backends.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::modular::{proxies, testbed};
use support::*;

fn assert_ok(o: &std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

#[test]
fn qemu_system_reaches_virtqemud_and_the_daemons_behind_it() {
    let _daemons = support::modular::daemons_shared();
    for (backend, p) in proxies("") {
        let uri = p.uri("qemu:///system");
        let o = virsh(&uri, &["version"]);
        assert_ok(&o, backend);
        assert!(
            stdout(&o).contains("Running hypervisor: QEMU"),
            "{}",
            stdout(&o)
        );
        // Storage, network and secret calls on the qemu connection: virtqemud forwards them
        // to virtstoraged, virtnetworkd and virtsecretd.
        for cmd in ["pool-list --all", "net-list --all", "secret-list"] {
            let o = virsh(&uri, &[cmd]);
            assert_ok(&o, &format!("{backend}: {cmd}"));
        }
        assert!(
            p.log_text().contains("virtqemud-sock"),
            "{backend}: route not logged: {}",
            p.log_text()
        );
    }
}

#[test]
fn network_uri_goes_straight_to_virtnetworkd() {
    let _daemons = support::modular::daemons_shared();
    let tb = testbed();
    for (backend, p) in proxies("") {
        let o = virsh(&p.uri("network:///system"), &["net-list", "--all"]);
        assert_ok(&o, backend);
        let direct = virsh(
            &tb.direct_uri("network:///system", "virtnetworkd"),
            &["net-list", "--all"],
        );
        assert_eq!(stdout(&o), stdout(&direct), "{backend}");
        assert!(
            p.log_text().contains("virtnetworkd-sock"),
            "{backend}: {}",
            p.log_text()
        );
    }
}

#[test]
fn empty_name_is_probed_against_the_real_sockets() {
    let _daemons = support::modular::daemons_shared();
    for (backend, p) in proxies("") {
        let o = virsh(
            &format!("qemu+unix:///system?socket={}&name=", p.rw_sock.display()),
            &["uri"],
        );
        assert_ok(&o, backend);
        assert!(
            p.log_text().contains("uri=\"qemu:///system\""),
            "{backend}: empty name not probed to virtqemud: {}",
            p.log_text()
        );
    }
}

#[test]
fn read_only_socket_reaches_virtqemud_sock_ro() {
    let _daemons = support::modular::daemons_shared();
    for (backend, p) in proxies("") {
        let o = virsh_ro(&p.uri_ro("qemu:///system"), &["list", "--all"]);
        assert_ok(&o, backend);
        let pool = pool_dir();
        let o = virsh_ro(
            &p.uri_ro("qemu:///system"),
            &[
                "pool-create-as",
                "vpd-ro",
                "dir",
                "--target",
                pool.path().to_str().unwrap(),
            ],
        );
        assert!(
            stderr(&o).contains("read only access prevents"),
            "{backend}: {}",
            stderr(&o)
        );
        assert!(
            p.log_text().contains("virtqemud-sock-ro"),
            "{}",
            p.log_text()
        );
    }
}

#[test]
fn fds_reach_virtqemud_with_fd_associate() {
    let _daemons = support::modular::daemons_shared();
    let tb = testbed();
    for (backend, p) in proxies("") {
        let o = py(
            "fd_associate.py",
            &[&p.uri("qemu:///system"), &tb.pid("virtqemud").to_string()],
        );
        assert_ok(&o, backend);
    }
}

#[test]
fn volume_streams_of_256_mib_through_virtqemud_and_virtstoraged() {
    let _daemons = support::modular::daemons_shared();
    for (backend, p) in proxies("") {
        let pool = pool_dir();
        let o = py(
            "stream_volume.py",
            &[
                &p.uri("qemu:///system"),
                pool.path().to_str().unwrap(),
                "256",
            ],
        );
        assert_ok(&o, backend);
    }
}

/// Runs `identity.py` as user vpdtest through `sock`, optionally claiming root with its own
/// CONNECT_SET_IDENTITY; returns (its pid, the "claimed" line, virtqemud's client-info of it).
fn vpdtest_client_seen_by_virtqemud(
    dir: &std::path::Path,
    uri: &str,
    claim: bool,
) -> (String, String, Option<String>) {
    let tb = testbed();
    let pydir = dir.join("py");
    std::fs::create_dir_all(&pydir).unwrap();
    for f in ["identity.py", "_common.py"] {
        std::fs::copy(py_script(f), pydir.join(f)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&pydir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut args = vec![
        pydir.join("identity.py").display().to_string(),
        uri.to_string(),
    ];
    if claim {
        args.extend(["60".to_string(), "claim-root".to_string()]);
    }
    let mut child = Command::new("runuser")
        .args(["-u", "vpdtest", "--", "/usr/bin/python3"])
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut next = || {
        let mut l = String::new();
        lines.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    let pid = next().strip_prefix("pid ").expect("pid line").to_string();
    let open = next();
    assert!(
        open.starts_with("open uid="),
        "identity.py did not open: {open}"
    );
    let claimed = if claim { next() } else { String::new() };
    let info = tb
        .clients("virtqemud")
        .into_iter()
        .map(|(_, i)| i)
        .find(|i| info_field(i, "unix_process_id") == Some(pid.as_str()));
    drop(child.stdin.take());
    let _ = child.wait();
    (pid, claimed, info)
}

/// Regression: a client's own CONNECT_SET_IDENTITY was relayed, so virtqemud took a uid-1000
/// client claiming uid 0 for root. Now the proxy answers it as libvirt's virtproxyd does and
/// virtqemud keeps the identity given at open — compared with libvirt's own virtproxyd.
#[test]
fn own_set_identity_is_answered_by_the_proxy_not_the_daemon() {
    let _daemons = support::modular::daemons_shared();
    let tb = testbed();
    let uid = stdout(&Command::new("id").args(["-u", "vpdtest"]).output().unwrap())
        .trim()
        .to_string();
    let reference = tempfile::tempdir().unwrap();
    let (_, claimed_ref, info_ref) = vpdtest_client_seen_by_virtqemud(
        reference.path(),
        &unix_uri("qemu:///system", &tb.libvirt_proxy_rw()),
        true,
    );
    let info_ref = info_ref.expect("libvirt's virtproxyd: client not found at virtqemud");
    assert_eq!(claimed_ref, "claimed rc=0");
    assert_eq!(info_field(&info_ref, "unix_user_id"), Some(uid.as_str()));
    for (backend, p) in proxies("") {
        let (_, claimed, info) =
            vpdtest_client_seen_by_virtqemud(p.dir(), &p.uri("qemu:///system"), true);
        // Relayed, the claim replaces the whole identity virtqemud holds (pid included).
        let info = info.unwrap_or_else(|| {
            panic!(
                "{backend}: virtqemud no longer knows the client by its pid: the claimed \
                 identity reached it: {:?}",
                testbed().clients("virtqemud")
            )
        });
        assert_eq!(
            claimed, claimed_ref,
            "{backend}: reply differs from libvirt's"
        );
        assert_eq!(
            info_field(&info, "unix_user_id"),
            Some(uid.as_str()),
            "{backend}: virtqemud took the claimed identity: {info}"
        );
        assert_eq!(
            info_field(&info, "user_name"),
            info_field(&info_ref, "user_name"),
            "{backend}"
        );
    }
}

#[test]
fn killed_virtqemud_fails_its_clients_and_serves_again_after_restart() {
    let _daemons = support::modular::daemons_exclusive();
    let tb = testbed();
    let proxies = proxies("");
    for (backend, p) in &proxies {
        assert_ok(&virsh(&p.uri("qemu:///system"), &["version"]), backend);
    }
    tb.kill("virtqemud");
    for (backend, p) in &proxies {
        let o = virsh(&p.uri("qemu:///system"), &["version"]);
        assert!(
            !o.status.success(),
            "{backend}: open succeeded with virtqemud down"
        );
        assert!(
            stderr(&o).contains("virtqemud-sock"),
            "{backend}: error does not name the socket: {}",
            stderr(&o)
        );
        // Other daemons behind the same proxy are untouched.
        assert_ok(&virsh(&p.uri("network:///system"), &["net-list"]), backend);
    }
    tb.restart("virtqemud");
    for (backend, p) in &proxies {
        let ok = wait_for(Duration::from_secs(30), || {
            virsh(&p.uri("qemu:///system"), &["version"])
                .status
                .success()
        });
        assert!(
            ok,
            "{backend}: no service after virtqemud restarted: {}",
            p.log_text()
        );
    }
}

/// The results of `diff_workload.py` with what legitimately varies between two runs
/// replaced: random UUIDs in messages, and the client-side URI (it names the socket).
fn normalised_workload(rw: &str, ro: &str, tag: &str) -> serde_json::Map<String, Value> {
    let pool = pool_dir();
    let o = py(
        "diff_workload.py",
        &[rw, ro, pool.path().to_str().unwrap(), tag],
    );
    assert_ok(&o, &format!("diff_workload.py {rw}"));
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_str(stdout(&o).trim()).expect("workload JSON");
    let uuid = |s: &str| -> String {
        // 8-4-4-4-12 hex groups → <uuid>
        let mut out = String::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let cand = &s[i..];
            let is_uuid = cand.len() >= 36
                && cand[..36].char_indices().all(|(k, c)| {
                    if [8, 13, 18, 23].contains(&k) {
                        c == '-'
                    } else {
                        c.is_ascii_hexdigit()
                    }
                });
            if is_uuid {
                out.push_str("<uuid>");
                i += 36;
            } else {
                let c = cand.chars().next().unwrap_or(' ');
                out.push(c);
                i += c.len_utf8();
            }
        }
        out
    };
    for (_, r) in v.iter_mut() {
        if let Some(Value::Array(e)) = r.get_mut("err") {
            if let Some(Value::String(m)) = e.get_mut(2) {
                *m = uuid(m);
            }
        }
    }
    if let Some(Value::String(u)) = v.get_mut("uri").and_then(|r| r.get_mut("ok")) {
        *u = u.split('?').next().unwrap_or_default().to_string();
    }
    v
}

/// Leaves of a JSON value with their paths, for a field-by-field comparison.
fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, x)| leaves(&format!("{prefix}.{k}"), x, out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| leaves(&format!("{prefix}[{i}]"), x, out)),
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// The same scripted workload (results, error codes, domains and messages, events, stream
/// checksums) through libvirt's own virtproxyd and through ours, compared field by field.
#[test]
fn differential_workload_matches_libvirts_virtproxyd() {
    let _daemons = support::modular::daemons_shared();
    let tb = testbed();
    let reference = normalised_workload(
        &unix_uri("qemu:///system", &tb.libvirt_proxy_rw()),
        &unix_uri("qemu:///system", &tb.libvirt_proxy_ro()),
        "tagref",
    );
    let mut want = Vec::new();
    leaves("", &Value::Object(reference.clone()), &mut want);
    // The workload must have exercised what it claims to.
    for key in [
        "vol_download",
        "dom_events",
        "set_identity_ok",
        "ro_define",
        "secret_set",
    ] {
        assert!(
            reference.contains_key(key),
            "reference run lacks {key}: {reference:?}"
        );
    }
    assert_eq!(
        reference["vol_download"]["ok"],
        serde_json::json!([16777216, true])
    );
    for (backend, p) in proxies("") {
        let ours = normalised_workload(
            &p.uri("qemu:///system"),
            &p.uri_ro("qemu:///system"),
            &format!("tag{backend}"),
        );
        let mut got = Vec::new();
        leaves("", &Value::Object(ours), &mut got);
        let diffs: Vec<String> = want
            .iter()
            .zip(got.iter())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("{} = {} (libvirt) vs {} = {} (ours)", a.0, a.1, b.0, b.1))
            .collect();
        assert_eq!(
            want.len(),
            got.len(),
            "{backend}: field count differs:\n{want:?}\n{got:?}"
        );
        assert!(
            diffs.is_empty(),
            "{backend}: differences:\n{}",
            diffs.join("\n")
        );
        eprintln!(
            "{backend}: {} fields identical to libvirt's virtproxyd",
            want.len()
        );
    }
}

/// Connections virtqemud holds from the proxy itself (an early downstream connection before
/// its client's open carries the proxy's pid; an opened one carries the client's).
fn proxy_own_clients_at_virtqemud(proxy_pid: u32) -> usize {
    let pid = proxy_pid.to_string();
    testbed()
        .clients("virtqemud")
        .iter()
        .filter(|(_, i)| info_field(i, "unix_process_id") == Some(pid.as_str()))
        .count()
}

/// After opens of qemu:///system, a new local client is connected to virtqemud as it arrives
/// (the connect and AUTH_LIST overlap its own pre-open calls); a client that never opens
/// does not hold that connection beyond a few seconds; and a client that opens another
/// daemon still gets it.
#[test]
fn early_downstream_connection_is_made_bounded_and_dropped_on_a_wrong_guess() {
    let _daemons = support::modular::daemons_shared();
    for (backend, p) in proxies("") {
        assert_ok(&virsh(&p.uri("qemu:///system"), &["uri"]), backend);
        assert_eq!(proxy_own_clients_at_virtqemud(p.pid()), 0, "{backend}");
        let idle = std::os::unix::net::UnixStream::connect(&p.rw_sock).unwrap();
        assert!(
            wait_for(Duration::from_secs(3), || proxy_own_clients_at_virtqemud(
                p.pid()
            ) == 1),
            "{backend}: no early connection at virtqemud for a new client"
        );
        // It is closed while the client stays connected without opening (5 s bound).
        let started = std::time::Instant::now();
        assert!(
            wait_for(Duration::from_secs(12), || proxy_own_clients_at_virtqemud(
                p.pid()
            ) == 0),
            "{backend}: early connection held by a client that never opened"
        );
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{backend}: dropped too soon to be of use: {:?}",
            started.elapsed()
        );
        drop(idle);
        // A wrong guess: the open goes to virtnetworkd and works.
        let o = virsh(&p.uri("network:///system"), &["net-list", "--all"]);
        assert_ok(&o, backend);
        assert!(
            wait_for(Duration::from_secs(3), || proxy_own_clients_at_virtqemud(
                p.pid()
            ) == 0),
            "{backend}: the wrong guess stayed connected"
        );
    }
}
