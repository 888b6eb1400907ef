//! Per-writer shards of atomic counters, and the merge of all shards into a
//! snapshot.
//!
//! Owns: the memory every per-event observation goes to, and the rules that
//! make a lock-free scrape consistent.
//! Never: lets two threads write one shard ([`ShardSet::writer`] hands each
//! shard out once at a time), allocates after construction on the write
//! path, or uses a read-modify-write instruction on it.
//!
//! Why the orderings are enough: every slot has exactly one writer, which
//! does `store(load() + n)` with `Relaxed`. Nothing else is published through
//! a slot, so no slot needs to order other memory. The scrape reads each slot
//! with `Relaxed`: coherence alone guarantees that one thread's successive
//! reads of one location never see an older value, so a slot, and hence any
//! sum of slots, never goes down from one scrape to the next. Buckets and
//! `_sum` are separate slots and may be caught an observation apart; the
//! count is derived from the buckets, so `+Inf` and `_count` always agree.
//!
//! A histogram's sum slot holds the bits of an `f64` (as Go's histograms
//! keep their sums): observations are integers, added exactly while the sum
//! is below 2^53 units, and past that rounded, but never wrapped. A `u64` of
//! nanoseconds would wrap within hours on a busy node with long-lived
//! connections (FIN latency sums), and a wrapped sum goes down. Adding a
//! non-negative value to an `f64` never makes it smaller.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crossbeam_utils::CachePadded;

use super::family::{Counter, Quantiles, Series, SHARD_SLOTS};
use super::summary::{QuantileAccumulator, SlidingQuantiles, SummaryWindow};

const SLOTS_PER_LINE: usize = 8;
const LINES: usize = SHARD_SLOTS.div_ceil(SLOTS_PER_LINE);

/// What [`ShardWriter::observe`] needs of a series, computed at compile time
/// so that a series that is not a constant costs one table lookup, not a
/// `match` per property.
#[derive(Clone, Copy)]
struct Layout {
    /// [`Series::offset`].
    offset: usize,
    /// The family's bounds.
    bounds: &'static [u64],
    /// Index of its summary in `Shard::quantiles`, or `NO_SUMMARY`.
    summary: usize,
}

const NO_SUMMARY: usize = usize::MAX;

/// [`Layout`] of every series, indexed by `Series as usize`.
const LAYOUTS: [Layout; Series::ALL.len()] = {
    let mut out = [Layout {
        offset: 0,
        bounds: &[],
        summary: NO_SUMMARY,
    }; Series::ALL.len()];
    let mut i = 0;
    while i < Series::ALL.len() {
        let s = Series::ALL[i];
        out[s as usize] = Layout {
            offset: s.offset(),
            bounds: s.family().bounds,
            summary: match Quantiles::of(s) {
                Some(q) => q as usize,
                None => NO_SUMMARY,
            },
        };
        i += 1;
    }
    out
};

/// One writer's counters: whole cache lines, so no two shards share one;
/// and its sliding quantiles, one per summary series.
struct Shard {
    /// A fixed-size array: a slot index is checked against a constant, which
    /// folds away for the constant slots of a constant series.
    lines: Box<[CachePadded<[AtomicU64; SLOTS_PER_LINE]>; LINES]>,
    quantiles: [SlidingQuantiles; Quantiles::ALL.len()],
    claimed: CachePadded<AtomicBool>,
}

impl Shard {
    fn new(window: &SummaryWindow) -> Shard {
        Shard {
            lines: Box::new(std::array::from_fn(|_| {
                CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0)))
            })),
            quantiles: std::array::from_fn(|_| SlidingQuantiles::new(window)),
            claimed: CachePadded::new(AtomicBool::new(false)),
        }
    }

    #[inline(always)]
    fn slot(&self, i: usize) -> &AtomicU64 {
        &self.lines[i / SLOTS_PER_LINE][i % SLOTS_PER_LINE]
    }
}

/// All shards of the process, shared by the writers and the exporter thread.
pub struct ShardSet {
    shards: Box<[Shard]>,
    window: SummaryWindow,
    /// The clock writers and scrapes both count summary epochs from.
    start: Instant,
}

impl ShardSet {
    /// `count` shards (at least one), all zero, with summaries over `window`.
    pub fn new(count: usize, window: SummaryWindow) -> ShardSet {
        ShardSet {
            shards: (0..count.max(1)).map(|_| Shard::new(&window)).collect(),
            window,
            start: Instant::now(),
        }
    }

    /// The summary epoch at `now`.
    pub fn epoch_at(&self, now: Instant) -> u64 {
        self.window.epoch(now.saturating_duration_since(self.start))
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Always false: a set has at least one shard.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The writer of shard `index`, or `None` if it is out of range or
    /// already has a writer. The shard is free again when the writer drops.
    pub fn writer(&self, index: usize) -> Option<ShardWriter<'_>> {
        let shard = self.shards.get(index)?;
        // Acquire pairs with the Release in `ShardWriter::drop`: a new writer
        // sees every store of the previous one before it adds to them.
        shard
            .claimed
            .compare_exchange(false, true, Ordering::Acquire, Relaxed)
            .ok()?;
        Some(ShardWriter {
            shard,
            set: self,
            epoch: self.epoch_at(Instant::now()),
        })
    }

    /// Adds every shard into `snapshot` (zeroed first), with the summaries'
    /// window ending now.
    pub fn merge_into(&self, snapshot: &mut Snapshot) {
        self.merge_at(snapshot, Instant::now());
    }

    /// [`Self::merge_into`] with the window ending at `now`.
    pub fn merge_at(&self, snapshot: &mut Snapshot, now: Instant) {
        snapshot.slots.iter_mut().for_each(|s| *s = 0);
        snapshot.sums.iter_mut().for_each(|s| *s = 0.0);
        for shard in self.shards.iter() {
            for (i, total) in snapshot.slots.iter_mut().enumerate() {
                *total = total.wrapping_add(shard.slot(i).load(Relaxed));
            }
            for (s, total) in Series::ALL.iter().zip(snapshot.sums.iter_mut()) {
                *total += f64::from_bits(shard.slot(s.sum_slot()).load(Relaxed));
            }
        }
        let now_epoch = self.epoch_at(now);
        let acc = &mut snapshot.accumulator;
        for (q, out) in Quantiles::ALL.iter().zip(snapshot.summaries.iter_mut()) {
            acc.clear();
            for shard in self.shards.iter() {
                shard.quantiles[*q as usize].merge_into(now_epoch, acc);
            }
            for (objective, value) in q.objectives().iter().zip(out.quantiles.iter_mut()) {
                *value = acc.quantile(*objective);
            }
        }
    }
}

use std::sync::atomic::Ordering;

/// The only handle that writes a shard. Not `Clone`.
pub struct ShardWriter<'a> {
    shard: &'a Shard,
    set: &'a ShardSet,
    /// Summary epoch of the batch being recorded, set by [`Self::set_time`].
    epoch: u64,
}

impl ShardWriter<'_> {
    /// Sets the time of the observations that follow (once per batch: the
    /// per-event path reads no clock).
    #[inline]
    pub fn set_time(&mut self, now: Instant) {
        self.epoch = self.set.epoch_at(now);
    }

    /// Records `value` (in the series' stored unit) into its bucket and sum,
    /// and into its summary if it has one.
    ///
    /// Always inlined: callers mostly pass a constant series, and then the
    /// table lookups fold away and the bucket search is unrolled over the
    /// family's bounds.
    #[inline(always)]
    pub fn observe(&mut self, series: Series, value: u64) {
        let Layout {
            offset,
            bounds,
            summary,
        } = LAYOUTS[series as usize];
        // First bound >= value (`le` is inclusive); bounds.len() is +Inf.
        let bucket = bounds.partition_point(|&b| b < value);
        // Both slots found before either is written: a store to an atomic
        // would make the compiler load the shard's line pointer again.
        let (count, sum) = (
            self.shard.slot(offset + bucket),
            self.shard.slot(offset + bounds.len() + 1),
        );
        self.add(count, 1);
        self.add_f64(sum, value);
        if let Some(quantiles) = self.shard.quantiles.get(summary) {
            quantiles.record(value, self.epoch);
        }
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn count(&mut self, counter: Counter, n: u64) {
        self.add(self.shard.slot(counter.slot()), n);
    }

    /// Adds `n` to `slot`, one of this writer's shard's.
    #[inline(always)]
    fn add(&mut self, slot: &AtomicU64, n: u64) {
        // Single writer: a plain load and store cannot lose an update, and is
        // cheaper than a locked fetch_add. See the module comment for orderings.
        slot.store(slot.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds `v` to `slot`, one of this writer's shard's that holds `f64` bits
    /// (a histogram's sum).
    #[inline(always)]
    fn add_f64(&mut self, slot: &AtomicU64, v: u64) {
        let sum = f64::from_bits(slot.load(Relaxed)) + v as f64;
        slot.store(sum.to_bits(), Relaxed);
    }
}

impl Drop for ShardWriter<'_> {
    fn drop(&mut self) {
        self.shard.claimed.store(false, Ordering::Release);
    }
}

/// A summary series at one scrape: its quantiles over the window. Its count
/// and sum over all time (as the original's Go summaries report them) are
/// those of its histogram series, [`Snapshot::count`] and [`Snapshot::sum`]
/// of `Quantiles::series`: the same observations.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SummarySnapshot {
    /// One value per objective of the series (`Quantiles::objectives`), in
    /// the stored unit; `None` when the window holds no observation.
    pub quantiles: Vec<Option<f64>>,
}

/// Every shard added together: what one scrape renders. Allocated once by the
/// exporter thread and reused for every scrape.
pub struct Snapshot {
    slots: Box<[u64]>,
    /// Histogram sums, in `Series::ALL` order (their slots hold `f64` bits).
    sums: [f64; Series::ALL.len()],
    summaries: [SummarySnapshot; Quantiles::ALL.len()],
    accumulator: QuantileAccumulator,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            slots: vec![0; SHARD_SLOTS].into_boxed_slice(),
            sums: [0.0; Series::ALL.len()],
            summaries: std::array::from_fn(|i| SummarySnapshot {
                quantiles: vec![None; Quantiles::ALL[i].objectives().len()],
            }),
            accumulator: QuantileAccumulator::new(),
        }
    }
}

impl Snapshot {
    /// A summary series.
    pub fn summary(&self, q: Quantiles) -> &SummarySnapshot {
        &self.summaries[q as usize]
    }

    /// The series' bucket counts, not cumulative, `+Inf` last.
    pub fn buckets(&self, series: Series) -> &[u64] {
        let at = series.offset();
        &self.slots[at..at + series.family().bounds.len() + 1]
    }

    /// Cumulative bucket counts of the series, `+Inf` last, written into `out`.
    pub fn cumulative(&self, series: Series, out: &mut Vec<u64>) {
        out.clear();
        let mut total = 0u64;
        for &n in self.buckets(series) {
            total = total.wrapping_add(n);
            out.push(total);
        }
    }

    /// Observations in the series (equal to its `+Inf` bucket).
    pub fn count(&self, series: Series) -> u64 {
        self.buckets(series)
            .iter()
            .fold(0u64, |a, &n| a.wrapping_add(n))
    }

    /// Sum of the series' observations, in its stored unit (exact while
    /// below 2^53).
    pub fn sum(&self, series: Series) -> f64 {
        self.sums[series as usize]
    }

    /// A counter's total.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.slots[counter.slot()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::family::{SEEN_REPLY_LATENCY, SERVICE_BYTES};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn window() -> SummaryWindow {
        SummaryWindow::from_minutes(1)
    }

    #[test]
    fn a_value_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let set = ShardSet::new(1, window());
        let mut w = set.writer(0).unwrap();
        // Bounds 1, 5, 10, ...: 0 and 1 go to le=1, 5 to le=5, 6 to le=10.
        for v in [0, 1, 5, 6, 100_000, 100_001] {
            w.observe(Series::BytesToService, v);
        }
        let mut snap = Snapshot::default();
        set.merge_into(&mut snap);
        let b = snap.buckets(Series::BytesToService);
        assert_eq!(b.len(), SERVICE_BYTES.bounds.len() + 1);
        assert_eq!((b[0], b[1], b[2]), (2, 1, 1));
        assert_eq!(b[SERVICE_BYTES.bounds.len() - 1], 1, "100000 in le=100000");
        assert_eq!(b[SERVICE_BYTES.bounds.len()], 1, "100001 in +Inf");
        assert_eq!(snap.count(Series::BytesToService), 6);
        assert_eq!(snap.sum(Series::BytesToService), 200_013.0);
        assert_eq!(
            snap.count(Series::BytesFromService),
            0,
            "other series untouched"
        );
        // le="0" holds exact zeros only.
        w.observe(Series::SeenReplyLatency, 0);
        w.observe(Series::SeenReplyLatency, 1);
        set.merge_into(&mut snap);
        let b = snap.buckets(Series::SeenReplyLatency);
        assert_eq!((b[0], b[1]), (1, 1));
        assert_eq!(SEEN_REPLY_LATENCY.bounds[1], 10_000);
    }

    #[test]
    fn layouts_are_the_series_own() {
        for s in Series::ALL {
            let layout = LAYOUTS[s as usize];
            assert_eq!(layout.offset, s.offset(), "{s:?}");
            assert_eq!(layout.bounds, s.family().bounds, "{s:?}");
            assert_eq!(layout.offset + layout.bounds.len() + 1, s.sum_slot());
            let summary = Quantiles::of(s).map_or(NO_SUMMARY, |q| q as usize);
            assert_eq!(layout.summary, summary, "{s:?}");
        }
    }

    #[test]
    fn a_shard_has_one_writer_at_a_time() {
        let set = ShardSet::new(2, window());
        let w0 = set.writer(0).unwrap();
        assert!(set.writer(0).is_none());
        assert!(set.writer(1).is_some());
        assert!(set.writer(2).is_none(), "out of range");
        drop(w0);
        assert!(set.writer(0).is_some());
    }

    #[test]
    fn shards_add_up_and_counters_are_separate() {
        let set = ShardSet::new(3, window());
        for i in 0..3 {
            let mut w = set.writer(i).unwrap();
            w.count(Counter::EventsNew, 10 * (i as u64 + 1));
            w.count(Counter::MalformedMessages, 1);
            w.observe(Series::Duration, 1_000_000);
        }
        let mut snap = Snapshot::default();
        set.merge_into(&mut snap);
        assert_eq!(snap.counter(Counter::EventsNew), 60);
        assert_eq!(snap.counter(Counter::MalformedMessages), 3);
        assert_eq!(snap.counter(Counter::EventsDestroy), 0);
        assert_eq!(snap.count(Series::Duration), 3);
        assert_eq!(snap.sum(Series::Duration), 3_000_000.0);
    }

    /// Writers record known values while a scraper merges in a loop: every
    /// snapshot holds the guarantees, and the final totals are exact.
    #[test]
    fn stress_concurrent_writers_and_scrapes() {
        const WRITERS: usize = 3;
        const PER_WRITER: u64 = 200_000;
        let set = Arc::new(ShardSet::new(WRITERS, window()));
        let done = Arc::new(AtomicBool::new(false));
        let scraper = {
            let (set, done) = (Arc::clone(&set), Arc::clone(&done));
            std::thread::spawn(move || {
                let (mut snap, mut prev) = (Snapshot::default(), Snapshot::default());
                let (mut cum, mut prev_cum) = (Vec::new(), Vec::new());
                let mut scrapes = 0u64;
                while !done.load(Ordering::Acquire) || scrapes < 10 {
                    set.merge_into(&mut snap);
                    for s in Series::ALL {
                        snap.cumulative(s, &mut cum);
                        assert!(
                            cum.windows(2).all(|w| w[0] <= w[1]),
                            "cumulative buckets go down"
                        );
                        assert_eq!(*cum.last().unwrap(), snap.count(s), "+Inf != count");
                        prev.cumulative(s, &mut prev_cum);
                        for (now, before) in cum.iter().zip(&prev_cum) {
                            assert!(now >= before, "a bucket went down between scrapes");
                        }
                        assert!(snap.sum(s) >= prev.sum(s), "a sum went down");
                    }
                    for c in Counter::ALL {
                        assert!(snap.counter(c) >= prev.counter(c), "a counter went down");
                    }
                    std::mem::swap(&mut snap, &mut prev);
                    scrapes += 1;
                }
                scrapes
            })
        };
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let set = Arc::clone(&set);
                std::thread::spawn(move || {
                    let mut w = set.writer(i).unwrap();
                    for n in 0..PER_WRITER {
                        // A value that walks every bucket of the latency family.
                        w.observe(Series::SeenReplyLatency, (n % 1000) * 20_000_000);
                        w.observe(Series::BytesToService, n % 200_000);
                        w.count(Counter::EventsUpdate, 1);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Release);
        let scrapes = scraper.join().unwrap();
        assert!(scrapes >= 10);

        let mut snap = Snapshot::default();
        set.merge_into(&mut snap);
        let n = WRITERS as u64 * PER_WRITER;
        assert_eq!(snap.count(Series::SeenReplyLatency), n);
        assert_eq!(snap.count(Series::BytesToService), n);
        assert_eq!(snap.counter(Counter::EventsUpdate), n);
        let per_writer_latency: u64 = (0..PER_WRITER).map(|k| (k % 1000) * 20_000_000).sum();
        assert_eq!(
            snap.sum(Series::SeenReplyLatency),
            (WRITERS as u64 * per_writer_latency) as f64
        );
        let per_writer_bytes: u64 = (0..PER_WRITER).map(|k| k % 200_000).sum();
        assert_eq!(
            snap.sum(Series::BytesToService),
            (WRITERS as u64 * per_writer_bytes) as f64
        );
        // Exactly how many values fell at or under each bound.
        let bounds = SEEN_REPLY_LATENCY.bounds;
        let mut cum = Vec::new();
        snap.cumulative(Series::SeenReplyLatency, &mut cum);
        for (i, &b) in bounds.iter().enumerate() {
            let expected = (0..1000u64).filter(|k| k * 20_000_000 <= b).count() as u64
                * (PER_WRITER / 1000)
                * WRITERS as u64;
            assert_eq!(cum[i], expected, "le={b}");
        }
    }
}
