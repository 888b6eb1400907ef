//! Which Service a flow went to, and the labelled block of the reader's
//! shard its observations go to (`--service-labels`).
//!
//! Owns: a reader's Service slots. The first `--max-services` Services
//! (original destination address, port and protocol) whose flows it sees
//! end each get a block of the reader's shard, labelled with the Service;
//! every other Service's flows go to the overflow block (`service_ip`
//! "other") and are counted. A Service with no flow ended for
//! `--service-idle-minutes` (with `--live-latency`: none started, answered,
//! ended or awaiting a reply) gives its slot back, and its block is freed,
//! so its series leave the exposition.
//! Never: allocates or grows after construction, or scans the slots per
//! event (a lookup is one probe sequence in a small index; the idle sweep
//! runs at most once a second, off the per-event path).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use super::table::backward_shift_delete;
use crate::stats::{BlockId, BlockLabels, SeriesKey, ShardSet, ShardWriter};

/// `IPPROTO_TCP`.
pub const TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const UDP: u8 = 17;
/// `IPPROTO_SCTP`.
pub const SCTP: u8 = 132;

/// The protocols a Service can have, and their names (as the `protocol`
/// label, kube-proxy's rules and nft write them).
const PROTOCOLS: [(u8, &str); 3] = [(TCP, "tcp"), (UDP, "udp"), (SCTP, "sctp")];

/// A Service as the kernel sees it, and as kube-proxy translates it: the
/// original destination of its flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Its address (the ClusterIP).
    pub addr: IpAddr,
    /// Its port.
    pub port: u16,
    /// Its IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub proto: u8,
}

/// The series key of the overflow block: no Service's (a Service's third
/// word is below 2^24).
pub const OVERFLOW: SeriesKey = SeriesKey([0, 0, u64::MAX]);

impl ServiceKey {
    /// The key as a block's label key: the address as 128 bits (IPv4
    /// mapped into IPv6), then port and protocol.
    pub fn series_key(self) -> SeriesKey {
        let v6 = match self.addr {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        let bits = u128::from(v6);
        SeriesKey([
            (bits >> 64) as u64,
            bits as u64,
            u64::from(self.port) << 8 | u64::from(self.proto),
        ])
    }

    /// The Service a block key names; `None` for [`OVERFLOW`] or a key no
    /// Service makes.
    pub fn from_series_key(key: SeriesKey) -> Option<ServiceKey> {
        let [hi, lo, rest] = key.0;
        if rest >> 24 != 0 {
            return None;
        }
        let v6 = Ipv6Addr::from(u128::from(hi) << 64 | u128::from(lo));
        let addr = match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        };
        Some(ServiceKey {
            addr,
            port: (rest >> 8) as u16,
            proto: rest as u8,
        })
    }

    /// The protocol's label value: `tcp`, `udp`, `sctp`, else `other`.
    pub fn protocol_name(proto: u8) -> &'static str {
        PROTOCOLS
            .iter()
            .find(|(p, _)| *p == proto)
            .map_or("other", |(_, name)| name)
    }

    /// The protocol written as a name (`tcp`) or a number (`6`), if it is
    /// one a Service can have.
    pub fn protocol_number(text: &str) -> Option<u8> {
        PROTOCOLS
            .iter()
            .find(|(p, name)| *name == text || p.to_string() == text)
            .map(|(p, _)| *p)
    }

    #[inline]
    fn hash(self) -> usize {
        let [a, b, c] = self.series_key().0;
        let h = (a ^ b.rotate_left(21) ^ c.rotate_left(42)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> 32) as usize
    }
}

/// Labels block 0 of every shard of `shards` as the overflow block, before
/// any writer starts: with Service labels on, every series of the Service
/// families carries them, the overflow's too.
pub fn label_overflow_blocks(shards: &ShardSet) {
    for index in 0..shards.len() {
        if let Some(mut writer) = shards.writer(index) {
            writer.relabel(BlockId::NODE, Some(BlockLabels::Key(OVERFLOW)));
        }
    }
}

impl fmt::Display for ServiceKey {
    /// `10.96.0.10:53/udp`, `[fd00::a]:443/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/", self.port)?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/", self.port)?,
        }
        f.write_str(ServiceKey::protocol_name(self.proto))
    }
}

/// How Services get slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceBudget {
    /// Services with series of their own (`--max-services`), at least 1.
    pub max_services: usize,
    /// Nanoseconds without a flow ended after which a Service's slot is
    /// given back (`--service-idle-minutes`).
    pub idle_ns: u64,
}

/// An empty index cell.
const EMPTY: u32 = u32::MAX;
/// Nanoseconds between two idle sweeps.
const SWEEP_EVERY_NS: u64 = 1_000_000_000;

/// A reader's Service slots: slot `i` is block `i + 1` of its shard; block
/// 0 is the overflow.
pub struct ServiceSlots {
    budget: ServiceBudget,
    /// The Service of each slot, `None` when free.
    keys: Box<[Option<ServiceKey>]>,
    /// When each slot's Service last had a flow end (wall clock, ns).
    last_flow_ns: Box<[u64]>,
    /// Open addressing with linear probing over slot numbers, at most half
    /// full, backward-shift deletion.
    index: Box<[u32]>,
    mask: usize,
    /// Free slots, as a stack; allocated full at construction.
    free: Vec<u32>,
    next_sweep_ns: u64,
}

impl ServiceSlots {
    /// Slots for `budget`, all free; allocates everything now.
    pub fn new(budget: ServiceBudget) -> ServiceSlots {
        let n = budget.max_services.max(1);
        let cells = (n * 2).next_power_of_two();
        ServiceSlots {
            budget: ServiceBudget {
                max_services: n,
                ..budget
            },
            keys: vec![None; n].into_boxed_slice(),
            last_flow_ns: vec![0; n].into_boxed_slice(),
            index: vec![EMPTY; cells].into_boxed_slice(),
            mask: cells - 1,
            free: (0..n as u32).rev().collect(),
            next_sweep_ns: 0,
        }
    }

    /// Blocks a shard needs for these slots: the overflow and one a slot.
    pub fn blocks(&self) -> usize {
        self.keys.len() + 1
    }

    /// Services with a slot now.
    pub fn in_use(&self) -> usize {
        self.keys.len() - self.free.len()
    }

    /// The index cell of `key`, or the empty cell where it would go.
    #[inline]
    fn cell(&self, key: ServiceKey) -> (usize, bool) {
        let mut i = key.hash() & self.mask;
        loop {
            match self.index[i] {
                EMPTY => return (i, false),
                slot if self.keys[slot as usize] == Some(key) => return (i, true),
                _ => i = (i + 1) & self.mask,
            }
        }
    }

    /// The block for a flow of `key` that ended at `now_ns`: its Service's,
    /// labelled through `shard` when the Service takes a free slot now, or
    /// the overflow block when none is free (`None` returned beside it).
    #[inline]
    pub fn block_for(
        &mut self,
        key: ServiceKey,
        now_ns: u64,
        shard: &mut ShardWriter<'_>,
    ) -> Option<BlockId> {
        let (cell, found) = self.cell(key);
        let (slot, block) = if found {
            let slot = self.index[cell] as usize;
            (slot, shard.block(slot + 1)?)
        } else {
            let slot = *self.free.last()? as usize;
            let block = shard.block(slot + 1)?;
            self.free.pop();
            self.index[cell] = slot as u32;
            self.keys[slot] = Some(key);
            shard.relabel(block, Some(BlockLabels::Key(key.series_key())));
            (slot, block)
        };
        // An event may carry an older stamp than the last one seen.
        self.last_flow_ns[slot] = self.last_flow_ns[slot].max(now_ns);
        Some(block)
    }

    /// Keeps the Service of `block` from going idle before `now_ns` plus
    /// the idle time: it has flows still under way (awaiting a reply).
    /// Nothing for the overflow block or a free one.
    pub fn keep(&mut self, block: BlockId, now_ns: u64) {
        let Some(slot) = block.index().checked_sub(1) else {
            return;
        };
        if let (Some(Some(_)), Some(last)) = (self.keys.get(slot), self.last_flow_ns.get_mut(slot))
        {
            *last = (*last).max(now_ns);
        }
    }

    /// Gives back, at most once a second, the slot of every Service whose
    /// last flow ended more than the idle time before `now_ns`, freeing
    /// its block through `shard`. Returns how many went.
    pub fn expire_idle(&mut self, now_ns: u64, shard: &mut ShardWriter<'_>) -> usize {
        if now_ns < self.next_sweep_ns {
            return 0;
        }
        self.next_sweep_ns = now_ns.saturating_add(SWEEP_EVERY_NS);
        let mut gone = 0;
        for slot in 0..self.keys.len() {
            let Some(key) = self.keys[slot] else {
                continue;
            };
            if now_ns.saturating_sub(self.last_flow_ns[slot]) <= self.budget.idle_ns {
                continue;
            }
            let (cell, found) = self.cell(key);
            if found {
                self.unindex(cell);
            }
            self.keys[slot] = None;
            self.free.push(slot as u32);
            if let Some(block) = shard.block(slot + 1) {
                shard.relabel(block, None);
            }
            gone += 1;
        }
        gone
    }

    /// Removes index cell `cell` (backward-shift, as the flow table's).
    fn unindex(&mut self, cell: usize) {
        let (keys, mask) = (&self.keys, self.mask);
        backward_shift_delete(
            &mut self.index,
            cell,
            EMPTY,
            |&c| c == EMPTY,
            |&c| keys[c as usize].map_or(0, |k| k.hash() & mask),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::summary::SummaryWindow;
    use crate::stats::{Series, ShardSet, Snapshot};

    fn svc(addr: &str, port: u16, proto: u8) -> ServiceKey {
        ServiceKey {
            addr: addr.parse().unwrap(),
            port,
            proto,
        }
    }

    #[test]
    fn a_key_survives_the_series_key_and_the_overflow_is_no_service() {
        for k in [
            svc("10.96.1.1", 80, 6),
            svc("fd00:96::1", 53, 17),
            svc("0.0.0.0", 0, 0),
            svc("255.255.255.255", 65535, 132),
        ] {
            assert_eq!(ServiceKey::from_series_key(k.series_key()), Some(k));
        }
        assert_eq!(ServiceKey::from_series_key(OVERFLOW), None);
        for (text, proto) in [
            ("tcp", Some(TCP)),
            ("17", Some(UDP)),
            ("sctp", Some(SCTP)),
            ("icmp", None),
            ("1", None),
        ] {
            assert_eq!(ServiceKey::protocol_number(text), proto, "{text}");
        }
        assert_eq!(
            svc("fd00::a", 3868, SCTP).to_string(),
            "[fd00::a]:3868/sctp"
        );
        assert_eq!(svc("10.96.0.10", 53, 1).to_string(), "10.96.0.10:53/other");
        assert_ne!(
            svc("10.96.1.1", 80, 6).series_key(),
            svc("10.96.1.1", 80, 17).series_key()
        );
    }

    const MIN: u64 = 60_000_000_000;

    #[test]
    fn the_first_services_get_slots_the_rest_overflow_and_idle_ones_leave() {
        let mut slots = ServiceSlots::new(ServiceBudget {
            max_services: 2,
            idle_ns: 15 * MIN,
        });
        let shards = ShardSet::with_blocks(1, SummaryWindow::from_minutes(10), slots.blocks());
        let mut w = shards.writer(0).unwrap();
        let (a, b, c) = (
            svc("10.96.1.1", 80, 6),
            svc("10.96.1.2", 80, 6),
            svc("10.96.1.3", 53, 17),
        );
        let ba = slots.block_for(a, MIN, &mut w).unwrap();
        let bb = slots.block_for(b, MIN, &mut w).unwrap();
        assert_ne!(ba, bb);
        assert_eq!(
            slots.block_for(c, MIN, &mut w),
            None,
            "no slot left: overflow"
        );
        assert_eq!(
            slots.block_for(a, 10 * MIN, &mut w),
            Some(ba),
            "the same slot again"
        );
        for (block, n) in [(ba, 3), (bb, 1)] {
            for _ in 0..n {
                w.observe_in(block, Series::Duration, 5);
            }
        }
        // b is idle past 15 minutes at minute 17; a ended a flow at 10.
        assert_eq!(slots.expire_idle(17 * MIN, &mut w), 1);
        assert_eq!(slots.in_use(), 1);
        assert_eq!(
            slots.expire_idle(17 * MIN + 1, &mut w),
            0,
            "a sweep a second at most"
        );
        let bc = slots.block_for(c, 17 * MIN, &mut w).unwrap();
        assert_eq!(bc, bb, "c takes b's slot, from zero");
        let mut snap = Snapshot::default();
        shards.merge_into(&mut snap);
        let counts: Vec<(BlockLabels, u64)> = snap
            .blocks()
            .iter()
            .map(|blk| (blk.labels(), blk.count(Series::Duration)))
            .collect();
        assert!(
            counts.contains(&(BlockLabels::Key(a.series_key()), 3)),
            "{counts:?}"
        );
        assert!(
            counts.contains(&(BlockLabels::Key(c.series_key()), 0)),
            "{counts:?}"
        );
        assert!(!counts
            .iter()
            .any(|(l, _)| *l == BlockLabels::Key(b.series_key())));
    }

    #[test]
    fn many_services_come_and_go_through_one_small_index() {
        let mut slots = ServiceSlots::new(ServiceBudget {
            max_services: 8,
            idle_ns: MIN,
        });
        let shards = ShardSet::with_blocks(1, SummaryWindow::from_minutes(10), slots.blocks());
        let mut w = shards.writer(0).unwrap();
        let mut now = MIN;
        for round in 0..50u16 {
            for i in 0..8u16 {
                let k = svc("10.96.0.1", 1000 + round * 8 + i, 6);
                assert!(
                    slots.block_for(k, now, &mut w).is_some(),
                    "round {round} service {i}"
                );
                assert!(slots.block_for(k, now, &mut w).is_some());
            }
            assert_eq!(slots.in_use(), 8);
            now += 2 * MIN;
            assert_eq!(slots.expire_idle(now, &mut w), 8);
        }
    }
}
