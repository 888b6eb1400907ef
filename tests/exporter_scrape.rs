//! End to end: the exporter in a virtual node's namespace, real conntrack
//! events from real traffic, scraped over HTTP. Its per-event counters equal
//! what its reader saw, the output passes `promtool check metrics`, and the
//! OpenMetrics output passes the reference parser. Needs root; see
//! `tests/run.sh`.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::exporter::{get, promtool_check, start, value};
use common::netns::{kernel_tests_possible, VirtualNode};
use common::traffic::{start_backend, UDP_BACKEND};

const RULESET: &str = r#"
table inet ctm_test {
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.0.10 udp dport 53 dnat ip to 10.200.2.2:5353
    }
    # Scrapes over loopback must not create flows of their own.
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// 40 flows, each from its own source port: ephemeral ports can repeat, and
/// a repeated tuple would be the same flow.
const CLIENT: &str = r#"
import socket
for i in range(40):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.bind(("0.0.0.0", 20000 + i))
    s.sendto(b"q", ("10.96.0.10", 53)); assert s.recv(10) == b"q"; s.close()
print("done", flush=True)
"#;

const PORT: u16 = 9100;

#[test]
fn scraped_counters_match_the_events_read_and_pass_promtool() {
    if !kernel_tests_possible() {
        return;
    }
    // curl runs inside the namespace; the test process cannot reach its loopback.
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "curl is needed"
    );
    let mut vn = VirtualNode::new();
    vn.nft(RULESET);
    let backend = vn.backend.clone();
    start_backend(&mut vn, &backend, UDP_BACKEND);

    let node = vn.node.clone();
    let mut stdout = start(&mut vn, PORT, &["--print-events"]);

    let (head, body) = get(&vn, PORT, "/readyz", None);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("ok") || body.contains("ready"), "{body}");

    let client = vn.client.clone();
    assert_eq!(vn.exec(&client, &["python3", "-c", CLIENT]).trim(), "done");
    vn.exec(&node, &["conntrack", "-F"]);

    // Every event the reader printed; 40 flows x (NEW, UPDATE, DESTROY).
    let printed = {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let mut text = String::new();
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                let _ = tx.send(text.clone());
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut text = String::new();
        while text.matches("[DESTROY]").count() < 40 {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(t) => text = t,
                Err(_) => panic!("timed out waiting for DESTROY events:\n{text}"),
            }
        }
        text
    };
    let count = |kind: &str| printed.matches(&format!("[{kind}]")).count() as f64;
    assert_eq!(count("NEW"), 40.0);
    assert_eq!(count("DESTROY"), 40.0);

    let (head, text) = get(&vn, PORT, "/metrics", None);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    for (kind, printed_kind) in [("new", "NEW"), ("update", "UPDATE"), ("destroy", "DESTROY")] {
        let series = format!("conntrack_monitoring_events_total{{node=\"n1\",type=\"{kind}\"}}");
        assert_eq!(value(&text, &series), count(printed_kind), "{kind}");
    }
    assert_eq!(
        value(
            &text,
            "conntrack_monitoring_errors_total{node=\"n1\",type=\"malformed message\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &text,
            "conntrack_monitoring_netlink_overruns_total{node=\"n1\"}"
        ),
        0.0
    );
    let messages = count("NEW") + count("UPDATE") + count("DESTROY");
    assert_eq!(
        value(
            &text,
            "conntrack_monitoring_reader_batch_messages_sum{node=\"n1\"}"
        ),
        messages
    );
    assert!(
        value(
            &text,
            "conntrack_monitoring_netlink_receive_buffer_bytes{node=\"n1\"}"
        ) > 212_992.0
    );

    // promtool's lint, on the output with default flags.
    promtool_check(&text);

    // OpenMetrics, checked by the reference parser (prometheus_client).
    let (head, om) = get(
        &vn,
        PORT,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"));
    let mut parser = Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
             print(len(list(p(sys.stdin.read()))))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(om.as_bytes())
        .unwrap();
    let out = parser.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "OpenMetrics parser: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(families >= 13, "{families} families");
}

/// HELP and TYPE lines, and each sample's name and labels (values cut off),
/// sorted: what a dashboard or recording rule depends on.
fn shape(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| match l.starts_with('#') {
            true => l.to_string(),
            false => l
                .rsplit_once(' ')
                .map_or(l, |(series, _)| series)
                .to_string(),
        })
        .collect();
    lines.sort();
    lines
}

/// Families added since the fixtures were scraped: their lines are the only
/// ones allowed beyond the fixtures'.
const ADDED_SINCE: &[&str] = &[
    "conntrack_monitoring_duplicate_destroys",
    "conntrack_monitoring_lost_destroys",
    "conntrack_monitoring_dnat_flows_outside_service_subnets",
    "conntrack_monitoring_table_dumps",
    "conntrack_monitoring_flows_over_service_budget",
    "conntrack_monitoring_service_flows",
    "conntrack_monitoring_readers_stuck",
    "conntrack_monitoring_node_",
    "conntrack_monitoring_event_mask_held",
    "conntrack_monitoring_http_connections_refused",
    "conntrack_monitoring_service_names",
    "conntrack_monitoring_service_name_errors",
    "conntrack_monitoring_http_tls_errors",
    "conntrack_monitoring_http_auth",
    "conntrack_monitoring_web_config_",
    "conntrack_monitoring_unanswered_flows_dropped",
    "conntrack_monitoring_service_flows_awaiting_reply",
];

/// The families, their HELP and TYPE lines and every label set are those
/// the exporter wrote before its metrics went through one registry and one
/// renderer (the fixtures were scraped from that build), in both formats;
/// a family added since adds its own lines and changes no other.
#[test]
fn the_exposition_keeps_every_family_and_label_set_in_both_formats() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    let _stdout = start(&mut vn, PORT, &["--readers", "2", "--legacy-names"]);
    for (accept, fixture) in [
        (None, "exposition_shape_prometheus.txt"),
        (
            Some("application/openmetrics-text; version=1.0.0"),
            "exposition_shape_openmetrics.txt",
        ),
    ] {
        let (head, body) = get(&vn, PORT, "/metrics", accept);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let path = common::captures::fixture_path(fixture);
        let expected = std::fs::read_to_string(&path).unwrap();
        // The first line says where the fixture comes from.
        let expected: Vec<&str> = expected.lines().skip(1).collect();
        let added = |l: &str| {
            ADDED_SINCE.iter().any(|f| {
                let l = l
                    .trim_start_matches("# HELP ")
                    .trim_start_matches("# TYPE ");
                l.starts_with(f)
            })
        };
        let got: Vec<String> = shape(&body).into_iter().filter(|l| !added(l)).collect();
        let missing: Vec<_> = expected
            .iter()
            .filter(|l| !got.iter().any(|g| g == *l))
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|g| !expected.contains(&g.as_str()))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{fixture}: missing {missing:#?}\nextra {extra:#?}"
        );
        assert_eq!(got.len(), expected.len(), "{fixture}: a line repeated");
    }
}
