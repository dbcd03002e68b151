//! The binary's command line and start-up checks, as an operator meets them.

use std::process::Command;

fn proxy(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_virtproxyd"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn version_and_help_match_virtproxyd() {
    let o = proxy(&["--version"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("(libvirt) 9.0.0"));
    let o = proxy(&["-h"]);
    assert!(o.status.success());
    // libvirt prints usage on stderr.
    assert!(String::from_utf8_lossy(&o.stderr).contains("--timeout <secs>"));
    assert!(o.stdout.is_empty());
    let o = proxy(&["--bogus"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn bad_config_stops_start_up_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bad.conf");
    std::fs::write(&conf, "# ok\nmax_clients = 10\ntcp_port = 16509\n").unwrap();
    let o = proxy(&[
        "-f",
        conf.to_str().unwrap(),
        "-p",
        dir.path().join("pid").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{}:3:", conf.display())), "{err}");
    assert!(err.contains("tcp_port"), "{err}");

    let o = proxy(&["-f", dir.path().join("missing.conf").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_live_socket_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let sockdir = dir.path().join("s");
    std::fs::create_dir(&sockdir).unwrap();
    let _live = std::os::unix::net::UnixListener::bind(sockdir.join("libvirt-sock")).unwrap();
    let conf = dir.path().join("p.conf");
    std::fs::write(
        &conf,
        format!("unix_sock_dir = \"{}\"\n", sockdir.display()),
    )
    .unwrap();
    let o = proxy(&[
        "-f",
        conf.to_str().unwrap(),
        "-p",
        dir.path().join("pid").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(6));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already listening"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
