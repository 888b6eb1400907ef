//! The kernel agrees with userspace: every filter program built here,
//! attached to a socket that sends to itself, passes exactly the messages
//! the userspace rules keep (`ServiceFilter::to_service`, `ReaderShare::owns`,
//! `tracker_may_use`), for captured and synthetic messages and for the
//! longest programs the kernel takes.

use std::net::IpAddr;

use crate::flow::{tracker_may_use_with, ReaderShare, ServiceFilter, Subnet};
use crate::offload::bpf::{listing, service_event_filter, FlowEvents};
use crate::sys::filter::loopback::Loopback;
use crate::wire::ctnetlink::{AF_INET, AF_INET6, CTA_ID, CTA_TUPLE_IP, CTA_TUPLE_ORIG};
use crate::wire::encode::{control, encode, fixture_messages as fixtures, Builder, Form};
use crate::wire::netlink::{NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN};
use crate::wire::{CtEvent, EventKind, Message, Status, Tuple};

fn subnets(list: &[&str]) -> Vec<Subnet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// What userspace makes of `msg`: a conntrack event counts if it goes to
/// a Service, belongs to `share` and (with [`FlowEvents::Used`]) the
/// tracker may use it; every other message is passed on.
fn userspace_keeps(
    msg: &[u8],
    filter: &ServiceFilter,
    share: Option<ReaderShare>,
    events: FlowEvents,
) -> bool {
    match Message::parse(msg).expect("well-formed message") {
        Message::Event(ev) => {
            filter.to_service(&ev)
                && share.is_none_or(|s| s.owns(ev.id))
                && (events == FlowEvents::All
                    || tracker_may_use_with(&ev, events == FlowEvents::UsedLive))
        }
        _ => true,
    }
}

/// Runs every message through the kernel with the filter for
/// (`services`, `excluded`, `share`, `events`) and checks each verdict
/// against userspace's. Returns how many passed.
fn agree(
    messages: &[Vec<u8>],
    services: &[Subnet],
    excluded: &[Subnet],
    share: Option<ReaderShare>,
    events: FlowEvents,
) -> usize {
    let program = service_event_filter(services, excluded, share, events).unwrap();
    let lo = Loopback::new();
    lo.attach(&program);
    let filter = ServiceFilter::new(services.to_vec(), excluded.to_vec());
    let mut passed = 0;
    for (i, msg) in messages.iter().enumerate() {
        let kernel = lo.passes(msg);
        let user = userspace_keeps(msg, &filter, share, events);
        assert_eq!(
            kernel,
            user,
            "message {i} ({:?}) with services {services:?}, excluded {excluded:?}, \
             share {share:?}, {events:?}\n{}",
            Message::parse(msg),
            listing(&program)
        );
        passed += usize::from(kernel);
    }
    passed
}

fn event(kind: EventKind, id: u32, src: &str, dst: &str) -> CtEvent {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let family = if dst.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut ev = CtEvent::empty(kind, family);
    ev.id = Some(id);
    ev.status = Some(Status(Status::CONFIRMED | Status::DST_NAT));
    ev.orig = Some(Tuple {
        src: Some(src),
        dst: Some(dst),
        proto: Some(17),
        src_port: Some(40000 + (id % 20000) as u16),
        dst_port: Some(53),
        ..Tuple::default()
    });
    ev.reply = Some(Tuple {
        src: Some(if dst.is_ipv4() {
            "10.200.2.2".parse().unwrap()
        } else {
            "fd00:2::2".parse().unwrap()
        }),
        dst: Some(src),
        proto: Some(17),
        src_port: Some(5353),
        dst_port: Some(40000 + (id % 20000) as u16),
        ..Tuple::default()
    });
    ev.timestamp_event = Some(1_700_000_000_000_000_000 + u64::from(id));
    ev
}

/// Events of both families to destinations inside, at the edges of and
/// outside the subnets the tests use, of every kind, with many ids.
fn synthetic() -> Vec<Vec<u8>> {
    let dsts = [
        "10.96.0.10",
        "10.96.255.255",
        "10.95.255.255",
        "10.97.0.0",
        "10.96.200.1",
        "10.96.199.255",
        "10.200.2.2",
        "192.168.7.7",
        "0.0.0.0",
        "255.255.255.255",
        "fd00:96::10",
        "fd00:96::ffff",
        "fd00:96::1:0",
        "fd00:96::80",
        "fd00:96::7f",
        "fd00:96::ff",
        "fd00:97::10",
        "fd01:96::10",
        "fd00:2::2",
        "2001:db8:1:2::3",
        "2001:db8:1:3::3",
        "::",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "::ffff:10.96.0.10",
    ];
    let mut out = Vec::new();
    let mut id = 7u32;
    for dst in dsts {
        let src = if dst.contains(':') {
            "fd00:1::2"
        } else {
            "10.200.1.2"
        };
        for kind in [EventKind::New, EventKind::Update, EventKind::Destroy] {
            // Before the reply, at it, after ASSURED in an open and in a
            // closing TCP state, after ASSURED with no TCP state.
            use crate::wire::TcpState as S;
            let (reply, assured) = (Status::SEEN_REPLY, Status::SEEN_REPLY | Status::ASSURED);
            for (extra, state) in [
                (0, Some(S::SYN_SENT)),
                (reply, Some(S::SYN_RECV)),
                (assured, Some(S::ESTABLISHED)),
                (assured, Some(S::FIN_WAIT)),
                (assured, Some(S::CLOSE)),
                (assured, Some(S::SYN_SENT2)),
                (assured, None),
            ] {
                id = id.wrapping_mul(2_654_435_761).wrapping_add(12_345);
                let mut ev = event(kind, id, src, dst);
                ev.status = ev.status.map(|s| Status(s.0 | extra));
                ev.tcp_state = state;
                out.push(encode(&ev, Form::default()));
            }
        }
    }
    // An event with every optional attribute the kernel may add.
    let mut full = event(EventKind::Destroy, 99, "10.200.1.2", "10.96.3.4");
    full.mark = Some(5);
    full.zone = Some(3);
    full.timeout = Some(30);
    full.tcp_state = Some(crate::wire::TcpState::TIME_WAIT);
    out.push(encode(&full, Form { counters32: true }));
    // Messages that are not conntrack events.
    out.push(control(NLMSG_ERROR, &(-105i32).to_ne_bytes()));
    out.push(control(NLMSG_ERROR, &[0; 20]));
    out.push(control(NLMSG_DONE, &0i32.to_ne_bytes()));
    out.push(control(NLMSG_OVERRUN, &[]));
    out.push(control(NLMSG_NOOP, &[]));
    out.push(control(0x0200, &[2, 0, 0, 0])); // expectation subsystem
    out.push(control(0x0101, &[2, 0, 0, 0, 8, 0, 1, 0, 0, 0, 0, 0])); // ct GET
    out
}

#[test]
fn the_kernel_agrees_with_userspace_on_every_captured_message() {
    let messages = fixtures();
    assert!(messages.len() > 1700);
    // The captures' ClusterIP is 10.96.0.10, their backend 10.200.2.2 /
    // 10.123.2.2, their unreplied sink 10.124.255.254.
    let cases: [(&[&str], &[&str]); 7] = [
        (&["10.96.0.0/16"], &[]),
        (&["10.96.0.10/32"], &[]),
        (&["10.96.0.0/16"], &["10.96.0.10/32"]),
        (&["10.0.0.0/8"], &["10.124.0.0/16"]),
        (&["0.0.0.0/0"], &[]),
        (&["fd00:96::/112"], &[]),
        (&[], &[]),
    ];
    for (services, excluded) in cases {
        let (services, excluded) = (subnets(services), subnets(excluded));
        for events in [FlowEvents::All, FlowEvents::Used, FlowEvents::UsedLive] {
            let passed = agree(&messages, &services, &excluded, None, events);
            let mut union = 0;
            for share in [0, 1, 2].map(|i| ReaderShare::new(i, 3).ok()) {
                union += agree(&messages, &services, &excluded, share, events);
            }
            assert_eq!(union, passed, "three shares split the passed events");
        }
    }
    // The ClusterIP's events pass, the unreplied sink's do not.
    let svc = subnets(&["10.96.0.0/16"]);
    let passed = agree(&messages, &svc, &[], None, FlowEvents::All);
    assert_eq!(passed, 427 + 500 + 40 + 500 + 297);
    // Of those, the tracker may use (counted from the captures' `.jsonl`
    // decodings): per TCP flow SYN_RECV, FIN_WAIT, LAST_ACK, TIME_WAIT
    // and DESTROY, not NEW or ESTABLISHED; per UDP flow the UPDATE and
    // the DESTROY, not the NEW; of a refused connection the DESTROY.
    let used = agree(&messages, &svc, &[], None, FlowEvents::Used);
    assert_eq!(used, 305 + 350 + 20 + 349 + 198);
}

#[test]
fn the_kernel_agrees_with_userspace_on_synthetic_ipv4_ipv6_and_control_messages() {
    let messages = synthetic();
    let cases: [(&[&str], &[&str]); 9] = [
        (&["10.96.0.0/16"], &[]),
        (&["10.96.0.0/16", "fd00:96::/112"], &["10.96.200.0/24"]),
        (&["fd00:96::/112"], &["fd00:96::80/121"]),
        (
            &["fd00:96::/112", "2001:db8:1:2::/64"],
            &["fd00:96::ff/128"],
        ),
        (&["fd00::/8"], &["fd00:96::/48", "fd00:2::2/128"]),
        (&["::/0", "0.0.0.0/0"], &["fd00:96::/112", "10.96.0.0/12"]),
        (&["fd00:96::10/128", "10.96.0.10/32"], &[]),
        (&["fd00:96::/111", "192.168.0.0/17", "10.96.0.0/11"], &[]),
        (&[], &["10.96.0.0/16"]),
    ];
    for (services, excluded) in cases {
        let (services, excluded) = (subnets(services), subnets(excluded));
        for events in [FlowEvents::All, FlowEvents::Used, FlowEvents::UsedLive] {
            let passed = agree(&messages, &services, &excluded, None, events);
            for count in [1, 2, 3, 7] {
                let mut union = 0;
                for i in 0..count {
                    let share = ReaderShare::new(i, count).ok();
                    union += agree(&messages, &services, &excluded, share, events);
                }
                // The 7 control messages reach every reader.
                assert_eq!(union, passed + 7 * (count as usize - 1));
            }
        }
    }
    // Control messages pass even with no Service subnet at all.
    for events in [FlowEvents::All, FlowEvents::Used, FlowEvents::UsedLive] {
        assert_eq!(agree(&messages, &[], &[], None, events), 7);
    }
    // Of the events to 10.96.0.10, per kind and 7 variants, Used keeps
    // the DESTROYs, the NEWs with a reply, and the UPDATEs with a reply
    // but before ASSURED or in FIN_WAIT or CLOSE.
    let one = subnets(&["10.96.0.10/32"]);
    let all = agree(&messages, &one, &[], None, FlowEvents::All);
    let used = agree(&messages, &one, &[], None, FlowEvents::Used);
    assert_eq!((all, used), (7 + 3 * 7, 7 + 6 + 7 + 3));
}

#[test]
fn a_long_subnet_list_loads_and_agrees() {
    // 300 distinct IPv4 subnets of mixed lengths, 100 IPv6 /112 and /128.
    let mut services = Vec::new();
    for i in 0..300u32 {
        let len = [16, 24, 32, 28, 20][i as usize % 5];
        // Subnet::new clears the host bits.
        let net = (0x0a00_0000 + (i << 16)) | 0x1234;
        services.push(Subnet::new(net.to_be_bytes().into(), len).unwrap());
    }
    for i in 0..100u128 {
        let len = if i % 2 == 0 { 112 } else { 128 };
        let net = 0xfd00_0096u128 << 96 | i << 16 | 0x42;
        services.push(Subnet::new(net.to_be_bytes().into(), len).unwrap());
    }
    let excluded = subnets(&["10.5.3.0/24", "fd00:96::2:0/112"]);
    let program = service_event_filter(
        &services,
        &excluded,
        ReaderShare::new(1, 2).ok(),
        FlowEvents::Used,
    )
    .unwrap();
    assert!(program.len() > 1000, "{}", program.len());
    let mut messages = synthetic();
    let mut id = 1u32;
    let mut dsts: Vec<IpAddr> = services.iter().map(|s| s.addr()).collect();
    dsts.extend(["10.5.3.9", "fd00:96::2:1", "fd00:96::2"].map(|a| a.parse::<IpAddr>().unwrap()));
    for dst in dsts {
        id = id.wrapping_mul(2_654_435_761).wrapping_add(1);
        let src = if dst.is_ipv4() {
            "10.200.1.2"
        } else {
            "fd00:1::2"
        };
        let ev = event(EventKind::New, id, src, &dst.to_string());
        messages.push(encode(&ev, Form::default()));
    }
    let passed = agree(&messages, &services, &excluded, None, FlowEvents::All);
    assert!(passed >= 400, "{passed}");
    let mut union = 0;
    for share in [ReaderShare::new(0, 2).ok(), ReaderShare::new(1, 2).ok()] {
        union += agree(&messages, &services, &excluded, share, FlowEvents::All);
    }
    assert_eq!(union, passed + 7, "control messages reach both readers");
}

#[test]
fn the_largest_programs_load_and_agree() {
    use crate::offload::bpf::{MAX_IPV4_SUBNETS, MAX_IPV6_SUBNETS};
    let v4: Vec<Subnet> = (0..MAX_IPV4_SUBNETS as u32)
        .map(|i| Subnet::new((0x0a00_0000 + 3 * i).to_be_bytes().into(), 32).unwrap())
        .collect();
    let v6: Vec<Subnet> = (0..MAX_IPV6_SUBNETS as u128)
        .map(|i| {
            Subnet::new(
                ((0xfd00_0096u128 << 96) | (3 * i)).to_be_bytes().into(),
                128,
            )
            .unwrap()
        })
        .collect();
    for (services, src) in [(v4, "10.200.1.2"), (v6, "fd00:1::2")] {
        let mut messages = Vec::new();
        for (i, s) in services
            .iter()
            .enumerate()
            .step_by(97)
            .chain(services.iter().enumerate().rev().take(3))
        {
            for dst in [s.addr(), next(s.addr())] {
                let ev = event(EventKind::Destroy, i as u32, src, &dst.to_string());
                messages.push(encode(&ev, Form::default()));
            }
        }
        for share in [ReaderShare::new(0, 2).ok(), ReaderShare::new(1, 2).ok()] {
            let program = service_event_filter(&services, &[], share, FlowEvents::Used).unwrap();
            assert!(program.len() > 4000, "{}", program.len());
            agree(&messages, &services, &[], share, FlowEvents::Used);
        }
    }

    fn next(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
        }
    }
}

/// Messages the filter cannot judge are passed; here it may disagree
/// with userspace, which drops or reports them, but never drops one.
#[test]
fn what_the_filter_cannot_read_it_passes() {
    let program =
        service_event_filter(&subnets(&["10.96.0.0/16"]), &[], None, FlowEvents::Used).unwrap();
    let lo = Loopback::new();
    lo.attach(&program);
    let outside = event(EventKind::New, 9, "10.200.1.2", "10.200.2.2");
    assert!(!lo.passes(&encode(&outside, Form::default())));

    // No original tuple, no address in it, another family, an IPv6
    // destination in an AF_INET event, a V4_DST of the wrong size,
    // messages too short to hold an event.
    let mut no_orig = outside;
    no_orig.orig = None;
    let mut no_dst = outside;
    no_dst.orig.as_mut().unwrap().dst = None;
    let mut v6_in_v4 = outside;
    v6_in_v4.orig.as_mut().unwrap().dst = Some("fd00::1".parse().unwrap());
    let mut other_family = outside;
    other_family.family = 7;
    let mut wrong_size = Builder::new();
    wrong_size.buf.extend_from_slice(&[0; 4]);
    wrong_size.buf.extend_from_slice(&0x0100u16.to_ne_bytes());
    wrong_size.buf.extend_from_slice(&[0; 10]);
    wrong_size.buf.extend_from_slice(&[AF_INET, 0, 0, 0]);
    let orig = wrong_size.open(CTA_TUPLE_ORIG);
    let ip = wrong_size.open(CTA_TUPLE_IP);
    wrong_size.attr(2, &[10, 200, 2, 2, 0, 0, 0, 0]);
    wrong_size.close(ip);
    wrong_size.close(orig);
    wrong_size.attr(CTA_ID, &9u32.to_be_bytes());
    let len = wrong_size.buf.len() as u32;
    wrong_size.buf[..4].copy_from_slice(&len.to_ne_bytes());
    let mut short = encode(&outside, Form::default());
    short.truncate(18);
    short[..4].copy_from_slice(&18u32.to_ne_bytes());
    for (what, msg) in [
        ("no orig", encode(&no_orig, Form::default())),
        ("no dst", encode(&no_dst, Form::default())),
        ("v6 in v4", encode(&v6_in_v4, Form::default())),
        ("family 7", encode(&other_family, Form::default())),
        ("V4_DST of 8 bytes", wrong_size.buf),
        ("18 bytes", short),
        ("1 byte", vec![1]),
    ] {
        assert!(lo.passes(&msg), "{what}");
    }

    // An event of a Service flow without a status, or with a status or
    // TCP state of the wrong size: the filter cannot tell whether the
    // tracker may use it.
    let inside = event(EventKind::Update, 9, "10.200.1.2", "10.96.0.10");
    assert!(!lo.passes(&encode(&inside, Form::default())), "no reply");
    let mut no_status = inside;
    no_status.status = None;
    assert!(lo.passes(&encode(&no_status, Form::default())), "no status");
    let mut assured = inside;
    assured.status = Some(Status(Status::SEEN_REPLY | Status::ASSURED));
    assured.tcp_state = Some(crate::wire::TcpState::ESTABLISHED);
    let established = encode(&assured, Form::default());
    assert!(!lo.passes(&established), "ESTABLISHED after ASSURED");
    // The status attribute (type 3, be32 SEEN_REPLY | ASSURED = 6) and
    // the state's (type 1, one byte ESTABLISHED = 3), each found in the
    // encoding and its length made one byte longer than its payload.
    for (what, kind, payload, len) in [
        ("status of 5 bytes", 3u16, &[0u8, 0, 0, 6][..], 8u16),
        ("TCP state of 2 bytes", 1, &[3u8][..], 5),
    ] {
        let mut msg = established.clone();
        let at = msg
            .windows(4 + payload.len())
            .position(|w| {
                w[..2] == len.to_ne_bytes() && w[2..4] == kind.to_ne_bytes() && &w[4..] == payload
            })
            .unwrap_or_else(|| panic!("{what}: attribute not found"));
        msg[at..at + 2].copy_from_slice(&(len + 1).to_ne_bytes());
        assert!(lo.passes(&msg), "{what}");
    }

    // With a share, an event without a readable id goes to reader 0.
    let inside = event(EventKind::New, 9, "10.200.1.2", "10.96.0.10");
    let mut no_id = inside;
    no_id.id = None;
    for (index, passes) in [(0, true), (1, false)] {
        let program = service_event_filter(
            &subnets(&["10.96.0.0/16"]),
            &[],
            ReaderShare::new(index, 2).ok(),
            FlowEvents::All,
        )
        .unwrap();
        lo.attach(&program);
        assert_eq!(lo.passes(&encode(&no_id, Form::default())), passes);
        assert_eq!(lo.passes(&encode(&inside, Form::default())), index == 1);
    }
}
