//! Fuzz the virconf parser and the typed config built on it.
//!
//! Run with: `RUSTC_BOOTSTRAP=1 cargo fuzz run virconf` from the repository root.
//! Neither call may panic, whatever the input; a successful parse must also
//! keep libvirt's "first occurrence wins" lookup rule.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use virtproxyd::config::virconf::{self, Value};
use virtproxyd::config::{Config, Env};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(conf) = virconf::parse(text) {
        for key in conf.keys() {
            let first = conf
                .entries()
                .iter()
                .find(|e| e.name == key)
                .map(|e| &e.value);
            assert_eq!(conf.get(key), first);
        }
        for entry in conf.entries() {
            if let Value::List(items) = &entry.value {
                assert!(items.iter().all(|v| !matches!(v, Value::List(_))));
            }
        }
    }

    let file = Path::new("fuzz.conf");
    let root = Env {
        privileged: true,
        home: Some("/root".into()),
        ..Env::default()
    };
    let user = Env {
        privileged: false,
        home: Some("/home/u".into()),
        xdg_runtime_dir: Some("/run/user/1000".into()),
        ..Env::default()
    };
    for env in [root, user] {
        if let Ok(cfg) = Config::from_text(text, file, &env) {
            // (validate_supported went with the SASL branch: every auth value is accepted.)
            for kind in [
                virtproxyd::listen::ListenerKind::UnixRw,
                virtproxyd::listen::ListenerKind::UnixRo,
                virtproxyd::listen::ListenerKind::Tcp,
                virtproxyd::listen::ListenerKind::Tls,
            ] {
                let _ = cfg.auth_for(kind);
            }
            let _ = (
                cfg.rw_socket_path(),
                cfg.ro_socket_path(),
                cfg.admin_socket_path(),
            );
        }
    }
});
