//! Traffic for the end-to-end tests: backends, clients, and the nft
//! counters that tell how many flows passed.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use super::netns::VirtualNode;

/// A virtual node with short timeouts and `ruleset` (its Services' DNAT),
/// an HTTP server on the first backend (10.200.2.2:8080) and a UDP echo on
/// the second (10.200.3.2:5353).
pub fn service_node(ruleset: &str) -> VirtualNode {
    let mut vn = VirtualNode::new();
    vn.short_timeouts();
    vn.nft(ruleset);
    let (b1, b2) = (vn.backend.clone(), vn.backend2.clone());
    start_backend(&mut vn, &b1, HTTP_BACKEND);
    start_backend(&mut vn, &b2, UDP_BACKEND);
    vn
}

/// Starts the python3 `script` in `ns` and waits for its "ready" line.
pub fn start_backend(vn: &mut VirtualNode, ns: &str, script: &str) {
    wait_ready(vn.spawn(
        ns,
        &["python3", "-c", script],
        Stdio::piped(),
        Stdio::inherit(),
    ));
}

/// UDP echo on 5353 and an HTTP-like TCP server on 8080, both dual-stack;
/// prints "ready" once listening.
pub const DUAL_STACK_BACKEND: &str = r#"
import socket, threading
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", 5353))
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("::", 8080)); t.listen(64)
def udp():
    while True:
        data, peer = u.recvfrom(2048); u.sendto(data, peer)
def tcp():
    while True:
        c, _ = t.accept(); c.recv(2048); c.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello"); c.close()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// An HTTP/1.0 server (ab opens one connection per request).
pub const HTTP_BACKEND: &str = r#"
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the backend\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True; request_queue_size = 1024
s = S(("0.0.0.0", 8080), H)
print("ready", flush=True)
s.serve_forever()
"#;

pub const UDP_BACKEND: &str = r#"
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
u.bind(("0.0.0.0", 5353))
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(2048); u.sendto(data, peer)
"#;

/// `n` request/response UDP flows to `host:port`, each from its own source
/// port (`first_port`, `first_port + 1`, ...: the kernel's ephemeral ports
/// repeat, and a repeated tuple would be the same flow), 200 outstanding
/// at a time.
pub fn udp_client(n: usize, host: &str, port: u16, first_port: u16) -> String {
    udp_client_from(&["0.0.0.0"], n, host, port, first_port)
}

/// [`udp_client`] with at most `window` flows unanswered at a time (a
/// small receive buffer keeps up with their NEW and reply events).
pub fn udp_client_paced(n: usize, host: &str, port: u16, first_port: u16, window: usize) -> String {
    udp_client_script(&["0.0.0.0"], n, host, port, first_port, window)
}

/// [`udp_client`] with source addresses taken in turn from `sources`, so
/// more flows than one address has ports.
pub fn udp_client_from(
    sources: &[&str],
    n: usize,
    host: &str,
    port: u16,
    first_port: u16,
) -> String {
    udp_client_script(sources, n, host, port, first_port, 200)
}

fn udp_client_script(
    sources: &[&str],
    n: usize,
    host: &str,
    port: u16,
    first_port: u16,
    window: usize,
) -> String {
    let sources = sources
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"
import socket, selectors
n, host, port, first, window = {n}, "{host}", {port}, {first_port}, {window}
sources = [{sources}]
sel = selectors.DefaultSelector(); sent = done = 0
while done < n:
    while sent < n and sent - done < window:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
        s.bind((sources[sent % len(sources)], first + sent // len(sources)))
        s.sendto(b"q", (host, port)); sel.register(s, selectors.EVENT_READ); sent += 1
    events = sel.select(timeout=5)
    if not events: raise SystemExit("no reply: %d of %d" % (done, n))
    for key, _ in events:
        key.fileobj.recv(16); sel.unregister(key.fileobj); key.fileobj.close(); done += 1
print("done", flush=True)
"#
    )
}

pub fn wait_ready(child: &mut std::process::Child) {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
}

/// Packets counted by the nft named counter `name` of `table` ("inet
/// ctm_test") in the node: the flows that passed a DNAT rule (a nat chain
/// sees only a flow's first packet).
pub fn nft_counter(vn: &VirtualNode, table: &str, name: &str) -> f64 {
    let mut argv = vec!["nft", "list", "counter"];
    argv.extend(table.split_whitespace());
    argv.push(name);
    let out = vn.exec(&vn.node, &argv);
    let packets = out
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .unwrap_or_else(|| panic!("no packets in {out}"));
    packets.parse().unwrap()
}
