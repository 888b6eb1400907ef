//! ctnetlink statistics: the node's conntrack counters per CPU
//! (`IPCTNL_MSG_CT_GET_STATS_CPU`, a dump, one message a CPU) and its entry
//! count and limit (`IPCTNL_MSG_CT_GET_STATS`, one message): the requests,
//! and the parse of one answer.
//!
//! Owns: the attribute numbers of `enum ctattr_stats_cpu` and
//! `enum ctattr_stats_global` (`nfnetlink_conntrack.h`), each a big-endian
//! `u32`.
//! Never: allocates, panics on any input, or decides what the numbers mean
//! for an alert.

use super::ctnetlink::{request, split_nfgenmsg, DUMP_REQUEST_LEN, NFNL_SUBSYS_CTNETLINK};
use super::netlink::{NetlinkHeader, NLM_F_DUMP};
use super::nla::NlaIter;
use super::WireError;

/// `IPCTNL_MSG_CT_GET_STATS_CPU`: the per-CPU counters (a dump).
pub const IPCTNL_MSG_CT_GET_STATS_CPU: u16 = 4;
/// `IPCTNL_MSG_CT_GET_STATS`: the entry count and limit.
pub const IPCTNL_MSG_CT_GET_STATS: u16 = 5;

/// The per-CPU statistics the kernel still fills (`CTA_STATS_*`; the
/// others, "no longer used", are left out), with their names as
/// `conntrack -S` prints them.
pub const CPU_STATS: [(u16, &str); 10] = [
    (2, "found"),
    (4, "invalid"),
    (8, "insert"),
    (9, "insert_failed"),
    (10, "drop"),
    (11, "early_drop"),
    (12, "error"),
    (13, "search_restart"),
    (14, "clash_resolve"),
    (15, "chaintoolong"),
];

/// `CTA_STATS_GLOBAL_ENTRIES`: entries in the table.
pub const GLOBAL_ENTRIES: u16 = 1;
/// `CTA_STATS_GLOBAL_MAX_ENTRIES`: `nf_conntrack_max`.
pub const GLOBAL_MAX_ENTRIES: u16 = 2;

/// The request for the per-CPU counters, numbered `seq`.
pub fn cpu_stats_request(seq: u32) -> [u8; DUMP_REQUEST_LEN] {
    request(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_DUMP, seq)
}

/// The request for the entry count and limit, numbered `seq`.
pub fn global_stats_request(seq: u32) -> [u8; DUMP_REQUEST_LEN] {
    request(IPCTNL_MSG_CT_GET_STATS, 0, seq)
}

/// The attributes of one statistics message, by number (0 to 15); `None`
/// where the message did not carry one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsAttrs {
    /// Its message type: [`IPCTNL_MSG_CT_GET_STATS_CPU`] or
    /// [`IPCTNL_MSG_CT_GET_STATS`].
    pub msg: u16,
    /// The CPU of a per-CPU message (`nfgenmsg.res_id`).
    pub cpu: u16,
    values: [Option<u32>; 16],
}

impl StatsAttrs {
    /// Attribute `attr`, if the message carried it.
    pub fn get(&self, attr: u16) -> Option<u32> {
        self.values.get(usize::from(attr)).copied().flatten()
    }

    /// Whether `nlmsg_type` is a ctnetlink statistics message.
    pub fn is_stats_type(nlmsg_type: u16) -> bool {
        nlmsg_type >> 8 == NFNL_SUBSYS_CTNETLINK
            && matches!(
                nlmsg_type & 0xff,
                IPCTNL_MSG_CT_GET_STATS_CPU | IPCTNL_MSG_CT_GET_STATS
            )
    }

    /// Parses one whole statistics message (header included). Attributes
    /// beyond those known are skipped; one of the wrong size is an error.
    pub fn parse(msg: &[u8]) -> Result<StatsAttrs, WireError> {
        let (header, msg) = NetlinkHeader::parse(msg)?;
        if !Self::is_stats_type(header.kind) {
            return Err(WireError::NotConntrackEvent {
                nlmsg_type: header.kind,
            });
        }
        let (nfgen, attrs) = split_nfgenmsg(msg)?;
        let mut out = StatsAttrs {
            msg: header.kind & 0xff,
            cpu: u16::from_be_bytes([nfgen[2], nfgen[3]]),
            values: [None; 16],
        };
        for nla in NlaIter::new(attrs, "ctnetlink statistics") {
            let nla = nla?;
            if let Some(slot) = out.values.get_mut(usize::from(nla.kind())) {
                *slot = Some(nla.u32_be("CTA_STATS_*")?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics message as the kernel writes it (attribute numbers as
    /// literals from the header, values big-endian).
    fn message(msg: u16, attrs: &[(u16, u32)]) -> Vec<u8> {
        let mut m = vec![0u8; 16];
        m[4..6].copy_from_slice(&(0x0100 | msg).to_ne_bytes());
        m.extend_from_slice(&[0, 0, 0, 1]); // nfgenmsg: res_id = CPU 1
        for &(kind, v) in attrs {
            m.extend_from_slice(&8u16.to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&v.to_be_bytes());
        }
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn per_cpu_counters_are_read_big_endian_and_unknown_ones_skipped() {
        let m = message(4, &[(2, 7), (4, 300), (15, 1), (16, 9), (99, 1)]);
        let s = StatsAttrs::parse(&m).unwrap();
        assert_eq!((s.msg, s.cpu), (IPCTNL_MSG_CT_GET_STATS_CPU, 1));
        assert_eq!(
            (s.get(2), s.get(4), s.get(15)),
            (Some(7), Some(300), Some(1))
        );
        assert_eq!((s.get(8), s.get(16)), (None, None));
        let g = StatsAttrs::parse(&message(5, &[(1, 42), (2, 262_144)])).unwrap();
        assert_eq!(g.msg, IPCTNL_MSG_CT_GET_STATS);
        assert_eq!(
            (g.get(GLOBAL_ENTRIES), g.get(GLOBAL_MAX_ENTRIES)),
            (Some(42), Some(262_144))
        );
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        let mut short = message(4, &[(2, 7)]);
        short[16..].fill(0);
        short.truncate(18);
        short[0..4].copy_from_slice(&18u32.to_ne_bytes());
        assert!(StatsAttrs::parse(&short).is_err());
        let event = message(0, &[]);
        assert!(
            StatsAttrs::parse(&event).is_err(),
            "a conntrack event is not statistics"
        );
        let mut wide = message(4, &[]);
        wide.extend_from_slice(&[12, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        let len = wide.len() as u32;
        wide[0..4].copy_from_slice(&len.to_ne_bytes());
        assert!(
            StatsAttrs::parse(&wide).is_err(),
            "an 8-byte counter is not a u32"
        );
    }

    #[test]
    fn requests_name_their_message_and_only_the_per_cpu_one_dumps() {
        let (cpu, global) = (cpu_stats_request(3), global_stats_request(4));
        let (h, _) = NetlinkHeader::parse(&cpu).unwrap();
        assert_eq!((h.kind, h.flags, h.seq), (0x0104, 0x0301, 3));
        let (h, _) = NetlinkHeader::parse(&global).unwrap();
        assert_eq!((h.kind, h.flags, h.seq), (0x0105, 0x0001, 4));
    }
}
