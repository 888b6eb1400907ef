//! Sliding-window quantiles for the original exporter's summary families,
//! computed at scrape time from log-linear histograms.
//!
//! Owns: [`SlidingQuantiles`], one per (summary series, writer shard): a ring
//! of time-slice histograms; the scrape-side [`QuantileAccumulator`] that
//! adds shards together and answers quantiles; and [`SummaryWindow`], the
//! arithmetic from a clock reading to a slice epoch that writer and scrape
//! must share.
//! Never: allocates, locks, reads a clock, makes a syscall or uses a
//! read-modify-write instruction in [`SlidingQuantiles::record`]; keeps a
//! sample; lets the scrape write to a shard's memory.
//!
//! # Buckets and the error bound
//!
//! A value `v` goes to bucket `(shift << 6) + (v >> shift)`, where
//! `shift = max(0, floor(log2 v) - 6)`: values below 128 each have their own
//! bucket, and every power of two `[2^e, 2^(e+1))` above is split into 64
//! equal sub-buckets of width `w = 2^(e-6)`. That is [`BUCKETS`] = 59 × 64 =
//! 3,776 buckets for the whole `u64` range, so nothing is clamped: `u64::MAX`
//! is in the last bucket, which is as fine as the others.
//!
//! A quantile is the sample of nearest rank `ceil(q·n)` (Go's summaries
//! report approximately that rank). The histogram counts are exact, so the
//! bucket holding that rank is the bucket holding the exact sample `x`; the
//! reported value is the bucket's midpoint `m = lo + (w-1)/2`, clamped to the
//! window's exact `[min, max]` (which only moves it towards `x`). Width-1
//! buckets are exact. Otherwise `lo = mantissa · w` with `mantissa >= 64`, so
//! `|m - x| <= (w-1)/2 < w/2 <= lo/128 <= x/128`: the relative error is below
//! [`MAX_RELATIVE_ERROR`] = 1/128 ≈ 0.78 % (< 1 %), and 0 is exact. Quantile
//! 0 is the exact minimum and quantile 1 the exact maximum, which each slice
//! keeps beside its buckets.
//!
//! # Window
//!
//! Time is cut into slices of `window / K` ([`SummaryWindow`]); slice `e` is
//! epoch `e`. A scrape at epoch `now` sees the slices `now-K+1 ..= now`: the
//! current one, partly filled, and the `K-1` before it, so an observation is
//! reported for between `(K-1)/K` of the window and the whole window after
//! it was made. That is how Go's `MaxAge` with `AgeBuckets = K` behaves
//! (default 5, [`SummaryWindow::DEFAULT_SLICES`]). The ring has `K+1` slices
//! so that a writer already in epoch `now+1` (its clock read a little later
//! than the scrape's) reuses the slice of `now-K`, never one the scrape
//! still wants.
//!
//! A summary's `_count` and `_sum` are not kept here: they are the count and
//! sum of its histogram series (`Quantiles::series`), which records the same
//! observations, so they are Go's: over all time, never going down, and they
//! include a value whose epoch was too old for the ring.
//!
//! # Writer and scrape
//!
//! Exactly one thread records into a given [`SlidingQuantiles`]; each of its
//! atomics is written as `store(load() + n)` and never with `fetch_add`. The
//! scrape only loads. What a scrape may see while the writer moves into a
//! new slice is described at [`SlidingQuantiles::merge_into`].
//!
//! # Memory
//!
//! Per instance, allocated once in [`SlidingQuantiles::new`]:
//! `(K+1) · (3,776 · 8 + 128) + 32` bytes: 182,048 bytes (178 KiB) for the
//! default `K = 5` ([`SlidingQuantiles::heap_bytes`]); 4 series × 64 shards
//! is 44.4 MiB. A [`QuantileAccumulator`] is 59 KiB.

use std::sync::atomic::{
    fence, AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::Duration;

use crossbeam_utils::CachePadded;

/// log2 of the sub-buckets per power of two.
const SUB_BUCKET_BITS: u32 = 6;

/// Buckets of one slice histogram: 64 exact values below 64, then 64
/// sub-buckets for each of the 59 powers of two `2^6 ..= 2^63`.
pub const BUCKETS: usize = (65 - SUB_BUCKET_BITS as usize) << SUB_BUCKET_BITS;

/// Largest relative error of a reported quantile against the exact sample of
/// the same rank: half a bucket width over the bucket's lower bound, 1/128.
pub const MAX_RELATIVE_ERROR: f64 = 1.0 / (2u64 << SUB_BUCKET_BITS) as f64;
const _: () = assert!(MAX_RELATIVE_ERROR <= 0.01, "the summaries promise 1 %");

/// The epoch stamp of a slice that holds no epoch: never stamped, or being
/// cleared. Greater than every real epoch, so no window contains it.
const UNSTAMPED: u64 = u64::MAX;

/// The bucket of `value`: a `leading_zeros`, a subtraction and two shifts.
#[inline(always)]
fn bucket_index(value: u64) -> usize {
    // floor(log2(value)); `| 1` sends 0 where 1 goes (both are exact below).
    let log2 = 63 - (value | 1).leading_zeros();
    let shift = log2.saturating_sub(SUB_BUCKET_BITS);
    // `value >> shift` is below 128 already; the mask lets the compiler see
    // that the index is below `BUCKETS`: indexing a histogram checks nothing.
    ((shift as usize) << SUB_BUCKET_BITS) + ((value >> shift) & MANTISSA_MASK) as usize
}

/// `value >> shift` in [`bucket_index`] is below `2 << SUB_BUCKET_BITS`.
const MANTISSA_MASK: u64 = (2 << SUB_BUCKET_BITS) - 1;

/// Smallest value of bucket `index`, and the bucket's width.
fn bucket_range(index: usize) -> (u64, u64) {
    let shift = (index >> SUB_BUCKET_BITS).saturating_sub(1);
    let mantissa = (index - (shift << SUB_BUCKET_BITS)) as u64;
    (mantissa << shift, 1 << shift)
}

/// The value reported for a rank in bucket `index`: its midpoint.
fn bucket_midpoint(index: usize) -> f64 {
    let (low, width) = bucket_range(index);
    low as f64 + (width - 1) as f64 / 2.0
}

/// The summary window cut into slices, and the epoch of a clock reading.
///
/// Writers and the scrape must use the same `SummaryWindow` and the same
/// clock origin (a monotonic clock read once per batch, as time since the
/// process started), so that they agree on which slice is current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryWindow {
    slice: Duration,
    slices: u64,
}

impl SummaryWindow {
    /// Slices per window by default: Go's `DefAgeBuckets`.
    pub const DEFAULT_SLICES: u64 = 5;

    /// Most slices per window (memory grows with them, see the module doc).
    pub const MAX_SLICES: u64 = 64;

    /// `window` cut into `slices` equal slices.
    ///
    /// # Panics
    /// If `slices` is not in `1..=MAX_SLICES` or a slice would be shorter than
    /// a nanosecond: configuration is validated before this is called.
    pub fn new(window: Duration, slices: u64) -> SummaryWindow {
        assert!(
            (1..=Self::MAX_SLICES).contains(&slices),
            "summary window slices must be in 1..={}",
            Self::MAX_SLICES
        );
        let slice = window / slices as u32;
        assert!(!slice.is_zero(), "summary window slice is zero");
        SummaryWindow { slice, slices }
    }

    /// The window of `--summary-timeout` minutes, in the default slices.
    pub fn from_minutes(minutes: u64) -> SummaryWindow {
        Self::new(
            Duration::from_secs(minutes.saturating_mul(60)),
            Self::DEFAULT_SLICES,
        )
    }

    /// Number of slices `K` a scrape reports.
    pub fn slices(&self) -> u64 {
        self.slices
    }

    /// Length of one slice.
    pub fn slice(&self) -> Duration {
        self.slice
    }

    /// The epoch (slice number) of a clock reading `elapsed` since the
    /// shared origin. Computed by a writer once per batch, not per value.
    pub fn epoch(&self, elapsed: Duration) -> u64 {
        let epoch = elapsed.as_nanos() / self.slice.as_nanos();
        u64::try_from(epoch).unwrap_or(UNSTAMPED).min(UNSTAMPED - 1)
    }
}

/// A slice's epoch stamp and the exact extremes of its values.
struct SliceHeader {
    epoch: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

/// One slice of the ring: its header on a cache line of its own, and its
/// histogram. One ring index finds both, and the histogram is a fixed-size
/// array that a [`bucket_index`] (below [`BUCKETS`] by construction) indexes
/// without a bounds check.
struct Slice {
    header: CachePadded<SliceHeader>,
    buckets: [AtomicU64; BUCKETS],
}

impl Slice {
    fn empty() -> Slice {
        Slice {
            header: CachePadded::new(SliceHeader {
                epoch: AtomicU64::new(UNSTAMPED),
                min: AtomicU64::new(u64::MAX),
                max: AtomicU64::new(0),
            }),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Quantiles over a sliding window of one summary series, as written by one
/// writer shard; see the module doc for the buckets, the window and the
/// memory it takes.
pub struct SlidingQuantiles {
    /// Ring index of the slice the writer recorded into last (writer only;
    /// written once per slice, so it needs no cache line of its own).
    current: AtomicUsize,
    /// The ring, `K + 1` slices.
    ring: Box<[Slice]>,
    /// `K`: slices inside the window (the ring has `K + 1`).
    slices: u64,
}

impl SlidingQuantiles {
    /// An empty instance for `window`. Allocates all its memory, once.
    pub fn new(window: &SummaryWindow) -> SlidingQuantiles {
        let ring = window.slices() as usize + 1;
        SlidingQuantiles {
            current: AtomicUsize::new(0),
            ring: (0..ring).map(|_| Slice::empty()).collect(),
            slices: window.slices(),
        }
    }

    /// Bytes one instance takes, itself and its heap, for `slices` = `K`.
    pub const fn heap_bytes(slices: u64) -> usize {
        let ring = slices as usize + 1;
        size_of::<SlidingQuantiles>() + ring * size_of::<Slice>()
    }

    /// Records `value` as observed in slice `epoch` (from
    /// [`SummaryWindow::epoch`], computed once per batch by the caller).
    ///
    /// Only one thread may record into an instance: two at once would lose
    /// observations (never memory safety). Allocation-free by construction:
    /// it writes only atomics allocated in [`new`](Self::new), with no
    /// collection that could grow. An `epoch` older than every slice in the
    /// ring (the writer's clock went back a whole window) is not recorded
    /// here; the histogram series, which holds the summary's `_count` and
    /// `_sum`, still counts it.
    #[inline(always)]
    pub fn record(&self, value: u64, epoch: u64) {
        debug_assert_ne!(epoch, UNSTAMPED, "epoch out of range");
        // Fast path: still in the slice of the last record. Relaxed: the
        // writer reads back its own stores.
        let mut slice = &self.ring[self.current.load(Relaxed)];
        if slice.header.epoch.load(Relaxed) != epoch {
            match self.enter(epoch) {
                Some(s) => slice = s,
                None => return,
            }
        }
        let header = &*slice.header;
        // The extremes are stored before the bucket's Release store below, so
        // a scrape that counts this value also sees them (merge_into).
        if value < header.min.load(Relaxed) {
            header.min.store(value, Relaxed);
        }
        if value > header.max.load(Relaxed) {
            header.max.store(value, Relaxed);
        }
        let bucket = &slice.buckets[bucket_index(value)];
        bucket.store(bucket.load(Relaxed).wrapping_add(1), Release);
    }

    /// Makes the ring slice of `epoch` current, clearing it first if it holds
    /// an older epoch. `None` if it holds a newer one.
    #[cold]
    #[inline(never)]
    fn enter(&self, epoch: u64) -> Option<&Slice> {
        let slot = (epoch % self.ring.len() as u64) as usize;
        let slice = &self.ring[slot];
        let header = &*slice.header;
        let stamped = header.epoch.load(Relaxed);
        if stamped != UNSTAMPED && stamped > epoch {
            return None;
        }
        if stamped != epoch {
            // Unstamp, then clear, then stamp. The Release fence orders the
            // unstamping before every store that follows (the clearing, and
            // the new epoch's records): a scrape that loads any of them sees
            // the stamp changed and drops what it read (merge_into).
            header.epoch.store(UNSTAMPED, Relaxed);
            fence(Release);
            let (min, max) = (header.min.load(Relaxed), header.max.load(Relaxed));
            if min <= max {
                // Every non-zero bucket lies between the extremes' buckets.
                for bucket in &slice.buckets[bucket_index(min)..=bucket_index(max)] {
                    bucket.store(0, Relaxed);
                }
            }
            header.min.store(u64::MAX, Relaxed);
            header.max.store(0, Relaxed);
            // Release: a scrape that loads the new stamp with Acquire sees
            // the slice cleared.
            header.epoch.store(epoch, Release);
        }
        self.current.store(slot, Relaxed);
        Some(slice)
    }

    /// Adds the slices of epochs `now_epoch-K+1 ..= now_epoch` (those that
    /// exist) into `acc`. Only loads.
    ///
    /// Each slice is read like a sequence lock: its stamp with `Acquire`, its
    /// counts into `acc`'s scratch with `Relaxed`, an `Acquire` fence, then the
    /// stamp again; the counts are added only if the stamp is unchanged and in
    /// the window. So during a rotation the scrape sees, per slice:
    /// - the stamp of an epoch in the window: then every count it adds was
    ///   recorded in that epoch. The stamp is stored (Release) after the
    ///   clearing, so none of the cleared epoch's counts can show through,
    ///   and a record that lands during the read may be counted or not.
    /// - the unstamped marker, or an epoch outside the window: the slice is
    ///   skipped.
    /// - a stamp that changes during the read (the writer cleared it for an
    ///   epoch at least `now_epoch + 2`, so its old epoch was leaving the
    ///   window anyway): the whole slice is dropped, never half of it.
    ///
    /// The window's count is therefore at most the observations recorded in
    /// its epochs, and exactly those when the writer is quiet. The
    /// quantiles are computed from the counts added, so ranks are consistent
    /// with [`QuantileAccumulator::window_count`]; the extremes are loaded
    /// after the counts, so they bound every value counted (they may also
    /// include a value recorded during the read).
    pub fn merge_into(&self, now_epoch: u64, acc: &mut QuantileAccumulator) {
        for slice in self.ring.iter() {
            let header = &*slice.header;
            let stamped = header.epoch.load(Acquire);
            // UNSTAMPED > now_epoch, so it fails the first test.
            if stamped > now_epoch || now_epoch - stamped >= self.slices {
                continue;
            }
            let (min, max) = (header.min.load(Relaxed), header.max.load(Relaxed));
            if min > max {
                continue; // empty
            }
            let used = bucket_index(min)..=bucket_index(max);
            let n = load_counts(&slice.buckets[used.clone()], &mut acc.scratch[used.clone()]);
            // Pairs with the writer's Release fence (a changed stamp shows
            // below) and with its Release bucket stores (the extremes of
            // every value counted show below).
            fence(Acquire);
            let (min, max) = (header.min.load(Relaxed), header.max.load(Relaxed));
            if header.epoch.load(Relaxed) != stamped || n == 0 {
                continue;
            }
            for (total, scratch) in acc.buckets[used.clone()]
                .iter_mut()
                .zip(&acc.scratch[used.clone()])
            {
                *total = total.wrapping_add(*scratch);
            }
            acc.low = acc.low.min(*used.start());
            acc.high = acc.high.max(*used.end());
            acc.window_count = acc.window_count.wrapping_add(n);
            acc.min = acc.min.min(min);
            acc.max = acc.max.max(max);
        }
    }
}

/// Loads `counts` (`Relaxed`) into `scratch`, which is as long, and returns
/// their sum. Written four at a time so that the compiler unrolls it: a slice
/// may use thousands of buckets, and this loop is most of a scrape's time.
fn load_counts(counts: &[AtomicU64], scratch: &mut [u64]) -> u64 {
    let mut n = 0u64;
    let mut counts4 = counts.chunks_exact(4);
    let mut scratch4 = scratch.chunks_exact_mut(4);
    for (c, s) in (&mut counts4).zip(&mut scratch4) {
        for (count, scratch) in c.iter().zip(s) {
            *scratch = count.load(Relaxed);
            n = n.wrapping_add(*scratch);
        }
    }
    for (count, scratch) in counts4.remainder().iter().zip(scratch4.into_remainder()) {
        *scratch = count.load(Relaxed);
        n = n.wrapping_add(*scratch);
    }
    n
}

/// The scrape's sum of [`SlidingQuantiles`] shards for one series: bucket
/// counts of the window and its extremes. Allocated once and reused:
/// [`clear`](Self::clear) it before each scrape.
pub struct QuantileAccumulator {
    buckets: Box<[u64]>,
    /// Where `merge_into` reads a slice before it knows the slice is valid.
    scratch: Box<[u64]>,
    /// Bucket index range that may be non-zero (`low > high`: none).
    low: usize,
    high: usize,
    window_count: u64,
    min: u64,
    max: u64,
}

impl Default for QuantileAccumulator {
    fn default() -> Self {
        QuantileAccumulator {
            buckets: vec![0; BUCKETS].into_boxed_slice(),
            scratch: vec![0; BUCKETS].into_boxed_slice(),
            low: BUCKETS,
            high: 0,
            window_count: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl QuantileAccumulator {
    /// An empty accumulator (59 KiB).
    pub fn new() -> QuantileAccumulator {
        Self::default()
    }

    /// Empties it for the next scrape, keeping its memory.
    pub fn clear(&mut self) {
        if self.low <= self.high {
            self.buckets[self.low..=self.high].fill(0);
        }
        self.low = BUCKETS;
        self.high = 0;
        self.window_count = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// The `q` quantile of the window in the recorded unit: the nearest-rank
    /// sample (`ceil(q·n)`-th smallest) within [`MAX_RELATIVE_ERROR`], the
    /// exact minimum for `q <= 0` and the exact maximum for `q >= 1`. `None`
    /// when the window is empty (Go renders that as `NaN`) or `q` is NaN.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.window_count;
        if n == 0 || q.is_nan() {
            return None;
        }
        if q <= 0.0 {
            return Some(self.min as f64);
        }
        if q >= 1.0 {
            return Some(self.max as f64);
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0u64;
        for index in self.low..=self.high {
            seen = seen.wrapping_add(self.buckets[index]);
            if seen >= rank {
                // max then min, not clamp: no panic even if they crossed.
                return Some(
                    bucket_midpoint(index)
                        .min(self.max as f64)
                        .max(self.min as f64),
                );
            }
        }
        Some(self.max as f64) // not reached: the buckets add up to n
    }

    /// Smallest value in the window, exactly.
    pub fn min(&self) -> Option<u64> {
        (self.window_count > 0).then_some(self.min)
    }

    /// Largest value in the window, exactly.
    pub fn max(&self) -> Option<u64> {
        (self.window_count > 0).then_some(self.max)
    }

    /// Observations in the window (what the quantiles are computed from).
    pub fn window_count(&self) -> u64 {
        self.window_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicBool;

    /// Every quantile the tests compare: 0.01 ..= 0.99 and the objectives.
    fn quantiles() -> impl Iterator<Item = f64> {
        (1..=99)
            .map(|i| i as f64 / 100.0)
            .chain([0.0, 0.95, 0.999, 1.0])
    }

    /// The `ceil(q·n)`-th smallest sample (1-based, at least the first).
    fn nearest_rank(sorted: &[u64], q: f64) -> u64 {
        let n = sorted.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        sorted[rank as usize - 1]
    }

    fn window(slices: u64) -> SummaryWindow {
        SummaryWindow::new(Duration::from_secs(60), slices)
    }

    /// Records `samples` in one epoch and checks every quantile against the
    /// exact one, plus the extremes and the window's count.
    fn check_against_exact(samples: &[u64]) {
        let shard = SlidingQuantiles::new(&window(5));
        for &v in samples {
            shard.record(v, 7);
        }
        let mut acc = QuantileAccumulator::new();
        shard.merge_into(7, &mut acc);
        check_accumulator(&acc, samples);
    }

    fn check_accumulator(acc: &QuantileAccumulator, samples: &[u64]) {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        assert_eq!(acc.window_count(), sorted.len() as u64);
        assert_eq!(acc.min(), sorted.first().copied());
        assert_eq!(acc.max(), sorted.last().copied());
        assert_eq!(acc.quantile(0.0), Some(sorted[0] as f64));
        assert_eq!(acc.quantile(1.0), Some(*sorted.last().unwrap() as f64));
        for q in quantiles() {
            let exact = nearest_rank(&sorted, q);
            let got = acc.quantile(q).unwrap();
            if exact == 0 {
                assert_eq!(got, 0.0, "q={q}");
            } else {
                let error = (got - exact as f64).abs() / exact as f64;
                assert!(
                    error <= MAX_RELATIVE_ERROR * (1.0 + 1e-12),
                    "q={q}: got {got}, exact {exact}, error {error}"
                );
            }
        }
    }

    /// splitmix64: a deterministic source for the distributions.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in (0, 1].
        fn unit(&mut self) -> f64 {
            ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            let (u, v) = (self.unit(), self.unit());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    const N: usize = 20_000;

    #[test]
    fn buckets_tile_the_u64_range_and_bound_the_error() {
        // Consecutive, non-overlapping, starting at 0 and ending at u64::MAX.
        let mut next = 0u64;
        for index in 0..BUCKETS {
            let (low, width) = bucket_range(index);
            assert_eq!(low, next, "bucket {index}");
            assert_eq!(bucket_index(low), index);
            let high = low + (width - 1);
            assert_eq!(bucket_index(high), index);
            if width > 1 {
                assert!(width as f64 / low as f64 <= 1.0 / 64.0, "bucket {index}");
            }
            next = high.wrapping_add(1);
        }
        assert_eq!(next, 0, "the last bucket ends at u64::MAX");
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
        for v in 0..128 {
            assert_eq!(bucket_index(v), v as usize, "exact below 128");
        }
        for v in 0..200_000u64 {
            let (low, width) = bucket_range(bucket_index(v));
            assert!(low <= v && v - low < width);
        }
    }

    #[test]
    fn quantiles_match_exact_ones_within_one_percent() {
        let mut rng = Rng(42);
        let uniform: Vec<u64> = (0..N).map(|_| rng.next() % 1_000_000).collect();
        // Log-normal latencies around 1 ms, sigma 2 (spans ns to minutes).
        let log_normal: Vec<u64> = (0..N)
            .map(|_| (1e6 * (2.0 * rng.normal()).exp()) as u64)
            .collect();
        // Pareto, alpha 1.1, from 10 µs: a heavy tail.
        let heavy: Vec<u64> = (0..N)
            .map(|_| (1e4 / rng.unit().powf(1.0 / 1.1)).min(1.8e19) as u64)
            .collect();
        let constant = vec![123_456_789u64; N];
        // Log-uniform from 1 ns to 100 s.
        let ns_to_100s: Vec<u64> = (0..N)
            .map(|_| 10f64.powf(11.0 * rng.unit()) as u64)
            .collect();
        let tiny: Vec<u64> = (0..N).map(|_| rng.next() % 11).collect();
        // The whole range, extremes included.
        let mut full: Vec<u64> = (0..N).map(|_| rng.next() >> (rng.next() % 64)).collect();
        full.extend([0, 1, u64::MAX, u64::MAX - 1, 1 << 63]);
        for samples in [
            &uniform,
            &log_normal,
            &heavy,
            &constant,
            &ns_to_100s,
            &tiny,
            &full,
        ] {
            check_against_exact(samples);
        }
        check_against_exact(&[0]);
        check_against_exact(&[u64::MAX]);
        check_against_exact(&[5, 1_000_000_007]);
    }

    #[test]
    fn shards_merge_to_the_quantiles_of_all_their_samples() {
        let mut rng = Rng(7);
        let samples: Vec<u64> = (0..N)
            .map(|_| (1e5 * (1.5 * rng.normal()).exp()) as u64)
            .collect();
        let w = window(5);
        let one = SlidingQuantiles::new(&w);
        let shards: Vec<_> = (0..4).map(|_| SlidingQuantiles::new(&w)).collect();
        for &v in &samples {
            one.record(v, 3);
            // Uneven split, and one shard in the previous epoch.
            let shard = (rng.next() % 4) as usize;
            shards[shard].record(v, if shard == 3 { 2 } else { 3 });
        }
        let (mut merged, mut single) = (QuantileAccumulator::new(), QuantileAccumulator::new());
        for shard in &shards {
            shard.merge_into(3, &mut merged);
        }
        one.merge_into(3, &mut single);
        check_accumulator(&merged, &samples);
        assert_eq!(merged.window_count(), single.window_count());
        for q in quantiles() {
            assert_eq!(merged.quantile(q), single.quantile(q), "q={q}");
        }
        // A reused accumulator gives the same answer after clear.
        merged.clear();
        assert_eq!(merged.window_count(), 0);
        assert_eq!((merged.min(), merged.max()), (None, None));
        assert_eq!(merged.quantile(0.5), None);
        for shard in &shards {
            shard.merge_into(3, &mut merged);
        }
        check_accumulator(&merged, &samples);
    }

    #[test]
    fn old_slices_leave_the_window() {
        const K: u64 = 5;
        let q = SlidingQuantiles::new(&window(K));
        let mut acc = QuantileAccumulator::new();
        let merged = |now: u64, acc: &mut QuantileAccumulator| {
            acc.clear();
            q.merge_into(now, acc);
        };

        // Wide values in epochs 0..=2, then narrow ones in 10..=12.
        for e in 0..=2 {
            for v in 0..1000u64 {
                q.record(v * 1_000_000_000, e);
            }
        }
        merged(2, &mut acc);
        assert_eq!(acc.window_count(), 3000);
        for e in 10..=12 {
            for v in 0..100u64 {
                q.record(5_000 + v, e);
            }
        }
        merged(12, &mut acc);
        assert_eq!(
            acc.window_count(),
            300,
            "epochs 0..=2 are out of the window"
        );
        assert_eq!((acc.min(), acc.max()), (Some(5_000), Some(5_099)));
        assert!(acc.quantile(0.99).unwrap() < 5_100.0);

        // The window is now-K+1 ..= now: epoch 10 is in at 14, out at 15.
        merged(14, &mut acc);
        assert_eq!(acc.window_count(), 300);
        merged(15, &mut acc);
        assert_eq!(acc.window_count(), 200);
        merged(16, &mut acc);
        assert_eq!(acc.window_count(), 100);
        merged(17, &mut acc);
        assert_eq!(acc.window_count(), 0);
        assert_eq!(
            (acc.quantile(0.5), acc.quantile(1.0), acc.min()),
            (None, None, None)
        );
        // A scrape behind the writer does not see the writer's newer slices.
        merged(11, &mut acc);
        assert_eq!(acc.window_count(), 200);

        // Epoch 18 reuses the ring slice of 12 (ring K+1 = 6): only new values.
        q.record(7, 18);
        merged(18, &mut acc);
        assert_eq!(
            (acc.window_count(), acc.min(), acc.max()),
            (1, Some(7), Some(7))
        );
        // An epoch older than its ring slice is not recorded.
        q.record(1_000, 12);
        merged(18, &mut acc);
        assert_eq!(
            (acc.window_count(), acc.min(), acc.max()),
            (1, Some(7), Some(7))
        );
        // Nor anywhere a scrape at 12 looks: epoch 12's slice is 18's now.
        merged(12, &mut acc);
        assert_eq!(
            (acc.window_count(), acc.min(), acc.max()),
            (200, Some(5_000), Some(5_099))
        );
        // Going back inside the ring is fine: epoch 17's slice was 11's.
        q.record(9, 17);
        merged(18, &mut acc);
        assert_eq!(
            (acc.window_count(), acc.min(), acc.max()),
            (2, Some(7), Some(9))
        );
    }

    #[test]
    fn load_counts_copies_and_sums_every_length() {
        for len in 0..=9u64 {
            let counts: Vec<AtomicU64> = (1..=len).map(AtomicU64::new).collect();
            let mut scratch = vec![0; len as usize];
            assert_eq!(load_counts(&counts, &mut scratch), len * (len + 1) / 2);
            assert!(scratch.iter().copied().eq(1..=len), "len {len}");
        }
    }

    #[test]
    fn window_arithmetic() {
        let w = SummaryWindow::from_minutes(10);
        assert_eq!((w.slices(), w.slice()), (5, Duration::from_secs(120)));
        assert_eq!(w.epoch(Duration::ZERO), 0);
        assert_eq!(w.epoch(Duration::from_secs(119)), 0);
        assert_eq!(w.epoch(Duration::from_secs(120)), 1);
        let ns = SummaryWindow::new(Duration::from_nanos(1), 1);
        assert_eq!(ns.epoch(Duration::MAX), UNSTAMPED - 1, "never the marker");
        let bytes = SlidingQuantiles::heap_bytes(SummaryWindow::DEFAULT_SLICES);
        assert!(bytes <= 300 * 1024, "{bytes} bytes per instance");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(bytes, 182_048, "as the module doc says");
        }
    }

    /// A writer moves through epochs (with gaps) while a scraper merges in a
    /// loop, sometimes a few epochs behind. Each epoch's first two values are
    /// markers, `e` (its minimum) and `2^60 + e` (its maximum), so the merged
    /// extremes name the oldest and newest epochs counted.
    #[test]
    fn rotation_under_a_concurrent_scrape() {
        const K: u64 = 3;
        const EPOCHS: u64 = 5_000;
        const MARK: u64 = 1 << 60;
        let q = SlidingQuantiles::new(&window(K));
        let schedule: Vec<(u64, u64)> = (0..EPOCHS)
            .scan(0u64, |e, j| {
                *e += if j % 7 == 6 { 3 } else { 1 };
                Some((*e, 2 + (j * 37) % 150))
            })
            .collect();
        let published = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut rng = Rng(1);
                for &(e, n) in &schedule {
                    published.store(e, Release);
                    q.record(e, e);
                    q.record(MARK + e, e);
                    for _ in 2..n {
                        // Log-uniform between 2^20 and 2^50: wide slices.
                        q.record((1 << 20) + (rng.next() >> (14 + rng.next() % 30)), e);
                    }
                }
                done.store(true, Release);
            });
            s.spawn(|| {
                let mut acc = QuantileAccumulator::new();
                let mut scrapes = 0u64;
                while !done.load(Acquire) || scrapes < 100 {
                    let now = published.load(Acquire).saturating_sub(scrapes % 3);
                    acc.clear();
                    q.merge_into(now, &mut acc);
                    let end = published.load(Acquire);
                    let bound: u64 = schedule
                        .iter()
                        .filter(|&&(e, _)| e <= now && now - e < K && e <= end)
                        .map(|&(_, n)| n)
                        .sum();
                    assert!(
                        acc.window_count() <= bound,
                        "{} > {bound}",
                        acc.window_count()
                    );
                    if acc.window_count() > 0 {
                        let (min, max) = (acc.min().unwrap(), acc.max().unwrap());
                        assert!(min <= now && now - min < K, "epoch {min} counted at {now}");
                        match max.checked_sub(MARK) {
                            Some(newest) => {
                                assert!(
                                    newest <= now && now - newest < K,
                                    "epoch {newest} at {now}"
                                )
                            }
                            // The scrape came between the newest epoch's first
                            // record (its minimum marker) and its second: that
                            // marker is all it counted (a slice's extremes are
                            // stored before any of its values is counted).
                            None => assert_eq!((min, acc.window_count()), (max, 1)),
                        }
                        for p in [0.01, 0.5, 0.99, 1.0] {
                            let v = acc.quantile(p).unwrap();
                            assert!(min as f64 <= v && v <= max as f64);
                        }
                    }
                    scrapes += 1;
                }
            });
        });
        // Quiet now: the last K epochs, exactly.
        let last = schedule.last().unwrap().0;
        let mut acc = QuantileAccumulator::new();
        q.merge_into(last, &mut acc);
        let expected: u64 = schedule
            .iter()
            .filter(|&&(e, _)| last - e < K)
            .map(|&(_, n)| n)
            .sum();
        assert_eq!(acc.window_count(), expected);
    }

    fn sample() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..16,
            0u64..100_000,
            // Any magnitude: a random word shifted right by 0..64 bits.
            (any::<u64>(), 0u32..64).prop_map(|(v, bits)| v >> bits),
            any::<u64>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_samples_stay_within_the_error_bound(
            samples in prop::collection::vec(sample(), 1..300),
        ) {
            check_against_exact(&samples);
        }
    }
}
