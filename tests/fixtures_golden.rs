//! Golden tests over the real kernel captures in `tests/fixtures/`: every
//! message parses, and every decoded field equals the independent decoding in
//! the matching `.jsonl` (absent there means absent here, not zero).

mod common;

use std::net::{IpAddr, Ipv4Addr};

use conntrack_metrics::wire::{
    Counters, CtEvent, Datagram, EventKind, Message, Status, TcpState, Timestamp, Tuple,
};
use serde_json::Value;

fn expected(name: &str) -> Vec<Value> {
    let text =
        std::fs::read_to_string(common::captures::fixture_path(&format!("{name}.jsonl"))).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn u64_of(v: &Value, key: &str) -> Option<u64> {
    v.get(key).map(|x| x.as_u64().unwrap())
}

fn tuple_of(v: &Value) -> Option<Tuple> {
    let t = v.as_object()?;
    let ip = |k: &str| {
        t.get(k)
            .map(|s| s.as_str().unwrap().parse::<IpAddr>().unwrap())
    };
    let n = |k: &str| t.get(k).map(|x| x.as_u64().unwrap());
    Some(Tuple {
        src: ip("src"),
        dst: ip("dst"),
        proto: n("proto").map(|x| x as u8),
        src_port: n("sport").map(|x| x as u16),
        dst_port: n("dport").map(|x| x as u16),
        ..Tuple::default()
    })
}

fn counters_of(v: Option<&Value>) -> Option<Counters> {
    let v = v?;
    Some(Counters {
        packets: u64_of(v, "packets"),
        bytes: u64_of(v, "bytes"),
    })
}

/// The event the `.jsonl` line describes, built field by field.
fn event_of(j: &Value) -> CtEvent {
    let kind = match j["event"].as_str().unwrap() {
        "NEW" => EventKind::New,
        "UPDATE" => EventKind::Update,
        "DESTROY" => EventKind::Destroy,
        other => panic!("unexpected event {other}"),
    };
    let mut ev = CtEvent::empty(kind, j["nfgen_family"].as_u64().unwrap() as u8);
    ev.orig = j.get("tuple_orig").and_then(tuple_of);
    ev.reply = j.get("tuple_reply").and_then(tuple_of);
    ev.id = u64_of(j, "id").map(|x| x as u32);
    ev.status = u64_of(j, "status").map(|x| Status(x as u32));
    ev.timeout = u64_of(j, "timeout").map(|x| x as u32);
    ev.tcp_state = j.get("tcp_state").map(|s| {
        let name = s.as_str().unwrap();
        let state = (0..=9)
            .map(TcpState)
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("unknown TCP state {name}"));
        state
    });
    ev.counters_orig = counters_of(j.get("counters_orig"));
    ev.counters_reply = counters_of(j.get("counters_reply"));
    ev.timestamp = j.get("timestamp").map(|t| Timestamp {
        start: u64_of(t, "start"),
        stop: u64_of(t, "stop"),
    });
    ev.timestamp_event = u64_of(j, "timestamp_event");
    ev
}

#[test]
fn every_fixture_message_parses_and_matches_its_independent_decoding() {
    let mut total = 0;
    for name in common::captures::CAPTURES {
        let datagrams = common::captures::datagrams(name);
        let want = expected(name);
        assert_eq!(datagrams.len(), want.len(), "{name}: message count");
        for (i, (d, j)) in datagrams.iter().zip(&want).enumerate() {
            assert_eq!(
                d.len() as u64,
                j["nlmsg_len"].as_u64().unwrap(),
                "{name}#{i}"
            );
            let msgs: Vec<_> = Datagram::new(d).collect();
            assert_eq!(msgs.len(), 1, "{name}#{i}: one message per datagram");
            let Ok(Message::Event(ev)) = msgs[0] else {
                panic!("{name}#{i}: not an event: {:?}", msgs[0]);
            };
            assert_eq!(ev, event_of(j), "{name}#{i}");
            assert_eq!(CtEvent::parse(d), Ok(ev), "{name}#{i}");
            total += 1;
        }
    }
    // 427 + 500 + 40 + 500 + 297 + 198 messages in the six captures.
    assert_eq!(total, 1962);
}

#[test]
fn golden_fields_of_a_dnat_tcp_flow_pinned() {
    let d = common::captures::datagrams("tcp_dnat_ab");
    let vip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
    let client = IpAddr::V4(Ipv4Addr::new(10, 123, 1, 2));
    let backend = IpAddr::V4(Ipv4Addr::new(10, 123, 2, 2));

    let new = CtEvent::parse(&d[0]).unwrap();
    assert_eq!(new.kind, EventKind::New);
    assert_eq!(new.family, 2);
    assert_eq!(new.id, Some(2_756_920_634));
    let orig = new.orig.unwrap();
    assert_eq!((orig.src, orig.dst), (Some(client), Some(vip)));
    assert_eq!(
        (orig.proto, orig.src_port, orig.dst_port),
        (Some(6), Some(38100), Some(80))
    );
    let reply = new.reply.unwrap();
    assert_eq!((reply.src, reply.dst), (Some(backend), Some(client)));
    assert_eq!((reply.src_port, reply.dst_port), (Some(8080), Some(38100)));
    assert_eq!(new.status, Some(Status(424)));
    assert!(new.status.unwrap().has(Status::DST_NAT));
    assert!(!new.status.unwrap().has(Status::SEEN_REPLY));
    assert_eq!(new.timeout, Some(120));
    assert_eq!(new.tcp_state, Some(TcpState::SYN_SENT));
    assert_eq!(new.timestamp_event, Some(1_795_673_861_635_230_775));
    assert_eq!((new.counters_orig, new.timestamp), (None, None));

    let syn_recv = CtEvent::parse(&d[1]).unwrap();
    assert_eq!(syn_recv.kind, EventKind::Update);
    assert_eq!(syn_recv.id, new.id);
    assert_eq!(syn_recv.tcp_state, Some(TcpState::SYN_RECV));
    assert!(syn_recv.status.unwrap().has(Status::SEEN_REPLY));
}

#[test]
fn golden_fields_of_destroy_events_pinned() {
    // TIME_WAIT expiry: counters and start/stop, no timeout.
    let ab = common::captures::datagrams("tcp_dnat_ab");
    let destroy = ab
        .iter()
        .map(|d| CtEvent::parse(d).unwrap())
        .find(|e| e.kind == EventKind::Destroy && e.id == Some(3_967_882_546))
        .unwrap();
    assert_eq!(destroy.status, Some(Status(942)));
    assert!(destroy.status.unwrap().has(Status::DYING | Status::ASSURED));
    assert_eq!(destroy.timeout, None);
    assert_eq!(
        destroy.counters_orig,
        Some(Counters {
            packets: Some(5),
            bytes: Some(346)
        })
    );
    assert_eq!(
        destroy.counters_reply,
        Some(Counters {
            packets: Some(5),
            bytes: Some(354)
        })
    );
    assert_eq!(
        destroy.timestamp,
        Some(Timestamp {
            start: Some(1_795_673_861_635_919_634),
            stop: Some(1_795_673_862_637_166_892)
        })
    );
    assert_eq!(destroy.tcp_state, Some(TcpState::TIME_WAIT));
    assert_eq!(destroy.timestamp_event, Some(1_795_673_863_153_167_343));

    // Killed by RST: the timeout is still there, state CLOSE, never SEEN_REPLY.
    let refused = common::captures::datagrams("tcp_dnat_refused");
    let rst = CtEvent::parse(&refused[1]).unwrap();
    assert_eq!(rst.kind, EventKind::Destroy);
    assert_eq!(rst.id, Some(3_028_979_472));
    assert_eq!(rst.timeout, Some(120));
    assert_eq!(rst.tcp_state, Some(TcpState::CLOSE));
    assert!(!rst.status.unwrap().has(Status::SEEN_REPLY));
    assert_eq!(
        rst.counters_orig,
        Some(Counters {
            packets: Some(1),
            bytes: Some(60)
        })
    );
    assert_eq!(
        rst.counters_reply,
        Some(Counters {
            packets: Some(1),
            bytes: Some(40)
        })
    );
}

#[test]
fn udp_fixtures_have_no_tcp_state_and_the_unreplied_sink_no_dnat() {
    for d in common::captures::datagrams("udp_dnat_vip53") {
        let ev = CtEvent::parse(&d).unwrap();
        assert_eq!(ev.tcp_state, None);
        let orig = ev.orig.unwrap();
        assert_eq!((orig.proto, orig.dst_port), (Some(17), Some(53)));
        assert_eq!(ev.reply.unwrap().src_port, Some(5353));
        assert!(ev.status.unwrap().has(Status::DST_NAT));
    }
    for d in common::captures::datagrams("udp_unreplied_sink") {
        let ev = CtEvent::parse(&d).unwrap();
        assert!(!ev.status.unwrap().has(Status::DST_NAT | Status::SEEN_REPLY));
        assert_eq!(ev.orig.unwrap().dst, ev.reply.unwrap().src);
    }
}

#[test]
fn whole_capture_as_one_datagram_walks_every_message() {
    // A recvmmsg buffer may hold several messages back to back.
    for name in common::captures::CAPTURES {
        let datagrams = common::captures::datagrams(name);
        let joined: Vec<u8> = datagrams.concat();
        let events: Vec<_> = Datagram::new(&joined).map(|m| m.unwrap()).collect();
        assert_eq!(events.len(), datagrams.len(), "{name}");
        for (m, d) in events.iter().zip(&datagrams) {
            assert_eq!(*m, Message::Event(CtEvent::parse(d).unwrap()));
        }
    }
}
