//! The relay with metrics on allocates nothing per frame once warm: the daemon runs in this
//! process (`server::run`, metrics attached), a counting global allocator counts the
//! allocations made on the relay worker's thread (found by its name, `relay-0`), and a
//! python3-libvirt client makes 5,000 calls (10,000 relayed frames) through it to the
//! modular test bed's virtstoraged after a warm-up.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use virtproxyd::config::{Auth, Config, Env};
use virtproxyd::listen::{self, ListenerKind};
use virtproxyd::reactor;
use virtproxyd::route::RouteTable;
use virtproxyd::server::{self, ServerOpts};
use virtproxyd::shared::{Shared, Tuning};

/// Counts allocations made by the thread whose id is in `WATCHED` (0: none).
struct Counting;

static WATCHED: AtomicI32 = AtomicI32::new(0);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

impl Counting {
    #[inline]
    fn note(&self) {
        let tid = WATCHED.load(Ordering::Relaxed);
        // SAFETY: gettid has no preconditions and does not allocate.
        if tid != 0 && unsafe { libc::gettid() } == tid {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The kernel thread ids of this process's threads named `name`.
fn thread_ids(name: &str) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|e| {
            let e = e.ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == name).then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

/// The proxy in this process, one relay worker on `backend`, metrics attached; its rw socket.
fn start_proxy(
    backend: reactor::Kind,
    dir: &std::path::Path,
) -> (std::path::PathBuf, Arc<virtproxyd::metrics::Source>) {
    let tb = support::modular::testbed();
    let sock = dir.join("libvirt-sock");
    let listener = listen::bind_unix(&sock, 0o777, None, 64, ListenerKind::UnixRw).expect("bind");
    let mut cfg = Config::defaults(&Env::default());
    cfg.auth_tcp = Auth::None;
    cfg.max_anonymous_clients = 0;
    let routes = RouteTable::new(tb.sock_dir.clone(), Vec::new(), false);
    let tuning = Tuning {
        preopen_deadline: Duration::from_secs(60),
        drain_grace: Duration::from_secs(1),
        splice_threshold: 16 * 1024,
    };
    let shared = Arc::new(Shared::new(&cfg, routes, None, tuning).expect("eventfd"));
    let source = Arc::new(virtproxyd::metrics::Source::new(
        shared.clone(),
        SystemTime::now(),
        1,
    ));
    let metrics = Some(source.clone());
    std::thread::spawn(move || {
        let _ = server::run(ServerOpts {
            listeners: vec![listener],
            workers: 1,
            backend,
            idle_timeout: None,
            shared,
            on_reload: Box::new(|_| {}),
            admin: Default::default(),
            metrics,
            resumed: None,
            handover: false,
            handover_check: Box::new(|| Err("not in this test".into())),
        });
    });
    (sock, source)
}

fn calls(source: &virtproxyd::metrics::Source) -> u64 {
    source
        .snapshot()
        .relay
        .map_or(0, |r| r.calls.iter().map(|&(_, _, n)| n).sum())
}

/// 10,000 frames relayed after warm-up: no allocation on the relay worker, and the
/// metrics counted every call.
#[test]
fn relayed_frames_allocate_nothing_with_metrics_on() {
    const WARM: u32 = 500;
    const N: u64 = 5_000; // a call and its reply each: 10,000 frames
    let _shared = support::modular::daemons_shared();
    for backend in [reactor::Kind::IoUring, reactor::Kind::Epoll] {
        let dir = tempfile::tempdir().expect("tempdir");
        // The previous backend's proxy keeps running: its worker is not the one watched.
        let earlier = thread_ids("relay-0");
        let (sock, source) = start_proxy(backend, dir.path());
        let uri = support::unix_uri("storage:///system", &sock);
        let mut child =
            support::py_command("calls_paced.py", &[&uri, &WARM.to_string(), &N.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut stdin = child.stdin.take().expect("stdin");
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "warm", "{backend:?}");
        let tid = thread_ids("relay-0")
            .into_iter()
            .find(|t| !earlier.contains(t))
            .expect("the relay worker thread");
        let before_calls = calls(&source);
        WATCHED.store(tid, Ordering::Relaxed);
        let before = ALLOCS.load(Ordering::Relaxed);
        writeln!(stdin).expect("go");
        line.clear();
        out.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "done", "{backend:?}");
        let allocs = ALLOCS.load(Ordering::Relaxed) - before;
        WATCHED.store(0, Ordering::Relaxed);
        let counted = calls(&source) - before_calls;
        writeln!(stdin).expect("finish");
        assert!(child.wait().expect("wait").success());
        assert_eq!(counted, N, "{backend:?}: the metrics counted the calls");
        assert_eq!(
            allocs, 0,
            "{backend:?}: {allocs} allocations on the relay worker for {N} calls"
        );
    }
}
