//! The flow table: per-flow state between events, in memory allocated once
//! at start, with a fixed capacity.
//!
//! Owns: lookup by flow key (conntrack id and tuple), insertion, removal,
//! eviction of the oldest flows when full, and the prefetch hints that let a
//! batch's lookups overlap.
//! Never: allocates or grows after construction; scans the table per event.
//!
//! Flows live in a slab of entries allocated at start, one cache line each,
//! linked in insertion order (oldest first) by index through a separate,
//! dense array of links (8 bytes a flow, so unlinking a flow touches its
//! neighbours' links, which stay cached, not their entries), with a free
//! list. An index of open addressing with linear probing (power of two, at
//! most half full, backward-shift deletion, so no tombstones and short probes
//! under churn) maps a flow key to its entry. Insert, lookup, remove and
//! evict-oldest are all O(1).

use crate::sys::memory::{huge_page_slice, prefetch};

/// What the table keeps of one flow. Times are wall-clock nanoseconds
/// (the kernel's event stamps, or the batch's receive time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Moment the flow was first seen with SEEN_REPLY: its insertion (`None`
    /// only in the state of a flow that has no entry).
    pub seen_reply_ns: Option<u64>,
    /// Moment the flow was first seen in a closing TCP state, 0 if it was
    /// not ([`Self::fin_ns`]; a moment is stored as at least 1). Not an
    /// `Option`: its 8 bytes of tag make room for `block`.
    pub fin_at_ns: u64,
    /// Whether no overrun was reported between the flow's insertion and its
    /// FIN moment.
    pub fin_complete: bool,
    /// Whether its first closing state was CLOSE: a reset, without a FIN.
    pub closed_by_reset: bool,
    /// The reader's overrun count when the flow was inserted.
    pub overruns_at_insert: u32,
    /// The latest moment, known at the insertion, at or before which events
    /// may have been lost (the tracker's loss horizon): the flow is measured
    /// only if it started after it.
    pub loss_horizon_ns: u64,
    /// With `--live-latency`: the moment of the flow's NEW, its start as
    /// far as its events tell. In the table of unanswered flows, every entry
    /// has one; in the answered flows' table, only a flow whose seen-reply
    /// latency was observed at the reply ([`Self::observed_live`]); else 0.
    pub started_ns: u64,
    /// With `--live-latency`: its FIN latency was observed at the FIN (its
    /// DESTROY does not observe it again).
    pub fin_observed: bool,
    /// With `--live-latency`, in the table of unanswered flows: the number
    /// of the shard block its Service's series are in (0: the node's, or
    /// the overflow), so that flows awaiting a reply are counted per
    /// Service.
    pub block: u32,
}

impl FlowState {
    /// With `--live-latency`, in the answered flows' table: its seen-reply
    /// latency was observed at the reply, from `started_ns`, so its DESTROY
    /// does not observe it again and its FIN latency runs from there too.
    #[inline]
    pub fn observed_live(&self) -> bool {
        self.started_ns != 0
    }

    /// Moment the flow was first seen in a closing TCP state, if it was.
    #[inline]
    pub fn fin_ns(&self) -> Option<u64> {
        (self.fin_at_ns != 0).then_some(self.fin_at_ns)
    }
}

// One entry, key and state, is one cache line: the state must not grow.
const _: () = assert!(std::mem::size_of::<Entry>() == 64);

const NIL: u32 = u32::MAX;

/// One flow: a cache line, so a prefetch of its start brings all of it.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Entry {
    key: FlowKey,
    state: FlowState,
}

/// An entry's neighbours in insertion order (or, free, the next free entry).
#[derive(Clone, Copy, Debug)]
struct Link {
    prev: u32,
    next: u32,
}

/// What identifies a flow: its conntrack id and a hash of its original
/// tuple. The kernel's ids are 32-bit hashes, so among 100,000 live flows
/// two share an id about once (seen here: 1 or 2 flows in a 100,000-flow
/// test); with a 32-bit hash of the tuple as well (`flow_key` in the
/// tracker), two live flows share a key about once in 4 billion of those.
pub type FlowKey = u64;

/// An index cell: flow key and entry index; `entry == NIL` is empty.
#[derive(Clone, Copy, Debug)]
struct Cell {
    key: FlowKey,
    entry: u32,
}

const EMPTY: Cell = Cell { key: 0, entry: NIL };

/// A bounded map from flow key to [`FlowState`], oldest evicted first.
pub struct FlowTable {
    entries: Box<[Entry]>,
    links: Box<[Link]>,
    index: Box<[Cell]>,
    mask: usize,
    /// Oldest and newest entry (insertion order), and the free list.
    oldest: u32,
    newest: u32,
    free: u32,
    len: usize,
}

/// What an insertion did to make room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// There was room.
    Fresh,
    /// The table was full: the oldest flow was evicted.
    Evicted {
        /// Its key.
        key: FlowKey,
        /// Its state when it went.
        state: FlowState,
    },
}

#[inline]
fn hash(key: FlowKey) -> usize {
    // Fibonacci hashing: keys are already hashes; this spreads what
    // structure is left into the bits we index with.
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize
}

impl FlowTable {
    /// A table for at most `capacity` flows (1 to 2^31). Allocates
    /// everything it will ever use.
    pub fn new(capacity: usize) -> FlowTable {
        let capacity = capacity.clamp(1, 1 << 31);
        let cells = (capacity * 2).next_power_of_two();
        // All three arrays on huge pages where the kernel allows: a full
        // table is 24 MiB of random accesses (src/sys/memory.rs).
        let entries = huge_page_slice(capacity, |_| Entry {
            key: 0,
            state: FlowState::default(),
        });
        let links = huge_page_slice(capacity, |i| Link {
            prev: NIL,
            // The free list threads every entry at start.
            next: if i + 1 < capacity {
                (i + 1) as u32
            } else {
                NIL
            },
        });
        FlowTable {
            entries,
            links,
            index: huge_page_slice(cells, |_| EMPTY),
            mask: cells - 1,
            oldest: NIL,
            newest: NIL,
            free: 0,
            len: 0,
        }
    }

    /// Flows in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no flow.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most flows it holds.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Bytes allocated for the table.
    pub fn allocated_bytes(&self) -> usize {
        self.entries.len() * (std::mem::size_of::<Entry>() + std::mem::size_of::<Link>())
            + self.index.len() * std::mem::size_of::<Cell>()
    }

    /// A hint that `key` will be looked up soon: brings its home index cell
    /// toward the cache. Changes nothing.
    #[inline]
    pub fn prefetch_cell(&self, key: FlowKey) {
        prefetch(&self.index[hash(key) & self.mask]);
    }

    /// A hint that the flow `key` will be read or removed soon: brings its
    /// entry and its links toward the cache, if it is in the table. Best
    /// after [`FlowTable::prefetch_cell`] had time to bring the cell.
    #[inline]
    pub fn prefetch_entry(&self, key: FlowKey) {
        if let Some(cell) = self.find(key) {
            let e = self.index[cell].entry as usize;
            prefetch(&self.entries[e]);
            prefetch(&self.links[e]);
        }
    }

    /// The index cell holding `key`.
    #[inline]
    fn find(&self, key: FlowKey) -> Option<usize> {
        let mut i = hash(key) & self.mask;
        loop {
            let cell = self.index[i];
            if cell.entry == NIL {
                return None;
            }
            if cell.key == key {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The flow with key `key`.
    pub fn get_mut(&mut self, key: FlowKey) -> Option<&mut FlowState> {
        let e = self.index[self.find(key)?].entry as usize;
        Some(&mut self.entries[e].state)
    }

    /// Inserts `state` for `key` as the newest flow, replacing any flow
    /// with that key (its DESTROY was lost, or the kernel reused the id for
    /// the same tuple). Evicts the oldest flow if the table is full.
    pub fn insert(&mut self, key: FlowKey, state: FlowState) -> (&mut FlowState, Inserted) {
        if let Some(cell) = self.find(key) {
            self.remove_cell(cell);
        }
        let mut outcome = Inserted::Fresh;
        if self.free == NIL {
            let old = self.entries[self.oldest as usize].key;
            if let Some(cell) = self.find(old) {
                let state = self.remove_cell(cell);
                outcome = Inserted::Evicted { key: old, state };
            }
        }
        let e = self.free;
        self.free = self.links[e as usize].next;
        self.entries[e as usize] = Entry { key, state };
        self.links[e as usize] = Link {
            prev: self.newest,
            next: NIL,
        };
        match self.newest {
            NIL => self.oldest = e,
            n => self.links[n as usize].next = e,
        }
        self.newest = e;
        let mut i = hash(key) & self.mask;
        while self.index[i].entry != NIL {
            i = (i + 1) & self.mask;
        }
        self.index[i] = Cell { key, entry: e };
        self.len += 1;
        (&mut self.entries[e as usize].state, outcome)
    }

    /// The flows, oldest first (in insertion order). Between batches only:
    /// each step follows a link.
    pub fn oldest_first(&self) -> impl Iterator<Item = &FlowState> + '_ {
        let mut at = self.oldest;
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let e = at as usize;
            at = self.links[e].next;
            Some(&self.entries[e].state)
        })
    }

    /// Removes the flow `key`, returning its state.
    pub fn remove(&mut self, key: FlowKey) -> Option<FlowState> {
        let cell = self.find(key)?;
        Some(self.remove_cell(cell))
    }

    fn remove_cell(&mut self, cell: usize) -> FlowState {
        let e = self.index[cell].entry;
        let state = self.entries[e as usize].state;
        // A free entry has no seen-reply moment and no start:
        // [`Self::retain_slots`] skips it without a probe (the line is in the
        // cache already).
        self.entries[e as usize].state.seen_reply_ns = None;
        self.entries[e as usize].state.started_ns = 0;
        let Link { prev, next } = self.links[e as usize];
        match prev {
            NIL => self.oldest = next,
            p => self.links[p as usize].next = next,
        }
        match next {
            NIL => self.newest = prev,
            n => self.links[n as usize].prev = prev,
        }
        self.links[e as usize].next = self.free;
        self.free = e;
        self.len -= 1;
        self.unindex(cell);
        state
    }

    /// Visits up to `count` entry slots from slot `from` and removes each
    /// flow there that `keep` refuses. Returns the slot to go on from (`None`
    /// after the last) and the flows removed. Not for the per-event path:
    /// a sweep of the whole table, a slice at a time, between batches.
    pub fn retain_slots(
        &mut self,
        from: usize,
        count: usize,
        mut keep: impl FnMut(FlowKey, &FlowState) -> bool,
    ) -> (Option<usize>, u64) {
        let end = from.saturating_add(count).min(self.entries.len());
        let mut removed = 0;
        for e in from.min(end)..end {
            let Entry { key, state } = self.entries[e];
            let free = state.seen_reply_ns.is_none() && state.started_ns == 0;
            if free || keep(key, &state) {
                continue;
            }
            // Free entries were skipped above; the index says for sure.
            if let Some(cell) = self.find(key) {
                if self.index[cell].entry as usize == e {
                    self.remove_cell(cell);
                    removed += 1;
                }
            }
        }
        ((end < self.entries.len()).then_some(end), removed)
    }

    fn unindex(&mut self, hole: usize) {
        let mask = self.mask;
        backward_shift_delete(
            &mut self.index,
            hole,
            EMPTY,
            |c| c.entry == NIL,
            |c| hash(c.key) & mask,
        );
    }
}

/// Backward-shift deletion from an open-addressing index with linear
/// probing (power-of-two size): empties cell `hole` and moves later members
/// of its probe run into the hole, so every remaining member stays
/// reachable from its home cell, and no tombstone is left. `home` gives a
/// member's home cell.
#[inline]
pub(super) fn backward_shift_delete<T: Copy>(
    index: &mut [T],
    mut hole: usize,
    empty: T,
    is_empty: impl Fn(&T) -> bool,
    home: impl Fn(&T) -> usize,
) {
    let mask = index.len() - 1;
    index[hole] = empty;
    let mut i = (hole + 1) & mask;
    while !is_empty(&index[i]) {
        let home = home(&index[i]);
        // Move it unless its home lies cyclically in (hole, i].
        let dist_home = i.wrapping_sub(home) & mask;
        let dist_hole = i.wrapping_sub(hole) & mask;
        if dist_home >= dist_hole {
            index[hole] = index[i];
            index[i] = empty;
            hole = i;
        }
        i = (i + 1) & mask;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn state(ns: u64) -> FlowState {
        FlowState {
            seen_reply_ns: Some(ns),
            ..FlowState::default()
        }
    }

    #[test]
    fn retain_slots_removes_what_keep_refuses_a_slice_at_a_time() {
        let mut t = FlowTable::new(100);
        for k in 1..=60u64 {
            t.insert(k * 7919, state(k));
        }
        for k in (2..=60u64).step_by(2) {
            t.remove(k * 7919);
        }
        // 30 flows left (odd k); drop those with k % 3 == 0 (k = 3, 9, ..., 57).
        let (mut from, mut removed) = (Some(0), 0);
        let mut slices = 0;
        while let Some(at) = from {
            let (next, n) = t.retain_slots(at, 16, |key, _| (key / 7919) % 3 != 0);
            (from, removed, slices) = (next, removed + n, slices + 1);
        }
        assert_eq!((removed, t.len(), slices), (10, 20, 7));
        for k in 1..=60u64 {
            let kept = k % 2 == 1 && k % 3 != 0;
            assert_eq!(t.get_mut(k * 7919).is_some(), kept, "flow {k}");
        }
        // The slots freed are reused and the table stays whole.
        for k in 100..180u64 {
            t.insert(k * 7919, state(k));
        }
        assert_eq!(t.len(), 100);
    }

    /// The evicted flow's key and seen-reply moment.
    fn evicted(outcome: Inserted) -> Option<(FlowKey, u64)> {
        match outcome {
            Inserted::Fresh => None,
            Inserted::Evicted { key, state } => Some((key, state.seen_reply_ns.unwrap())),
        }
    }

    #[test]
    fn insert_get_remove() {
        let mut t = FlowTable::new(8);
        t.insert(7, state(1));
        t.insert(9, state(2));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get_mut(7).unwrap().seen_reply_ns, Some(1));
        assert_eq!(t.remove(7).unwrap().seen_reply_ns, Some(1));
        assert!(t.get_mut(7).is_none());
        assert!(t.remove(7).is_none());
        assert_eq!(t.len(), 1);
        // Key 0 and u64::MAX are ordinary keys.
        t.insert(0, state(3));
        t.insert(u64::MAX, state(4));
        assert_eq!(t.get_mut(0).unwrap().seen_reply_ns, Some(3));
        assert_eq!(t.get_mut(u64::MAX).unwrap().seen_reply_ns, Some(4));
    }

    #[test]
    fn memory_per_flow() {
        // 64-byte entries (a cache line), 8-byte links and 16-byte index
        // cells, twice as many cells as entries: 104 bytes a flow at a
        // power-of-two capacity (docs/flows.md).
        let t = FlowTable::new(262_144);
        assert_eq!(t.allocated_bytes(), 262_144 * 104);
    }

    #[test]
    fn reinserting_an_id_replaces_the_flow() {
        let mut t = FlowTable::new(4);
        t.insert(5, state(1));
        t.insert(5, state(2));
        assert_eq!(t.len(), 1);
        assert_eq!(t.get_mut(5).unwrap().seen_reply_ns, Some(2));
    }

    #[test]
    fn when_full_the_oldest_live_flow_is_evicted() {
        let mut t = FlowTable::new(3);
        for id in 1..=3 {
            assert_eq!(t.insert(id, state(id)).1, Inserted::Fresh);
        }
        assert_eq!(evicted(t.insert(4, state(4)).1), Some((1, 1)));
        assert!(t.get_mut(1).is_none());
        // A flow that ended frees its room, wherever it was in the order.
        t.remove(3);
        assert_eq!(t.insert(5, state(5)).1, Inserted::Fresh);
        assert_eq!(evicted(t.insert(6, state(6)).1), Some((2, 2)));
        assert_eq!(t.len(), 3);
        // Replacing a flow in a full table evicts nothing, and the new one is
        // the newest.
        assert_eq!(t.insert(4, state(40)).1, Inserted::Fresh);
        assert_eq!(evicted(t.insert(7, state(7)).1), Some((5, 5)));
        assert_eq!(t.get_mut(4).unwrap().seen_reply_ns, Some(40));
    }

    #[test]
    fn matches_a_hashmap_under_random_churn() {
        let mut t = FlowTable::new(64);
        let mut model: HashMap<u64, u64> = HashMap::new();
        let mut order: Vec<u64> = Vec::new();
        let mut x = 12345u64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few distinct ids, so collisions, reuse and eviction all happen.
            let id = x % 150;
            // The hints change nothing, wherever they point.
            t.prefetch_cell(id);
            t.prefetch_entry(id);
            if x % 3 == 0 {
                assert_eq!(
                    t.remove(id).map(|s| s.seen_reply_ns.unwrap()),
                    model.remove(&id)
                );
                order.retain(|&o| o != id);
            } else {
                let (_, outcome) = t.insert(id, state(step));
                if model.insert(id, step).is_some() {
                    order.retain(|&o| o != id);
                }
                order.push(id);
                if let Some((old, _)) = evicted(outcome) {
                    assert_eq!(order.first(), Some(&old), "evicted the oldest");
                    order.remove(0);
                    model.remove(&old);
                }
                assert!(model.len() <= 64);
            }
            assert_eq!(t.len(), model.len());
        }
        for (id, v) in &model {
            assert_eq!(t.get_mut(*id).unwrap().seen_reply_ns, Some(*v));
        }
    }
}
