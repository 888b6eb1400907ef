//! Command-line flags -> validated, immutable [`Config`].
//!
//! Owns: flag names, defaults and ranges (the doc comments of the raw flags
//! are the `--help`), their environment variables (`CONNTRACK_METRICS_<FLAG>`,
//! the command line wins) and the Go exporter's single-dash spelling
//! (`-svc-subnet=...`), rewritten to ours before parsing so its DaemonSet
//! arguments work unchanged.
//! Never: opens sockets or starts threads. A bad flag ends the process with
//! exit code 2 and the reason, before anything is touched.
//!
//! The words of the command line go through, in order:
//! - `go_spelling`: the Go single-dash spelling rewritten to clap's;
//! - `flags`: clap's raw flags, each value checked on its own (`cpus` checks
//!   `--reader-cpu` against the CPUs this process may run on), a bad value
//!   from a variable named as such (`environment`);
//! - this file: the checks between flags, then the [`Config`] the rest of
//!   the program reads.

mod cpus;
mod environment;
mod flags;
mod go_spelling;

pub use cpus::allowed_cpus;
pub use environment::ENV_PREFIX;
pub use go_spelling::go_spelling;

use crate::flow::Subnet;
use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};
use environment::name_env_source;
use flags::Flags;
use go_spelling::name_unknown_single_dash;
use std::ffi::OsString;
use std::net::SocketAddr;

/// Default receive-buffer request: 64 MiB, which the kernel doubles to 128 MiB,
/// room for about 100,000 queued events (each takes about 1,280 bytes of
/// buffer whatever its size), a garbage-collector burst.
pub const DEFAULT_RCVBUF_BYTES: usize = 64 << 20;

/// Default `--drain-delay-us`: 1 ms. At a moderate event rate the reader
/// wakes at most 1,000 times a second instead of once per few events; with
/// kernel event stamps the measurements do not change.
pub const DEFAULT_DRAIN_DELAY_US: u64 = 1000;

/// Default flow-table capacity: the kernel's default `nf_conntrack_max` on
/// this kind of machine, so the table holds every flow the kernel can track.
pub const DEFAULT_MAX_FLOWS: usize = 262_144;

/// Default `--table-dump-seconds`: 5 minutes. A flow whose DESTROY was lost
/// leaves its flow table within about that long, and a dump of a full
/// default table (262,144 entries) costs the kernel a fraction of a second
/// of one CPU, 0.1 % of it at this interval.
pub const DEFAULT_TABLE_DUMP_SECONDS: u32 = 300;

/// The validated configuration: every value is in its flag's range and the
/// flags agree with one another. Built once at start, never changed; each
/// field's flag (`--help`) says what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `--svc-subnet`: only flows whose original destination is inside one
    /// of these count. Never empty.
    pub svc_subnets: Vec<Subnet>,
    /// `--exclude-subnet`: parts of the service subnets not to count.
    pub exclude_subnets: Vec<Subnet>,
    /// `--print-events`: print every event received to stdout.
    pub print_events: bool,
    /// `--rcvbuf-bytes`: the netlink receive buffer to ask for, 4096 to
    /// 2^30 bytes (the kernel grants twice this).
    pub rcvbuf_bytes: usize,
    /// `--recv-batch`: datagrams per recvmmsg call, 1 to 1024.
    pub recv_batch: usize,
    /// `--drain-delay-us`: microseconds a reader waits, once its socket is
    /// readable, before draining it; 0 to 100,000.
    pub drain_delay_us: u64,
    /// `--reader-cpu`: empty, or one CPU per reader, each one this process
    /// could run on when the flags were parsed.
    pub reader_cpu: Vec<usize>,
    /// `--readers`: event readers, 1 to 64.
    pub readers: usize,
    /// `--no-socket-filter`: attach no kernel-side socket filter.
    pub no_socket_filter: bool,
    /// `--event-mask`: install the nftables table that keeps the kernel from
    /// building the events the exporter does not use.
    pub event_mask: bool,
    /// `--max-flows`: flow-table capacity, 1024 to 16,777,216, and at least
    /// 1024 for each reader.
    pub max_flows: usize,
    /// `--metrics-bind-address`: where the HTTP endpoint listens.
    pub metrics_bind_address: SocketAddr,
    /// `--node-name`: the `node` label on every metric (may be empty).
    pub node_name: String,
    /// `--summary-timeout`: minutes the summary quantiles cover, 1 to 100.
    pub summary_timeout: u32,
    /// `--stats-shards`: statistics shards asked for, 1 to 1024 (at least
    /// `readers` are made whatever this says).
    pub stats_shards: usize,
    /// `--no-sysctl`: only warn when conntrack accounting or timestamps are
    /// off, never turn them on.
    pub no_sysctl: bool,
    /// `--sysctls-only`: turn the sysctls on, then exit.
    pub sysctls_only: bool,
    /// `--legacy-names`: also expose the original exporter's non-conforming
    /// metric names.
    pub legacy_names: bool,
    /// `--table-dump-seconds`: seconds between dumps of the kernel's
    /// conntrack table, 0 to 86,400; 0 never dumps.
    pub table_dump_seconds: u32,
    /// `--service-labels`: Service labels on the Service families.
    pub service_labels: bool,
    /// `--max-services`: Services with series of their own, 1 to 100,000.
    pub max_services: usize,
    /// `--service-idle-minutes`: minutes without a flow ending after which
    /// a Service's series leave, 1 to 10,080.
    pub service_idle_minutes: u32,
    /// `--service-names auto`: read names from kube-proxy's rules (only
    /// with `service_labels`).
    pub service_names: bool,
    /// `--web.config.file`: the web configuration (TLS, users, headers).
    pub web_config_file: Option<std::path::PathBuf>,
    /// `--live-latency`: latencies observed when they happen.
    pub live_latency: bool,
}

impl Config {
    /// The CPU each reader is pinned to: `--reader-cpu`'s, else none for a
    /// single reader, else the first `--readers` CPUs this process may run
    /// on (in turn, if there are fewer).
    pub fn reader_cpus(&self) -> Vec<Option<usize>> {
        if !self.reader_cpu.is_empty() {
            return self.reader_cpu.iter().copied().map(Some).collect();
        }
        if self.readers == 1 {
            return vec![None];
        }
        let allowed = allowed_cpus().unwrap_or_default();
        (0..self.readers)
            .map(|i| (!allowed.is_empty()).then(|| allowed[i % allowed.len()]))
            .collect()
    }

    /// Parses the process's arguments (and environment). On a bad flag,
    /// prints clap's message to stderr and exits with status 2; `--help` and
    /// `--version` print to stdout and exit 0.
    pub fn parse_args() -> Config {
        Config::from_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the first is the program name) and the
    /// `CONNTRACK_METRICS_*` environment variables, after rewriting the Go
    /// exporter's single-dash spelling to ours (see [`go_spelling()`]).
    pub fn from_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let mut cmd = Config::command();
        let args = go_spelling(&cmd, args.into_iter().map(Into::into));
        let mut matches = cmd
            .try_get_matches_from_mut(args.iter())
            .map_err(|e| name_unknown_single_dash(e, &args, &mut cmd))
            .map_err(|e| name_env_source(e, &args, &mut cmd))?;
        let flags = Flags::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd))?;
        Config::from_flags(flags).map_err(|why| cmd.error(ErrorKind::ValueValidation, why))
    }

    /// The clap command the flags are parsed with: its help is the
    /// `--help`, and its long names are the words [`go_spelling()`] rewrites.
    pub fn command() -> clap::Command {
        Flags::command()
    }

    /// The checks between flags, which no single value's parser can make;
    /// the reason names the flag to change.
    fn from_flags(flags: Flags) -> Result<Config, String> {
        if flags.svc_subnets.is_empty() {
            return Err("--svc-subnet: at least one service subnet is needed".to_string());
        }
        if !flags.reader_cpu.is_empty() && flags.reader_cpu.len() != flags.readers {
            return Err(format!(
                "--reader-cpu: {} CPU(s) given for {} reader(s) (--readers): give one CPU per reader",
                flags.reader_cpu.len(),
                flags.readers
            ));
        }
        if flags.max_flows / flags.readers < 1024 {
            return Err(format!(
                "--max-flows: {} flows shared by {} readers leaves fewer than 1024 per reader",
                flags.max_flows, flags.readers
            ));
        }
        let Flags {
            svc_subnets,
            exclude_subnets,
            print_events,
            rcvbuf_bytes,
            recv_batch,
            drain_delay_us,
            reader_cpu,
            readers,
            no_socket_filter,
            event_mask,
            max_flows,
            metrics_bind_address,
            node_name,
            summary_timeout,
            stats_shards,
            no_sysctl,
            sysctls_only,
            legacy_names,
            table_dump_seconds,
            service_labels,
            max_services,
            service_idle_minutes,
            service_names,
            web_config_file,
            live_latency,
        } = flags;
        Ok(Config {
            svc_subnets,
            exclude_subnets,
            print_events,
            rcvbuf_bytes,
            recv_batch,
            drain_delay_us,
            reader_cpu,
            readers,
            no_socket_filter,
            event_mask,
            max_flows,
            metrics_bind_address,
            node_name,
            summary_timeout,
            stats_shards,
            no_sysctl,
            sysctls_only,
            legacy_names,
            table_dump_seconds,
            service_labels,
            max_services,
            service_idle_minutes,
            service_names: service_labels && service_names == "auto",
            web_config_file,
            live_latency,
        })
    }
}

#[cfg(test)]
mod tests {
    //! The helpers every test of `config` parses with, and the tests of the
    //! checks between flags.

    use super::*;
    use std::sync::{Mutex, MutexGuard};

    /// clap reads the environment as it parses, and the environment is
    /// process-global: every test here parses under this lock so the one
    /// test that sets variables cannot leak into others.
    static ENV: Mutex<()> = Mutex::new(());

    pub(super) fn env_lock() -> MutexGuard<'static, ()> {
        ENV.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let _g = env_lock();
        Config::from_args(std::iter::once("conntrack-metrics").chain(args.iter().copied()))
    }

    pub(super) fn subnets(list: &[&str]) -> Vec<Subnet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    pub(super) fn defaults_config() -> Config {
        Config {
            svc_subnets: subnets(&["10.96.0.0/16"]),
            exclude_subnets: vec![],
            print_events: false,
            rcvbuf_bytes: 64 << 20,
            recv_batch: 64,
            drain_delay_us: 1000,
            reader_cpu: vec![],
            readers: 1,
            no_socket_filter: false,
            event_mask: false,
            max_flows: 262_144,
            metrics_bind_address: "0.0.0.0:9000".parse().unwrap(),
            node_name: String::new(),
            summary_timeout: 10,
            stats_shards: 1,
            no_sysctl: false,
            sysctls_only: false,
            legacy_names: false,
            table_dump_seconds: 300,
            service_labels: false,
            max_services: 200,
            service_idle_minutes: 15,
            service_names: false,
            web_config_file: None,
            live_latency: false,
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(parse(&[]).unwrap(), defaults_config());
    }

    #[test]
    fn flags_that_disagree_name_the_flag_and_the_problem() {
        for (args, flag, why) in [
            (
                &["--readers", "2", "--reader-cpu", "0"][..],
                "--reader-cpu",
                "1 CPU(s) given for 2 reader(s)",
            ),
            (
                &["--readers", "2", "--max-flows", "2047"],
                "--max-flows",
                "fewer than 1024 per reader",
            ),
        ] {
            let err = parse(args).unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.exit_code(), 2, "{args:?}: {msg}");
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{args:?}: {msg}");
            assert!(msg.contains(flag) && msg.contains(why), "{args:?}: {msg}");
        }
        let c = parse(&["--readers", "2", "--max-flows", "2048"]).unwrap();
        assert_eq!((c.readers, c.max_flows), (2, 2048));
    }
}
