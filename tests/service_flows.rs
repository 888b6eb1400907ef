//! End to end against the real kernel: Service flows through a virtual
//! node's nftables DNAT are measured exactly once each; other flows are not;
//! a burst of 100,000 DESTROY events is read without loss with the default buffer,
//! and with a tiny buffer the losses are counted while the exporter keeps
//! serving. Needs root, `ab` (apache2-utils); see `tests/run.sh`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::exporter::{get, promtool_check, start, value};
use common::netns::{kernel_tests_possible, VirtualNode};

const RULESET: &str = r#"
table inet ctm_test {
    counter tcp_flows {}
    counter udp_flows {}
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 tcp dport 80 counter name tcp_flows dnat ip to 10.200.2.2:8080
        ip daddr 10.96.1.1 udp dport 81 counter name udp_flows dnat ip to 10.200.3.2:5353
        ip daddr 10.96.0.10 udp dport 53 dnat ip to 10.200.3.2:5353
    }
    # Scrapes over loopback must not create flows of their own.
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// An HTTP/1.0 server (ab opens one connection per request).
const HTTP_BACKEND: &str = r#"
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

const UDP_BACKEND: &str = r#"
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
/// repeat, and a repeated tuple would be the same flow), `window`
/// outstanding at a time.
fn udp_client(n: usize, host: &str, port: u16, first_port: u16) -> String {
    udp_client_from(&["0.0.0.0"], n, host, port, first_port)
}

/// [`udp_client`] with source addresses taken in turn from `sources`, so
/// more flows than one address has ports.
fn udp_client_from(sources: &[&str], n: usize, host: &str, port: u16, first_port: u16) -> String {
    let sources = sources
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"
import socket, selectors
n, host, port, first, window = {n}, "{host}", {port}, {first_port}, 200
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

fn wait_ready(child: &mut std::process::Child) {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
}

/// Packets counted by an nft named counter in the node: the flows that
/// passed that DNAT rule (a nat chain sees only a flow's first packet).
fn nft_counter(vn: &VirtualNode, name: &str) -> f64 {
    let out = vn.exec(
        &vn.node,
        &["nft", "list", "counter", "inet", "ctm_test", name],
    );
    let packets = out
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .unwrap_or_else(|| panic!("no packets in {out}"));
    packets.parse().unwrap()
}

/// Scrapes until `series` reaches `want` (events arrive a little after the
/// traffic), returning the last scrape.
fn scrape_until(vn: &VirtualNode, port: u16, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = get(vn, port, "/metrics", None);
        let v = value(&text, series);
        if v >= want || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const P: &str = "conntrack_monitoring_";

#[test]
fn every_service_flow_is_measured_exactly_once_and_other_flows_not_at_all() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    vn.short_timeouts();
    vn.nft(RULESET);
    let (b1, b2) = (vn.backend.clone(), vn.backend2.clone());
    wait_ready(vn.spawn(
        &b1,
        &["python3", "-c", HTTP_BACKEND],
        Stdio::piped(),
        Stdio::inherit(),
    ));
    wait_ready(vn.spawn(
        &b2,
        &["python3", "-c", UDP_BACKEND],
        Stdio::piped(),
        Stdio::inherit(),
    ));
    const PORT: u16 = 9100;
    let _out = start(&mut vn, PORT, &["--exclude-subnet", "10.96.0.0/24"]);

    let client = vn.client.clone();
    // ab reports its own count; the DNAT rule's counter is the truth.
    vn.exec(
        &client,
        &[
            "ab",
            "-q",
            "-n",
            "5000",
            "-c",
            "100",
            "http://10.96.1.1:80/",
        ],
    );
    assert_eq!(
        vn.exec(
            &client,
            &["python3", "-c", &udp_client(300, "10.96.1.1", 81, 10_000)]
        )
        .trim(),
        "done"
    );
    // Not Service flows: an excluded ClusterIP, and a backend reached directly.
    assert_eq!(
        vn.exec(
            &client,
            &["python3", "-c", &udp_client(50, "10.96.0.10", 53, 11_000)]
        )
        .trim(),
        "done"
    );
    assert_eq!(
        vn.exec(
            &client,
            &["python3", "-c", &udp_client(50, "10.200.3.2", 5353, 12_000)]
        )
        .trim(),
        "done"
    );
    // TIME_WAIT is 1 s here; then a flush ends whatever is left at once.
    std::thread::sleep(Duration::from_millis(1500));
    vn.exec(&vn.node, &["conntrack", "-F"]);

    let tcp = nft_counter(&vn, "tcp_flows");
    let udp = nft_counter(&vn, "udp_flows");
    assert!(tcp >= 5000.0, "{tcp} TCP flows");
    assert_eq!(udp, 300.0);
    let n = |s: &str| format!("{P}{s}{{node=\"n1\"}}");
    let d = |s: &str, dir: &str| format!("{P}{s}{{direction=\"{dir}\",node=\"n1\"}}");
    let text = scrape_until(&vn, PORT, &n("service_duration_seconds_count"), tcp + udp);

    assert_eq!(
        value(&text, &n("service_duration_seconds_count")),
        tcp + udp
    );
    assert_eq!(
        value(&text, &n("service_seen_reply_latency_seconds_count")),
        tcp + udp
    );
    assert_eq!(
        value(&text, &n("service_TCP_FIN_latency_seconds_count")),
        tcp
    );
    for dir in ["to-svc", "from-svc"] {
        assert_eq!(
            value(&text, &d("service_bytes_count", dir)),
            tcp + udp,
            "{dir}"
        );
        assert_eq!(
            value(&text, &d("service_packets_count", dir)),
            tcp + udp,
            "{dir}"
        );
        assert_eq!(
            value(
                &text,
                &d("service_TCP_FIN_throughput_bytes_per_second_count", dir)
            ),
            tcp,
            "{dir}"
        );
    }
    for (ty, want) in [
        ("events order", 0.0),
        ("malformed message", 0.0),
        ("truncated datagram", 0.0),
    ] {
        assert_eq!(
            value(
                &text,
                &format!("{P}errors_total{{node=\"n1\",type=\"{ty}\"}}")
            ),
            want,
            "{ty}"
        );
    }
    assert_eq!(value(&text, &n("netlink_overruns_total")), 0.0);
    assert_eq!(value(&text, &n("flows_evicted_total")), 0.0);
    assert_eq!(
        value(&text, &n("flow_table_flows")),
        0.0,
        "every flow ended"
    );
    // Seen-reply latencies on one machine are well under a second.
    let fast = value(
        &text,
        &format!("{P}service_seen_reply_latency_seconds_bucket{{node=\"n1\",le=\"1\"}}"),
    );
    assert_eq!(fast, tcp + udp);
    promtool_check(&text);
}

/// The default buffer is sized for a garbage-collector burst of 100,000
/// DESTROY events (about 1,280 bytes of buffer each, 128 MiB granted).
#[test]
fn a_destroy_burst_is_read_without_loss_and_a_tiny_buffer_counts_its_losses() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    vn.nft(RULESET);
    let b2 = vn.backend2.clone();
    wait_ready(vn.spawn(
        &b2,
        &["python3", "-c", UDP_BACKEND],
        Stdio::piped(),
        Stdio::inherit(),
    ));
    // Two exporters side by side: defaults, and a 4 KiB buffer (8 KiB granted).
    let _a = start(&mut vn, 9100, &[]);
    let _b = start(&mut vn, 9101, &["--rcvbuf-bytes", "4096"]);

    const FLOWS: usize = 100_000;
    let client = vn.client.clone();
    // Two client addresses: 50,000 source ports each.
    vn.exec(
        &client,
        &["ip", "addr", "add", "10.200.1.3/24", "dev", "eth0"],
    );
    let script = udp_client_from(
        &["10.200.1.2", "10.200.1.3"],
        FLOWS,
        "10.96.1.1",
        81,
        10_000,
    );
    assert_eq!(vn.exec(&client, &["python3", "-c", &script]).trim(), "done");
    let flows = nft_counter(&vn, "udp_flows");
    assert_eq!(flows, FLOWS as f64);
    // Every flow ends in the same instant: 100,000 DESTROY events at once.
    vn.exec(&vn.node, &["conntrack", "-F"]);

    let n = |s: &str| format!("{P}{s}{{node=\"n1\"}}");
    let destroys = format!("{P}events_total{{node=\"n1\",type=\"destroy\"}}");
    let text = scrape_until(&vn, 9100, &destroys, flows);
    assert_eq!(value(&text, &destroys), flows);
    assert_eq!(value(&text, &n("netlink_overruns_total")), 0.0);
    assert_eq!(value(&text, &n("service_duration_seconds_count")), flows);
    assert_eq!(
        value(&text, &n("service_seen_reply_latency_seconds_count")),
        flows
    );

    // The tiny buffer lost events, counted them, and still serves.
    let (head, small) = get(&vn, 9101, "/metrics", None);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(value(&small, &n("netlink_overruns_total")) > 0.0);
    assert!(value(&small, &destroys) < flows);
    let (head, _) = get(&vn, 9101, "/healthz", None);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = get(&vn, 9101, "/readyz", None);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    promtool_check(&small);
}
