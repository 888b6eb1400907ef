//! Least privilege: started as root with every capability, the exporter
//! keeps only CAP_NET_ADMIN, in every thread and in the `nft -i` child of
//! `--event-mask`, and still does everything it does: its table, its
//! table dumps, the node's statistics, a Service flow measured. Needs root.

mod common;

use std::time::{Duration, Instant};

use common::exporter::{get, start_with_pid, value};
use common::netns::kernel_tests_possible;
use common::traffic::{service_node, udp_client};

const RULESET: &str = r#"
table inet ctm_test {
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 udp dport 53 dnat ip to 10.200.3.2:5353
    }
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// `CAP_NET_ADMIN` alone, as /proc prints a capability set.
const NET_ADMIN_ONLY: &str = "0000000000001000";

/// The capability sets of /proc/`pid`/task/`tid`/status (or of a
/// process), by name.
fn sets(status: &str) -> Vec<(String, String)> {
    status
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .filter_map(|l| l.split_once(":\t"))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The threads of process `pid` and its children: name and status.
fn tasks_of(pid: u32) -> Vec<(String, String)> {
    let read = |path: String| std::fs::read_to_string(path).unwrap_or_default();
    let mut tasks = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().display().to_string();
        tasks.push((
            read(format!("{path}/comm")).trim().to_string(),
            read(format!("{path}/status")),
        ));
    }
    for child in read(format!("/proc/{pid}/task/{pid}/children")).split_whitespace() {
        tasks.push((
            read(format!("/proc/{child}/comm")).trim().to_string(),
            read(format!("/proc/{child}/status")),
        ));
    }
    tasks
}

#[test]
fn after_start_only_cap_net_admin_is_left_everywhere() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = service_node(RULESET);
    const PORT: u16 = 9150;
    let (pid, _stdout) = start_with_pid(
        &mut vn,
        PORT,
        &["--event-mask", "--service-labels", "--table-dump-seconds=1"],
    );
    // The test process itself has them all: the exporter gave them up.
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(sets(&ours)
        .iter()
        .any(|(k, v)| k == "CapEff" && v != NET_ADMIN_ONLY));

    // A thread names itself once it runs: wait until every one has.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tasks = loop {
        let tasks = tasks_of(pid);
        let names: Vec<&str> = tasks.iter().map(|(n, _)| n.as_str()).collect();
        let missing: Vec<&str> = [
            "ct-reader-0",
            "ct-census",
            "ct-signals",
            "ct-service-name",
            "nft",
        ]
        .into_iter()
        .filter(|n| !names.contains(n))
        .collect();
        if missing.is_empty() {
            break tasks;
        }
        assert!(Instant::now() < deadline, "{missing:?} not among {names:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for (name, status) in &tasks {
        for (set, value) in sets(status) {
            let want = match set.as_str() {
                "CapInh" | "CapAmb" => "0000000000000000",
                _ => NET_ADMIN_ONLY,
            };
            assert_eq!(value, want, "{name}: {set}");
        }
    }

    // And it still does its work: the event-mask table, table dumps, the
    // node's statistics, a Service flow measured.
    let tables = vn.exec(&vn.node, &["nft", "list", "tables"]);
    assert!(tables.contains("conntrack_metrics_"), "{tables}");
    let client = vn.client.clone();
    let out = vn.exec(
        &client,
        &["python3", "-c", &udp_client(10, "10.96.1.1", 53, 20_000)],
    );
    assert_eq!(out.trim(), "done");
    vn.end_flows();
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (_, text) = get(&vn, PORT, "/metrics", None);
        let flows = common::exporter::total(
            &text,
            "conntrack_monitoring_service_duration_seconds_count",
            &[],
        );
        if flows == 10.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "{flows} of 10 flows counted");
        std::thread::sleep(Duration::from_millis(200));
    };
    let ok = "conntrack_monitoring_table_dumps_total{node=\"n1\",outcome=\"ok\"}";
    assert!(value(&text, ok) >= 1.0);
    let failed = "conntrack_monitoring_table_dumps_total{node=\"n1\",outcome=\"failed\"}";
    assert_eq!(value(&text, failed), 0.0);
    assert!(
        value(
            &text,
            "conntrack_monitoring_node_entries_limit{node=\"n1\"}"
        ) > 0.0
    );
}
