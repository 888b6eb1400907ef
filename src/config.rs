//! Command-line flags -> validated, immutable [`Config`].
//!
//! Owns: flag names, defaults and ranges (the doc comments are the `--help`),
//! their environment variables (`CONNTRACK_METRICS_<FLAG>`, the command line
//! wins) and the Go exporter's single-dash spelling (`-svc-subnet=...`),
//! rewritten to ours before parsing so its DaemonSet arguments work unchanged.
//! Never: opens sockets or starts threads. A bad flag ends the process with
//! exit code 2 and the reason, before anything is touched.

use crate::flow::Subnet;
use clap::builder::{BoolishValueParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use std::collections::HashMap;
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

/// The prefix of every flag's environment variable.
pub const ENV_PREFIX: &str = "CONNTRACK_METRICS_";

const AFTER_HELP: &str = "\
Every flag can also be set by the environment variable shown beside it; the \
command line wins. Boolean variables take true/false, 1/0, yes/no or on/off.
The original Go exporter's spelling is accepted unchanged: -svc-subnet=10.96.0.0/16, \
-svc-subnet 10.96.0.0/16, -print-events, -print-events=false.";

/// conntrack-metrics: Prometheus metrics about connections to Kubernetes
/// Services, from the kernel's conntrack events. Needs root or CAP_NET_ADMIN.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(version, about, after_help = AFTER_HELP)]
pub struct Config {
    /// Service subnets (CIDR, IPv4 or IPv6): only flows whose original
    /// destination is inside one of them count. Repeat the flag or separate
    /// with commas for several (dual-stack: `10.96.0.0/16,fd00:96::/112`).
    #[arg(long = "svc-subnet", value_name = "CIDR", env = "CONNTRACK_METRICS_SVC_SUBNET",
          default_value = "10.96.0.0/16", value_delimiter = ',', action = ArgAction::Append,
          value_parser = parse_subnet)]
    pub svc_subnets: Vec<Subnet>,

    /// Parts of the service subnets not to count (CIDR, IPv4 or IPv6), e.g.
    /// `10.96.0.0/24` where cluster DNS and the API service live. Repeat the
    /// flag or separate with commas for several. Default: none.
    #[arg(long = "exclude-subnet", value_name = "CIDR",
          env = "CONNTRACK_METRICS_EXCLUDE_SUBNET", value_delimiter = ',',
          action = ArgAction::Append, value_parser = parse_subnet)]
    pub exclude_subnets: Vec<Subnet>,

    /// Print every conntrack event received, one line each, to stdout (with
    /// the kernel socket filter on, only the Service flows' events reach the
    /// exporter: add --no-socket-filter to see all).
    #[arg(long, env = "CONNTRACK_METRICS_PRINT_EVENTS", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub print_events: bool,

    /// Netlink receive buffer to ask for, in bytes (the kernel grants twice
    /// this). Asked with SO_RCVBUFFORCE, else SO_RCVBUF, halved until accepted.
    #[arg(long, value_name = "BYTES", env = "CONNTRACK_METRICS_RCVBUF_BYTES",
          default_value_t = DEFAULT_RCVBUF_BYTES,
          value_parser = clap::value_parser!(u32).range(4096..=1 << 30).map(|v| v as usize))]
    pub rcvbuf_bytes: usize,

    /// Datagrams taken per recvmmsg call.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_RECV_BATCH", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub recv_batch: usize,

    /// Microseconds a reader waits, once its socket is readable, before
    /// draining it (0 to 100000; 0 reads at once): events gather into fuller
    /// batches, so the reader wakes less often and spends less CPU per event
    /// when events come at a moderate rate. Applies only while the kernel
    /// stamps its events (Linux 6.14+): without stamps, an event's time is
    /// when it is read, and the reader never waits.
    #[arg(long, value_name = "MICROSECONDS", env = "CONNTRACK_METRICS_DRAIN_DELAY_US",
          default_value_t = DEFAULT_DRAIN_DELAY_US,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub drain_delay_us: u64,

    /// CPU to pin the event-reader thread to (one of the CPUs this process
    /// may run on); with `--readers N`, N CPUs, one per reader (comma
    /// separated or repeated). Default: one reader not pinned; several
    /// readers pinned to the first N CPUs this process may run on.
    #[arg(long, value_name = "CPU", env = "CONNTRACK_METRICS_READER_CPU",
          value_delimiter = ',', action = ArgAction::Append, value_parser = parse_reader_cpu)]
    pub reader_cpu: Vec<usize>,

    /// Event readers (1 to 64): N netlink sockets, each with a kernel filter
    /// that keeps only its share of the flows (conntrack id modulo N, so a
    /// flow's events all reach the same reader), each drained by its own
    /// pinned thread into its own flow table (--max-flows / N flows each)
    /// and statistics shard. One reader keeps up with this kind of 2-CPU
    /// node; more help only where one CPU cannot drain the events.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_READERS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=64).map(usize::from))]
    pub readers: usize,

    /// Do not attach the kernel-side socket filter (a classic BPF program
    /// that passes only events of flows to the service subnets, so the rest
    /// never take receive-buffer space or reader CPU). Userspace applies the
    /// same test either way.
    #[arg(long, env = "CONNTRACK_METRICS_NO_SOCKET_FILTER", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_socket_filter: bool,

    /// Install an nftables table (inet conntrack_metrics) that tells the
    /// kernel not to build conntrack events for flows outside the service
    /// subnets, and only the events the exporter uses for service flows.
    /// Lightens the node (any event listener costs it 25-40 % of its peak
    /// new-flow rate), but OTHER conntrack listeners on the node (conntrack
    /// -E, conntrackd) then stop seeing those flows' events too. Needs the
    /// nft binary. The table is replaced at start and removed at exit (and
    /// at the next start without this flag, after a crash).
    #[arg(long, env = "CONNTRACK_METRICS_EVENT_MASK", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub event_mask: bool,

    /// Flow-table capacity, allocated at start (1024 to 16777216). When it
    /// is full the oldest flows are evicted and counted; memory never grows
    /// with traffic. The default is the kernel's default nf_conntrack_max.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_MAX_FLOWS",
          default_value_t = DEFAULT_MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216).map(|v| v as usize))]
    pub max_flows: usize,

    /// Address the HTTP endpoint listens on (/metrics, /healthz, /readyz).
    #[arg(
        long,
        value_name = "ADDR",
        env = "CONNTRACK_METRICS_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:9000"
    )]
    pub metrics_bind_address: SocketAddr,

    /// Value of the `node` label on every metric (the DaemonSet passes the
    /// node name from the downward API).
    #[arg(
        long,
        value_name = "NAME",
        env = "CONNTRACK_METRICS_NODE_NAME",
        default_value = ""
    )]
    pub node_name: String,

    /// Minutes of observations the summary quantiles cover (a sliding
    /// window), 1 to 100.
    #[arg(long, value_name = "MINUTES", env = "CONNTRACK_METRICS_SUMMARY_TIMEOUT",
          default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub summary_timeout: u32,

    /// Statistics shards: each writer thread (each event reader) owns one,
    /// written without locks and merged on each scrape; at least --readers
    /// are made whatever this says. More shards than writers only cost memory (about 0.7 MiB each, mostly the
    /// summaries' window histograms) and scrape time.
    #[arg(long, value_name = "N", env = "CONNTRACK_METRICS_STATS_SHARDS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub stats_shards: usize,

    /// Do not write 1 to net.netfilter.nf_conntrack_acct and
    /// nf_conntrack_timestamp at start; only warn when they are 0 (then
    /// flows have no byte counters or timestamps and are not measured).
    #[arg(long, env = "CONNTRACK_METRICS_NO_SYSCTL", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_sysctl: bool,

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
    pub legacy_names: bool,
}

impl Config {
    /// Parses the process's arguments (and environment). On a bad flag,
    /// prints clap's message to stderr and exits with status 2; `--help` and
    /// `--version` print to stdout and exit 0.
    pub fn parse_args() -> Config {
        Config::from_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the first is the program name) and the
    /// `CONNTRACK_METRICS_*` environment variables, after rewriting the Go
    /// exporter's single-dash spelling to ours (see [`go_spelling`]).
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
        let config = Config::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd))?;
        if config.svc_subnets.is_empty() {
            return Err(cmd.error(
                ErrorKind::ValueValidation,
                "--svc-subnet: at least one service subnet is needed",
            ));
        }
        if !config.reader_cpu.is_empty() && config.reader_cpu.len() != config.readers {
            return Err(cmd.error(
                ErrorKind::ValueValidation,
                format!(
                    "--reader-cpu: {} CPU(s) given for {} reader(s) (--readers): give one CPU per reader",
                    config.reader_cpu.len(),
                    config.readers
                ),
            ));
        }
        if config.max_flows / config.readers < 1024 {
            return Err(cmd.error(
                ErrorKind::ValueValidation,
                format!(
                    "--max-flows: {} flows shared by {} readers leaves fewer than 1024 per reader",
                    config.max_flows, config.readers
                ),
            ));
        }
        Ok(config)
    }
}

/// `--svc-subnet` / `--exclude-subnet` values: the subnet parser's reason
/// becomes clap's message (which names the flag).
fn parse_subnet(s: &str) -> Result<Subnet, String> {
    s.parse::<Subnet>().map_err(|e| e.to_string())
}

/// `--reader-cpu`: a CPU in this process's affinity mask (not merely below
/// the CPU count: a container may be limited to, say, CPUs 4-7).
fn parse_reader_cpu(s: &str) -> Result<usize, String> {
    let cpu: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a CPU number"))?;
    let Some(allowed) = allowed_cpus() else {
        return Err("cannot read the CPUs this process may run on".to_string());
    };
    if allowed.contains(&cpu) {
        Ok(cpu)
    } else {
        Err(format!(
            "CPU {cpu} is not one this process may run on (allowed CPUs: {})",
            cpu_list(&allowed)
        ))
    }
}

/// The CPUs this process may run on (its affinity mask, so a container's
/// cpuset), ascending; `None` if they cannot be read.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    let mut allowed: Vec<usize> = core_affinity::get_core_ids()?
        .into_iter()
        .map(|id| id.id)
        .collect();
    allowed.sort_unstable();
    Some(allowed)
}

/// `sorted` in the kernel's cpulist form: `0-3,8,10-11`.
fn cpu_list(sorted: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if end == start {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

/// Rewrites the Go `flag` package's spelling of OUR long flags to clap's:
/// `-name=value` -> `--name=value` and `-name` -> `--name`, for `name` one of
/// our long flags (`help` and `version` included).
///
/// - Boolean flags need nothing more: they take an optional `=value` (Go's
///   `-print-events=false` becomes `--print-events=false`, an explicit false
///   that beats the environment variable, as any command-line value does).
/// - Values are never rewritten: the word after a value-taking flag given
///   without `=` (`-node-name -x`) is passed on as it is, and so is every
///   word after `--`.
/// - A single-dash word that is not one of our long flags (`-h`, `-V`,
///   `-no-such-flag`) is left for clap to judge.
pub fn go_spelling(cmd: &clap::Command, args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    // Long name -> whether a value follows as the next word when not given
    // with `=`.
    let longs: HashMap<&str, bool> = cmd
        .get_arguments()
        .filter_map(|a| {
            let value_next = a.get_action().takes_values() && !a.is_require_equals_set();
            Some((a.get_long()?, value_next))
        })
        .chain([("help", false), ("version", false)])
        .collect();

    let mut args = args.into_iter();
    let mut out: Vec<OsString> = args.next().into_iter().collect(); // program name
    let mut value_next = false;
    let mut rest_verbatim = false;
    for arg in args {
        if rest_verbatim || value_next {
            value_next = false;
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            rest_verbatim = true;
            out.push(arg);
            continue;
        }
        let (dashes, body) = match s.strip_prefix("--") {
            Some(b) => (2, b),
            None => match s.strip_prefix('-') {
                Some(b) if !b.is_empty() => (1, b),
                _ => {
                    out.push(arg);
                    continue;
                }
            },
        };
        let (name, has_value) = match body.split_once('=') {
            Some((n, _)) => (n, true),
            None => (body, false),
        };
        match longs.get(name) {
            Some(&takes_next) => {
                value_next = takes_next && !has_value;
                if dashes == 1 {
                    out.push(format!("--{body}").into());
                } else {
                    out.push(arg);
                }
            }
            None => out.push(arg),
        }
    }
    out
}

/// clap reads an unknown single-dash word (`-no-such-flag`) as a cluster of
/// short flags and reports only its first letter (`'-n'`); name the whole
/// word instead.
fn name_unknown_single_dash(
    err: clap::Error,
    args: &[OsString],
    cmd: &mut clap::Command,
) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    if err.kind() != ErrorKind::UnknownArgument {
        return err;
    }
    let Some(ContextValue::String(invalid)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    if invalid.len() != 2 || invalid.starts_with("--") {
        return err;
    }
    let word = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| a.len() > 2 && !a.starts_with("--") && a.starts_with(invalid.as_str()));
    match word {
        Some(word) => cmd.error(
            ErrorKind::UnknownArgument,
            format!("unexpected argument '{word}' found (not a flag of this program)"),
        ),
        None => err,
    }
}

/// A bad value that came from an environment variable, not the command
/// line: say so, or the user hunts for a flag they never typed.
fn name_env_source(err: clap::Error, args: &[OsString], cmd: &mut clap::Command) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    use std::error::Error as _;
    if err.kind() != ErrorKind::ValueValidation {
        return err;
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        err.get(ContextKind::InvalidArg),
        err.get(ContextKind::InvalidValue),
    ) else {
        return err;
    };
    // `arg` is rendered as `--max-flows <N>` or `--print-events[=<BOOL>]`.
    let long = arg
        .strip_prefix("--")
        .and_then(|a| a.split([' ', '[', '=']).next())
        .unwrap_or_default();
    let Some(env) = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .and_then(|e| e.to_str())
    else {
        return err;
    };
    let flag = format!("--{long}");
    let on_command_line = args.iter().skip(1).filter_map(|a| a.to_str()).any(|a| {
        a.strip_prefix(flag.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    });
    if on_command_line || std::env::var_os(env).is_none() {
        return err;
    }
    let why = err.source().map(|s| format!(": {s}")).unwrap_or_default();
    let (arg, value) = (arg.clone(), value.clone());
    cmd.error(
        ErrorKind::ValueValidation,
        format!("invalid value '{value}' for '{arg}' from environment variable {env}{why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Mutex, MutexGuard};

    /// clap reads the environment when the command is built, and the
    /// environment is process-global: every test here parses under this
    /// lock so the one test that sets variables cannot leak into others.
    static ENV: Mutex<()> = Mutex::new(());

    fn env_lock() -> MutexGuard<'static, ()> {
        ENV.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let _g = env_lock();
        Config::from_args(std::iter::once("conntrack-metrics").chain(args.iter().copied()))
    }

    fn subnets(list: &[&str]) -> Vec<Subnet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn defaults_config() -> Config {
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
            legacy_names: false,
        }
    }

    #[test]
    fn command_is_well_formed() {
        Config::command().debug_assert();
    }

    #[test]
    fn defaults() {
        assert_eq!(parse(&[]).unwrap(), defaults_config());
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
                legacy_names: true,
            }
        );
    }

    #[test]
    fn the_go_exporters_daemonset_arguments_work_unchanged() {
        let c = parse(&[
            "-svc-subnet=10.96.0.0/16",
            "-exclude-subnet=10.96.0.0/24",
            "-node-name=worker-1",
            "-summary-timeout=5",
            "-metrics-bind-address=0.0.0.0:9000",
            "-print-events",
        ])
        .unwrap();
        assert_eq!(
            c,
            Config {
                exclude_subnets: subnets(&["10.96.0.0/24"]),
                node_name: "worker-1".into(),
                summary_timeout: 5,
                print_events: true,
                ..defaults_config()
            }
        );
    }

    #[test]
    fn go_spelling_with_separate_values() {
        let c = parse(&[
            "-svc-subnet",
            "10.0.0.0/8",
            "-exclude-subnet",
            "10.0.0.0/24",
            "-node-name",
            "n2",
            "-summary-timeout",
            "7",
            "-metrics-bind-address",
            "127.0.0.1:9001",
            "-max-flows",
            "4096",
            "-no-sysctl",
        ])
        .unwrap();
        assert_eq!(
            c,
            Config {
                svc_subnets: subnets(&["10.0.0.0/8"]),
                exclude_subnets: subnets(&["10.0.0.0/24"]),
                node_name: "n2".into(),
                summary_timeout: 7,
                metrics_bind_address: "127.0.0.1:9001".parse().unwrap(),
                max_flows: 4096,
                no_sysctl: true,
                ..defaults_config()
            }
        );
    }

    #[test]
    fn go_bool_values() {
        for (arg, want) in [
            ("-print-events=true", true),
            ("-print-events=false", false),
            ("-print-events=1", true),
            ("-print-events=0", false),
            ("-print-events=T", true),
            ("-print-events=F", false),
            ("-print-events=True", true),
            ("-print-events=FALSE", false),
            ("--print-events=true", true),
            ("--print-events=false", false),
            ("-print-events", true),
        ] {
            assert_eq!(parse(&[arg]).unwrap().print_events, want, "{arg}");
        }
        let c = parse(&["-print-events=false", "-no-sysctl=true", "-legacy-names=0"]).unwrap();
        assert_eq!(
            (c.print_events, c.no_sysctl, c.legacy_names),
            (false, true, false)
        );
        let err = parse(&["-print-events=maybe"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--print-events"), "{err}");
    }

    #[test]
    fn go_spelling_pre_pass_leaves_values_unknown_names_and_shorts_alone() {
        let cmd = Config::command();
        let rewrite = |args: &[&str]| -> Vec<String> {
            go_spelling(&cmd, args.iter().map(OsString::from))
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect()
        };
        assert_eq!(
            rewrite(&[
                "prog",
                "-node-name",
                "-print-events",
                "-svc-subnet=1.0.0.0/8"
            ]),
            [
                "prog",
                "--node-name",
                "-print-events",
                "--svc-subnet=1.0.0.0/8"
            ]
        );
        assert_eq!(
            rewrite(&["prog", "--node-name", "-max-flows", "-max-flows", "2048"]),
            ["prog", "--node-name", "-max-flows", "--max-flows", "2048"]
        );
        assert_eq!(
            rewrite(&[
                "prog",
                "-no-such-flag=1",
                "-h",
                "-V",
                "-",
                "-help",
                "-version"
            ]),
            [
                "prog",
                "-no-such-flag=1",
                "-h",
                "-V",
                "-",
                "--help",
                "--version"
            ]
        );
        assert_eq!(
            rewrite(&["prog", "--", "-print-events", "-node-name=x"]),
            ["prog", "--", "-print-events", "-node-name=x"]
        );
        // The program name is never touched, even if it looks like a flag.
        assert_eq!(rewrite(&["-print-events"]), ["-print-events"]);
        // A value that looks like a Go flag stays a value (clap then sees it
        // as the node name, since it follows `=`).
        assert_eq!(
            parse(&["-node-name=-print-events"]).unwrap().node_name,
            "-print-events"
        );
        // An unknown single-dash name reaches clap, which rejects it; the
        // message names the whole word, not just its first letter.
        for (args, word) in [
            (&["-no-such-flag=1"][..], "'-no-such-flag=1'"),
            (&["-print-events", "-nope"], "'-nope'"),
            (&["-x"], "'-x'"),
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert_eq!(err.kind(), ErrorKind::UnknownArgument);
            assert!(err.to_string().contains(word), "{args:?}: {err}");
        }
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
            (&["--reader-cpu", "one"], "--reader-cpu", "not a CPU number"),
            (&["--readers", "0"], "--readers", "1..=64"),
            (&["--readers=65"], "--readers", "1..=64"),
            (
                &["--readers", "2", "--reader-cpu", "0"],
                "--reader-cpu",
                "1 CPU(s) given for 2 reader(s)",
            ),
            (
                &["--readers", "2", "--max-flows", "2047"],
                "--max-flows",
                "fewer than 1024 per reader",
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
    fn reader_cpu_must_be_one_this_process_may_run_on() {
        let allowed: Vec<usize> = core_affinity::get_core_ids()
            .expect("affinity mask")
            .into_iter()
            .map(|c| c.id)
            .collect();
        let cpu = allowed[0];
        assert_eq!(
            parse(&["--reader-cpu", &cpu.to_string()])
                .unwrap()
                .reader_cpu,
            vec![cpu]
        );
        assert_eq!(parse(&["-reader-cpu=0"]).is_ok(), allowed.contains(&0));
        let err = parse(&["--reader-cpu", "100000"]).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.exit_code(), 2);
        assert!(
            msg.contains("--reader-cpu") && msg.contains("CPU 100000"),
            "{msg}"
        );
        let mut sorted = allowed.clone();
        sorted.sort_unstable();
        assert!(
            msg.contains(&format!("allowed CPUs: {}", cpu_list(&sorted))),
            "{msg}"
        );
    }

    #[test]
    fn cpu_list_is_the_kernels_cpulist_form() {
        assert_eq!(cpu_list(&[]), "");
        assert_eq!(cpu_list(&[0]), "0");
        assert_eq!(cpu_list(&[0, 1]), "0-1");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
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

    #[test]
    fn environment_variables_and_the_command_line_beats_them() {
        let _g = env_lock();
        let vars = [
            ("CONNTRACK_METRICS_SVC_SUBNET", "10.0.0.0/8,fd00::/64"),
            ("CONNTRACK_METRICS_EXCLUDE_SUBNET", "10.0.0.0/24"),
            ("CONNTRACK_METRICS_PRINT_EVENTS", "1"),
            ("CONNTRACK_METRICS_RCVBUF_BYTES", "8192"),
            ("CONNTRACK_METRICS_RECV_BATCH", "16"),
            ("CONNTRACK_METRICS_MAX_FLOWS", "2048"),
            ("CONNTRACK_METRICS_METRICS_BIND_ADDRESS", "127.0.0.1:9999"),
            ("CONNTRACK_METRICS_NODE_NAME", "from-env"),
            ("CONNTRACK_METRICS_SUMMARY_TIMEOUT", "3"),
            ("CONNTRACK_METRICS_STATS_SHARDS", "4"),
            ("CONNTRACK_METRICS_NO_SYSCTL", "true"),
            ("CONNTRACK_METRICS_LEGACY_NAMES", "0"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let from_env = Config::from_args(["x"]);
        let cmd_line_wins = Config::from_args([
            "x",
            "-svc-subnet=10.96.0.0/16",
            "--node-name",
            "from-flag",
            "-summary-timeout=5",
            "--legacy-names",
            "-print-events=false", // explicit false beats the variable's 1
        ]);
        std::env::set_var("CONNTRACK_METRICS_PRINT_EVENTS", "false");
        std::env::set_var("CONNTRACK_METRICS_NO_SYSCTL", "no");
        let false_bools = Config::from_args(["x"]);
        std::env::set_var("CONNTRACK_METRICS_MAX_FLOWS", "12");
        let bad = Config::from_args(["x"]);
        let bad_but_overridden = Config::from_args(["x", "-max-flows=4096"]);
        let bad_on_cmd_line = Config::from_args(["x", "-max-flows", "13"]);
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        let cpu_env = {
            std::env::set_var("CONNTRACK_METRICS_READER_CPU", "100000");
            let r = Config::from_args(["x"]);
            std::env::remove_var("CONNTRACK_METRICS_READER_CPU");
            r
        };

        let env_config = Config {
            svc_subnets: subnets(&["10.0.0.0/8", "fd00::/64"]),
            exclude_subnets: subnets(&["10.0.0.0/24"]),
            print_events: true,
            rcvbuf_bytes: 8192,
            recv_batch: 16,
            drain_delay_us: 1000,
            reader_cpu: vec![],
            readers: 1,
            no_socket_filter: false,
            event_mask: false,
            max_flows: 2048,
            metrics_bind_address: "127.0.0.1:9999".parse().unwrap(),
            node_name: "from-env".into(),
            summary_timeout: 3,
            stats_shards: 4,
            no_sysctl: true,
            legacy_names: false,
        };
        assert_eq!(from_env.unwrap(), env_config);
        assert_eq!(
            cmd_line_wins.unwrap(),
            Config {
                svc_subnets: subnets(&["10.96.0.0/16"]),
                node_name: "from-flag".into(),
                summary_timeout: 5,
                legacy_names: true,
                print_events: false,
                ..env_config.clone()
            }
        );
        let c = false_bools.unwrap();
        assert_eq!((c.print_events, c.no_sysctl), (false, false));
        let err = bad.unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains("'12' for '--max-flows <N>' from environment variable CONNTRACK_METRICS_MAX_FLOWS: 12 is not in 1024..=16777216"),
            "{msg}"
        );
        assert!(bad_but_overridden.is_ok(), "{bad_but_overridden:?}");
        let msg = bad_on_cmd_line.unwrap_err().to_string();
        assert!(
            msg.contains("'13' for '--max-flows <N>'") && !msg.contains("environment"),
            "{msg}"
        );
        let msg = cpu_env.unwrap_err().to_string();
        assert!(
            msg.contains("--reader-cpu") && msg.contains("CONNTRACK_METRICS_READER_CPU"),
            "{msg}"
        );
    }
}
