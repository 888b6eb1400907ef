//! The exporter's own metrics (receive buffer, flow tables, datagrams per
//! reader, scrape duration, refused HTTP connections, Service names): the
//! `metrics` facade's recorder, and the cells it writes that each scrape
//! reads.
//!
//! Owns: the self-metric families ([`FAMILIES`]: names, kinds, help,
//! buckets), [`SelfMetrics`] (their cells, one per label set), and
//! [`Recorder`], the `metrics::Recorder` that hands out handles over those
//! cells. The per-event families are not here: they live in the shards.
//! Never: is reached per event (a handle is made once, before a reader's
//! loop, and then recording through it is one atomic add or store); renders
//! text (that is `expo`); forgets a cell it handed out.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};

/// Receive buffer the kernel granted each netlink socket (gauge).
pub const RECEIVE_BUFFER: &str = "conntrack_monitoring_netlink_receive_buffer_bytes";
/// Netlink datagrams each reader received (counter, label `reader`).
pub const READER_DATAGRAMS: &str = "conntrack_monitoring_reader_datagrams_total";
/// Flows each reader's flow table holds (gauge, label `reader`).
pub const FLOW_TABLE_CAPACITY: &str = "conntrack_monitoring_flow_table_capacity";
/// Flows in each reader's flow table (gauge, label `reader`).
pub const FLOW_TABLE_FLOWS: &str = "conntrack_monitoring_flow_table_flows";
/// DNAT'd flows to destinations outside every service subnet at the last
/// table dump (gauge).
pub const DNAT_OUTSIDE: &str = "conntrack_monitoring_dnat_flows_outside_service_subnets";
/// Dumps of the kernel's conntrack table (counter, label `outcome`).
pub const TABLE_DUMPS: &str = "conntrack_monitoring_table_dumps_total";
/// Event readers stuck on one batch for longer than the health limit, at
/// the scrape (gauge).
pub const READERS_STUCK: &str = "conntrack_monitoring_readers_stuck";
/// Entries in the node's conntrack table, at the scrape (gauge).
pub const NODE_ENTRIES: &str = "conntrack_monitoring_node_entries";
/// The node's `nf_conntrack_max` (gauge).
pub const NODE_ENTRIES_LIMIT: &str = "conntrack_monitoring_node_entries_limit";
/// The node's per-CPU conntrack counters summed over CPUs (counters), in
/// the order of `wire::stats::CPU_STATS`.
pub const NODE_STAT_FAMILIES: [&str; 10] = [
    "conntrack_monitoring_node_found_total",
    "conntrack_monitoring_node_invalid_total",
    "conntrack_monitoring_node_insert_total",
    "conntrack_monitoring_node_insert_failed_total",
    "conntrack_monitoring_node_drop_total",
    "conntrack_monitoring_node_early_drop_total",
    "conntrack_monitoring_node_error_total",
    "conntrack_monitoring_node_search_restart_total",
    "conntrack_monitoring_node_clash_resolve_total",
    "conntrack_monitoring_node_chaintoolong_total",
];
/// With `--event-mask`: 1 while this exporter's table is held, 0 once its
/// `nft -i` owner is gone (gauge).
pub const EVENT_MASK_HELD: &str = "conntrack_monitoring_event_mask_held";
/// Time to merge the shards and render one scrape (histogram).
pub const SCRAPE_DURATION: &str = "conntrack_monitoring_scrape_duration_seconds";
/// Connections the HTTP endpoint refused with 503 (counter, label `reason`).
pub const HTTP_REFUSED: &str = "conntrack_monitoring_http_connections_refused_total";
/// Connections closed for a TLS error (counter).
pub const HTTP_TLS_ERRORS: &str = "conntrack_monitoring_http_tls_errors_total";
/// Requests' Basic authentication outcomes (counter, label `outcome`).
pub const HTTP_AUTH: &str = "conntrack_monitoring_http_auth_total";
/// Reloads of the web configuration file (counter, label `outcome`).
pub const WEB_CONFIG_RELOADS: &str = "conntrack_monitoring_web_config_reloads_total";
/// 1 when the last reload of the web configuration file succeeded, 0 when
/// it failed and an older configuration is in force (gauge).
pub const WEB_CONFIG_RELOAD_OK: &str = "conntrack_monitoring_web_config_last_reload_successful";
/// Services named from kube-proxy's rules at the last read (gauge, label
/// `source`).
pub const SERVICE_NAMES: &str = "conntrack_monitoring_service_names";
/// Reads of kube-proxy's rules that failed, and rules skipped as
/// unreadable (counter, labels `source`, `reason`).
pub const SERVICE_NAME_ERRORS: &str = "conntrack_monitoring_service_name_errors_total";

/// What a family's samples are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A count that only goes up; its name ends in `_total`.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Observations in fixed buckets, with their sum.
    Histogram,
}

/// A self-metric family known before anything registers it, so that its
/// help and buckets never depend on registration order.
#[derive(Clone, Copy, Debug)]
pub struct FamilyDef {
    /// Full name (a counter's ends in `_total`).
    pub name: &'static str,
    /// Its kind.
    pub kind: Kind,
    /// HELP text.
    pub help: &'static str,
    /// Bucket upper bounds of a histogram, in its unit; empty otherwise.
    pub bounds: &'static [f64],
}

/// The self-metric families, in render order.
pub const FAMILIES: [FamilyDef; 28] = [
    FamilyDef {
        name: READER_DATAGRAMS,
        kind: Kind::Counter,
        help: "Netlink datagrams each event reader received (each a conntrack event or a control message)",
        bounds: &[],
    },
    FamilyDef {
        name: FLOW_TABLE_CAPACITY,
        kind: Kind::Gauge,
        help: "Flows each reader's flow table holds before it evicts the oldest (--max-flows / --readers)",
        bounds: &[],
    },
    FamilyDef {
        name: FLOW_TABLE_FLOWS,
        kind: Kind::Gauge,
        help: "Service flows being tracked between their NEW and DESTROY, by event reader",
        bounds: &[],
    },
    FamilyDef {
        name: RECEIVE_BUFFER,
        kind: Kind::Gauge,
        help: "Receive buffer the kernel granted the netlink socket",
        bounds: &[],
    },
    FamilyDef {
        name: DNAT_OUTSIDE,
        kind: Kind::Gauge,
        help: "DNAT'd flows whose original destination is outside every --svc-subnet and not an address of this node, at the last table dump: Services a too-narrow --svc-subnet misses, or LoadBalancer and external IPs",
        bounds: &[],
    },
    FamilyDef {
        name: TABLE_DUMPS,
        kind: Kind::Counter,
        help: "Dumps of the kernel's conntrack table (--table-dump-seconds), by outcome (ok, failed)",
        bounds: &[],
    },
    FamilyDef {
        name: READERS_STUCK,
        kind: Kind::Gauge,
        help: "Event readers that have been on one batch for more than 5 s at this scrape (/healthz fails meanwhile); 0 normally",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_ENTRIES,
        kind: Kind::Gauge,
        help: "Entries in the node's conntrack table (what conntrack -C counts), read from ctnetlink at the scrape",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_ENTRIES_LIMIT,
        kind: Kind::Gauge,
        help: "The node's nf_conntrack_max: the table takes no new entry beyond it (early drops, then drops)",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[0],
        kind: Kind::Counter,
        help: "Conntrack lookups that found an entry, summed over CPUs (conntrack -S found)",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[1],
        kind: Kind::Counter,
        help: "Packets conntrack could not track (conntrack -S invalid): malformed, out of window, bad checksum",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[2],
        kind: Kind::Counter,
        help: "Entries inserted into the conntrack table (conntrack -S insert)",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[3],
        kind: Kind::Counter,
        help: "Entries that could not be inserted (conntrack -S insert_failed): a clash between two packets of a new flow; their packets were dropped",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[4],
        kind: Kind::Counter,
        help: "Packets dropped because the conntrack table was full and nothing could be evicted (conntrack -S drop)",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[5],
        kind: Kind::Counter,
        help: "Entries evicted early to make room in a full conntrack table (conntrack -S early_drop)",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[6],
        kind: Kind::Counter,
        help: "Packets that hit an ICMP error or other conntrack error (conntrack -S error)",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[7],
        kind: Kind::Counter,
        help: "Conntrack lookups restarted because the table changed under them (conntrack -S search_restart)",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[8],
        kind: Kind::Counter,
        help: "Insert clashes that conntrack resolved (conntrack -S clash_resolve)",
        bounds: &[],
    },
    FamilyDef {
        name: NODE_STAT_FAMILIES[9],
        kind: Kind::Counter,
        help: "Hash chains found too long, a sign of a hash-table attack (conntrack -S chaintoolong)",
        bounds: &[],
    },
    FamilyDef {
        name: EVENT_MASK_HELD,
        kind: Kind::Gauge,
        help: "With --event-mask: 1 while this exporter's nftables table is held by its nft -i child, 0 once that child is gone (and the table and the mask with it)",
        bounds: &[],
    },
    FamilyDef {
        name: SCRAPE_DURATION,
        kind: Kind::Histogram,
        help: "Time to merge the shards and render one scrape",
        bounds: &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25],
    },
    FamilyDef {
        name: HTTP_REFUSED,
        kind: Kind::Counter,
        help: "Connections the HTTP endpoint answered 503 and closed: too many from one address (peer cap) or all served connections busy (connection cap)",
        bounds: &[],
    },
    FamilyDef {
        name: HTTP_TLS_ERRORS,
        kind: Kind::Counter,
        help: "Connections to the TLS endpoint closed for a TLS error: a failed handshake (plain HTTP, TLS below 1.2, a client certificate refused) or a bad record",
        bounds: &[],
    },
    FamilyDef {
        name: HTTP_AUTH,
        kind: Kind::Counter,
        help: "Requests checked against basic_auth_users, by outcome: accepted cached, accepted (after a bcrypt check), refused (401), no credentials (401), limited (429: too many password checks from the peer or in all)",
        bounds: &[],
    },
    FamilyDef {
        name: WEB_CONFIG_RELOADS,
        kind: Kind::Counter,
        help: "Reloads of --web.config.file (on SIGHUP or a changed file), by outcome: success, or failure (the configuration in force was kept)",
        bounds: &[],
    },
    FamilyDef {
        name: WEB_CONFIG_RELOAD_OK,
        kind: Kind::Gauge,
        help: "With --web.config.file: 1 when the last reload succeeded (or none was needed), 0 when the file is broken and an older configuration is in force",
        bounds: &[],
    },
    FamilyDef {
        name: SERVICE_NAMES,
        kind: Kind::Gauge,
        help: "Services (namespace and name) named by kube-proxy's rules on this node at the last read, by source (nftables, iptables)",
        bounds: &[],
    },
    FamilyDef {
        name: SERVICE_NAME_ERRORS,
        kind: Kind::Counter,
        help: "Problems reading Service names from kube-proxy's rules, by source (nftables, iptables) and reason (read failed: the command failed or timed out; malformed: a rule or map element skipped)",
        bounds: &[],
    },
];

/// Buckets of a histogram no [`FamilyDef`] describes: the Prometheus client
/// libraries' defaults, in seconds.
const DEFAULT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram's cell: fixed buckets and the sum, written with atomic adds
/// from any thread.
#[derive(Debug)]
pub struct HistogramCell {
    bounds: Box<[f64]>,
    /// One per bound, then `+Inf`; not cumulative.
    buckets: Box<[AtomicU64]>,
    /// The sum's `f64` bits.
    sum: AtomicU64,
}

impl HistogramCell {
    fn new(bounds: &[f64]) -> HistogramCell {
        HistogramCell {
            bounds: bounds.into(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        // First bound >= value (`le` is inclusive); NaN goes to +Inf.
        let bucket = if value.is_nan() {
            self.bounds.len()
        } else {
            self.bounds.partition_point(|&b| b < value)
        };
        self.buckets[bucket].fetch_add(1, Relaxed);
        // Several threads may record: the sum is a compare-and-swap loop.
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }
}

/// A cell of one label set.
#[derive(Clone, Debug)]
enum Cell {
    Counter(Arc<AtomicU64>),
    /// The gauge's `f64` bits (`metrics`' own `GaugeFn` for `AtomicU64`).
    Gauge(Arc<AtomicU64>),
    Histogram(Arc<HistogramCell>),
}

/// A label set as registered: names and values in the facade's order.
pub type Labels = Vec<(String, String)>;

/// One self-metric family and its series.
#[derive(Debug)]
struct Family {
    name: String,
    kind: Kind,
    help: String,
    bounds: Box<[f64]>,
    /// Ordered by labels.
    series: Vec<(Labels, Cell)>,
}

/// What a scrape reads of one series.
#[derive(Clone, Copy, Debug)]
pub enum SeriesValue<'a> {
    /// A counter's total.
    Counter(u64),
    /// A gauge's value.
    Gauge(f64),
    /// A histogram's bounds, bucket counts (not cumulative, `+Inf` last;
    /// read one by one, so a concurrent observation may be caught in some
    /// and not others) and sum.
    Histogram {
        /// Bucket upper bounds.
        bounds: &'a [f64],
        /// Bucket cells.
        buckets: &'a [AtomicU64],
        /// The sum.
        sum: f64,
    },
}

/// One family as a scrape sees it.
pub struct FamilyView<'a> {
    family: &'a Family,
}

impl<'a> FamilyView<'a> {
    /// Full name (a counter's ends in `_total`).
    pub fn name(&self) -> &'a str {
        &self.family.name
    }

    /// Its kind.
    pub fn kind(&self) -> Kind {
        self.family.kind
    }

    /// HELP text (empty if nothing described it).
    pub fn help(&self) -> &'a str {
        &self.family.help
    }

    /// Its series, ordered by labels, with their values now.
    pub fn series(&self) -> impl Iterator<Item = (&'a [(String, String)], SeriesValue<'a>)> {
        self.family.series.iter().map(|(labels, cell)| {
            let value = match cell {
                Cell::Counter(c) => SeriesValue::Counter(c.load(Relaxed)),
                Cell::Gauge(g) => SeriesValue::Gauge(f64::from_bits(g.load(Relaxed))),
                Cell::Histogram(h) => SeriesValue::Histogram {
                    bounds: &h.bounds,
                    buckets: &h.buckets,
                    sum: f64::from_bits(h.sum.load(Relaxed)),
                },
            };
            (labels.as_slice(), value)
        })
    }
}

/// Every self-metric family and its cells. The lock is taken when a handle
/// is registered (at start) and by each scrape, never by a handle's
/// recording.
#[derive(Debug)]
pub struct SelfMetrics {
    families: Mutex<Vec<Family>>,
}

impl Default for SelfMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SelfMetrics {
    /// The [`FAMILIES`], with no series yet.
    pub fn new() -> SelfMetrics {
        let families = FAMILIES
            .iter()
            .map(|d| Family {
                name: d.name.to_string(),
                kind: d.kind,
                help: d.help.to_string(),
                bounds: d.bounds.into(),
                series: Vec::new(),
            })
            .collect();
        SelfMetrics {
            families: Mutex::new(families),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Family>> {
        // A panic while holding the lock leaves the list whole (every change
        // is one push or insert): go on with it.
        self.families.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls `visit` with each family that has a series, in render order
    /// ([`FAMILIES`] first, then others in the order they were first named).
    pub fn for_each(&self, mut visit: impl FnMut(FamilyView<'_>)) {
        for family in self.lock().iter().filter(|f| !f.series.is_empty()) {
            visit(FamilyView { family });
        }
    }

    /// The family `name` of `kind`, added if new; `None` if `name` is taken
    /// by another kind.
    fn family<'a>(families: &'a mut Vec<Family>, name: &str, kind: Kind) -> Option<&'a mut Family> {
        let at = match families.iter().position(|f| f.name == name) {
            Some(at) => at,
            None => {
                families.push(Family {
                    name: name.to_string(),
                    kind,
                    help: String::new(),
                    bounds: DEFAULT_BOUNDS.into(),
                    series: Vec::new(),
                });
                families.len() - 1
            }
        };
        let family = &mut families[at];
        (family.kind == kind).then_some(family)
    }

    fn describe(&self, name: &str, kind: Kind, help: &str) {
        let mut families = self.lock();
        if let Some(family) = Self::family(&mut families, name, kind) {
            if family.help.is_empty() {
                family.help = help.to_string();
            }
        }
    }

    /// The cell of `key` in a family of `kind`, made if new; `None` if the
    /// name is another kind's.
    fn cell(&self, key: &Key, kind: Kind) -> Option<Cell> {
        let mut families = self.lock();
        let family = Self::family(&mut families, key.name(), kind)?;
        let labels: Labels = key
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        let at = match family.series.binary_search_by(|(l, _)| l.cmp(&labels)) {
            Ok(at) => at,
            Err(at) => {
                let cell = match kind {
                    Kind::Counter => Cell::Counter(Arc::default()),
                    Kind::Gauge => Cell::Gauge(Arc::new(AtomicU64::new(0f64.to_bits()))),
                    Kind::Histogram => {
                        Cell::Histogram(Arc::new(HistogramCell::new(&family.bounds)))
                    }
                };
                family.series.insert(at, (labels, cell));
                at
            }
        };
        Some(family.series[at].1.clone())
    }
}

/// The `metrics` facade's recorder over a [`SelfMetrics`]: install it with
/// `metrics::set_global_recorder` (or `with_local_recorder` in a test), and
/// every `metrics::counter!`, `gauge!` and `histogram!` writes into the
/// cells the scrape renders. A name used with two kinds gets a handle that
/// records nothing for the second.
#[derive(Clone, Debug)]
pub struct Recorder {
    metrics: Arc<SelfMetrics>,
}

impl Recorder {
    /// A recorder writing into `metrics`.
    pub fn new(metrics: Arc<SelfMetrics>) -> Recorder {
        Recorder { metrics }
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.metrics
            .describe(key.as_str(), Kind::Counter, &description);
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.metrics
            .describe(key.as_str(), Kind::Gauge, &description);
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.metrics
            .describe(key.as_str(), Kind::Histogram, &description);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        match self.metrics.cell(key, Kind::Counter) {
            Some(Cell::Counter(c)) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        match self.metrics.cell(key, Kind::Gauge) {
            Some(Cell::Gauge(g)) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        match self.metrics.cell(key, Kind::Histogram) {
            Some(Cell::Histogram(h)) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family with a series: (name, [(labels, value as text)]).
    fn read(metrics: &SelfMetrics) -> Vec<(String, Vec<(Labels, String)>)> {
        let mut out = Vec::new();
        metrics.for_each(|f| {
            let series = f
                .series()
                .map(|(labels, value)| {
                    let v = match value {
                        SeriesValue::Counter(n) => n.to_string(),
                        SeriesValue::Gauge(g) => g.to_string(),
                        SeriesValue::Histogram { buckets, sum, .. } => format!(
                            "{:?} sum {sum}",
                            buckets.iter().map(|b| b.load(Relaxed)).collect::<Vec<_>>()
                        ),
                    };
                    (labels.to_vec(), v)
                })
                .collect();
            out.push((f.name().to_string(), series));
        });
        out
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn facade_handles_write_the_cells_a_scrape_reads() {
        let metrics = Arc::new(SelfMetrics::new());
        assert!(read(&metrics).is_empty(), "no series until registered");
        let recorder = Recorder::new(Arc::clone(&metrics));
        metrics::with_local_recorder(&recorder, || {
            let c1 = metrics::counter!(READER_DATAGRAMS, "reader" => "1");
            let c0 = metrics::counter!(READER_DATAGRAMS, "reader" => "0");
            c1.increment(3);
            c0.increment(2);
            // The same key again: the same cell.
            metrics::counter!(READER_DATAGRAMS, "reader" => "0").increment(5);
            metrics::gauge!(RECEIVE_BUFFER).set(4096.0);
            let h = metrics::histogram!(SCRAPE_DURATION);
            for v in [0.0001, 0.0005, 0.003, 7.0] {
                h.record(v);
            }
            // A name already taken by another kind records nothing.
            metrics::gauge!(READER_DATAGRAMS).set(1.0);
        });
        let got = read(&metrics);
        let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [READER_DATAGRAMS, RECEIVE_BUFFER, SCRAPE_DURATION]);
        assert_eq!(
            got[0].1,
            [
                (labels(&[("reader", "0")]), "7".to_string()),
                (labels(&[("reader", "1")]), "3".to_string())
            ]
        );
        assert_eq!(got[1].1, [(labels(&[]), "4096".to_string())]);
        // le=0.0005 is inclusive; 7 s is past the last bound.
        assert_eq!(got[2].1[0].1, "[2, 0, 0, 1, 0, 0, 0, 0, 0, 1] sum 7.0036");
    }

    #[test]
    fn unknown_families_take_their_description_and_default_buckets() {
        let metrics = Arc::new(SelfMetrics::new());
        let recorder = Recorder::new(Arc::clone(&metrics));
        metrics::with_local_recorder(&recorder, || {
            metrics::describe_histogram!("x_seconds", "What x took");
            metrics::histogram!("x_seconds").record(0.2);
        });
        let mut seen = Vec::new();
        metrics.for_each(|f| seen.push((f.name().to_string(), f.help().to_string(), f.kind())));
        assert_eq!(
            seen,
            [(
                "x_seconds".to_string(),
                "What x took".to_string(),
                Kind::Histogram
            )]
        );
        metrics.for_each(|f| {
            let (_, value) = f.series().next().unwrap();
            let SeriesValue::Histogram { bounds, .. } = value else {
                panic!("not a histogram")
            };
            assert_eq!(bounds, DEFAULT_BOUNDS);
        });
    }
}
