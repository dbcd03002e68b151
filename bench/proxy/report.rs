//! Turns the raw runs into medians, ratios to direct and target verdicts; prints the table
//! and returns the JSON document. The same table is rendered from that JSON (its runs are all
//! in it) into `doc/performance.md`, between the markers below, so the page cannot drift from
//! a run.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

/// Median (mean of the two middle values for an even count); NaN for no values.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Median of `key` over runs.
pub fn med(runs: &[Value], key: &str) -> f64 {
    median(&runs.iter().map(|r| f(r, key)).collect::<Vec<_>>())
}

/// Median over repetitions of `g(x[r], d[r])` (paired: the runs of one repetition ran
/// back to back).
fn paired(x: &[Value], d: &[Value], g: impl Fn(&Value, &Value) -> f64) -> f64 {
    median(&x.iter().zip(d).map(|(a, b)| g(a, b)).collect::<Vec<_>>())
}

/// Endpoint names, in column order; "libvirt" is libvirt's own virtproxyd.
const COLS: [&str; 6] = ["direct", "io_uring", "epoll", "libvirt", "socat", "haproxy"];
const NCOLS: usize = COLS.len();
/// This project's proxies (the ones with targets).
const OURS: [&str; 2] = ["io_uring", "epoll"];

struct Table {
    rows: Vec<(String, [String; NCOLS], String)>,
    targets: Vec<Value>,
}

impl Table {
    fn row(&mut self, what: impl Into<String>, cells: [String; NCOLS], goal: &str) {
        self.rows.push((what.into(), cells, goal.to_string()));
    }

    /// Records a target verdict and returns " met" / " MISSED" for the cell.
    fn target(&mut self, name: String, value: f64, goal: &str, met: bool) -> &'static str {
        self.targets.push(json!({
            "target": name,
            "value": if value.is_finite() { json!(value) } else { Value::Null },
            "goal": goal,
            "met": met,
        }));
        if met {
            " met"
        } else {
            " MISSED"
        }
    }

    /// The table as Markdown, one line per row.
    fn render(&self) -> String {
        let head = [
            "measurement",
            "direct",
            "io_uring",
            "epoll",
            "libvirt virtproxyd",
            "socat",
            "haproxy",
            "goal",
        ];
        let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
        for (what, cells, goal) in &self.rows {
            w[0] = w[0].max(what.chars().count());
            for (i, c) in cells.iter().enumerate() {
                w[i + 1] = w[i + 1].max(c.chars().count());
            }
            w[NCOLS + 1] = w[NCOLS + 1].max(goal.chars().count());
        }
        let line = |v: [&str; NCOLS + 2]| {
            let mut s = String::from("|");
            for (i, c) in v.iter().enumerate() {
                let pad = w[i] - c.chars().count();
                if i == 0 || i == NCOLS + 1 {
                    s += &format!(" {c}{} |", " ".repeat(pad));
                } else {
                    s += &format!(" {}{c} |", " ".repeat(pad));
                }
            }
            s
        };
        let mut out = line(head) + "\n";
        let mut sep = String::from("|");
        for (i, n) in w.iter().enumerate() {
            if i == 0 || i == NCOLS + 1 {
                sep += &format!(":{}|", "-".repeat(n + 1));
            } else {
                sep += &format!("{}:|", "-".repeat(n + 1));
            }
        }
        out += &sep;
        out.push('\n');
        for (what, c, goal) in &self.rows {
            out += &line([what, &c[0], &c[1], &c[2], &c[3], &c[4], &c[5], goal]);
            out.push('\n');
        }
        out
    }

    fn met(&self) -> usize {
        self.targets
            .iter()
            .filter(|v| v["met"] == json!(true))
            .count()
    }

    fn missed(&self) -> Vec<&str> {
        self.targets
            .iter()
            .filter(|v| v["met"] != json!(true))
            .filter_map(|v| v["target"].as_str())
            .collect()
    }
}

/// What the cells mean; printed under the table and written under it in the doc.
fn legend(met: usize, total: usize) -> String {
    format!(
        "targets met: {met}/{total}. Cells: median over repetitions; (x×) = median of \
         per-repetition ratios to the direct run beside it (CPU: to socat's; busy p99: to the \
         same endpoint with 0 idle); (+x) = added µs. Calls, connect-open and streams: \
         qemu:///system on libvirt 9.0.0's modular daemons (direct = virtqemud-sock; libvirt \
         virtproxyd = libvirt's own, same build); scale and TLS rows: private libvirtd. Relay \
         CPU: proxy threads (schedstat), socat incl. its forked relays (cutime, 10 ms ticks)."
    )
}

fn dash() -> String {
    "—".to_string()
}

fn dashes() -> [String; NCOLS] {
    std::array::from_fn(|_| dash())
}

fn col(name: &str) -> usize {
    COLS.iter().position(|c| *c == name).unwrap_or(0)
}

/// Builds the JSON document and prints the table.
#[allow(clippy::too_many_arguments)]
pub fn build(
    meta: Value,
    params: &Value,
    calls: &BTreeMap<(&str, usize, &str), Vec<Value>>,
    opens: &BTreeMap<&str, Vec<Value>>,
    streams: &BTreeMap<(&str, &str), Vec<Value>>,
    scale: &[Value],
    idle_cpu: &Value,
    tls: &Value,
    stream_bytes: u64,
) -> Value {
    let (t, summary) = tabulate(calls, opens, streams, scale, idle_cpu, tls, stream_bytes);
    let rendered = t.render();
    print!("{rendered}");
    println!("\n{}", legend(t.met(), t.targets.len()));
    let missed = t.missed();
    if !missed.is_empty() {
        println!("missed: {}", missed.join("; "));
    }

    let doc = json!({
        "meta": meta,
        "params": params,
        "targets": t.targets,
        "summary": summary,
        "raw": {"scale": scale, "idle_cpu": idle_cpu, "tls_burst": tls},
    });
    // The page is rendered from this document: it must give the table just printed.
    if tabulate_json(&doc).render() != rendered {
        eprintln!("warning: the table rendered from the JSON differs from the printed one");
    }
    doc
}

/// The table and the summary from the runs.
fn tabulate(
    calls: &BTreeMap<(&str, usize, &str), Vec<Value>>,
    opens: &BTreeMap<&str, Vec<Value>>,
    streams: &BTreeMap<(&str, &str), Vec<Value>>,
    scale: &[Value],
    idle_cpu: &Value,
    tls: &Value,
    stream_bytes: u64,
) -> (Table, Value) {
    let mut t = Table {
        rows: vec![],
        targets: vec![],
    };
    let others = &COLS[1..];
    let mut summary = json!({"calls": [], "open": {}, "streams": [], "scale": []});

    // ---- calls --------------------------------------------------------------------------
    let mut keys: Vec<(&str, usize)> = calls.keys().map(|(p, c, _)| (*p, *c)).collect();
    keys.dedup();
    for (proc_, c) in keys {
        let d = &calls[&(proc_, c, "direct")];
        let mut rate = dashes();
        let mut p50 = dashes();
        let mut p99 = dashes();
        let mut cpu = dashes();
        rate[0] = format!("{:.0}", med(d, "rate"));
        p50[0] = format!("{:.1}", med(d, "p50_us"));
        p99[0] = format!("{:.1}", med(d, "p99_us"));
        let mut s = json!({
            "proc": proc_, "clients": c,
            "direct": {"rate": med(d, "rate"), "p50_us": med(d, "p50_us"), "p99_us": med(d, "p99_us")},
            "runs": {"direct": d},
        });
        for b in others {
            let Some(x) = calls.get(&(proc_, c, *b)) else {
                continue;
            };
            let i = col(b);
            let ours = OURS.contains(b);
            let rr = paired(x, d, |a, b| f(a, "rate") / f(b, "rate"));
            let add = paired(x, d, |a, b| f(a, "p50_us") - f(b, "p50_us"));
            let r99 = paired(x, d, |a, b| f(a, "p99_us") / f(b, "p99_us"));
            let m = if ours {
                t.target(
                    format!("{proc_} {c} client(s) call rate, {b}"),
                    rr,
                    ">= 0.90x direct",
                    rr >= 0.90,
                )
            } else {
                ""
            };
            rate[i] = format!("{:.0} ({rr:.2}×){m}", med(x, "rate"));
            let m = if c == 1 && ours {
                t.target(
                    format!("{proc_} 1 client p50 added, {b}"),
                    add,
                    "<= +10 us",
                    add <= 10.0,
                )
            } else {
                ""
            };
            p50[i] = format!("{:.1} ({add:+.1}){m}", med(x, "p50_us"));
            p99[i] = format!("{:.1} ({r99:.2}×)", med(x, "p99_us"));
            let cpc = med(x, "relay_cpu_us_per_call");
            cpu[i] = format!("{cpc:.1}");
            s[b] = json!({
                "rate": med(x, "rate"), "rate_ratio": rr,
                "p50_us": med(x, "p50_us"), "p50_added_us": add,
                "p99_us": med(x, "p99_us"), "p99_ratio": r99,
                "relay_cpu_us_per_call": cpc,
            });
            s["runs"][b] = json!(x);
        }
        // The bar: ahead of haproxy, a splicing relay with no handshake work.
        if let Some(h) = calls.get(&(proc_, c, "haproxy")) {
            for b in OURS {
                if let Some(x) = calls.get(&(proc_, c, b)) {
                    let rh = paired(x, h, |a, b| f(a, "rate") / f(b, "rate"));
                    t.target(
                        format!("{proc_} {c} client(s) call rate vs haproxy, {b}"),
                        rh,
                        ">= 1.0x haproxy",
                        rh >= 1.0,
                    );
                    s[b]["rate_ratio_to_haproxy"] = json!(rh);
                }
            }
        }
        let who = if c == 1 {
            "1 client".to_string()
        } else {
            format!("{c} clients")
        };
        t.row(format!("{proc_}, {who}: calls/s"), rate, "≥ 0.90×");
        t.row(
            format!("{proc_}, {who}: p50 µs (added)"),
            p50,
            if c == 1 { "≤ +10 µs" } else { "" },
        );
        t.row(format!("{proc_}, {who}: p99 µs"), p99, "");
        if c == 8 {
            t.row(format!("{proc_}, {who}: relay CPU µs/call"), cpu, "");
        }
        summary["calls"].as_array_mut().unwrap().push(s);
    }

    // ---- connect-open -------------------------------------------------------------------
    if let Some(d) = opens.get("direct") {
        let mut p50 = dashes();
        let mut p99 = dashes();
        p50[0] = format!("{:.0}", med(d, "p50_us"));
        p99[0] = format!("{:.0}", med(d, "p99_us"));
        summary["open"]["direct"] =
            json!({"p50_us": med(d, "p50_us"), "p99_us": med(d, "p99_us"), "runs": d});
        for b in others {
            let Some(x) = opens.get(b) else { continue };
            let i = col(b);
            let r = paired(x, d, |a, b| f(a, "p50_us") / f(b, "p50_us"));
            let r99 = paired(x, d, |a, b| f(a, "p99_us") / f(b, "p99_us"));
            let m = if OURS.contains(b) {
                t.target(
                    format!("connect-open p50, {b}"),
                    r,
                    "<= 1.3x direct",
                    r <= 1.3,
                )
            } else {
                ""
            };
            p50[i] = format!("{:.0} ({r:.2}×){m}", med(x, "p50_us"));
            p99[i] = format!("{:.0} ({r99:.2}×)", med(x, "p99_us"));
            summary["open"][b] = json!({"p50_us": med(x, "p50_us"), "p50_ratio": r,
                "p99_us": med(x, "p99_us"), "p99_ratio": r99, "runs": x});
        }
        t.row("connect-open p50 µs", p50, "≤ 1.3×");
        t.row("connect-open p99 µs", p99, "");
    }

    // ---- streams ------------------------------------------------------------------------
    let size = if stream_bytes >= 1 << 30 {
        format!("{} GiB", stream_bytes >> 30)
    } else {
        format!("{} MiB", stream_bytes >> 20)
    };
    for dir in ["download", "upload"] {
        let Some(d) = streams.get(&(dir, "direct")) else {
            continue;
        };
        let mibps = |r: &Value| f(r, "bytes") / f(r, "secs") / (1u64 << 20) as f64;
        let cpu = |r: &Value| f(r, "relay_cpu_s") / (f(r, "bytes") / (1u64 << 30) as f64);
        let dcpu = |r: &Value| f(r, "daemon_cpu_s") / (f(r, "bytes") / (1u64 << 30) as f64);
        let meds =
            |x: &[Value], g: &dyn Fn(&Value) -> f64| median(&x.iter().map(g).collect::<Vec<_>>());
        let mut thr = dashes();
        thr[0] = format!("{:.0}", meds(d, &mibps));
        let mut cp = dashes();
        let socat = streams.get(&(dir, "socat"));
        let mut s = json!({"dir": dir, "bytes": stream_bytes,
            "direct": {"mib_s": meds(d, &mibps), "daemon_cpu_s_per_gib": meds(d, &dcpu), "runs": d}});
        for name in others {
            let Some(x) = streams.get(&(dir, *name)) else {
                continue;
            };
            let i = col(name);
            let ours = OURS.contains(name);
            let r = paired(x, d, |a, b| mibps(a) / mibps(b));
            let m = if ours {
                t.target(
                    format!("{dir} throughput, {name}"),
                    r,
                    ">= 0.95x direct",
                    r >= 0.95,
                )
            } else {
                ""
            };
            thr[i] = format!("{:.0} ({r:.2}×){m}", meds(x, &mibps));
            let c = meds(x, &cpu);
            s[name] = json!({"mib_s": meds(x, &mibps), "ratio": r, "relay_cpu_s_per_gib": c,
                "daemon_cpu_s_per_gib": meds(x, &dcpu), "runs": x});
            if *name == "socat" {
                cp[i] = format!("{c:.3}");
            } else if let Some(sx) = socat {
                let rc = paired(x, sx, |a, b| cpu(a) / cpu(b));
                let m = if ours {
                    t.target(
                        format!("{dir} relay CPU per GiB, {name}"),
                        rc,
                        "<= 0.3x socat",
                        rc <= 0.3,
                    )
                } else {
                    ""
                };
                cp[i] = format!("{c:.3} ({rc:.2}× socat){m}");
                s[name]["cpu_ratio_to_socat"] = json!(rc);
            } else {
                cp[i] = format!("{c:.3}");
            }
        }
        t.row(format!("{dir} {size}: MiB/s"), thr, "≥ 0.95×");
        t.row(format!("{dir}: relay CPU s/GiB"), cp, "≤ 0.3× socat");
        summary["streams"].as_array_mut().unwrap().push(s);
    }

    // ---- scale --------------------------------------------------------------------------
    let mut counts: Vec<u64> = scale
        .iter()
        .flat_map(|e| e["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["idle"].as_u64())
        .collect();
    counts.sort();
    counts.dedup();
    // busy p99 with no idle connections
    let mut base_row = dashes();
    let mut base_p99: BTreeMap<String, f64> = BTreeMap::new();
    for e in scale {
        let name = e["endpoint"].as_str().unwrap_or("?").to_string();
        let b = e["busy_no_idle"].as_array().cloned().unwrap_or_default();
        let p99 = med(&b, "p99_us");
        base_row[col(&name)] = format!("{p99:.1}");
        base_p99.insert(name, p99);
    }
    if !scale.is_empty() {
        t.row("busy client p99 µs, 0 idle", base_row, "");
    }
    let mut scale_summary = vec![];
    for n in counts {
        let mut fdr = dashes();
        let mut rss = fdr.clone();
        let mut iou = fdr.clone();
        let mut busy = fdr.clone();
        let mut vs_direct = fdr.clone();
        let mut cpu = fdr.clone();
        let point = |e: &Value| {
            e["points"]
                .as_array()
                .and_then(|v| v.iter().find(|p| p["idle"].as_u64() == Some(n)))
                .cloned()
        };
        let direct_p99 = scale
            .iter()
            .find(|e| e["endpoint"] == json!("direct"))
            .and_then(point)
            .map(|p| f(&p["busy"], "p99_us"));
        for e in scale {
            let name = e["endpoint"].as_str().unwrap_or("?");
            let Some(pt) = e["points"]
                .as_array()
                .and_then(|v| v.iter().find(|p| p["idle"].as_u64() == Some(n)))
            else {
                continue;
            };
            let i = col(name);
            let p99 = f(&pt["busy"], "p99_us");
            let r = p99 / base_p99.get(name).copied().unwrap_or(f64::NAN);
            let mut s = json!({"endpoint": name, "idle": n, "busy_p99_us": p99,
                "busy_p99_ratio": r, "alive_at_end": pt["alive_at_end"], "open_secs": pt["open_secs"]});
            let dbase = &e["daemon_base"];
            let didle = &pt["daemon_idle"];
            s["daemon_rss_kib_per_conn"] =
                json!((f(didle, "rss_kib") - f(dbase, "rss_kib")) / n as f64);
            if name == "direct" {
                busy[i] = format!("{p99:.1} ({r:.2}×)");
            } else {
                let base = &e["proxy_base"];
                let idle = &pt["proxy_idle"];
                let per_fd = (f(idle, "fds") - f(base, "fds")) / n as f64;
                let per_rss = (f(idle, "rss_kib") - f(base, "rss_kib")) / n as f64;
                let wrk = f(idle, "iou_wrk");
                let wrk_after = f(&pt["proxy_after_busy"], "iou_wrk");
                let m = t.target(
                    format!("{n} idle: fds per connection, {name}"),
                    per_fd,
                    "<= 2",
                    per_fd <= 2.0,
                );
                fdr[i] = format!("{per_fd:.2}{m}");
                let m = t.target(
                    format!("{n} idle: RSS per connection, {name}"),
                    per_rss,
                    "<= 4 KiB",
                    per_rss <= 4.0,
                );
                rss[i] = format!("{per_rss:.2}{m}");
                if name == "io_uring" {
                    let m = t.target(
                        format!("{n} idle: iou-wrk threads while idle, {name}"),
                        wrk,
                        "0",
                        wrk == 0.0,
                    );
                    iou[i] = format!("{wrk:.0} (after busy: {wrk_after:.0}){m}");
                } else {
                    iou[i] = format!("{wrk:.0}");
                }
                let m = t.target(
                    format!("{n} idle: busy client p99 vs 0 idle, {name}"),
                    r,
                    "<= 1.2x",
                    r <= 1.2,
                );
                busy[i] = format!("{p99:.1} ({r:.2}×){m}");
                if let Some(d) = direct_p99 {
                    vs_direct[i] = format!("{:.2}×", p99 / d);
                    s["busy_p99_vs_direct_same_idle"] = json!(p99 / d);
                }
                let c = f(&pt["busy"], "proxy_cpu_us_per_call");
                let b = e["busy_no_idle"].as_array().cloned().unwrap_or_default();
                let rc = c / med(&b, "proxy_cpu_us_per_call");
                // No target here: the idle connections share the busy client's libvirtd, which
                // slows with N clients and pings them (the proxy relays the pings), so this is
                // not CPU per call alone; the idlecpu section measures that.
                cpu[i] = format!("{c:.2} ({rc:.2}×)");
                s["proxy_cpu_us_per_call"] = json!(c);
                s["proxy_cpu_per_call_ratio"] = json!(rc);
                s["proxy_fds_per_conn"] = json!(per_fd);
                s["proxy_rss_kib_per_conn"] = json!(per_rss);
                s["iou_wrk_idle"] = json!(wrk);
                s["iou_wrk_after_busy"] = json!(wrk_after);
                s["proxy_threads_idle"] = idle["threads"].clone();
            }
            scale_summary.push(s);
        }
        t.row(format!("{n} idle: proxy fds/conn"), fdr, "≤ 2");
        t.row(format!("{n} idle: proxy RSS KiB/conn"), rss, "≤ 4 KiB");
        t.row(format!("{n} idle: iou-wrk threads"), iou, "0");
        t.row(
            format!("{n} idle: proxy CPU µs/call incl. keepalive (vs 0 idle)"),
            cpu,
            "",
        );
        t.row(
            format!("{n} idle: busy client p99 µs (vs 0 idle)"),
            busy,
            "≤ 1.2×",
        );
        if direct_p99.is_some() {
            t.row(
                format!("{n} idle: busy p99 vs direct with {n} idle"),
                vs_direct,
                "",
            );
        }
    }
    summary["scale"] = json!(scale_summary);
    // busy client's proxy CPU per call with no idle connections
    let mut cpu0 = dashes();
    for e in scale {
        let name = e["endpoint"].as_str().unwrap_or("?");
        if name != "direct" {
            let b = e["busy_no_idle"].as_array().cloned().unwrap_or_default();
            cpu0[col(name)] = format!("{:.2}", med(&b, "proxy_cpu_us_per_call"));
        }
    }
    if !scale.is_empty() {
        t.row("busy client: proxy CPU µs/call, 0 idle", cpu0, "");
    }

    // ---- proxy CPU per call with idle connections ------------------------------------------
    let none = idle_cpu["no_idle"].as_array().cloned().unwrap_or_default();
    let many = idle_cpu["with_idle"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !none.is_empty() && !many.is_empty() {
        let n = idle_cpu["idle"].as_u64().unwrap_or(0);
        let (c0, c1) = (
            med(&none, "proxy_cpu_us_per_call"),
            med(&many, "proxy_cpu_us_per_call"),
        );
        let r = c1 / c0;
        let i = col("io_uring");
        let mut row = dashes();
        row[i] = format!("{c0:.2}");
        t.row("proxy CPU µs/call, 0 idle (own daemons)", row, "");
        let m = t.target(
            format!("proxy CPU per call, {n} idle vs 0, io_uring"),
            r,
            "<= 1.2x",
            r <= 1.2,
        );
        let mut row = dashes();
        row[i] = format!("{c1:.2} ({r:.2}×){m}");
        t.row(
            format!("proxy CPU µs/call, {n} idle (own daemons)"),
            row,
            "≤ 1.2×",
        );
        let mut row = dashes();
        row[i] = format!("{:.1} / {:.1}", med(&none, "p99_us"), med(&many, "p99_us"));
        t.row(format!("busy p99 µs, 0 / {n} idle (own daemons)"), row, "");
        summary["idle_cpu"] = json!({
            "idle": n,
            "cpu_us_per_call_no_idle": c0,
            "cpu_us_per_call_idle": c1,
            "ratio": r,
            "busy_p99_us_no_idle": med(&none, "p99_us"),
            "busy_p99_us_idle": med(&many, "p99_us"),
        });
    }

    // ---- TLS handshake burst --------------------------------------------------------------
    let quiet = tls["no_burst"].as_array().cloned().unwrap_or_default();
    let loaded = tls["burst"].as_array().cloned().unwrap_or_default();
    if !quiet.is_empty() && !loaded.is_empty() {
        let r = paired(&loaded, &quiet, |a, b| f(a, "p99_us") / f(b, "p99_us"));
        let r50 = paired(&loaded, &quiet, |a, b| f(a, "p50_us") / f(b, "p50_us"));
        let i = col("io_uring");
        let mut row = dashes();
        row[i] = format!("{:.1}", med(&quiet, "p99_us"));
        t.row("busy client p99 µs, no TLS handshakes", row, "");
        let m = t.target(
            "busy client p99 during TLS handshake bursts vs none, io_uring".into(),
            r,
            "<= 1.2x",
            r <= 1.2,
        );
        let mut row = dashes();
        row[i] = format!("{:.1} ({r:.2}×){m}", med(&loaded, "p99_us"));
        t.row("busy client p99 µs, TLS handshake bursts", row, "≤ 1.2×");
        let mut row = dashes();
        row[i] = format!(
            "{:.0}/s, {:.2} ms CPU each",
            med(&loaded, "handshakes_per_s"),
            median(
                &loaded
                    .iter()
                    .map(|v| f(v, "proxy_cpu_s") / f(v, "handshakes") * 1e3)
                    .collect::<Vec<_>>()
            )
        );
        t.row("TLS handshakes during the busy client", row, "");
        let control = tls["burst_elsewhere"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !control.is_empty() {
            let rc = paired(&control, &quiet, |a, b| f(a, "p99_us") / f(b, "p99_us"));
            let mut row = dashes();
            row[i] = format!("{:.1} ({rc:.2}×)", med(&control, "p99_us"));
            t.row("busy p99 µs, same handshakes on another proxy", row, "");
            summary["tls_burst_elsewhere_p99_ratio"] = json!(rc);
        }
        let spun = tls["idle_spinners"].as_array().cloned().unwrap_or_default();
        if !spun.is_empty() {
            let rs = paired(&spun, &quiet, |a, b| f(a, "p99_us") / f(b, "p99_us"));
            let mut row = dashes();
            row[i] = format!("{:.1} ({rs:.2}×)", med(&spun, "p99_us"));
            t.row(
                "busy p99 µs, CPUs busy with SCHED_IDLE spinners only",
                row,
                "",
            );
            summary["tls_burst_idle_spinners_p99_ratio"] = json!(rs);
        }
        summary["tls_burst"] = json!({
            "busy_p99_us_no_burst": med(&quiet, "p99_us"),
            "busy_p99_us_burst": med(&loaded, "p99_us"),
            "busy_p99_ratio": r,
            "busy_p50_ratio": r50,
            "handshakes_per_s": med(&loaded, "handshakes_per_s"),
        });
    }

    (t, summary)
}

/// The table again from a document `build` returned (or its JSON file): every run it is made
/// of is in there, under `summary` and `raw`.
fn tabulate_json(doc: &Value) -> Table {
    let s = &doc["summary"];
    let arr = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let mut calls = BTreeMap::new();
    for c in s["calls"].as_array().into_iter().flatten() {
        let proc_ = c["proc"].as_str().unwrap_or("?");
        let clients = c["clients"].as_u64().unwrap_or(0) as usize;
        for (end, runs) in c["runs"].as_object().into_iter().flatten() {
            calls.insert((proc_, clients, end.as_str()), arr(runs));
        }
    }
    let mut opens = BTreeMap::new();
    for (end, o) in s["open"].as_object().into_iter().flatten() {
        opens.insert(end.as_str(), arr(&o["runs"]));
    }
    let mut streams = BTreeMap::new();
    let mut stream_bytes = doc["params"]["stream_bytes"].as_u64().unwrap_or(0);
    for st in s["streams"].as_array().into_iter().flatten() {
        let dir = st["dir"].as_str().unwrap_or("?");
        stream_bytes = st["bytes"].as_u64().unwrap_or(stream_bytes);
        for end in COLS {
            if !st[end]["runs"].is_null() {
                streams.insert((dir, end), arr(&st[end]["runs"]));
            }
        }
    }
    let raw = &doc["raw"];
    let scale = arr(&raw["scale"]);
    tabulate(
        &calls,
        &opens,
        &streams,
        &scale,
        &raw["idle_cpu"],
        &raw["tls_burst"],
        stream_bytes,
    )
    .0
}

/// Where the generated part of `doc/performance.md` starts and ends.
pub const DOC_BEGIN: &str = "<!-- BEGIN bench proxy: written by `cargo bench --bench proxy` from \
                             target/bench-proxy.json; edits between these markers are overwritten -->";
pub const DOC_END: &str = "<!-- END bench proxy -->";

/// The generated part of the performance page: which run (commit, date, machine), the table,
/// what its cells mean and which targets were missed.
pub fn markdown(doc: &Value) -> String {
    let m = &doc["meta"];
    let s = |k: &str| m[k].as_str().unwrap_or("?").to_string();
    let commit: String = s("git_commit").chars().take(7).collect();
    let dirty = m["git_dirty"].as_array().map_or(0, Vec::len);
    let dirty = match dirty {
        0 => String::new(),
        1 => " plus 1 uncommitted change".to_string(),
        n => format!(" plus {n} uncommitted changes"),
    };
    let reps = match doc["params"]["reps"].as_u64().unwrap_or(0) {
        1 => "1 repetition".to_string(),
        n => format!("{n} repetitions"),
    };
    let mins = m["elapsed_secs"].as_f64().unwrap_or(f64::NAN) / 60.0;
    // Runs from before the field was recorded do not say which sections they ran.
    let sections = m["sections"]
        .as_str()
        .map(|s| format!(", sections: {s}"))
        .unwrap_or_default();
    let t = tabulate_json(doc);
    let mut out = format!(
        "Run of {} at commit `{commit}`{dirty}: {} run ({reps}, {mins:.0} minutes{sections}), \
         on {} CPUs ({}), kernel {}, {}.\n\n",
        s("date"),
        s("mode"),
        m["cpus"].as_u64().unwrap_or(0),
        s("cpu_model"),
        s("kernel"),
        s("libvirt"),
    );
    if t.rows.is_empty() {
        out += "This run measured none of the table's sections (its figures are in its JSON \
                only).\n\n";
    }
    out += &t.render();
    out += &format!("\n{}\n", legend(t.met(), t.targets.len()));
    let missed = t.missed();
    if !missed.is_empty() {
        out += &format!("\nMissed: {}.\n", missed.join("; "));
    }
    out
}

/// Replaces what lies between the markers in `text` with `block`; `None` without both markers.
pub fn splice_block(text: &str, block: &str) -> Option<String> {
    let b = text.find(DOC_BEGIN)? + DOC_BEGIN.len();
    let e = b + text[b..].find(DOC_END)?;
    Some(format!("{}\n{}{}", &text[..b], block, &text[e..]))
}

/// Writes the table of `doc` into the page at `path`, between its markers.
pub fn write_doc(doc: &Value, path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let new = splice_block(&text, &markdown(doc))
        .ok_or_else(|| format!("{}: no `{DOC_BEGIN}` … `{DOC_END}` markers", path.display()))?;
    std::fs::write(path, new).map_err(|e| format!("{}: {e}", path.display()))
}
