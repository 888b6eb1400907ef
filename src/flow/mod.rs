//! Flow tracking: what a flow's events mean (seen-reply, FIN, destroy), kept
//! in a bounded table.
//!
//! Owns: which flows count (Service subnets, DNAT), their state between
//! events, and the observations each flow yields.
//! Never: allocates, locks, logs or makes a syscall per event; never grows
//! with traffic.

pub mod live;
pub mod recent;
pub mod services;
pub mod share;
pub mod subnet;
pub mod table;
pub mod tracker;

pub use live::LiveFlows;
pub use services::{ServiceBudget, ServiceKey, ServiceSlots, SCTP, TCP, UDP};
pub use share::{BadShare, ReaderShare};
pub use subnet::Subnet;
pub use tracker::{
    tracker_may_use, tracker_may_use_with, FlowTracker, KernelFiltered, ServiceFilter,
};

/// The wall clock (`CLOCK_REALTIME`, the clock of the kernel's conntrack
/// stamps and of every flow moment) in nanoseconds since the epoch; a vDSO
/// read, no syscall.
#[inline]
pub fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
