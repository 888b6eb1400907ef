//! Which flows a reader owns when several readers split them.
//!
//! Owns: the rule that sends every event of one flow to the same reader
//! (the conntrack id modulo the reader count). The kernel-side filter
//! (`crate::offload::bpf`) applies the same rule before the events are
//! queued; the tracker applies it again as the safety net.
//! Never: depends on how the rule is pushed into the kernel.

use std::fmt;

/// A reader share whose index is not below its count, or a count of 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadShare {
    /// This reader's index.
    pub index: u32,
    /// How many readers share the flows.
    pub count: u32,
}

impl fmt::Display for BadShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reader share {} of {}: the index must be below the count, and the count at least 1",
            self.index, self.count
        )
    }
}

impl std::error::Error for BadShare {}

/// One reader's share of the flows when several readers split them: it keeps
/// the flows whose conntrack id (`CTA_ID`) modulo `count` is `index`, so all
/// events of one flow reach the same reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReaderShare {
    index: u32,
    count: u32,
}

impl ReaderShare {
    /// The one reader: every flow.
    pub const ALL: ReaderShare = ReaderShare { index: 0, count: 1 };

    /// Reader `index` of `count` (`index < count`).
    pub fn new(index: u32, count: u32) -> Result<ReaderShare, BadShare> {
        if index < count {
            Ok(ReaderShare { index, count })
        } else {
            Err(BadShare { index, count })
        }
    }

    /// This reader's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many readers share the flows.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether an event whose conntrack id is `id` belongs to this reader.
    /// An event without an id (the kernel always sends one) belongs to reader
    /// 0, so that it still reaches exactly one reader.
    #[inline]
    pub fn owns(&self, id: Option<u32>) -> bool {
        // One reader owns everything: no division on the per-event path.
        self.count == 1 || id.unwrap_or(0) % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_need_an_index_below_the_count() {
        assert!(ReaderShare::new(0, 1).is_ok());
        assert_eq!(ReaderShare::new(2, 2), Err(BadShare { index: 2, count: 2 }));
        assert!(ReaderShare::new(0, 0).is_err());
        let s = ReaderShare::new(1, 2).unwrap();
        assert!(s.owns(Some(3)) && !s.owns(Some(4)) && !s.owns(None));
        assert!(ReaderShare::new(0, 2).unwrap().owns(None));
    }
}
