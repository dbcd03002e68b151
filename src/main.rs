//! `virtproxyd`: CLI → config → listeners → relay workers.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use virtproxyd::cli::{self, Command};
use virtproxyd::config::{Config, Env, IoBackend};
use virtproxyd::daemon::{self, PidFile};
use virtproxyd::listen;
use virtproxyd::reactor;
use virtproxyd::route::RouteTable;
use virtproxyd::server::{self, ServerOpts, Stopped};
use virtproxyd::worker::{ListenerKind, Shared};

/// Exit statuses used by libvirt daemons (libvirt-rpc.md §8.6).
const EXIT_CONFIG: i32 = 1;
const EXIT_NETWORK: i32 = 6;

/// Bodies of at least this many bytes are spliced. `cargo bench --bench splice_threshold`:
/// copy wins up to 4 KiB bodies, splice from 16 KiB (throughput and CPU). Overridable for
/// benchmarking with VIRTPROXYD_SPLICE_THRESHOLD.
const SPLICE_THRESHOLD: usize = 16 * 1024;

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
        Err(e) => {
            eprintln!("{argv0}: {e}");
            eprint!("{}", cli::usage(&argv0));
            std::process::exit(1);
        }
    };
    std::process::exit(run(&argv0, cli));
}

fn init_logging(cfg: &Config, verbose: bool) {
    // log_level: 1 debug, 2 info, 3 warning, 4 error; 0 = library default (warnings).
    let level = match (cfg.log_level, verbose) {
        (1, _) => "debug",
        (2, _) => "info",
        (_, true) => "info",
        (4, _) => "error",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIRTPROXYD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(argv0: &str, cli: cli::Cli) -> i32 {
    let env = Env::from_process();
    let cfg = match Config::load(cli.config.as_deref(), &env)
        .and_then(|c| c.validate_supported().map(|_| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{argv0}: error: Can't load config file: {e}");
            return EXIT_CONFIG;
        }
    };
    init_logging(&cfg, cli.verbose);
    for key in &cfg.unknown_keys {
        tracing::debug!("ignoring unknown config key '{key}'");
    }

    // Fork before any thread exists.
    let ready = if cli.daemon {
        match daemon::daemonize(argv0) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{argv0}: error: cannot daemonize: {e}");
                return EXIT_CONFIG;
            }
        }
    } else {
        None
    };
    let fail = |ready: Option<daemon::ReadyPipe>, code: i32| {
        if let Some(r) = ready {
            r.report(code as u8);
        }
        code
    };

    let pid_path = cli.pid_file.clone().unwrap_or_else(|| {
        daemon::default_pid_file(
            env.privileged,
            env.xdg_runtime_dir.as_deref(),
            env.home.as_deref(),
        )
    });
    let _pid_file = match PidFile::acquire(&pid_path) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{argv0}: error: {e}");
            return fail(ready, EXIT_CONFIG);
        }
    };

    let backlog = if cfg.max_queued_clients == 0 {
        30
    } else {
        cfg.max_queued_clients
    };
    let mut listeners = Vec::new();
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
    for (path, mode, kind) in specs {
        match listen::bind_unix(&path, mode, cfg.unix_sock_group.as_deref(), backlog, kind) {
            Ok(l) => {
                tracing::info!("listening on {}", path.display());
                listeners.push(l);
            }
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("{argv0}: error: {e}");
                for l in &listeners {
                    l.unlink();
                }
                return fail(ready, EXIT_NETWORK);
            }
        }
    }

    let splice_threshold = std::env::var("VIRTPROXYD_SPLICE_THRESHOLD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SPLICE_THRESHOLD);
    let shared = Arc::new(Shared {
        routes: RouteTable::new(
            cfg.driver_socket_dir.clone(),
            cfg.driver_sockets.clone(),
            !env.privileged,
        ),
        clients: AtomicUsize::new(0),
        shutdown: AtomicBool::new(false),
        splice_threshold,
    });
    let workers = match cfg.worker_threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n as usize,
    };
    let backend = match cfg.io_backend {
        IoBackend::Auto => reactor::Kind::Auto,
        IoBackend::IoUring => reactor::Kind::IoUring,
        IoBackend::Epoll => reactor::Kind::Epoll,
    };
    // SIGPIPE must not kill us when a peer vanishes mid-splice.
    // SAFETY: setting a signal disposition to ignore.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    if let Some(r) = ready {
        r.report(0);
    }
    let opts = ServerOpts {
        listeners,
        workers,
        backend,
        max_clients: cfg.max_clients as usize,
        idle_timeout: (cli.timeout > 0).then(|| Duration::from_secs(cli.timeout.into())),
        shared,
    };
    match server::run(opts) {
        Ok(Stopped::IdleTimeout) => {
            tracing::info!("no client for {} s; exiting", cli.timeout);
            0
        }
        Ok(Stopped::Signal(_)) => 0,
        Err(e) => {
            tracing::error!("server failed: {e}");
            EXIT_NETWORK
        }
    }
}
