//! End to end against the real kernel: the socket filter of
//! `offload::bpf::service_event_filter`, attached to a conntrack socket in a
//! virtual node's namespace, lets through exactly the events of Service
//! flows (every one of them, and nothing else) for IPv4 and IPv6 Service
//! subnets, or with `FlowEvents::Used` exactly those of them the flow tracker
//! may use; and two readers sharing the flows get disjoint halves whose union
//! is every such event. Each filtered socket is compared with an
//! unfiltered one opened at the same time on the same traffic: DNAT'd flows
//! to ClusterIPs, flows straight to a backend address, flows to a ClusterIP
//! in an excluded subnet, over both families. Needs root; see `tests/run.sh`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use conntrack_metrics::flow::ReaderShare;
use conntrack_metrics::flow::{tracker_may_use, ServiceFilter, Subnet};
use conntrack_metrics::offload::bpf::{service_event_filter, FlowEvents};
use conntrack_metrics::sys::filter::attach_filter;
use conntrack_metrics::sys::{ConntrackSocket, EventGroups, RecvBatch, RecvError};
use conntrack_metrics::wire::{EventKind, Message};

use common::netns::{in_netns, kernel_tests_possible, VirtualNode};
use common::traffic::{start_backend, DUAL_STACK_BACKEND};

const RULESET: &str = r#"
table inet ctm_filter {
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.0.10 udp dport 53 dnat ip to 10.200.2.2:5353
        ip daddr 10.96.0.10 tcp dport 80 dnat ip to 10.200.2.2:8080
        ip daddr 10.96.200.10 udp dport 53 dnat ip to 10.200.2.2:5353
        ip6 daddr fd00:96::10 udp dport 53 dnat ip6 to [fd00:2::2]:5353
        ip6 daddr fd00:96::10 tcp dport 80 dnat ip6 to [fd00:2::2]:8080
        ip6 daddr fd00:96::90 udp dport 53 dnat ip6 to [fd00:2::2]:5353
    }
    # Nothing but the test traffic makes flows in the node.
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

/// Per round and family: a UDP flow to the ClusterIP, one straight to the
/// backend, one to the ClusterIP in the excluded subnet; every other round a
/// TCP connection to the ClusterIP and one straight to the backend. Every
/// flow has its own source port, so no two are one conntrack entry.
const CLIENT: &str = r#"
import socket, itertools
ports = itertools.count(30000)
def udp(fam, host, port):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", next(ports)))
    s.sendto(b"query", (host, port)); assert s.recv(100) == b"query"; s.close()
def tcp(fam, host, port):
    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(3)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", next(ports)))
    s.connect((host, port)); s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(100)
        if not chunk: break
        data += chunk
    assert data.endswith(b"hello"); s.close()
for i in range(ROUNDS):
    for fam, vip, backend, excluded in [
        (socket.AF_INET, "10.96.0.10", "10.200.2.2", "10.96.200.10"),
        (socket.AF_INET6, "fd00:96::10", "fd00:2::2", "fd00:96::90"),
    ]:
        udp(fam, vip, 53); udp(fam, backend, 5353); udp(fam, excluded, 53)
        if i % 2 == 0:
            tcp(fam, vip, 80); tcp(fam, backend, 8080)
print("done", flush=True)
"#;

const ROUNDS: usize = 12;
/// Flows per family: three UDP per round, two TCP every other round.
const FLOWS_PER_FAMILY: usize = 3 * ROUNDS + 2 * ROUNDS.div_ceil(2);
/// Service flows per family (the excluded ClusterIP's are not).
const SERVICE_FLOWS_PER_FAMILY: usize = ROUNDS + ROUNDS.div_ceil(2);

fn subnets(list: &[&str]) -> Vec<Subnet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// One socket's datagrams, and whether it overran.
struct Received {
    datagrams: Vec<Vec<u8>>,
    overruns: usize,
}

/// Builds a virtual node, opens one conntrack socket per entry of
/// `filters` in it (`None`: unfiltered) with its filter attached before any
/// traffic, runs the client's flows, flushes the table so every DESTROY
/// comes, and returns what each socket received.
fn traffic(filters: Vec<Option<Vec<libc::sock_filter>>>) -> Vec<Received> {
    let mut vn = VirtualNode::new();
    vn.nft(RULESET);
    let backend = vn.backend.clone();
    start_backend(&mut vn, &backend, DUAL_STACK_BACKEND);

    let sockets = in_netns(&vn.node, move || {
        filters
            .into_iter()
            .map(|filter| {
                let socket = ConntrackSocket::open(EventGroups::ALL, 8 << 20).unwrap();
                if let Some(program) = filter {
                    attach_filter(socket.as_raw_fd(), &program).unwrap();
                }
                socket
            })
            .collect::<Vec<_>>()
    });

    let client = vn.client.clone();
    let script = CLIENT.replace("ROUNDS", &ROUNDS.to_string());
    assert_eq!(vn.exec(&client, &["python3", "-c", &script]).trim(), "done");
    std::thread::sleep(Duration::from_millis(300));
    vn.exec(&vn.node, &["conntrack", "-F"]);

    let mut received: Vec<Received> = sockets
        .iter()
        .map(|_| Received {
            datagrams: Vec::new(),
            overruns: 0,
        })
        .collect();
    let mut batch = RecvBatch::new(64, 8192);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut quiet_since = Instant::now();
    let all_destroyed = |r: &Received| destroys(&r.datagrams) >= 2 * FLOWS_PER_FAMILY;
    loop {
        let mut any = false;
        for (socket, into) in sockets.iter().zip(&mut received) {
            match batch.recv(socket) {
                Ok(_) => {
                    any = true;
                    for d in batch.datagrams() {
                        assert!(!d.truncated);
                        into.datagrams.push(d.bytes.to_vec());
                    }
                }
                Err(RecvError::Overrun) => into.overruns += 1,
                Err(RecvError::WouldBlock) => {}
                Err(RecvError::Io(e)) => panic!("recv: {e}"),
            }
        }
        if any {
            quiet_since = Instant::now();
        } else if all_destroyed(&received[0]) && quiet_since.elapsed() > Duration::from_millis(300)
        {
            break;
        } else {
            assert!(
                Instant::now() < deadline,
                "timed out: the unfiltered socket has {} DESTROY events of {}",
                destroys(&received[0].datagrams),
                2 * FLOWS_PER_FAMILY
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    for (i, r) in received.iter().enumerate() {
        assert_eq!(r.overruns, 0, "socket {i} overran");
    }
    received
}

fn event_kind(datagram: &[u8]) -> Option<EventKind> {
    match Message::parse(datagram) {
        Ok(Message::Event(ev)) => Some(ev.kind),
        _ => None,
    }
}

fn of_kind(datagrams: &[Vec<u8>], kind: EventKind) -> usize {
    datagrams
        .iter()
        .filter(|d| event_kind(d) == Some(kind))
        .count()
}

fn destroys(datagrams: &[Vec<u8>]) -> usize {
    of_kind(datagrams, EventKind::Destroy)
}

/// The datagrams userspace keeps: Service events of `share`'s flows (only
/// those the tracker may use, with [`FlowEvents::Used`]), and anything that
/// is not a conntrack event.
fn userspace_keeps(
    datagrams: &[Vec<u8>],
    filter: &ServiceFilter,
    share: Option<ReaderShare>,
    events: FlowEvents,
) -> Vec<Vec<u8>> {
    datagrams
        .iter()
        .filter(|d| match Message::parse(d).unwrap() {
            Message::Event(ev) => {
                filter.to_service(&ev)
                    && share.is_none_or(|s| s.owns(ev.id))
                    && (events == FlowEvents::All || tracker_may_use(&ev))
            }
            _ => true,
        })
        .cloned()
        .collect()
}

fn sorted(mut datagrams: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    datagrams.sort();
    datagrams
}

/// Checks that `filtered` is exactly what userspace keeps of `unfiltered`
/// (as multisets: delivery order between sockets may differ), with
/// `service_flows` flows destroyed; returns the kept events' conntrack ids.
fn assert_exactly_the_service_events(
    unfiltered: &[Vec<u8>],
    filtered: &[Vec<u8>],
    filter: &ServiceFilter,
    events: FlowEvents,
    service_flows: usize,
) {
    let want = userspace_keeps(unfiltered, filter, None, events);
    assert!(
        want.len() < unfiltered.len(),
        "some events are not Service events"
    );
    assert_eq!(destroys(&want), service_flows);
    let (got_n, want_n) = (filtered.len(), want.len());
    assert!(
        sorted(filtered.to_vec()) == sorted(want),
        "filtered socket got {got_n} datagrams, userspace keeps {want_n} of {}",
        unfiltered.len()
    );
}

/// With the filter for `services` minus `excluded`, a socket receives
/// exactly the Service events an unfiltered one shows, all to `vip`; with
/// [`FlowEvents::Used`], exactly those of them the tracker may use: every
/// DESTROY, no NEW, and some but not all UPDATEs.
fn filter_passes_exactly_the_service_events(services: &[&str], excluded: &[&str], vip: &str) {
    let (services, excluded) = (subnets(services), subnets(excluded));
    let choices = [FlowEvents::All, FlowEvents::Used];
    let programs = choices
        .map(|events| Some(service_event_filter(&services, &excluded, None, events).unwrap()));
    let got = traffic([&[None][..], &programs[..]].concat());
    let filter = ServiceFilter::new(services, excluded);
    for (events, r) in choices.into_iter().zip(&got[1..]) {
        assert_exactly_the_service_events(
            &got[0].datagrams,
            &r.datagrams,
            &filter,
            events,
            SERVICE_FLOWS_PER_FAMILY,
        );
        for d in &r.datagrams {
            let Ok(Message::Event(ev)) = Message::parse(d) else {
                panic!("not an event: {d:?}");
            };
            assert_eq!(ev.orig.and_then(|t| t.dst), vip.parse().ok());
        }
    }
    let (all, used) = (&got[1].datagrams, &got[2].datagrams);
    assert_eq!(of_kind(used, EventKind::New), 0, "no NEW shows a reply");
    assert!(of_kind(all, EventKind::New) >= SERVICE_FLOWS_PER_FAMILY);
    let (all_updates, used_updates) = (
        of_kind(all, EventKind::Update),
        of_kind(used, EventKind::Update),
    );
    assert!(
        0 < used_updates && used_updates < all_updates,
        "{used_updates} of {all_updates} UPDATEs"
    );
}

#[test]
fn an_ipv4_service_filter_passes_exactly_the_service_events() {
    if !kernel_tests_possible() {
        return;
    }
    filter_passes_exactly_the_service_events(&["10.96.0.0/16"], &["10.96.200.0/24"], "10.96.0.10");
}

#[test]
fn an_ipv6_service_filter_passes_exactly_the_service_events() {
    if !kernel_tests_possible() {
        return;
    }
    // A /112 and a /121: both end inside a 32-bit word.
    filter_passes_exactly_the_service_events(
        &["fd00:96::/112"],
        &["fd00:96::80/121"],
        "fd00:96::10",
    );
}

#[test]
fn two_reader_shares_split_the_service_flows() {
    if !kernel_tests_possible() {
        return;
    }
    let services = subnets(&["10.96.0.0/16", "fd00:96::/112"]);
    let excluded = subnets(&["10.96.200.0/24", "fd00:96::80/121"]);
    let shares = [0, 1].map(|i| ReaderShare::new(i, 2).unwrap());
    let mut filters = vec![None];
    for share in shares {
        filters.push(Some(
            service_event_filter(&services, &excluded, Some(share), FlowEvents::Used).unwrap(),
        ));
    }
    let got = traffic(filters);
    let filter = ServiceFilter::new(services, excluded);
    let unfiltered = &got[0].datagrams;

    // Each share gets exactly its flows' Service events...
    for (share, r) in shares.iter().zip(&got[1..]) {
        let want = userspace_keeps(unfiltered, &filter, Some(*share), FlowEvents::Used);
        assert!(!want.is_empty(), "share {share:?} has flows");
        assert!(
            sorted(r.datagrams.clone()) == sorted(want),
            "share {share:?}: got {} datagrams",
            r.datagrams.len()
        );
    }
    // ...so no datagram reaches both, every flow's events reach one reader,
    // and together they are every Service event.
    let firsts: HashSet<&Vec<u8>> = got[1].datagrams.iter().collect();
    assert!(got[2].datagrams.iter().all(|d| !firsts.contains(d)));
    let mut reader_of_flow: BTreeMap<u32, usize> = BTreeMap::new();
    for (reader, r) in got[1..].iter().enumerate() {
        for d in &r.datagrams {
            let Ok(Message::Event(ev)) = Message::parse(d) else {
                panic!("not an event");
            };
            let id = ev.id.unwrap();
            assert_eq!(
                *reader_of_flow.entry(id).or_insert(reader),
                reader,
                "flow {id}"
            );
        }
    }
    assert_eq!(reader_of_flow.len(), 2 * SERVICE_FLOWS_PER_FAMILY);
    let union: Vec<Vec<u8>> = got[1..]
        .iter()
        .flat_map(|r| r.datagrams.iter().cloned())
        .collect();
    assert_exactly_the_service_events(
        unfiltered,
        &union,
        &filter,
        FlowEvents::Used,
        2 * SERVICE_FLOWS_PER_FAMILY,
    );
}
