//! The raw flags as clap parses them: names, defaults, ranges, environment
//! variables and the `--help` text (each field's doc comment is its help,
//! written for the user at the command line).
//!
//! Owns: checking each value on its own (a subnet parses, a number is in
//! range, a CPU is one this process may run on), with clap's message naming
//! the flag.
//! Never: checks flags against each other (that is
//! [`Config::from_args`](super::Config::from_args)), or is seen outside
//! `config`: the rest of the program reads a [`Config`](super::Config).

use super::cpus::parse_reader_cpu;
use super::{
    DEFAULT_DRAIN_DELAY_US, DEFAULT_MAX_FLOWS, DEFAULT_RCVBUF_BYTES, DEFAULT_TABLE_DUMP_SECONDS,
};
use crate::flow::Subnet;
use clap::builder::{BoolishValueParser, TypedValueParser};
use clap::{ArgAction, Parser};
use std::net::SocketAddr;

const AFTER_HELP: &str = "\
Every flag can also be set by the environment variable shown beside it; the \
command line wins. Boolean variables take true/false, 1/0, yes/no or on/off.
The original Go exporter's spelling is accepted unchanged: -svc-subnet=10.96.0.0/16, \
-svc-subnet 10.96.0.0/16, -print-events, -print-events=false.";

/// conntrack-metrics: Prometheus metrics about connections to Kubernetes
/// Services, from the kernel's conntrack events. Needs root or CAP_NET_ADMIN.
#[derive(Parser)]
#[command(version, about, after_help = AFTER_HELP)]
pub(super) struct Flags {
    /// Service subnets (CIDR, IPv4 or IPv6): only flows whose original
    /// destination is inside one of them count. Repeat the flag or separate
    /// with commas for several (dual-stack: `10.96.0.0/16,fd00:96::/112`).
    #[arg(long = "svc-subnet", value_name = "CIDR", env = "CONNTRACK_METRICS_SVC_SUBNET",
          default_value = "10.96.0.0/16", value_delimiter = ',', action = ArgAction::Append,
          value_parser = parse_subnet)]
    pub(super) svc_subnets: Vec<Subnet>,

    /// Parts of the service subnets not to count (CIDR, IPv4 or IPv6), e.g.
    /// `10.96.0.0/24` where cluster DNS and the API service live. Repeat the
    /// flag or separate with commas for several. Default: none.
    #[arg(long = "exclude-subnet", value_name = "CIDR",
          env = "CONNTRACK_METRICS_EXCLUDE_SUBNET", value_delimiter = ',',
          action = ArgAction::Append, value_parser = parse_subnet)]
    pub(super) exclude_subnets: Vec<Subnet>,

    /// Print every conntrack event received, one line each, to stdout (with
    /// the kernel socket filter on, only the Service flows' events reach the
    /// exporter: add --no-socket-filter to see all).
    #[arg(long, env = "CONNTRACK_METRICS_PRINT_EVENTS", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub(super) print_events: bool,

    /// Netlink receive buffer to ask for, in bytes (the kernel grants twice
    /// this). Asked with SO_RCVBUFFORCE, else SO_RCVBUF, halved until accepted.
    #[arg(long, value_name = "BYTES", env = "CONNTRACK_METRICS_RCVBUF_BYTES",
          default_value_t = DEFAULT_RCVBUF_BYTES,
          value_parser = clap::value_parser!(u32).range(4096..=1 << 30).map(|v| v as usize))]
    pub(super) rcvbuf_bytes: usize,

    /// Datagrams taken per recvmmsg call.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_RECV_BATCH", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub(super) recv_batch: usize,

    /// Microseconds a reader waits, once its socket is readable, before
    /// draining it (0 to 100000; 0 reads at once): events gather into fuller
    /// batches, so the reader wakes less often and spends less CPU per event
    /// when events come at a moderate rate. Applies only while the kernel
    /// stamps its events (Linux 6.14+): without stamps, an event's time is
    /// when it is read, and the reader never waits.
    #[arg(long, value_name = "MICROSECONDS", env = "CONNTRACK_METRICS_DRAIN_DELAY_US",
          default_value_t = DEFAULT_DRAIN_DELAY_US,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub(super) drain_delay_us: u64,

    /// CPU to pin the event-reader thread to (one of the CPUs this process
    /// may run on); with `--readers N`, N CPUs, one per reader (comma
    /// separated or repeated). Default: one reader not pinned; several
    /// readers pinned to the first N CPUs this process may run on.
    #[arg(long, value_name = "CPU", env = "CONNTRACK_METRICS_READER_CPU",
          value_delimiter = ',', action = ArgAction::Append, value_parser = parse_reader_cpu)]
    pub(super) reader_cpu: Vec<usize>,

    /// Event readers (1 to 64): N netlink sockets, each with a kernel filter
    /// that keeps only its share of the flows (conntrack id modulo N, so a
    /// flow's events all reach the same reader), each drained by its own
    /// pinned thread into its own flow table (--max-flows / N flows each)
    /// and statistics shard. One reader keeps up with this kind of 2-CPU
    /// node; more help only where one CPU cannot drain the events.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_READERS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=64).map(usize::from))]
    pub(super) readers: usize,

    /// Do not attach the kernel-side socket filter (a classic BPF program
    /// that passes only events of flows to the service subnets, so the rest
    /// never take receive-buffer space or reader CPU). Userspace applies the
    /// same test either way.
    #[arg(long, env = "CONNTRACK_METRICS_NO_SOCKET_FILTER", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub(super) no_socket_filter: bool,

    /// Install an nftables table (inet conntrack_metrics_<pid>_<start>) that
    /// tells the kernel not to build conntrack events for flows outside the
    /// service subnets, and only the events the exporter uses for service
    /// flows. Lightens the node (any event listener costs it 25-40 % of its
    /// peak new-flow rate), but OTHER conntrack listeners on the node
    /// (conntrack -E, conntrackd) then stop seeing those flows' events too.
    /// Needs the nft binary and Linux 5.12 or later: the table is this
    /// exporter's own (nftables owner flag) and the kernel deletes it when
    /// the exporter exits, also when it is killed. Every start removes the
    /// table inet conntrack_metrics of earlier versions.
    #[arg(long, env = "CONNTRACK_METRICS_EVENT_MASK", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub(super) event_mask: bool,

    /// Flow-table capacity, allocated at start (1024 to 16777216). When it
    /// is full the oldest flows are evicted and counted; memory never grows
    /// with traffic. The default is the kernel's default nf_conntrack_max.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_MAX_FLOWS",
          default_value_t = DEFAULT_MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216).map(|v| v as usize))]
    pub(super) max_flows: usize,

    /// Address the HTTP endpoint listens on (/metrics, /healthz, /readyz).
    #[arg(
        long,
        value_name = "ADDR",
        env = "CONNTRACK_METRICS_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:9000"
    )]
    pub(super) metrics_bind_address: SocketAddr,

    /// Value of the `node` label on every metric (the DaemonSet passes the
    /// node name from the downward API).
    #[arg(
        long,
        value_name = "NAME",
        env = "CONNTRACK_METRICS_NODE_NAME",
        default_value = ""
    )]
    pub(super) node_name: String,

    /// Minutes of observations the summary quantiles cover (a sliding
    /// window), 1 to 100.
    #[arg(long, value_name = "MINUTES", env = "CONNTRACK_METRICS_SUMMARY_TIMEOUT",
          default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(super) summary_timeout: u32,

    /// Statistics shards: each writer thread (each event reader) owns one,
    /// written without locks and merged on each scrape; at least --readers
    /// are made whatever this says. More shards than writers only cost memory (about 0.7 MiB each, mostly the
    /// summaries' window histograms) and scrape time.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_STATS_SHARDS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub(super) stats_shards: usize,

    /// Do not write 1 to net.netfilter.nf_conntrack_acct and
    /// nf_conntrack_timestamp at start; only warn when they are 0 (then
    /// flows have no byte counters or timestamps and are not measured).
    #[arg(long, env = "CONNTRACK_METRICS_NO_SYSCTL", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub(super) no_sysctl: bool,

    /// Write 1 to net.netfilter.nf_conntrack_acct and nf_conntrack_timestamp
    /// in this network namespace, then exit (0, or 1 with the reason): what
    /// the DaemonSet's init container runs, with this image, so that the one
    /// privileged step holds no shell and only CAP_NET_ADMIN.
    #[arg(long, env = "CONNTRACK_METRICS_SYSCTLS_ONLY", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new(), conflicts_with = "no_sysctl")]
    pub(super) sysctls_only: bool,

    /// Also expose the original exporter's counters and summaries under its
    /// names (`events_counter`, `error_counter`, `no_bufs_counter`,
    /// `service_*_summary`), for dashboards not yet moved to `events_total`,
    /// `errors_total`, `netlink_overruns_total` and `service_*_window_*`.
    /// Those names break Prometheus naming rules (`promtool check metrics`
    /// reports them). The original's histograms keep their names always.
    #[arg(long, env = "CONNTRACK_METRICS_LEGACY_NAMES", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub(super) legacy_names: bool,

    /// Seconds between dumps of the kernel's conntrack table (one at start,
    /// then one each interval; 0: never), taken on a thread of their own.
    /// A dump lets the exporter drop the flows whose DESTROY event was lost
    /// (counted in lost_destroys_total) and count the DNAT'd flows that
    /// go outside every --svc-subnet (dnat_flows_outside_service_subnets).
    /// It costs the kernel about a second of one CPU per million entries.
    #[arg(long, value_name = "SECONDS", env = "CONNTRACK_METRICS_TABLE_DUMP_SECONDS",
          default_value_t = DEFAULT_TABLE_DUMP_SECONDS,
          value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub(super) table_dump_seconds: u32,

    /// Label every conntrack_monitoring_service_* histogram with the flow's
    /// Service: `service_ip`, `service_port` and `protocol` (tcp, udp,
    /// sctp), from its original destination, and with `--service-names`
    /// also `namespace` and `service`. Off by default, so existing series
    /// stay as they are; the node's figures are one `sum without (...)`
    /// away.
    #[arg(long, env = "CONNTRACK_METRICS_SERVICE_LABELS", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub(super) service_labels: bool,

    /// With --service-labels: Services with series of their own (1 to
    /// 100000), the first seen; flows to any other Service are counted in
    /// one overflow series (`service_ip="other"`) and in
    /// flows_over_service_budget_total, so totals stay exact and the series
    /// count is bounded.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_MAX_SERVICES",
          default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=100_000).map(|v| v as usize))]
    pub(super) max_services: usize,

    /// With --service-labels: minutes without a flow ending after which a
    /// Service gives its slot back and its series leave /metrics (1 to
    /// 10080).
    #[arg(long, value_name = "MINUTES", env = "CONNTRACK_METRICS_SERVICE_IDLE_MINUTES",
          default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=10_080))]
    pub(super) service_idle_minutes: u32,

    /// With --service-labels: where `namespace` and `service` labels come
    /// from. `auto` reads the rules kube-proxy programs on the node
    /// (nftables map service-ips, or iptables KUBE-SERVICES comments) at
    /// start and every 30 s; `off` writes no names.
    #[arg(long, value_name = "auto|off", env = "CONNTRACK_METRICS_SERVICE_NAMES",
          default_value = "auto", value_parser = ["auto", "off"])]
    pub(super) service_names: String,

    /// TLS, basic authentication and response headers for the HTTP
    /// endpoint, in the Prometheus exporter-toolkit's web configuration
    /// format (the file node_exporter takes). Read again on SIGHUP and when
    /// it, or a file it names, changes; a broken file at start is an error
    /// (exit 2), later it is logged and the configuration in force kept.
    #[arg(
        long = "web.config.file",
        alias = "web-config-file",
        value_name = "PATH",
        env = "CONNTRACK_METRICS_WEB_CONFIG_FILE"
    )]
    pub(super) web_config_file: Option<std::path::PathBuf>,

    /// Observe each flow's seen-reply latency at its first reply and its
    /// FIN latency at its first closing event, from its NEW, instead of at
    /// its DESTROY (minutes later, or never for a long-lived connection).
    /// The socket filter then passes the Service flows' NEW events, and
    /// flows waiting for their first reply are kept in a table of their
    /// own (a quarter of --max-flows); adds
    /// service_flows_awaiting_reply. docs/flows.md.
    #[arg(long, env = "CONNTRACK_METRICS_LIVE_LATENCY", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub(super) live_latency: bool,
}

/// `--svc-subnet` / `--exclude-subnet` values: the subnet parser's reason
/// becomes clap's message (which names the flag).
fn parse_subnet(s: &str) -> Result<Subnet, String> {
    s.parse::<Subnet>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, subnets};
    use crate::config::Config;
    use clap::CommandFactory;

    #[test]
    fn command_is_well_formed() {
        Flags::command().debug_assert();
    }

    #[test]
    fn double_dash_flags() {
        let c = parse(&[
            "--svc-subnet=10.0.0.0/8",
            "--exclude-subnet",
            "10.0.0.0/24",
            "--print-events",
            "--rcvbuf-bytes",
            "1048576",
            "--recv-batch=32",
            "--max-flows",
            "1024",
            "--metrics-bind-address",
            "[::1]:9100",
            "--node-name",
            "n1",
            "--summary-timeout",
            "100",
            "--stats-shards",
            "2",
            "--no-sysctl",
            "--legacy-names",
            "--no-socket-filter",
            "--event-mask",
            "--drain-delay-us=0",
            "--table-dump-seconds",
            "0",
            "--service-labels",
            "--max-services=3",
            "--service-idle-minutes",
            "60",
            "--service-names=off",
            "--web.config.file=/etc/conntrack-metrics/web.yml",
        ])
        .unwrap();
        assert_eq!(
            c,
            Config {
                svc_subnets: subnets(&["10.0.0.0/8"]),
                exclude_subnets: subnets(&["10.0.0.0/24"]),
                print_events: true,
                rcvbuf_bytes: 1 << 20,
                recv_batch: 32,
                drain_delay_us: 0,
                reader_cpu: vec![],
                readers: 1,
                no_socket_filter: true,
                event_mask: true,
                max_flows: 1024,
                metrics_bind_address: "[::1]:9100".parse().unwrap(),
                node_name: "n1".into(),
                summary_timeout: 100,
                stats_shards: 2,
                no_sysctl: true,
                sysctls_only: false,
                legacy_names: true,
                table_dump_seconds: 0,
                service_labels: true,
                max_services: 3,
                service_idle_minutes: 60,
                service_names: false,
                web_config_file: Some("/etc/conntrack-metrics/web.yml".into()),
                live_latency: false,
            }
        );
    }

    #[test]
    fn subnets_repeat_and_comma_forms_and_ipv6() {
        let c = parse(&[
            "--svc-subnet",
            "10.96.0.0/16,fd00:96::/112",
            "--svc-subnet=10.100.0.0/16",
            "-svc-subnet",
            "fd00:100::/108, 192.168.0.0/24",
            "--exclude-subnet=10.96.0.0/24,fd00:96::/120",
            "-exclude-subnet=10.100.0.10",
        ])
        .unwrap();
        assert_eq!(
            c.svc_subnets,
            subnets(&[
                "10.96.0.0/16",
                "fd00:96::/112",
                "10.100.0.0/16",
                "fd00:100::/108",
                "192.168.0.0/24"
            ])
        );
        assert_eq!(
            c.exclude_subnets,
            subnets(&["10.96.0.0/24", "fd00:96::/120", "10.100.0.10/32"])
        );
        assert!(c.svc_subnets[1].contains("fd00:96::1".parse().unwrap()));
        // Giving the flag replaces the default rather than adding to it.
        let c = parse(&["--svc-subnet=fd00::/64"]).unwrap();
        assert_eq!(c.svc_subnets, subnets(&["fd00::/64"]));
    }

    #[test]
    fn bad_values_name_the_flag_and_the_problem() {
        for (args, flag, why) in [
            (
                &["--svc-subnet", "10.96.0.1/16"][..],
                "--svc-subnet",
                "host bits",
            ),
            (&["-svc-subnet=10.96.0.0/33"], "--svc-subnet", "0 to 32"),
            (&["--svc-subnet=10.96.0.0/16,"], "--svc-subnet", "not an IP"),
            (&["--svc-subnet="], "--svc-subnet", ""),
            (&["-svc-subnet", ""], "--svc-subnet", ""),
            (
                &["--exclude-subnet", "fd00::/129"],
                "--exclude-subnet",
                "0 to 128",
            ),
            (&["-exclude-subnet=banana"], "--exclude-subnet", "not an IP"),
            (&["-summary-timeout=0"], "--summary-timeout", "1..=100"),
            (&["--max-flows", "1023"], "--max-flows", "1024..=16777216"),
            (
                &["--max-flows", "16777217"],
                "--max-flows",
                "1024..=16777216",
            ),
            (&["--readers", "0"], "--readers", "1..=64"),
            (&["--readers=65"], "--readers", "1..=64"),
            (&["--max-services=0"], "--max-services", "1..=100000"),
            (
                &["--service-idle-minutes=0"],
                "--service-idle-minutes",
                "1..=10080",
            ),
            (&["--service-names=maybe"], "--service-names", "auto"),
            (
                &["--table-dump-seconds=86401"],
                "--table-dump-seconds",
                "0..=86400",
            ),
            (&["--event-mask=maybe"], "--event-mask", "invalid value"),
            (
                &["--drain-delay-us=100001"],
                "--drain-delay-us",
                "0..=100000",
            ),
            (
                &["-metrics-bind-address=9000"],
                "--metrics-bind-address",
                "invalid",
            ),
        ] {
            let err = parse(args).unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.exit_code(), 2, "{args:?}: {msg}");
            assert!(msg.contains(flag) && msg.contains(why), "{args:?}: {msg}");
        }
    }

    #[test]
    fn out_of_range_and_unknown_flags_are_usage_errors() {
        for args in [
            &["--recv-batch", "0"][..],
            &["--recv-batch", "5000"],
            &["--rcvbuf-bytes", "12"],
            &["--rcvbuf-bytes", "lots"],
            &["--no-such-flag"],
            &["--summary-timeout", "0"],
            &["--summary-timeout", "101"],
            &["-summary-timeout=101"],
            &["--stats-shards", "0"],
            &["--max-flows", "0"],
            &["--metrics-bind-address", "9000"],
            &["--print-events=yes please"],
            &["--node-name", "a", "--node-name", "b"],
            &["stray-positional"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
        for args in [
            &["--help"][..],
            &["-help"],
            &["-h"],
            &["--version"],
            &["-V"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 0, "{args:?}: {err}");
        }
    }
}
