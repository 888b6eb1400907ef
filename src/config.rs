//! Command-line flags -> validated, immutable [`Config`].
//!
//! Owns: flag names, defaults and ranges (the doc comments are the `--help`).
//! Never: opens sockets or starts threads. A bad flag ends the process with
//! exit code 2 and the reason, before anything is touched.

use clap::builder::TypedValueParser;
use clap::Parser;
use std::net::SocketAddr;

/// Default receive-buffer request: 64 MiB, which the kernel doubles to 128 MiB,
/// room for about 100,000 queued events (each takes about 1,280 bytes of
/// buffer whatever its size), a garbage-collector burst.
pub const DEFAULT_RCVBUF_BYTES: usize = 64 << 20;

/// conntrack-metrics: Prometheus metrics about connections to Kubernetes
/// Services, from the kernel's conntrack events. Needs root or CAP_NET_ADMIN.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(version, about)]
pub struct Config {
    /// Print every conntrack event received, one line each, to stdout.
    #[arg(long)]
    pub print_events: bool,

    /// Netlink receive buffer to ask for, in bytes (the kernel grants twice
    /// this). Asked with SO_RCVBUFFORCE, else SO_RCVBUF, halved until accepted.
    #[arg(long, default_value_t = DEFAULT_RCVBUF_BYTES,
          value_parser = clap::value_parser!(u32).range(4096..=1 << 30).map(|v| v as usize))]
    pub rcvbuf_bytes: usize,

    /// Datagrams taken per recvmmsg call.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub recv_batch: usize,

    /// Address the HTTP endpoint listens on (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:9000")]
    pub metrics_bind_address: SocketAddr,

    /// Value of the `node` label on every metric (the DaemonSet passes the
    /// node name from the downward API).
    #[arg(long, default_value = "")]
    pub node_name: String,

    /// Minutes of observations the summary quantiles cover (a sliding
    /// window), 1 to 100.
    #[arg(long, default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub summary_timeout: u32,

    /// Statistics shards: each writer thread (today the one event reader)
    /// owns one, written without locks and merged on each scrape. More
    /// shards than writers only cost memory (about 0.7 MiB each, mostly the
    /// summaries' window histograms) and scrape time.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub stats_shards: usize,

    /// Also expose the original exporter's counters and summaries under its
    /// names (`events_counter`, `error_counter`, `no_bufs_counter`,
    /// `service_*_summary`), for dashboards not yet moved to `events_total`,
    /// `errors_total`, `netlink_overruns_total` and `service_*_window_*`.
    /// Those names break Prometheus naming rules (`promtool check metrics`
    /// reports them). The original's histograms keep their names always.
    #[arg(long)]
    pub legacy_names: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::try_parse_from(["conntrack-metrics"]).unwrap();
        assert_eq!(
            c,
            Config {
                print_events: false,
                rcvbuf_bytes: 64 << 20,
                recv_batch: 64,
                metrics_bind_address: "0.0.0.0:9000".parse().unwrap(),
                node_name: String::new(),
                summary_timeout: 10,
                stats_shards: 1,
                legacy_names: false,
            }
        );
    }

    #[test]
    fn out_of_range_and_unknown_flags_are_usage_errors() {
        for args in [
            &["x", "--recv-batch", "0"][..],
            &["x", "--recv-batch", "5000"],
            &["x", "--rcvbuf-bytes", "12"],
            &["x", "--rcvbuf-bytes", "lots"],
            &["x", "--no-such-flag"],
            &["x", "--summary-timeout", "0"],
            &["x", "--summary-timeout", "101"],
            &["x", "--stats-shards", "0"],
            &["x", "--metrics-bind-address", "9000"],
        ] {
            let err = Config::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
    }
}
