//! Flow outcomes against the real kernel: a healthy TCP Service, one whose
//! backend port is closed (refused), one whose backend is blackholed for
//! TCP and one for UDP (unanswered), and a healthy UDP Service; each
//! Service's outcome count equals the nft counter of its ClusterIP's DNAT
//! rule, and the outcomes add up to the flows counted. Needs root.

mod common;

use std::time::{Duration, Instant};

use common::exporter::{get, promtool_check, start, total};
use common::netns::kernel_tests_possible;
use common::traffic::{nft_counter, service_node, udp_client};

const RULESET: &str = r#"
table inet ctm_test {
    counter healthy {}
    counter refused {}
    counter dark_tcp {}
    counter dark_udp {}
    counter dns {}
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.2.1 tcp dport 80 counter name healthy dnat ip to 10.200.2.2:8080
        ip daddr 10.96.2.2 tcp dport 80 counter name refused dnat ip to 10.200.2.2:9999
        ip daddr 10.96.2.3 tcp dport 80 counter name dark_tcp dnat ip to 10.200.3.2:8080
        ip daddr 10.96.2.4 udp dport 53 counter name dark_udp dnat ip to 10.200.3.2:5354
        ip daddr 10.96.2.5 udp dport 53 counter name dns dnat ip to 10.200.3.2:5353
    }
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// `n` TCP connections to `vip:80` at once, each given up after 0.5 s
/// whatever happened (answered, refused or silent), with one request on
/// the answered ones.
fn tcp_attempts(n: usize, vip: &str) -> String {
    format!(
        r#"
import socket, select, time, errno
socks = []
for i in range({n}):
    s = socket.socket(); s.setblocking(False); s.bind(("0.0.0.0", 0))
    s.connect_ex(("{vip}", 80)); socks.append(s)
deadline = time.time() + 0.5
pending = list(socks)
while pending and time.time() < deadline:
    _, w, _ = select.select([], pending, [], max(0, deadline - time.time()))
    for s in w:
        pending.remove(s)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            s.setblocking(True); s.settimeout(2)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while s.recv(4096): pass
for s in socks: s.close()
print("done", flush=True)
"#
    )
}

const FLOWS: &str = "conntrack_monitoring_service_flows_total";
const DURATION: &str = "conntrack_monitoring_service_duration_seconds_count";

#[test]
fn each_outcome_is_counted_as_the_kernel_saw_it() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = service_node(RULESET);
    let b2 = vn.backend2.clone();
    // The blackholes, past the node (which forwards and so confirms the
    // flows): a backend that takes packets and never answers, as a dead
    // node's pod or a NetworkPolicy drop there. (A drop on the node itself,
    // before the flow is confirmed, leaves no conntrack entry at all.)
    let nft = |args: &[&str]| {
        let mut argv = vec!["nft"];
        argv.extend_from_slice(args);
        vn.exec(&b2, &argv);
    };
    nft(&["add", "table", "inet", "dark"]);
    nft(&[
        "add",
        "chain",
        "inet",
        "dark",
        "in",
        "{ type filter hook input priority 0 ; }",
    ]);
    nft(&[
        "add", "rule", "inet", "dark", "in", "tcp", "dport", "8080", "drop",
    ]);
    nft(&[
        "add", "rule", "inet", "dark", "in", "udp", "dport", "5354", "drop",
    ]);
    const PORT: u16 = 9130;
    let _out = start(&mut vn, PORT, &["--service-labels", "--service-names=off"]);
    let client = vn.client.clone();
    for (n, vip) in [(40, "10.96.2.1"), (30, "10.96.2.2"), (20, "10.96.2.3")] {
        let out = vn.exec(&client, &["python3", "-c", &tcp_attempts(n, vip)]);
        assert_eq!(out.trim(), "done");
    }
    let out = vn.exec(
        &client,
        &["python3", "-c", &udp_client(60, "10.96.2.5", 53, 20_000)],
    );
    assert_eq!(out.trim(), "done");
    // Unanswered UDP: datagrams into the blackhole.
    let dark = "import socket\nfor p in range(21000, 21025):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', p)); s.sendto(b'q', ('10.96.2.4', 53)); s.close()\nprint('done')";
    assert_eq!(vn.exec(&client, &["python3", "-c", dark]).trim(), "done");
    vn.end_flows();

    let counted = |name: &str| nft_counter(&vn, "inet ctm_test", name);
    let cases = [
        ("healthy", "10.96.2.1", "tcp", "answered"),
        ("refused", "10.96.2.2", "tcp", "refused"),
        ("dark_tcp", "10.96.2.3", "tcp", "unanswered"),
        ("dark_udp", "10.96.2.4", "udp", "unanswered"),
        ("dns", "10.96.2.5", "udp", "answered"),
    ];
    let flows: f64 = cases.iter().map(|c| counted(c.0)).sum();
    assert_eq!(
        flows,
        40.0 + 30.0 + 20.0 + 25.0 + 60.0,
        "every attempt is a flow"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let (_, text) = get(&vn, PORT, "/metrics", None);
        if total(&text, FLOWS, &[]) >= flows {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {flows} outcomes counted",
            total(&text, FLOWS, &[])
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for (counter, vip, protocol, outcome) in cases {
        let service = [("service_ip", vip), ("protocol", protocol)];
        let labels = [service[0], service[1], ("outcome", outcome)];
        assert_eq!(
            total(&text, FLOWS, &labels),
            counted(counter),
            "{vip}: {outcome}"
        );
        assert_eq!(
            total(&text, FLOWS, &service),
            counted(counter),
            "{vip}: no other outcome"
        );
    }
    // The identity: one outcome per flow counted; latencies only from the
    // answered.
    assert_eq!(total(&text, FLOWS, &[]), total(&text, DURATION, &[]));
    let seen = "conntrack_monitoring_service_seen_reply_latency_seconds_count";
    assert_eq!(total(&text, seen, &[]), counted("healthy") + counted("dns"));
    promtool_check(&text);
}
