//! Command-line flags -> validated, immutable [`Config`].
//!
//! Owns: flag names, defaults and ranges (the doc comments are the `--help`).
//! Never: opens sockets or starts threads. A bad flag ends the process with
//! exit code 2 and the reason, before anything is touched.

use clap::builder::TypedValueParser;
use clap::Parser;

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
                recv_batch: 64
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
        ] {
            let err = Config::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
    }
}
