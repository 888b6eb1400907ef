//! Per-writer shards of atomic counters, and the merge of all shards into a
//! snapshot.
//!
//! Owns: the memory every per-event observation goes to, the labelled
//! blocks that hold the Service families' series, and the rules that make a
//! lock-free scrape consistent.
//! Never: lets two threads write one shard ([`ShardSet::writer`] hands each
//! shard out once at a time), allocates after construction on the write
//! path, or uses a read-modify-write instruction on it.
//!
//! # Layout
//!
//! A shard holds its own slots (the reader's batch-size histogram and the
//! counters), then `blocks` labelled blocks, each one copy of every keyed
//! series (`Series::keyed`: the Service families) and of every
//! [`BlockGauge`], on cache lines of its own.
//! A block's labels are [`BlockLabels::Node`] (the node's own series, no
//! label beyond the family's) or a [`SeriesKey`] set at run time, which the
//! renderer turns into label values. [`ShardSet::new`] makes one block,
//! labelled `Node`: every Service observation goes there. A set made with
//! [`ShardSet::with_blocks`] has more, free until its writer labels them
//! ([`ShardWriter::relabel`]); the scrape adds up blocks of equal labels
//! across shards.
//!
//! # Why the orderings are enough
//!
//! Every slot has exactly one writer, which does `store(load() + n)` with
//! `Relaxed` (a block gauge's: `store(value)`). Nothing else is published
//! through a slot, so no slot needs to order other memory. The scrape reads
//! each slot with `Relaxed`: coherence alone guarantees that one thread's
//! successive reads of one location never see an older value, so a counting
//! slot, and hence any sum of them, never goes down from one scrape to the
//! next, and a gauge shows a value its writer stored. Buckets and `_sum` are separate slots, each
//! read at some value it held during the scrape, so they may disagree by the
//! observations made meanwhile; the count is derived from the buckets, so
//! `+Inf` and `_count` always agree.
//!
//! Relabelling a block is the one multi-word update: its labels change and
//! its slots go back to zero together. It is a sequence lock: the writer
//! makes the block's sequence odd, `Release` fence, rewrites the labels and
//! zeroes the slots in use, then stores the next even sequence with
//! `Release`. The scrape loads the sequence (`Acquire`), the labels and
//! slots, an `Acquire` fence, and the sequence again; it keeps the block
//! only if both readings are the same even number. A scrape that read any
//! value written after the writer's fence synchronises with it and sees the
//! odd (or a later) sequence, so it never pairs one label set with
//! another's counts. A block caught mid-relabel is left out of that scrape.
//!
//! `loom_model` at the bottom of this file checks these rules on this code
//! under loom, every interleaving of a writer and a scrape up to a bound
//! (tests/run.sh runs it).
//!
//! A histogram's sum slot holds the bits of an `f64` (as Go's histograms
//! keep their sums): observations are integers, added exactly while the sum
//! is below 2^53 units, and past that rounded, but never wrapped. A `u64` of
//! nanoseconds would wrap within hours on a busy node with long-lived
//! connections (FIN latency sums), and a wrapped sum goes down. Adding a
//! non-negative value to an `f64` never makes it smaller.

use std::time::Instant;

use crossbeam_utils::CachePadded;

use super::family::{BlockGauge, Counter, Quantiles, Series, BLOCK_SLOTS, SHARD_SLOTS};
use super::summary::{QuantileAccumulator, SlidingQuantiles, SummaryWindow};
// std's atomics, or loom's in the model below.
use super::sync::Ordering::{Acquire, Relaxed, Release};
use super::sync::{fence, AtomicBool, AtomicU64, Ordering};

const SLOTS_PER_LINE: usize = 8;
/// Cache lines of a shard's own slots.
const OWN_LINES: usize = SHARD_SLOTS.div_ceil(SLOTS_PER_LINE);
/// Cache lines of one block.
const BLOCK_LINES: usize = BLOCK_SLOTS.div_ceil(SLOTS_PER_LINE);

/// What [`ShardWriter::observe_in`] needs of a series, computed at compile
/// time so that a series that is not a constant costs one table lookup, not
/// a `match` per property.
#[derive(Clone, Copy)]
struct Layout {
    /// [`Series::offset`], in its region.
    offset: usize,
    /// The family's bounds.
    bounds: &'static [u64],
    /// Index of its summary in `Shard::quantiles`, or `NO_SUMMARY`.
    summary: usize,
    /// [`Series::keyed`]: the series lives in a block.
    keyed: bool,
}

const NO_SUMMARY: usize = usize::MAX;

/// [`Layout`] of every series, indexed by `Series as usize`.
const LAYOUTS: [Layout; Series::ALL.len()] = {
    let mut out = [Layout {
        offset: 0,
        bounds: &[],
        summary: NO_SUMMARY,
        keyed: false,
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
            keyed: s.keyed(),
        };
        i += 1;
    }
    out
};

/// The first slot of block `block` in a shard.
#[inline(always)]
const fn block_base(block: usize) -> usize {
    (OWN_LINES + block * BLOCK_LINES) * SLOTS_PER_LINE
}

/// A run-time label set of a block, opaque here: 24 bytes that the renderer
/// turns into label values (for a Service: its address, port and
/// protocol). Fixed-size, so that labelling a block allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey(pub [u64; 3]);

/// What a block's series are labelled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockLabels {
    /// The node's own series: no label beyond the family's.
    Node,
    /// Series labelled from a key.
    Key(SeriesKey),
}

/// A block's number, the same in every shard of a set; made by
/// [`ShardSet::block`], so it is always in range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId(usize);

impl BlockId {
    /// Block 0: in a set from [`ShardSet::new`], the node's own series.
    pub const NODE: BlockId = BlockId(0);

    /// The block's number.
    pub fn index(self) -> usize {
        self.0
    }
}

/// `BlockHead::state` values.
const FREE: u64 = 0;
const NODE: u64 = 1;
const KEYED: u64 = 2;

/// A block's labels and the sequence that guards them (module doc).
struct BlockHead {
    /// Even while labels and slots are stable, odd while the writer
    /// relabels the block.
    sequence: AtomicU64,
    /// [`FREE`], [`NODE`] or [`KEYED`].
    state: AtomicU64,
    /// The key's words, when [`KEYED`].
    key: [AtomicU64; 3],
}

impl BlockHead {
    fn new(state: u64) -> BlockHead {
        BlockHead {
            sequence: AtomicU64::new(0),
            state: AtomicU64::new(state),
            key: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// One writer's counters: whole cache lines, so no two shards share one;
/// its blocks' labels; and its sliding quantiles, one per summary series.
struct Shard {
    /// The shard's own slots, then its blocks, each starting a line.
    lines: Box<[CachePadded<[AtomicU64; SLOTS_PER_LINE]>]>,
    heads: Box<[CachePadded<BlockHead>]>,
    quantiles: [SlidingQuantiles; Quantiles::ALL.len()],
    claimed: CachePadded<AtomicBool>,
}

impl Shard {
    fn new(window: &SummaryWindow, blocks: usize) -> Shard {
        Shard {
            lines: (0..block_base(blocks) / SLOTS_PER_LINE)
                .map(|_| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            heads: (0..blocks)
                .map(|b| CachePadded::new(BlockHead::new(if b == 0 { NODE } else { FREE })))
                .collect(),
            quantiles: std::array::from_fn(|_| SlidingQuantiles::new(window)),
            claimed: CachePadded::new(AtomicBool::new(false)),
        }
    }

    #[inline(always)]
    fn slot(&self, i: usize) -> &AtomicU64 {
        &self.lines[i / SLOTS_PER_LINE][i % SLOTS_PER_LINE]
    }

    /// Reads block `block` into `into` under its sequence lock: its labels,
    /// or `None` if it is free or was being relabelled.
    fn read_block(&self, block: usize, into: &mut [u64]) -> Option<BlockLabels> {
        let head = &self.heads[block];
        let before = head.sequence.load(Acquire);
        if before & 1 == 1 {
            return None;
        }
        let state = head.state.load(Relaxed);
        let key = SeriesKey(std::array::from_fn(|i| head.key[i].load(Relaxed)));
        let base = block_base(block);
        for (i, v) in into.iter_mut().enumerate() {
            *v = self.slot(base + i).load(Relaxed);
        }
        fence(Acquire);
        if head.sequence.load(Relaxed) != before {
            return None;
        }
        match state {
            NODE => Some(BlockLabels::Node),
            KEYED => Some(BlockLabels::Key(key)),
            _ => None,
        }
    }
}

/// All shards of the process, shared by the writers and the exporter thread.
pub struct ShardSet {
    shards: Box<[Shard]>,
    blocks: usize,
    window: SummaryWindow,
    /// The clock writers and scrapes both count summary epochs from.
    start: Instant,
}

impl ShardSet {
    /// `count` shards (at least one), all zero, with summaries over `window`
    /// and one block, the node's own.
    pub fn new(count: usize, window: SummaryWindow) -> ShardSet {
        Self::with_blocks(count, window, 1)
    }

    /// `count` shards of `blocks` blocks each (at least one): block 0
    /// labelled [`BlockLabels::Node`], the others free until a writer
    /// labels them.
    pub fn with_blocks(count: usize, window: SummaryWindow, blocks: usize) -> ShardSet {
        let blocks = blocks.max(1);
        ShardSet {
            shards: (0..count.max(1))
                .map(|_| Shard::new(&window, blocks))
                .collect(),
            blocks,
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

    /// Blocks per shard.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Block `index`, if the set has it.
    pub fn block(&self, index: usize) -> Option<BlockId> {
        (index < self.blocks).then_some(BlockId(index))
    }

    /// Bytes of shared memory the set's slots and block labels take
    /// (without the summaries').
    pub fn slot_bytes(&self) -> usize {
        let per_shard = block_base(self.blocks) * size_of::<AtomicU64>()
            + self.blocks * size_of::<CachePadded<BlockHead>>();
        per_shard * self.shards.len()
    }

    /// The writer of shard `index`, or `None` if it is out of range or
    /// already has a writer. The shard is free again when the writer drops.
    pub fn writer(&self, index: usize) -> Option<ShardWriter<'_>> {
        let shard = self.shards.get(index)?;
        // Acquire pairs with the Release in `ShardWriter::drop`: a new writer
        // sees every store of the previous one before it adds to them.
        shard
            .claimed
            .compare_exchange(false, true, Acquire, Relaxed)
            .ok()?;
        Some(ShardWriter {
            shard,
            set: self,
            epoch: self.epoch_at(Instant::now()),
        })
    }

    /// Adds every shard into `snapshot`, with the summaries' window ending
    /// now.
    pub fn merge_into(&self, snapshot: &mut Snapshot) {
        self.merge_at(snapshot, Instant::now());
    }

    /// [`Self::merge_into`] with the window ending at `now`.
    pub fn merge_at(&self, snapshot: &mut Snapshot, now: Instant) {
        snapshot.begin();
        for shard in self.shards.iter() {
            snapshot.own.add(|i| shard.slot(i).load(Relaxed), false);
            for block in 0..self.blocks {
                if let Some(labels) = shard.read_block(block, &mut snapshot.scratch) {
                    let scratch = &snapshot.scratch;
                    block_mut(&mut snapshot.blocks, labels).add(|i| scratch[i], true);
                }
            }
        }
        snapshot.finish();
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

    /// Records `value` (in the series' stored unit) into block 0 for a keyed
    /// series, and into its summary if it has one.
    #[inline(always)]
    pub fn observe(&mut self, series: Series, value: u64) {
        self.observe_in(BlockId::NODE, series, value);
    }

    /// Records `value` (in the series' stored unit) into its bucket and sum,
    /// in `block` for a keyed series (the shard's own slots otherwise), and
    /// into its summary if it has one (summaries are the node's: one per
    /// shard, whatever the block).
    ///
    /// Always inlined: callers mostly pass a constant series, and then the
    /// table lookups fold away and the bucket search is unrolled over the
    /// family's bounds.
    #[inline(always)]
    pub fn observe_in(&mut self, block: BlockId, series: Series, value: u64) {
        let Layout {
            offset,
            bounds,
            summary,
            keyed,
        } = LAYOUTS[series as usize];
        let at = if keyed { block_base(block.0) } else { 0 } + offset;
        // First bound >= value (`le` is inclusive); bounds.len() is +Inf.
        let bucket = bounds.partition_point(|&b| b < value);
        // Both slots found before either is written: a store to an atomic
        // would make the compiler load the shard's line pointer again.
        let (count, sum) = (
            self.shard.slot(at + bucket),
            self.shard.slot(at + bounds.len() + 1),
        );
        self.add(count, 1);
        self.add_f64(sum, value);
        if let Some(quantiles) = self.shard.quantiles.get(summary) {
            quantiles.record(value, self.epoch);
        }
    }

    /// Block `index` of this writer's set, if it has that many.
    #[inline]
    pub fn block(&self, index: usize) -> Option<BlockId> {
        self.set.block(index)
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn count(&mut self, counter: Counter, n: u64) {
        self.add(self.shard.slot(counter.slot()), n);
    }

    /// Sets `gauge` of `block` to `value`: the writer's own share of it,
    /// which a scrape adds to the other shards' blocks of the same labels.
    /// A relabel sets it back to zero with the block's other slots.
    #[inline]
    pub fn set_gauge(&mut self, block: BlockId, gauge: BlockGauge, value: u64) {
        let slot = self.shard.slot(block_base(block.0) + gauge.slot());
        // Single writer: the load returns its own last store. An unchanged
        // value leaves the line clean.
        if slot.load(Relaxed) != value {
            slot.store(value, Relaxed);
        }
    }

    /// Labels `block` with `labels`, or frees it with `None`. Its series
    /// start again from zero under the new labels, or leave the exposition.
    /// Allocates nothing and takes no lock; costs one pass over the block's
    /// slots, so it belongs where a flow first meets its block, not on every
    /// event.
    pub fn relabel(&mut self, block: BlockId, labels: Option<BlockLabels>) {
        let head = &self.shard.heads[block.0];
        let sequence = head.sequence.load(Relaxed);
        head.sequence.store(sequence.wrapping_add(1), Relaxed);
        // Orders the odd sequence before every store below, for a scrape
        // that reads any of them (module doc).
        fence(Release);
        let (state, key) = match labels {
            None => (FREE, [0; 3]),
            Some(BlockLabels::Node) => (NODE, [0; 3]),
            Some(BlockLabels::Key(key)) => (KEYED, key.0),
        };
        head.state.store(state, Relaxed);
        for (word, value) in head.key.iter().zip(key) {
            word.store(value, Relaxed);
        }
        let base = block_base(block.0);
        for i in 0..BLOCK_SLOTS {
            // A slot that reads 0 is left alone: this writer is its only
            // one, so the load returns its last store, and every scrape that
            // keeps the block under the new sequence sees that store or a
            // later one. Only the slots the old labels used are written.
            let slot = self.shard.slot(base + i);
            if slot.load(Relaxed) != 0 {
                slot.store(0, Relaxed);
            }
        }
        head.sequence.store(sequence.wrapping_add(2), Release);
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

/// The series of one region (a block, or a shard's own slots) added over
/// shards: bucket counts, and the sums decoded from their `f64` bits (the
/// sum slots among `slots` add up those bits and mean nothing).
#[derive(Clone, Debug)]
struct Region {
    slots: Box<[u64]>,
    /// Sums, indexed by `Series as usize`.
    sums: [f64; Series::ALL.len()],
}

impl Region {
    fn new(slots: usize) -> Region {
        Region {
            slots: vec![0; slots].into_boxed_slice(),
            sums: [0.0; Series::ALL.len()],
        }
    }

    fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = 0);
        self.sums = [0.0; Series::ALL.len()];
    }

    /// Adds the region whose slot `i` reads `slot(i)`: a block's
    /// (`keyed`) or a shard's own.
    fn add(&mut self, slot: impl Fn(usize) -> u64, keyed: bool) {
        for (i, total) in self.slots.iter_mut().enumerate() {
            *total = total.wrapping_add(slot(i));
        }
        for s in Series::ALL.into_iter().filter(|s| s.keyed() == keyed) {
            self.sums[s as usize] += f64::from_bits(slot(s.sum_slot()));
        }
    }

    /// Adds another region of the same kind, already decoded.
    fn add_region(&mut self, other: &Region) {
        for (total, v) in self.slots.iter_mut().zip(other.slots.iter()) {
            *total = total.wrapping_add(*v);
        }
        for (total, v) in self.sums.iter_mut().zip(other.sums) {
            *total += v;
        }
    }

    fn buckets(&self, series: Series) -> &[u64] {
        let at = series.offset();
        &self.slots[at..at + series.family().bounds.len() + 1]
    }
}

/// One label set's Service series at a scrape: its blocks in every shard
/// added together.
#[derive(Clone, Debug)]
pub struct BlockSnapshot {
    labels: BlockLabels,
    values: Region,
    /// Whether the scrape being merged found the label set.
    seen: bool,
}

impl BlockSnapshot {
    fn new(labels: BlockLabels) -> BlockSnapshot {
        BlockSnapshot {
            labels,
            values: Region::new(BLOCK_SLOTS),
            seen: false,
        }
    }

    /// Its labels.
    pub fn labels(&self) -> BlockLabels {
        self.labels
    }

    /// The keyed series' bucket counts, not cumulative, `+Inf` last (empty
    /// for a series that is not keyed).
    pub fn buckets(&self, series: Series) -> &[u64] {
        if series.keyed() {
            self.values.buckets(series)
        } else {
            &[]
        }
    }

    /// Cumulative bucket counts of the series, `+Inf` last, written into `out`.
    pub fn cumulative(&self, series: Series, out: &mut Vec<u64>) {
        cumulative(self.buckets(series), out);
    }

    /// Observations in the series (equal to its `+Inf` bucket).
    pub fn count(&self, series: Series) -> u64 {
        count(self.buckets(series))
    }

    /// Sum of the series' observations, in its stored unit.
    pub fn sum(&self, series: Series) -> f64 {
        self.values.sums[series as usize]
    }

    /// A block gauge, added over shards.
    pub fn gauge(&self, gauge: BlockGauge) -> u64 {
        self.values.slots[gauge.slot()]
    }
}

/// The block of `labels` in `blocks` (ordered by labels), added if new, and
/// marked as found by this scrape.
fn block_mut(blocks: &mut Vec<BlockSnapshot>, labels: BlockLabels) -> &mut Region {
    let at = match blocks.binary_search_by(|b| b.labels.cmp(&labels)) {
        Ok(at) => at,
        Err(at) => {
            blocks.insert(at, BlockSnapshot::new(labels));
            at
        }
    };
    blocks[at].seen = true;
    &mut blocks[at].values
}

fn cumulative(buckets: &[u64], out: &mut Vec<u64>) {
    out.clear();
    let mut total = 0u64;
    for &n in buckets {
        total = total.wrapping_add(n);
        out.push(total);
    }
}

fn count(buckets: &[u64]) -> u64 {
    buckets.iter().fold(0u64, |a, &n| a.wrapping_add(n))
}

/// Every shard added together: what one scrape renders. Allocated once by the
/// exporter thread and reused for every scrape (a label set seen for the
/// first time adds one block).
pub struct Snapshot {
    /// The shards' own slots.
    own: Region,
    /// One per label set found, ordered by labels.
    blocks: Vec<BlockSnapshot>,
    /// Every block added: the node's figures of the keyed series.
    total: BlockSnapshot,
    /// One block as read from one shard.
    scratch: Box<[u64]>,
    summaries: [SummarySnapshot; Quantiles::ALL.len()],
    accumulator: QuantileAccumulator,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            own: Region::new(SHARD_SLOTS),
            blocks: Vec::new(),
            total: BlockSnapshot::new(BlockLabels::Node),
            scratch: vec![0; BLOCK_SLOTS].into_boxed_slice(),
            summaries: std::array::from_fn(|i| SummarySnapshot {
                quantiles: vec![None; Quantiles::ALL[i].objectives().len()],
            }),
            accumulator: QuantileAccumulator::new(),
        }
    }
}

impl Snapshot {
    fn begin(&mut self) {
        self.own.clear();
        for block in &mut self.blocks {
            block.values.clear();
            block.seen = false;
        }
    }

    /// Drops the label sets no shard has any more; adds up the total.
    fn finish(&mut self) {
        self.blocks.retain(|b| b.seen);
        self.total.values.clear();
        for block in &self.blocks {
            self.total.values.add_region(&block.values);
        }
    }

    /// Every label set of the Service families, ordered by labels.
    pub fn blocks(&self) -> &[BlockSnapshot] {
        &self.blocks
    }

    /// A summary series.
    pub fn summary(&self, q: Quantiles) -> &SummarySnapshot {
        &self.summaries[q as usize]
    }

    /// The series' bucket counts, not cumulative, `+Inf` last; for a keyed
    /// series, over every block.
    pub fn buckets(&self, series: Series) -> &[u64] {
        if series.keyed() {
            self.total.buckets(series)
        } else {
            self.own.buckets(series)
        }
    }

    /// Cumulative bucket counts of the series, `+Inf` last, written into `out`.
    pub fn cumulative(&self, series: Series, out: &mut Vec<u64>) {
        cumulative(self.buckets(series), out);
    }

    /// Observations in the series (equal to its `+Inf` bucket).
    pub fn count(&self, series: Series) -> u64 {
        count(self.buckets(series))
    }

    /// Sum of the series' observations, in its stored unit (exact while
    /// below 2^53); for a keyed series, over every block.
    pub fn sum(&self, series: Series) -> f64 {
        if series.keyed() {
            self.total.sum(series)
        } else {
            self.own.sums[series as usize]
        }
    }

    /// A counter's total.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.own.slots[counter.slot()]
    }

    /// A block gauge over every block.
    pub fn gauge(&self, gauge: BlockGauge) -> u64 {
        self.total.gauge(gauge)
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
            assert_eq!(layout.keyed, s.keyed(), "{s:?}");
        }
        // Blocks start on cache lines of their own, after the shard's slots.
        assert!(block_base(0) >= SHARD_SLOTS);
        assert!(block_base(1) - block_base(0) >= BLOCK_SLOTS);
        assert_eq!(block_base(1) % SLOTS_PER_LINE, 0);
    }

    fn key(n: u64) -> BlockLabels {
        BlockLabels::Key(SeriesKey([n, 0, 0]))
    }

    #[test]
    fn blocks_get_labels_at_run_time_and_merge_by_label_across_shards() {
        let set = ShardSet::with_blocks(2, window(), 3);
        assert_eq!(set.block(3), None);
        let (b1, b2) = (set.block(1).unwrap(), set.block(2).unwrap());
        let mut snap = Snapshot::default();
        {
            let mut w0 = set.writer(0).unwrap();
            let mut w1 = set.writer(1).unwrap();
            w0.relabel(b1, Some(key(7)));
            w0.relabel(b2, Some(key(9)));
            // The same key in another block of another shard: one series.
            w1.relabel(b2, Some(key(7)));
            w0.observe(Series::Duration, 10);
            w0.observe_in(b1, Series::Duration, 20);
            w1.observe_in(b2, Series::Duration, 30);
            w0.observe_in(b2, Series::SeenReplyLatency, 40);
            // Not keyed: the shard's own slots, whatever the block.
            w0.observe_in(b2, Series::ReaderBatch, 4);
        }
        set.merge_into(&mut snap);
        let labels: Vec<_> = snap.blocks().iter().map(|b| b.labels()).collect();
        assert_eq!(labels, [BlockLabels::Node, key(7), key(9)]);
        let [node, seven, nine] = snap.blocks() else {
            unreachable!()
        };
        assert_eq!(node.count(Series::Duration), 1);
        assert_eq!(seven.count(Series::Duration), 2);
        assert_eq!(seven.sum(Series::Duration), 50.0);
        assert_eq!(nine.count(Series::Duration), 0);
        assert_eq!(nine.count(Series::SeenReplyLatency), 1);
        assert_eq!(nine.count(Series::ReaderBatch), 0, "not a block series");
        // The node's figures add up every block.
        assert_eq!(snap.count(Series::Duration), 3);
        assert_eq!(snap.sum(Series::Duration), 60.0);
        assert_eq!(snap.count(Series::ReaderBatch), 1);
        // Freed: the label set leaves; relabelled: it starts from zero.
        {
            let mut w0 = set.writer(0).unwrap();
            w0.relabel(b2, None);
            w0.relabel(b1, Some(key(8)));
        }
        set.merge_into(&mut snap);
        let labels: Vec<_> = snap.blocks().iter().map(|b| b.labels()).collect();
        assert_eq!(labels, [BlockLabels::Node, key(7), key(8)]);
        assert_eq!(snap.blocks()[1].count(Series::Duration), 1, "shard 1's");
        assert_eq!(snap.blocks()[2].count(Series::Duration), 0);
        assert_eq!(snap.count(Series::Duration), 2);
    }

    #[test]
    fn block_gauges_are_set_add_up_by_label_and_start_again_at_a_relabel() {
        const G: BlockGauge = BlockGauge::AwaitingReply;
        let set = ShardSet::with_blocks(2, window(), 3);
        let (b1, b2) = (set.block(1).unwrap(), set.block(2).unwrap());
        let mut snap = Snapshot::default();
        {
            let mut w0 = set.writer(0).unwrap();
            let mut w1 = set.writer(1).unwrap();
            w0.relabel(b1, Some(key(7)));
            w1.relabel(b2, Some(key(7)));
            w1.relabel(b1, Some(key(9)));
            w0.set_gauge(b1, G, 5);
            w0.set_gauge(b1, G, 3);
            w1.set_gauge(b2, G, 4);
            w1.set_gauge(b1, G, 2);
            w0.set_gauge(BlockId::NODE, G, 1);
            // A gauge is no histogram's slot, nor a histogram its.
            w0.observe_in(b1, Series::Duration, 10);
        }
        set.merge_into(&mut snap);
        let got: Vec<_> = snap
            .blocks()
            .iter()
            .map(|b| (b.labels(), b.gauge(G)))
            .collect();
        assert_eq!(got, [(BlockLabels::Node, 1), (key(7), 3 + 4), (key(9), 2)]);
        assert_eq!(snap.gauge(G), 10, "the node's: every block");
        assert_eq!(snap.blocks()[1].count(Series::Duration), 1);
        assert_eq!(snap.blocks()[1].sum(Series::Duration), 10.0);
        {
            let mut w0 = set.writer(0).unwrap();
            let mut w1 = set.writer(1).unwrap();
            // Down, and a relabelled block's gauge from zero.
            w0.set_gauge(b1, G, 0);
            w1.relabel(b1, Some(key(8)));
        }
        set.merge_into(&mut snap);
        let got: Vec<_> = snap
            .blocks()
            .iter()
            .map(|b| (b.labels(), b.gauge(G)))
            .collect();
        assert_eq!(got, [(BlockLabels::Node, 1), (key(7), 4), (key(8), 0)]);
    }

    /// A writer relabels one block over and over, each key with values of
    /// its own bucket, while a scraper merges: a label set is never shown
    /// with another's counts, and counts never exceed what was recorded.
    #[test]
    fn stress_relabelling_never_tears_a_block() {
        const KEYS: u64 = 20_000;
        const PER_KEY: u64 = 50;
        let bounds = crate::stats::family::SERVICE_DURATION.bounds;
        let value = |n: u64| bounds[(n as usize) % bounds.len()];
        let set = Arc::new(ShardSet::with_blocks(1, window(), 2));
        let done = Arc::new(AtomicBool::new(false));
        let scraper = {
            let (set, done) = (Arc::clone(&set), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut snap = Snapshot::default();
                let mut keyed = 0u64;
                while !done.load(Ordering::Acquire) {
                    set.merge_into(&mut snap);
                    for block in snap.blocks() {
                        let BlockLabels::Key(SeriesKey([n, _, _])) = block.labels() else {
                            continue;
                        };
                        keyed += 1;
                        let buckets = block.buckets(Series::Duration);
                        let own = (n as usize) % bounds.len();
                        for (i, &c) in buckets.iter().enumerate() {
                            assert!(i == own || c == 0, "key {n} shows bucket {i}: {buckets:?}");
                        }
                        assert!(buckets[own] <= PER_KEY, "key {n}: {}", buckets[own]);
                        let sum = block.sum(Series::Duration);
                        assert!(sum <= (PER_KEY * value(n)) as f64, "key {n}: sum {sum}");
                    }
                }
                keyed
            })
        };
        {
            let mut w = set.writer(0).unwrap();
            let block = set.block(1).unwrap();
            for n in 1..=KEYS {
                w.relabel(block, Some(key(n)));
                for _ in 0..PER_KEY {
                    w.observe_in(block, Series::Duration, value(n));
                }
            }
        }
        done.store(true, Ordering::Release);
        assert!(scraper.join().unwrap() > 0, "the scraper saw keyed blocks");
        let mut snap = Snapshot::default();
        set.merge_into(&mut snap);
        assert_eq!(snap.blocks()[1].labels(), key(KEYS));
        assert_eq!(snap.blocks()[1].count(Series::Duration), PER_KEY);
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

/// A loom model of the rules in the module doc, on this file's own code: one
/// writer (`ShardWriter::observe_in`, `count`, `relabel`) and a scrape
/// (`ShardSet::merge_into`) on another thread, over every interleaving and
/// every value a `Relaxed` load may return, up to a preemption bound.
///
/// The shard is the real one (every slot of a block is read and, on a
/// relabel, zeroed). The summaries keep std's atomics (`super::sync`): their
/// code runs here, but loom does not interleave or check it; their own
/// sequence protocol is not modelled. One writer per shard is assumed, not
/// explored: the model has one writer.
///
/// Runs only in the unit-test build with `--cfg loom` (tests/run.sh):
/// `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use crate::stats::family::{SEEN_REPLY_LATENCY, SERVICE_DURATION};
    use loom::sync::Arc;
    use loom::thread;
    use std::sync::atomic::AtomicU64 as StdU64;
    use std::time::Duration;

    /// Explores `f`: every execution with at most two preemptions (a
    /// thread switched out while it could go on), unless
    /// `LOOM_MAX_PREEMPTIONS` says otherwise.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(2);
        }
        // Every atomic access is a branch, and one scrape reads every slot
        // of the shard (a few hundred).
        builder.max_branches = 100_000;
        let f = std::sync::Arc::new(f);
        // `f` in a thread of its own: loom's main thread has a 32 KiB stack,
        // and a summary slice is built on the stack before it is boxed.
        builder.check(move || {
            let f = std::sync::Arc::clone(&f);
            spawn(move || f()).join().unwrap();
        });
    }

    /// A loom thread with a stack large enough for [`ShardSet::new`].
    fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        thread::Builder::new().stack_size(1 << 20).spawn(f).unwrap()
    }

    /// The smallest summary ring: one slice in the window.
    fn window() -> SummaryWindow {
        SummaryWindow::new(Duration::from_secs(600), 1)
    }

    /// What the writer of the first model records, in this order.
    const SERIES: Series = Series::SeenReplyLatency;
    const VALUES: [u64; 2] = [0, 60_000];
    const COUNTER: Counter = Counter::EventsNew;
    const COUNTS: [u64; 2] = [1, 2];

    /// What a scrape may show while the writer records `VALUES` and
    /// `COUNTS`: every bucket at most what was written to it, `+Inf` the
    /// count, a sum and a counter the writer stored at some point.
    fn assert_possible(snap: &Snapshot) {
        assert_eq!(snap.blocks()[0].labels(), BlockLabels::Node);
        let bounds = SEEN_REPLY_LATENCY.bounds;
        let mut written = vec![0u64; bounds.len() + 1];
        for v in VALUES {
            written[bounds.partition_point(|&b| b < v)] += 1;
        }
        let buckets = snap.buckets(SERIES);
        for (i, (&shown, &max)) in buckets.iter().zip(&written).enumerate() {
            assert!(
                shown <= max,
                "bucket {i} shows {shown} of {max}: {buckets:?}"
            );
        }
        let mut cum = Vec::new();
        snap.cumulative(SERIES, &mut cum);
        assert!(
            cum.windows(2).all(|w| w[0] <= w[1]),
            "le goes down: {cum:?}"
        );
        assert_eq!(*cum.last().unwrap(), snap.count(SERIES), "+Inf != count");
        let sums: Vec<f64> = (0..=VALUES.len())
            .map(|n| VALUES[..n].iter().sum::<u64>() as f64)
            .collect();
        let sum = snap.sum(SERIES);
        assert!(sums.contains(&sum), "sum {sum} was never stored");
        let counts: Vec<u64> = (0..=COUNTS.len())
            .map(|n| COUNTS[..n].iter().sum())
            .collect();
        let counted = snap.counter(COUNTER);
        assert!(counts.contains(&counted), "counter {counted} never stored");
    }

    /// What the scrapes of the first model showed, over every execution:
    /// (count, sum, counter) of each snapshot.
    static SHOWN: std::sync::Mutex<Vec<(u64, u64, u64)>> = std::sync::Mutex::new(Vec::new());

    /// One writer, a scrape that merges twice meanwhile, and one after the
    /// writer is done: no torn histogram, nothing goes down, nothing lost.
    ///
    /// The writer runs on the model's own thread and the scrape is spawned.
    /// The other way round loom 0.7 explores one execution only: a spawned
    /// thread that loads a slot before it stores it hides that store's race
    /// with the other thread's loads (tokio-rs/loom#392). The last check
    /// below shows that this way round every combination of values is
    /// explored.
    #[test]
    fn loom_scrapes_never_tear_a_histogram_or_lose_a_count() {
        model(|| {
            let set = Arc::new(ShardSet::new(1, window()));
            let scrape = {
                let set = Arc::clone(&set);
                spawn(move || {
                    let (mut first, mut second) = (Snapshot::default(), Snapshot::default());
                    set.merge_into(&mut first);
                    set.merge_into(&mut second);
                    (first, second)
                })
            };
            let mut w = set.writer(0).unwrap();
            for (v, n) in VALUES.into_iter().zip(COUNTS) {
                w.observe(SERIES, v);
                w.count(COUNTER, n);
            }
            drop(w);
            let (first, second) = scrape.join().unwrap();
            for snap in [&first, &second] {
                assert_possible(snap);
                let shown = (
                    snap.count(SERIES),
                    snap.sum(SERIES) as u64,
                    snap.counter(COUNTER),
                );
                let mut all = SHOWN.lock().unwrap();
                if !all.contains(&shown) {
                    all.push(shown);
                }
            }
            // Coherence: a later load of a slot never returns an older store.
            let (now, before) = (second.buckets(SERIES), first.buckets(SERIES));
            for (i, (n, b)) in now.iter().zip(before).enumerate() {
                assert!(n >= b, "bucket {i} went down: {before:?} then {now:?}");
            }
            assert!(second.sum(SERIES) >= first.sum(SERIES), "the sum went down");
            assert!(second.counter(COUNTER) >= first.counter(COUNTER));

            let mut last = Snapshot::default();
            set.merge_into(&mut last);
            assert_eq!(last.count(SERIES), VALUES.len() as u64, "a lost count");
            assert_eq!(last.sum(SERIES), VALUES.iter().sum::<u64>() as f64);
            assert_eq!(last.counter(COUNTER), COUNTS.iter().sum::<u64>());
            let bounds = SEEN_REPLY_LATENCY.bounds;
            for v in VALUES {
                let bucket = bounds.partition_point(|&b| b < v);
                assert!(
                    last.buckets(SERIES)[bucket] >= 1,
                    "{v} not in bucket {bucket}"
                );
            }
        });
        // The scrapes caught every slot at each of its values, in every
        // combination (mid-observation, count ahead of the sum and behind
        // it): the checks above held for all of them.
        let shown = SHOWN.lock().unwrap();
        for count in 0..=VALUES.len() as u64 {
            for sum in [0, VALUES[1]] {
                for counter in [0, COUNTS[0], COUNTS[0] + COUNTS[1]] {
                    let state = (count, sum, counter);
                    assert!(shown.contains(&state), "never explored {state:?}");
                }
            }
        }
    }

    /// The relabelled block's two label sets, each with values of a bucket
    /// of its own (`SERVICE_DURATION`: `le="1"` and `le="2.5"` seconds).
    const KEY_A: SeriesKey = SeriesKey([0xA, 1, 2]);
    const KEY_B: SeriesKey = SeriesKey([0xB, 3, 4]);
    const VALUE_A: u64 = 500_000;
    const VALUE_B: u64 = 2_000_000;
    const N_A: u64 = 2;
    const N_B: u64 = 1;
    /// The block's gauge under each label set.
    const GAUGE_A: u64 = 5;
    const GAUGE_B: u64 = 3;

    /// How often the scrape of the relabel model saw block 1 labelled A,
    /// labelled B, and not at all (caught mid-relabel), over every
    /// execution.
    static SAW_A: StdU64 = StdU64::new(0);
    static SAW_B: StdU64 = StdU64::new(0);
    static SAW_NONE: StdU64 = StdU64::new(0);
    /// How often it saw block 1 labelled A with A's gauge set.
    static SAW_GAUGE_A: StdU64 = StdU64::new(0);

    /// Checks one label set's block as a scrape showed it: only the bucket
    /// of `value` in `Duration` holds counts, at most `n`, the sum is that
    /// of at most `n` of `value`, every other series is empty, and the
    /// gauge is 0 or `gauge`.
    fn assert_only(block: &BlockSnapshot, value: u64, n: u64, gauge: u64) {
        let shown = block.gauge(BlockGauge::AwaitingReply);
        let name = block.labels();
        assert!(shown == 0 || shown == gauge, "{name:?} shows gauge {shown}");
        let bucket = SERVICE_DURATION.bounds.partition_point(|&b| b < value);
        for s in Series::ALL.into_iter().filter(|s| s.keyed()) {
            for (i, &c) in block.buckets(s).iter().enumerate() {
                let own = s == Series::Duration && i == bucket;
                assert!(own || c == 0, "{name:?} shows {c} in {s:?} bucket {i}");
            }
        }
        let shown = block.count(Series::Duration);
        assert!(shown <= n, "{name:?} shows {shown} of {n}");
        let sum = block.sum(Series::Duration);
        let sums = (0..=n).map(|k| (k * value) as f64);
        assert!(sums.into_iter().any(|s| s == sum), "{name:?} sum {sum}");
    }

    /// The writer labels block 1 with A and sets its gauge, and then, while
    /// a scrape merges, records, relabels it B, records and sets its gauge:
    /// the scrape shows the block with A's labels and A's counts and gauge,
    /// with B's and B's, or not at all, never one label set with the
    /// other's values. (Labelling a free block is the
    /// same relabel; it is done before the scrape starts only to keep the
    /// model small.)
    #[test]
    fn loom_a_relabelled_block_never_mixes_label_sets() {
        model(|| {
            let set = Arc::new(ShardSet::with_blocks(1, window(), 2));
            let mut w = set.writer(0).unwrap();
            let block = set.block(1).unwrap();
            w.relabel(block, Some(BlockLabels::Key(KEY_A)));
            // Set before the scrape starts, as the labels are: what the
            // model must catch is A's gauge under B's labels, which only the
            // relabel below can cause. (Set concurrently, its load and store
            // quadrupled the model's executions.)
            w.set_gauge(block, BlockGauge::AwaitingReply, GAUGE_A);
            let scrape = {
                let set = Arc::clone(&set);
                spawn(move || {
                    let mut snap = Snapshot::default();
                    set.merge_into(&mut snap);
                    snap
                })
            };
            for _ in 0..N_A {
                w.observe_in(block, Series::Duration, VALUE_A);
            }
            w.relabel(block, Some(BlockLabels::Key(KEY_B)));
            for _ in 0..N_B {
                w.observe_in(block, Series::Duration, VALUE_B);
            }
            w.set_gauge(block, BlockGauge::AwaitingReply, GAUGE_B);
            drop(w);
            let mut snap = scrape.join().unwrap();
            for block in snap.blocks() {
                match block.labels() {
                    BlockLabels::Node => assert_only(block, 0, 0, 0),
                    BlockLabels::Key(KEY_A) => assert_only(block, VALUE_A, N_A, GAUGE_A),
                    BlockLabels::Key(KEY_B) => assert_only(block, VALUE_B, N_B, GAUGE_B),
                    other => panic!("labels never written: {other:?}"),
                }
            }
            let shown = snap.blocks().get(1).map(|b| b.labels());
            let saw = match shown {
                Some(BlockLabels::Key(KEY_A)) => &SAW_A,
                Some(_) => &SAW_B,
                None => &SAW_NONE,
            };
            saw.fetch_add(1, Ordering::Relaxed);
            if let Some(b) = snap.blocks().get(1) {
                if b.labels() == BlockLabels::Key(KEY_A)
                    && b.gauge(BlockGauge::AwaitingReply) == GAUGE_A
                {
                    SAW_GAUGE_A.fetch_add(1, Ordering::Relaxed);
                }
            }

            set.merge_into(&mut snap);
            let labels: Vec<_> = snap.blocks().iter().map(|b| b.labels()).collect();
            assert_eq!(labels, [BlockLabels::Node, BlockLabels::Key(KEY_B)]);
            let b = &snap.blocks()[1];
            assert_eq!(b.count(Series::Duration), N_B, "a lost count");
            assert_eq!(b.sum(Series::Duration), (N_B * VALUE_B) as f64);
            assert_only(b, VALUE_B, N_B, GAUGE_B);
            assert_eq!(b.gauge(BlockGauge::AwaitingReply), GAUGE_B);
        });
        // The model explored the scrape seeing each label set, and catching
        // the block mid-relabel: it is not vacuous.
        for (what, n) in [
            ("A", &SAW_A),
            ("B", &SAW_B),
            ("no label set", &SAW_NONE),
            ("A's gauge", &SAW_GAUGE_A),
        ] {
            assert!(n.load(Ordering::Relaxed) > 0, "no execution saw {what}");
        }
    }
}
