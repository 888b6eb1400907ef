//! Responses: their statuses, the bytes of a status line, headers and body, and
//! the `Responder` that answers a parsed request (a `/metrics` body in the
//! negotiated format, gzipped when asked, rendered at most once per
//! [`Limits::min_render_interval`](super::Limits) and format).
//!
//! Owns: the rendered bodies (one per format, each with its gzip, reused
//! across requests and kept as the render cache), and every header the
//! endpoint sends (`Content-Length` always; `Content-Encoding`, `Vary`,
//! `Allow`, `Retry-After`, `WWW-Authenticate`, `Connection: close` when
//! they apply, and the web configuration's headers on every response to a
//! request).
//!
//! Never: touches a socket (responses are appended to a caller's `Vec`);
//! calls the renderer for anything but a GET or HEAD of `/metrics` without a
//! request body, or for a format whose body is younger than the interval;
//! compresses one rendered body twice.

use std::io::Write;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;

use super::request::{Format, Method, Request, Route};

/// Turns requests into responses; the buffers are reused across requests.
pub(super) struct Responder<'r> {
    render: &'r mut dyn FnMut(Format, &mut Vec<u8>),
    ready: &'r dyn Fn() -> bool,
    healthy: &'r dyn Fn() -> bool,
    /// How long a rendered body is served again instead of rendering anew.
    reuse_for: Duration,
    /// The last body of each format, indexed by [`Rendered::slot`].
    rendered: [Rendered; 2],
    /// The web configuration's `http_server_config.headers`, as
    /// `Name: value\r\n` lines.
    pub(super) headers: std::sync::Arc<[u8]>,
}

/// One format's last rendered body, and its gzip once a request asked for it.
#[derive(Default)]
struct Rendered {
    body: Vec<u8>,
    /// `body` compressed, when `gz_current`.
    gz: Vec<u8>,
    gz_current: bool,
    /// When `body` was rendered; `None` before the first render.
    at: Option<Instant>,
}

impl Rendered {
    fn slot(format: Format) -> usize {
        match format {
            Format::Prometheus => 0,
            Format::OpenMetrics => 1,
        }
    }

    /// Renders `body` again unless it is younger than `reuse_for` at `now`.
    fn refresh(
        &mut self,
        format: Format,
        now: Instant,
        reuse_for: Duration,
        render: &mut dyn FnMut(Format, &mut Vec<u8>),
    ) {
        let fresh = self
            .at
            .is_some_and(|at| now.saturating_duration_since(at) < reuse_for);
        if fresh {
            return;
        }
        self.body.clear();
        render(format, &mut self.body);
        self.gz_current = false;
        self.at = Some(now);
    }

    /// Compresses `body` into `gz` unless that is done already; false if it
    /// failed (then the response goes out uncompressed).
    fn compress(&mut self) -> bool {
        if self.gz_current {
            return true;
        }
        let mut gz = std::mem::take(&mut self.gz);
        gz.clear();
        // The fastest level: the exposition text compresses well anyway, and
        // this thread also merges the shards for every render.
        let mut encoder = GzEncoder::new(gz, Compression::fast());
        if encoder.write_all(&self.body).is_err() {
            return false;
        }
        match encoder.finish() {
            Ok(gz) => {
                self.gz = gz;
                self.gz_current = true;
                true
            }
            Err(_) => false,
        }
    }
}

impl<'r> Responder<'r> {
    /// `render` appends a `/metrics` body in the given format, at most once
    /// per `reuse_for` and format (zero: once per request); `healthy`
    /// answers `/healthz`, and `ready` and `healthy` both `/readyz`.
    pub(super) fn new(
        render: &'r mut dyn FnMut(Format, &mut Vec<u8>),
        ready: &'r dyn Fn() -> bool,
        healthy: &'r dyn Fn() -> bool,
        reuse_for: Duration,
    ) -> Self {
        Responder {
            render,
            ready,
            healthy,
            reuse_for,
            rendered: Default::default(),
            headers: std::sync::Arc::from(&b""[..]),
        }
    }

    /// Appends the response to `request`, which arrived at `now`, to `out`;
    /// returns whether the connection is closed after it.
    pub(super) fn respond(&mut self, request: &Request, now: Instant, out: &mut Vec<u8>) -> bool {
        let head_only = request.method == Method::Head;
        let close = !request.keep_alive;
        let headers = &*self.headers;
        match request.method {
            Method::Other => {
                write_reply(
                    out,
                    Status::MethodNotAllowed.plain(false, true).with(headers),
                );
                return true;
            }
            Method::Get | Method::Head => {}
        }
        if request.has_body {
            write_reply(
                out,
                Status::BodyRefused.plain(head_only, true).with(headers),
            );
            return true;
        }
        let reply = match request.route {
            Route::Metrics => {
                let rendered = &mut self.rendered[Rendered::slot(request.format)];
                rendered.refresh(request.format, now, self.reuse_for, self.render);
                let gzip = request.gzip && rendered.compress();
                Reply {
                    status: Status::Ok,
                    content_type: request.format.content_type(),
                    body: if gzip { &rendered.gz } else { &rendered.body },
                    gzip,
                    negotiated: true,
                    head_only,
                    close,
                    headers,
                }
            }
            Route::Healthz if (self.healthy)() => Status::Ok.plain(head_only, close),
            Route::Healthz => Status::Unhealthy.plain(head_only, close),
            Route::Readyz if !(self.healthy)() => Status::Unhealthy.plain(head_only, close),
            Route::Readyz if (self.ready)() => Status::Ok.plain(head_only, close),
            Route::Readyz => Status::NotReady.plain(head_only, close),
            Route::NotFound => Status::NotFound.plain(head_only, close),
        };
        write_reply(out, reply.with(headers));
        close
    }

    /// Appends the refusal of `request` for want of credentials (401), or
    /// for too many password checks (429, then close), to `out`; returns
    /// whether the connection is closed after it.
    pub(super) fn refuse(&self, request: &Request, status: Status, out: &mut Vec<u8>) -> bool {
        let close = !request.keep_alive || status != Status::Unauthorized;
        let head_only = request.method == Method::Head;
        write_reply(out, status.plain(head_only, close).with(&self.headers));
        close
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Timeout,
    BodyRefused,
    HeadTooLarge,
    NotReady,
    Unhealthy,
    Busy,
    Unauthorized,
    TooManyRequests,
    /// A password check did not answer within the head deadline.
    CheckTimeout,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::Timeout => "408 Request Timeout",
            Status::BodyRefused => "413 Content Too Large",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::Unauthorized => "401 Unauthorized",
            Status::TooManyRequests => "429 Too Many Requests",
            Status::NotReady | Status::Unhealthy | Status::Busy | Status::CheckTimeout => {
                "503 Service Unavailable"
            }
        }
    }

    /// The short text body of everything but `/metrics`.
    fn text(self) -> &'static [u8] {
        match self {
            Status::Ok => b"ok\n",
            Status::BadRequest => b"malformed request\n",
            Status::NotFound => b"not found; the metrics are at /metrics\n",
            Status::MethodNotAllowed => b"only GET and HEAD\n",
            Status::Timeout => b"request head not received in time\n",
            Status::BodyRefused => b"request bodies are not accepted\n",
            Status::HeadTooLarge => b"request head too large\n",
            Status::NotReady => b"not ready\n",
            Status::Unhealthy => b"unhealthy: an event reader is stuck\n",
            Status::Busy => b"too many connections\n",
            Status::Unauthorized => b"unauthorized\n",
            Status::TooManyRequests => b"too many requests or password checks; retry later\n",
            Status::CheckTimeout => b"the password check took too long; retry later\n",
        }
    }

    pub(super) fn plain(self, head_only: bool, close: bool) -> Reply<'static> {
        Reply {
            status: self,
            content_type: "text/plain; charset=utf-8",
            body: self.text(),
            gzip: false,
            negotiated: false,
            head_only,
            close,
            headers: b"",
        }
    }
}

impl<'a> Reply<'a> {
    /// The same reply with the web configuration's `headers` lines.
    pub(super) fn with<'b>(self, headers: &'b [u8]) -> Reply<'b>
    where
        'a: 'b,
    {
        Reply { headers, ..self }
    }
}

pub(super) struct Reply<'a> {
    status: Status,
    content_type: &'static str,
    body: &'a [u8],
    gzip: bool,
    /// Content type and encoding depend on `Accept` and `Accept-Encoding`.
    negotiated: bool,
    /// A HEAD request: headers as for GET, no body.
    head_only: bool,
    close: bool,
    /// Extra header lines (`Name: value\r\n`), from the web configuration.
    headers: &'a [u8],
}

/// Appends the response to `out`: always with `Content-Length`, always
/// `HTTP/1.1` (which a 1.0 client accepts).
pub(super) fn write_reply(out: &mut Vec<u8>, r: Reply<'_>) {
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        r.status.line(),
        r.content_type,
        r.body.len()
    );
    if r.gzip {
        out.extend_from_slice(b"Content-Encoding: gzip\r\n");
    }
    if r.negotiated {
        out.extend_from_slice(b"Vary: Accept, Accept-Encoding\r\n");
    }
    if r.status == Status::MethodNotAllowed {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    if matches!(
        r.status,
        Status::Busy | Status::TooManyRequests | Status::CheckTimeout
    ) {
        out.extend_from_slice(b"Retry-After: 1\r\n");
    }
    if r.status == Status::Unauthorized {
        out.extend_from_slice(b"WWW-Authenticate: Basic realm=\"conntrack-metrics\"\r\n");
    }
    out.extend_from_slice(r.headers);
    if r.close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !r.head_only {
        out.extend_from_slice(r.body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_carry_length_and_head_has_no_body() {
        let mut get = Vec::new();
        write_reply(
            &mut get,
            Reply {
                status: Status::Ok,
                content_type: Format::OpenMetrics.content_type(),
                body: b"# EOF\n",
                gzip: true,
                negotiated: true,
                head_only: false,
                close: false,
                headers: b"X-Frame-Options: deny\r\n",
            },
        );
        assert_eq!(
            get,
            b"HTTP/1.1 200 OK\r\n\
              Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
              Content-Length: 6\r\nContent-Encoding: gzip\r\nVary: Accept, Accept-Encoding\r\n\
              X-Frame-Options: deny\r\n\r\n# EOF\n"
        );
        let mut head = Vec::new();
        write_reply(&mut head, Status::MethodNotAllowed.plain(true, true));
        let text = String::from_utf8(head).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Content-Length: 18\r\n"));
        assert!(text.contains("Allow: GET, HEAD\r\n"));
        assert!(text.ends_with("Connection: close\r\n\r\n"));
    }
}
