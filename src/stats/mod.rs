//! Per-CPU statistics: fixed-bound histograms, counters and sliding-window
//! quantiles, written without locks by the per-event path and merged by the
//! exporter thread on each scrape.
//!
//! Owns: the one metrics [`registry`]: the per-event families' definitions
//! ([`family`]), the shards and their merge ([`shard`]), the quantile
//! summaries ([`summary`]), and the exporter's own metrics, written through
//! the `metrics` facade ([`self_metrics`]).
//! Never: allocates, locks, logs or makes a syscall when a value is recorded.
//! Values are integers in the family's stored unit (nanoseconds, bytes, ...);
//! seconds and fractions exist only in the rendered text.

pub mod family;
pub mod registry;
pub mod self_metrics;
pub mod shard;
pub mod summary;
mod sync;

pub use family::{BlockGauge, Counter, Outcome, Quantiles, Series};
pub use registry::Registry;
pub use shard::{BlockId, BlockLabels, SeriesKey, ShardSet, ShardWriter, Snapshot};
