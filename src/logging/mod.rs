//! Logging as libvirt's daemons do it: `log_level`, `log_filters`, `log_outputs`, the
//! `LIBVIRT_DEBUG` / `LIBVIRT_LOG_FILTERS` / `LIBVIRT_LOG_OUTPUTS` environment, `-v`, and the
//! default output (journald under systemd without a tty, else stderr; a file when daemonized
//! without journald). The settings as text live in `spec` (sans-IO); this module turns them
//! into one `tracing` layer whose state is swapped whole when SIGHUP or an admin call
//! changes it, so the hot path reads it without a lock and callsites that nothing wants stay
//! disabled (tracing's interest cache is rebuilt on every change).

pub mod spec;

use std::ffi::CString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

pub use spec::{Dest, Filter, Output, Priority, SpecError};

/// Lines about clients' misbehaviour the whole process may log per second: the per-connection
/// budget (`handshake::CLIENT_LOG_LINES`) alone would let a peer that reconnects at line rate
/// grow the log without bound.
const CLIENT_LINES_PER_SEC: u32 = 50;

static CLIENT_LINES_SECOND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static CLIENT_LINES_IN_SECOND: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static CLIENT_LINES_SUPPRESSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether a line about a client's misbehaviour may be logged now (at most
/// `CLIENT_LINES_PER_SEC` a second, process-wide). The first line of a second says how many
/// were suppressed before it. Races between threads at a second's edge only let a few more
/// through.
pub fn client_line_allowed() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if CLIENT_LINES_SECOND.swap(now, Relaxed) != now {
        CLIENT_LINES_IN_SECOND.store(0, Relaxed);
        let suppressed = CLIENT_LINES_SUPPRESSED.swap(0, Relaxed);
        if suppressed > 0 {
            tracing::warn!("{suppressed} log lines about misbehaving clients were suppressed");
        }
    }
    if CLIENT_LINES_IN_SECOND.fetch_add(1, Relaxed) < CLIENT_LINES_PER_SEC {
        true
    } else {
        CLIENT_LINES_SUPPRESSED.fetch_add(1, Relaxed);
        false
    }
}

/// Where libvirt's default outputs and its journald check look.
const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// The settings a daemon starts from, before the environment and `-v` are applied.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `log_level`; 0 keeps the default (warning).
    pub level: u32,
    pub filters: Option<String>,
    pub outputs: Option<String>,
    pub verbose: bool,
    /// Whether the process daemonizes (`-d`): a file is then the fallback output.
    pub daemon: bool,
    pub privileged: bool,
    /// The user's cache directory for an unprivileged daemon's log file.
    pub cache_dir: Option<std::path::PathBuf>,
}

/// The resolved configuration: what `virDaemonSetupLogging` ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub default: Priority,
    pub filters: Vec<Filter>,
    pub outputs: Vec<Output>,
}

/// An environment lookup (the process environment, or a map in tests).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Applies config, then environment, then `-v`, then the default output, in libvirt's order
/// (`virDaemonSetupLogging`). An error names the setting and libvirt's reason.
pub fn resolve(s: &Settings, env: EnvLookup<'_>, stdin_tty: bool) -> Result<Resolved, String> {
    let mut default = match s.level {
        0 => Priority::Warn,
        n => Priority::from_number(n).ok_or_else(|| format!("log_level: invalid value {n}"))?,
    };
    let mut filters = spec::parse_filters(s.filters.as_deref().unwrap_or(""))
        .map_err(|e| format!("log_filters: {e}"))?;
    let mut outputs = spec::parse_outputs(s.outputs.as_deref().unwrap_or(""))
        .map_err(|e| format!("log_outputs: {e}"))?;
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(v) = set("LIBVIRT_DEBUG") {
        default = spec::parse_level(&v).map_err(|e| format!("LIBVIRT_DEBUG: {e}"))?;
    }
    if let Some(v) = set("LIBVIRT_LOG_FILTERS") {
        filters = spec::parse_filters(&v).map_err(|e| format!("LIBVIRT_LOG_FILTERS: {e}"))?;
    }
    if let Some(v) = set("LIBVIRT_LOG_OUTPUTS") {
        outputs = spec::parse_outputs(&v).map_err(|e| format!("LIBVIRT_LOG_OUTPUTS: {e}"))?;
    }
    if s.verbose && default > Priority::Info {
        default = Priority::Info;
    }
    if outputs.is_empty() {
        outputs = default_outputs(s, default, stdin_tty, journald_available());
    }
    Ok(Resolved {
        default,
        filters,
        outputs,
    })
}

fn journald_available() -> bool {
    nix::unistd::access(JOURNALD_SOCKET, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// `virLogSetDefaultOutput`: journald keeps debug out (it rate-limits), so it gets info.
fn default_outputs(
    s: &Settings,
    default: Priority,
    stdin_tty: bool,
    journald: bool,
) -> Vec<Output> {
    let journald_out = Output {
        priority: default.max(Priority::Info),
        dest: Dest::Journald,
    };
    if s.daemon {
        if journald {
            return vec![journald_out];
        }
        let file = if s.privileged {
            std::path::PathBuf::from("/var/log/libvirt/virtproxyd.log")
        } else {
            s.cache_dir
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from("."))
                .join("virtproxyd.log")
        };
        return vec![Output {
            priority: default,
            dest: Dest::File(file),
        }];
    }
    if !stdin_tty && journald {
        vec![journald_out]
    } else {
        vec![Output {
            priority: default,
            dest: Dest::Stderr,
        }]
    }
}

/// An output ready to write.
enum Sink {
    Stderr,
    Journald,
    /// Its identity lives in `syslog_ident`'s never-freed storage.
    Syslog,
    File(std::fs::File),
}

struct Active {
    default: Priority,
    filters: Vec<Filter>,
    /// Shared between states, so a filter change keeps the open files and syslog as they are.
    outputs: Arc<Vec<(Output, Sink)>>,
}

impl Active {
    fn threshold(&self, target: &str) -> Priority {
        if self.filters.is_empty() {
            return self.default;
        }
        let name = spec::source_name(target);
        self.filters
            .iter()
            .find(|f| crate::glob::glob_match(&f.pattern, &name))
            .map_or(self.default, |f| f.priority)
    }

    fn wants(&self, meta: &Metadata<'_>) -> bool {
        let p = Priority::of(meta.level());
        p >= self.threshold(meta.target()) && self.outputs.iter().any(|(o, _)| p >= o.priority)
    }
}

/// The NUL-terminated copy of `ident` that `openlog` is given, made once per distinct identity
/// and never freed. glibc keeps the pointer, and Cyrus SASL (any library, any thread) calls
/// syslog(3) on its own at any time, so the identity must outlive every output swap; freeing
/// it after a `closelog` would still race a reader of an old output set that logs (and so
/// reopens) concurrently. Interning bounds the leak to the identities ever configured.
fn syslog_ident(ident: &str) -> Result<&'static std::ffi::CStr, String> {
    static IDENTS: std::sync::Mutex<Vec<&'static std::ffi::CStr>> =
        std::sync::Mutex::new(Vec::new());
    let mut idents = IDENTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(id) = idents.iter().find(|id| id.to_bytes() == ident.as_bytes()) {
        return Ok(id);
    }
    let id = CString::new(ident).map_err(|_| format!("syslog identity '{ident}' contains NUL"))?;
    let id: &'static std::ffi::CStr = Box::leak(id.into_boxed_c_str());
    idents.push(id);
    Ok(id)
}

/// Tests also copy syslog's lines to stderr, where they can see the identity it used.
const OPENLOG_FLAGS: libc::c_int = if cfg!(test) {
    libc::LOG_PID | libc::LOG_PERROR
} else {
    libc::LOG_PID
};

fn open_sinks(outputs: &[Output]) -> Result<Vec<(Output, Sink)>, String> {
    let mut syslog_open = false;
    outputs
        .iter()
        .map(|o| {
            let sink = match &o.dest {
                Dest::Stderr => Sink::Stderr,
                Dest::Journald => Sink::Journald,
                Dest::Syslog(ident) => {
                    let id = syslog_ident(ident)?;
                    if !syslog_open {
                        // SAFETY: `id` is 'static, so valid for as long as syslog keeps it.
                        unsafe { libc::openlog(id.as_ptr(), OPENLOG_FLAGS, libc::LOG_DAEMON) };
                        syslog_open = true;
                    }
                    Sink::Syslog
                }
                Dest::File(path) => {
                    if let Some(dir) = path.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|e| format!("cannot open log file '{}': {e}", path.display()))?;
                    Sink::File(f)
                }
            };
            Ok((o.clone(), sink))
        })
        .collect()
}

fn has_syslog(sinks: &[(Output, Sink)]) -> bool {
    sinks.iter().any(|(_, s)| matches!(s, Sink::Syslog))
}

/// Changes logging at run time (SIGHUP, admin calls). Cheap to clone.
#[derive(Clone)]
pub struct LogControl {
    active: Arc<ArcSwap<Active>>,
    writer: Arc<Writer>,
}

/// Lines waiting for the writer thread beyond which new ones are dropped (and counted): a
/// slow disk, journald or syslog then costs lines, never a relay worker's time.
const WRITER_QUEUE: usize = 4096;

/// One event, formatted where it happened, written by the writer thread.
struct Record {
    outputs: Arc<Vec<(Output, Sink)>>,
    meta: &'static Metadata<'static>,
    prio: Priority,
    msg: String,
    /// The file/stderr line (it names the thread that logged, so it is made there).
    line: Option<String>,
}

enum Job {
    Write(Record),
    /// Everything queued before it is written: answer on the channel.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The writer thread's queue, once started (`LogControl::start_writer`); before that (and
/// before a daemon's fork, which no thread survives) events are written where they happen.
#[derive(Default)]
struct Writer {
    queue: std::sync::OnceLock<std::sync::mpsc::SyncSender<Job>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Writer {
    fn submit(&self, record: Record) {
        match self.queue.get() {
            None => record.write(),
            Some(q) => {
                if q.try_send(Job::Write(record)).is_err() {
                    self.dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    fn run(&self, jobs: std::sync::mpsc::Receiver<Job>) {
        for job in jobs {
            match job {
                Job::Write(record) => {
                    let dropped = self.dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
                    if dropped > 0 {
                        Record {
                            outputs: record.outputs.clone(),
                            meta: record.meta,
                            prio: Priority::Warn,
                            msg: format!(
                                "{dropped} log messages dropped: the log outputs did not keep up"
                            ),
                            line: None,
                        }
                        .write();
                    }
                    record.write();
                }
                Job::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

impl Record {
    fn write(self) {
        let Record {
            outputs,
            meta,
            prio,
            msg,
            mut line,
        } = self;
        for (out, sink) in outputs.iter() {
            if prio < out.priority {
                continue;
            }
            match sink {
                Sink::Stderr | Sink::File(_) => {
                    let l = line.get_or_insert_with(|| file_line(meta, prio, &msg));
                    let _ = match sink {
                        Sink::File(f) => (&*f).write_all(l.as_bytes()),
                        _ => std::io::stderr().write_all(l.as_bytes()),
                    };
                }
                Sink::Journald => journald(meta, prio, &msg),
                Sink::Syslog => {
                    if let Ok(c) = CString::new(msg.replace('\0', " ")) {
                        // SAFETY: a constant format and a NUL-terminated argument.
                        unsafe {
                            libc::syslog(
                                libc::LOG_DAEMON | i32::from(prio.syslog()),
                                c"%s".as_ptr(),
                                c.as_ptr(),
                            )
                        };
                    }
                }
            }
        }
    }
}

impl LogControl {
    fn swap(&self, default: Priority, filters: Vec<Filter>, outputs: Arc<Vec<(Output, Sink)>>) {
        self.active.store(Arc::new(Active {
            default,
            filters,
            outputs,
        }));
        tracing::callsite::rebuild_interest_cache();
    }

    /// Opens `outputs` and installs them with `default` and `filters`.
    fn swap_outputs(
        &self,
        default: Priority,
        filters: Vec<Filter>,
        outputs: &[Output],
    ) -> Result<(), String> {
        let had_syslog = has_syslog(&self.active.load().outputs);
        let sinks = Arc::new(open_sinks(outputs)?);
        let closing = had_syslog && !has_syslog(&sinks);
        self.swap(default, filters, sinks);
        if closing {
            // As libvirt's syslog output close: later foreign syslog(3) calls (SASL) go out
            // under glibc's default identity rather than ours.
            // SAFETY: no arguments; the identity stays valid regardless (see syslog_ident).
            unsafe { libc::closelog() };
        }
        Ok(())
    }

    /// The current filters as `virLogGetFilters` prints them.
    pub fn filters(&self) -> String {
        spec::format_filters(&self.active.load().filters)
    }

    /// The current outputs as `virLogGetOutputs` prints them.
    pub fn outputs(&self) -> String {
        let a = self.active.load();
        let outs: Vec<Output> = a.outputs.iter().map(|(o, _)| o.clone()).collect();
        spec::format_outputs(&outs)
    }

    /// Replaces the filters (an admin call); empty text clears them.
    pub fn set_filters(&self, text: &str) -> Result<(), SpecError> {
        let filters = spec::parse_filters(text)?;
        let a = self.active.load();
        self.swap(a.default, filters, a.outputs.clone());
        Ok(())
    }

    /// Replaces the outputs (an admin call); empty text restores the default output.
    pub fn set_outputs(&self, text: &str, settings: &Settings) -> Result<(), SpecError> {
        let mut outs = spec::parse_outputs(text)?;
        let a = self.active.load();
        if outs.is_empty() {
            outs = default_outputs(settings, a.default, stdin_is_tty(), journald_available());
        }
        self.swap_outputs(a.default, a.filters.clone(), &outs)
            .map_err(SpecError)
    }

    /// Applies a whole new resolution (SIGHUP).
    pub fn apply(&self, r: &Resolved) -> Result<(), String> {
        self.swap_outputs(r.default, r.filters.clone(), &r.outputs)
    }

    /// From now on events are written by a thread of their own, so a slow output never
    /// stalls the thread that logged (a relay worker). Call once, after any fork.
    pub fn start_writer(&self) -> std::io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(WRITER_QUEUE);
        let writer = self.writer.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run(rx))?;
        let _ = self.writer.queue.set(tx);
        Ok(())
    }

    /// Waits (at most `limit`) until everything logged so far is written.
    pub fn flush(&self, limit: std::time::Duration) {
        if let Some(q) = self.writer.queue.get() {
            let (tx, rx) = std::sync::mpsc::channel();
            if q.send(Job::Flush(tx)).is_ok() {
                let _ = rx.recv_timeout(limit);
            }
        }
    }
}

fn stdin_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// Resolves the settings against the process environment and installs the global logger.
pub fn install(settings: &Settings) -> Result<LogControl, String> {
    let r = resolve(settings, &|k| std::env::var(k).ok(), stdin_is_tty())?;
    let active = Arc::new(ArcSwap::from_pointee(Active {
        default: r.default,
        filters: r.filters,
        outputs: Arc::new(open_sinks(&r.outputs)?),
    }));
    let writer = Arc::new(Writer::default());
    let control = LogControl {
        active: active.clone(),
        writer: writer.clone(),
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(LibvirtLayer { active, writer })
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(control)
}

struct LibvirtLayer {
    active: Arc<ArcSwap<Active>>,
    writer: Arc<Writer>,
}

impl<S: Subscriber> Layer<S> for LibvirtLayer {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        if self.active.load().wants(meta) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        self.active.load().wants(meta)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let a = self.active.load();
        let meta = event.metadata();
        let prio = Priority::of(meta.level());
        if prio < a.threshold(meta.target()) {
            return;
        }
        let mut text = Message::default();
        event.record(&mut text);
        let msg = text.0;
        let to_file = a
            .outputs
            .iter()
            .any(|(o, s)| prio >= o.priority && matches!(s, Sink::Stderr | Sink::File(_)));
        self.writer.submit(Record {
            outputs: a.outputs.clone(),
            meta,
            prio,
            line: to_file.then(|| file_line(meta, prio, &msg)),
            msg,
        });
    }
}

/// The event's message followed by its other fields as `key=value`.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let rest = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}");
            if !rest.is_empty() {
                self.0.push(' ');
                self.0.push_str(&rest);
            }
        } else {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
}

/// libvirt's line: `<timestamp>: <thread id>: <priority> : <source>:<line> : <message>`.
fn file_line(meta: &Metadata<'_>, prio: Priority, msg: &str) -> String {
    // SAFETY: gettid has no failure mode.
    let tid = unsafe { libc::gettid() };
    format!(
        "{}: {tid}: {} : {}:{} : {msg}\n",
        timestamp(std::time::SystemTime::now()),
        prio.word(),
        meta.target(),
        meta.line().unwrap_or(0)
    )
}

/// `2026-11-27 04:58:01.123+0000`, UTC, as `virTimeStringNowRaw` prints it.
fn timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}+0000",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// One journald entry with libvirt's fields (`virLogOutputToJournald`).
fn journald(meta: &Metadata<'_>, prio: Priority, msg: &str) {
    use libsystemd::logging::{journal_send, Priority as JP};
    let p = match prio {
        Priority::Debug => JP::Debug,
        Priority::Info => JP::Info,
        Priority::Warn => JP::Warning,
        Priority::Error => JP::Error,
    };
    let line = meta.line().unwrap_or(0).to_string();
    let vars = [
        ("SYSLOG_FACILITY", "3"),
        ("SYSLOG_IDENTIFIER", "virtproxyd"),
        ("LIBVIRT_SOURCE", meta.target()),
        ("CODE_FILE", meta.file().unwrap_or("")),
        ("CODE_LINE", line.as_str()),
        ("CODE_FUNC", meta.module_path().unwrap_or("")),
    ];
    let _ = journal_send(p, msg, vars.into_iter());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn config_then_environment_then_verbose() {
        let s = Settings {
            level: 3,
            filters: Some("1:rpc".into()),
            outputs: Some("3:stderr".into()),
            verbose: true,
            ..Settings::default()
        };
        let r = resolve(&s, &env(&[]), true).unwrap();
        assert_eq!(r.default, Priority::Info);
        assert_eq!(spec::format_filters(&r.filters), "1:*rpc* ");
        let r = resolve(
            &s,
            &env(&[
                ("LIBVIRT_DEBUG", "error"),
                ("LIBVIRT_LOG_FILTERS", "4:util"),
                ("LIBVIRT_LOG_OUTPUTS", "1:file:/tmp/x.log"),
            ]),
            true,
        )
        .unwrap();
        // -v still raises the level above the environment's.
        assert_eq!(r.default, Priority::Info);
        assert_eq!(spec::format_filters(&r.filters), "4:*util* ");
        assert_eq!(spec::format_outputs(&r.outputs), "1:file:/tmp/x.log");
    }

    #[test]
    fn malformed_settings_name_the_key() {
        let s = Settings {
            outputs: Some("9:bogus".into()),
            ..Settings::default()
        };
        assert_eq!(
            resolve(&s, &env(&[]), true).unwrap_err(),
            "log_outputs: Invalid log priority '9' for log output '9:bogus'"
        );
        let s = Settings::default();
        let e = resolve(&s, &env(&[("LIBVIRT_LOG_FILTERS", "x")]), true).unwrap_err();
        assert_eq!(e, "LIBVIRT_LOG_FILTERS: Malformed format for filter 'x'");
    }

    #[test]
    fn default_output_follows_libvirts_choice() {
        let s = Settings::default();
        let d = |tty, journald| default_outputs(&s, Priority::Debug, tty, journald);
        assert_eq!(spec::format_outputs(&d(false, true)), "2:journald");
        assert_eq!(spec::format_outputs(&d(true, true)), "1:stderr");
        assert_eq!(spec::format_outputs(&d(false, false)), "1:stderr");
        let s = Settings {
            daemon: true,
            privileged: true,
            ..Settings::default()
        };
        assert_eq!(
            spec::format_outputs(&default_outputs(&s, Priority::Warn, false, false)),
            "3:file:/var/log/libvirt/virtproxyd.log"
        );
    }

    #[test]
    fn first_matching_filter_wins() {
        let a = Active {
            default: Priority::Warn,
            filters: spec::parse_filters("4:rpc.relay 1:rpc").unwrap(),
            outputs: Arc::new(vec![]),
        };
        assert_eq!(a.threshold("virtproxyd::relay::pump"), Priority::Error);
        assert_eq!(a.threshold("virtproxyd::worker"), Priority::Debug);
        assert_eq!(a.threshold("virtproxyd::handshake"), Priority::Warn);
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_755_481_123);
        assert_eq!(timestamp(t), "2026-11-27 04:58:01.123+0000");
    }

    const SYSLOG_CHILD: &str = "VIRTPROXYD_TEST_SYSLOG_CHILD";

    fn control(outputs: &str) -> LogControl {
        let outs = spec::parse_outputs(outputs).unwrap();
        LogControl {
            active: Arc::new(ArcSwap::from_pointee(Active {
                default: Priority::Info,
                filters: vec![],
                outputs: Arc::new(open_sinks(&outs).unwrap()),
            })),
            writer: Arc::new(Writer::default()),
        }
    }

    /// What Cyrus SASL does on its own: log through syslog(3) with whatever ident is set.
    fn foreign_syslog(msg: &str) {
        let c = CString::new(msg).unwrap();
        // SAFETY: a constant format and a NUL-terminated argument.
        unsafe { libc::syslog(libc::LOG_INFO, c"%s".as_ptr(), c.as_ptr()) };
    }

    /// Runs in a child process (syslog's state is process-wide): switches syslog away and
    /// back, reusing the heap in between as any later allocation would.
    fn syslog_switch_child() {
        let c = control("1:syslog:identA");
        foreign_syslog("probe-a");
        c.apply(&Resolved {
            default: Priority::Info,
            filters: vec![],
            outputs: spec::parse_outputs("1:stderr").unwrap(),
        })
        .unwrap();
        let spray: Vec<CString> = (0..4096).map(|_| CString::new("XXXXXX").unwrap()).collect();
        foreign_syslog("probe-none");
        drop(spray);
        c.apply(&Resolved {
            default: Priority::Info,
            filters: vec![],
            outputs: spec::parse_outputs("1:syslog:identB").unwrap(),
        })
        .unwrap();
        foreign_syslog("probe-b");
    }

    #[test]
    fn syslog_ident_stays_valid_after_switching_away() {
        if std::env::var_os(SYSLOG_CHILD).is_some() {
            syslog_switch_child();
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "logging::tests::syslog_ident_stays_valid_after_switching_away",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SYSLOG_CHILD, "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let ident = |l: &str| l.split('[').next().unwrap_or("").to_string();
        let line = |probe: &str| {
            err.lines()
                .find(|l| l.ends_with(&format!("]: {probe}")))
                .unwrap_or_else(|| panic!("no {probe} in {err}"))
                .to_string()
        };
        assert_eq!(ident(&line("probe-a")), "identA");
        // Away from syslog, syslog is closed as libvirt does: glibc's own default ident.
        let prog = exe.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(ident(&line("probe-none")), prog);
        assert_eq!(ident(&line("probe-b")), "identB");
    }
}
