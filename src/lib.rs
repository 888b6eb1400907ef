//! conntrack-metrics: Prometheus metrics about connections to Kubernetes
//! Services, from the kernel's conntrack events.
//!
//! ```text
//!  kernel conntrack ──ctnetlink multicast──▶ sys/   netlink socket, batched recvmmsg   (reader thread)
//!                                            wire/  bytes -> CtEvent on the stack      (reader thread)
//!                                            flow/  what a flow's events mean          (reader thread)
//!                                            stats/ per-CPU atomic histogram shards    (reader writes)
//!                                            expo/  merge shards, Prometheus text, HTTP (exporter thread)
//! ```
//!
//! Guarantees each stage keeps:
//! - `wire`: no allocation, no `unsafe`, no panic for any input bytes; every
//!   malformed message is a typed [`wire::WireError`], and the walk over a
//!   datagram goes on after a bad event.
//!
//! - `sys`: the only `unsafe` code; one `recvmmsg` per batch into buffers
//!   allocated at start.
//!
//! `sys` and `wire` exist so far; `flow`, `stats` and `expo` are the next
//! stages.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod expo;
pub mod flow;
pub mod reader;
pub mod stats;
pub mod sys;
pub mod wire;
