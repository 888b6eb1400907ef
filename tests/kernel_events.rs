//! End to end against the real kernel: the binary, subscribed inside a
//! virtual node's namespace, decodes the events this kernel emits for TCP,
//! UDP and ICMP flows through DNAT'd ClusterIPs over IPv4 and IPv6 (the
//! captures under `tests/fixtures/` hold IPv4 TCP and UDP only), and for a
//! flow without DNAT. Needs root; see `tests/run.sh`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::netns::{kernel_tests_possible, VirtualNode};
use common::traffic::{start_backend, DUAL_STACK_BACKEND};

const RULESET: &str = r#"
table inet ctm_test {
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.0.10 udp dport 53 dnat ip to 10.200.2.2:5353
        ip daddr 10.96.0.10 tcp dport 80 dnat ip to 10.200.2.2:8080
        ip daddr 10.96.0.10 icmp type echo-request dnat ip to 10.200.2.2
        ip6 daddr fd00:96::10 udp dport 53 dnat ip6 to [fd00:2::2]:5353
        ip6 daddr fd00:96::10 tcp dport 80 dnat ip6 to [fd00:2::2]:8080
        ip6 daddr fd00:96::10 icmpv6 type echo-request dnat ip6 to fd00:2::2
    }
}
"#;

/// One flow of each kind through the ClusterIPs, each waiting for its answer,
/// plus an unreplied UDP datagram to the node's own address (no DNAT).
const CLIENT: &str = r#"
import socket, struct, time
def udp(fam, vip):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(b"query", (vip, 53)); assert s.recv(100) == b"query"; s.close()
def tcp(fam, vip):
    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(3)
    s.connect((vip, 80)); s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(100)
        if not chunk: break
        data += chunk
    assert data.endswith(b"hello"); s.close()
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
def ping(fam, proto, kind, vip):
    s = socket.socket(fam, socket.SOCK_RAW, proto); s.settimeout(3)
    hdr = struct.pack("!BBHHH", kind, 0, 0, 0x4d2, 1) + b"ping"
    if fam == socket.AF_INET:
        hdr = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
    s.sendto(hdr, (vip, 0))
    deadline = time.time() + 3
    while time.time() < deadline:
        data = s.recv(200)
        if fam == socket.AF_INET: data = data[20:]
        if data[0] in (0, 129): break
    else:
        raise SystemExit("no echo reply from " + vip)
udp(socket.AF_INET, "10.96.0.10"); udp(socket.AF_INET6, "fd00:96::10")
tcp(socket.AF_INET, "10.96.0.10"); tcp(socket.AF_INET6, "fd00:96::10")
ping(socket.AF_INET, socket.IPPROTO_ICMP, 8, "10.96.0.10")
ping(socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, "fd00:96::10")
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("10.200.1.1", 9))
print("done", flush=True)
"#;

/// One printed event: `[KIND] key=value ... orig: key=value ... reply: ...`,
/// split into the kind and a map per section (`""`, `orig`, `reply`, ...).
#[derive(Debug)]
struct Printed {
    kind: String,
    fields: HashMap<String, HashMap<String, String>>,
}

impl Printed {
    fn parse(line: &str) -> Printed {
        let mut words = line.split_whitespace();
        let kind = words.next().unwrap().trim_matches(['[', ']']).to_string();
        let mut fields: HashMap<String, HashMap<String, String>> = HashMap::new();
        let mut section = String::new();
        for w in words {
            if let Some(s) = w.strip_suffix(':') {
                section = s.to_string();
            } else if let Some((k, v)) = w.split_once('=') {
                fields
                    .entry(section.clone())
                    .or_default()
                    .insert(k.into(), v.into());
            }
        }
        Printed { kind, fields }
    }

    fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.fields.get(section)?.get(key).map(String::as_str)
    }

    fn status(&self) -> u32 {
        u32::from_str_radix(self.get("", "status").unwrap().trim_start_matches("0x"), 16).unwrap()
    }
}

const SEEN_REPLY: u32 = 1 << 1;
const DST_NAT: u32 = 1 << 5;

#[test]
fn live_kernel_events_decode_for_tcp_udp_icmp_over_ipv4_and_ipv6() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    vn.nft(RULESET);

    let backend = vn.backend.clone();
    start_backend(&mut vn, &backend, DUAL_STACK_BACKEND);

    let node = vn.node.clone();
    // Every event, not only the Service flows' the kernel filter lets through.
    let stdout = common::exporter::start(&mut vn, 9100, &["--print-events", "--no-socket-filter"]);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });

    let client = vn.client.clone();
    assert_eq!(vn.exec(&client, &["python3", "-c", CLIENT]).trim(), "done");
    // Let the TCP closes reach TIME_WAIT, then flush: every flow's DESTROY
    // comes at once instead of after its timeout.
    std::thread::sleep(Duration::from_millis(300));
    vn.exec(&node, &["conntrack", "-F"]);

    // 2 UDP (NEW, UPDATE, DESTROY), 2 TCP (NEW, >=4 UPDATE, DESTROY), 2 ICMP
    // (NEW, UPDATE, DESTROY), 1 unreplied UDP (NEW, DESTROY): wait for all
    // seven DESTROYs.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while events
        .iter()
        .filter(|e: &&Printed| e.kind == "DESTROY")
        .count()
        < 7
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                assert!(!line.starts_with("[MALFORMED]"), "{line}");
                events.push(Printed::parse(&line));
            }
            Err(_) => panic!("timed out; events so far: {events:#?}"),
        }
    }

    let flow = |proto: &str, vip: &str| -> Vec<&Printed> {
        events
            .iter()
            .filter(|e| e.get("orig", "proto") == Some(proto) && e.get("orig", "dst") == Some(vip))
            .collect()
    };

    for (vip, backend, family) in [
        ("10.96.0.10", "10.200.2.2", "2"),
        ("fd00:96::10", "fd00:2::2", "10"),
    ] {
        // UDP request/response: NEW, UPDATE with SEEN_REPLY, DESTROY with counters.
        let udp = flow("17", vip);
        let kinds: Vec<&str> = udp.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["NEW", "UPDATE", "DESTROY"], "udp {vip}: {udp:#?}");
        for e in &udp {
            assert_eq!(e.get("", "family"), Some(family));
            assert_eq!(e.get("orig", "dport"), Some("53"));
            assert_eq!(e.get("reply", "src"), Some(backend));
            assert_eq!(e.get("reply", "sport"), Some("5353"));
            assert!(e.status() & DST_NAT != 0);
            assert!(
                e.get("", "event_ns").is_some(),
                "kernel 6.14+ stamps every event: {e:?}"
            );
            assert_eq!(e.get("", "id"), udp[0].get("", "id"));
        }
        assert!(udp[1].status() & SEEN_REPLY != 0);
        // 5-byte payload + UDP header 8 + IP header 20 (IPv4) or 40 (IPv6).
        let l3 = if family == "2" { 20 } else { 40 };
        let bytes = (5 + 8 + l3).to_string();
        for dir in ["counters_orig", "counters_reply"] {
            assert_eq!(udp[2].get(dir, "packets"), Some("1"), "{dir}");
            assert_eq!(udp[2].get(dir, "bytes"), Some(bytes.as_str()), "{dir}");
        }
        let start: u64 = udp[2].get("timestamp", "start").unwrap().parse().unwrap();
        let stop: u64 = udp[2].get("timestamp", "stop").unwrap().parse().unwrap();
        assert!(stop >= start);

        // TCP: NEW in SYN_SENT, SYN_RECV then ESTABLISHED, a closing state, DESTROY.
        let tcp = flow("6", vip);
        let states: Vec<&str> = tcp.iter().map(|e| e.get("", "state").unwrap()).collect();
        assert_eq!(tcp[0].kind, "NEW");
        assert_eq!(
            &states[..3],
            ["SYN_SENT", "SYN_RECV", "ESTABLISHED"],
            "tcp {vip}"
        );
        assert!(states
            .iter()
            .any(|s| ["FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT"].contains(s)));
        let destroy = tcp.last().unwrap();
        assert_eq!(destroy.kind, "DESTROY", "{tcp:#?}");
        assert_eq!(destroy.get("reply", "sport"), Some("8080"));
        let sent: u64 = destroy
            .get("counters_orig", "packets")
            .unwrap()
            .parse()
            .unwrap();
        assert!(sent >= 4, "SYN, ACK, request, FIN at least: {sent}");

        // ICMP echo: type 8 / 128, code 0, our id 0x4d2, answered by the backend.
        let proto = if family == "2" { "1" } else { "58" };
        let icmp = flow(proto, vip);
        assert_eq!(
            icmp.first().map(|e| e.kind.as_str()),
            Some("NEW"),
            "icmp {vip}: {icmp:#?}"
        );
        let echo_type = if family == "2" { "8" } else { "128" };
        assert_eq!(icmp[0].get("orig", "icmp_type"), Some(echo_type));
        assert_eq!(icmp[0].get("orig", "icmp_code"), Some("0"));
        assert_eq!(icmp[0].get("orig", "icmp_id"), Some("1234"));
        assert_eq!(icmp[0].get("reply", "src"), Some(backend));
        assert!(icmp.iter().any(|e| e.status() & SEEN_REPLY != 0));
        assert_eq!(icmp.last().unwrap().kind, "DESTROY");
    }

    // No DNAT: the reply comes from the address the client sent to.
    let plain = flow("17", "10.200.1.1");
    let kinds: Vec<&str> = plain.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["NEW", "DESTROY"]);
    assert!(plain
        .iter()
        .all(|e| e.status() & (DST_NAT | SEEN_REPLY) == 0));
    assert_eq!(plain[0].get("reply", "src"), Some("10.200.1.1"));
}
