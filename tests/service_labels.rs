//! Per-Service series (`--service-labels`) against the real kernel: three
//! Services (two TCP ClusterIPs, one UDP) each counted exactly against the
//! nft counter of its DNAT rule; with a budget of one Service the totals
//! stay exact, the overflow is counted and the series stay bounded; an idle
//! Service's series leave. Needs root and `ab`.

mod common;

use std::time::{Duration, Instant};

use common::exporter::{get, promtool_check, samples, start_with_env, total};
use common::netns::{kernel_tests_possible, VirtualNode};
use common::traffic::{nft_counter, service_node, udp_client};

const RULESET: &str = r#"
table inet ctm_test {
    counter web {}
    counter api {}
    counter dns {}
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 tcp dport 80 counter name web dnat ip to 10.200.2.2:8080
        ip daddr 10.96.1.2 tcp dport 8443 counter name api dnat ip to 10.200.2.2:8080
        ip daddr 10.96.0.53 udp dport 53 counter name dns dnat ip to 10.200.3.2:5353
    }
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// The Services: nft counter, ClusterIP, port, protocol.
const SERVICES: [(&str, &str, &str, &str); 3] = [
    ("web", "10.96.1.1", "80", "tcp"),
    ("api", "10.96.1.2", "8443", "tcp"),
    ("dns", "10.96.0.53", "53", "udp"),
];

const DURATION: &str = "conntrack_monitoring_service_duration_seconds_count";
const SEEN_REPLY: &str = "conntrack_monitoring_service_seen_reply_latency_seconds_count";
const OVER_BUDGET: &str = "conntrack_monitoring_flows_over_service_budget_total";

/// A virtual node with the three Services and the exporter on `port` with
/// `args` and `env`; traffic sent to each Service; returns the node and
/// the flows each DNAT rule counted.
fn node_with_traffic(port: u16, args: &[&str], env: &[&str]) -> (VirtualNode, [f64; 3]) {
    node_with_traffic_after(port, args, env, |_| {})
}

/// [`node_with_traffic`], with `setup` run on the node before the exporter
/// starts.
fn node_with_traffic_after(
    port: u16,
    args: &[&str],
    env: &[&str],
    setup: impl Fn(&VirtualNode),
) -> (VirtualNode, [f64; 3]) {
    let mut vn = service_node(RULESET);
    setup(&vn);
    start_with_env(&mut vn, port, env, args);
    let client = vn.client.clone();
    for url in ["http://10.96.1.1:80/", "http://10.96.1.2:8443/"] {
        vn.exec(&client, &["ab", "-q", "-n", "400", "-c", "20", url]);
    }
    let out = vn.exec(
        &client,
        &["python3", "-c", &udp_client(150, "10.96.0.53", 53, 20_000)],
    );
    assert_eq!(out.trim(), "done");
    vn.end_flows();
    let counted = SERVICES.map(|(counter, ..)| nft_counter(&vn, "inet ctm_test", counter));
    (vn, counted)
}

/// Scrapes until every flow is counted (the DESTROYs come a little after
/// the flush), or panics.
fn scrape_all(vn: &VirtualNode, port: u16, flows: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = get(vn, port, "/metrics", None);
        let counted = total(&text, DURATION, &[]);
        if counted >= flows {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{counted} of {flows} flows counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn each_service_is_counted_exactly_in_its_own_series() {
    if !kernel_tests_possible() {
        return;
    }
    const PORT: u16 = 9120;
    let (vn, counted) = node_with_traffic(PORT, &["--service-labels", "--service-names=off"], &[]);
    assert!(
        counted[0] >= 400.0 && counted[1] >= 400.0 && counted[2] == 150.0,
        "{counted:?}"
    );
    let text = scrape_all(&vn, PORT, counted.iter().sum());
    for ((_, ip, port, proto), flows) in SERVICES.iter().zip(counted) {
        let labels = [
            ("service_ip", *ip),
            ("service_port", *port),
            ("protocol", *proto),
        ];
        assert_eq!(
            total(&text, DURATION, &labels),
            flows,
            "{ip}:{port}/{proto}"
        );
        assert_eq!(
            total(&text, SEEN_REPLY, &labels),
            flows,
            "{ip}:{port}/{proto}"
        );
    }
    // Every Service series carries the labels; the overflow is there, empty.
    for (labels, _) in samples(&text, DURATION, &[]) {
        assert!(
            labels.contains_key("service_ip") && labels.contains_key("protocol"),
            "{labels:?}"
        );
    }
    assert_eq!(total(&text, DURATION, &[("service_ip", "other")]), 0.0);
    assert_eq!(total(&text, OVER_BUDGET, &[]), 0.0);
    promtool_check(&text);
}

#[test]
fn over_the_budget_totals_stay_exact_and_series_bounded() {
    if !kernel_tests_possible() {
        return;
    }
    const PORT: u16 = 9121;
    let (vn, counted) = node_with_traffic(
        PORT,
        &[
            "--service-labels",
            "--service-names=off",
            "--max-services=1",
        ],
        &[],
    );
    let flows: f64 = counted.iter().sum();
    let text = scrape_all(&vn, PORT, flows);
    let series: Vec<_> = samples(&text, DURATION, &[]);
    let ips: Vec<&str> = series
        .iter()
        .map(|(l, _)| l["service_ip"].as_str())
        .collect();
    assert_eq!(ips.len(), 2, "one Service and the overflow: {ips:?}");
    assert!(ips.contains(&"other"), "{ips:?}");
    assert_eq!(total(&text, DURATION, &[]), flows, "totals exact");
    // The Service that got the slot is counted exactly; the others in the
    // overflow, and in the counter.
    let (owner, _) = series
        .iter()
        .find(|(l, _)| l["service_ip"] != "other")
        .unwrap();
    let i = SERVICES
        .iter()
        .position(|s| s.1 == owner["service_ip"])
        .unwrap();
    let own = total(&text, DURATION, &[("service_ip", SERVICES[i].1)]);
    assert_eq!(own, counted[i]);
    assert_eq!(
        total(&text, DURATION, &[("service_ip", "other")]),
        flows - own
    );
    assert_eq!(total(&text, OVER_BUDGET, &[]), flows - own);
}

#[test]
fn an_idle_service_gives_its_series_back() {
    if !kernel_tests_possible() {
        return;
    }
    const PORT: u16 = 9122;
    // A test build takes the idle time in seconds from the environment.
    let (vn, counted) = node_with_traffic(
        PORT,
        &["--service-labels", "--service-names=off"],
        &["CONNTRACK_METRICS_TEST_SERVICE_IDLE_SECONDS=3"],
    );
    let text = scrape_all(&vn, PORT, counted.iter().sum());
    assert_eq!(
        total(&text, DURATION, &[("service_ip", "10.96.1.1")]),
        counted[0]
    );
    // No flow ends for 3 s: every Service's series leave, the overflow's stay.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, text) = get(&vn, PORT, "/metrics", None);
        let left: Vec<_> = samples(&text, DURATION, &[]);
        if left.len() == 1 {
            assert_eq!(left[0].0["service_ip"], "other");
            break;
        }
        assert!(Instant::now() < deadline, "still there: {left:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // A new flow brings its Service back, counted from zero.
    let client = vn.client.clone();
    let out = vn.exec(
        &client,
        &["python3", "-c", &udp_client(5, "10.96.0.53", 53, 21_000)],
    );
    assert_eq!(out.trim(), "done");
    vn.end_flows();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, text) = get(&vn, PORT, "/metrics", None);
        if total(&text, DURATION, &[("service_ip", "10.96.0.53")]) == 5.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the Service did not come back");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// kube-proxy's nftables mode names 10.96.1.1:80/tcp (its map
/// `service-ips`, the element's chain `service-HASH-NS/NAME/PROTO/PORT`).
const KUBE_PROXY_NFT: &str = "
table ip kube-proxy {
    map service-ips {
        type ipv4_addr . inet_proto . inet_service : verdict
    }
    chain service-ULMVA6XW-default/web/tcp/http { }
}
add element ip kube-proxy service-ips { 10.96.1.1 . tcp . 80 : goto service-ULMVA6XW-default/web/tcp/http }
";

/// kube-proxy's iptables mode names 10.96.1.2:8443/tcp (a `KUBE-SERVICES`
/// rule with its comment), through iptables-nft in the node's namespace.
fn kube_proxy_iptables(vn: &VirtualNode) {
    let nat = |args: &[&str]| {
        let mut argv = vec!["iptables", "-w", "-t", "nat"];
        argv.extend_from_slice(args);
        vn.exec(&vn.node, &argv);
    };
    nat(&["-N", "KUBE-SERVICES"]);
    nat(&["-N", "KUBE-SVC-4QZOVBIBSUUGMHFS"]);
    nat(&[
        "-A",
        "KUBE-SERVICES",
        "-d",
        "10.96.1.2/32",
        "-p",
        "tcp",
        "-m",
        "comment",
        "--comment",
        "prod/api:https cluster IP",
        "-m",
        "tcp",
        "--dport",
        "8443",
        "-j",
        "KUBE-SVC-4QZOVBIBSUUGMHFS",
    ]);
    // Not kube-proxy's format: counted, skipped, and nothing else changes.
    nat(&[
        "-A",
        "KUBE-SERVICES",
        "-d",
        "10.96.1.3/32",
        "-p",
        "tcp",
        "-m",
        "comment",
        "--comment",
        "no namespace here cluster IP",
        "-m",
        "tcp",
        "--dport",
        "80",
        "-j",
        "KUBE-SVC-4QZOVBIBSUUGMHFS",
    ]);
}

#[test]
fn names_come_from_the_nodes_kube_proxy_rules_in_both_modes() {
    if !kernel_tests_possible() {
        return;
    }
    const PORT: u16 = 9123;
    let (vn, counted) = node_with_traffic_after(PORT, &["--service-labels"], &[], |vn| {
        vn.nft(KUBE_PROXY_NFT);
        kube_proxy_iptables(vn);
    });
    let text = scrape_all(&vn, PORT, counted.iter().sum());
    for ((_, ip, ..), flows, namespace, service) in [
        (SERVICES[0], counted[0], "default", "web"),
        (SERVICES[1], counted[1], "prod", "api"),
        // No rule names the DNS Service: its name labels are empty.
        (SERVICES[2], counted[2], "", ""),
    ] {
        let labels = [
            ("service_ip", ip),
            ("namespace", namespace),
            ("service", service),
        ];
        assert_eq!(
            total(&text, DURATION, &labels),
            flows,
            "{ip} as {namespace}/{service}"
        );
    }
    let errors = "conntrack_monitoring_service_name_errors_total";
    let malformed = [("source", "iptables"), ("reason", "malformed")];
    assert_eq!(
        total(&text, errors, &malformed),
        1.0,
        "the bad rule is counted"
    );
    let named = "conntrack_monitoring_service_names";
    assert_eq!(total(&text, named, &[("source", "nftables")]), 1.0);
    assert_eq!(total(&text, named, &[("source", "iptables")]), 1.0);
    let overflow = samples(&text, DURATION, &[("service_ip", "other")]);
    assert_eq!(overflow.len(), 1);
    assert_eq!(overflow[0].0["namespace"], "");
    promtool_check(&text);
}
