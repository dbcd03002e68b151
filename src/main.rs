//! `virtproxyd`: CLI → config → listeners → relay workers.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use virtproxyd::activation;
use virtproxyd::cli::{self, Command};
use virtproxyd::config::{Config, Env, IoBackend};
use virtproxyd::daemon::{self, PidFile};
use virtproxyd::handover;
use virtproxyd::listen;
use virtproxyd::listen::ListenerKind;
use virtproxyd::logging;
use virtproxyd::reactor;
use virtproxyd::route::RouteTable;
use virtproxyd::server::{self, ServerOpts, Stopped};
use virtproxyd::shared::{Shared, Tuning};
use virtproxyd::tls;

/// Exit statuses used by libvirt daemons (libvirt-rpc.md §8.6).
const EXIT_CONFIG: i32 = 1;
const EXIT_NETWORK: i32 = 6;

/// Bodies of at least this many bytes are spliced. `cargo bench --bench splice_threshold`:
/// copy wins up to 4 KiB bodies, splice from 16 KiB (throughput and CPU). Overridable for
/// benchmarking with VIRTPROXYD_SPLICE_THRESHOLD.
const SPLICE_THRESHOLD: usize = 16 * 1024;

/// How long frames in flight may take to finish after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long a TCP/TLS client has from accept to a completed CONNECT_OPEN (TLS handshake
/// included). libvirt has no such key (it relies on keepalive, which a client must ask for),
/// so it is not in the config; `VIRTPROXYD_PREOPEN_TIMEOUT_MS` overrides it (tests).
const PREOPEN_DEADLINE: Duration = Duration::from_secs(60);

fn preopen_deadline() -> Duration {
    match std::env::var("VIRTPROXYD_PREOPEN_TIMEOUT_MS") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                tracing::warn!(
                    "ignoring VIRTPROXYD_PREOPEN_TIMEOUT_MS={v:?} (want milliseconds > 0)"
                );
                PREOPEN_DEADLINE
            }
        },
        Err(_) => PREOPEN_DEADLINE,
    }
}

fn main() {
    let mut args = std::env::args_os();
    let argv0 = args
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_else(|| "virtproxyd".into());
    let cli = match cli::parse(args) {
        Ok(Command::Run(c)) => c,
        Ok(Command::Help) => {
            eprint!("{}", cli::usage(&argv0));
            std::process::exit(0);
        }
        Ok(Command::Version) => {
            println!(
                "{argv0} (libvirt) 9.0.0 (virtproxyd-rs {})",
                env!("CARGO_PKG_VERSION")
            );
            std::process::exit(0);
        }
        Ok(Command::HandoverCheck(c)) => {
            // Asked by a running daemon before it hands its connections to this binary.
            match Config::load(c.config.as_deref(), &Env::from_process()) {
                Ok(_) => {
                    println!("{}", handover::process::check_answer());
                    std::process::exit(0);
                }
                Err(e) => {
                    eprintln!("{argv0}: error: Can't load config file: {e}");
                    std::process::exit(EXIT_CONFIG);
                }
            }
        }
        Err(e) => {
            eprintln!("{argv0}: {e}");
            eprint!("{}", cli::usage(&argv0));
            std::process::exit(1);
        }
    };
    std::process::exit(run(&argv0, cli));
}

/// The logging settings of a config and command line (libvirt's `virDaemonSetupLogging`).
fn log_settings(cfg: &Config, env: &Env, verbose: bool, daemon: bool) -> logging::Settings {
    logging::Settings {
        level: cfg.log_level,
        filters: cfg.log_filters.clone(),
        outputs: cfg.log_outputs.clone(),
        verbose,
        daemon,
        privileged: env.privileged,
        cache_dir: env.home.as_ref().map(|h| h.join(".cache/libvirt")),
    }
}

fn route_table(cfg: &Config, env: &Env) -> RouteTable {
    RouteTable::new(
        cfg.driver_socket_dir.clone(),
        cfg.driver_sockets.clone(),
        !env.privileged,
    )
}

/// SIGHUP: re-read the config file and apply what can change without dropping connections.
struct Reloader {
    path: Option<PathBuf>,
    env: Env,
    verbose: bool,
    daemon: bool,
    current: Config,
    log: logging::LogControl,
}

impl Reloader {
    fn reload(&mut self, shared: &Shared) {
        let new = match Config::load(self.path.as_deref(), &self.env) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload failed, keeping the running configuration: {e}");
                return;
            }
        };
        let old = std::mem::replace(&mut self.current, new);
        let new = &self.current;
        let mut applied = Vec::new();
        if (old.max_clients, old.max_anonymous_clients)
            != (new.max_clients, new.max_anonymous_clients)
        {
            shared
                .max_clients
                .store(new.max_clients as usize, Ordering::Release);
            shared
                .max_anonymous_clients
                .store(new.max_anonymous_clients as usize, Ordering::Release);
            shared.limits_set.store(true, Ordering::Release);
            applied.push(format!(
                "max_clients {} -> {}, max_anonymous_clients {} -> {}",
                old.max_clients,
                new.max_clients,
                old.max_anonymous_clients,
                new.max_anonymous_clients
            ));
        }
        if (&old.driver_socket_dir, &old.driver_sockets)
            != (&new.driver_socket_dir, &new.driver_sockets)
        {
            shared.routes.store(Arc::new(route_table(new, &self.env)));
            applied.push("driver sockets (for new connections)".into());
        }
        // Certificates, key, CA and CRL are re-read on every reload (files change without the
        // config changing); established connections keep their sessions.
        if shared.tls.load().is_some() {
            match tls::TlsSettings::from_config(new) {
                Ok(t) => {
                    shared.tls.store(Some(Arc::new(t)));
                    applied.push("TLS certificates, key, CA and CRL (for new connections)".into());
                }
                Err(e) => {
                    tracing::error!("TLS reload failed, keeping the loaded certificates: {e}")
                }
            }
        }
        if (old.log_level, &old.log_filters, &old.log_outputs)
            != (new.log_level, &new.log_filters, &new.log_outputs)
        {
            let settings = log_settings(new, &self.env, self.verbose, self.daemon);
            let resolved = logging::resolve(&settings, &|k| std::env::var(k).ok(), false);
            match resolved.and_then(|r| self.log.apply(&r)) {
                Ok(()) => applied.push("log_level, log_filters and log_outputs".into()),
                Err(e) => tracing::error!("logging settings not changed: {e}"),
            }
        }
        let mut restart = Vec::new();
        macro_rules! needs_restart {
            ($($field:ident),*) => { $( if old.$field != new.$field { restart.push(stringify!($field)); } )* };
        }
        needs_restart!(
            unix_sock_dir,
            unix_sock_group,
            unix_sock_rw_perms,
            unix_sock_ro_perms,
            unix_sock_admin_perms,
            auth_unix_rw,
            auth_unix_ro,
            auth_tcp,
            auth_tls,
            listen_tcp,
            listen_tls,
            listen_addr,
            tcp_port,
            tls_port,
            max_queued_clients,
            io_backend,
            worker_threads,
            metrics_listen
        );
        if applied.is_empty() && restart.is_empty() {
            tracing::info!("configuration reloaded: nothing changed");
        }
        for a in applied {
            tracing::info!("configuration reloaded: applied {a}");
        }
        for r in restart {
            tracing::warn!(
                "configuration reloaded: '{r}' changed; it takes effect after a restart"
            );
        }
    }
}

fn run(argv0: &str, cli: cli::Cli) -> i32 {
    let started = std::time::SystemTime::now();
    let (env, cfg, log) = match load(argv0, &cli) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let restart = Restart::from_process(argv0);
    // Fork before any thread exists.
    let ready = match daemonize(argv0, cli.daemon && !restart.re_executed) {
        Ok(r) => r,
        Err(code) => return code,
    };
    // Its pid file stays held while `prepared` lives: to the end.
    let prepared = match prepare(&cli, &env, &cfg, restart.began_ns) {
        Ok(p) => p,
        Err((code, msg)) => return fail(argv0, ready, code, &msg),
    };
    if let Some(r) = ready {
        r.report(0);
    }
    let make_admin = admin_opts(&cfg, &env, &cli, &log);
    // Past the fork and the start-up checks: from here a slow log output costs lines, not
    // the relay workers' time. The writer thread, like every other, must not take the
    // signals the acceptor reads from its signalfd: they are blocked before it starts.
    if let Err(e) = server::handled_signals().thread_block() {
        return fail(
            argv0,
            None,
            EXIT_CONFIG,
            &format!("cannot block signals: {e}"),
        );
    }
    if let Err(e) = log.start_writer() {
        tracing::warn!("cannot start the log writer thread ({e}); logging inline");
    }
    // Metrics endpoint (issue 18): its own thread, after the signals are blocked.
    let (metrics, metrics_source) = match start_metrics(
        prepared.metrics_sockets,
        &prepared.shared,
        started,
        prepared.workers,
    ) {
        Ok(m) => m,
        Err(msg) => return fail(argv0, None, EXIT_NETWORK, &msg),
    };
    let serving = Serving {
        restart,
        config_path: cli.config.clone(),
        workers: prepared.workers,
        backend: prepared.backend,
        idle_timeout: (cli.timeout > 0).then(|| Duration::from_secs(cli.timeout.into())),
        shared: prepared.shared,
        handover: cfg.restart_handover,
        was_activated: prepared.was_activated,
        metrics: metrics_source,
        make_admin,
        flush_log: log.clone(),
        reloader: std::rc::Rc::new(std::cell::RefCell::new(Reloader {
            path: cli.config.clone(),
            env: env.clone(),
            verbose: cli.verbose,
            daemon: cli.daemon,
            current: cfg,
            log,
        })),
    };
    let stopped = serving.serve(prepared.listeners, prepared.resumed);
    if let Some(m) = metrics {
        m.stop();
    }
    let code = exit_code(stopped);
    serving.flush_log.flush(Duration::from_secs(2));
    code
}

/// `-d` (not again after a restart's execve: the process is the daemon already): the pipe
/// to tell the waiting parent how the start went.
fn daemonize(argv0: &str, fork: bool) -> Result<Option<daemon::ReadyPipe>, i32> {
    if !fork {
        return Ok(None);
    }
    match daemon::daemonize(argv0) {
        Ok(p) => Ok(Some(p)),
        Err(e) => {
            eprintln!("{argv0}: error: cannot daemonize: {e}");
            Err(EXIT_CONFIG)
        }
    }
}

/// Logs a start-up failure, tells the waiting parent of `-d` (`ready`), and gives the exit
/// status.
fn fail(argv0: &str, ready: Option<daemon::ReadyPipe>, code: i32, msg: &str) -> i32 {
    tracing::error!("{msg}");
    eprintln!("{argv0}: error: {msg}");
    if let Some(r) = ready {
        r.report(code as u8);
    }
    code
}

/// The configuration and logging (before anything else: every later step logs); the exit
/// status on failure.
fn load(argv0: &str, cli: &cli::Cli) -> Result<(Env, Config, logging::LogControl), i32> {
    let env = Env::from_process();
    let cfg = match Config::load(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{argv0}: error: Can't load config file: {e}");
            return Err(EXIT_CONFIG);
        }
    };
    let log = match logging::install(&log_settings(&cfg, &env, cli.verbose, cli.daemon)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{argv0}: error: {e}");
            return Err(EXIT_CONFIG);
        }
    };
    for key in &cfg.unknown_keys {
        tracing::debug!("ignoring unknown config key '{key}'");
    }
    Ok((env, cfg, log))
}

/// What a SIGUSR2 restart re-executes, and what the previous process's execve told us.
struct Restart {
    /// This binary's path (a package upgrade puts the new one there).
    exe: PathBuf,
    /// The same arguments.
    args: Vec<std::ffi::OsString>,
    /// Started by a hand-over's execve: the daemon already, with its PID.
    re_executed: bool,
    /// When the previous process began to quiesce (CLOCK_MONOTONIC ns).
    began_ns: Option<u64>,
}

impl Restart {
    /// Reads (and clears, so that no child inherits it) the hand-over's marker.
    fn from_process(argv0: &str) -> Restart {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(argv0));
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let exec_marker = std::env::var(handover::process::EXEC_ENV).ok();
        let re_executed = exec_marker.is_some();
        let (began_ns, exec_ns) = marker_times(exec_marker.as_deref());
        std::env::remove_var(handover::process::EXEC_ENV);
        if re_executed {
            tracing::info!(
                since_quiesce_began_ms = handover::ms_since(began_ns),
                since_execve_ms = handover::ms_since(exec_ns),
                "started by a restart's hand-over (SIGUSR2)"
            );
        }
        Restart {
            exe,
            args,
            re_executed,
            began_ns,
        }
    }
}

/// "<quiesce began>:<execve called>" (CLOCK_MONOTONIC ns); older binaries say just "1".
fn marker_times(marker: Option<&str>) -> (Option<u64>, Option<u64>) {
    let ns = |i: usize| {
        marker
            .filter(|v| v.contains(':'))
            .and_then(|v| v.split(':').nth(i))
            .and_then(|v| v.parse::<u64>().ok())
    };
    (ns(0), ns(1))
}

/// A start-up failure: the exit status and what to say.
type Failure = (i32, String);

/// What the start-up checks leave for serving.
struct Prepared {
    /// Held (locked) until the process exits.
    _pid_file: PidFile,
    listeners: Vec<listen::Listener>,
    was_activated: bool,
    resumed: Option<handover::Resumed>,
    metrics_sockets: Vec<virtproxyd::metrics::serve::MetricsSocket>,
    shared: Arc<Shared>,
    workers: usize,
    backend: reactor::Kind,
}

/// Everything that can fail the start before the parent of `-d` is told it went well: the
/// pid file, the sockets (activated, carried over or created), TLS material, the shared state.
fn prepare(
    cli: &cli::Cli,
    env: &Env,
    cfg: &Config,
    began_ns: Option<u64>,
) -> Result<Prepared, Failure> {
    // Taken before any socket is created, as libvirt does.
    let pid_path = cli.pid_file.clone().unwrap_or_else(|| {
        daemon::default_pid_file(
            env.privileged,
            env.xdg_runtime_dir.as_deref(),
            env.home.as_deref(),
        )
    });
    let _pid_file = PidFile::acquire(&pid_path).map_err(|e| (EXIT_CONFIG, e.to_string()))?;
    let activated = activation::take_listeners(&activation::ActivationEnv::from_process())
        .map_err(|e| (EXIT_NETWORK, e.to_string()))?;
    let (mut listeners, activated_metrics, arriving) = match activated {
        Some(a) => (
            a.listeners,
            a.metrics,
            a.handover_state.map(|s| (s, a.handover_fds)),
        ),
        None => (Vec::new(), Vec::new(), None),
    };
    let was_activated = !listeners.is_empty();
    if was_activated {
        for key in activation::IGNORED_KEYS {
            if cfg.origin.line_of(key).is_some() {
                tracing::info!("'{key}' is ignored under socket activation");
            }
        }
    }
    let resumed =
        arriving.and_then(|(state_fd, queue)| take_over(state_fd, queue, began_ns, &mut listeners));
    // Metrics endpoint (issue 18): bound before any socket file is created,
    // so that a bad or taken address fails the start with nothing left behind.
    let metrics_sockets =
        metrics_sockets(cfg, activated_metrics).map_err(|e| (EXIT_NETWORK, e.to_string()))?;
    if listeners.is_empty() {
        listeners = create_listeners(cfg, env).map_err(|e| (EXIT_NETWORK, e.to_string()))?;
    }
    for listener in &listeners {
        if let Some(w) = activation::open_socket_warning(listener, cfg.auth_for(listener.kind).1) {
            tracing::warn!("{w}");
        }
    }
    let shared = build_shared(cfg, env, &listeners)?;
    let (workers, backend) = (worker_count(cfg), backend(cfg));
    // SIGPIPE must not kill us when a peer vanishes mid-splice.
    // SAFETY: setting a signal disposition to ignore.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Ok(Prepared {
        _pid_file,
        listeners,
        was_activated,
        resumed,
        metrics_sockets,
        shared,
        workers,
        backend,
    })
}

/// A restart's hand-over: the listeners that were not systemd's (added to `listeners`), and
/// the connections; `None` when they cannot be taken (then the previous process's clients
/// are lost, and this one serves on).
fn take_over(
    state_fd: std::os::fd::OwnedFd,
    queue: Option<std::os::fd::OwnedFd>,
    began_ns: Option<u64>,
    listeners: &mut Vec<listen::Listener>,
) -> Option<handover::Resumed> {
    handover::transfer::forget_in_systemd();
    let t = std::time::Instant::now();
    match handover::process::arrive(state_fd, queue) {
        Ok(a) => {
            tracing::info!(
                from = %a.producer,
                conns = a.resumed.carried.len(),
                listeners = a.listeners.len(),
                unpack_ms = t.elapsed().as_millis() as u64,
                since_quiesce_began_ms = handover::ms_since(began_ns),
                "taking over from the previous process"
            );
            listeners.extend(a.listeners);
            Some(handover::Resumed {
                began_ns,
                ..a.resumed
            })
        }
        Err(e) => {
            tracing::error!("cannot take the previous process's connections over: {e}");
            None
        }
    }
}

/// The state every thread shares, with the TLS material (loaded and sanity-checked only when
/// a TLS listener exists).
fn build_shared(
    cfg: &Config,
    env: &Env,
    listeners: &[listen::Listener],
) -> Result<Arc<Shared>, Failure> {
    let tls = if listeners.iter().any(|l| l.kind == ListenerKind::Tls) {
        let t = tls::TlsSettings::from_config(cfg).map_err(|e| (EXIT_NETWORK, e.to_string()))?;
        Some(Arc::new(t))
    } else {
        None
    };
    let splice_threshold = std::env::var("VIRTPROXYD_SPLICE_THRESHOLD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SPLICE_THRESHOLD);
    let tuning = Tuning {
        preopen_deadline: preopen_deadline(),
        drain_grace: DRAIN_GRACE,
        splice_threshold,
    };
    match Shared::new(cfg, route_table(cfg, env), tls, tuning) {
        Ok(s) => Ok(Arc::new(s)),
        Err(e) => Err((EXIT_NETWORK, format!("eventfd: {e}"))),
    }
}

/// `worker_threads`, or one per two CPUs when 0: the daemons behind the proxy need CPU as much
/// as the relay, and fewer workers each take more events per wake-up. On 2 vCPUs, 1 worker
/// against 2 cost 15-20 % less CPU per relayed call at 8 clients (fewer context switches: 0.6
/// per call against 1.1), at an equal or better call rate; equal at 1 client.
fn worker_count(cfg: &Config) -> usize {
    match cfg.worker_threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get().div_ceil(2))
            .unwrap_or(1),
        n => n as usize,
    }
}

fn backend(cfg: &Config) -> reactor::Kind {
    match cfg.io_backend {
        IoBackend::Auto => reactor::Kind::Auto,
        IoBackend::IoUring => reactor::Kind::IoUring,
        IoBackend::Epoll => reactor::Kind::Epoll,
    }
}

/// What each server run gives the admin thread. srv-update-tls re-reads the files named by
/// the configuration the daemon started with.
fn admin_opts(
    cfg: &Config,
    env: &Env,
    cli: &cli::Cli,
    log: &logging::LogControl,
) -> Box<dyn Fn() -> virtproxyd::admin::serve::AdminOpts> {
    let admin_cfg = cfg.clone();
    let admin_log = log.clone();
    let admin_settings = log_settings(cfg, env, cli.verbose, cli.daemon);
    Box::new(move || {
        let tls_cfg = admin_cfg.clone();
        virtproxyd::admin::serve::AdminOpts {
            log: Some(admin_log.clone()),
            log_settings: admin_settings.clone(),
            tls_reload: Some(Box::new(move || {
                tls::TlsSettings::from_config(&tls_cfg).map_err(|e| e.to_string())
            })),
            max_clients: admin_cfg.admin_max_clients,
        }
    })
}

/// The metrics thread, and the source the relay workers count into; none when metrics are off.
#[allow(clippy::type_complexity)]
fn start_metrics(
    sockets: Vec<virtproxyd::metrics::serve::MetricsSocket>,
    shared: &Arc<Shared>,
    started: std::time::SystemTime,
    workers: usize,
) -> Result<
    (
        Option<virtproxyd::metrics::serve::Handle>,
        Option<Arc<virtproxyd::metrics::Source>>,
    ),
    String,
> {
    if sockets.is_empty() {
        return Ok((None, None));
    }
    let source = Arc::new(virtproxyd::metrics::Source::new(
        shared.clone(),
        started,
        workers,
    ));
    let deadline = virtproxyd::metrics::serve::deadline_from_env();
    match virtproxyd::metrics::serve::spawn(sockets, source.clone(), deadline) {
        Ok(h) => Ok((Some(h), Some(source))),
        Err(e) => Err(format!("cannot start metrics: {e}")),
    }
}

/// What stays the same across the server runs of one process (a failed restart serves on in
/// a new run).
struct Serving {
    restart: Restart,
    config_path: Option<PathBuf>,
    workers: usize,
    backend: reactor::Kind,
    idle_timeout: Option<Duration>,
    shared: Arc<Shared>,
    handover: bool,
    was_activated: bool,
    metrics: Option<Arc<virtproxyd::metrics::Source>>,
    make_admin: Box<dyn Fn() -> virtproxyd::admin::serve::AdminOpts>,
    flush_log: logging::LogControl,
    reloader: std::rc::Rc<std::cell::RefCell<Reloader>>,
}

/// Where a hand-over leaves this process.
enum AfterHandOff {
    Exit(io::Result<Stopped>),
    /// The restart failed: serve on with everything as it was.
    ServeOn(Vec<listen::Listener>, handover::Resumed),
}

impl Serving {
    /// Serves until the process is to exit: runs the server again after a failed restart.
    fn serve(
        &self,
        mut listeners: Vec<listen::Listener>,
        mut resumed: Option<handover::Resumed>,
    ) -> io::Result<Stopped> {
        loop {
            match server::run(self.opts(std::mem::take(&mut listeners), resumed.take())) {
                Ok(Stopped::HandOver(h)) => match self.leave(h) {
                    AfterHandOff::Exit(stopped) => return stopped,
                    AfterHandOff::ServeOn(l, r) => (listeners, resumed) = (l, Some(r)),
                },
                other => return other,
            }
        }
    }

    fn opts(
        &self,
        listeners: Vec<listen::Listener>,
        resumed: Option<handover::Resumed>,
    ) -> ServerOpts {
        let check_exe = self.restart.exe.clone();
        let check_config = self.config_path.clone();
        let reloader = self.reloader.clone();
        ServerOpts {
            listeners,
            workers: self.workers,
            backend: self.backend,
            idle_timeout: self.idle_timeout,
            shared: self.shared.clone(),
            on_reload: Box::new(move |shared| reloader.borrow_mut().reload(shared)),
            admin: (self.make_admin)(),
            resumed,
            metrics: self.metrics.clone(),
            handover: self.handover,
            handover_check: Box::new(move || {
                handover::process::check_binary(&check_exe, check_config.as_deref())
            }),
        }
    }

    /// Hands the connections to the next process (execve or systemd's fd store).
    fn leave(&self, mut h: Box<handover::HandOff>) -> AfterHandOff {
        if h.mode == handover::HandOffMode::FdStore && self.was_activated {
            // systemd passes its sockets to the next process itself.
            h.listeners.clear();
        }
        self.flush_log.flush(Duration::from_secs(2));
        match handover::process::leave(&h, &self.restart.exe, &self.restart.args) {
            Ok(()) => {
                tracing::info!(
                    conns = h.carried.len(),
                    "connections handed to systemd's fd store"
                );
                AfterHandOff::Exit(Ok(Stopped::Signal(libc::SIGTERM)))
            }
            Err(why) if h.mode == handover::HandOffMode::Exec => {
                tracing::error!("restart failed, still serving: {why}");
                let mut h = *h;
                for t in std::mem::take(&mut h.stopping) {
                    let _ = t.join();
                }
                self.shared
                    .handover
                    .requested
                    .store(false, Ordering::Release);
                self.shared.shutdown.store(false, Ordering::Release);
                AfterHandOff::ServeOn(
                    h.listeners,
                    handover::Resumed {
                        carried: h.carried,
                        next_id: h.next_id,
                        began_ns: None,
                    },
                )
            }
            Err(why) => {
                tracing::error!("restart hand-over failed; clients are closed: {why}");
                AfterHandOff::Exit(Ok(Stopped::Signal(libc::SIGTERM)))
            }
        }
    }
}

/// The process's exit status (libvirt-rpc.md §8.6).
fn exit_code(stopped: io::Result<Stopped>) -> i32 {
    match stopped {
        Ok(Stopped::IdleTimeout) => {
            // The limit may have come from daemon-timeout rather than --timeout.
            tracing::info!("no client for the idle timeout; exiting");
            0
        }
        Ok(Stopped::Signal(_)) | Ok(Stopped::HandOver(_)) => 0,
        Err(e) => {
            tracing::error!("server failed: {e}");
            EXIT_NETWORK
        }
    }
}

/// The metrics endpoint's sockets: an activated `virtproxyd-metrics.socket` wins over
/// `metrics_listen` (as systemd's sockets win over the listen keys); none = off.
fn metrics_sockets(
    cfg: &Config,
    activated: Vec<std::os::fd::OwnedFd>,
) -> Result<Vec<virtproxyd::metrics::serve::MetricsSocket>, listen::ListenError> {
    use virtproxyd::metrics::serve;
    if !activated.is_empty() {
        if !cfg.metrics_listen.is_empty() {
            tracing::info!("'metrics_listen' is ignored: virtproxyd-metrics.socket is activated");
        }
        return Ok(activated
            .into_iter()
            .map(serve::MetricsSocket::activated)
            .collect());
    }
    serve::bind(&cfg.metrics_listen, cfg.unix_sock_group.as_deref())
}

/// Creates the UNIX sockets from the config (no socket activation).
fn create_listeners(cfg: &Config, env: &Env) -> Result<Vec<listen::Listener>, listen::ListenError> {
    let backlog = if cfg.max_queued_clients == 0 {
        30
    } else {
        cfg.max_queued_clients
    };
    let mut specs = vec![(
        cfg.unix_sock_dir.join("libvirt-sock"),
        cfg.unix_sock_rw_perms,
        ListenerKind::UnixRw,
    )];
    // An unprivileged daemon has no read-only socket (libvirt-rpc.md §8.1).
    if env.privileged {
        specs.push((
            cfg.unix_sock_dir.join("libvirt-sock-ro"),
            cfg.unix_sock_ro_perms,
            ListenerKind::UnixRo,
        ));
    }
    // Created wherever libvirt creates it (admin::serve answers on it).
    if let Some(admin) = cfg.admin_socket_path() {
        specs.push((admin, cfg.unix_sock_admin_perms, ListenerKind::UnixAdmin));
    }
    let mut listeners: Vec<listen::Listener> = Vec::new();
    let addrs: Vec<String> = cfg.listen_addr.iter().cloned().collect();
    let ip = [
        (cfg.listen_tcp, &cfg.tcp_port, ListenerKind::Tcp),
        (cfg.listen_tls, &cfg.tls_port, ListenerKind::Tls),
    ];
    for (on, port, kind) in ip {
        if on {
            match listen::bind_tcp(&addrs, port, backlog, kind) {
                Ok(mut l) => listeners.append(&mut l),
                Err(e) => return Err(e),
            }
        }
    }
    for (path, mode, kind) in specs {
        match listen::bind_unix(&path, mode, cfg.unix_sock_group.as_deref(), backlog, kind) {
            Ok(l) => {
                tracing::info!("listening on {}", path.display());
                listeners.push(l);
            }
            Err(e) => {
                for l in &listeners {
                    l.unlink();
                }
                return Err(e);
            }
        }
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::marker_times;

    #[test]
    fn exec_marker_gives_quiesce_and_execve_times() {
        assert_eq!(marker_times(Some("12:34")), (Some(12), Some(34)));
        // An older binary's marker says only that it re-executed.
        assert_eq!(marker_times(Some("1")), (None, None));
        assert_eq!(marker_times(Some("x:34")), (None, Some(34)));
        assert_eq!(marker_times(None), (None, None));
    }
}
