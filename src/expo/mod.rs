//! Prometheus / OpenMetrics exposition and the HTTP endpoint.
//!
//! Owns: turning the registry ([`crate::stats::Registry`]: the merged shards
//! and the self-metrics' cells) into text, once per scrape, in the format
//! asked for ([`scrape`], line writers in [`formatting`]), and serving it
//! ([`http`]), with the TLS, authentication and headers of the web
//! configuration file ([`web_config`]). Runs on the exporter thread (and,
//! for bcrypt, the one password-check thread the endpoint starts).
//! Never: writes a shard or a cell, parses text it rendered, or runs on a
//! reader thread.

pub mod formatting;
pub mod http;
pub mod scrape;
pub mod web_config;
