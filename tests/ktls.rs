//! The TLS listener with kernel TLS: 64 MiB each way through the proxy, byte-identical,
//! with a rustls client on every kTLS cipher suite. The driver daemon here is a small fake
//! on a UNIX socket that answers the downstream handshake and then echoes, because this test
//! also runs inside a minimal VM (`scripts/ktls-vm.sh`) where no libvirtd exists.
//!
//! `VPD_EXPECT_KTLS=1` (set by `.ci/run` in the VM): kTLS must engage, or the test fails.
//! Without it (this host has no CONFIG_TLS) the userspace fallback must carry the traffic.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use support::pki::Ca;
use virtproxyd::config::{Config, Env};
use virtproxyd::listen::{self, ListenerKind};
use virtproxyd::reactor;
use virtproxyd::route::RouteTable;
use virtproxyd::server::{self, ServerOpts};
use virtproxyd::shared::{Shared, Tuning};
use virtproxyd::tls::{ktls, TlsSettings};
/// Answers AUTH_LIST, SUPPORTS_FEATURE, CONNECT_OPEN and CONNECT_SET_IDENTITY like a driver
/// daemon, then echoes every byte.
fn fake_daemon(listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            loop {
                let f = support::read_frame(&mut s).expect("frame");
                let proc_ = i32::from_be_bytes([f[12], f[13], f[14], f[15]]);
                let serial = u32::from_be_bytes([f[20], f[21], f[22], f[23]]);
                let body: &[u8] = match proc_ {
                    66 => &[0, 0, 0, 1, 0, 0, 0, 0],
                    60 => &[0, 0, 0, 1],
                    _ => &[],
                };
                s.write_all(&support::frame_status(proc_, 1, serial, 0, body))
                    .unwrap();
                if proc_ == 419 {
                    break;
                }
            }
            let mut back = s.try_clone().unwrap();
            let _ = std::io::copy(&mut s, &mut back);
        });
    }
}

struct Proxy {
    port: u16,
    ca_pem: String,
    client: (String, String),
    /// The thread running the server (a restart is a SIGUSR2 sent to it).
    server_tid: i32,
    /// Restarts served so far.
    restarts: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

/// One in-process proxy for the whole test binary (its threads end with the process).
fn proxy() -> &'static Proxy {
    static P: std::sync::OnceLock<Proxy> = std::sync::OnceLock::new();
    P.get_or_init(|| start_proxy(false))
}

/// A proxy on a TLS listener in front of the fake daemon. With `handover`, a SIGUSR2 to its
/// server thread restarts it in-process the way `main` does across `execve`: the hand-over
/// is packed (state memfd, fd queue), unpacked, and served by a new server with new shared
/// state; only the exec is missing.
fn start_proxy(handover: bool) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let daemon_sock = dir.path().join("daemon-sock");
    let l = UnixListener::bind(&daemon_sock).unwrap();
    std::thread::spawn(move || fake_daemon(l));

    let ca = Ca::new("kTLS CA");
    let (cert, key) = ca.server(false);
    for (name, text) in [
        ("ca.pem", &ca.cert_pem),
        ("server.pem", &cert),
        ("server.key", &key),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let d = dir.path().display();
    let text = format!(
        "listen_tls = 1\nlisten_addr = \"127.0.0.1\"\ntls_port = \"0\"\nca_file = \"{d}/ca.pem\"\n\
         cert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\n\
         driver_sockets = [ \"test={}\" ]\nmax_anonymous_clients = 0\n",
        daemon_sock.display()
    );
    let env = Env {
        privileged: true,
        home: None,
        xdg_runtime_dir: None,
        xdg_config_home: None,
        io_backend_override: None,
    };
    let cfg = Config::from_text(&text, &dir.path().join("p.conf"), &env).unwrap();
    let listeners = listen::bind_tcp(&["127.0.0.1".into()], "0", 64, ListenerKind::Tls).unwrap();
    let port = {
        use std::os::fd::AsRawFd;
        let addr: nix::sys::socket::SockaddrIn =
            nix::sys::socket::getsockname(listeners[0].fd.as_raw_fd()).unwrap();
        addr.port()
    };
    let run_dir: std::path::PathBuf = dir.path().into();
    let new_shared = move || {
        let routes = RouteTable::new(run_dir.clone(), cfg.driver_sockets.clone(), false);
        let tls = Arc::new(TlsSettings::from_config(&cfg).unwrap());
        let tuning = Tuning {
            preopen_deadline: Duration::from_secs(60),
            drain_grace: Duration::from_secs(1),
            splice_threshold: 16 * 1024,
        };
        Arc::new(Shared::new(&cfg, routes, Some(tls), tuning).unwrap())
    };
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let restarts = Arc::new(AtomicUsize::new(0));
    let counted = restarts.clone();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tid_tx.send(unsafe { libc::gettid() });
        let mut listeners = listeners;
        let mut resumed = None;
        loop {
            let stopped = server::run(ServerOpts {
                listeners: std::mem::take(&mut listeners),
                workers: 2,
                backend: reactor::Kind::Auto,
                idle_timeout: None,
                shared: new_shared(),
                on_reload: Box::new(|_| {}),
                admin: Default::default(),
                resumed: resumed.take(),
                handover,
                handover_check: Box::new(|| Ok(())),
                metrics: None,
            });
            let Ok(server::Stopped::HandOver(h)) = stopped else {
                return;
            };
            let out = virtproxyd::handover::process::pack(&h).expect("pack the hand-over");
            drop(h);
            let a =
                virtproxyd::handover::process::arrive(out.state, Some(out.fds)).expect("unpack it");
            listeners = a.listeners;
            resumed = Some(a.resumed);
            counted.fetch_add(1, Ordering::AcqRel);
        }
    });
    let server_tid = tid_rx.recv().unwrap();
    Proxy {
        port,
        ca_pem: ca.cert_pem.clone(),
        client: ca.client("client1", 7),
        server_tid,
        restarts,
        _dir: dir,
    }
}

fn client_config(p: &Proxy, suite: rustls::SupportedCipherSuite) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let version = match suite {
        rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(p.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(p.client.0.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(p.client.1.as_bytes()).unwrap(),
        )
        .unwrap();
    Arc::new(cfg)
}

/// Opens a session through the proxy and moves `mib` MiB each way; returns seconds taken.
fn round_trip(suite: rustls::SupportedCipherSuite, mib: usize) -> f64 {
    let p = proxy();
    let (mut conn, mut sock) = open_session(p, suite);
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let t = Instant::now();
    exchange(&mut tls, mib * 16).expect("echo");
    t.elapsed().as_secs_f64()
}

/// STREAM frames of 64 KiB, each echoed by the fake daemon; lockstep keeps both directions'
/// buffers bounded. Err(frame number) when the connection ended.
fn exchange(tls: &mut impl ReadWrite, frames: usize) -> Result<(), usize> {
    let mut body = vec![0u8; 64 * 1024];
    for i in 0..frames {
        for (j, b) in body.iter_mut().enumerate() {
            *b = (i * 31 + j) as u8;
        }
        let f = support::frame_status(209, 3, 2, 2, &body);
        tls.write_all(&f).map_err(|_| i)?;
        let back = support::read_frame(tls).ok_or(i)?;
        assert!(back == f, "frame {i} came back different");
    }
    Ok(())
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A TLS session through `p`, opened (AUTH_LIST, CONNECT_OPEN) against the fake daemon.
fn open_session(
    p: &Proxy,
    suite: rustls::SupportedCipherSuite,
) -> (rustls::ClientConnection, TcpStream) {
    let mut conn =
        rustls::ClientConnection::new(client_config(p, suite), "localhost".try_into().unwrap())
            .unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    // The first call goes out right behind the handshake, before the confirmation byte is
    // read: the proxy must not lose it while it moves the session into the kernel.
    tls.write_all(&support::frame_status(66, 0, 0, 0, &[]))
        .unwrap();
    let mut confirm = [0u8; 1];
    tls.read_exact(&mut confirm).unwrap();
    assert_eq!(confirm, [1], "confirmation byte");
    let auth = support::read_frame(&mut tls).expect("frame");
    assert_eq!(&auth[28..], &[0, 0, 0, 1, 0, 0, 0, 0], "AUTH_LIST reply");
    let mut open = vec![0, 0, 0, 1, 0, 0, 0, 15];
    open.extend_from_slice(b"test:///default\0\0\0\0\0");
    tls.write_all(&support::frame_status(1, 0, 1, 0, &open))
        .unwrap();
    let r = support::read_frame(&mut tls).expect("frame");
    assert_eq!(&r[24..28], &[0, 0, 0, 0], "open failed");
    (conn, sock)
}

/// CPU seconds used so far by the proxy's relay worker threads (named `relay-N`).
fn relay_cpu_secs() -> f64 {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut total = 0.0;
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("relay-") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15; after ')' the first field is #3.
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
            .sum();
        total += ticks / tick;
    }
    total
}

/// The kTLS counters are process-wide: the tests that read them run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

fn expect_ktls() -> bool {
    std::env::var("VPD_EXPECT_KTLS").is_ok_and(|v| v == "1")
}

fn log_init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("virtproxyd=info")
            .with_test_writer()
            .try_init();
    });
}

#[test]
fn sixty_four_mib_each_way_on_every_ktls_suite() {
    log_init();
    let _serial = serial();
    use rustls::crypto::ring::cipher_suite as cs;
    let suites = [
        (cs::TLS13_AES_128_GCM_SHA256, 64),
        (cs::TLS13_AES_256_GCM_SHA384, 4),
        (cs::TLS13_CHACHA20_POLY1305_SHA256, 4),
        (cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, 4),
        (cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, 4),
        (cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, 4),
    ];
    for (suite, mib) in suites {
        let before = (
            ktls::ENGAGED.load(Ordering::Relaxed),
            ktls::USERSPACE.load(Ordering::Relaxed),
        );
        let cpu0 = relay_cpu_secs();
        let secs = round_trip(suite, mib);
        let cpu = relay_cpu_secs() - cpu0;
        let after = (
            ktls::ENGAGED.load(Ordering::Relaxed),
            ktls::USERSPACE.load(Ordering::Relaxed),
        );
        let mode = if after.0 > before.0 {
            "kTLS"
        } else {
            "userspace"
        };
        // Both directions count: 2 × mib MiB crossed the proxy.
        let gib = (2 * mib) as f64 / 1024.0;
        println!(
            "{:?}: {mib} MiB each way in {secs:.2}s via {mode}; proxy relay CPU {:.2} s/GiB",
            suite.suite(),
            cpu / gib
        );
        if expect_ktls() {
            assert_eq!(
                after.0,
                before.0 + 1,
                "{:?}: kTLS did not engage",
                suite.suite()
            );
        } else {
            assert_eq!(
                after.1,
                before.1 + 1,
                "{:?}: fallback not used",
                suite.suite()
            );
        }
    }
}

/// A kTLS session is carried across a restart (SIGUSR2; the hand-over packed and unpacked
/// in-process, see `start_proxy`): the keys and sequence numbers live in the socket, so the
/// same client session goes on echoing through the new server. Without kernel TLS (this
/// host) the session is userspace rustls, which cannot be carried: it is closed instead.
#[test]
fn a_ktls_session_is_carried_across_a_restart() {
    log_init();
    let _serial = serial();
    let p = start_proxy(true);
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let engaged = ktls::ENGAGED.load(Ordering::Relaxed);
    let (mut conn, mut sock) = open_session(&p, suite);
    let kernel = ktls::ENGAGED.load(Ordering::Relaxed) > engaged;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    exchange(&mut tls, 16).expect("echo before the restart");
    // SAFETY: a thread-directed signal to the server thread, which blocks it and reads it
    // from its signalfd.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            p.server_tid,
            libc::SIGUSR2,
        );
    }
    assert!(
        support::wait_for(Duration::from_secs(20), || p
            .restarts
            .load(Ordering::Acquire)
            == 1),
        "no restart within 20 s"
    );
    let after = exchange(&mut tls, 16);
    if expect_ktls() || kernel {
        assert!(kernel, "kTLS did not engage");
        assert_eq!(after, Ok(()), "the kTLS session broke across the restart");
        println!("kTLS session carried across the restart: 16 MiB echoed after it");
    } else {
        assert!(
            after.is_err(),
            "a userspace TLS session cannot have been carried"
        );
        println!("userspace TLS session closed by the restart, as documented");
    }
    // The new server serves new sessions.
    let (mut c2, mut s2) = open_session(&p, suite);
    exchange(&mut rustls::Stream::new(&mut c2, &mut s2), 2)
        .expect("a new session after the restart");
}
