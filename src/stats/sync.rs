//! The atomics the shards ([`super::shard`]) are made of: std's, or loom's
//! in the crate's unit-test build with `--cfg loom`, where
//! `shard::loom_model` explores the shard protocol.
//!
//! Owns: that one choice, for `shard.rs`.
//! Never: exports a name std does not have, so the code that uses it reads
//! the same in both builds. The summaries (`summary.rs`) and the
//! self-metrics keep std's atomics in every build: the loom model runs the
//! summaries' code but neither interleaves nor checks it.

#[cfg(all(test, loom))]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
#[cfg(not(all(test, loom)))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
