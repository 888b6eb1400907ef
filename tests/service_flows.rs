//! End to end against the real kernel: Service flows through a virtual
//! node's nftables DNAT are measured exactly once each; other flows are not;
//! a burst of 100,000 DESTROY events is read without loss with the default buffer,
//! and with a tiny buffer the losses are counted while the exporter keeps
//! serving. Needs root, `ab` (apache2-utils); see `tests/run.sh`.

mod common;

use std::time::Duration;

use common::exporter::{get, promtool_check, scrape_until, start, value};
use common::netns::{kernel_tests_possible, VirtualNode};
use common::traffic::{
    self, start_backend, udp_client, udp_client_from, HTTP_BACKEND, UDP_BACKEND,
};

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
    let mut vn = VirtualNode::new();
    vn.short_timeouts();
    vn.nft(RULESET);
    let (b1, b2) = (vn.backend.clone(), vn.backend2.clone());
    start_backend(&mut vn, &b1, HTTP_BACKEND);
    start_backend(&mut vn, &b2, UDP_BACKEND);
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
