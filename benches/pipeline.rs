//! The reader thread's whole per-event path over the fixture corpus
//! (`tests/fixtures/*.bin`), against parsing alone, in one benchmark group so
//! both figures come from the same run:
//!
//! * `parse only (Datagram::next_into)`: every datagram walked with
//!   `Datagram::next_into` into one reused `CtEvent` slot;
//! * `parse + count + flow tracking + stats (the reader's per-event path)`:
//!   what a reader does after `recvmmsg` returns, through the same
//!   functions (`EventPath::begin_batch`, `EventPath::datagram`,
//!   `EventPath::end_batch`). Per batch of [`BATCH`] datagrams (the default
//!   `--recv-batch`): `ShardWriter::set_time(Instant::now())`, the wall-clock
//!   `received_ns`, `observe(Series::ReaderBatch, n)`, the datagram counter,
//!   and the flow-table gauge at the end. Per datagram: the truncation check. Per event: the
//!   event-kind counter, `FlowTracker::event`, and the counters for overrun
//!   and malformed messages (none in this corpus). Left out: the
//!   `--print-events` branch (off by default; one untaken branch per event).
//!
//! * `the per-event path with --service-labels`: the same, each Service's
//!   flows recorded in a block of its own (one lookup per DESTROY).
//!
//! The difference between the first two is what counting, flow tracking and the
//! statistics cost per event. The group `pipeline, filtered` runs both over
//! the datagrams the default socket filter lets through (Service events the
//! tracker may use, `flow::tracker_may_use`): what the reader gets in
//! production, with no NEW of a flow before its reply and no ESTABLISHED
//! UPDATE. The `recvmmsg` syscall and the kernel's cost of
//! delivering the events are not in either.
//!
//! The corpus replays the same flows on every iteration. A DESTROY removes its
//! flow, and a reply for a flow already in the table finds it, so the table
//! does not grow even though the two `*_midstream` captures hold flows whose
//! DESTROY is missing. `check_bounded` checks this before timing: the table
//! size after the first passes must equal the size after more passes, and
//! must stay below the capacity. It prints that size once and panics if the
//! check fails.
//!
//! The registry's `metrics` recorder is installed as in the binary, so the
//! datagram counter and flow-table gauge are the real atomics (once per
//! batch each).
//!
//! Run: `cargo bench --bench pipeline` (figures in docs/benchmarks.md).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use conntrack_metrics::flow::services::label_overflow_blocks;
use conntrack_metrics::flow::{tracker_may_use_with, FlowTracker, ServiceBudget, ServiceFilter};
use conntrack_metrics::reader::EventPath;
use conntrack_metrics::stats::summary::SummaryWindow;
use conntrack_metrics::stats::{Counter, Registry, Series, ShardSet, Snapshot};
use conntrack_metrics::wire::{CtEvent, Datagram, EventKind, Message};

#[path = "../tests/common/captures.rs"]
mod captures;

/// Datagrams per `recvmmsg` batch: the reader's default (`--recv-batch`).
const BATCH: usize = 64;

/// The default `--max-flows`.
const MAX_FLOWS: usize = 262_144;

/// One received datagram, as `RecvBatch::datagrams` yields it.
struct Slot {
    bytes: Vec<u8>,
    /// Longer than a receive slot (never, in this corpus).
    truncated: bool,
}

/// Every captured datagram of every fixture, in file order, and the number of
/// conntrack events they hold.
fn corpus() -> (Vec<Slot>, u64) {
    let datagrams: Vec<Slot> = captures::CAPTURES
        .iter()
        .flat_map(|name| captures::datagrams(name))
        .map(|bytes| Slot {
            bytes,
            truncated: false,
        })
        .collect();
    let mut event = CtEvent::empty(EventKind::New, 0);
    let mut events = 0;
    for dg in &datagrams {
        let mut walk = Datagram::new(&dg.bytes);
        while let Some(message) = walk.next_into(&mut event) {
            match message {
                Ok(Message::Event(())) => events += 1,
                other => panic!("the corpus has only events, got {other:?}"),
            }
        }
    }
    (datagrams, events)
}

fn services() -> ServiceFilter {
    ServiceFilter::new(vec!["10.96.0.0/16".parse().unwrap()], vec![])
}

fn tracker() -> FlowTracker {
    FlowTracker::new(services(), MAX_FLOWS)
}

/// The datagrams of `corpus` the default socket filter passes (each
/// captured datagram holds one event), or with `live` the filter of
/// `--live-latency` (which passes every Service NEW too), and their events.
fn filtered(datagrams: &[Slot], live: bool) -> (Vec<Slot>, u64) {
    let services = services();
    let kept: Vec<Slot> = datagrams
        .iter()
        .filter(|dg| {
            let mut walk = Datagram::new(&dg.bytes);
            let mut event = CtEvent::empty(EventKind::New, 0);
            let mut keep = true;
            while let Some(message) = walk.next_into(&mut event) {
                assert!(matches!(message, Ok(Message::Event(()))));
                keep &= services.to_service(&event) && tracker_may_use_with(&event, live);
            }
            keep
        })
        .map(|dg| Slot {
            bytes: dg.bytes.clone(),
            truncated: dg.truncated,
        })
        .collect();
    let events = kept.len() as u64;
    (kept, events)
}

/// Parsing alone: every datagram walked into one reused slot.
#[inline(never)]
fn parse_only(datagrams: &[Slot], event: &mut CtEvent) {
    for dg in datagrams {
        let mut walk = Datagram::new(black_box(&dg.bytes));
        while let Some(message) = walk.next_into(event) {
            let _ = black_box(&message);
            black_box(&*event);
        }
    }
}

/// One pass of the corpus through the reader's per-event path, in batches of
/// [`BATCH`] datagrams as a reader receives them. No `black_box` here:
/// every event ends in the shard's atomics or the flow table, so nothing can
/// be optimised away, and an opaque `black_box` per datagram would make the
/// compiler reload the shard and table pointers (it cost 10-20 ns/event).
#[inline(never)]
fn reader_path(datagrams: &[Slot], path: &mut EventPath<'_>) {
    for batch in datagrams.chunks(BATCH) {
        // Exactly the reader's code, after recvmmsg returns.
        let received_ns = path.begin_batch(batch.len());
        for dg in batch {
            let _ = path.datagram(&dg.bytes, dg.truncated, received_ns);
        }
        let _ = path.end_batch();
    }
}

fn snapshot(set: &ShardSet) -> Snapshot {
    let mut s = Snapshot::default();
    set.merge_into(&mut s);
    s
}

/// Checks that replaying the corpus leaves the flow table bounded: the
/// flows left after a warm-up of a few passes are the flows left after many
/// more, and no flow was evicted. Prints the size once.
fn check_bounded(datagrams: &[Slot], events: u64) {
    const WARM_UP: usize = 3;
    const MORE: usize = 50;
    let set = ShardSet::new(1, SummaryWindow::from_minutes(10));
    let mut path = EventPath::new(0, set.writer(0).unwrap(), tracker(), false);
    for _ in 0..WARM_UP {
        reader_path(datagrams, &mut path);
    }
    let after_warm_up = path.tracker().flows();
    for _ in 0..MORE {
        reader_path(datagrams, &mut path);
    }
    let after_more = path.tracker().flows();
    let capacity = path.tracker().capacity();
    drop(path);
    let s = snapshot(&set);
    let passes = (WARM_UP + MORE) as u64;
    assert_eq!(
        after_more, after_warm_up,
        "the flow table grew while replaying the corpus"
    );
    assert!(after_more < capacity);
    assert_eq!(s.counter(Counter::FlowsEvicted), 0, "no flow evicted");
    let counted = s.counter(Counter::EventsNew)
        + s.counter(Counter::EventsUpdate)
        + s.counter(Counter::EventsDestroy);
    assert_eq!(counted, events * passes, "every event counted");
    assert_eq!(s.counter(Counter::MalformedMessages), 0);
    assert!(s.count(Series::Duration) > 0, "flows were measured");
    println!(
        "pipeline corpus: {} datagrams, {events} events; flow table after {WARM_UP} passes: \
         {after_warm_up} flows, after {} passes: {after_more} (capacity {}); per pass: \
         {} durations, {} seen-reply and {} FIN latencies observed",
        datagrams.len(),
        WARM_UP + MORE,
        capacity,
        s.count(Series::Duration) / passes,
        s.count(Series::SeenReplyLatency) / passes,
        s.count(Series::FinLatency) / passes,
    );
}

fn pipeline(c: &mut Criterion) {
    // The binary's recorder: the reader's self-metric handles are real.
    let registry = Registry::new(ShardSet::new(1, SummaryWindow::from_minutes(1)));
    let _ = metrics::set_global_recorder(registry.recorder());
    let (all, all_events) = corpus();
    let (used, used_events) = filtered(&all, false);
    let (live, live_events) = filtered(&all, true);
    for (group, datagrams, events) in [
        ("pipeline", all, all_events),
        ("pipeline, filtered", used, used_events),
        // The same flows as "filtered", with their NEWs: the cost per
        // Service flow of --live-latency is this group's live path against
        // that group's default one.
        ("pipeline, filtered for --live-latency", live, live_events),
    ] {
        check_bounded(&datagrams, events);
        bench_group(c, group, &datagrams, events);
    }
}

/// `tracker` with `--service-labels` at the default budget, never idle.
fn with_labels(tracker: FlowTracker) -> FlowTracker {
    tracker.with_services(ServiceBudget {
        max_services: 200,
        idle_ns: u64::MAX,
    })
}

fn bench_group(c: &mut Criterion, group: &str, datagrams: &[Slot], events: u64) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(events));
    let mut event = CtEvent::empty(EventKind::New, 0);
    g.bench_function("parse only (Datagram::next_into)", |b| {
        b.iter(|| parse_only(datagrams, &mut event))
    });
    let set = ShardSet::new(1, SummaryWindow::from_minutes(10));
    let mut path = EventPath::new(0, set.writer(0).unwrap(), tracker(), false);
    g.bench_function(
        "parse + count + flow tracking + stats (the reader's per-event path)",
        |b| b.iter(|| reader_path(datagrams, &mut path)),
    );
    // The same with --service-labels at the default budget: a Service
    // lookup per DESTROY, and each Service's own block.
    let labelled = with_labels(tracker());
    let set = ShardSet::with_blocks(1, SummaryWindow::from_minutes(10), labelled.blocks());
    label_overflow_blocks(&set);
    let mut labelled = EventPath::new(0, set.writer(0).unwrap(), labelled, false);
    // One pass first, so the check below holds when a filter skips this.
    reader_path(datagrams, &mut labelled);
    g.bench_function("the per-event path with --service-labels", |b| {
        b.iter(|| reader_path(datagrams, &mut labelled))
    });
    // With --live-latency: every NEW into the unanswered table, latencies
    // at the reply and the FIN.
    let live_set = ShardSet::new(1, SummaryWindow::from_minutes(10));
    let live = tracker().with_live_latency(MAX_FLOWS / 4);
    let mut live = EventPath::new(0, live_set.writer(0).unwrap(), live, false);
    g.bench_function("the per-event path with --live-latency", |b| {
        b.iter(|| reader_path(datagrams, &mut live))
    });
    drop(live);
    // Both: a Service lookup at each NEW and reply too, for the block the
    // flow's latencies and its wait for a reply are counted in.
    let both = with_labels(tracker().with_live_latency(MAX_FLOWS / 4));
    let both_set = ShardSet::with_blocks(1, SummaryWindow::from_minutes(10), both.blocks());
    label_overflow_blocks(&both_set);
    let mut both = EventPath::new(0, both_set.writer(0).unwrap(), both, false);
    g.bench_function(
        "the per-event path with --live-latency and --service-labels",
        |b| b.iter(|| reader_path(datagrams, &mut both)),
    );
    drop(both);
    g.finish();
    black_box(path.tracker().flows());
    let s = snapshot(&set);
    drop(labelled);
    assert!(s.blocks().len() > 1, "Services got series of their own");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    targets = pipeline
}
criterion_main!(benches);
