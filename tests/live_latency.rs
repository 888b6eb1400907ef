//! `--live-latency` against the real kernel: a connection through a
//! ClusterIP held open for a minute has its seen-reply latency in /metrics
//! within 2 s of its handshake and its FIN latency within 2 s of its close,
//! long before its DESTROY; a connection to a blackholed backend raises
//! `service_flows_awaiting_reply` within 3 s and the gauge falls when the
//! flow ends; `ab` through a ClusterIP still gives exact counts in every
//! histogram (the nft counters); a flood of unanswered SYNs drops only
//! unanswered flows and leaves every answered one measured; with
//! `--service-labels` the gauge names the Service that does not answer.
//! Needs root.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::exporter::{get, promtool_check, samples, scrape_until, start, total, value};
use common::netns::{kernel_tests_possible, VirtualNode};
use common::traffic::{nft_counter, service_node};

const RULESET: &str = r#"
table inet ctm_test {
    counter healthy {}
    counter dark {}
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.4.1 tcp dport 80 counter name healthy dnat ip to 10.200.2.2:8080
        ip daddr 10.96.4.2 tcp dport 80 counter name dark dnat ip to 10.200.3.2:8080
    }
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

const SEEN_REPLY: &str =
    "conntrack_monitoring_service_seen_reply_latency_seconds_count{node=\"n1\"}";
const FIN: &str = "conntrack_monitoring_service_TCP_FIN_latency_seconds_count{node=\"n1\"}";
const DURATION: &str = "conntrack_monitoring_service_duration_seconds_count{node=\"n1\"}";
const AWAITING: &str = "conntrack_monitoring_service_flows_awaiting_reply{node=\"n1\"}";
const DROPPED: &str = "conntrack_monitoring_unanswered_flows_dropped_total{node=\"n1\"}";

/// A virtual node with the two Services; the second one's backend
/// (10.200.3.2:8080, past the node, which confirms the flows) drops every
/// packet, as a dead node's pod would.
fn node() -> VirtualNode {
    let vn = service_node(RULESET);
    let b2 = vn.backend2.clone();
    for rule in [
        "add table inet dark",
        "add chain inet dark in { type filter hook input priority 0 ; }",
        "add rule inet dark in tcp dport 8080 drop",
    ] {
        vn.exec(&b2, &["nft", rule]);
    }
    vn
}

/// Scrapes until `series` equals `want` or `limit` passes; the time it took,
/// or `None`.
fn within(
    vn: &VirtualNode,
    port: u16,
    series: &str,
    want: f64,
    limit: Duration,
) -> Option<Duration> {
    until(vn, port, limit, |text| value(text, series) == want).map(|(took, _)| took)
}

/// Scrapes every 100 ms until `done` holds for the body or `limit` passes;
/// the time it took and that body, or `None`.
fn until(
    vn: &VirtualNode,
    port: u16,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> Option<(Duration, String)> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let (_, text) = get(vn, port, "/metrics", None);
        if done(&text) {
            return Some((t0.elapsed(), text));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Starts the python3 `script` in the client namespace and waits for its
/// first line, `first`; its later lines come from the result.
fn client_script(
    vn: &mut VirtualNode,
    script: &str,
    first: &str,
) -> std::io::Lines<BufReader<std::process::ChildStdout>> {
    let client = vn.client.clone();
    let child = vn.spawn(
        &client,
        &["python3", "-c", script],
        Stdio::piped(),
        Stdio::inherit(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), first);
    lines
}

fn scrape(vn: &VirtualNode, port: u16, series: &str) -> f64 {
    let (_, text) = get(vn, port, "/metrics", None);
    value(&text, series)
}

#[test]
fn a_minute_long_connection_is_measured_at_its_handshake_and_its_close() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = node();
    const PORT: u16 = 9150;
    let _out = start(&mut vn, PORT, &["--live-latency"]);
    // Connects, says "open", holds the connection a minute without a
    // request (the backend waits for one), closes, says "closed".
    let script = r#"
import socket, time
s = socket.create_connection(("10.96.4.1", 80), timeout=5)
print("open", flush=True)
time.sleep(60)
s.close()
print("closed", flush=True)
time.sleep(30)
"#;
    let mut lines = client_script(&mut vn, script, "open");
    let took = within(&vn, PORT, SEEN_REPLY, 1.0, Duration::from_secs(2));
    assert!(
        took.is_some(),
        "no seen-reply latency within 2 s of the handshake"
    );
    std::thread::sleep(Duration::from_secs(30));
    // Half a minute on: the latency is there, the flow open, nothing more.
    let (_, text) = get(&vn, PORT, "/metrics", None);
    assert_eq!(value(&text, SEEN_REPLY), 1.0);
    assert_eq!(value(&text, FIN), 0.0);
    assert_eq!(value(&text, DURATION), 0.0);
    assert_eq!(lines.next().unwrap().unwrap(), "closed");
    let took = within(&vn, PORT, FIN, 1.0, Duration::from_secs(2));
    assert!(took.is_some(), "no FIN latency within 2 s of the close");
    // The DESTROY adds the duration, and no latency again. (The kernel's
    // garbage collection of expired entries is slow to come round: the
    // flush ends the flow now.)
    vn.end_flows();
    let text = scrape_until(&vn, PORT, DURATION, 1.0);
    assert_eq!(value(&text, DURATION), 1.0);
    assert_eq!(value(&text, SEEN_REPLY), 1.0);
    assert_eq!(value(&text, FIN), 1.0);
}

#[test]
fn a_blackholed_backend_shows_in_awaiting_reply_until_the_flow_ends() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = node();
    const PORT: u16 = 9151;
    let _out = start(&mut vn, PORT, &["--live-latency"]);
    assert_eq!(scrape(&vn, PORT, AWAITING), 0.0);
    let script = r#"
import socket, time
s = socket.socket(); s.setblocking(False)
s.connect_ex(("10.96.4.2", 80))
print("sent", flush=True)
time.sleep(60)
"#;
    let _lines = client_script(&mut vn, script, "sent");
    let took = within(&vn, PORT, AWAITING, 1.0, Duration::from_secs(3));
    assert!(took.is_some(), "the gauge did not rise within 3 s");
    // The flow ends (deleted from the table: its DESTROY comes now, not
    // after the SYN_SENT timeout).
    vn.exec(&vn.node, &["conntrack", "-D", "-d", "10.96.4.2"]);
    let took = within(&vn, PORT, AWAITING, 0.0, Duration::from_secs(3));
    assert!(took.is_some(), "the gauge did not fall when the flow ended");
    assert_eq!(scrape(&vn, PORT, SEEN_REPLY), 0.0);
}

/// The awaiting-reply gauge's samples for Service `vip`, one a reader's
/// block merged into each: their values.
fn awaiting_of(text: &str, vip: &str) -> Vec<f64> {
    let name = "conntrack_monitoring_service_flows_awaiting_reply";
    samples(text, name, &[("service_ip", vip)])
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// With `--service-labels` the gauge says which Service is not answering:
/// two connections to the blackholed one (from two readers' shards, added
/// up) show under its labels within 3 s, the healthy Service with a
/// connection open shows 0, and the count falls when the flows end.
#[test]
fn with_service_labels_the_awaiting_gauge_names_the_service_not_answering() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = node();
    const PORT: u16 = 9153;
    let _out = start(
        &mut vn,
        PORT,
        &["--live-latency", "--service-labels", "--readers", "2"],
    );
    let script = r#"
import socket, time
h = socket.create_connection(("10.96.4.1", 80), timeout=5)
dark = []
for _ in range(2):
    s = socket.socket(); s.setblocking(False); s.connect_ex(("10.96.4.2", 80)); dark.append(s)
print("sent", flush=True)
time.sleep(60)
"#;
    let _lines = client_script(&mut vn, script, "sent");
    let three = Duration::from_secs(3);
    let dark_at = |n: f64| move |text: &str| awaiting_of(text, "10.96.4.2") == [n];
    let Some((took, text)) = until(&vn, PORT, three, dark_at(2.0)) else {
        panic!("the dark Service's gauge did not reach 2 within 3 s");
    };
    eprintln!("the dark Service's gauge at 2 after {took:?}");
    let name = "conntrack_monitoring_service_flows_awaiting_reply";
    let dark = samples(&text, name, &[("service_ip", "10.96.4.2")]);
    let labels = &dark[0].0;
    assert_eq!(labels["service_port"], "80");
    assert_eq!(labels["protocol"], "tcp");
    assert_eq!(awaiting_of(&text, "10.96.4.1"), [0.0], "the healthy one");
    assert_eq!(awaiting_of(&text, "other"), [0.0], "the overflow");
    // Every series carries the Service labels: no node-level one.
    let all = samples(&text, name, &[]);
    assert!(
        all.iter().all(|(l, _)| l.contains_key("service_ip")),
        "{all:?}"
    );
    assert_eq!(total(&text, name, &[]), 2.0);
    promtool_check(&text);
    vn.exec(&vn.node, &["conntrack", "-D", "-d", "10.96.4.2"]);
    assert!(
        until(&vn, PORT, three, dark_at(0.0)).is_some(),
        "the gauge did not fall when the flows ended"
    );
}

/// `n` connection attempts to the blackholed Service from distinct source
/// ports, 500 sockets at a time (each closed unanswered: a SYN_SENT flow
/// stays in the kernel's table).
fn syn_flood(n: usize) -> String {
    format!(
        r#"
import socket
left = {n}
while left:
    batch = []
    for _ in range(min(500, left)):
        s = socket.socket(); s.setblocking(False); s.connect_ex(("10.96.4.2", 80)); batch.append(s)
    left -= len(batch)
    for s in batch: s.close()
print("done", flush=True)
"#
    )
}

#[test]
fn ab_counts_stay_exact_and_a_syn_flood_leaves_answered_flows_measured() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = node();
    const PORT: u16 = 9152;
    // 4096 flows: 1024 unanswered at most.
    let _out = start(&mut vn, PORT, &["--live-latency", "--max-flows", "4096"]);
    let client = vn.client.clone();
    // The flood and ab at once.
    let flood = {
        let client = client.clone();
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &client, "python3", "-c", &syn_flood(3000)])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    };
    vn.exec(
        &client,
        &["ab", "-q", "-n", "2000", "-c", "50", "http://10.96.4.1:80/"],
    );
    assert_eq!(flood.join().unwrap(), "done");
    vn.end_flows();
    let healthy = nft_counter(&vn, "inet ctm_test", "healthy");
    let dark = nft_counter(&vn, "inet ctm_test", "dark");
    assert!(healthy >= 2000.0, "{healthy}");
    assert_eq!(dark, 3000.0);
    let text = scrape_until(&vn, PORT, DURATION, healthy + dark);
    // Every flow once in each histogram it belongs to: the answered ones in
    // the latencies (at their replies or, for one whose NEW the flood pushed
    // out, at its DESTROY), all in the durations.
    assert_eq!(value(&text, SEEN_REPLY), healthy);
    assert_eq!(value(&text, FIN), healthy);
    assert_eq!(value(&text, DURATION), healthy + dark);
    assert!(
        value(&text, DROPPED) >= dark - 1024.0,
        "{}",
        value(&text, DROPPED)
    );
    let settled = within(&vn, PORT, AWAITING, 0.0, Duration::from_secs(3));
    assert!(
        settled.is_some(),
        "flows awaiting a reply after every flow ended"
    );
    let evicted = "conntrack_monitoring_flows_evicted_total{node=\"n1\"}";
    assert_eq!(value(&text, evicted), 0.0, "no answered flow evicted");
}
