//! conntrack-metrics: Prometheus metrics about connections to Kubernetes
//! Services, from the kernel's conntrack events.
//!
//! ```text
//!  kernel conntrack ──ctnetlink multicast──▶ sys/    netlink socket, batched recvmmsg  (reader thread)
//!                                            wire/   bytes -> CtEvent, in place        (reader thread)
//!                                            flow/   what a flow's events mean         (reader thread)
//!                                            stats/  the registry: atomic shards       (reader writes)
//!                                            expo/   merge, render once, serve HTTP    (exporter thread)
//! ```
//! `reader` takes each batch through those stages (`reader::EventPath`);
//! `offload` pushes the flow layer's rules into the kernel (a socket
//! filter, an event mask); `census` dumps the kernel's conntrack table now
//! and then (on a thread of its own), so readers drop flows whose DESTROY
//! was lost and a too-narrow `--svc-subnet` shows, and reads the node's
//! conntrack statistics when a scrape renders; `service_names` reads
//! the Services' names from kube-proxy's rules on the node (on a thread of
//! its own); `config` turns flags into a validated [`config::Config`].
//!
//! Layers, each using only those below it (`tests/layers.rs`): `sys`,
//! `wire` and `stats` use no other; `flow` uses `wire`, `stats`, `sys`;
//! `service_names` uses `flow`, `stats`; `offload` uses `wire`, `flow`, `sys`;
//! `reader` uses `sys`, `wire`, `flow`, `stats`; `census` uses `sys`,
//! `wire`, `flow`, `stats`; `expo` uses `stats`, `sys`; `config` uses
//! `flow`.
//!
//! Guarantees each stage keeps:
//! - `sys`: the only `unsafe` code, each block a small wrapper around one
//!   syscall; one non-blocking `recvmmsg` per batch into buffers allocated at
//!   start.
//! - `wire`: no allocation, no `unsafe`, no panic for any input bytes; every
//!   malformed message is a typed [`wire::WireError`], and the walk over a
//!   datagram goes on after a bad event.
//! - `flow`: a table allocated at start, never grown; a latency is measured
//!   only from a flow whose events all arrived.
//! - `stats`: one writer per shard, no lock, no read-modify-write; a scrape
//!   never sees a count go down, nor a label set with another's counts.
//! - `expo`: runs only on the exporter thread; every family rendered once,
//!   no rendered text parsed again; bounded against hostile clients.
//!
//! The per-event path (`reader::EventPath::datagram`, and the per-batch
//! steps around it) allocates nothing, takes no lock, logs nothing and
//! makes no syscall (`tests/no_alloc.rs`, `benches/pipeline.rs`).

#![deny(unsafe_code)]

/// One line on stderr, prefixed with the program's name. A closed or full
/// stderr must not stop the exporter, so write errors are ignored
/// (`eprintln!` would panic on them). Never used per event.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "conntrack-metrics: {}", format_args!($($arg)*));
    }};
}

pub mod census;
pub mod config;
pub mod expo;
pub mod flow;
pub mod offload;
pub mod reader;
pub mod service_names;
pub mod stats;
pub mod sys;
pub mod wire;
