//! The node's conntrack health read from ctnetlink equals what conntrack(8)
//! reads in the same network namespace: each per-CPU statistic summed
//! (`conntrack -S`) and the entry count (`conntrack -C`), after Service
//! flows and invalid packets (TCP segments with a bad checksum) were
//! provoked in the test namespace. Needs root.

mod common;

use std::collections::BTreeMap;

use common::exporter::{get, start, value};
use common::netns::kernel_tests_possible;
use common::traffic::{service_node, udp_client};

const RULESET: &str = r#"
table inet ctm_test {
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 udp dport 53 dnat ip to 10.200.3.2:5353
    }
    # Scrapes over loopback must not touch the statistics being compared.
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// 40 TCP segments to the backend with a checksum that cannot be right:
/// conntrack verifies it on the node (nf_conntrack_checksum) and counts
/// each as invalid.
const BAD_CHECKSUMS: &str = r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
for i in range(40):
    # source port, destination port, seq, ack, offset 5 words, ACK, window,
    # checksum 0xdead, urgent pointer
    segment = struct.pack("!HHIIBBHHH", 40000 + i, 8080, 1, 1, 5 << 4, 0x10, 512, 0xdead, 0)
    s.sendto(segment, ("10.200.2.2", 0))
print("done", flush=True)
"#;

/// A virtual node with the exporter on `port`, whose UDP flows stay (so
/// its table holds still) with `keep_udp_flows`.
fn node_with_exporter(
    port: u16,
    keep_udp_flows: bool,
) -> (common::netns::VirtualNode, std::process::ChildStdout) {
    let mut vn = service_node(RULESET);
    if keep_udp_flows {
        vn.keep_udp_flows();
    }
    let stdout = start(&mut vn, port, &[]);
    (vn, stdout)
}

#[test]
fn node_statistics_equal_conntrack_s_and_c() {
    if !kernel_tests_possible() {
        return;
    }
    const PORT: u16 = 9140;
    let (vn, _stdout) = node_with_exporter(PORT, true);
    let node = vn.node.clone();
    let client = vn.client.clone();
    let out = vn.exec(
        &client,
        &["python3", "-c", &udp_client(120, "10.96.1.1", 53, 20_000)],
    );
    assert_eq!(out.trim(), "done");
    let out = vn.exec(&client, &["python3", "-c", BAD_CHECKSUMS]);
    assert_eq!(out.trim(), "done");

    // The render cache may hold a body up to 250 ms old.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (_, text) = get(&vn, PORT, "/metrics", None);
    let stats = vn.exec(&node, &["conntrack", "-S"]);
    let entries = vn.exec(&node, &["conntrack", "-C"]);

    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for line in stats.lines() {
        for field in line.split_whitespace().filter(|f| !f.starts_with("cpu=")) {
            let (name, n) = field.split_once('=').unwrap();
            *sums.entry(name.to_string()).or_default() += n.parse::<f64>().unwrap();
        }
    }
    assert_eq!(sums.len(), 10, "conntrack -S: {stats}");
    assert!(
        sums["invalid"] >= 40.0,
        "the bad segments are invalid: {sums:?}"
    );
    for (name, sum) in &sums {
        let series = format!("conntrack_monitoring_node_{name}_total{{node=\"n1\"}}");
        assert_eq!(value(&text, &series), *sum, "{name}");
    }
    let entries: f64 = entries.trim().parse().unwrap();
    assert!(entries >= 120.0, "{entries}");
    assert_eq!(
        value(&text, "conntrack_monitoring_node_entries{node=\"n1\"}"),
        entries
    );
    let limit = vn.exec(&node, &["sysctl", "-n", "net.netfilter.nf_conntrack_max"]);
    assert_eq!(
        value(
            &text,
            "conntrack_monitoring_node_entries_limit{node=\"n1\"}"
        ),
        limit.trim().parse::<f64>().unwrap()
    );
    println!("conntrack -S summed over CPUs: {sums:?}; conntrack -C: {entries}");
}

/// UDP datagrams from the client to the backend on every port pair of
/// `sources` x 1..=65535: one new flow each, forwarded by the node, until
/// its table (nf_conntrack_max entries, counted per namespace) is full.
const FLOOD: &str = r#"
import socket
sent = 0
for src in range(30000, 30005):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", src)); s.setblocking(False)
    for port in range(1, 65536):
        try:
            s.sendto(b"x", ("10.200.2.2", port)); sent += 1
        except BlockingIOError:
            pass
    s.close()
print(sent, flush=True)
"#;

#[test]
fn a_full_table_shows_in_the_entries_and_early_drops() {
    if !kernel_tests_possible() {
        return;
    }
    // The default UDP timeout (30 s) outlasts the test: 262,144 entries
    // with long timeouts would slow the kernel's garbage collector, which
    // is shared by every namespace, for other tests' flows.
    const PORT: u16 = 9141;
    let (vn, _stdout) = node_with_exporter(PORT, false);
    let node = vn.node.clone();
    let key = "net.netfilter.nf_conntrack_udp_timeout=30";
    vn.exec(&node, &["sysctl", "-qw", key]);
    let limit: f64 = vn
        .exec(&node, &["sysctl", "-n", "net.netfilter.nf_conntrack_max"])
        .trim()
        .parse()
        .unwrap();
    let client = vn.client.clone();
    let sent: f64 = vn
        .exec(&client, &["python3", "-c", FLOOD])
        .trim()
        .parse()
        .unwrap();
    assert!(sent > limit, "{sent} datagrams for a table of {limit}");

    std::thread::sleep(std::time::Duration::from_millis(300));
    let (_, text) = get(&vn, PORT, "/metrics", None);
    let stats = vn.exec(&node, &["conntrack", "-S"]);
    let early_drops: f64 = stats
        .split_whitespace()
        .filter_map(|f| f.strip_prefix("early_drop="))
        .map(|n| n.parse::<f64>().unwrap())
        .sum();
    assert!(early_drops > 0.0, "the table was full: {stats}");
    let series = |name: &str| {
        value(
            &text,
            &format!("conntrack_monitoring_node_{name}{{node=\"n1\"}}"),
        )
    };
    assert_eq!(series("early_drop_total"), early_drops);
    // Full: the entries are at the limit (the early drops keep them there).
    let entries = series("entries");
    assert!(
        entries > 0.99 * limit && entries <= limit,
        "{entries} of {limit}"
    );
    assert_eq!(series("entries_limit"), limit);
    println!("{sent} datagrams: {entries} entries of {limit}, {early_drops} early drops");
}
