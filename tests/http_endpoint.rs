//! The scrape endpoint end to end over loopback: a real `Endpoint` on
//! 127.0.0.1, port 0, in its own thread, with a renderer that returns a fixed
//! body of about 200 KB (so responses take several partial writes) and a
//! readiness flag; clients are plain blocking std sockets.
//!
//! Every socket has read and write timeouts and every server thread is stopped
//! and joined when its test ends (also on panic), so nothing here can hang.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use conntrack_metrics::expo::http::{Endpoint, Format, Limits, StopHandle};

mod common;

/// Longest any single socket operation of a test may block.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The fixed exposition body for `format`: about 200 KB, distinct per format.
fn body(format: Format) -> &'static [u8] {
    static PROMETHEUS: OnceLock<Vec<u8>> = OnceLock::new();
    static OPENMETRICS: OnceLock<Vec<u8>> = OnceLock::new();
    let make = |eof: bool| {
        let mut text = String::from("# HELP test_bytes A test gauge.\n# TYPE test_bytes gauge\n");
        let mut i = 0u64;
        while text.len() < 200_000 {
            text.push_str(&format!("test_bytes{{i=\"{i}\"}} {}\n", i * 7919 % 104_729));
            i += 1;
        }
        if eof {
            text.push_str("# EOF\n");
        }
        text.into_bytes()
    };
    match format {
        Format::Prometheus => PROMETHEUS.get_or_init(|| make(false)),
        Format::OpenMetrics => OPENMETRICS.get_or_init(|| make(true)),
    }
}

/// A running endpoint; stopped and joined on drop.
struct Server {
    addr: SocketAddr,
    stop: StopHandle,
    ready: Arc<AtomicBool>,
    renders: Arc<AtomicUsize>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Server {
    fn start(limits: Limits) -> Server {
        let (endpoint, stop) = Endpoint::bind("127.0.0.1:0".parse().unwrap(), limits).unwrap();
        let addr = endpoint.local_addr();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        let ready = Arc::new(AtomicBool::new(false));
        let renders = Arc::new(AtomicUsize::new(0));
        let thread = {
            let ready = Arc::clone(&ready);
            let renders = Arc::clone(&renders);
            thread::Builder::new()
                .name("exporter".into())
                .spawn(move || {
                    let mut render = |format: Format, out: &mut Vec<u8>| {
                        assert!(out.is_empty());
                        renders.fetch_add(1, Ordering::Relaxed);
                        out.extend_from_slice(body(format));
                    };
                    let ready = || ready.load(Ordering::Relaxed);
                    endpoint.run(&mut render, &ready, &|| true)
                })
                .unwrap()
        };
        Server {
            addr,
            stop,
            ready,
            renders,
            thread: Some(thread),
        }
    }

    fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A whole GET /metrics on a new connection, checked.
    fn scrape(&self) {
        let mut c = self.client();
        c.send(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
        let r = c.response(false).unwrap().expect("a response");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, body(Format::Prometheus));
    }

    /// `n` connections whose server side is busy writing responses they do
    /// not read: each pipelines [`PIPELINED`] scrapes. Needs a zero
    /// `min_render_interval`: each is answered when `renders` goes up.
    fn stalled_clients(&self, n: usize) -> Vec<Client> {
        let mut stalled = Vec::new();
        for i in 1..=n {
            let mut c = self.client();
            c.send(&b"GET /metrics HTTP/1.1\r\n\r\n".repeat(PIPELINED));
            let start = Instant::now();
            while self.renders.load(Ordering::Relaxed) < i {
                assert!(start.elapsed() < IO_TIMEOUT);
                thread::sleep(Duration::from_millis(1));
            }
            stalled.push(c);
        }
        stalled
    }

    /// The server thread is still serving.
    fn assert_alive(&self) {
        assert!(!self.thread.as_ref().unwrap().is_finished());
    }

    /// Stops the server; returns how long `run` took to return.
    fn stop(&mut self) -> Duration {
        let start = Instant::now();
        self.stop.stop();
        if let Some(thread) = self.thread.take() {
            // `run` returns within milliseconds; a hang here would be a bug,
            // but join has no timeout, so poll `is_finished` against a bound.
            while !thread.is_finished() && start.elapsed() < IO_TIMEOUT {
                thread::sleep(Duration::from_millis(1));
            }
            assert!(thread.is_finished(), "run did not return after stop");
            thread.join().unwrap().unwrap();
        }
        start.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() && !thread::panicking() {
            self.stop();
        } else if let Some(thread) = self.thread.take() {
            self.stop.stop();
            let _ = thread.join();
        }
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A blocking client connection with timeouts; keeps bytes that arrived past
/// one response for the next.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// A connection from another loopback address than 127.0.0.1.
    fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> Client {
        let SocketAddr::V4(to) = addr else {
            panic!("{addr} is not IPv4")
        };
        let stream = common::netns::connect_from(from, to, IO_TIMEOUT).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads more into `buf`; `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next response; `Ok(None)` if the server closed before sending a
    /// byte of it. A response cut short, a timeout or a reset is an error.
    /// `head` says the request was HEAD (no body follows the headers).
    fn response(&mut self, head: bool) -> io::Result<Option<Response>> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = parsed.code.unwrap();
                    let headers: Vec<(String, String)> = parsed
                        .headers
                        .iter()
                        .map(|h| {
                            let value = String::from_utf8(h.value.to_vec()).unwrap();
                            (h.name.to_owned(), value)
                        })
                        .collect();
                    let length: usize = headers
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                        .expect("Content-Length on every response")
                        .1
                        .parse()
                        .unwrap();
                    let length = if head { 0 } else { length };
                    self.buf.drain(..len);
                    while self.buf.len() < length {
                        if self.fill()? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                    let body = self.buf.drain(..length).collect();
                    return Ok(Some(Response {
                        status,
                        headers,
                        body,
                    }));
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => panic!("bad response {e}: {:?}", String::from_utf8_lossy(&self.buf)),
            }
            if self.fill()? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// Asserts the server closes the connection (end of stream) with nothing
    /// more sent.
    fn expect_closed(&mut self) {
        assert_eq!(self.fill().unwrap(), 0, "expected the server to close");
        assert!(self.buf.is_empty());
    }
}

/// Pipelined scrapes a stalling client sends: 40 MB of responses, far more
/// than loopback socket buffers hold for a client that does not read. Their
/// 5 KB fit in the default 8 KiB head buffer.
const PIPELINED: usize = 200;

fn test_limits() -> Limits {
    Limits {
        head_deadline: Duration::from_secs(2),
        write_deadline: Duration::from_secs(2),
        ..Limits::default()
    }
}

#[test]
fn get_metrics_is_prometheus_text_with_length() {
    let server = Server::start(test_limits());
    let mut c = server.client();
    c.send(b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        r.header("content-length"),
        Some(&*body(Format::Prometheus).len().to_string())
    );
    assert_eq!(r.header("content-encoding"), None);
    assert!(!r.closes());
    assert_eq!(r.body, body(Format::Prometheus));
    assert_eq!(server.renders.load(Ordering::Relaxed), 1);
}

#[test]
fn head_metrics_has_the_get_length_and_no_body() {
    let server = Server::start(test_limits());
    let mut c = server.client();
    // HEAD then GET on the same connection: if HEAD had sent body bytes, the
    // second response would not parse.
    c.send(b"HEAD /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    let head = c.response(true).unwrap().unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(&*body(Format::Prometheus).len().to_string())
    );
    assert!(head.body.is_empty());
    c.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
    let next = c.response(false).unwrap().unwrap();
    assert_eq!((next.status, &next.body[..]), (200, &b"ok\n"[..]));
}

#[test]
fn openmetrics_is_negotiated_from_accept() {
    let server = Server::start(test_limits());
    let mut c = server.client();
    // Prometheus 2.x's default Accept.
    c.send(
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: application/openmetrics-text;\
          version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,\
          text/plain;version=0.0.4;q=0.3,*/*;q=0.2\r\n\r\n",
    );
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(r.body, body(Format::OpenMetrics));

    // Refused with q=0: the Prometheus text.
    c.send(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;q=0\r\n\r\n");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(r.body, body(Format::Prometheus));
}

#[test]
fn gzip_is_negotiated_from_accept_encoding() {
    let server = Server::start(test_limits());
    let mut c = server.client();
    c.send(b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept-Encoding: gzip, deflate, br\r\n\r\n");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert!(r.body.len() < body(Format::Prometheus).len() / 2);
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&r.body[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, body(Format::Prometheus));

    // Both at once, and HEAD gives the compressed length.
    let om_gz = b"application/openmetrics-text\r\nAccept-Encoding: gzip\r\n\r\n";
    c.send(&[&b"GET /metrics HTTP/1.1\r\nAccept: "[..], om_gz].concat());
    let get = c.response(false).unwrap().unwrap();
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&get.body[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, body(Format::OpenMetrics));
    c.send(&[&b"HEAD /metrics HTTP/1.1\r\nAccept: "[..], om_gz].concat());
    let head = c.response(true).unwrap().unwrap();
    assert_eq!(
        head.header("content-length"),
        Some(&*get.body.len().to_string())
    );
    assert_eq!(head.header("content-encoding"), Some("gzip"));

    // gzip;q=0 is a refusal.
    c.send(b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip;q=0, identity\r\n\r\n");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, body(Format::Prometheus));
}

#[test]
fn healthz_and_readyz_follow_the_process_and_the_flag() {
    let server = Server::start(test_limits());
    let mut c = server.client();
    c.send(b"GET /healthz HTTP/1.1\r\n\r\n");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!((r.status, &r.body[..]), (200, &b"ok\n"[..]));

    c.send(b"GET /readyz HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().unwrap().status, 503);
    server.ready.store(true, Ordering::Relaxed);
    c.send(b"GET /readyz HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().unwrap().status, 200);
    server.ready.store(false, Ordering::Relaxed);
    c.send(b"GET /readyz HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().unwrap().status, 503);
    assert_eq!(server.renders.load(Ordering::Relaxed), 0);
}

#[test]
fn unknown_path_is_404_and_keeps_the_connection() {
    let server = Server::start(test_limits());
    let mut c = server.client();
    c.send(b"GET /metricsz HTTP/1.1\r\n\r\n");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 404);
    assert!(!r.closes());
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().unwrap().status, 404);
}

#[test]
fn other_methods_and_bodies_are_refused_then_closed() {
    let server = Server::start(test_limits());
    let mut c = server.client();
    c.send(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert!(r.closes());
    c.expect_closed();

    let mut c = server.client();
    c.send(b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 413);
    assert!(r.closes());
    c.expect_closed();
    assert_eq!(server.renders.load(Ordering::Relaxed), 0);
}

#[test]
fn keep_alive_pipelining_and_http10_close() {
    let server = Server::start(test_limits());
    let mut c = server.client();
    // Three requests in one write: three responses, in order.
    c.send(
        b"GET /healthz HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n\
          GET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(c.response(false).unwrap().unwrap().status, 200);
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.body, body(Format::Prometheus));
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 503);
    assert!(r.closes());
    c.expect_closed();

    let mut c = server.client();
    c.send(b"GET /metrics HTTP/1.0\r\n\r\n");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.body, body(Format::Prometheus));
    assert!(r.closes());
    c.expect_closed();
}

/// More pipelined requests in one write than a connection answers per turn:
/// it yields with the rest in its head buffer, where no readiness event will
/// report them, so the server must drive it again on the next round. Without
/// that, the rest would wait for the head deadline (2 s) and get a 408.
#[test]
fn pipelined_requests_beyond_one_turn_are_all_answered() {
    const REQUESTS: usize = 100;
    let server = Server::start(test_limits());
    let mut c = server.client();
    let start = Instant::now();
    // 2,600 bytes: within the 8 KiB head buffer, and small answers, so only
    // the per-turn bound, not a full socket, stops the server.
    c.send(&b"GET /healthz HTTP/1.1\r\n\r\n".repeat(REQUESTS));
    for i in 0..REQUESTS {
        let r = c.response(false).unwrap().expect("a response");
        assert_eq!((r.status, &r.body[..]), (200, &b"ok\n"[..]), "request {i}");
    }
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    // The same with /metrics, whose answers fill the socket too.
    c.send(&b"GET /metrics HTTP/1.1\r\n\r\n".repeat(20));
    for _ in 0..20 {
        let r = c.response(false).unwrap().expect("a response");
        assert_eq!(r.body, body(Format::Prometheus));
    }
}

/// Within `min_render_interval`, every `/metrics` request of a format gets
/// the bytes of one render, GET or HEAD, gzipped or not; past it, the next
/// request renders again.
#[test]
fn metrics_is_rendered_once_per_interval_and_format() {
    let server = Server::start(Limits {
        // Longer than this test: nothing expires by accident.
        min_render_interval: Duration::from_secs(60),
        ..test_limits()
    });
    let om = "Accept: application/openmetrics-text\r\n";
    let gz = "Accept-Encoding: gzip\r\n";
    let mut c = server.client();
    let mut gzipped = Vec::new();
    for round in 0..2 {
        for (format, accept) in [(Format::Prometheus, ""), (Format::OpenMetrics, om)] {
            for (method, encoding) in [("GET", ""), ("HEAD", ""), ("GET", gz), ("HEAD", gz)] {
                let head = method == "HEAD";
                c.send(format!("{method} /metrics HTTP/1.1\r\n{accept}{encoding}\r\n").as_bytes());
                let r = c.response(head).unwrap().unwrap();
                assert_eq!(r.status, 200);
                let length: usize = r.header("content-length").unwrap().parse().unwrap();
                let want = match (encoding.is_empty(), head) {
                    (true, false) => {
                        assert_eq!(r.body, body(format));
                        body(format).len()
                    }
                    (true, true) => body(format).len(),
                    (false, false) => {
                        let mut plain = Vec::new();
                        flate2::read::GzDecoder::new(&r.body[..])
                            .read_to_end(&mut plain)
                            .unwrap();
                        assert_eq!(plain, body(format));
                        gzipped.push(r.body);
                        length
                    }
                    (false, true) => gzipped.last().unwrap().len(),
                };
                assert_eq!(length, want, "round {round}: {method} {accept}{encoding}");
            }
        }
        assert_eq!(server.renders.load(Ordering::Relaxed), 2, "round {round}");
    }
    // The same gzip bytes both rounds: compressed once.
    assert_eq!(gzipped[0], gzipped[2]);
    assert_eq!(gzipped[1], gzipped[3]);

    let server = Server::start(Limits {
        min_render_interval: Duration::from_millis(100),
        ..test_limits()
    });
    server.scrape();
    server.scrape();
    assert_eq!(server.renders.load(Ordering::Relaxed), 1);
    thread::sleep(Duration::from_millis(150));
    server.scrape();
    assert_eq!(server.renders.load(Ordering::Relaxed), 2);
}

#[test]
fn garbage_gets_400_then_close() {
    let server = Server::start(test_limits());
    for garbage in [
        // A TLS ClientHello's first bytes: rejected before any line end.
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x9b"[..],
        b"\x00\x01\x02\x03 garbage \xff\xfe\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nbad header line\r\n\r\n",
    ] {
        let mut c = server.client();
        c.send(garbage);
        let r = c.response(false).unwrap().unwrap();
        assert_eq!(r.status, 400, "{garbage:?}");
        assert!(r.closes());
        c.expect_closed();
    }
    server.assert_alive();
    server.scrape();
}

#[test]
fn oversized_head_gets_431_then_close() {
    let server = Server::start(test_limits());
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: test\r\n".to_vec();
    while head.len() < 64 * 1024 {
        head.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let mut c = server.client();
    // The server stops reading the head at 8 KiB but goes on discarding input
    // until we close, so the whole write goes through.
    c.send(&head);
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 431);
    assert!(r.closes());
    c.expect_closed();

    // A head of exactly the limit is served.
    let mut head = b"GET /metrics HTTP/1.1\r\n".to_vec();
    for _ in 0..7 {
        head.extend_from_slice(format!("X-Filler: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    let pad = 8 * 1024 - head.len() - "X-Pad: \r\n\r\n".len();
    head.extend_from_slice(format!("X-Pad: {}\r\n\r\n", "b".repeat(pad)).as_bytes());
    assert_eq!(head.len(), Limits::default().max_head_bytes);
    let mut c = server.client();
    c.send(&head);
    assert_eq!(c.response(false).unwrap().unwrap().status, 200);
    assert_eq!(server.renders.load(Ordering::Relaxed), 1);
}

#[test]
fn slow_and_idle_clients_are_closed_at_the_head_deadline() {
    let deadline = Duration::from_millis(300);
    let server = Server::start(Limits {
        head_deadline: deadline,
        ..test_limits()
    });
    let start = Instant::now();
    let mut slow = server.client();
    let mut idle = server.client();
    slow.send(b"GET /metrics HTTP/1.1\r\nHost: test\r\n");

    // Half a request: told why, then closed.
    let r = slow.response(false).unwrap().unwrap();
    assert_eq!(r.status, 408);
    assert!(r.closes());
    slow.expect_closed();
    // Nothing at all: closed without a word.
    idle.expect_closed();
    let elapsed = start.elapsed();
    assert!(elapsed >= deadline, "closed early, after {elapsed:?}");
    assert!(elapsed < IO_TIMEOUT / 2, "closed late, after {elapsed:?}");

    // A kept-alive connection gets a new deadline after each response.
    let mut c = server.client();
    c.send(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().unwrap().status, 200);
    let idle_since = Instant::now();
    c.expect_closed();
    assert!(idle_since.elapsed() >= deadline - Duration::from_millis(50));
    server.scrape();
    assert_eq!(server.renders.load(Ordering::Relaxed), 1);
}

#[test]
fn a_client_that_never_reads_blocks_nobody_and_is_dropped() {
    let write_deadline = Duration::from_secs(1);
    let server = Server::start(Limits {
        write_deadline,
        ..test_limits()
    });
    // 200 pipelined scrapes, 40 MB of responses: far more than the socket
    // buffers hold, so the server's writes to this client stall.
    let mut stalled = server.client();
    stalled.send(&b"GET /metrics HTTP/1.1\r\n\r\n".repeat(PIPELINED));
    // Wait until the server has rendered for it, and so is writing to it.
    let start = Instant::now();
    while server.renders.load(Ordering::Relaxed) == 0 {
        assert!(start.elapsed() < IO_TIMEOUT);
        thread::sleep(Duration::from_millis(1));
    }
    let stuck_renders = server.renders.load(Ordering::Relaxed);
    assert!(stuck_renders < PIPELINED);

    // Others are served meanwhile, well before the stalled one is dropped.
    for _ in 0..3 {
        server.scrape();
    }
    assert!(start.elapsed() < write_deadline);

    // Past the write deadline the stalled client finally reads: whatever was
    // buffered, then the end (a reset, as it left requests unread), not all
    // of the responses.
    thread::sleep(
        (start + write_deadline + Duration::from_millis(100))
            .saturating_duration_since(Instant::now()),
    );
    let mut received = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match stalled.stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("stalled client: {e} after {:?}", start.elapsed()),
        }
    }
    assert!(received < PIPELINED * body(Format::Prometheus).len());
    assert!(start.elapsed() >= write_deadline);
    server.assert_alive();
    server.scrape();
}

#[test]
fn at_the_cap_the_oldest_waiting_connection_is_evicted() {
    let server = Server::start(Limits {
        max_connections: 2,
        ..test_limits()
    });
    let mut oldest = server.client();
    // Make sure it is accepted before the next one.
    oldest.send(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(oldest.response(false).unwrap().unwrap().status, 200);
    let mut second = server.client();
    second.send(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(second.response(false).unwrap().unwrap().status, 200);
    // Both now idle, waiting for their next request; a third comes in.
    server.scrape();
    oldest.expect_closed();
    second.send(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(second.response(false).unwrap().unwrap().status, 200);
}

#[test]
fn at_the_cap_with_every_connection_busy_newcomers_get_503() {
    let server = Server::start(Limits {
        max_connections: 2,
        write_deadline: Duration::from_secs(10),
        // Every request renders, so `renders` tells when each is answered.
        min_render_interval: Duration::ZERO,
        ..test_limits()
    });
    let stalled = server.stalled_clients(2);
    for _ in 0..3 {
        let mut c = server.client();
        c.send(b"GET /metrics HTTP/1.1\r\n\r\n");
        let r = c.response(false).unwrap().unwrap();
        assert_eq!(r.status, 503);
        assert!(r.closes());
        assert_eq!(r.header("retry-after"), Some("1"));
        c.expect_closed();
    }
    // Once the stalled clients go away, scrapes are served again.
    drop(stalled);
    let start = Instant::now();
    loop {
        let mut c = server.client();
        c.send(b"GET /metrics HTTP/1.1\r\n\r\n");
        let r = c.response(false).unwrap().unwrap();
        if r.status == 200 {
            assert_eq!(r.body, body(Format::Prometheus));
            break;
        }
        assert!(start.elapsed() < IO_TIMEOUT, "still refused");
        thread::sleep(Duration::from_millis(5));
    }
}

/// One address is served at most `max_connections_per_peer` connections: a
/// newcomer from it takes the place of its own connection that has waited
/// longest for a request, and is refused when all of them are busy, while
/// another address is still served.
#[test]
fn past_the_per_peer_cap_newcomers_get_503_and_other_peers_are_served() {
    let server = Server::start(Limits {
        max_connections: 4,
        max_connections_per_peer: 2,
        write_deadline: Duration::from_secs(10),
        // Every request renders, so `renders` tells when each is answered.
        min_render_interval: Duration::ZERO,
        ..test_limits()
    });
    let other = Ipv4Addr::new(127, 0, 0, 2);
    // Two idle connections from 127.0.0.2; a third takes the older's place.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect_from(other, server.addr);
        c.send(b"GET /healthz HTTP/1.1\r\n\r\n");
        assert_eq!(c.response(false).unwrap().unwrap().status, 200);
        idle.push(c);
    }
    let mut third = Client::connect_from(other, server.addr);
    third.send(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(third.response(false).unwrap().unwrap().status, 200);
    idle[0].expect_closed();
    idle[1].send(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(idle[1].response(false).unwrap().unwrap().status, 200);
    drop((idle, third));

    // Two busy connections from 127.0.0.1 (stalled on their responses).
    let stalled = server.stalled_clients(2);
    let mut c = server.client();
    c.send(b"GET /healthz HTTP/1.1\r\n\r\n");
    let r = c.response(false).unwrap().unwrap();
    assert_eq!(r.status, 503);
    assert!(r.closes());
    assert_eq!(r.header("retry-after"), Some("1"));
    c.expect_closed();
    // Another address is served, on a slot 127.0.0.1 could not take.
    let mut c = Client::connect_from(other, server.addr);
    c.send(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().unwrap().status, 200);
    // Once the stalled ones are gone, 127.0.0.1 is served again.
    drop(stalled);
    let start = Instant::now();
    loop {
        let mut c = server.client();
        c.send(b"GET /healthz HTTP/1.1\r\n\r\n");
        if c.response(false).unwrap().unwrap().status == 200 {
            break;
        }
        assert!(start.elapsed() < IO_TIMEOUT, "still refused");
        thread::sleep(Duration::from_millis(5));
    }
}

/// What one attacking connection saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Status(u16),
    Closed,
}

/// The kinds of attacking connection, by index.
fn attack_request(i: usize) -> &'static [u8] {
    match i % 5 {
        0 => b"",                                        // idle
        1 => b"GET /metrics HTTP/1.1\r\nHost: slow\r\n", // never finished
        2 => b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        3 => b"GET /healthz HTTP/1.0\r\n\r\n",
        _ => b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // TLS to an HTTP port
    }
}

/// Reads what attacking connection `i` gets, checking that it is a whole and
/// right answer followed by a close, or a close.
fn attack_outcome(i: usize, c: &mut Client) -> Seen {
    let kind = i % 5;
    match c.response(false) {
        Ok(None) => Seen::Closed,
        Ok(Some(r)) => {
            assert!(r.closes(), "{r:?}");
            c.expect_closed();
            match (kind, r.status) {
                (2, 200) => assert_eq!(r.body, body(Format::Prometheus)),
                (3, 200) => assert_eq!(r.body, b"ok\n"),
                (1, 408) | (4, 400) | (_, 503) => {}
                _ => panic!("connection {i}: {r:?}"),
            }
            Seen::Status(r.status)
        }
        Err(e) => panic!("connection {i}: {e}"),
    }
}

#[test]
fn three_hundred_parallel_connections() {
    const THREADS: usize = 3;
    const PER_THREAD: usize = 100;
    /// Connections one attacker opens before it checks they were accepted;
    /// all attackers' waves together stay under the backlog of 128.
    const WAVE: usize = 40;
    let server = Server::start(Limits {
        head_deadline: Duration::from_secs(1),
        write_deadline: Duration::from_secs(5),
        // All connections come from 127.0.0.1; this test is about the cap
        // on all of them.
        max_connections_per_peer: 64,
        ..test_limits()
    });
    let addr = server.addr;
    // Each attacker opens its connections and sends their requests, all
    // before reading anything, so all 300 are open at once.
    let opened = Arc::new(Barrier::new(THREADS + 1));
    let done = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<JoinHandle<Vec<(usize, Seen)>>> = (0..THREADS)
        .map(|t| {
            let opened = Arc::clone(&opened);
            let done = Arc::clone(&done);
            thread::spawn(move || {
                // In waves: the listen backlog is 128 (mio's, as std's), and
                // connections beyond what the kernel queues are delayed by SYN
                // retransmission (a second or more), which is the kernel's
                // doing, not the endpoint's. Accepts are in order, so when a
                // probe opened after a wave is answered (or closed), the whole
                // wave has been accepted.
                let ids: Vec<usize> = (0..PER_THREAD).map(|j| j * THREADS + t).collect();
                let mut conns = Vec::new();
                for wave in ids.chunks(WAVE) {
                    for &i in wave {
                        let mut c = Client::connect(addr);
                        c.send(attack_request(i));
                        conns.push((i, c));
                    }
                    let mut probe = Client::connect(addr);
                    probe.send(b"GET /healthz HTTP/1.0\r\n\r\n");
                    // An evicted probe (closed before its request was read)
                    // was accepted all the same.
                    if let Some(r) = probe.response(false).unwrap() {
                        assert!(r.status == 200 || r.status == 503, "{r:?}");
                    }
                }
                opened.wait();
                conns
                    .iter_mut()
                    .map(|(i, c)| {
                        let seen = attack_outcome(*i, c);
                        done.fetch_add(1, Ordering::Relaxed);
                        (*i % 5, seen)
                    })
                    .collect()
            })
        })
        .collect();
    opened.wait();

    // A normal scrape during the attack: idle and half-sent connections are
    // held open until the head deadline, a second from now.
    server.scrape();
    let finished = done.load(Ordering::Relaxed);
    assert!(finished < THREADS * PER_THREAD, "attack already over");
    server.assert_alive();

    let mut tally = std::collections::BTreeMap::new();
    for attacker in attackers {
        for (kind, seen) in attacker.join().unwrap() {
            *tally.entry((kind, seen)).or_insert(0usize) += 1;
        }
    }
    eprintln!("outcomes by (kind, seen): {tally:?}");
    let served = |kind, status| {
        tally
            .get(&(kind, Seen::Status(status)))
            .copied()
            .unwrap_or(0)
    };
    assert!(served(2, 200) > 0 && served(3, 200) > 0, "{tally:?}");

    // And after it.
    server.assert_alive();
    server.scrape();
}

#[test]
fn stop_makes_run_return_at_once() {
    let mut server = Server::start(test_limits());
    // Open connections in every state do not hold it up.
    let _idle = server.client();
    let mut half = server.client();
    half.send(b"GET /metrics HTTP/1.1\r\n");
    let mut stalled = server.client();
    stalled.send(&b"GET /metrics HTTP/1.1\r\n\r\n".repeat(PIPELINED));
    server.scrape();
    let took = server.stop();
    assert!(took < Duration::from_secs(1), "run took {took:?} to return");

    // Stopped before it runs: returns at once too.
    let (endpoint, stop) = Endpoint::bind("127.0.0.1:0".parse().unwrap(), test_limits()).unwrap();
    stop.stop();
    endpoint.run(&mut |_, _| {}, &|| true, &|| true).unwrap();
}

/// The handle may be gone before `run` reads the wake-up: the stop still
/// lands. (A waker owned only by the handles was closed with the last one,
/// and its unread event vanished from the poll: `run` never returned.)
#[test]
fn stop_lands_even_when_every_handle_is_dropped_at_once() {
    for _ in 0..50 {
        let (endpoint, stop) =
            Endpoint::bind("127.0.0.1:0".parse().unwrap(), test_limits()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let result = endpoint.run(&mut |_, _| {}, &|| true, &|| true);
            let _ = tx.send(());
            result
        });
        // Let run reach its poll, then stop from another thread and drop
        // the handle straight away.
        std::thread::sleep(Duration::from_millis(2));
        std::thread::spawn(move || {
            stop.stop();
            drop(stop);
        })
        .join()
        .unwrap();
        rx.recv_timeout(Duration::from_secs(2))
            .expect("run did not return after stop");
        server.join().unwrap().unwrap();
    }
}
