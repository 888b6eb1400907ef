//! Flow tracking: what a flow's events mean (seen-reply, FIN, destroy), kept
//! in a bounded table.
//!
//! Owns: which flows count (Service subnets, DNAT), their state between
//! events, and the observations each flow yields.
//! Never: allocates, locks, logs or makes a syscall per event; never grows
//! with traffic.

pub mod recent;
pub mod share;
pub mod subnet;
pub mod table;
pub mod tracker;

pub use share::{BadShare, ReaderShare};
pub use subnet::Subnet;
pub use tracker::{tracker_may_use, FlowTracker, KernelFiltered, ServiceFilter};
