//! The endpoint over TLS in process (`Endpoint::bind_with` and a web
//! configuration with a test certificate): a 5 MB body to a client that reads
//! slowly arrives whole, byte for byte (the TLS writes stop at a full socket
//! and go on at the next writable edge; the close waits for the last record);
//! pipelined requests on one TLS connection each get their answer; a client
//! that stops mid-handshake is dropped at the head deadline. Loopback only.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use conntrack_metrics::expo::http::{Endpoint, Format, Limits, StopHandle};
use conntrack_metrics::expo::web_config::WebConfig;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};

/// The body of every `/metrics` response: 5 MB of numbered lines.
fn big_body() -> Vec<u8> {
    let mut text = String::new();
    let mut i = 0u64;
    while text.len() < 5_000_000 {
        text.push_str(&format!("test_line{{i=\"{i}\"}} {}\n", i * 31 % 1009));
        i += 1;
    }
    text.into_bytes()
}

struct Server {
    addr: SocketAddr,
    stop: StopHandle,
    thread: Option<JoinHandle<io::Result<()>>>,
    client: Arc<rustls::ClientConfig>,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(tag: &str, limits: Limits) -> Server {
    let dir = std::env::temp_dir().join(format!("ctm-https-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    let path = dir.join("web.yml");
    std::fs::write(
        &path,
        "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n",
    )
    .unwrap();
    let web = WebConfig::load(&path).unwrap();
    let (endpoint, stop) =
        Endpoint::bind_with("127.0.0.1:0".parse().unwrap(), limits, Some((path, web))).unwrap();
    let addr = endpoint.local_addr();
    let body = big_body();
    let thread = thread::spawn(move || {
        let mut render = |_: Format, out: &mut Vec<u8>| out.extend_from_slice(&body);
        endpoint.run(&mut render, &|| true, &|| true)
    });
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Server {
        addr,
        stop,
        thread: Some(thread),
        client: Arc::new(client),
        dir,
    }
}

/// A TLS connection to the server, blocking, with timeouts.
fn connect(server: &Server) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::clone(&server.client), name).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Reads one response (head and `Content-Length` body), `chunk` bytes at
/// a time with `pause` between reads; `pending` holds bytes read past it.
fn read_response(
    tls: &mut impl Read,
    pending: &mut Vec<u8>,
    chunk: usize,
    pause: Duration,
) -> (String, Vec<u8>) {
    let mut buf = vec![0u8; chunk];
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tls.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before a head: {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(pending[..head_end].to_vec()).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    pending.drain(..head_end);
    while pending.len() < len {
        thread::sleep(pause);
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {} of {len} body bytes", pending.len());
        pending.extend_from_slice(&buf[..n]);
    }
    let body: Vec<u8> = pending.drain(..len).collect();
    (head, body)
}

#[test]
fn a_large_body_reaches_a_slow_reader_whole_and_then_the_close() {
    let server = start("big", Limits::default());
    let want = big_body();
    let mut tls = connect(&server);
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut pending = Vec::new();
    // 16 KB and a millisecond at a time: the server's socket fills again
    // and again, and every TLS record must still go out in order.
    let (head, body) = read_response(&mut tls, &mut pending, 16 * 1024, Duration::from_millis(1));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body.len(), want.len());
    assert!(body == want, "the body differs");
    // Then the server's close_notify: a clean end, not a reset.
    let mut rest = Vec::new();
    let end = tls.read_to_end(&mut rest);
    assert!(end.is_ok() && rest.is_empty(), "{end:?} {rest:?}");
}

#[test]
fn pipelined_requests_on_one_tls_connection_each_get_their_answer() {
    let server = start("pipe", Limits::default());
    let want = big_body();
    let mut tls = connect(&server);
    let mut requests = Vec::new();
    for path in [
        "/metrics", "/healthz", "/metrics", "/nope", "/metrics", "/readyz",
    ] {
        requests.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    tls.write_all(&requests).unwrap();
    let mut pending = Vec::new();
    for (status, body) in [
        ("200", Some(&want)),
        ("200", None),
        ("200", Some(&want)),
        ("404", None),
        ("200", Some(&want)),
        ("200", None),
    ] {
        let (head, got) = read_response(&mut tls, &mut pending, 64 * 1024, Duration::ZERO);
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        if let Some(want) = body {
            assert!(got == *want, "a body differs");
        }
    }
}

#[test]
fn a_client_that_stops_mid_handshake_is_dropped_at_the_head_deadline() {
    let limits = Limits {
        head_deadline: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = start("stall", limits);
    let mut sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The first bytes of a ClientHello record, and no more.
    sock.write_all(&[0x16, 0x03, 0x01, 0x00, 0x80]).unwrap();
    let sent = Instant::now();
    let mut buf = [0u8; 64];
    let n = sock.read(&mut buf).unwrap_or(0);
    let took = sent.elapsed();
    assert_eq!(n, 0, "got {:?}", &buf[..n]);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
}
