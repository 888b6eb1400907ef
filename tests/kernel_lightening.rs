//! End to end against the real kernel: what lightens the node changes what
//! the exporter receives, never what it measures.
//!
//! - The kernel-side socket filter (on by default) keeps every event of a
//!   flow not to a Service out of the socket, and the events of Service flows
//!   the tracker cannot use; `--readers 2` splits the
//!   Service flows between two sockets, each event reaching exactly one.
//!   Four exporters watch the same traffic at once (no filter, the default,
//!   two readers, no drain delay) and their Service metrics are equal line
//!   for line.
//! - `--event-mask` makes the kernel build no event at all for flows not to
//!   a Service (IPv4 and IPv6). Each exporter owns its table: it is gone
//!   after that exporter exits, also when killed, and a second exporter's
//!   exit leaves the first one's table and mask; the legacy table of
//!   earlier versions is removed at start.
//!
//! Needs root, `ab` (apache2-utils); see `tests/run.sh`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::exporter::{get, scrape_until, start, start_with_env, value, Started};
use common::netns::{kernel_tests_possible, run, VirtualNode};
use common::traffic::{nft_counter, start_backend, udp_client, DUAL_STACK_BACKEND, HTTP_BACKEND};

const P: &str = "conntrack_monitoring_";

/// Service flows: TCP and UDP to 10.96.1.1, UDP to fd00:96::1, all DNAT'd.
/// Other flows: the same backends reached directly. One counter each.
const RULESET: &str = r#"
table inet ctm_test {
    counter svc_tcp {}
    counter svc_udp {}
    counter svc_udp6 {}
    counter direct {}
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 tcp dport 80 counter name svc_tcp dnat ip to 10.200.2.2:8080
        ip daddr 10.96.1.1 udp dport 81 counter name svc_udp dnat ip to 10.200.3.2:5353
        ip6 daddr fd00:96::1 udp dport 81 counter name svc_udp6 dnat ip6 to [fd00:3::2]:5353
        ip daddr { 10.200.2.2, 10.200.3.2 } counter name direct
        ip6 daddr fd00:3::2 counter name direct
    }
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// `n` IPv6 request/response flows to `[host]:port`, each from its own
/// source port starting at `first`.
fn udp6_client(n: usize, host: &str, port: u16, first: u16) -> String {
    format!(
        r#"
import socket
for i in range({n}):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(5)
    s.bind(("::", {first} + i)); s.sendto(b"q", ("{host}", {port})); s.recv(16); s.close()
print("done", flush=True)
"#
    )
}

const SERVICES: &str = "10.96.0.0/16,fd00:96::/112";

/// Flows that passed the rules, by the nft counters.
struct Flows {
    tcp: f64,
    service: f64,
    direct: f64,
}

/// A virtual node with the ruleset and backends, short timeouts.
fn node() -> VirtualNode {
    let mut vn = VirtualNode::new();
    vn.short_timeouts();
    vn.nft(RULESET);
    let (b1, b2) = (vn.backend.clone(), vn.backend2.clone());
    start_backend(&mut vn, &b1, HTTP_BACKEND);
    start_backend(&mut vn, &b2, DUAL_STACK_BACKEND);
    // Neighbour discovery first: a flow's first IPv6 packet can otherwise
    // wait in the node past the 1 s UDP timeout, and its reply then makes a
    // flow of its own. (Before any exporter starts: no events for these.)
    vn.exec(&vn.node, &["python3", "-c", NEIGHBOURS]);
    // Those datagrams' flows end now, before any exporter listens.
    vn.exec(&vn.node, &["conntrack", "-F"]);
    vn
}

/// One datagram from the node to each host (port 9, discard): the node,
/// and each host, learn their neighbours' link addresses.
const NEIGHBOURS: &str = r#"
import socket, time
for fam, addr in ((socket.AF_INET6, "fd00:1::2"), (socket.AF_INET6, "fd00:2::2"),
                  (socket.AF_INET6, "fd00:3::2"), (socket.AF_INET, "10.200.1.2"),
                  (socket.AF_INET, "10.200.2.2"), (socket.AF_INET, "10.200.3.2")):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.sendto(b"x", (addr, 9)); s.close()
time.sleep(0.5)
"#;

/// Service and direct traffic, IPv4 and IPv6, then a flush that ends every
/// flow at once.
fn drive(vn: &VirtualNode) -> Flows {
    let client = vn.client.clone();
    for url in ["http://10.96.1.1:80/", "http://10.200.2.2:8080/"] {
        vn.exec(&client, &["ab", "-q", "-n", "400", "-c", "20", url]);
    }
    for script in [
        udp_client(150, "10.96.1.1", 81, 10_000),
        udp_client(100, "10.200.3.2", 5353, 12_000),
        udp6_client(60, "fd00:96::1", 81, 14_000),
        udp6_client(40, "fd00:3::2", 5353, 15_000),
    ] {
        assert_eq!(vn.exec(&client, &["python3", "-c", &script]).trim(), "done");
    }
    std::thread::sleep(Duration::from_millis(1500));
    vn.exec(&vn.node, &["conntrack", "-F"]);
    let c = |name: &str| nft_counter(vn, "inet ctm_test", name);
    let flows = Flows {
        tcp: c("svc_tcp"),
        service: c("svc_tcp") + c("svc_udp") + c("svc_udp6"),
        direct: c("direct"),
    };
    assert!(flows.tcp >= 400.0 && flows.direct >= 400.0 + 100.0 + 40.0);
    assert_eq!(c("svc_udp6"), 60.0);
    flows
}

fn n(name: &str) -> String {
    format!("{P}{name}{{node=\"n1\"}}")
}

fn events(text: &str, ty: &str) -> f64 {
    value(
        text,
        &format!("{P}events_total{{node=\"n1\",type=\"{ty}\"}}"),
    )
}

/// Every Service sample line (name with labels, value), in order.
fn service_lines(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{P}service_")))
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap();
            (series.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// The two scrapes' Service lines are equal; sums may differ in the last
/// bits (float additions in another order).
fn assert_same_service_metrics(a: &str, b: &str, what: &str) {
    let (la, lb) = (service_lines(a), service_lines(b));
    assert!(la.len() > 50, "{what}: {} Service lines", la.len());
    assert_eq!(la.len(), lb.len(), "{what}");
    for ((sa, va), (sb, vb)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb, "{what}");
        let close = (va - vb).abs() <= 1e-9 * va.abs().max(vb.abs());
        assert!(close, "{what}: {sa} {va} vs {vb}");
    }
}

/// The Service families' counts all equal the flows that passed the rules.
fn assert_every_service_flow_measured(text: &str, flows: &Flows, what: &str) {
    let (all, tcp) = (flows.service, flows.tcp);
    assert_eq!(
        value(text, &n("service_duration_seconds_count")),
        all,
        "{what}"
    );
    assert_eq!(
        value(text, &n("service_seen_reply_latency_seconds_count")),
        all,
        "{what}"
    );
    assert_eq!(
        value(text, &n("service_TCP_FIN_latency_seconds_count")),
        tcp,
        "{what}"
    );
    for dir in ["to-svc", "from-svc"] {
        let series = format!("{P}service_bytes_count{{direction=\"{dir}\",node=\"n1\"}}");
        assert_eq!(value(text, &series), all, "{what} {dir}");
    }
    assert_eq!(value(text, &n("netlink_overruns_total")), 0.0, "{what}");
    assert_eq!(value(text, &n("kernel_filter_misses_total")), 0.0, "{what}");
    let order = format!("{P}errors_total{{node=\"n1\",type=\"events order\"}}");
    assert_eq!(value(text, &order), 0.0, "{what}");
}

#[test]
fn the_socket_filter_and_two_readers_change_what_is_received_not_what_is_measured() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = node();
    let svc = ["--svc-subnet", SERVICES];
    let (unfiltered, filtered, two, immediate) = (9111, 9112, 9113, 9114);
    let _a = start(
        &mut vn,
        unfiltered,
        &[&svc[..], &["--no-socket-filter"]].concat(),
    );
    let _b = start(&mut vn, filtered, &svc);
    let _c = start(&mut vn, two, &[&svc[..], &["--readers", "2"]].concat());
    let _d = start(
        &mut vn,
        immediate,
        &[&svc[..], &["--drain-delay-us", "0"]].concat(),
    );
    let flows = drive(&vn);
    let count = n("service_duration_seconds_count");
    let [a, b, c, d] = [unfiltered, filtered, two, immediate].map(|port| {
        scrape_until(&vn, port, &count, flows.service);
        // Late events of the flush may still be coming: settle.
        std::thread::sleep(Duration::from_millis(300));
        get(&vn, port, "/metrics", None).1
    });
    for (text, what) in [
        (&a, "unfiltered"),
        (&b, "filtered"),
        (&c, "two readers"),
        (&d, "no drain delay"),
    ] {
        assert_every_service_flow_measured(text, &flows, what);
    }

    // Unfiltered: every flow's DESTROY arrives. Filtered: only the Service
    // flows' events do, one DESTROY each.
    assert!(
        events(&a, "destroy") >= flows.service + flows.direct,
        "{}",
        events(&a, "destroy")
    );
    assert_eq!(events(&b, "destroy"), flows.service);
    // And of those only what the tracker may use: no NEW (none shows a
    // reply), and fewer UPDATEs (none after ASSURED in an open state).
    assert!(events(&a, "new") >= flows.service);
    assert_eq!(events(&b, "new"), 0.0);
    assert!(0.0 < events(&b, "update") && events(&b, "update") < events(&a, "update"));
    // Two readers: each got some, and together exactly what one reader got.
    let datagrams = |text: &str, reader: u32| {
        value(
            text,
            &format!("{P}reader_datagrams_total{{node=\"n1\",reader=\"{reader}\"}}"),
        )
    };
    let (r0, r1) = (datagrams(&c, 0), datagrams(&c, 1));
    assert!(r0 > 0.0 && r1 > 0.0, "{r0} + {r1}");
    assert_eq!(r0 + r1, datagrams(&b, 0));
    for ty in ["new", "update", "destroy"] {
        assert_eq!(events(&c, ty), events(&b, ty), "{ty}");
    }

    // The same events, so the same Service metrics, line for line.
    assert_same_service_metrics(&a, &b, "unfiltered vs filtered");
    assert_same_service_metrics(&b, &c, "one reader vs two");
    // Reading 1 ms late (the default) or at once changes nothing: every
    // moment is the kernel's stamp.
    assert_same_service_metrics(&b, &d, "--drain-delay-us 1000 (default) vs 0");
}

fn tables(vn: &VirtualNode) -> String {
    vn.exec(&vn.node, &["nft", "list", "tables"])
}

/// Whether `table` ("inet NAME") is in the node's ruleset.
fn listed(vn: &VirtualNode, table: &str) -> bool {
    let want = format!("table {table}");
    tables(vn).lines().any(|l| l.trim() == want)
}

/// The table the exporter says it set ("inet NAME").
fn own_table(started: &Started) -> String {
    let line = started
        .startup
        .iter()
        .find(|l| l.contains("--event-mask: table "))
        .unwrap_or_else(|| panic!("no table in {:?}", started.startup));
    let rest = &line[line.find("table ").unwrap() + "table ".len()..];
    rest.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(':')
        .to_string()
}

/// Stops the exporter `pid` with SIGTERM; it must exit 0 within 3 s.
fn stop(vn: &mut VirtualNode, pid: u32) {
    run(&["kill", "-TERM", &pid.to_string()]);
    let status = vn.wait_child(pid, Duration::from_secs(3)).expect("exited");
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_event_mask_stops_events_of_other_flows_and_goes_away_with_the_exporter() {
    if !kernel_tests_possible() {
        return;
    }
    // Without the mask (and without the socket filter, to see everything
    // the kernel builds): the other flows' events arrive.
    let mut plain = node();
    let args = ["--svc-subnet", SERVICES, "--no-socket-filter"];
    let _x = start(&mut plain, 9121, &args);
    let flows_plain = drive(&plain);
    let text_plain = scrape_until(
        &plain,
        9121,
        &n("service_duration_seconds_count"),
        flows_plain.service,
    );
    assert_every_service_flow_measured(&text_plain, &flows_plain, "no mask");
    assert!(events(&text_plain, "destroy") >= flows_plain.service + flows_plain.direct);
    drop(plain);

    // With the mask: the kernel builds events for the Service flows only.
    let mut vn = node();
    let masked = start_with_env(&mut vn, 9122, &[], &[&args[..], &["--event-mask"]].concat());
    let table = own_table(&masked);
    assert!(
        table.starts_with("inet conntrack_metrics_") && listed(&vn, &table),
        "{table}: {}",
        tables(&vn)
    );
    let flows = drive(&vn);
    let count = n("service_duration_seconds_count");
    scrape_until(&vn, 9122, &count, flows.service);
    std::thread::sleep(Duration::from_millis(300));
    let text = get(&vn, 9122, "/metrics", None).1;
    assert_every_service_flow_measured(&text, &flows, "event mask");
    assert_eq!(events(&text, "new"), flows.service, "no NEW of other flows");
    assert_eq!(
        events(&text, "destroy"),
        flows.service,
        "no DESTROY of other flows"
    );
    // Same Service families, each count equal to its own run's flows.
    let names = |t: &str| -> Vec<String> { service_lines(t).into_iter().map(|(s, _)| s).collect() };
    assert_eq!(names(&text), names(&text_plain));
    // Fewer UPDATEs too: only REPLY and PROTOINFO changes are built.
    assert!(events(&text, "update") < events(&text_plain, "update"));

    // SIGTERM: the exporter's table goes with it.
    stop(&mut vn, masked.pid);
    assert!(
        !tables(&vn).contains("conntrack_metrics"),
        "{}",
        tables(&vn)
    );
}

#[test]
fn a_second_exporter_leaves_the_first_ones_table_and_mask_when_it_stops() {
    if !kernel_tests_possible() {
        return;
    }
    // Both mask and see every event the kernel builds (no socket filter):
    // what reaches the first shows what its table still masks.
    let mut vn = node();
    let args = [
        "--svc-subnet",
        SERVICES,
        "--no-socket-filter",
        "--event-mask",
    ];
    let first = start_with_env(&mut vn, 9131, &[], &args);
    let second = start_with_env(&mut vn, 9132, &[], &args);
    let (table1, table2) = (own_table(&first), own_table(&second));
    assert!(
        listed(&vn, &table1) && listed(&vn, &table2),
        "{table1}, {table2}: {}",
        tables(&vn)
    );

    // The second stops (a rolling update's old pod, a test run ending).
    stop(&mut vn, second.pid);
    assert!(
        listed(&vn, &table1),
        "the first exporter's table {table1} went with the second: {}",
        tables(&vn)
    );
    // (So the two tables have different names.)
    assert!(!listed(&vn, &table2), "{}", tables(&vn));

    // One connection through the ClusterIP, one straight to the backend.
    let client = vn.client.clone();
    for url in ["http://10.96.1.1:80/", "http://10.200.2.2:8080/"] {
        let body = vn.exec(&client, &["curl", "-s", "-m", "5", url]);
        assert!(body.contains("hello"), "{url}: {body}");
    }
    vn.exec(&vn.node, &["conntrack", "-F"]);
    let c = |name: &str| nft_counter(&vn, "inet ctm_test", name);
    assert_eq!((c("svc_tcp"), c("direct")), (1.0, 1.0));
    let count = n("service_duration_seconds_count");
    scrape_until(&vn, 9131, &count, 1.0);
    std::thread::sleep(Duration::from_millis(300));
    let text = get(&vn, 9131, "/metrics", None).1;
    // The Service flow is measured, and the direct one is still masked:
    // the kernel built no event for it.
    assert_eq!(value(&text, &count), 1.0);
    assert_eq!(
        value(&text, &n("service_TCP_FIN_latency_seconds_count")),
        1.0
    );
    assert_eq!(events(&text, "new"), 1.0, "no NEW of the direct flow");
    assert_eq!(
        events(&text, "destroy"),
        1.0,
        "no DESTROY of the direct flow"
    );
    stop(&mut vn, first.pid);
    assert!(!listed(&vn, &table1), "{}", tables(&vn));
}

#[test]
fn a_killed_exporters_table_goes_with_it() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    let started = start_with_env(&mut vn, 9141, &[], &["--event-mask"]);
    let table = own_table(&started);
    assert!(listed(&vn, &table), "{}", tables(&vn));
    run(&["kill", "-KILL", &started.pid.to_string()]);
    vn.wait_child(started.pid, Duration::from_secs(3))
        .expect("killed");
    // Its nft -i reads end of file and exits; the kernel then deletes the
    // table it owned.
    let deadline = Instant::now() + Duration::from_secs(2);
    while listed(&vn, &table) {
        assert!(
            Instant::now() < deadline,
            "{table} still there 2 s after its exporter was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_owner_killed_on_its_own_is_seen_and_said() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    const PORT: u16 = 9142;
    let started = start_with_env(&mut vn, PORT, &[], &["--event-mask"]);
    let table = own_table(&started);
    let held = "conntrack_monitoring_event_mask_held{node=\"n1\"}";
    let (_, text) = get(&vn, PORT, "/metrics", None);
    assert_eq!(value(&text, held), 1.0);
    // Someone kills the nft -i child alone: the table goes with it.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", started.pid)).unwrap();
    let nft = children
        .split_whitespace()
        .next()
        .expect("the nft -i child");
    run(&["kill", "-KILL", nft]);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        // The render cache may hold a body up to 250 ms old.
        std::thread::sleep(Duration::from_millis(300));
        let (_, text) = get(&vn, PORT, "/metrics", None);
        if value(&text, held) == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still held after its owner was killed"
        );
    }
    assert!(!listed(&vn, &table), "{}", tables(&vn));
    let said = started.later.lock().unwrap().clone();
    let warnings: Vec<_> = said.iter().filter(|l| l.contains("is gone")).collect();
    assert_eq!(warnings.len(), 1, "{said:#?}");
}

#[test]
fn the_legacy_table_is_removed_at_start_with_or_without_the_flag() {
    if !kernel_tests_possible() {
        return;
    }
    // As versions before table ownership left it when killed: no owner,
    // masking every new flow.
    const LEGACY: &str = "table inet conntrack_metrics {\n\
        chain prerouting {\n\
            type filter hook prerouting priority -150; policy accept;\n\
            ct state new ct event set 0x0\n\
        }\n\
    }\n";
    let mut vn = VirtualNode::new();
    for (port, flags) in [(9151, &[][..]), (9152, &["--event-mask"][..])] {
        vn.nft(LEGACY);
        assert!(listed(&vn, "inet conntrack_metrics"));
        let started = start_with_env(&mut vn, port, &[], flags);
        assert!(
            !listed(&vn, "inet conntrack_metrics"),
            "{flags:?}: {}",
            tables(&vn)
        );
        assert!(
            started
                .startup
                .iter()
                .any(|l| l.contains("removed table inet conntrack_metrics of an earlier version")),
            "{flags:?}: {:?}",
            started.startup
        );
        stop(&mut vn, started.pid);
    }
}

/// `nft` as it answers on a kernel before 5.12 (no table ownership: an
/// unknown table flag is EINVAL): `-i` reads the commands, refuses them and
/// stays open as nft -i does; every other command finds nothing.
const NFT_WITHOUT_OWNER: &str = r#"#!/bin/sh
case "$1" in
    -i) read -r line
        echo "Error: Could not process rule: Invalid argument" >&2
        echo "$line" >&2
        exec cat > /dev/null ;;
    *) exit 1 ;;
esac
"#;

#[test]
fn without_table_ownership_the_exporter_exits_1_naming_the_requirement() {
    if !kernel_tests_possible() {
        return;
    }
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("ctm-nft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nft = dir.join("nft");
    std::fs::write(&nft, NFT_WITHOUT_OWNER).unwrap();
    std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "PATH={}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut vn = VirtualNode::new();
    let node = vn.node.clone();
    let argv = [
        "env",
        &path,
        env!("CARGO_BIN_EXE_conntrack-metrics"),
        "--node-name",
        "n1",
        "--metrics-bind-address",
        "127.0.0.1:9161",
        "--event-mask",
    ];
    let child = vn.spawn(&node, &argv, Stdio::null(), Stdio::piped());
    let (pid, mut stderr) = (child.id(), child.stderr.take().unwrap());
    // nft's refusal ends the wait at once, well before the 5 s limit.
    let status = vn.wait_child(pid, Duration::from_secs(4));
    let mut text = String::new();
    if status.is_some() {
        stderr.read_to_string(&mut text).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{text}");
    for want in [
        "nft could not create table inet conntrack_metrics_",
        "Invalid argument",
        "flags owner",
        "Linux 5.12 or later",
    ] {
        assert!(text.contains(want), "{want:?} not in: {text}");
    }
}
