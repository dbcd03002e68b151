//! libvirt's logging settings as text, sans-IO: priorities, `log_filters`, `log_outputs`,
//! `LIBVIRT_DEBUG`, parsed and printed back the way libvirt 9.0.0 does (`util/virlog.c`:
//! `virLogParseFilter(s)`, `virLogParseOutput(s)`, `virLogGetFilters`, `virLogGetOutputs`).

use std::path::PathBuf;

/// `virLogPriority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

impl Priority {
    pub fn from_number(n: u32) -> Option<Priority> {
        match n {
            1 => Some(Priority::Debug),
            2 => Some(Priority::Info),
            3 => Some(Priority::Warn),
            4 => Some(Priority::Error),
            _ => None,
        }
    }

    /// The priority of a tracing level (trace counts as debug).
    pub fn of(level: &tracing::Level) -> Priority {
        match *level {
            tracing::Level::ERROR => Priority::Error,
            tracing::Level::WARN => Priority::Warn,
            tracing::Level::INFO => Priority::Info,
            _ => Priority::Debug,
        }
    }

    /// syslog(3) / journald PRIORITY, as `virLogPrioritySyslog` maps them.
    pub fn syslog(self) -> u8 {
        match self {
            Priority::Debug => 7,
            Priority::Info => 6,
            Priority::Warn => 4,
            Priority::Error => 3,
        }
    }

    /// The word in file and stderr lines (`virLogPriorityString`).
    pub fn word(self) -> &'static str {
        match self {
            Priority::Debug => "debug",
            Priority::Info => "info",
            Priority::Warn => "warning",
            Priority::Error => "error",
        }
    }
}

/// A malformed logging setting; the text is libvirt's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// `virStrToLong_uip` then the 1..=4 range.
fn priority(s: &str) -> Option<Priority> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().and_then(Priority::from_number)
}

/// `LIBVIRT_DEBUG`: `1`..`4` or `debug`, `info`, `warning`, `error`.
pub fn parse_level(s: &str) -> Result<Priority, SpecError> {
    match s {
        "1" | "debug" => Ok(Priority::Debug),
        "2" | "info" => Ok(Priority::Info),
        "3" | "warning" => Ok(Priority::Warn),
        "4" | "error" => Ok(Priority::Error),
        _ => Err(SpecError(format!(
            "Failed to set logging priority, argument '{s}' is invalid"
        ))),
    }
}

/// One `N:match` filter; `pattern` is the glob `*match*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: Priority,
    pub pattern: String,
}

/// `log_filters`: space-separated `N:match`; empty words are skipped; a leading `+` on the
/// match is dropped (it once asked for stack traces).
pub fn parse_filters(s: &str) -> Result<Vec<Filter>, SpecError> {
    let mut out = Vec::new();
    for word in s.split(' ').filter(|w| !w.is_empty()) {
        let mut tokens = word.split(':');
        let (Some(prio), Some(m)) = (tokens.next(), tokens.next()) else {
            return Err(SpecError(format!("Malformed format for filter '{word}'")));
        };
        let priority = priority(prio)
            .ok_or_else(|| SpecError(format!("Invalid priority '{prio}' for filter '{word}'")))?;
        let matched = m.strip_prefix('+').unwrap_or(m);
        if matched.is_empty() {
            return Err(SpecError(format!("Invalid match string '{m}'")));
        }
        out.push(Filter {
            priority,
            pattern: format!("*{matched}*"),
        });
    }
    Ok(out)
}

/// `virLogGetFilters`: every filter followed by a space.
pub fn format_filters(filters: &[Filter]) -> String {
    filters
        .iter()
        .map(|f| format!("{}:{} ", f.priority as u32, f.pattern))
        .collect()
}

/// Where an output writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Stderr,
    Journald,
    Syslog(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub priority: Priority,
    pub dest: Dest,
}

/// `g_canonicalize_filename` relative to the working directory, without touching the disk.
fn canonical(path: &str) -> PathBuf {
    let p = std::path::Path::new(path);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn parse_output(word: &str) -> Result<Output, SpecError> {
    let tokens: Vec<&str> = word.split(':').collect();
    if tokens.len() < 2 {
        return Err(SpecError(format!(
            "Malformed format for log output '{word}'"
        )));
    }
    let priority = priority(tokens[0]).ok_or_else(|| {
        SpecError(format!(
            "Invalid log priority '{}' for log output '{word}'",
            tokens[0]
        ))
    })?;
    let wants = match tokens[1] {
        "stderr" | "journald" => 2,
        "syslog" | "file" => 3,
        other => {
            return Err(SpecError(format!(
                "Invalid log destination '{other}' for log output '{word}'"
            )))
        }
    };
    if tokens.len() != wants {
        return Err(SpecError(format!(
            "Log output '{word}' does not meet the format requirements for destination type '{}'",
            tokens[1]
        )));
    }
    let dest = match tokens[1] {
        "stderr" => Dest::Stderr,
        "journald" => Dest::Journald,
        "syslog" => Dest::Syslog(tokens[2].to_string()),
        _ => Dest::File(canonical(tokens[2])),
    };
    Ok(Output { priority, dest })
}

/// `log_outputs`: space-separated outputs; a later output to the same destination (the same
/// file, for files) replaces the earlier one at the end of the list, as `virLogParseOutputs`.
pub fn parse_outputs(s: &str) -> Result<Vec<Output>, SpecError> {
    let mut out: Vec<Output> = Vec::new();
    for word in s.split(' ').filter(|w| !w.is_empty()) {
        let o = parse_output(word)?;
        let same = |a: &Dest, b: &Dest| match (a, b) {
            (Dest::File(x), Dest::File(y)) => x == y,
            (Dest::Syslog(_), Dest::Syslog(_)) => true,
            _ => std::mem::discriminant(a) == std::mem::discriminant(b),
        };
        out.retain(|e| !same(&e.dest, &o.dest));
        out.push(o);
    }
    Ok(out)
}

/// `virLogGetOutputs`: space-separated, no trailing space.
pub fn format_outputs(outputs: &[Output]) -> String {
    outputs
        .iter()
        .map(|o| {
            let p = o.priority as u32;
            match &o.dest {
                Dest::Stderr => format!("{p}:stderr"),
                Dest::Journald => format!("{p}:journald"),
                Dest::Syslog(id) => format!("{p}:syslog:{id}"),
                Dest::File(f) => format!("{p}:file:{}", f.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The libvirt-style source name of a tracing target, matched by filters. libvirt names
/// sources `<dir>.<module>` (`rpc.netserverclient`, `daemon.virtproxyd`); ours map onto
/// those directories so that the usual filters (`1:rpc`, `3:util`, `1:daemon`) mean what an
/// operator expects, and our module path follows so either vocabulary matches:
///
/// | our modules | libvirt directory |
/// |---|---|
/// | relay, reactor, worker, conn, sys, proto, tls | `rpc` |
/// | handshake, route, identity | `remote` |
/// | server, listen, activation, daemon, the binary | `daemon` |
/// | config, logging, glob | `util` |
/// | other crates (rustls, ...) | their crate name |
pub fn source_name(target: &str) -> String {
    let mut parts = target.split("::");
    let krate = parts.next().unwrap_or_default();
    if krate != "virtproxyd" {
        return format!("{krate} {target}");
    }
    let module = parts.next().unwrap_or("virtproxyd");
    let dir = match module {
        "relay" | "reactor" | "worker" | "conn" | "sys" | "proto" | "tls" => "rpc",
        "handshake" | "route" | "identity" => "remote",
        "config" | "logging" | "glob" => "util",
        _ => "daemon",
    };
    format!("{dir}.{module} {target}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_print_in_libvirts_normalised_form() {
        let f = parse_filters("1:rpc  3:+util").unwrap();
        assert_eq!(format_filters(&f), "1:*rpc* 3:*util* ");
        assert_eq!(parse_filters("").unwrap(), vec![]);
    }

    #[test]
    fn malformed_filters_are_refused_with_libvirts_words() {
        let e = |s| parse_filters(s).unwrap_err().0;
        assert_eq!(e("x"), "Malformed format for filter 'x'");
        assert_eq!(e("9:rpc"), "Invalid priority '9' for filter '9:rpc'");
        assert_eq!(e("-1:rpc"), "Invalid priority '-1' for filter '-1:rpc'");
        assert_eq!(e("1:+"), "Invalid match string '+'");
    }

    #[test]
    fn outputs_parse_dedupe_and_print() {
        let o = parse_outputs("3:stderr 1:file:/tmp/a.log 2:stderr 1:syslog:vpd").unwrap();
        assert_eq!(
            format_outputs(&o),
            "1:file:/tmp/a.log 2:stderr 1:syslog:vpd"
        );
        let o = parse_outputs("1:file:/tmp/x/../b.log").unwrap();
        assert_eq!(o[0].dest, Dest::File("/tmp/b.log".into()));
    }

    #[test]
    fn malformed_outputs_are_refused_with_libvirts_words() {
        let e = |s| parse_outputs(s).unwrap_err().0;
        assert_eq!(
            e("9:bogus"),
            "Invalid log priority '9' for log output '9:bogus'"
        );
        assert_eq!(
            e("1:bogus"),
            "Invalid log destination 'bogus' for log output '1:bogus'"
        );
        assert_eq!(e("stderr"), "Malformed format for log output 'stderr'");
        assert_eq!(
            e("1:file"),
            "Log output '1:file' does not meet the format requirements for destination type 'file'"
        );
        assert_eq!(
            e("1:stderr:x"),
            "Log output '1:stderr:x' does not meet the format requirements for destination type 'stderr'"
        );
    }

    #[test]
    fn levels_and_source_names() {
        assert_eq!(parse_level("warning"), Ok(Priority::Warn));
        assert!(parse_level("5").is_err());
        assert_eq!(
            source_name("virtproxyd::relay::pump"),
            "rpc.relay virtproxyd::relay::pump"
        );
        assert_eq!(source_name("virtproxyd"), "daemon.virtproxyd virtproxyd");
        assert_eq!(source_name("rustls::server"), "rustls rustls::server");
    }
}
