//! Parse throughput over the whole fixture corpus (`tests/fixtures/*.bin`), in one
//! benchmark group so the figures come from the same run:
//!
//! * `ours/CtEvent::parse`: `conntrack_metrics::wire::CtEvent::parse` on every netlink
//!   message;
//! * `ours/Datagram`: `conntrack_metrics::wire::Datagram` walking every captured datagram;
//! * `netlink-packet-netfilter/deserialize`: the general-purpose decoder
//!   (`netlink-packet-netfilter` 0.4 on `netlink-packet-core` 0.9) decoding every message
//!   into a `NetlinkMessage<NetfilterMessage>`, as deep as that crate goes.
//!
//! Throughput is in events (one per conntrack message), so criterion's `elem/s` is
//! events/s and `time / events` is ns/event. Results are passed to `black_box` by
//! reference: the value must exist in memory, but the harness adds no copy of it
//! (moving the 264-byte `Result<CtEvent, _>` into `black_box` costs ~5-8 ns/event).
//!
//! Before anything is timed, `Corpus::load` checks that both decoders accept every
//! message, agree on the number of events per message, and agree on the fields both
//! decode (kind, tuples, status, timeout, mark, TCP state); it panics otherwise.
//!
//! Run: `cargo bench --bench parse` (docs/benchmarks.md has the figures).

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
    Tuple as NfTuple,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};

use conntrack_metrics::wire::{capture, CtEvent, Datagram, EventKind, Message, Tuple};

#[path = "../tests/common/captures.rs"]
mod captures;

const NLMSG_HDRLEN: usize = 16;

type Baseline = NetlinkMessage<NetfilterMessage>;

struct Corpus {
    /// Every captured datagram, as recvmsg() returned it.
    datagrams: Vec<Vec<u8>>,
    /// Every netlink message of every datagram (nlmsghdr included), in file order.
    messages: Vec<Vec<u8>>,
    /// Conntrack events in the corpus (the same for both decoders, checked).
    events: u64,
}

/// Independent reader of the fixture format: `u32 len (LE)` + `len` bytes, repeated.
fn read_records(name: &str, buf: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        assert!(rest.len() >= 4, "{name}: truncated record length");
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        assert!(rest.len() >= 4 + len, "{name}: truncated record");
        out.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    out
}

/// Splits a datagram into its netlink messages by `nlmsg_len` (NLMSG_ALIGN'ed).
fn split_messages(name: &str, dg: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= dg.len() {
        let len = u32::from_ne_bytes(dg[off..off + 4].try_into().unwrap()) as usize;
        assert!(
            len >= NLMSG_HDRLEN && off + len <= dg.len(),
            "{name}: bad nlmsg_len {len} at offset {off}"
        );
        out.push(dg[off..off + len].to_vec());
        off += (len + 3) & !3;
    }
    assert!(off >= dg.len(), "{name}: {} trailing bytes", dg.len() - off);
    out
}

/// What both decoders decode, for the cross-check: (src, dst, proto, sport, dport).
type TupleSummary = (
    Option<IpAddr>,
    Option<IpAddr>,
    Option<u8>,
    Option<u16>,
    Option<u16>,
);

/// The fields both decoders decode (netlink-packet-netfilter 0.4 keeps CTA_ID,
/// counters and timestamps as raw bytes, so those are not compared).
#[derive(Debug, PartialEq, Eq, Default)]
struct Summary {
    destroy: bool,
    status: Option<u32>,
    timeout: Option<u32>,
    mark: Option<u32>,
    orig: Option<TupleSummary>,
    reply: Option<TupleSummary>,
    tcp_state: Option<u8>,
}

fn ours_summary(ev: &CtEvent) -> Summary {
    let t = |t: &Tuple| (t.src, t.dst, t.proto, t.src_port, t.dst_port);
    Summary {
        destroy: ev.kind == EventKind::Destroy,
        status: ev.status.map(|s| s.0),
        timeout: ev.timeout,
        mark: ev.mark,
        orig: ev.orig.as_ref().map(t),
        reply: ev.reply.as_ref().map(t),
        tcp_state: ev.tcp_state.map(|s| s.0),
    }
}

fn baseline_tuple(parts: &[NfTuple]) -> TupleSummary {
    let mut t: TupleSummary = Default::default();
    for part in parts {
        match part {
            NfTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => t.0 = Some(*a),
                        IPTuple::DestinationAddress(a) => t.1 = Some(*a),
                        _ => {}
                    }
                }
            }
            NfTuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::Protocol(n) => t.2 = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(n) => t.3 = Some(*n),
                        ProtoTuple::DestinationPort(n) => t.4 = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

/// Decodes one message with netlink-packet-netfilter; panics if it fails or is
/// not a conntrack event. Returns the events in it (1) and their summary.
fn baseline_events(name: &str, i: usize, msg: &[u8]) -> (u64, Summary) {
    let decoded = Baseline::deserialize(msg)
        .unwrap_or_else(|e| panic!("{name} message {i}: netlink-packet-netfilter failed: {e:?}"));
    let NetlinkPayload::InnerMessage(NetfilterMessage {
        inner: NetfilterMessageInner::Conntrack(ct),
        ..
    }) = decoded.payload
    else {
        panic!("{name} message {i}: baseline decoded a non-conntrack payload {decoded:?}");
    };
    // IPCTNL_MSG_CT_NEW carries NEW and UPDATE events, IPCTNL_MSG_CT_DELETE DESTROY.
    let (destroy, attrs) = match ct {
        ConntrackMessage::New(a) => (false, a),
        ConntrackMessage::Delete(a) => (true, a),
        other => panic!("{name} message {i}: baseline decoded a non-event {other:?}"),
    };
    let mut s = Summary {
        destroy,
        ..Summary::default()
    };
    for a in &attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => s.orig = Some(baseline_tuple(t)),
            ConntrackAttribute::CtaTupleReply(t) => s.reply = Some(baseline_tuple(t)),
            ConntrackAttribute::CtaStatus(st) => s.status = Some(st.bits()),
            ConntrackAttribute::CtaTimeout(t) => s.timeout = Some(*t),
            ConntrackAttribute::CtaMark(m) => s.mark = Some(*m),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for info in infos {
                    if let ProtoInfo::TCP(tcp) = info {
                        for t in tcp {
                            if let ProtoInfoTCP::State(st) = t {
                                s.tcp_state = Some(*st);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (1, s)
}

/// Events in one message according to our parser, both entry points (panics on error
/// or if they disagree), and the summary of the event.
fn our_events(name: &str, i: usize, msg: &[u8]) -> (u64, Summary) {
    let ev = CtEvent::parse(msg)
        .unwrap_or_else(|e| panic!("{name} message {i}: CtEvent::parse failed: {e:?}"));
    let mut via_datagram = 0;
    for m in Datagram::new(msg) {
        match m {
            Ok(Message::Event(e)) => {
                assert_eq!(
                    e, ev,
                    "{name} message {i}: CtEvent::parse and Datagram disagree"
                );
                via_datagram += 1;
            }
            Ok(_) => {}
            Err(e) => panic!("{name} message {i}: Datagram yielded an error: {e:?}"),
        }
    }
    assert_eq!(
        via_datagram, 1,
        "{name} message {i}: Datagram yielded {via_datagram} events"
    );
    (1, ours_summary(&ev))
}

impl Corpus {
    fn load() -> Corpus {
        let mut datagrams = Vec::new();
        let mut messages = Vec::new();
        let mut events = 0u64;
        for name in captures::CAPTURES {
            let path = captures::fixture_path(&format!("{name}.bin"));
            let buf =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let records = read_records(name, &buf);
            // The crate's own capture reader must see the same records.
            let theirs: Vec<&[u8]> = capture::records(&buf)
                .map(|r| r.unwrap_or_else(|e| panic!("{name}: capture::records: {e:?}")))
                .collect();
            assert!(
                theirs.len() == records.len()
                    && theirs.iter().zip(&records).all(|(a, b)| *a == b.as_slice()),
                "{name}: capture::records disagrees with the fixture format"
            );
            assert!(!records.is_empty(), "{name}: no records");
            let mut file_events = 0;
            for dg in &records {
                let mut dg_events = 0;
                for msg in split_messages(name, dg) {
                    let i = messages.len();
                    let (ours, ours_fields) = our_events(name, i, &msg);
                    let (base, base_fields) = baseline_events(name, i, &msg);
                    assert_eq!(
                        ours, base,
                        "{name} message {i}: ours counts {ours} events, netlink-packet-netfilter {base}"
                    );
                    assert_eq!(
                        ours_fields, base_fields,
                        "{name} message {i}: the decoders disagree on the fields both decode"
                    );
                    dg_events += ours;
                    messages.push(msg);
                }
                // The datagram walk over the whole datagram agrees too.
                let walked = Datagram::new(dg)
                    .filter(|m| matches!(m, Ok(Message::Event(_))))
                    .count() as u64;
                assert_eq!(walked, dg_events, "{name}: Datagram over a whole datagram");
                file_events += dg_events;
            }
            datagrams.extend(records);
            events += file_events;
        }
        assert!(events > 0);
        eprintln!(
            "corpus: {} files, {} datagrams, {} messages, {} events; \
             both decoders accept every message and agree on the events and their \
             tuples, status, timeout and TCP state",
            captures::CAPTURES.len(),
            datagrams.len(),
            messages.len(),
            events
        );
        Corpus {
            datagrams,
            messages,
            events,
        }
    }
}

fn parse(c: &mut Criterion) {
    let corpus = Corpus::load();
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(corpus.events));

    // The hot path the reader uses: one event slot reused for every message.
    group.bench_function("ours/CtEvent::parse_into", |b| {
        let mut ev = CtEvent::empty(EventKind::New, 0);
        b.iter(|| {
            for msg in &corpus.messages {
                let r = CtEvent::parse_into(black_box(msg.as_slice()), &mut ev);
                black_box((&r, &ev));
            }
        })
    });

    group.bench_function("ours/Datagram::next_into", |b| {
        let mut ev = CtEvent::empty(EventKind::New, 0);
        b.iter(|| {
            for dg in &corpus.datagrams {
                let mut walk = Datagram::new(black_box(dg.as_slice()));
                while let Some(m) = walk.next_into(&mut ev) {
                    black_box((&m, &ev));
                }
            }
        })
    });

    // The convenience forms, which return each event by value.
    group.bench_function("ours/CtEvent::parse", |b| {
        b.iter(|| {
            for msg in &corpus.messages {
                let ev = CtEvent::parse(black_box(msg.as_slice()));
                black_box(&ev);
            }
        })
    });

    group.bench_function("ours/Datagram (iterator)", |b| {
        b.iter(|| {
            for dg in &corpus.datagrams {
                for m in Datagram::new(black_box(dg.as_slice())) {
                    black_box(&m);
                }
            }
        })
    });

    group.bench_function("netlink-packet-netfilter/deserialize", |b| {
        b.iter(|| {
            for msg in &corpus.messages {
                let decoded = Baseline::deserialize(black_box(msg.as_slice()));
                black_box(&decoded);
                // Dropped here, inside the loop: its deallocation is part of its cost.
            }
        })
    });

    group.finish();
}

criterion_group! {
    name = benches;
    // Whole run well under two minutes on the 2-core machine.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .sample_size(60);
    targets = parse
}
criterion_main!(benches);
