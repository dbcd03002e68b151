//! The `/clients` page: each relayed client's own figures (bytes each way, calls, idle time)
//! beside what the registry knows of it, as JSON. Per-client figures never become metric
//! labels (the series count must not grow with clients); here they are one object each.
//! Pure: records and figures in, text out.

use std::collections::HashMap;
use std::fmt::Write;

use crate::listen::ListenerKind;
use crate::registry::{ClientRecord, ClientStats};

fn listener(kind: ListenerKind) -> &'static str {
    match kind {
        ListenerKind::UnixRw => "unix_rw",
        ListenerKind::UnixRo => "unix_ro",
        ListenerKind::UnixAdmin => "admin",
        ListenerKind::Tcp => "tcp",
        ListenerKind::Tls => "tls",
    }
}

/// A JSON string literal.
fn quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `{"clients": [...]}`, ordered by id. A client whose worker did not answer in time (or
/// that is still before its hand-over to a worker) has its registry fields only. `now_ms`:
/// milliseconds since the epoch when the figures were read, for `last_activity`.
pub fn render(records: &[ClientRecord], stats: Vec<ClientStats>, now_ms: u64) -> String {
    let by_id: HashMap<u64, ClientStats> = stats.into_iter().map(|s| (s.id, s)).collect();
    let mut records: Vec<&ClientRecord> = records.iter().collect();
    records.sort_by_key(|r| r.id);
    let mut out = String::from("{\"clients\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"id\":{},\"listener\":\"{}\",\"connected_since\":{},\"readonly\":{}",
            r.id,
            listener(r.kind),
            r.timestamp,
            r.readonly()
        );
        if let Some(u) = &r.identity.unix {
            let _ = write!(out, ",\"uid\":{},\"pid\":{}", u.uid, u.pid);
        }
        if let Some(a) = &r.peer_addr {
            out.push_str(",\"peer\":");
            quoted(&mut out, a);
        }
        if let Some(dn) = &r.identity.x509_dname {
            out.push_str(",\"x509_dname\":");
            quoted(&mut out, dn);
        }
        if let Some(s) = by_id.get(&r.id) {
            let _ = write!(
                out,
                ",\"bytes_to_daemon\":{},\"bytes_to_client\":{},\"calls\":{}",
                s.bytes_to_daemon, s.bytes_to_client, s.calls
            );
            if let Some(ms) = s.idle_ms {
                let _ = write!(
                    out,
                    ",\"idle_seconds\":{:.3},\"last_activity\":{}",
                    ms as f64 / 1000.0,
                    s.last_activity(now_ms)
                );
            }
        }
        out.push('}');
    }
    out.push_str("]}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, UnixPeer};

    fn record(id: u64, kind: ListenerKind) -> ClientRecord {
        ClientRecord {
            id,
            timestamp: 1_700_000_000,
            kind,
            identity: Identity::default(),
            peer_addr: None,
            worker: 0,
            claimed: None,
            opened_readonly: false,
            disconnect_requested: false,
        }
    }

    #[test]
    fn each_client_is_one_object_with_its_figures() {
        let mut a = record(2, ListenerKind::UnixRo);
        a.identity.unix = Some(UnixPeer {
            uid: 1000,
            gid: 1000,
            pid: 42,
            user_name: None,
            group_name: None,
            process_time: 0,
        });
        let mut b = record(1, ListenerKind::Tls);
        b.peer_addr = Some("192.0.2.1:5000".into());
        b.identity.x509_dname = Some("CN=a \"quoted\" \\ name".into());
        let stats = vec![ClientStats {
            id: 2,
            bytes_to_daemon: 100,
            bytes_to_client: 200,
            calls: 3,
            idle_ms: Some(1500),
        }];
        let text = render(&[a, b], stats, 1_700_000_100_000);
        assert_eq!(
            text,
            "{\"clients\":[\
             {\"id\":1,\"listener\":\"tls\",\"connected_since\":1700000000,\"readonly\":false,\
             \"peer\":\"192.0.2.1:5000\",\"x509_dname\":\"CN=a \\\"quoted\\\" \\\\ name\"},\
             {\"id\":2,\"listener\":\"unix_ro\",\"connected_since\":1700000000,\"readonly\":true,\
             \"uid\":1000,\"pid\":42,\"bytes_to_daemon\":100,\"bytes_to_client\":200,\"calls\":3,\
             \"idle_seconds\":1.500,\"last_activity\":1700000098}]}\n"
        );
    }

    #[test]
    fn no_clients_is_an_empty_list() {
        assert_eq!(render(&[], Vec::new(), 0), "{\"clients\":[]}\n");
    }
}
