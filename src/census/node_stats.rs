//! The node's conntrack health from ctnetlink, read when a scrape renders:
//! the per-CPU counters (`IPCTNL_MSG_CT_GET_STATS_CPU`) summed over CPUs,
//! and the entry count and limit (`IPCTNL_MSG_CT_GET_STATS`). What
//! node_exporter reads from `/proc/net/stat/nf_conntrack`, which newer
//! kernels may not have.
//!
//! Owns: a request socket of its own (each receive bounded by
//! [`RECEIVE_TIMEOUT`]), the sums, and the self-metric families
//! `conntrack_monitoring_node_*` it sets. The kernel's counters are 32-bit
//! per CPU and wrap (`found` on a busy node within hours): each CPU's last
//! values are kept and the increases summed, so the exposed counters only
//! go up.
//! Never: runs on a reader thread, or exposes a series before the kernel
//! has answered once: a kernel that refuses the requests gets one log line
//! and no series.

use std::io;
use std::time::Duration;

use crate::stats::self_metrics::{NODE_ENTRIES, NODE_ENTRIES_LIMIT, NODE_STAT_FAMILIES};
use crate::sys::table_dump::TableDumpSocket;
use crate::wire::netlink::NetlinkHeader;
use crate::wire::nla::align4;
use crate::wire::stats::{
    cpu_stats_request, global_stats_request, StatsAttrs, CPU_STATS, GLOBAL_ENTRIES,
    GLOBAL_MAX_ENTRIES, IPCTNL_MSG_CT_GET_STATS, IPCTNL_MSG_CT_GET_STATS_CPU,
};
use crate::wire::{CtEvent, EventKind, Message};

use super::CensusError;

/// How long one receive may wait for the kernel: a scrape waits for it.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// What one read found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeConntrack {
    /// Entries in the table, if the kernel said.
    pub entries: Option<u64>,
    /// `nf_conntrack_max`, if the kernel said (Linux 4.20+).
    pub limit: Option<u64>,
    /// Each of [`CPU_STATS`], summed over the CPUs, as the kernel's
    /// 32-bit counters stand now.
    pub counters: [u64; CPU_STATS.len()],
    /// CPUs that answered.
    pub cpus: usize,
}

/// Reads the node's conntrack statistics and exposes them.
pub struct NodeStats {
    socket: TableDumpSocket,
    buf: Vec<u8>,
    seq: u32,
    /// Each CPU's last counters, and what they added up to so far.
    last: Vec<Option<[u32; CPU_STATS.len()]>>,
    totals: [u64; CPU_STATS.len()],
    handles: Option<Handles>,
    refused_logged: bool,
}

/// The metric handles, made at the first answer.
struct Handles {
    entries: metrics::Gauge,
    limit: metrics::Gauge,
    counters: Vec<metrics::Counter>,
}

impl NodeStats {
    /// A reader with a socket of its own.
    pub fn open() -> io::Result<NodeStats> {
        Ok(NodeStats {
            socket: TableDumpSocket::open(RECEIVE_TIMEOUT)?,
            buf: vec![0; 64 * 1024],
            seq: 0,
            last: Vec::new(),
            totals: [0; CPU_STATS.len()],
            handles: None,
            refused_logged: false,
        })
    }

    /// Asks the kernel for the counters and the entry count.
    pub fn read(&mut self) -> Result<NodeConntrack, CensusError> {
        let mut out = NodeConntrack::default();
        self.seq = self.seq.wrapping_add(1);
        self.socket
            .send(&cpu_stats_request(self.seq))
            .map_err(CensusError::Io)?;
        let mut per_cpu = Vec::new();
        self.answers(IPCTNL_MSG_CT_GET_STATS_CPU, |stats| {
            let values = CPU_STATS.map(|(attr, _)| stats.get(attr).unwrap_or(0));
            per_cpu.push((stats.cpu, values));
        })?;
        for &(_, values) in &per_cpu {
            for (sum, v) in out.counters.iter_mut().zip(values) {
                *sum += u64::from(v);
            }
        }
        out.cpus = per_cpu.len();
        self.accumulate(&per_cpu);
        self.seq = self.seq.wrapping_add(1);
        self.socket
            .send(&global_stats_request(self.seq))
            .map_err(CensusError::Io)?;
        self.answers(IPCTNL_MSG_CT_GET_STATS, |stats| {
            out.entries = stats.get(GLOBAL_ENTRIES).map(u64::from);
            out.limit = stats.get(GLOBAL_MAX_ENTRIES).map(u64::from);
        })?;
        Ok(out)
    }

    /// Receives the answers to request `self.seq` until its end: a dump's
    /// `NLMSG_DONE`, or the one answer of a request that is not a dump.
    fn answers(&mut self, msg: u16, mut each: impl FnMut(&StatsAttrs)) -> Result<(), CensusError> {
        let dump = msg == IPCTNL_MSG_CT_GET_STATS_CPU;
        let mut ev = CtEvent::empty(EventKind::New, 0);
        loop {
            let len = self.socket.recv(&mut self.buf).map_err(CensusError::Io)?;
            let mut rest = &self.buf[..len];
            while !rest.is_empty() {
                let (header, m) = NetlinkHeader::parse(rest).map_err(CensusError::Malformed)?;
                rest = rest.get(align4(m.len())..).unwrap_or_default();
                if header.seq != self.seq {
                    continue; // the rest of an earlier, timed-out request
                }
                if StatsAttrs::is_stats_type(header.kind) {
                    let stats = StatsAttrs::parse(m).map_err(CensusError::Malformed)?;
                    if stats.msg == msg {
                        each(&stats);
                        if !dump {
                            return Ok(());
                        }
                    }
                    continue;
                }
                match Message::parse_into(m, &mut ev).map_err(CensusError::Malformed)? {
                    Message::Done => return Ok(()),
                    Message::Error { errno } => return Err(CensusError::Refused(errno)),
                    _ => {}
                }
            }
        }
    }

    /// Adds each CPU's increase since the last read to the totals (a
    /// counter that went down wrapped at 2^32).
    fn accumulate(&mut self, per_cpu: &[(u16, [u32; CPU_STATS.len()])]) {
        for &(cpu, values) in per_cpu {
            let cpu = usize::from(cpu);
            if self.last.len() <= cpu {
                self.last.resize(cpu + 1, None);
            }
            let before = self.last[cpu].unwrap_or([0; CPU_STATS.len()]);
            for ((total, now), was) in self.totals.iter_mut().zip(values).zip(before) {
                *total += u64::from(now.wrapping_sub(was));
            }
            self.last[cpu] = Some(values);
        }
    }

    /// Reads and sets the `node_*` series; logs the first failure of a
    /// kernel that refuses (and then never sets them), and every other
    /// failure is skipped until the next scrape.
    pub fn publish(&mut self) {
        match self.read() {
            Ok(node) => {
                let handles = self.handles.get_or_insert_with(|| Handles {
                    entries: metrics::gauge!(NODE_ENTRIES),
                    limit: metrics::gauge!(NODE_ENTRIES_LIMIT),
                    counters: NODE_STAT_FAMILIES
                        .iter()
                        .map(|name| metrics::counter!(*name))
                        .collect(),
                });
                if let Some(entries) = node.entries {
                    handles.entries.set(entries as f64);
                }
                if let Some(limit) = node.limit {
                    handles.limit.set(limit as f64);
                }
                for (counter, total) in handles.counters.iter().zip(self.totals) {
                    counter.absolute(total);
                }
            }
            Err(e) => {
                if !self.refused_logged {
                    crate::log!(
                        "warning: cannot read the node's conntrack statistics ({e}); \
                         conntrack_monitoring_node_* {}",
                        if self.handles.is_some() {
                            "keep their last values until it works again"
                        } else {
                            "are not exposed"
                        }
                    );
                    self.refused_logged = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_that_wrap_add_their_increase() {
        let mut s = NodeStats::open().unwrap();
        let mut at = |cpu0: u32, cpu1: u32| {
            let mut a = [0u32; CPU_STATS.len()];
            let mut b = a;
            a[0] = cpu0;
            b[0] = cpu1;
            s.accumulate(&[(0, a), (1, b)]);
            s.totals[0]
        };
        assert_eq!(at(10, 5), 15, "the first read: the sums as they are");
        assert_eq!(at(12, 5), 17);
        // CPU 0 wraps: 12 -> 2^32 - 1 -> 3 is an increase of 2^32 - 9.
        assert_eq!(at(3, 6), 17 + (u64::from(u32::MAX) - 12 + 4) + 1);
    }
}
