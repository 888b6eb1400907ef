//! The one registry: everything a scrape shows that the exporter keeps.
//!
//! Owns: the per-event families' shards ([`ShardSet`], written by the
//! readers) and the self-metrics' cells ([`SelfMetrics`], written through
//! the `metrics` facade's [`Recorder`]). The renderer (`expo::scrape`)
//! reads both, once per scrape, and nothing else keeps a metric.
//! Never: renders text, or takes a lock on a path a reader runs per event.

use std::sync::Arc;

use super::self_metrics::{Recorder, SelfMetrics};
use super::shard::ShardSet;

/// The shards and the self-metrics, shared by the readers (writers) and the
/// exporter thread (the scrape).
pub struct Registry {
    shards: ShardSet,
    self_metrics: Arc<SelfMetrics>,
}

impl Registry {
    /// A registry over `shards`, with the self-metric families and no series
    /// yet.
    pub fn new(shards: ShardSet) -> Registry {
        Registry {
            shards,
            self_metrics: Arc::new(SelfMetrics::new()),
        }
    }

    /// The per-event families' shards.
    pub fn shards(&self) -> &ShardSet {
        &self.shards
    }

    /// The self-metrics' cells.
    pub fn self_metrics(&self) -> &SelfMetrics {
        &self.self_metrics
    }

    /// A `metrics` facade recorder that writes into this registry.
    pub fn recorder(&self) -> Recorder {
        Recorder::new(Arc::clone(&self.self_metrics))
    }
}
