//! The same DESTROY delivered twice counts once. A listener that asked for
//! reliable delivery (`NETLINK_BROADCAST_ERROR`, as conntrackd's
//! `NetlinkEventsReliable`) and never reads sits in the node's namespace
//! next to the exporter: the kernel keeps the flows it could not tell on
//! the dying list and delivers their DESTROY again, to every listener. Each
//! flow must still be counted once, as the nft counter counts it, and the
//! copies in `duplicate_destroys_total`. Needs root.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::exporter::{get, start, value};
use common::netns::{kernel_tests_possible, VirtualNode};
use common::traffic::{nft_counter, start_backend, udp_client, wait_ready, UDP_BACKEND};

const RULESET: &str = r#"
table inet ctm_test {
    counter udp_flows {}
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 udp dport 81 counter name udp_flows dnat ip to 10.200.2.2:5353
    }
    # Scrapes over loopback must not create flows of their own.
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// A DESTROY listener that asks for reliable delivery, with the smallest
/// receive buffer, and never reads.
const STUCK_RELIABLE_LISTENER: &str = r#"
import socket, threading
NETLINK_NETFILTER, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NETLINK_BROADCAST_ERROR = 12, 270, 1, 4
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
s.bind((0, 0))
s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, 3)  # NFNLGRP_CONNTRACK_DESTROY
s.setsockopt(SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1)
print("ready", flush=True)
threading.Event().wait()
"#;

const PORT: u16 = 9100;
const FLOWS: usize = 200;

#[test]
fn a_destroy_delivered_again_is_counted_once() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    vn.short_timeouts();
    vn.nft(RULESET);
    let backend = vn.backend.clone();
    start_backend(&mut vn, &backend, UDP_BACKEND);
    let node = vn.node.clone();
    wait_ready(vn.spawn(
        &node,
        &["python3", "-c", STUCK_RELIABLE_LISTENER],
        Stdio::piped(),
        Stdio::inherit(),
    ));
    let _stdout = start(&mut vn, PORT, &[]);

    let client = vn.client.clone();
    let script = udp_client(FLOWS, "10.96.1.1", 81, 30000);
    let out = vn.exec(&client, &["python3", "-c", &script]);
    assert!(out.contains("done"), "{out}");
    let flows = nft_counter(&vn, "inet ctm_test", "udp_flows");
    assert_eq!(flows, FLOWS as f64);

    // The flows end now (a flush, rather than their 1 s timeout: when the
    // kernel's garbage collector reaps expired entries depends on what
    // other namespaces hold, up to a minute); the copies keep coming while
    // the listener is stuck. Wait until every flow is counted and copies
    // came.
    vn.end_flows();
    let duration = "conntrack_monitoring_service_duration_seconds_count{node=\"n1\"}";
    let duplicates = "conntrack_monitoring_duplicate_destroys_total{node=\"n1\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let (_, text) = get(&vn, PORT, "/metrics", None);
        if value(&text, duration) >= flows && value(&text, duplicates) > 0.0 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "counted {} of {flows} flows, {} duplicates",
            value(&text, duration),
            value(&text, duplicates)
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // More copies come; the counts stay.
    std::thread::sleep(Duration::from_secs(2));
    let (_, later) = get(&vn, PORT, "/metrics", None);
    let destroys = "conntrack_monitoring_events_total{node=\"n1\",type=\"destroy\"}";
    for text in [&text, &later] {
        assert_eq!(value(text, duration), flows, "each flow once");
        assert_eq!(
            value(
                text,
                "conntrack_monitoring_service_bytes_count{direction=\"to-svc\",node=\"n1\"}"
            ),
            flows
        );
        assert_eq!(
            value(
                text,
                "conntrack_monitoring_errors_total{node=\"n1\",type=\"events order\"}"
            ),
            0.0
        );
        // Every DESTROY received was a flow or a copy.
        assert_eq!(value(text, destroys), flows + value(text, duplicates));
    }
    println!(
        "{FLOWS} flows: {} DESTROY events received, {} of them copies, dropped",
        value(&later, destroys),
        value(&later, duplicates)
    );
}
