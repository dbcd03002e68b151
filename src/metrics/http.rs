//! The endpoint's tiny HTTP/1.x: one request per connection, read whole, answered, closed.
//! Sans-IO (bytes in, bytes out), so every edge case is a unit test; the socket loop is in
//! `serve`.

/// Largest request (request line and headers) we read; Prometheus sends a few hundred bytes.
pub const MAX_REQUEST: usize = 8 * 1024;

/// The two exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`, ending in `# EOF`.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// What a complete request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// GET or HEAD of `/metrics` (a query string is ignored).
    Metrics { head: bool, format: Format },
    /// GET or HEAD of `/clients`: each client's own figures, as JSON.
    Clients { head: bool },
    /// Another path (404).
    NotFound { head: bool },
    /// Another method (405).
    MethodNotAllowed,
}

/// The result of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// No blank line yet, and still under [`MAX_REQUEST`].
    Incomplete,
    Done(Request),
    /// Answer with this status and close.
    Bad(Status),
}

/// Statuses the endpoint sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    TooLarge,
    VersionNotSupported,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::TooLarge => "431 Request Header Fields Too Large",
            Status::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }
}

/// The end of the header block: after `\r\n\r\n` (or a bare `\n\n`, which RFC 9112 lets a
/// server accept).
fn header_end(buf: &[u8]) -> Option<usize> {
    let mut prev_nl = false;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'\n' if prev_nl => return Some(i + 1),
            b'\n' => prev_nl = true,
            b'\r' => {}
            _ => prev_nl = false,
        }
    }
    None
}

/// Parses the request in `buf` (everything read so far).
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = header_end(buf) else {
        return if buf.len() >= MAX_REQUEST {
            Parsed::Bad(Status::TooLarge)
        } else {
            Parsed::Incomplete
        };
    };
    if end > MAX_REQUEST {
        return Parsed::Bad(Status::TooLarge);
    }
    let Ok(text) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Bad(Status::BadRequest);
    };
    let mut lines = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    // RFC 9112 §2.2: a server should ignore empty lines before the request line.
    let Some(request_line) = lines.by_ref().find(|l| !l.is_empty()) else {
        return Parsed::Bad(Status::BadRequest);
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Bad(Status::BadRequest);
    };
    if method.is_empty() || !target.starts_with('/') {
        return Parsed::Bad(Status::BadRequest);
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Parsed::Bad(Status::VersionNotSupported),
        _ => return Parsed::Bad(Status::BadRequest),
    }
    let mut accept = String::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Bad(Status::BadRequest);
        };
        // A space before the colon is a smuggling vector; RFC 9112 §5.1 says reject.
        if name.is_empty() || name.ends_with([' ', '\t']) {
            return Parsed::Bad(Status::BadRequest);
        }
        if name.eq_ignore_ascii_case("accept") {
            if !accept.is_empty() {
                accept.push(',');
            }
            accept.push_str(value.trim());
        }
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Parsed::Done(Request::MethodNotAllowed),
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Parsed::Done(match path {
        "/metrics" => Request::Metrics {
            head,
            format: negotiate(&accept),
        },
        "/clients" => Request::Clients { head },
        _ => Request::NotFound { head },
    })
}

/// Picks the format from an `Accept` value (RFC 9110 §12.5.1): the one with the higher
/// quality; on a tie OpenMetrics if it was named (not just matched by a wildcard), else the
/// text format, which every scraper reads. OpenMetrics ranges naming another version than
/// 1.0.0 (e.g. Prometheus's `version=0.0.1` fallback) do not match it.
pub fn negotiate(accept: &str) -> Format {
    // (quality, specificity) of the best-matching range for each format.
    let mut om = (0u16, 0u8);
    let mut text = (0u16, 0u8);
    for range in accept.split(',') {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("").to_ascii_lowercase();
        let mut q = 1000u16;
        let mut version: Option<String> = None;
        for p in params {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => q = quality(v),
                "version" => version = Some(v.to_string()),
                _ => {}
            }
        }
        let (om_spec, text_spec) = match media.as_str() {
            "application/openmetrics-text" => {
                let ok = version.as_deref().map_or(true, |v| v == "1.0.0");
                (if ok { 3 } else { 0 }, 0)
            }
            "text/plain" => {
                let ok = version.as_deref().map_or(true, |v| v == "0.0.4");
                (0, if ok { 3 } else { 0 })
            }
            "application/*" => (2, 0),
            "text/*" => (0, 2),
            "*/*" => (1, 1),
            _ => (0, 0),
        };
        // The most specific matching range decides a format's quality (RFC 9110 §12.5.1).
        if om_spec > om.1 {
            om = (q, om_spec);
        }
        if text_spec > text.1 {
            text = (q, text_spec);
        }
    }
    if om.0 > text.0 || (om.0 == text.0 && om.0 > 0 && om.1 == 3) {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

/// A `q` value in thousandths; anything unreadable counts as 0 (not acceptable).
fn quality(v: &str) -> u16 {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    let frac_val = format!("{frac:0<3}").parse::<u16>().unwrap_or(0);
    match int {
        "1" if frac_val == 0 => 1000,
        "0" => frac_val,
        _ => 0,
    }
}

/// A whole response: status line, headers and (unless `head`) the body. `Content-Length` is
/// always the body's, as for a GET (RFC 9110 §9.3.2).
pub fn response(status: Status, content_type: &str, body: &[u8], head: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        status.line(),
        body.len()
    );
    if status == Status::MethodNotAllowed {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head {
        out.extend_from_slice(body);
    }
    out
}

/// The plain-text error response for `status`.
pub fn error_response(status: Status, head: bool) -> Vec<u8> {
    let body = format!("{}\n", status.line());
    response(status, "text/plain; charset=utf-8", body.as_bytes(), head)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    fn get(path: &str, accept: Option<&str>) -> Vec<u8> {
        let mut r = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
        if let Some(a) = accept {
            r.push_str(&format!("Accept: {a}\r\n"));
        }
        r.push_str("\r\n");
        r.into_bytes()
    }

    #[test]
    fn a_request_is_incomplete_until_its_blank_line() {
        let full = get("/metrics", None);
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        assert_eq!(
            parse(&full),
            Parsed::Done(Request::Metrics {
                head: false,
                format: Format::Text
            })
        );
        // Bare LF line ends, leading empty lines, HTTP/1.0 and a query string are fine.
        assert_eq!(
            parse(b"\r\nHEAD /metrics?x=1 HTTP/1.0\nAccept: application/openmetrics-text\n\n"),
            Parsed::Done(Request::Metrics {
                head: true,
                format: Format::OpenMetrics
            })
        );
    }

    #[test]
    fn other_paths_and_methods() {
        assert_eq!(
            parse(&get("/", None)),
            Parsed::Done(Request::NotFound { head: false })
        );
        assert_eq!(
            parse(&get("/clients?x", None)),
            Parsed::Done(Request::Clients { head: false })
        );
        assert_eq!(
            parse(&get("/metrics/x", None)),
            Parsed::Done(Request::NotFound { head: false })
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Parsed::Done(Request::MethodNotAllowed)
        );
        assert_eq!(
            parse(b"HEAD /nope HTTP/1.1\r\n\r\n"),
            Parsed::Done(Request::NotFound { head: true })
        );
    }

    #[test]
    fn malformed_and_huge_requests_are_refused() {
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 x\r\n\r\n",
            b"GET /metrics FOO/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nAccept : text/plain\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nX: \xff\r\n\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Parsed::Bad(Status::BadRequest),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b"GET /metrics HTTP/2.0\r\n\r\n"),
            Parsed::Bad(Status::VersionNotSupported)
        );
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST, b'a');
        assert_eq!(parse(&huge), Parsed::Bad(Status::TooLarge));
        huge.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&huge), Parsed::Bad(Status::TooLarge));
    }

    #[test]
    fn accept_negotiates_the_format() {
        assert_eq!(negotiate(PROMETHEUS_ACCEPT), Format::OpenMetrics);
        assert_eq!(negotiate(""), Format::Text);
        assert_eq!(negotiate("*/*"), Format::Text);
        assert_eq!(negotiate("text/plain"), Format::Text);
        assert_eq!(
            negotiate("application/openmetrics-text"),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate("Application/OpenMetrics-Text; version=\"1.0.0\""),
            Format::OpenMetrics
        );
        // Only 0.0.1 OpenMetrics asked for: we do not claim to speak it.
        assert_eq!(
            negotiate("application/openmetrics-text;version=0.0.1,text/plain;q=0.5"),
            Format::Text
        );
        // Quality wins over order.
        assert_eq!(
            negotiate("application/openmetrics-text;q=0.2,text/plain;version=0.0.4;q=0.9"),
            Format::Text
        );
        assert_eq!(
            negotiate("text/plain;q=0.3, application/openmetrics-text;q=0.4"),
            Format::OpenMetrics
        );
        // q=0 means "not acceptable", even if a wildcard would match.
        assert_eq!(
            negotiate("application/openmetrics-text;q=0, */*"),
            Format::Text
        );
        assert_eq!(negotiate("text/plain;q=0, */*;q=0.5"), Format::OpenMetrics);
        // Two Accept headers are joined by the parser.
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nAccept: text/plain;q=0.1\r\nAccept: application/openmetrics-text\r\n\r\n"),
            Parsed::Done(Request::Metrics { head: false, format: Format::OpenMetrics })
        );
    }

    #[test]
    fn quality_values() {
        assert_eq!(quality("1"), 1000);
        assert_eq!(quality("1.0"), 1000);
        assert_eq!(quality("0.5"), 500);
        assert_eq!(quality("0.125"), 125);
        assert_eq!(quality("0"), 0);
        assert_eq!(quality("0.1234"), 0);
        assert_eq!(quality("2"), 0);
        assert_eq!(quality("1.5"), 0);
        assert_eq!(quality("x"), 0);
    }

    #[test]
    fn responses_close_and_head_has_no_body() {
        let r = response(Status::Ok, Format::Text.content_type(), b"a 1\n", false);
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
        assert!(s.contains("\r\nConnection: close\r\n"), "{s}");
        assert!(s.contains("\r\nContent-Length: 4\r\n"), "{s}");
        assert!(s.ends_with("\r\n\r\na 1\n"), "{s}");
        let h = response(Status::Ok, Format::Text.content_type(), b"a 1\n", true);
        assert!(String::from_utf8(h)
            .unwrap()
            .ends_with("Content-Length: 4\r\nConnection: close\r\n\r\n"));
        let e = String::from_utf8(error_response(Status::MethodNotAllowed, false)).unwrap();
        assert!(
            e.starts_with("HTTP/1.1 405 ") && e.contains("\r\nAllow: GET, HEAD\r\n"),
            "{e}"
        );
    }
}
