//! Prometheus / OpenMetrics exposition and the HTTP endpoint.
//!
//! Owns: turning a merged [`crate::stats`] snapshot and the `metrics` facade's
//! values into text, and serving it. Runs on the exporter thread only.
//! Never: touches a shard for writing, or runs on the per-event reader thread.

pub mod formatting;
pub mod http;
pub mod scrape;
