//! Request heads: parsing one out of a connection's buffer (httparse,
//! zero-copy) into the few facts the endpoint acts on, and content
//! negotiation: [`Format`] from `Accept`, gzip or identity from
//! `Accept-Encoding`.
//!
//! Owns: the header-line limit ([`MAX_HEADERS`]), what makes a head malformed
//! or too large, the routes, and how `q` values are read and compared.
//!
//! Never: allocates, keeps a borrow of the buffer it parsed (a [`Request`] is
//! copied out), or reads past the head: what follows belongs to the next
//! request.

/// The exposition format of a `/metrics` response, chosen from the request's
/// `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4, the default.
    Prometheus,
    /// OpenMetrics 1.0.0, when the scraper asks for `application/openmetrics-text`.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Most header lines in a request head; more is answered 431.
const MAX_HEADERS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Method {
    Get,
    Head,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Metrics,
    Healthz,
    Readyz,
    NotFound,
}

/// What the server needs from a request head, copied out of the borrowed
/// httparse view so the buffer can be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Request {
    pub(super) method: Method,
    pub(super) route: Route,
    pub(super) format: Format,
    pub(super) gzip: bool,
    pub(super) keep_alive: bool,
    /// `Content-Length` above zero or any `Transfer-Encoding`.
    pub(super) has_body: bool,
    /// Where the (last) `Authorization` header's value sits in the parsed
    /// buffer, as start and end offsets.
    pub(super) authorization: Option<(usize, usize)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Examined {
    /// Valid so far; more bytes needed.
    Partial,
    /// Not complete within the head limit, or too many header lines.
    TooLarge,
    /// Not an HTTP/1.x request head.
    Malformed,
    /// A whole head of `len` bytes; what follows belongs to the next request.
    Complete { len: usize, request: Request },
}

/// Parses the request head at the start of `buf`. `full` says `buf` is as
/// long as the head limit allows, so an incomplete head is too large.
pub(super) fn examine(buf: &[u8], full: bool) -> Examined {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => match Request::from_parsed(&parsed, buf) {
            Some(request) => Examined::Complete { len, request },
            None => Examined::Malformed,
        },
        Ok(httparse::Status::Partial) if full => Examined::TooLarge,
        Ok(httparse::Status::Partial) => Examined::Partial,
        Err(httparse::Error::TooManyHeaders) => Examined::TooLarge,
        Err(_) => Examined::Malformed,
    }
}

impl Request {
    /// None for a head httparse accepts but this server cannot trust (an
    /// unreadable `Content-Length`).
    fn from_parsed(parsed: &httparse::Request<'_, '_>, buf: &[u8]) -> Option<Request> {
        let method = match parsed.method? {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            _ => Method::Other,
        };
        let path = parsed.path?;
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let route = match path {
            "/metrics" => Route::Metrics,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            _ => Route::NotFound,
        };
        let mut keep_alive = parsed.version? == 1;
        let mut has_body = false;
        let mut om_q = 0.0f32;
        let mut text_q = 0.0f32;
        let mut coding = Coding::default();
        let mut authorization = None;
        for header in parsed.headers.iter() {
            let name = header.name;
            // A value that is not UTF-8 is ignored, as if absent.
            let value = std::str::from_utf8(header.value).unwrap_or("");
            if name.eq_ignore_ascii_case("accept") {
                accept_q(value, &mut om_q, &mut text_q);
            } else if name.eq_ignore_ascii_case("accept-encoding") {
                coding.add(value);
            } else if name.eq_ignore_ascii_case("connection") {
                if value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close"))
                {
                    keep_alive = false;
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                let value = value.trim();
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                has_body |= value.bytes().any(|b| b != b'0');
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                has_body = true;
            } else if name.eq_ignore_ascii_case("authorization") {
                // httparse's values are slices of `buf`: their offset is
                // where they start in it.
                let start = (header.value.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
                authorization = Some((start, start + header.value.len()));
            }
        }
        Some(Request {
            method,
            route,
            format: choose_format(om_q, text_q),
            gzip: coding.gzip(),
            keep_alive,
            has_body,
            authorization,
        })
    }
}

/// OpenMetrics when the client accepts it (`q > 0`, any version) at least as
/// much as it accepts `text/plain`; Prometheus text otherwise. Wildcards do
/// not ask for OpenMetrics: the plain text is the default.
fn choose_format(om_q: f32, text_q: f32) -> Format {
    if om_q > 0.0 && om_q >= text_q {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    }
}

/// Folds one `Accept` value into the highest `q` given to
/// `application/openmetrics-text` and to `text/plain`.
fn accept_q(value: &str, om_q: &mut f32, text_q: &mut f32) {
    for range in value.split(',') {
        let (media, params) = range.split_once(';').unwrap_or((range, ""));
        let media = media.trim();
        let q = q_param(params);
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            *om_q = om_q.max(q);
        } else if media.eq_ignore_ascii_case("text/plain") {
            *text_q = text_q.max(q);
        }
    }
}

/// The `q` parameter among `;`-separated parameters: 1 when absent, 0 when
/// unreadable (an unreadable preference is not a request).
fn q_param(params: &str) -> f32 {
    for param in params.split(';') {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("q") {
            return match value.trim().parse::<f32>() {
                Ok(q) if (0.0..=1.0).contains(&q) => q,
                _ => 0.0,
            };
        }
    }
    1.0
}

/// What `Accept-Encoding` says about gzip.
#[derive(Clone, Copy, Debug, Default)]
struct Coding {
    /// Highest `q` of `gzip` or `x-gzip`, if named.
    gzip_q: Option<f32>,
    /// Highest `q` of `*`, if named.
    any_q: Option<f32>,
}

impl Coding {
    fn add(&mut self, value: &str) {
        for coding in value.split(',') {
            let (name, params) = coding.split_once(';').unwrap_or((coding, ""));
            let name = name.trim();
            let q = q_param(params);
            let slot = if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                &mut self.gzip_q
            } else if name == "*" {
                &mut self.any_q
            } else {
                continue;
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
    }

    /// gzip named with `q > 0`, or not named and `*` with `q > 0`.
    fn gzip(self) -> bool {
        match (self.gzip_q, self.any_q) {
            (Some(q), _) => q > 0.0,
            (None, Some(q)) => q > 0.0,
            (None, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format_for(accept: &str) -> Format {
        let (mut om, mut text) = (0.0, 0.0);
        accept_q(accept, &mut om, &mut text);
        choose_format(om, text)
    }

    fn gzip_for(values: &[&str]) -> bool {
        let mut coding = Coding::default();
        for v in values {
            coding.add(v);
        }
        coding.gzip()
    }

    fn complete(buf: &[u8]) -> (usize, Request) {
        match examine(buf, false) {
            Examined::Complete { len, request } => (len, request),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn accept_headers_of_real_scrapers() {
        // Prometheus 2.x default.
        assert_eq!(
            format_for(
                "application/openmetrics-text;version=1.0.0;q=0.5,\
                 application/openmetrics-text;version=0.0.1;q=0.4,\
                 text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            ),
            Format::OpenMetrics
        );
        // Prometheus 3 default.
        assert_eq!(
            format_for(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
                 application/openmetrics-text;version=0.0.1;q=0.5,\
                 text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,\
                 text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            ),
            Format::OpenMetrics
        );
        // Prometheus with `scrape_protocols: [PrometheusText0.0.4, ...]`.
        assert_eq!(
            format_for(
                "text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.4"
            ),
            Format::Prometheus
        );
        // curl, browsers, no header at all.
        assert_eq!(format_for("*/*"), Format::Prometheus);
        assert_eq!(
            format_for("text/html,application/xhtml+xml,*/*;q=0.8"),
            Format::Prometheus
        );
        assert_eq!(format_for(""), Format::Prometheus);
    }

    #[test]
    fn accept_openmetrics_edge_cases() {
        assert_eq!(
            format_for("application/openmetrics-text"),
            Format::OpenMetrics
        );
        assert_eq!(
            format_for("Application/OpenMetrics-Text; Version=0.0.1"),
            Format::OpenMetrics
        );
        assert_eq!(
            format_for(" application/openmetrics-text ; q = 0.1 "),
            Format::OpenMetrics
        );
        assert_eq!(
            format_for("application/openmetrics-text;q=0"),
            Format::Prometheus
        );
        assert_eq!(
            format_for("application/openmetrics-text;q=0.000"),
            Format::Prometheus
        );
        assert_eq!(
            format_for("application/openmetrics-text;q=nonsense"),
            Format::Prometheus
        );
        assert_eq!(
            format_for("application/openmetrics-text;q=2"),
            Format::Prometheus
        );
        // A tie goes to OpenMetrics: the client named it.
        assert_eq!(
            format_for("text/plain,application/openmetrics-text"),
            Format::OpenMetrics
        );
        // Wildcards never select it.
        assert_eq!(format_for("application/*"), Format::Prometheus);
    }

    #[test]
    fn accept_encoding() {
        assert!(gzip_for(&["gzip"]));
        assert!(gzip_for(&["gzip, deflate, br"]));
        assert!(gzip_for(&["br;q=1.0, GZIP;q=0.5"]));
        assert!(gzip_for(&["x-gzip"]));
        assert!(gzip_for(&["*"]));
        assert!(gzip_for(&["identity", "gzip"]));
        assert!(!gzip_for(&[]));
        assert!(!gzip_for(&["identity"]));
        assert!(!gzip_for(&["deflate, br"]));
        assert!(!gzip_for(&["gzip;q=0"]));
        assert!(!gzip_for(&["gzip;q=0.0, *"]));
        assert!(!gzip_for(&["*;q=0"]));
        assert!(!gzip_for(&["gzipfoo"]));
        assert!(!gzip_for(&["gzip;q=x"]));
    }

    #[test]
    fn request_fields() {
        let head =
            b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text\r\n\
              Accept-Encoding: gzip\r\n\r\n";
        let mut with_next = head.to_vec();
        with_next.extend_from_slice(b"GET /next");
        let (len, r) = complete(&with_next);
        assert_eq!(len, head.len());
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.route, Route::Metrics);
        assert_eq!(r.format, Format::OpenMetrics);
        assert!(r.gzip && r.keep_alive && !r.has_body);

        let (_, r) = complete(b"HEAD /healthz HTTP/1.0\r\n\r\n");
        assert_eq!(
            (r.method, r.route, r.keep_alive),
            (Method::Head, Route::Healthz, false)
        );
        let (_, r) = complete(b"GET /readyz HTTP/1.1\r\nConnection: Keep-Alive, Close\r\n\r\n");
        assert_eq!((r.route, r.keep_alive), (Route::Readyz, false));
        let (_, r) = complete(b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n");
        assert_eq!((r.method, r.has_body), (Method::Other, true));
        let (_, r) = complete(b"GET / HTTP/1.1\r\nContent-Length: 000\r\n\r\n");
        assert_eq!((r.route, r.has_body), (Route::NotFound, false));
        let (_, r) = complete(b"GET /metricsx HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((r.route, r.has_body), (Route::NotFound, true));
        // Bare LF line ends are accepted.
        let (len, _) = complete(b"GET /metrics HTTP/1.1\n\n");
        assert_eq!(len, 23);
    }

    #[test]
    fn malformed_heads() {
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics FTP/1.1\r\n\r\n",
            b"GET\t/metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
        ] {
            assert_eq!(examine(bad, false), Examined::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn head_size_accounting() {
        let head = b"GET /metrics HTTP/1.1\r\nHost: example\r\n\r\n";
        // Every strict prefix is partial while under the limit, and too large
        // once it fills the buffer.
        for n in 0..head.len() {
            assert_eq!(examine(&head[..n], false), Examined::Partial, "{n}");
            assert_eq!(examine(&head[..n], true), Examined::TooLarge, "{n}");
        }
        // A head exactly as long as the limit is fine.
        assert!(matches!(examine(head, true), Examined::Complete { len, .. } if len == head.len()));

        // Too many header lines count as too large, even if short.
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            many.extend_from_slice(b"a: b\r\n");
        }
        assert_eq!(examine(&many, false), Examined::TooLarge);
        many.extend_from_slice(b"\r\n");
        assert_eq!(examine(&many, false), Examined::TooLarge);
    }
}
