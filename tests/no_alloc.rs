//! Proves the per-event path allocates nothing: a counting global allocator
//! watches this thread while
//! - the reader's own per-event functions ([`EventPath::begin_batch`],
//!   [`EventPath::datagram`], [`EventPath::end_batch`],
//!   [`EventPath::overrun`]), with a real stats shard, flow tracker and
//!   self-metric handles, take the whole fixture corpus in batches of 64
//!   datagrams, as the reader thread does, then a truncated and a malformed
//!   datagram and an overrun;
//! - the parser alone reads the corpus: each datagram by value
//!   ([`CtEvent::parse`]) and in place ([`CtEvent::parse_into`]), each
//!   capture as one datagram ([`Datagram`]), and cut-short messages.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use conntrack_metrics::flow::services::{label_overflow_blocks, OVERFLOW};
use conntrack_metrics::flow::{FlowTracker, ServiceBudget, ServiceFilter};
use conntrack_metrics::reader::EventPath;
use conntrack_metrics::stats::self_metrics::{SeriesValue, READER_DATAGRAMS};
use conntrack_metrics::stats::summary::SummaryWindow;
use conntrack_metrics::stats::{BlockLabels, Counter, Registry, Series, ShardSet, Snapshot};
use conntrack_metrics::wire::{CtEvent, Datagram, EventKind, Message};

thread_local! {
    // Const-initialised: reading it never allocates.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct CountingAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator; the only
// addition is a thread-local counter, which neither allocates nor re-enters.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// The counter itself must see allocations, or a test proves nothing.
fn assert_counting() {
    let before = allocations();
    black_box(vec![1u8; 64]);
    assert!(
        allocations() > before,
        "the counting allocator is not installed"
    );
}

/// Every capture's datagrams, each as `recvmsg` returned it.
fn corpus() -> Vec<Vec<Vec<u8>>> {
    common::captures::CAPTURES
        .iter()
        .map(|n| common::captures::datagrams(n))
        .collect()
}

/// Messages (all events) in the fixture corpus.
const EVENTS: u64 = 1962;

/// Datagrams per receive, as the reader's default `--recv-batch`.
const BATCH: usize = 64;

#[test]
fn the_readers_event_path_allocates_nothing() {
    event_path_allocates_nothing(None, false);
}

/// With `--live-latency` (and Service labels): NEWs into the unanswered
/// table, latencies at the reply and the FIN, the awaiting-reply count at
/// each drained socket; nothing allocates.
#[test]
fn the_event_path_with_live_latency_allocates_nothing() {
    let budget = ServiceBudget {
        max_services: 1,
        idle_ns: 0,
    };
    event_path_allocates_nothing(Some(budget), true);
}

/// With `--service-labels` and a budget of one Service: Services take
/// slots (relabelling their blocks), the rest overflow, idle ones leave at
/// each drained socket; nothing allocates.
#[test]
fn the_event_path_with_service_labels_allocates_nothing() {
    event_path_allocates_nothing(
        Some(ServiceBudget {
            max_services: 1,
            idle_ns: 0,
        }),
        false,
    );
}

fn event_path_allocates_nothing(budget: Option<ServiceBudget>, live: bool) {
    let corpus = corpus();
    assert_counting();

    // Made before measuring, as the reader's are before its loop: the
    // registry, the flow table, and the path's self-metric handles (which
    // registering allocates), through the real recorder.
    let services = ServiceFilter::new(vec!["10.96.0.0/16".parse().unwrap()], vec![]);
    let mut tracker = FlowTracker::new(services, 4096);
    if let Some(budget) = budget {
        tracker = tracker.with_services(budget);
    }
    if live {
        tracker = tracker.with_live_latency(1024);
    }
    let window = SummaryWindow::from_minutes(10);
    let registry = Registry::new(ShardSet::with_blocks(1, window, tracker.blocks()));
    if budget.is_some() {
        label_overflow_blocks(registry.shards());
    }
    let mut path = metrics::with_local_recorder(&registry.recorder(), || {
        EventPath::new(0, registry.shards().writer(0).unwrap(), tracker, false)
    });
    // A datagram longer than its receive slot, and one whose message is cut
    // in half (its header claims more bytes than the datagram has).
    let truncated = corpus[0][0].clone();
    let malformed = corpus[0][0][..corpus[0][0].len() / 2].to_vec();

    let before = allocations();
    let mut batches = 0u64;
    let mut datagrams = 0u64;
    for capture in &corpus {
        for batch in capture.chunks(BATCH) {
            let received_ns = path.begin_batch(batch.len());
            for d in batch {
                path.datagram(black_box(d), false, received_ns).unwrap();
            }
            path.end_batch().unwrap();
            path.drained();
            batches += 1;
            datagrams += batch.len() as u64;
        }
    }
    let received_ns = path.begin_batch(2);
    path.datagram(&truncated, true, received_ns).unwrap();
    path.datagram(&malformed, false, received_ns).unwrap();
    path.end_batch().unwrap();
    path.overrun();
    let during = allocations() - before;
    batches += 1;
    datagrams += 2;
    assert_eq!(during, 0, "{during} allocations in the reader's event path");

    // What the path did: it counted and tracked every event.
    let mut snap = Snapshot::default();
    registry.shards().merge_into(&mut snap);
    let events: u64 = [
        Counter::EventsNew,
        Counter::EventsUpdate,
        Counter::EventsDestroy,
    ]
    .into_iter()
    .map(|c| snap.counter(c))
    .sum();
    assert_eq!(events, EVENTS);
    assert_eq!(snap.counter(Counter::TruncatedDatagrams), 1);
    assert_eq!(snap.counter(Counter::MalformedMessages), 1);
    assert_eq!(snap.counter(Counter::NetlinkOverruns), 1);
    assert_eq!(snap.count(Series::ReaderBatch), batches);
    assert_eq!(snap.sum(Series::ReaderBatch), datagrams as f64);
    assert!(
        snap.count(Series::SeenReplyLatency) >= 61 + 99,
        "flows were tracked: {} seen-reply observations",
        snap.count(Series::SeenReplyLatency)
    );
    assert!(snap.count(Series::Duration) > 0, "flows were closed");
    if budget.is_some() {
        let services = snap
            .blocks()
            .iter()
            .filter(|b| b.labels() != BlockLabels::Key(OVERFLOW));
        assert!(services.count() >= 1, "Services got blocks");
        assert!(
            snap.counter(Counter::ServiceBudgetOverflow) > 0,
            "and some overflowed"
        );
    }
    // Its self-metric handle is the registry's.
    let mut counted = None;
    registry.self_metrics().for_each(|family| {
        if family.name() == READER_DATAGRAMS {
            for (_, value) in family.series() {
                if let SeriesValue::Counter(n) = value {
                    counted = Some(n);
                }
            }
        }
    });
    assert_eq!(counted, Some(datagrams), "{READER_DATAGRAMS}");
}

#[test]
fn parsing_the_whole_fixture_corpus_allocates_nothing() {
    let corpus = corpus();
    let joined: Vec<Vec<u8>> = corpus.iter().map(|c| c.concat()).collect();
    assert_counting();

    let before = allocations();
    let mut events = 0u64;
    let mut errors = 0u64;
    for datagrams in &corpus {
        for d in datagrams {
            match black_box(CtEvent::parse(black_box(d))) {
                Ok(_) => events += 1,
                Err(e) => {
                    black_box(e);
                    errors += 1
                }
            }
        }
    }
    for d in &joined {
        for m in Datagram::new(black_box(d)) {
            match black_box(m) {
                Ok(Message::Event(_)) => events += 1,
                _ => errors += 1,
            }
        }
    }
    // One slot reused, per message and per datagram.
    let mut slot = CtEvent::empty(EventKind::New, 0);
    for datagrams in &corpus {
        for d in datagrams {
            match CtEvent::parse_into(black_box(d), &mut slot) {
                Ok(()) => events += 1,
                Err(_) => errors += 1,
            }
            black_box(&slot);
        }
    }
    for d in &joined {
        let mut walk = Datagram::new(black_box(d));
        while let Some(m) = walk.next_into(&mut slot) {
            match black_box(m) {
                Ok(Message::Event(())) => events += 1,
                _ => errors += 1,
            }
            black_box(&slot);
        }
    }
    // A malformed message costs no allocation either (typed, Copy errors).
    for d in &corpus[0] {
        let cut = &d[..d.len() / 2];
        errors += u64::from(black_box(CtEvent::parse(cut)).is_err());
    }
    let during = allocations() - before;
    assert_eq!(during, 0, "{during} allocations while parsing");
    assert_eq!(events, 4 * EVENTS);
    assert_eq!(errors, corpus[0].len() as u64);
}
