//! The census of the kernel's conntrack table (`--table-dump-seconds`),
//! against the real kernel in a virtual node. Needs root.
//!
//! - Flows whose DESTROY was lost (the exporter stopped with a small receive
//!   buffer while the kernel destroys hundreds of them) leave the flow
//!   table at the next dump, counted in `lost_destroys_total`; the flows
//!   the kernel still has stay, and are measured when they end.
//! - DNAT'd flows to destinations outside every `--svc-subnet` are counted
//!   in a gauge and named, once, in a hint; NodePort-style DNAT to the
//!   node's own address and Service flows are not.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::exporter::Started;
use common::exporter::{get, start_with_env, value};
use common::netns::{kernel_tests_possible, VirtualNode};
use common::traffic::{nft_counter, start_backend, udp_client_paced, UDP_BACKEND};

/// Scrapes until `ok` holds for the text, or panics after `limit` with
/// `what` and the last text's `series`.
fn scrape_until(
    vn: &VirtualNode,
    port: u16,
    limit: Duration,
    what: &str,
    series: &[&str],
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (_, text) = get(vn, port, "/metrics", None);
        if ok(&text) {
            return text;
        }
        if Instant::now() >= deadline {
            let values: Vec<String> = series
                .iter()
                .map(|s| format!("{s} = {}", value(&text, s)))
                .collect();
            panic!("{what}: {}", values.join(", "));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A virtual node whose UDP flows last 300 s (until the test deletes
/// them), with `ruleset`, a UDP echo backend, and the exporter on `port`
/// with `args`.
fn census_node(ruleset: &str, port: u16, args: &[&str]) -> (VirtualNode, Started) {
    census_node_after(ruleset, port, args, |_| {})
}

/// [`census_node`], with `before` run on the node before the exporter
/// starts.
fn census_node_after(
    ruleset: &str,
    port: u16,
    args: &[&str],
    before: impl FnOnce(&VirtualNode),
) -> (VirtualNode, Started) {
    let mut vn = VirtualNode::new();
    vn.keep_udp_flows();
    vn.nft(ruleset);
    let backend = vn.backend.clone();
    start_backend(&mut vn, &backend, UDP_BACKEND);
    before(&vn);
    let exporter = start_with_env(&mut vn, port, &[], args);
    (vn, exporter)
}

const LOST_PORT: u16 = 9110;
/// Flows whose DESTROY the test makes the exporter lose, and flows that
/// live on.
const DOOMED: usize = 3000;
const KEPT: usize = 50;

const LOST_RULESET: &str = r#"
table inet ctm_test {
    counter doomed {}
    counter kept {}
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 udp dport 81 counter name doomed dnat ip to 10.200.2.2:5353
        ip daddr 10.96.1.2 udp dport 81 counter name kept dnat ip to 10.200.2.2:5353
    }
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

#[test]
fn flows_whose_destroy_was_lost_leave_the_flow_table_at_the_next_dump() {
    if !kernel_tests_possible() {
        return;
    }
    // 1 MiB asked, 2 MiB granted: about 1,600 queued events, room enough
    // while the flows are made on a loaded machine (the test command runs
    // tests in parallel), too little for the 3,000 DESTROYs while stopped.
    let (vn, exporter) = census_node(
        LOST_RULESET,
        LOST_PORT,
        &["--rcvbuf-bytes=1048576", "--table-dump-seconds=2"],
    );
    let node = vn.node.clone();
    let client = vn.client.clone();
    for (n, vip, first) in [(DOOMED, "10.96.1.1", 20000), (KEPT, "10.96.1.2", 30000)] {
        let out = vn.exec(
            &client,
            &["python3", "-c", &udp_client_paced(n, vip, 81, first, 16)],
        );
        assert!(out.contains("done"), "{out}");
    }
    assert_eq!(nft_counter(&vn, "inet ctm_test", "doomed"), DOOMED as f64);
    assert_eq!(nft_counter(&vn, "inet ctm_test", "kept"), KEPT as f64);

    let table = "conntrack_monitoring_flow_table_flows{node=\"n1\",reader=\"0\"}";
    let overruns = "conntrack_monitoring_netlink_overruns_total{node=\"n1\"}";
    let lost = "conntrack_monitoring_lost_destroys_total{node=\"n1\"}";
    let destroys = "conntrack_monitoring_events_total{node=\"n1\",type=\"destroy\"}";
    let duration = "conntrack_monitoring_service_duration_seconds_count{node=\"n1\"}";
    let all = (DOOMED + KEPT) as f64;
    let text = scrape_until(
        &vn,
        LOST_PORT,
        Duration::from_secs(20),
        "every flow in the table, no overrun",
        &[table, overruns],
        |t| value(t, table) == all,
    );
    assert_eq!(value(&text, overruns), 0.0, "flows were made slowly enough");
    assert_eq!(value(&text, lost), 0.0, "dumps found every flow");

    // Stopped, the exporter reads nothing: the kernel destroys the doomed
    // flows, queues about 1,600 DESTROYs and drops the rest.
    let pid = exporter.pid.to_string();
    common::netns::run(&["kill", "-STOP", &pid]);
    let deleted = std::process::Command::new("ip")
        .args(["netns", "exec", &node, "conntrack", "-D", "-d", "10.96.1.1"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    common::netns::run(&["kill", "-CONT", &pid]);
    assert!(
        String::from_utf8_lossy(&deleted.stderr).contains(&format!("{DOOMED} flow entries")),
        "conntrack -D: {}",
        String::from_utf8_lossy(&deleted.stderr)
    );

    // The DESTROYs that were queued are taken; the next dump drops the
    // flows whose DESTROY never came.
    let text = scrape_until(
        &vn,
        LOST_PORT,
        Duration::from_secs(20),
        "the doomed flows leave the table",
        &[table, lost, destroys, overruns],
        |t| value(t, table) == KEPT as f64,
    );
    assert!(value(&text, overruns) > 0.0, "DESTROYs were lost");
    assert!(value(&text, lost) > 0.0);
    assert_eq!(
        value(&text, lost) + value(&text, destroys),
        DOOMED as f64,
        "each doomed flow: its DESTROY taken, or found gone by a dump"
    );
    println!(
        "{DOOMED} flows destroyed while the exporter was stopped: {} DESTROYs taken, \
         {} dropped at a dump ({} overruns)",
        value(&text, destroys),
        value(&text, lost),
        value(&text, overruns)
    );

    // The kept flows were never taken for lost; they end now and count.
    let before = value(&text, duration);
    vn.exec(&node, &["conntrack", "-D", "-d", "10.96.1.2"]);
    let text = scrape_until(
        &vn,
        LOST_PORT,
        Duration::from_secs(20),
        "the kept flows end and count",
        &[table, duration, lost],
        |t| value(t, table) == 0.0 && value(t, duration) == before + KEPT as f64,
    );
    assert_eq!(value(&text, lost) + value(&text, destroys), all);
}

const OUTSIDE_PORT: u16 = 9111;

const OUTSIDE_RULESET: &str = r#"
table inet ctm_test {
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 udp dport 81 dnat ip to 10.200.2.2:5353
        ip daddr 10.100.1.1 udp dport 81 dnat ip to 10.200.2.2:5353
        ip daddr 10.104.2.2 udp dport 81 dnat ip to 10.200.2.2:5353
        ip daddr 10.200.1.1 udp dport 30081 dnat ip to 10.200.2.2:5353
    }
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

#[test]
fn dnat_outside_the_service_subnets_is_counted_and_named() {
    if !kernel_tests_possible() {
        return;
    }
    // Made before the exporter starts, so its first dump finds them all:
    // 20 Service flows, 30 + 30 to ClusterIPs of a /12 the flag misses,
    // 20 to a NodePort on the node's own address.
    let (vn, exporter) = census_node_after(
        OUTSIDE_RULESET,
        OUTSIDE_PORT,
        &["--svc-subnet=10.96.0.0/16", "--table-dump-seconds=1"],
        |vn| {
            for (n, vip, port, first) in [
                (20, "10.96.1.1", 81, 20000),
                (30, "10.100.1.1", 81, 21000),
                (30, "10.104.2.2", 81, 22000),
                (20, "10.200.1.1", 30081, 23000),
            ] {
                let script = udp_client_paced(n, vip, port, first, 16);
                let out = vn.exec(&vn.client, &["python3", "-c", &script]);
                assert!(out.contains("done"), "{out}");
            }
        },
    );
    let node = vn.node.clone();
    let outside = "conntrack_monitoring_dnat_flows_outside_service_subnets{node=\"n1\"}";
    let ok = "conntrack_monitoring_table_dumps_total{node=\"n1\",outcome=\"ok\"}";
    let text = scrape_until(
        &vn,
        OUTSIDE_PORT,
        Duration::from_secs(15),
        "the dump counts the flows outside",
        &[outside, ok],
        |t| value(t, outside) == 60.0,
    );
    assert_eq!(
        value(
            &text,
            "conntrack_monitoring_table_dumps_total{node=\"n1\",outcome=\"failed\"}"
        ),
        0.0
    );
    // The hint names the prefix, once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let hints = loop {
        let lines = exporter.later.lock().unwrap().clone();
        let hints: Vec<String> = lines.into_iter().filter(|l| l.contains("hint:")).collect();
        if !hints.is_empty() || Instant::now() >= deadline {
            break hints;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(hints.len(), 1, "{hints:?}");
    assert!(
        hints[0].contains("60 DNAT'd flow(s)")
            && hints[0].contains("(10.96.0.0/16)")
            && hints[0].contains("fall in 10.96.0.0/12 (e.g. 10.10"),
        "{}",
        hints[0]
    );
    // They go: the gauge follows the table.
    vn.exec(&node, &["conntrack", "-D", "-d", "10.100.1.1"]);
    scrape_until(
        &vn,
        OUTSIDE_PORT,
        Duration::from_secs(15),
        "the gauge follows the table",
        &[outside],
        |t| value(t, outside) == 30.0,
    );
    std::thread::sleep(Duration::from_secs(2));
    let hints = exporter
        .later
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("hint:"))
        .count();
    assert_eq!(hints, 1, "the hint is logged once");
}
