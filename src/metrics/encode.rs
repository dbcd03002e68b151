//! A scrape: a plain [`Snapshot`] of the values, then its exposition through
//! `prometheus-client`'s collector API (both text formats from the same code).
//!
//! Series bound: everything here is fixed except `virtproxyd_worker_*` (three per relay
//! worker, a number fixed at start) and `virtproxyd_calls_total` (at most two per named
//! procedure plus two for `unknown`: `2 * names::SLOTS`). No label carries a client.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::counters::{
    driver_labels, Direction, HistogramTotals, Rejected, WorkerTotals, AUTH_METHODS, AUTH_RESULTS,
    CALL_RESULTS, CLOSE_REASONS, CONN_LISTENERS, DURATION_BOUNDS_NS, FRAME_TYPES,
    LATENCY_BOUNDS_NS,
};
use super::http::Format;
use super::names;

/// Listener labels of `virtproxyd_clients_by_listener`, in [`Snapshot::by_listener`] order.
pub const LISTENERS: [&str; 4] = ["unix_rw", "unix_ro", "tcp", "tls"];

/// Results of requests to the endpoint itself, in [`Snapshot::requests`] order.
pub const REQUEST_RESULTS: [&str; 7] = [
    "ok",
    "not_found",
    "method_not_allowed",
    "bad_request",
    "too_large",
    "version_not_supported",
    "timeout",
];

/// How `/clients` requests were answered, in [`Snapshot::clients_pages`] order: with
/// figures collected from the workers for it, or with the page of an earlier request (see
/// `serve::CLIENTS_PAGE_REUSE`).
pub const CLIENTS_PAGE_ANSWERS: [&str; 2] = ["collected", "reused"];

/// Everything one scrape reports, read once (so the two formats and HEAD agree).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// virtproxyd-rs's version.
    pub version: &'static str,
    /// The daemon's start, seconds since the epoch.
    pub start_time: f64,
    /// srv-clients-info: nclients, nclients_max, nclients_unauth, nclients_unauth_max.
    pub clients: u64,
    pub clients_max: u64,
    pub clients_unauth: u64,
    pub clients_unauth_max: u64,
    /// Relayed clients by the listener they came in on ([`LISTENERS`] order).
    pub by_listener: [u64; 4],
    /// Connected admin clients.
    pub admin_clients: u64,
    /// srv-threadpool-info of the `virtproxyd` server: the relay workers (fixed at start;
    /// always free, nothing queues, no priority workers).
    pub workers: u64,
    /// The idle exit limit in seconds (0 = none).
    pub idle_timeout: u64,
    /// Requests to this endpoint by [`REQUEST_RESULTS`].
    pub requests: [u64; REQUEST_RESULTS.len()],
    /// Connections refused before a relay worker took them on, by [`Rejected`] index.
    pub rejected: [u64; Rejected::ALL.len()],
    /// `/clients` answers by [`CLIENTS_PAGE_ANSWERS`].
    pub clients_pages: [u64; CLIENTS_PAGE_ANSWERS.len()],
    /// The relay's counters, once a set is attached.
    pub relay: Option<WorkerTotals>,
}

type Enc<'a> = DescriptorEncoder<'a>;

fn gauge(e: &mut Enc<'_>, name: &str, help: &str, unit: Option<&Unit>, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit, g.metric_type())?)
}

fn gauge_u(e: &mut Enc<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family with one label; `values` are (label value, count).
fn counter_family<'v>(
    e: &mut Enc<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    label: &str,
    values: impl IntoIterator<Item = (&'v str, u64)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (v, n) in values {
        ConstCounter::new(n).encode(m.encode_family(&[(label, v)])?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        {
            let mut m = e.encode_descriptor(
                "virtproxyd_build",
                "virtproxyd-rs build; the libvirt release its procedure names come from",
                None,
                MetricType::Info,
            )?;
            m.encode_info(&[
                ("version", self.version),
                ("libvirt", super::procedures::LIBVIRT_VERSION),
            ])?;
        }
        gauge(
            &mut e,
            "virtproxyd_start_time",
            "When the daemon started, seconds since the epoch",
            Some(&Unit::Seconds),
            self.start_time,
        )?;
        gauge_u(
            &mut e,
            "virtproxyd_clients",
            "Connected clients (srv-clients-info nclients)",
            self.clients,
        )?;
        gauge_u(
            &mut e,
            "virtproxyd_clients_max",
            "Client limit max_clients (srv-clients-info nclients_max)",
            self.clients_max,
        )?;
        gauge_u(
            &mut e,
            "virtproxyd_clients_unauthenticated",
            "Clients not yet authenticated (srv-clients-info nclients_unauth)",
            self.clients_unauth,
        )?;
        gauge_u(
            &mut e,
            "virtproxyd_clients_unauthenticated_max",
            "Limit max_anonymous_clients, 0 = none (srv-clients-info nclients_unauth_max)",
            self.clients_unauth_max,
        )?;
        {
            let mut m = e.encode_descriptor(
                "virtproxyd_clients_by_listener",
                "Connected clients by the listener they came in on",
                None,
                MetricType::Gauge,
            )?;
            for (l, &n) in LISTENERS.iter().zip(&self.by_listener) {
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&[("listener", *l)])?)?;
            }
        }
        gauge_u(
            &mut e,
            "virtproxyd_admin_clients",
            "Connected virt-admin clients",
            self.admin_clients,
        )?;
        gauge_u(
            &mut e,
            "virtproxyd_idle_timeout_seconds",
            "Idle exit limit (--timeout or daemon-timeout), 0 = never",
            self.idle_timeout,
        )?;
        // srv-threadpool-info: relay workers are all started at once and never busy in
        // libvirt's sense (a job), so min = max = current = free.
        for (name, help, v) in [
            (
                "virtproxyd_threadpool_min_workers",
                "srv-threadpool-info minWorkers",
                self.workers,
            ),
            (
                "virtproxyd_threadpool_max_workers",
                "srv-threadpool-info maxWorkers",
                self.workers,
            ),
            (
                "virtproxyd_threadpool_workers",
                "srv-threadpool-info nWorkers",
                self.workers,
            ),
            (
                "virtproxyd_threadpool_free_workers",
                "srv-threadpool-info freeWorkers",
                self.workers,
            ),
            (
                "virtproxyd_threadpool_prio_workers",
                "srv-threadpool-info prioWorkers",
                0,
            ),
            (
                "virtproxyd_threadpool_job_queue_depth",
                "srv-threadpool-info jobQueueDepth",
                0,
            ),
        ] {
            gauge_u(&mut e, name, help, v)?;
        }
        counter_family(
            &mut e,
            "virtproxyd_metrics_requests",
            "Requests to this metrics endpoint by result",
            None,
            "result",
            REQUEST_RESULTS.iter().copied().zip(self.requests),
        )?;
        counter_family(
            &mut e,
            "virtproxyd_connections_rejected",
            "Connections refused before a relay worker took them on, by reason",
            None,
            "reason",
            Rejected::ALL
                .map(Rejected::label)
                .into_iter()
                .zip(self.rejected),
        )?;
        counter_family(
            &mut e,
            "virtproxyd_metrics_clients_pages",
            "/clients answers: figures collected from the relay workers, or an answer at most \
             1 s old reused (what bounds the workers' cost)",
            None,
            "answer",
            CLIENTS_PAGE_ANSWERS.iter().copied().zip(self.clients_pages),
        )?;
        if let Some(r) = &self.relay {
            encode_relay(&mut e, r)?;
        }
        Ok(())
    }
}

fn encode_relay(e: &mut Enc<'_>, r: &WorkerTotals) -> std::fmt::Result {
    let workers: Vec<String> = (0..r.per_worker.len()).map(|i| i.to_string()).collect();
    counter_family(
        e,
        "virtproxyd_worker_connections",
        "Connections adopted by each relay worker",
        None,
        "worker",
        workers
            .iter()
            .map(String::as_str)
            .zip(r.per_worker.iter().map(|w| w.0)),
    )?;
    counter_family(
        e,
        "virtproxyd_worker_loop_iterations",
        "Event-loop wake-ups of each relay worker",
        None,
        "worker",
        workers
            .iter()
            .map(String::as_str)
            .zip(r.per_worker.iter().map(|w| w.1)),
    )?;
    {
        let mut m = e.encode_descriptor(
            "virtproxyd_worker_busy",
            "Time each relay worker spent between a wake-up and its next wait",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for (w, &(_, _, ns)) in workers.iter().zip(&r.per_worker) {
            ConstCounter::new(ns as f64 / 1e9)
                .encode(m.encode_family(&[("worker", w.as_str())])?)?;
        }
    }
    let dirs = Direction::ALL.map(Direction::label);
    counter_family(
        e,
        "virtproxyd_relay",
        "Frame bytes relayed (headers included) by direction",
        Some(&Unit::Bytes),
        "direction",
        dirs.iter().copied().zip(r.bytes),
    )?;
    {
        let mut m = e.encode_descriptor(
            "virtproxyd_relay_frames",
            "Frames relayed by direction and frame type",
            None,
            MetricType::Counter,
        )?;
        for (d, per_type) in dirs.iter().zip(&r.frames) {
            for (t, &n) in FRAME_TYPES.iter().zip(per_type) {
                ConstCounter::new(n)
                    .encode(m.encode_family(&[("direction", *d), ("type", *t)])?)?;
            }
        }
    }
    counter_family(
        e,
        "virtproxyd_relay_fds",
        "File descriptors passed by direction",
        None,
        "direction",
        dirs.iter().copied().zip(r.fds),
    )?;
    let mut m = e.encode_descriptor(
        "virtproxyd_calls",
        "Replies relayed, by program, procedure and result (procedures never called are absent)",
        None,
        MetricType::Counter,
    )?;
    for &(slot, result, n) in &r.calls {
        let (program, procedure) = names::slot_labels(slot);
        let labels = [
            ("program", program),
            ("procedure", procedure),
            ("result", CALL_RESULTS[result]),
        ];
        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
    }
    encode_calls_extra(e, r)?;
    {
        let m = e.encode_descriptor(
            "virtproxyd_client_stats_collections",
            "Times a relay worker gathered its clients' figures (for /clients and client-info)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(r.client_stats).encode(m)?;
    }
    encode_conns(e, r)
}

/// One histogram sample: `bounds` in nanoseconds, reported in seconds.
fn histogram<const B: usize>(
    m: MetricEncoder<'_>,
    bounds: &[u64],
    h: &HistogramTotals<B>,
) -> std::fmt::Result {
    let mut m = m;
    let buckets: Vec<(f64, u64)> = bounds
        .iter()
        .map(|&b| b as f64 / 1e9)
        .chain(std::iter::once(f64::INFINITY))
        .zip(h.buckets)
        .collect();
    m.encode_histogram::<NoLabelSet>(h.sum_nanos as f64 / 1e9, h.count(), &buckets, None)
}

/// Call latency, untimed calls, events and stream bytes (only procedures that have some).
fn encode_calls_extra(e: &mut Enc<'_>, r: &WorkerTotals) -> std::fmt::Result {
    {
        let mut m = e.encode_descriptor(
            "virtproxyd_call_duration",
            "Time from a call to its reply, matched by serial, by program and procedure",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (slot, h) in &r.latency {
            let (program, procedure) = names::slot_labels(*slot);
            let labels = [("program", program), ("procedure", procedure)];
            histogram(m.encode_family(&labels)?, &LATENCY_BOUNDS_NS, h)?;
        }
    }
    {
        let m = e.encode_descriptor(
            "virtproxyd_calls_untimed",
            "Replies counted in virtproxyd_calls_total but not timed: their call was not in \
             the connection's in-flight table (full, or no such call)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(r.calls_untimed).encode(m)?;
    }
    {
        let mut m = e.encode_descriptor(
            "virtproxyd_events",
            "Server-initiated MESSAGE frames (events, keepalive) by program and procedure",
            None,
            MetricType::Counter,
        )?;
        for &(slot, n) in &r.events {
            let (program, procedure) = names::slot_labels(slot);
            let labels = [("program", program), ("procedure", procedure)];
            ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
        }
    }
    let mut m = e.encode_descriptor(
        "virtproxyd_stream",
        "STREAM and STREAM_HOLE body bytes by program, procedure and direction",
        Some(&Unit::Bytes),
        MetricType::Counter,
    )?;
    let dirs = Direction::ALL.map(Direction::label);
    for (slot, per_dir) in &r.stream_bytes {
        let (program, procedure) = names::slot_labels(*slot);
        for (d, &n) in dirs.iter().zip(per_dir) {
            let labels = [
                ("program", program),
                ("procedure", procedure),
                ("direction", *d),
            ];
            ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// Connections, auth and driver daemon sockets.
fn encode_conns(e: &mut Enc<'_>, r: &WorkerTotals) -> std::fmt::Result {
    let c = &r.conns;
    counter_family(
        e,
        "virtproxyd_connections_accepted",
        "Connections taken on by a relay worker, by listener",
        None,
        "listener",
        CONN_LISTENERS.iter().copied().zip(c.accepted),
    )?;
    counter_family(
        e,
        "virtproxyd_connections_closed",
        "Connections closed, by listener",
        None,
        "listener",
        CONN_LISTENERS.iter().copied().zip(c.closed),
    )?;
    counter_family(
        e,
        "virtproxyd_connections_closed_by_reason",
        "Connections closed, by reason",
        None,
        "reason",
        CLOSE_REASONS.iter().copied().zip(c.closed_by_reason),
    )?;
    {
        let m = e.encode_descriptor(
            "virtproxyd_connection_duration",
            "Time from a connection's adoption by a worker to its close",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        histogram(m, &DURATION_BOUNDS_NS, &c.duration)?;
    }
    {
        let mut m = e.encode_descriptor(
            "virtproxyd_auth_attempts",
            "Authentications by method and result (ok, or refused by polkit or SASL)",
            None,
            MetricType::Counter,
        )?;
        for (method, per_result) in AUTH_METHODS.iter().zip(&c.auth) {
            for (result, &n) in AUTH_RESULTS.iter().zip(per_result) {
                ConstCounter::new(n)
                    .encode(m.encode_family(&[("method", *method), ("result", *result)])?)?;
            }
        }
    }
    // Drivers never connected to are left out: the bound stays the fixed driver list.
    let drivers: Vec<(&str, &super::counters::DaemonTotals)> = driver_labels()
        .iter()
        .copied()
        .zip(&c.daemons)
        .filter(|(_, d)| d.connects != 0 || d.connect_failures != 0)
        .collect();
    type Pick = fn(&super::counters::DaemonTotals) -> u64;
    let families: [(&str, &str, Pick); 4] = [
        (
            "virtproxyd_daemon_connects",
            "Connections made to a driver daemon socket, by driver",
            |d| d.connects,
        ),
        (
            "virtproxyd_daemon_connect_failures",
            "Failed connects to a driver daemon socket, by driver",
            |d| d.connect_failures,
        ),
        (
            "virtproxyd_daemon_eofs",
            "Relayed connections the driver daemon closed between frames, by driver",
            |d| d.eofs,
        ),
        (
            "virtproxyd_daemon_errors",
            "Relayed connections ended by an error on the daemon side, by driver",
            |d| d.errors,
        ),
    ];
    for (name, help, pick) in families {
        counter_family(
            e,
            name,
            help,
            None,
            "driver",
            drivers.iter().map(|&(l, d)| (l, pick(d))),
        )?;
    }
    {
        let mut m = e.encode_descriptor(
            "virtproxyd_daemon_connections",
            "Open connections to a driver daemon socket, by driver",
            None,
            MetricType::Gauge,
        )?;
        for &(l, d) in &drivers {
            let active = d.connects.saturating_sub(d.closed);
            ConstGauge::new(i64::try_from(active).unwrap_or(i64::MAX))
                .encode(m.encode_family(&[("driver", l)])?)?;
        }
    }
    let mut m = e.encode_descriptor(
        "virtproxyd_daemon_open_duration",
        "From the first connect to a driver daemon to its open reply, by driver",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    for &(l, d) in &drivers {
        histogram(
            m.encode_family(&[("driver", l)])?,
            &LATENCY_BOUNDS_NS,
            &d.open_latency,
        )?;
    }
    Ok(())
}

/// Series reported without the relay's counters (the daemon's own figures).
pub const FIXED_SERIES: usize = 34;

/// The most series a scrape can hold with `workers` relay workers: the bound
/// `doc/administration.md` states. Every term is fixed at start; the procedure terms assume
/// every one of libvirt's procedures (and `unknown`) was called, failed, timed, sent an event
/// and streamed both ways.
pub fn series_bound(workers: usize) -> usize {
    use super::counters::{DRIVERS, DURATION_BUCKETS, LATENCY_BUCKETS};
    // A histogram sample: its buckets, `_sum` and `_count`.
    let latency = LATENCY_BUCKETS + 2;
    let per_procedure = CALL_RESULTS.len() + latency + 1 + 2;
    let per_driver = 5 + latency;
    FIXED_SERIES
        + 3 * workers
        + 2
        + 2 * FRAME_TYPES.len()
        + 2
        + 1
        + 1 // virtproxyd_client_stats_collections_total
        + names::SLOTS * per_procedure
        + 2 * CONN_LISTENERS.len()
        + CLOSE_REASONS.len()
        + DURATION_BUCKETS
        + 2
        + AUTH_METHODS.len() * AUTH_RESULTS.len()
        + DRIVERS * per_driver
}

/// The exposition of `snap` in `format` (OpenMetrics ends in `# EOF`).
pub fn render(snap: &Snapshot, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snap.clone()));
    let mut out = String::with_capacity(8 * 1024);
    let done = match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
    };
    // Writing into a String cannot fail; an encoder error would be a bug in our names.
    if let Err(e) = done {
        tracing::error!("metrics encoding failed: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::counters::{call_result, WorkerCounters};
    use crate::proto::{program, MsgStatus};

    pub(crate) fn sample() -> Snapshot {
        Snapshot {
            version: "0.1.0",
            start_time: 1_700_000_000.5,
            clients: 3,
            clients_max: 5000,
            clients_unauth: 1,
            clients_unauth_max: 20,
            by_listener: [2, 1, 0, 0],
            admin_clients: 1,
            workers: 2,
            idle_timeout: 120,
            requests: [4, 1, 0, 0, 0, 0, 0],
            rejected: [0, 2, 0, 0, 0, 0, 0],
            clients_pages: [3, 9],
            relay: None,
        }
    }

    #[test]
    fn openmetrics_has_types_units_and_eof() {
        let s = render(&sample(), Format::OpenMetrics);
        for line in [
            "# TYPE virtproxyd_build info\n",
            "virtproxyd_build_info{version=\"0.1.0\",libvirt=\"9.0.0\"} 1\n",
            "# TYPE virtproxyd_start_time_seconds gauge\n",
            "# UNIT virtproxyd_start_time_seconds seconds\n",
            "virtproxyd_start_time_seconds 1700000000.5\n",
            "virtproxyd_clients 3\n",
            "virtproxyd_clients_max 5000\n",
            "virtproxyd_clients_unauthenticated 1\n",
            "virtproxyd_clients_unauthenticated_max 20\n",
            "virtproxyd_clients_by_listener{listener=\"unix_ro\"} 1\n",
            "virtproxyd_threadpool_workers 2\n",
            "virtproxyd_threadpool_job_queue_depth 0\n",
            "# TYPE virtproxyd_metrics_requests counter\n",
            "virtproxyd_metrics_requests_total{result=\"ok\"} 4\n",
            "# TYPE virtproxyd_connections_rejected counter\n",
            "virtproxyd_connections_rejected_total{reason=\"max_anonymous_clients\"} 2\n",
            "virtproxyd_connections_rejected_total{reason=\"max_clients\"} 0\n",
            "virtproxyd_metrics_clients_pages_total{answer=\"reused\"} 9\n",
        ] {
            assert!(s.contains(line), "missing {line:?} in\n{s}");
        }
        assert!(s.ends_with("# EOF\n"), "{s}");
        assert!(
            !s.contains("virtproxyd_calls"),
            "no relay set attached:\n{s}"
        );
    }

    #[test]
    fn text_format_names_counters_with_total_and_has_no_eof() {
        let s = render(&sample(), Format::Text);
        assert!(
            s.contains("# TYPE virtproxyd_metrics_requests_total counter\n"),
            "{s}"
        );
        assert!(
            s.contains("virtproxyd_metrics_requests_total{result=\"not_found\"} 1\n"),
            "{s}"
        );
        assert!(s.contains("virtproxyd_clients 3\n"), "{s}");
        assert!(!s.contains("# EOF") && !s.contains("# UNIT"), "{s}");
    }

    /// Samples in a text-format scrape (one line each).
    fn samples(s: &str) -> usize {
        s.lines().filter(|l| !l.starts_with('#')).count()
    }

    #[test]
    fn without_the_relay_the_series_are_the_fixed_ones() {
        assert_eq!(samples(&render(&sample(), Format::Text)), FIXED_SERIES);
    }

    /// Every known procedure number of every program, garbage programs and procedures, every
    /// frame type both ways, every close reason and driver: the scrape reaches the stated
    /// bound and no more.
    #[test]
    fn every_procedure_plus_garbage_stays_within_the_bound() {
        use crate::metrics::counters::{CLOSE_REASONS, DRIVERS};
        use crate::metrics::meter::{ConnMeter, WorkerMeter};
        use crate::proto::frame::Header;
        use crate::proto::MsgType;
        let workers = 2;
        let set = WorkerCounters::set(workers);
        let mut numbers: Vec<(u32, i32)> = Vec::new();
        for p in crate::metrics::procedures::PROGRAMS {
            for n in 0..=p.names.len() as i32 + 3 {
                numbers.push((p.number, n));
            }
        }
        for garbage in [
            (0xdead_beef, 1),
            (program::REMOTE, -7),
            (program::ADMIN, 3),
            (7, i32::MAX),
        ] {
            numbers.push(garbage);
        }
        let types = [
            MsgType::Call,
            MsgType::Reply,
            MsgType::Message,
            MsgType::Stream,
            MsgType::CallWithFds,
            MsgType::ReplyWithFds,
            MsgType::StreamHole,
            MsgType::Other(42),
        ];
        for (w, c) in set.iter().enumerate() {
            let mut m = ConnMeter::new();
            for &(prog, proc_) in &numbers {
                for status in [MsgStatus::Ok, MsgStatus::Error] {
                    for mtype in types {
                        let h = Header {
                            len: 64,
                            prog,
                            vers: 1,
                            proc_,
                            mtype,
                            serial: 1,
                            status,
                        };
                        m.client_frame(c, &h);
                        m.daemon_frame(c, &h);
                    }
                }
            }
            let meter = WorkerMeter::new(set.clone(), w).unwrap();
            for why in [
                "client closed",
                "daemon closed the connection",
                "TLS: x",
                "?",
            ] {
                meter.closed(
                    crate::listen::ListenerKind::Tcp,
                    None,
                    why,
                    std::time::Duration::ZERO,
                );
            }
            for d in crate::metrics::counters::driver_labels() {
                let uri = format!("{d}:///system");
                let mut cm = ConnMeter::new();
                WorkerMeter::downstream_started(Some(&mut cm));
                meter.daemon_connect(Some(&mut cm), Some(&uri), true);
                meter.opened(Some(&mut cm));
                meter.daemon_connect(None, Some(&uri), false);
            }
        }
        let mut snap = sample();
        snap.workers = workers as u64;
        snap.relay = Some(WorkerTotals::sum(&set));
        let text = render(&snap, Format::Text);
        assert_eq!(samples(&text), series_bound(workers), "{}", &text[..2000]);
        assert!(DRIVERS <= 16 && CLOSE_REASONS.len() <= 16);
        // With 2 workers: the number `doc/administration.md` states.
        assert_eq!(series_bound(2), 12_267);
    }

    #[test]
    fn relay_counters_are_reported_once_attached() {
        let set = WorkerCounters::set(2);
        set[1].calls[names::slot(program::REMOTE, 1)][call_result(MsgStatus::Ok)].add(7);
        set[0].calls[names::slot(program::REMOTE, 9999)][call_result(MsgStatus::Error)].inc();
        set[0].busy_nanos.add(1_500_000_000);
        set[1].fds[Direction::ClientToDaemon as usize].add(2);
        let mut snap = sample();
        snap.relay = Some(WorkerTotals::sum(&set));
        for format in [Format::OpenMetrics, Format::Text] {
            let s = render(&snap, format);
            for line in [
                "virtproxyd_calls_total{program=\"remote\",procedure=\"connect_open\",result=\"ok\"} 7\n",
                "virtproxyd_calls_total{program=\"unknown\",procedure=\"unknown\",result=\"error\"} 1\n",
                "virtproxyd_worker_busy_seconds_total{worker=\"0\"} 1.5\n",
                "virtproxyd_relay_fds_total{direction=\"client_to_daemon\"} 2\n",
                "virtproxyd_relay_frames_total{direction=\"daemon_to_client\",type=\"reply\"} 0\n",
                "virtproxyd_relay_bytes_total{direction=\"daemon_to_client\"} 0\n",
            ] {
                assert!(s.contains(line), "{format:?}: missing {line:?} in\n{s}");
            }
            assert_eq!(s.matches("virtproxyd_calls_total{").count(), 2, "{s}");
        }
    }
}
