//! The Service flows the kernel's conntrack table held at a dump: what a
//! reader's flow table is reconciled against, so that a flow whose DESTROY
//! was lost does not stay until it is evicted.
//!
//! Owns: the sorted keys and the moment the dump began.
//! Never: changes after it is built (the readers share one through an
//! `Arc`), or is built or searched per event.

use super::table::FlowKey;

/// The keys of the Service flows a dump of the kernel's table found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveFlows {
    keys: Box<[FlowKey]>,
    taken_ns: u64,
}

impl LiveFlows {
    /// The flows `keys` (any order, repeats allowed), found by a dump that
    /// began at `taken_ns` (wall clock, the clock of the flows' moments).
    pub fn new(mut keys: Vec<FlowKey>, taken_ns: u64) -> LiveFlows {
        keys.sort_unstable();
        keys.dedup();
        LiveFlows {
            keys: keys.into_boxed_slice(),
            taken_ns,
        }
    }

    /// Whether the dump found flow `key`.
    pub fn contains(&self, key: FlowKey) -> bool {
        self.keys.binary_search(&key).is_ok()
    }

    /// When the dump began: a flow that entered a flow table before then
    /// and is still in the kernel's table was found by it.
    pub fn taken_ns(&self) -> u64 {
        self.taken_ns
    }

    /// Flows found.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the dump found no Service flow.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_whatever_their_order() {
        let live = LiveFlows::new(vec![9, 3, 7, 3, u64::MAX], 42);
        assert_eq!(live.len(), 4);
        assert!([3, 7, 9, u64::MAX].iter().all(|&k| live.contains(k)));
        assert!(!live.contains(4) && !live.contains(0));
        assert_eq!(live.taken_ns(), 42);
    }
}
