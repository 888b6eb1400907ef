//! End to end against the real kernel: Service flows through a virtual
//! node's nftables DNAT are measured exactly once each; other flows are not;
//! a burst of 100,000 DESTROY events is read without loss with the default buffer,
//! and with a tiny buffer the losses are counted while the exporter keeps
//! serving, and the flows it still measures have their true latencies. Needs
//! root, `ab` (apache2-utils); see `tests/run.sh`.

mod common;

use std::time::Duration;

use common::exporter::{
    get, promtool_check, scrape_until, start, start_with_env, start_with_pid, value,
};
use common::netns::{kernel_tests_possible, VirtualNode};
use common::traffic::{self, start_backend, udp_client, udp_client_from, UDP_BACKEND};

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

/// Packets counted by a named counter of the test table in the node.
fn nft_counter(vn: &VirtualNode, name: &str) -> f64 {
    traffic::nft_counter(vn, "inet ctm_test", name)
}

const P: &str = "conntrack_monitoring_";

#[test]
fn every_service_flow_is_measured_exactly_once_and_other_flows_not_at_all() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = traffic::service_node(RULESET);
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
    vn.end_flows();

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
        value(
            &text,
            &format!("{P}flow_table_flows{{node=\"n1\",reader=\"0\"}}")
        ),
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
    start_backend(&mut vn, &b2, UDP_BACKEND);
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

/// A backend that answers each connection 400 ms after its request, then
/// closes: a flow's first reply (the SYN-ACK) comes within a millisecond of
/// its start, its first closing state only after 400 ms.
const SLOW_HTTP_BACKEND: &str = r#"
import socket, threading, time
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8080)); t.listen(1024)
def serve(c):
    c.recv(2048); time.sleep(0.4); c.sendall(b"HTTP/1.0 200 OK\r\n\r\nslow"); c.close()
print("ready", flush=True)
while True:
    c, _ = t.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// `threads * per` connections to the ClusterIP, `threads` at a time.
fn slow_client(threads: usize, per: usize) -> String {
    format!(
        r#"
import socket, threading
def worker():
    for _ in range({per}):
        s = socket.create_connection(("10.96.1.1", 80))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while s.recv(2048):
            pass
        s.close()
ts = [threading.Thread(target=worker) for _ in range({threads})]
for t in ts: t.start()
for t in ts: t.join()
print("done")
"#
    )
}

/// A virtual node whose first backend answers at once and closes 400 ms
/// later (SLOW_HTTP_BACKEND).
fn slow_http_node() -> VirtualNode {
    let mut vn = VirtualNode::new();
    vn.short_timeouts();
    vn.nft(RULESET);
    let b1 = vn.backend.clone();
    start_backend(&mut vn, &b1, SLOW_HTTP_BACKEND);
    vn
}

/// Events of open flows are lost while an exporter is stopped (SIGSTOP) with
/// a small receive buffer. Of those flows, none may be measured: a flow whose
/// first reply was lost would otherwise take a later UPDATE (its closing, 400
/// ms later) for it. Flows that start after the loss are measured, with their
/// true latencies.
#[test]
fn lost_events_never_give_a_flow_a_latency_from_a_later_event() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = slow_http_node();
    // The reference (defaults), and one with a 256 KiB buffer (512 KiB
    // granted: a few hundred events) that reads as soon as it can.
    let _a = start(&mut vn, 9100, &[]);
    let (lossy_pid, _b) = start_with_pid(
        &mut vn,
        9101,
        &["--rcvbuf-bytes", "262144", "--drain-delay-us", "0"],
    );
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &lossy_pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let client = vn.client.clone();
    // 600 flows while the lossy exporter is stopped: its buffer overflows.
    signal("-STOP");
    let first = vn.exec(&client, &["python3", "-c", &slow_client(60, 10)]);
    signal("-CONT");
    assert_eq!(first.trim(), "done");
    std::thread::sleep(Duration::from_secs(1));
    // 100 more, started after the loss was reported.
    let second = vn.exec(&client, &["python3", "-c", &slow_client(20, 5)]);
    assert_eq!(second.trim(), "done");
    let flows = nft_counter(&vn, "tcp_flows");
    assert_eq!(flows, 700.0);
    // Closed flows wait in TIME_WAIT (1 s here) for the garbage collector,
    // which may take long on an idle table: remove them all at once.
    vn.end_flows();

    let n = |s: &str| format!("{P}{s}{{node=\"n1\"}}");
    let bucket = |s: &str, le: &str| format!("{P}{s}_bucket{{node=\"n1\",le=\"{le}\"}}");
    let seen = "service_seen_reply_latency_seconds";
    let fin = "service_TCP_FIN_latency_seconds";
    let reference = scrape_until(&vn, 9100, &n("service_duration_seconds_count"), flows);
    assert_eq!(value(&reference, &n("netlink_overruns_total")), 0.0);
    assert_eq!(value(&reference, &n(&format!("{seen}_count"))), flows);
    assert_eq!(value(&reference, &bucket(seen, "0.2")), flows);
    assert_eq!(value(&reference, &n(&format!("{fin}_count"))), flows);
    assert_eq!(value(&reference, &bucket(fin, "0.3")), 0.0);

    let destroys = format!("{P}events_total{{node=\"n1\",type=\"destroy\"}}");
    // The reference has every DESTROY; the lossy one had the same time, and
    // may have lost a few in the flush's burst.
    std::thread::sleep(Duration::from_secs(1));
    let (_, lossy) = get(&vn, 9101, "/metrics", None);
    let overruns = value(&lossy, &n("netlink_overruns_total"));
    let measured = value(&lossy, &n(&format!("{seen}_count")));
    let fins = value(&lossy, &n(&format!("{fin}_count")));
    eprintln!(
        "lossy exporter: {overruns} overruns, {} DESTROYs, {measured} seen-reply and {fins} FIN \
         latencies of {flows} flows",
        value(&lossy, &destroys)
    );
    assert!(overruns > 0.0, "the stopped exporter's buffer overran");
    // Only flows of the second run (100) can be measured, and some are.
    assert!(measured > 0.0 && measured <= 100.0, "{measured} measured");
    // Each with its true first reply: none at 200 ms or more.
    assert_eq!(value(&lossy, &bucket(seen, "0.2")), measured);
    assert_eq!(value(&lossy, &bucket(fin, "0.3")), 0.0);
    promtool_check(&lossy);
}

/// After an overrun the kernel keeps dropping events for the socket without
/// another report until its queue is empty. With a tiny receive buffer and
/// bursts of connections whose backend answers the handshake at once and
/// closes 400 ms later, overruns happen while flows start, and a flow whose
/// reply UPDATE was dropped unreported would take its closing for its first
/// reply. No seen-reply observation may come out near the close time. (The
/// window is short, and a later overrun's report also protects such a flow,
/// so this guards the rule; the tracker test
/// `events_dropped_unreported_after_an_overrun_are_not_taken_for_a_milestone`
/// replays the exact sequence.)
#[test]
fn events_dropped_unreported_while_congested_never_give_a_latency() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = slow_http_node();
    // 16 KiB asked, 32 KiB granted: a few dozen events.
    let _tiny = start(&mut vn, 9102, &["--rcvbuf-bytes", "16384"]);
    let client = vn.client.clone();
    for _ in 0..3 {
        let out = vn.exec(&client, &["python3", "-c", &slow_client(150, 2)]);
        assert_eq!(out.trim(), "done");
    }
    assert_eq!(nft_counter(&vn, "tcp_flows"), 900.0);
    vn.end_flows();
    std::thread::sleep(Duration::from_secs(1));

    let n = |s: &str| format!("{P}{s}{{node=\"n1\"}}");
    let bucket = |s: &str, le: &str| format!("{P}{s}_bucket{{node=\"n1\",le=\"{le}\"}}");
    let seen = "service_seen_reply_latency_seconds";
    let (_, text) = get(&vn, 9102, "/metrics", None);
    let overruns = value(&text, &n("netlink_overruns_total"));
    let measured = value(&text, &n(&format!("{seen}_count")));
    eprintln!(
        "tiny buffer: {overruns} overruns, {} DESTROYs, {measured} seen-reply latencies of 900 flows",
        value(&text, &format!("{P}events_total{{node=\"n1\",type=\"destroy\"}}"))
    );
    assert!(overruns > 0.0, "the tiny buffer overran");
    assert!(measured > 0.0, "flows between the overruns are measured");
    // The backend closes 400 ms after the handshake: a first reply at
    // 200 ms or more was taken from a later event.
    assert_eq!(value(&text, &bucket(seen, "0.2")), measured);
}

/// Kernels before 6.14 send no event stamps: the exporter then takes each
/// event's moment from its batch's receive time. A test build ignores the
/// stamps on request (`CONNTRACK_METRICS_IGNORE_EVENT_STAMPS=1`), so that
/// path runs end to end here too: every flow counted once, as the nft
/// counters count them, with latencies from receive times.
#[test]
fn without_event_stamps_receive_times_measure_every_flow() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = traffic::service_node(RULESET);
    const PORT: u16 = 9103;
    let env = ["CONNTRACK_METRICS_IGNORE_EVENT_STAMPS=1"];
    // --print-events shows each event as the tracker takes it.
    let started = start_with_env(&mut vn, PORT, &env, &["--print-events"]);
    let (stdout, lines) = (started.stdout, started.startup);
    assert!(
        lines.iter().any(|l| l.contains("event stamps are ignored")),
        "{lines:?}"
    );
    let printed = std::thread::spawn(move || {
        let (mut events, mut stamped) = (0u64, 0u64);
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            events += 1;
            stamped += u64::from(line.contains("event_ns="));
        }
        (events, stamped)
    });
    let client = vn.client.clone();
    vn.exec(
        &client,
        &["ab", "-q", "-n", "1000", "-c", "50", "http://10.96.1.1:80/"],
    );
    let udp = vn.exec(
        &client,
        &["python3", "-c", &udp_client(200, "10.96.1.1", 81, 13_000)],
    );
    assert_eq!(udp.trim(), "done");
    vn.end_flows();

    let tcp = nft_counter(&vn, "tcp_flows");
    let udp = nft_counter(&vn, "udp_flows");
    assert!(tcp >= 1000.0 && udp == 200.0, "{tcp} TCP, {udp} UDP flows");
    let n = |s: &str| format!("{P}{s}{{node=\"n1\"}}");
    let bucket = |s: &str, le: &str| format!("{P}{s}_bucket{{node=\"n1\",le=\"{le}\"}}");
    let text = scrape_until(&vn, PORT, &n("service_duration_seconds_count"), tcp + udp);
    let seen = "service_seen_reply_latency_seconds";
    let fin = "service_TCP_FIN_latency_seconds";
    assert_eq!(
        value(&text, &n("service_duration_seconds_count")),
        tcp + udp
    );
    assert_eq!(value(&text, &n(&format!("{seen}_count"))), tcp + udp);
    assert_eq!(value(&text, &n(&format!("{fin}_count"))), tcp);
    assert_eq!(value(&text, &n("netlink_overruns_total")), 0.0);
    // Receive times are later than the kernel's stamps, by the delivery
    // and the batch: still well under a second on this idle node.
    assert_eq!(value(&text, &bucket(seen, "1")), tcp + udp);
    assert_eq!(value(&text, &bucket(fin, "1")), tcp);
    drop(vn); // ends the exporter, and its stdout
    let (events, stamped) = printed.join().unwrap();
    assert!(events >= tcp as u64, "{events} events printed");
    assert_eq!(stamped, 0, "events still carried the kernel's stamp");
}
