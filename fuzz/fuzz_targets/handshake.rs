#![no_main]
//! Arbitrary client bytes, cut into frames, fed to the pre-open machine, with arbitrary daemon
//! replies (some before the client's open, on an early downstream connection): it must never
//! panic, and every reply it emits must be a well-formed frame.
use libfuzzer_sys::fuzz_target;
use virtproxyd::handshake::{Action, Handshake};
use virtproxyd::identity::Identity;
use virtproxyd::listen::ListenerKind;
use virtproxyd::proto::Header;
use virtproxyd::route::RouteTable;

fuzz_target!(|data: &[u8]| {
    let routes = RouteTable::new(
        "/nonexistent".into(),
        vec![("test".into(), "/nonexistent/s".into())],
        false,
    );
    let kinds = [
        ListenerKind::UnixRw,
        ListenerKind::UnixRo,
        ListenerKind::UnixAdmin,
        ListenerKind::Tcp,
        ListenerKind::Tls,
    ];
    let kind = kinds[data.first().map_or(0, |b| *b as usize % kinds.len())];
    // The second byte picks polkit (with a non-root UNIX peer) and whether polkitd allows.
    let flags = data.get(1).copied().unwrap_or(0);
    let mut hs = if flags & 1 == 1 {
        let peer = virtproxyd::identity::UnixPeer {
            uid: 1000,
            gid: 1000,
            pid: 42,
            user_name: None,
            group_name: None,
            process_time: 7,
        };
        let id = Identity {
            unix: Some(peer),
            ..Identity::default()
        };
        Handshake::new(kind, id).with_auth(virtproxyd::config::Auth::Polkit)
    } else {
        Handshake::new(kind, Identity::default())
    };
    // The fourth bit: the client comes with an early downstream connection to the test driver.
    if flags & 8 == 8 {
        hs.with_early(virtproxyd::route::Target {
            uri: "test:///default".into(),
            socket: "/nonexistent/s".into(),
            readonly: flags & 16 == 16,
        });
    }
    let mut rest = data;
    let mut out = Vec::new();
    let mut to_daemon = false;
    while let Ok(h) = Header::check(rest) {
        let len = (h.len as usize).min(rest.len());
        let body = &rest[Header::SIZE..len];
        // Replies go to the early connection while it waits for the client's open.
        let early_reply = hs.has_early() && h.mtype == virtproxyd::proto::MsgType::Reply;
        if to_daemon || early_reply {
            hs.on_daemon_frame(&h, body, &mut out);
        } else {
            hs.on_client_frame(&h, body, &routes, &|_| true, &mut out);
        }
        let mut pending: Vec<Action> = out.drain(..).collect();
        while !pending.is_empty() {
            let a = pending.remove(0);
            match a {
                Action::ToClient(f) | Action::ToDaemon(f) => {
                    let fh = Header::check(&f).expect("emitted frame has a valid header");
                    assert_eq!(fh.len as usize, f.len());
                }
                Action::Connect(_) => {
                    let mut more = Vec::new();
                    hs.on_connected(&mut more);
                    to_daemon = true;
                    pending.extend(more);
                }
                Action::UseEarly => to_daemon = true,
                Action::Disconnect | Action::StartRelay | Action::Close(_) => to_daemon = false,
                Action::AskPolkit(q) => {
                    let mut more = Vec::new();
                    let answer = virtproxyd::polkit::verdict(
                        flags & 2 == 2,
                        flags & 4 == 4,
                        &Default::default(),
                        q.action,
                    );
                    hs.on_polkit_answer(answer, &mut more);
                    pending.extend(more);
                }
                // SASL calls wait for the SASL threads; the fuzzer leaves them pending.
                Action::Authenticated
                | Action::AuthRefused
                | Action::Sasl(_)
                | Action::SaslEnd
                | Action::SecurityLayer => {}
            }
        }
        rest = &rest[len..];
    }
});
