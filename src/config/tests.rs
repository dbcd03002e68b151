//! Tests of the typed config: types, defaults, env handling and the shipped template.

use super::*;

const TEMPLATE: &str = include_str!("../../conf/virtproxyd.conf");

fn root() -> Env {
    Env {
        privileged: true,
        home: Some("/root".into()),
        ..Env::default()
    }
}

fn user() -> Env {
    Env {
        privileged: false,
        home: Some("/home/u".into()),
        xdg_runtime_dir: Some("/run/user/1000".into()),
        xdg_config_home: None,
        io_backend_override: None,
    }
}

fn cfg(text: &str) -> Result<Config, ConfigError> {
    Config::from_text(text, Path::new("/etc/libvirt/virtproxyd.conf"), &root())
}

fn err(text: &str) -> ConfigError {
    cfg(text).unwrap_err()
}

/// Uncomment every `#key = value` line (not the indented `#   key` examples).
fn uncomment(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.starts_with(|c: char| c.is_ascii_lowercase()) && rest.contains(" = ") =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn template_with_every_default_uncommented_equals_defaults() {
    let text = uncomment(TEMPLATE);
    let parsed = virconf::parse(&text).unwrap();
    assert!(parsed.keys().count() > 40, "template lost its keys");
    let c = Config::from_text(&text, Path::new("conf/virtproxyd.conf"), &root()).unwrap();
    assert!(c.unknown_keys.is_empty(), "{:?}", c.unknown_keys);
    assert_eq!(c, Config::defaults(&root()));
}

#[test]
fn template_mentions_every_known_key_and_parses_as_shipped() {
    for key in keys::KNOWN_KEYS {
        let set = format!("#{key} = ");
        let example = format!("#   {key} = ");
        assert!(
            TEMPLATE.contains(&set) || TEMPLATE.contains(&example),
            "{key} missing from template"
        );
    }
    assert_eq!(
        Config::from_text(TEMPLATE, Path::new("t"), &root()).unwrap(),
        Config::defaults(&root())
    );
}

#[test]
fn man_page_describes_every_known_key() {
    let man = include_str!("../../doc/virtproxyd.8");
    for key in keys::KNOWN_KEYS {
        assert!(man.contains(key), "{key} missing from doc/virtproxyd.8");
    }
}

#[test]
fn first_duplicate_key_wins() {
    let c = cfg("listen_tcp = 0\nlisten_tcp = 1\n").unwrap();
    assert!(!c.listen_tcp);
}

#[test]
fn ports_must_be_strings() {
    let e = err("\n tcp_port = 16509\n");
    assert_eq!(e.line, 2);
    assert_eq!(
        e.to_string(),
        "/etc/libvirt/virtproxyd.conf:2: expected a string for 'tcp_port' parameter"
    );
    assert_eq!(cfg("tls_port = \"https\"").unwrap().tls_port, "https");
}

#[test]
fn booleans_accept_only_0_and_1() {
    assert!(cfg("listen_tls = 1").unwrap().listen_tls);
    assert!(err("listen_tls = 2").reason.contains("must be 0 or 1"));
    assert!(err("listen_tls = \"1\"")
        .reason
        .contains("expected a number"));
    assert!(err("listen_tls = true").reason.contains("0 or 1"));
}

#[test]
fn unsigned_keys_refuse_negatives_and_strings() {
    let e = err("a = 1\nmax_clients = -1\n");
    assert_eq!(e.line, 2);
    assert!(
        e.reason
            .contains("expected an unsigned integer for 'max_clients'"),
        "{e}"
    );
    assert!(err("max_clients = \"10\"")
        .reason
        .contains("unsigned integer"));
    assert!(err("max_clients = 4294967296").reason.contains("range"));
    assert_eq!(cfg("max_clients = 0010").unwrap().max_clients, 10);
}

#[test]
fn signed_keys_accept_negatives() {
    let c = cfg("keepalive_interval = -1\nadmin_keepalive_interval = -1").unwrap();
    assert_eq!((c.keepalive_interval, c.admin_keepalive_interval), (-1, -1));
    assert!(err("keepalive_interval = 2147483648")
        .reason
        .contains("range"));
}

#[test]
fn range_rules_for_workers_ssf_and_log_level() {
    assert!(err("max_workers = 0").reason.contains("at least 1"));
    assert!(err("tcp_min_ssf = 56").reason.contains("112"));
    assert_eq!(cfg("tcp_min_ssf = 256").unwrap().tcp_min_ssf, 256);
    assert!(err("log_level = 5").reason.contains("0:4"));
    assert_eq!(cfg("log_level = 4").unwrap().log_level, 4);
}

#[test]
fn perms_are_octal_strings() {
    let c = cfg("unix_sock_rw_perms = \"0770\"\nunix_sock_ro_perms = '755'").unwrap();
    assert_eq!((c.unix_sock_rw_perms, c.unix_sock_ro_perms), (0o770, 0o755));
    for bad in [
        "\"0778\"",
        "\"\"",
        "\"+777\"",
        "\"0x1ff\"",
        "\"17777\"",
        "0770",
    ] {
        assert!(
            cfg(&format!("unix_sock_admin_perms = {bad}")).is_err(),
            "{bad} accepted"
        );
    }
}

#[test]
fn polkit_rw_auth_defaults_rw_perms_to_0777_unless_set() {
    assert_eq!(
        cfg("auth_unix_rw = \"polkit\"").unwrap().unix_sock_rw_perms,
        0o777
    );
    let c = cfg("unix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"polkit\"").unwrap();
    assert_eq!(c.unix_sock_rw_perms, 0o700);
}

#[test]
fn auth_values_are_checked() {
    assert_eq!(cfg("auth_tcp = \"sasl\"").unwrap().auth_tcp, Auth::Sasl);
    let e = err("auth_tls = \"tls\"");
    assert!(
        e.reason.contains("unknown authentication type 'tls'"),
        "{e}"
    );
}

#[test]
fn auth_defaults_are_libvirts_polkit_build() {
    let r = Config::defaults(&root());
    assert_eq!(
        (r.auth_unix_rw, r.auth_unix_ro, r.auth_tcp, r.auth_tls),
        (Auth::Polkit, Auth::Polkit, Auth::Sasl, Auth::None)
    );
    assert_eq!(
        (
            r.unix_sock_rw_perms,
            r.unix_sock_ro_perms,
            r.unix_sock_admin_perms
        ),
        (0o777, 0o777, 0o700)
    );
    let u = Config::defaults(&user());
    assert_eq!(
        (u.auth_unix_rw, u.auth_unix_ro, u.auth_tcp, u.auth_tls),
        (Auth::None, Auth::None, Auth::Sasl, Auth::None)
    );
    assert_eq!(u.unix_sock_rw_perms, 0o700);
    // Turning polkit off without a mode closes the socket to others (libvirt keeps 0777).
    assert_eq!(
        cfg("auth_unix_rw = \"none\"").unwrap().unix_sock_rw_perms,
        0o700
    );
    let c = cfg("auth_unix_rw = \"none\"\nunix_sock_rw_perms = \"0770\"").unwrap();
    assert_eq!(c.unix_sock_rw_perms, 0o770);
}

#[test]
fn sasl_is_accepted_on_every_listener() {
    let c = cfg(
        "auth_unix_rw = \"sasl\"\nauth_unix_ro = \"sasl\"\nauth_tls = \"sasl\"\nlisten_tcp = 1\n",
    )
    .unwrap();
    for kind in [
        ListenerKind::UnixRw,
        ListenerKind::UnixRo,
        ListenerKind::Tcp,
        ListenerKind::Tls,
    ] {
        assert_eq!(c.auth_for(kind).1, Auth::Sasl, "{kind:?}");
    }
    // libvirt's rule: a configured tcp_min_ssf below 112 is refused, the built-in 56 is not.
    assert_eq!(c.tcp_min_ssf, 56);
    assert!(err("tcp_min_ssf = 111")
        .reason
        .contains("minimum SSF levels lower than 112 are not supported"));
    assert_eq!(cfg("tcp_min_ssf = 112").unwrap().tcp_min_ssf, 112);
}

#[test]
fn string_lists_distinguish_unset_from_empty() {
    assert_eq!(cfg("").unwrap().tls_allowed_dn_list, None);
    let c =
        cfg("tls_allowed_dn_list = []\nsasl_allowed_username_list = [\n 'a', # admin\n 'b',\n]")
            .unwrap();
    assert_eq!(c.tls_allowed_dn_list, Some(vec![]));
    assert_eq!(
        c.sasl_allowed_username_list,
        Some(vec!["a".into(), "b".into()])
    );
    assert!(err("tls_allowed_dn_list = \"CN=x\"")
        .reason
        .contains("list of strings"));
    assert!(err("access_drivers = [ 1 ]")
        .reason
        .contains("list of strings"));
}

#[test]
fn driver_sockets_parse_and_bad_entries_are_named() {
    let c = cfg("driver_sockets = [ \"QEMU=/run/q-sock\", 'test=@abstract', \"vbox+x=/a=b\" ]")
        .unwrap();
    assert_eq!(
        c.driver_sockets,
        vec![
            ("qemu".to_string(), PathBuf::from("/run/q-sock")),
            ("test".to_string(), PathBuf::from("@abstract")),
            ("vbox+x".to_string(), PathBuf::from("/a=b")),
        ]
    );
    for bad in [
        "qemu",
        "=/x",
        "qemu=",
        "qemu=rel/path",
        "1x=/a",
        "q m=/a",
        "qemu=@",
    ] {
        let e = err(&format!("driver_sockets = [ \"{bad}\" ]"));
        assert!(e.reason.contains(&format!("'{bad}'")), "{e}");
    }
    assert!(err("driver_sockets = [ 'qemu=/a', 'Qemu=/b' ]")
        .reason
        .contains("twice"));
}

#[test]
fn io_backend_from_file_and_env_override() {
    assert_eq!(
        cfg("io_backend = \"epoll\"").unwrap().io_backend,
        IoBackend::Epoll
    );
    assert!(err("io_backend = \"uring\"").reason.contains("io_backend"));
    let env = Env {
        io_backend_override: Some("io_uring".into()),
        ..root()
    };
    let c = Config::from_text("io_backend = \"epoll\"", Path::new("f"), &env).unwrap();
    assert_eq!(c.io_backend, IoBackend::IoUring);
    let env = Env {
        io_backend_override: Some("bogus".into()),
        ..root()
    };
    let e = Config::from_text("", Path::new("f"), &env).unwrap_err();
    assert!(e.to_string().starts_with("f: VIRTPROXYD_IO_BACKEND"), "{e}");
}

#[test]
fn system_and_session_defaults_differ() {
    let r = Config::defaults(&root());
    assert_eq!(r.unix_sock_dir, Path::new("/run/libvirt"));
    assert_eq!(r.driver_socket_dir, Path::new("/run/libvirt"));
    assert_eq!(r.ca_file, Path::new("/etc/pki/CA/cacert.pem"));
    assert_eq!(
        r.key_file,
        Path::new("/etc/pki/libvirt/private/serverkey.pem")
    );
    assert!(!r.tls_fallback_to_system);
    assert_eq!(
        r.ro_socket_path(),
        Some(PathBuf::from("/run/libvirt/libvirt-sock-ro"))
    );
    assert_eq!(
        Config::default_path(&root()),
        Path::new("/etc/libvirt/virtproxyd.conf")
    );

    let s = Config::defaults(&user());
    assert_eq!(s.unix_sock_dir, Path::new("/run/user/1000/libvirt"));
    assert_eq!(s.driver_socket_dir, Path::new("/run/user/1000/libvirt"));
    assert_eq!(s.ca_file, Path::new("/home/u/.pki/libvirt/cacert.pem"));
    assert_eq!(
        s.crl_file.as_deref(),
        Some(Path::new("/home/u/.pki/libvirt/cacrl.pem"))
    );
    assert!(s.tls_fallback_to_system);
    assert_eq!(s.ro_socket_path(), None);
    assert_eq!(
        s.admin_socket_path(),
        Some(PathBuf::from("/run/user/1000/libvirt/libvirt-admin-sock"))
    );
    assert_eq!(
        Config::default_path(&user()),
        Path::new("/home/u/.config/libvirt/virtproxyd.conf")
    );

    let bare = Env {
        xdg_runtime_dir: None,
        xdg_config_home: Some("/cfg".into()),
        ..user()
    };
    assert_eq!(
        Config::defaults(&bare).unix_sock_dir,
        Path::new("/home/u/.cache/libvirt")
    );
    assert_eq!(
        Config::default_path(&bare),
        Path::new("/cfg/libvirt/virtproxyd.conf")
    );
}

#[test]
fn session_with_explicit_sock_dir_has_no_admin_socket() {
    let c = Config::from_text("unix_sock_dir = \"/tmp/s\"", Path::new("f"), &user()).unwrap();
    assert_eq!(c.rw_socket_path(), Path::new("/tmp/s/libvirt-sock"));
    assert_eq!(c.admin_socket_path(), None);
    let c = cfg("unix_sock_dir = \"/tmp/s\"").unwrap();
    assert_eq!(
        c.admin_socket_path(),
        Some(PathBuf::from("/tmp/s/libvirt-admin-sock"))
    );
}

#[test]
fn tls_files_come_as_a_set() {
    let e = err("\nca_file = \"/a\"\ncert_file = \"/b\"\n");
    assert_eq!(e.line, 2);
    assert!(e.reason.contains("all three"));
    let c = Config::from_text(
        "ca_file='/a'\ncert_file='/b'\nkey_file='/c'",
        Path::new("f"),
        &user(),
    )
    .unwrap();
    assert_eq!(
        (c.ca_file.as_path(), c.crl_file.as_deref()),
        (Path::new("/a"), None)
    );
    assert!(!c.tls_fallback_to_system);
    // crl_file alone does not replace the defaults.
    assert_eq!(cfg("crl_file = \"/x\"").unwrap(), Config::defaults(&root()));
}

#[test]
fn unknown_keys_are_returned_not_fatal() {
    let c = cfg("keepalive_required = 1\nfoo = [1]\nfoo = 2\nlisten_tcp = 0").unwrap();
    assert_eq!(c.unknown_keys, ["keepalive_required", "foo"]);
}

#[test]
fn host_uuid_source_is_checked() {
    assert_eq!(
        cfg("host_uuid_source = \"machine-id\"")
            .unwrap()
            .host_uuid_source,
        HostUuidSource::MachineId
    );
    assert!(cfg("host_uuid_source = \"dmi\"").is_err());
}

#[test]
fn syntax_errors_carry_file_and_line() {
    let e = err("listen_tcp = 0\nlisten_tls = yes\n");
    assert!(
        e.to_string()
            .starts_with("/etc/libvirt/virtproxyd.conf:2: expecting a value"),
        "{e}"
    );
}

#[test]
fn load_handles_missing_default_and_explicit_files() {
    let dir = std::env::temp_dir().join(format!("virtproxyd-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let env = Env {
        xdg_config_home: Some(dir.clone()),
        ..user()
    };
    // Missing default file: defaults.
    assert_eq!(Config::load(None, &env).unwrap(), Config::defaults(&env));
    // Missing explicit file: error naming it.
    let missing = dir.join("nope.conf");
    let e = Config::load(Some(&missing), &env).unwrap_err();
    assert_eq!(e.file, missing);
    // Present default file is read.
    std::fs::create_dir_all(dir.join("libvirt")).unwrap();
    std::fs::write(dir.join("libvirt/virtproxyd.conf"), "worker_threads = 3\n").unwrap();
    assert_eq!(Config::load(None, &env).unwrap().worker_threads, 3);
    // Invalid UTF-8 is reported with its line.
    let bad = dir.join("bad.conf");
    std::fs::write(&bad, b"a = 1\n# \xff\n").unwrap();
    assert_eq!(Config::load(Some(&bad), &env).unwrap_err().line, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn metrics_listen_is_off_by_default_and_takes_a_string_or_a_list() {
    assert!(Config::defaults(&root()).metrics_listen.is_empty());
    assert!(cfg("metrics_listen = \"\"")
        .unwrap()
        .metrics_listen
        .is_empty());
    assert!(cfg("metrics_listen = [ ]")
        .unwrap()
        .metrics_listen
        .is_empty());
    let tcp = |host: &str, port| MetricsListen::Tcp {
        host: host.into(),
        port,
    };
    assert_eq!(
        cfg("metrics_listen = \"127.0.0.1:9178\"")
            .unwrap()
            .metrics_listen,
        [tcp("127.0.0.1", 9178)]
    );
    let c = cfg("metrics_listen = [ \"[::1]:9178\", \"localhost:80\", \"/run/m.sock\" ]").unwrap();
    assert_eq!(
        c.metrics_listen,
        [
            tcp("::1", 9178),
            tcp("localhost", 80),
            MetricsListen::Unix("/run/m.sock".into())
        ]
    );
    assert_eq!(c.metrics_listen[0].to_string(), "[::1]:9178");
    assert_eq!(c.metrics_listen[2].to_string(), "/run/m.sock");
}

#[test]
fn bad_metrics_listen_entries_are_refused_with_their_line() {
    for bad in [
        "9178",
        ":9178",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        "::1:9178",
        "[::1:9178",
        "relative/sock",
        "host name:1",
    ] {
        let e = err(&format!("listen_tcp = 0\nmetrics_listen = \"{bad}\""));
        assert_eq!(e.line, 2, "{bad}");
        assert!(e.reason.contains(bad), "{bad}: {}", e.reason);
    }
    assert!(err("metrics_listen = 9178")
        .reason
        .contains("string or a list of strings"));
    assert!(err("metrics_listen = [ \"/a\", 9178 ]")
        .reason
        .contains("list of strings"));
    assert!(err("metrics_listen = [ \"/a\", \"/a\" ]")
        .reason
        .contains("twice"));
}
