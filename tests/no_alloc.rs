//! Proves the per-event path allocates nothing: a counting global allocator
//! watches this thread while the whole fixture corpus is parsed four times
//! (as single messages and as one datagram per capture, each by value and in
//! place) and every event is recorded into a stats shard (counters,
//! histograms, sliding-window quantiles) and given to the flow tracker.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use conntrack_metrics::flow::{FlowTracker, ServiceFilter};
use conntrack_metrics::stats::summary::SummaryWindow;
use conntrack_metrics::stats::{Counter, Series, ShardSet, Snapshot};
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

#[test]
fn parsing_the_whole_fixture_corpus_allocates_nothing() {
    let corpus: Vec<Vec<Vec<u8>>> = common::captures::CAPTURES
        .iter()
        .map(|n| common::captures::datagrams(n))
        .collect();
    let joined: Vec<Vec<u8>> = corpus.iter().map(|c| c.concat()).collect();

    // The counter itself must see allocations, or the test proves nothing.
    let before = allocations();
    black_box(vec![1u8; 64]);
    assert!(
        allocations() > before,
        "the counting allocator is not installed"
    );

    // The stats shard every event is recorded into, and the flow table,
    // made before measuring (as the reader's are, before its loop).
    let shards = ShardSet::new(1, SummaryWindow::from_minutes(10));
    let mut shard = shards.writer(0).unwrap();
    let services = ServiceFilter::new(vec!["10.96.0.0/16".parse().unwrap()], vec![]);
    let mut flows = FlowTracker::new(services, 4096);

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
    // The hot path: one slot reused, per message and per datagram.
    let mut slot = CtEvent::empty(EventKind::New, 0);
    for datagrams in &corpus {
        for d in datagrams {
            match CtEvent::parse_into(black_box(d), &mut slot) {
                Ok(()) => {
                    events += 1;
                    // What the reader does with an event, and what flow
                    // tracking will: counters, histograms, window quantiles.
                    shard.count(Counter::EventsUpdate, 1);
                    if let Some(ts) = slot.timestamp_event {
                        shard.set_time(std::time::Instant::now());
                        shard.observe(Series::SeenReplyLatency, ts % 1_000_000_000);
                        shard.observe(Series::BytesToService, ts % 100_000);
                        shard.observe(Series::FinThroughputFromService, ts);
                    }
                }
                Err(_) => errors += 1,
            }
            black_box(&slot);
        }
    }
    // The reader's per-event path: parse in place, count, track the flow
    // (every Service flow of the captures yields its observations).
    for d in &joined {
        let mut walk = Datagram::new(black_box(d));
        while let Some(m) = walk.next_into(&mut slot) {
            match black_box(m) {
                Ok(Message::Event(())) => {
                    events += 1;
                    shard.count(Counter::EventsNew, 1);
                    flows.event(&slot, 1_795_000_000_000_000_000, &mut shard);
                }
                _ => errors += 1,
            }
        }
    }
    flows.flush(&mut shard);
    flows.overrun(1_795_000_000_000_000_000, &mut shard);
    // A malformed message costs no allocation either (typed, Copy errors).
    for d in &corpus[0] {
        let cut = &d[..d.len() / 2];
        errors += u64::from(black_box(CtEvent::parse(cut)).is_err());
    }
    let during = allocations() - before;
    drop(shard);
    let mut snap = Snapshot::default();
    shards.merge_into(&mut snap);
    assert!(
        snap.count(Series::SeenReplyLatency) >= 61 + 99,
        "flows were tracked"
    );
    assert_eq!(during, 0, "{during} allocations while parsing");
    assert_eq!(events, 4 * 1962);
    assert_eq!(errors, corpus[0].len() as u64);
}
