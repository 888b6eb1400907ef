//! The flows whose DESTROY was taken lately, so that a DESTROY delivered
//! again counts once.
//!
//! The kernel delivers a DESTROY again, to every listener, while a listener
//! that asked for reliable delivery (`NETLINK_BROADCAST_ERROR`, as
//! conntrackd's `NetlinkEventsReliable`) cannot take it: the flow stays on
//! the dying list and its event is re-sent, hundreds of times in a few
//! seconds (seen here: one flow's DESTROY 378 times in 15 s). Each copy
//! would count the flow's duration, bytes and packets again.
//!
//! Owns: a fixed set of flow identities (the flow key and the kernel's
//! start stamp), allocated once: 4-way buckets, the oldest of a bucket
//! replaced first.
//! Never: allocates, grows or forgets an identity before `WAYS` newer ones
//! landed in its bucket; takes a flow for another (the identity is the
//! 64-bit flow key, which holds the kernel id, and the start stamp).

/// Identities per bucket.
const WAYS: usize = 4;

/// Flow identities remembered, in buckets of [`WAYS`].
pub struct RecentDestroys {
    buckets: Box<[[u64; WAYS]]>,
}

impl RecentDestroys {
    /// Room for about `flows` identities (rounded up to a power of two), at
    /// 8 bytes each.
    pub fn new(flows: usize) -> RecentDestroys {
        let buckets = (flows.max(WAYS) / WAYS).next_power_of_two();
        RecentDestroys {
            buckets: vec![[0; WAYS]; buckets].into_boxed_slice(),
        }
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    /// Whether the flow `key` started at `start_ns` (0 when the kernel gave
    /// no stamp) already had its DESTROY taken; if not, it is remembered.
    #[inline]
    pub fn seen_before(&mut self, key: u64, start_ns: u64) -> bool {
        let identity = mix(key, start_ns);
        let at = (identity >> 32) as usize & (self.buckets.len() - 1);
        let bucket = &mut self.buckets[at];
        if bucket.contains(&identity) {
            return true;
        }
        bucket.copy_within(0..WAYS - 1, 1);
        bucket[0] = identity;
        false
    }
}

/// One 64-bit identity of a flow key and a start stamp; never 0, the mark
/// of an empty way.
#[inline]
fn mix(key: u64, start_ns: u64) -> u64 {
    let mut h = key ^ start_ns.rotate_left(32);
    // MurmurHash3's fmix64: every input bit reaches the bucket index.
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destroy_delivered_again_is_seen_before_a_new_flow_is_not() {
        let mut recent = RecentDestroys::new(1024);
        assert!(!recent.seen_before(7 << 32 | 99, 1_000));
        assert!(recent.seen_before(7 << 32 | 99, 1_000));
        assert!(recent.seen_before(7 << 32 | 99, 1_000), "every copy");
        // The kernel reuses ids: the same key with another start is a new flow.
        assert!(!recent.seen_before(7 << 32 | 99, 2_000));
        assert!(!recent.seen_before(8 << 32 | 99, 1_000));
    }

    #[test]
    fn it_remembers_the_last_flows_up_to_its_room() {
        // 4096 flows in room for 16,384, then each of the last 1024 again:
        // all but the few whose bucket took four newer ones are found.
        let mut recent = RecentDestroys::new(16_384);
        assert_eq!(recent.bytes(), 16_384 * 8);
        for n in 0..4096u64 {
            assert!(!recent.seen_before(n << 32, n * 1_000));
        }
        let found = (3072..4096u64)
            .filter(|&n| recent.seen_before(n << 32, n * 1_000))
            .count();
        assert!(found >= 1014, "{found} of 1024");
        // Far past its room the oldest are forgotten, not mistaken.
        for n in 4096..200_000u64 {
            recent.seen_before(n << 32, n * 1_000);
        }
        let old = (0..1024u64)
            .filter(|&n| recent.seen_before(n << 32, n * 1_000))
            .count();
        assert!(old < 50, "{old} of the oldest still remembered");
    }
}
