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
use std::ops::ControlFlow;
use std::time::Duration;

use crate::stats::self_metrics::{NODE_ENTRIES, NODE_ENTRIES_LIMIT, NODE_STAT_FAMILIES};
use crate::wire::netlink::NetlinkHeader;
use crate::wire::stats::{
    cpu_stats_request, global_stats_request, StatsAttrs, CPU_STATS, GLOBAL_ENTRIES,
    GLOBAL_MAX_ENTRIES, IPCTNL_MSG_CT_GET_STATS, IPCTNL_MSG_CT_GET_STATS_CPU,
};

use super::requests::Requests;
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
    /// Each of [`CPU_STATS`], summed over the CPUs, wraps of the kernel's
    /// 32-bit counters included since the first read.
    pub counters: [u64; CPU_STATS.len()],
}

/// Reads the node's conntrack statistics and exposes them.
pub struct NodeStats {
    requests: Requests,
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
            requests: Requests::open(RECEIVE_TIMEOUT)?,
            last: Vec::new(),
            totals: [0; CPU_STATS.len()],
            handles: None,
            refused_logged: false,
        })
    }

    /// Asks the kernel for the counters and the entry count.
    pub fn read(&mut self) -> Result<NodeConntrack, CensusError> {
        let mut per_cpu = Vec::new();
        self.requests.ask(cpu_stats_request, |header, msg| {
            if let Some(stats) = stats_of(header, msg, IPCTNL_MSG_CT_GET_STATS_CPU)? {
                per_cpu.push((
                    stats.cpu,
                    CPU_STATS.map(|(attr, _)| stats.get(attr).unwrap_or(0)),
                ));
            }
            Ok(ControlFlow::Continue(()))
        })?;
        self.accumulate(&per_cpu);
        let mut out = NodeConntrack {
            counters: self.totals,
            ..NodeConntrack::default()
        };
        self.requests.ask(global_stats_request, |header, msg| {
            let Some(stats) = stats_of(header, msg, IPCTNL_MSG_CT_GET_STATS)? else {
                return Ok(ControlFlow::Continue(()));
            };
            out.entries = stats.get(GLOBAL_ENTRIES).map(u64::from);
            out.limit = stats.get(GLOBAL_MAX_ENTRIES).map(u64::from);
            // Not a dump: this one message is the answer.
            Ok(ControlFlow::Break(()))
        })?;
        Ok(out)
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
                for (counter, total) in handles.counters.iter().zip(node.counters) {
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

/// The statistics message `msg` of type `kind`, if that is what it is.
fn stats_of(
    header: &NetlinkHeader,
    msg: &[u8],
    kind: u16,
) -> Result<Option<StatsAttrs>, CensusError> {
    if !StatsAttrs::is_stats_type(header.kind) {
        return Ok(None);
    }
    let stats = StatsAttrs::parse(msg).map_err(CensusError::Malformed)?;
    Ok((stats.msg == kind).then_some(stats))
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
