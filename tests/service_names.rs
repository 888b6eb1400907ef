//! Service names from kube-proxy's rules, read from the real `nft` and
//! `iptables-save` in a virtual node's namespace. Needs root, nft and
//! iptables (tests/run.sh installs them).
//!
//! The node gets kube-proxy-like rules in both modes (the nftables mode's
//! `service-ips` maps for IPv4 and IPv6, with the chains their elements
//! jump to; the iptables mode's `KUBE-SERVICES` rules, added with
//! kube-proxy's arguments) and some that are not in kube-proxy's format.
//! The names read must be exactly those of the good rules, the others
//! counted, and a namespace without rules has no names and no error.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::netns::{in_netns, kernel_tests_possible, VirtualNode};
use conntrack_metrics::service_names::{
    read_rules, ServiceKey, ServiceNames, SourceRead, SCTP, TCP, UDP,
};
use conntrack_metrics::stats::self_metrics::{SeriesValue, SERVICE_NAMES, SERVICE_NAME_ERRORS};
use conntrack_metrics::stats::shard::ShardSet;
use conntrack_metrics::stats::summary::SummaryWindow;
use conntrack_metrics::stats::Registry;

/// kube-proxy's nftables tables, as its proxier writes them (map type,
/// chain names `service-HASH-NS/NAME/PROTO/PORT`), with two Services (one
/// of them in an IPv6 table too), an external IP, and two elements that
/// do not name a Service the way kube-proxy does.
const NFT_RULES: &str = "
table ip kube-proxy {
    comment \"rules for kube-proxy\"
    map service-ips {
        type ipv4_addr . inet_proto . inet_service : verdict
        comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"
    }
    chain service-ULMVA6XW-web-team/front-end/tcp/http-alt { }
    chain local-4IO6KNF6-kube-system/kube-dns/udp/dns { }
    chain service-QWUBJMSR-kube-system/kube-dns/tcp/dns-tcp { }
    chain external-ULMVA6XW-web-team/front-end/tcp/http-alt { }
    chain service-bogus { }
    chain service-GMHUYNBY-ns/svc/tcp/p80 { }
    chain services {
        ip daddr . meta l4proto . th dport vmap @service-ips
    }
}
table ip6 kube-proxy {
    map service-ips {
        type ipv6_addr . inet_proto . inet_service : verdict
    }
    chain service-HTXDG3XV-web-team/front-end/tcp/http-alt { }
}
add element ip kube-proxy service-ips { 10.96.0.80 . tcp . 8080 : goto service-ULMVA6XW-web-team/front-end/tcp/http-alt }
add element ip kube-proxy service-ips { 10.96.0.10 . udp . 53 : goto local-4IO6KNF6-kube-system/kube-dns/udp/dns }
add element ip kube-proxy service-ips { 10.96.0.10 . tcp . 53 : goto service-QWUBJMSR-kube-system/kube-dns/tcp/dns-tcp }
add element ip kube-proxy service-ips { 192.0.2.80 . tcp . 8080 : goto external-ULMVA6XW-web-team/front-end/tcp/http-alt }
add element ip kube-proxy service-ips { 10.96.0.30 . tcp . 80 : goto service-bogus }
add element ip kube-proxy service-ips { 10.96.0.31 . udp . 80 : goto service-GMHUYNBY-ns/svc/tcp/p80 }
add element ip6 kube-proxy service-ips { fd00:96::80 . tcp . 8080 : goto service-HTXDG3XV-web-team/front-end/tcp/http-alt }
";

/// Adds kube-proxy's iptables-mode rules to the node: the Services of
/// `rules` (destination, protocol, port, comment), each with kube-proxy's
/// arguments, in `program`'s nat table.
fn iptables(vn: &VirtualNode, program: &str, rules: &[(&str, &str, &str, &str)]) {
    let nat = |args: &[&str]| {
        let mut argv = vec![program, "-w", "-t", "nat"];
        argv.extend_from_slice(args);
        vn.exec(&vn.node, &argv);
    };
    nat(&["-N", "KUBE-SERVICES"]);
    nat(&["-N", "KUBE-SVC-NPX46M4PTMTKRN6Y"]);
    nat(&["-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
    for (dst, proto, port, comment) in rules {
        let mut args = vec!["-A", "KUBE-SERVICES", "-m", "comment", "--comment", comment];
        args.extend(["-m", proto, "-p", proto, "-d", dst]);
        if !port.is_empty() {
            args.extend(["--dport", port]);
        }
        args.extend(["-j", "KUBE-SVC-NPX46M4PTMTKRN6Y"]);
        nat(&args);
    }
}

fn node_with_rules() -> VirtualNode {
    let vn = VirtualNode::new();
    vn.nft(NFT_RULES);
    iptables(
        &vn,
        "iptables",
        &[
            (
                "10.96.0.1",
                "tcp",
                "443",
                "default/kubernetes:https cluster IP",
            ),
            (
                "10.96.0.77",
                "sctp",
                "3868",
                "diameter-ns/hss:diameter-port cluster IP",
            ),
            (
                "10.96.0.78",
                "tcp",
                "80",
                "legacy-app/unnamed-port cluster IP",
            ),
            (
                "192.0.2.1",
                "tcp",
                "443",
                "default/kubernetes:https external IP",
            ),
            // Quoted once more than iptables-restore would leave it.
            ("10.96.0.40", "tcp", "80", "\"ns1/quoted:http cluster IP\""),
            // A ClusterIP rule without its port.
            ("10.96.0.41", "tcp", "", "ns1/no-port:http cluster IP"),
        ],
    );
    iptables(
        &vn,
        "ip6tables",
        &[(
            "fd00:96::1",
            "tcp",
            "443",
            "default/kubernetes:https cluster IP",
        )],
    );
    vn
}

/// A source's names as "ADDR NAMESPACE/NAME", sorted.
fn names(source: &SourceRead) -> Vec<String> {
    let mut out: Vec<String> = source
        .names
        .iter()
        .map(|(a, n)| format!("{a} {n}"))
        .collect();
    out.sort();
    out
}

#[test]
fn names_come_from_both_modes_and_malformed_rules_are_counted() {
    if !kernel_tests_possible() {
        return;
    }
    let vn = node_with_rules();
    let read = in_netns(&vn.node, read_rules);

    let nft = &read.nftables;
    assert!(nft.found && nft.failed.is_empty(), "{nft:?}");
    assert_eq!(
        names(nft),
        [
            "10.96.0.10:53/tcp kube-system/kube-dns",
            "10.96.0.10:53/udp kube-system/kube-dns",
            "10.96.0.80:8080/tcp web-team/front-end",
            "[fd00:96::80]:8080/tcp web-team/front-end",
        ]
    );
    assert_eq!(nft.malformed, 2, "{nft:?}");

    let ipt = &read.iptables;
    assert!(ipt.found && ipt.failed.is_empty(), "{ipt:?}");
    assert_eq!(
        names(ipt),
        [
            "10.96.0.1:443/tcp default/kubernetes",
            "10.96.0.77:3868/sctp diameter-ns/hss",
            "10.96.0.78:80/tcp legacy-app/unnamed-port",
            "[fd00:96::1]:443/tcp default/kubernetes",
        ]
    );
    assert_eq!(ipt.malformed, 2, "{ipt:?}");
    assert!(
        ipt.first_malformed
            .as_deref()
            .is_some_and(|l| l.contains("10.96.0.40/32")),
        "{ipt:?}"
    );
}

#[test]
fn a_node_without_kube_proxy_rules_has_no_names_and_no_errors() {
    if !kernel_tests_possible() {
        return;
    }
    let vn = VirtualNode::new();
    let read = in_netns(&vn.client, read_rules);
    for source in [&read.nftables, &read.iptables] {
        assert!(
            !source.found
                && source.names.is_empty()
                && source.failed.is_empty()
                && source.malformed == 0
                && !source.absent.is_empty(),
            "{source:?}"
        );
    }
}

/// A self-metric's value for `labels`, as text ("" if it has none).
fn series(registry: &Registry, family: &str, labels: &[(&str, &str)]) -> String {
    let mut out = String::new();
    registry.self_metrics().for_each(|f| {
        if f.name() != family {
            return;
        }
        for (got, value) in f.series() {
            let same = got.len() == labels.len()
                && got
                    .iter()
                    .zip(labels)
                    .all(|((k, v), (lk, lv))| k == lk && v == lv);
            if same {
                out = match value {
                    SeriesValue::Counter(n) => n.to_string(),
                    SeriesValue::Gauge(g) => g.to_string(),
                    SeriesValue::Histogram { .. } => "histogram".into(),
                };
            }
        }
    });
    out
}

#[test]
fn start_names_services_before_it_returns_and_counts_problems() {
    if !kernel_tests_possible() {
        return;
    }
    let vn = node_with_rules();
    let registry = Registry::new(ShardSet::new(1, SummaryWindow::from_minutes(10)));
    let recorder = registry.recorder();
    // The first read is on the calling thread, under the local recorder;
    // the refresh thread's next read is an hour away.
    let names: Arc<ServiceNames> = in_netns(&vn.node, move || {
        metrics::with_local_recorder(&recorder, || ServiceNames::start(Duration::from_secs(3600)))
    });
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let found = |addr: &str, port, proto| {
        names
            .lookup(ServiceKey {
                addr: ip(addr),
                port,
                proto,
            })
            .map(|n| format!("{}/{}", n.namespace, n.name))
    };
    assert_eq!(
        found("10.96.0.10", 53, UDP).as_deref(),
        Some("kube-system/kube-dns")
    );
    assert_eq!(
        found("fd00:96::80", 8080, TCP).as_deref(),
        Some("web-team/front-end")
    );
    assert_eq!(
        found("10.96.0.77", 3868, SCTP).as_deref(),
        Some("diameter-ns/hss")
    );
    assert_eq!(found("10.96.0.77", 3868, TCP), None);
    assert_eq!(
        found("192.0.2.80", 8080, TCP),
        None,
        "external IPs stay unnamed"
    );
    assert_eq!(names.table().len(), 8);

    let nft = [("source", "nftables")];
    let ipt = [("source", "iptables")];
    // Services, not addresses: kube-dns and front-end; kubernetes, hss, unnamed-port.
    assert_eq!(series(&registry, SERVICE_NAMES, &nft), "2");
    assert_eq!(series(&registry, SERVICE_NAMES, &ipt), "3");
    for (source, malformed) in [("nftables", "2"), ("iptables", "2")] {
        let labels = [("source", source), ("reason", "malformed")];
        assert_eq!(series(&registry, SERVICE_NAME_ERRORS, &labels), malformed);
        let labels = [("source", source), ("reason", "read failed")];
        assert_eq!(series(&registry, SERVICE_NAME_ERRORS, &labels), "0");
    }
}
